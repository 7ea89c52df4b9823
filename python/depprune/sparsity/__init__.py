"""Sparse training and iterative pruning: takes a model (and its graph), gives regularisers
to train it with and schedules to prune it a little at a time.

- :class:`GroupRegularizer`: DepGraph's group-level penalty (every parameter a
  unit would remove pushed to zero together), with :meth:`~GroupRegularizer.importance`
  to prune by the learned group norms afterwards;
- :class:`BatchNormL1`: Network Slimming's L1 penalty on BatchNorm scales;
- :func:`ratio_schedule` and :class:`IterativePruner`: prune to a final ratio
  over several steps (linear, cubic or geometric), training in between.

Both regularisers work the same way: add ``reg.penalty()`` to the loss, or
call ``reg.step()`` after ``loss.backward()``.

>>> import torch, depprune
>>> from depprune.sparsity import BatchNormL1, GroupRegularizer, ratio_schedule
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
...                             torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
>>> x = torch.randn(2, 3, 8, 8)
>>> group = GroupRegularizer(model, depprune.trace(model, x))
>>> slimming = BatchNormL1(model)
>>> (model(x).square().mean() + group.penalty() + slimming.penalty()).backward()
>>> ratio_schedule(0.5, 2)
[0.25, 0.5]
"""

from depprune.sparsity.batchnorm import BatchNormL1, batchnorm_layers
from depprune.sparsity.group import GROUPINGS, GroupRegularizer, group_norm, unwrapped
from depprune.sparsity.schedule import SCHEDULES, IterativePruner, ratio_schedule, step_ratio

__all__ = [
    "GROUPINGS",
    "SCHEDULES",
    "BatchNormL1",
    "GroupRegularizer",
    "IterativePruner",
    "batchnorm_layers",
    "group_norm",
    "ratio_schedule",
    "step_ratio",
    "unwrapped",
]
