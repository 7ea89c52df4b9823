"""The exceptions depprune raises; every one says what was wrong and how to fix it.

All derive from :class:`DeppruneError`; those about bad arguments are also
``ValueError``, so ``except ValueError`` keeps working.

>>> import depprune
>>> issubclass(depprune.InvalidEquationsError, ValueError)
True
>>> issubclass(depprune.SelectionError, depprune.DeppruneError)
True
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigWarning",
    "DeppruneError",
    "ImportanceError",
    "InternalError",
    "InvalidEquationsError",
    "InvalidPlanError",
    "MethodError",
    "PlanMismatchError",
    "ResourceError",
    "SelectionError",
    "TraceError",
    "UnsupportedOpError",
]


class DeppruneError(Exception):
    """Base class of every error depprune raises on purpose."""


class InvalidEquationsError(DeppruneError, ValueError):
    """The axis equations handed to the core are malformed (bad ids, sizes or offsets)."""


class InvalidPlanError(DeppruneError, ValueError):
    """A keep choice, group id or plan file does not fit the graph it is applied to."""


class PlanMismatchError(InvalidPlanError):
    """The plan does not fit the model it is applied to (names, shapes, indices)."""


class ImportanceError(DeppruneError, ValueError):
    """An importance could not be computed (no gradients, wrong shape, ...)."""


class MethodError(DeppruneError, ValueError):
    """A pruning method, regulariser or schedule got a model or arguments it cannot use."""


class SelectionError(DeppruneError, ValueError):
    """Ratios, scopes or constraints that cannot be used."""


class CheckpointError(DeppruneError, ValueError):
    """A checkpoint on disk cannot be read, lacks what the plan needs, or cannot be written."""


class TraceError(DeppruneError, ValueError):
    """The model could not be traced with the example inputs given."""


class UnsupportedOpError(DeppruneError, NotImplementedError):
    """The model calls an ATen op that has no axis rule (raised with ``strict=True``)."""


class ResourceError(DeppruneError, MemoryError):
    """The work would need more memory than the machine can give (a size too large)."""


class ConfigWarning(UserWarning):
    """The pruned model runs, but its Hugging Face config cannot describe it exactly."""


class InternalError(DeppruneError, RuntimeError):
    """A bug in depprune, never bad input: please report it with the message."""
