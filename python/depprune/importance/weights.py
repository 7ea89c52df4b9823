"""Scoring from the weights alone: a group and its tensors to one score per unit.

L-p magnitude of every slice a unit would remove, the BatchNorm scale
(Network Slimming), and seeded random scores as a baseline.

>>> import torch, depprune
>>> from depprune.importance import ScoreContext, magnitude
>>> model = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False), torch.nn.Linear(2, 1, bias=False))
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.tensor([[3.0], [1.0]]))
...     _ = model[1].weight.copy_(torch.tensor([[4.0, 1.0]]))
>>> graph = depprune.trace(model, torch.zeros(1, 1))
>>> magnitude(2)(graph.groups[0], ScoreContext.from_model(graph, model)).tolist()
[5.0, 1.4142135381698608]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from depprune.errors import ImportanceError
from depprune.graph import Group
from depprune.importance.context import Importance, Power, ScoreContext, _scatter_members

__all__ = ["batchnorm_scale", "magnitude", "random"]


def magnitude(p: float = 2) -> Importance:
    """L-p magnitude of every parameter slice a unit would remove (p=1: L1, p=2: L2).

    >>> magnitude(1).__name__
    'l1_magnitude'
    """

    if not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ImportanceError(f"magnitude needs a finite p > 0 (1: L1, 2: L2); got {p!r}")

    power = Power(p)

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
            if not isinstance(tensor, nn.Parameter):
                return None
            return ctx.dim_sums(("magnitude", p), tensor, dim, power)

        total = _scatter_members(group, ctx, per_index)
        return total.pow(1.0 / p)

    score.__name__ = f"l{p:g}_magnitude"
    return score


def batchnorm_scale(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """|gamma| of the BatchNorm layers in the group (network slimming).

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, batchnorm_scale
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3),
    ...                             torch.nn.Conv2d(3, 1, 1))
    >>> _ = model[1].weight.data.copy_(torch.tensor([0.5, -2.0, 1.0]))
    >>> graph = depprune.trace(model, torch.zeros(1, 1, 4, 4))
    >>> batchnorm_scale(graph.groups[0], ScoreContext.from_model(graph, model)).tolist()
    [0.5, 2.0, 1.0]
    """

    def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        owner = ctx.owners.get(name)
        if isinstance(owner, nn.modules.batchnorm._NormBase) and name.endswith("weight"):
            return tensor.detach().abs().float()
        return None

    return _scatter_members(group, ctx, per_index)


def random(seed: int = 0) -> Importance:
    """Seeded random scores: a baseline, the same for the same seed and graph.

    Needs no weights, so it also plans models on the meta device.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, random
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> ctx = ScoreContext.from_model(graph, model)
    >>> torch.equal(random(5)(graph.groups[0], ctx), random(5)(graph.groups[0], ctx))
    True
    """

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + group.index)
        return torch.rand(group.size, generator=generator)

    score.__name__ = "random"
    return score
