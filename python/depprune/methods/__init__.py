"""The published pruning methods, one module each, on top of depprune's groups.

Each module's ``prune(model, example_inputs, ...)`` runs the method end to end
and returns a :class:`depprune.PruneReport`; the pieces it is built from
(importances, regularisers, reconstructions) are public too.
"""
