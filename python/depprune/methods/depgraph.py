"""DepGraph (Fang et al., CVPR 2023): takes a model, ideally trained with its group
regulariser, gives it pruned by group norms, with learned or uniform sparsity.

Train with :func:`regularizer` (:class:`depprune.sparsity.GroupRegularizer`:
every parameter a unit would remove pushed to zero together, the weakest
units hardest), then :func:`prune` scores each unit by its group norm under
the regulariser's grouping (plain group L2 over every parameter without a
regulariser) and removes ``ratio`` of the units:

- ``sparsity="learned"``: one global ranking (each group's norms divided by
  their mean), so the groups sparse training emptied lose the most units;
- ``sparsity="uniform"``: ``ratio`` of every group, the weakest of each.

>>> import torch, depprune
>>> from depprune.methods import depgraph
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
...                             torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> x, y = torch.randn(64, 4), torch.randn(64, 2)
>>> reg = depgraph.regularizer(model, x[:1], strength=1e-3, update_every=10)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
>>> for _ in range(20):
...     optimizer.zero_grad()
...     torch.nn.functional.mse_loss(model(x), y).backward()
...     reg.step()
...     optimizer.step()
>>> report = depgraph.prune(model, x[:1], reg, ratio=0.5, sparsity="uniform",
...                         optimizers=[optimizer])
>>> model[0].out_features, model[2].out_features
(4, 4)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

from torch import nn

import depprune
from depprune.errors import MethodError
from depprune.importance import magnitude
from depprune.sparsity import GroupRegularizer
from depprune.sparsity.group import unwrapped

__all__ = ["SPARSITY", "GroupRegularizer", "prune", "regularizer"]

#: How :func:`prune` spreads the ratio: one global ranking, or the same ratio per group.
SPARSITY = ("learned", "uniform")

#: Options of depprune.prune that the method sets itself.
_OWN = frozenset({"model", "example_inputs", "ratio", "importance", "global_ranking"})


def regularizer(
    model: nn.Module,
    example_inputs: Any,
    *,
    strength: float = 1e-4,
    alpha: float = 4.0,
    grouping: str = "full",
    update_every: int | None = None,
    kinds: Iterable[str] | None = None,
    ignored: Iterable[nn.Module] = (),
) -> GroupRegularizer:
    """Trace ``model`` (the unwrapped module under DDP) and build its group regulariser.

    The arguments after ``example_inputs`` are :class:`~depprune.sparsity.GroupRegularizer`'s.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> regularizer(model, torch.zeros(1, 2), grouping="linear").members
    {0: (('0.weight', 0), ('0.bias', 0), ('1.weight', 1))}
    """
    graph = depprune.trace(unwrapped(model), example_inputs, ignored=ignored)
    return GroupRegularizer(
        model,
        graph,
        strength=strength,
        alpha=alpha,
        grouping=grouping,
        update_every=update_every,
        kinds=kinds,
        ignored=ignored,
    )


def prune(
    model: nn.Module,
    example_inputs: Any,
    regularizer: GroupRegularizer | None = None,
    *,
    ratio: float = 0.5,
    sparsity: str = "learned",
    **options: Any,
) -> depprune.PruneReport:
    """Prune ``model`` in place by group norms; ``options`` are :func:`depprune.prune`'s.

    ``regularizer`` (the one it was trained with) sets the grouping of the
    norms; without one every parameter member counts (group L2 magnitude).
    ``sparsity="learned"`` ranks all groups together, ``"uniform"`` removes
    ``ratio`` from each (see the module docstring).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> prune(model, torch.zeros(1, 2), ratio=0.25, sparsity="uniform").plan.groups[0].kept
    6
    """
    if regularizer is not None and not isinstance(regularizer, GroupRegularizer):
        raise MethodError(
            f"regularizer must be the depprune.sparsity.GroupRegularizer the model was trained "
            f"with, or None for plain group L2 norms; got {type(regularizer).__name__}"
        )
    if sparsity not in SPARSITY:
        raise MethodError(
            f"sparsity is {sparsity!r}; choose 'learned' (one global ranking: the groups sparse "
            "training emptied lose the most) or 'uniform' (the same ratio in every group)"
        )
    allowed = set(inspect.signature(depprune.prune).parameters) - _OWN
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise MethodError(
            f"depgraph.prune got {', '.join(unknown)}; "
            + (
                "ratio, importance and global_ranking are set by ratio=, regularizer= and sparsity="
                if set(unknown) & _OWN
                else f"the options of depprune.prune are {', '.join(sorted(allowed))}"
            )
        )
    importance = regularizer.importance() if regularizer is not None else magnitude(2)
    return depprune.prune(
        model,
        example_inputs,
        ratio=ratio,
        importance=importance,
        global_ranking=sparsity == "learned",
        **options,
    )
