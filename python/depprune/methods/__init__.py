"""The published pruning methods, one module each, on top of depprune's groups.

Each module runs its method end to end (``prune(model, example_inputs, ...)``,
returning a report that prints as a table) and makes its pieces public
(importances, regularisers, reconstructions):

- :mod:`~depprune.methods.l1_filter`: L1-norm filter pruning (Li et al., ICLR 2017)
- :mod:`~depprune.methods.thinet`: ThiNet (Luo et al., ICCV 2017)
- :mod:`~depprune.methods.channel_regression`: LASSO channel selection and
  least-squares reconstruction (He et al., ICCV 2017)
- :mod:`~depprune.methods.slimming`: Network Slimming (Liu et al., ICCV 2017)
- :mod:`~depprune.methods.sss`: Sparse Structure Selection (Huang & Wang, ECCV 2018)
- :mod:`~depprune.methods.unstructured`: non-structured magnitude pruning
  (Han et al., NeurIPS 2015) through ``torch.nn.utils.prune``
- :mod:`~depprune.methods.depgraph`: DepGraph's group-sparse training then
  learned or uniform pruning (Fang et al., CVPR 2023)

>>> from depprune import methods
>>> sorted(methods.__all__)[:3]
['channel_regression', 'depgraph', 'l1_filter']
"""

__all__ = [
    "channel_regression",
    "depgraph",
    "l1_filter",
    "slimming",
    "sss",
    "thinet",
    "unstructured",
]
