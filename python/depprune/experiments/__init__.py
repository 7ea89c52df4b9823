"""Experiments: the papers' comparisons, rerun on data that ships in a package.

``python -m depprune.experiments.rethinking`` reruns the comparison of
"Rethinking the Value of Network Pruning" (fine-tuned versus Scratch-E and
Scratch-B) and DepGraph's sparse training versus plain magnitude, on
scikit-learn's handwritten digits (``pip install "depprune[experiments]"``).

>>> from depprune.experiments import rethinking
>>> rethinking.Settings().seeds
(0, 1, 2)
"""
