"""Importance: one score per unit of a group, computed on the params' device.

Every member (parameter, dim) of a group contributes through its unit map:
one ``scatter_add`` per member, never a Python loop over channels. Buffers
(BatchNorm running statistics, rotary frequencies) never count.

>>> import torch, depprune
>>> from depprune.importance import ScoreContext, magnitude
>>> eqs = depprune.AxisEquations()
>>> hidden = eqs.axis(3)
>>> eqs.param("w", 0, hidden)
>>> graph = eqs.solve()
>>> w = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [0.0, 3.0], [2.0, 0.0]]))
>>> ctx = ScoreContext(graph, {"w": w})
>>> magnitude(p=1)(graph.groups[0], ctx).tolist()
[2.0, 3.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from depprune.errors import ImportanceError
from depprune.graph import DependencyGraph, Group

__all__ = [
    "Importance",
    "ImportanceError",
    "ScoreContext",
    "batchnorm_scale",
    "magnitude",
    "random",
    "score_groups",
    "taylor",
]


@dataclass
class ScoreContext:
    """What an importance may read: the graph and the tensors by name."""

    graph: DependencyGraph
    tensors: Mapping[str, torch.Tensor]
    #: The module owning each tensor name (for criteria that need the type).
    owners: Mapping[str, nn.Module] = field(default_factory=dict)

    @classmethod
    def from_model(cls, graph: DependencyGraph, model: nn.Module) -> ScoreContext:
        tensors: dict[str, torch.Tensor] = {}
        owners: dict[str, nn.Module] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{module_name}." if module_name else ""
            for attr, value in [*module._parameters.items(), *module._buffers.items()]:
                if value is not None:
                    tensors[prefix + attr] = value
                    owners[prefix + attr] = module
        return cls(graph, tensors, owners)


Importance = Callable[[Group, ScoreContext], torch.Tensor]


def _scatter_members(
    group: Group,
    ctx: ScoreContext,
    per_index: Callable[[str, torch.Tensor, int], torch.Tensor | None],
) -> torch.Tensor:
    """Sum ``per_index(name, tensor, dim)`` over members into one score per unit."""
    scores: torch.Tensor | None = None
    seen: set[tuple[int, int]] = set()
    for (name, dim), unit_map in ctx.graph.unit_maps(group).items():
        tensor = ctx.tensors[name]
        # A tied tensor listed under two names counts once.
        if (id(tensor), dim) in seen:
            continue
        seen.add((id(tensor), dim))
        values = per_index(name, tensor, dim)
        if values is None:
            continue
        units = torch.from_numpy(unit_map).to(values.device)
        on_group = units >= 0
        if scores is None:
            scores = torch.zeros(group.size, dtype=torch.float32, device=values.device)
        scores.scatter_add_(0, units[on_group], values.float().to(scores.device)[on_group])
    if scores is None:
        raise ImportanceError(
            f"group {group.index} has no member this importance can score; "
            "use depprune.importance.magnitude() or pass a callable"
        )
    return scores


def _reduce_other_dims(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1).sum(dim=1)


def magnitude(p: float = 2) -> Importance:
    """L-p magnitude of every parameter slice a unit would remove (p=1: L1, p=2: L2).

    >>> magnitude(1).__name__
    'l1_magnitude'
    """

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
            if not isinstance(tensor, nn.Parameter):
                return None
            return _reduce_other_dims(tensor.detach().abs().float().pow(p), dim)

        total = _scatter_members(group, ctx, per_index)
        return total.pow(1.0 / p)

    score.__name__ = f"l{p:g}_magnitude"
    return score


def batchnorm_scale(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """|gamma| of the BatchNorm layers in the group (network slimming)."""

    def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        owner = ctx.owners.get(name)
        if isinstance(owner, nn.modules.batchnorm._NormBase) and name.endswith("weight"):
            return tensor.detach().abs().float()
        return None

    return _scatter_members(group, ctx, per_index)


def taylor(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """First-order Taylor: |sum of weight * grad| over each unit's slices.

    Run a backward pass first so that parameters hold ``.grad``.
    """

    def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        if not isinstance(tensor, nn.Parameter):
            return None
        if tensor.grad is None:
            raise ImportanceError(
                f"{name} has no gradient; call loss.backward() before scoring with taylor"
            )
        return _reduce_other_dims((tensor.detach() * tensor.grad).float(), dim)

    return _scatter_members(group, ctx, per_index).abs()


def random(seed: int = 0) -> Importance:
    """Seeded random scores: a baseline, the same for the same seed and graph."""

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + group.index)
        return torch.rand(group.size, generator=generator)

    score.__name__ = "random"
    return score


def score_groups(
    groups: list[Group], importance: Importance, ctx: ScoreContext
) -> dict[int, torch.Tensor]:
    """Scores of every group as float32 CPU tensors, checked for shape and NaN."""
    result = {}
    for group in groups:
        scores = importance(group, ctx)
        if not isinstance(scores, torch.Tensor) or scores.shape != (group.size,):
            raise ImportanceError(
                f"importance returned {getattr(scores, 'shape', type(scores))} for group "
                f"{group.index}; it must return a tensor of shape ({group.size},)"
            )
        if scores.is_meta:
            raise ImportanceError(
                "the weights are on the meta device, so they have no values to score; "
                "load real weights or use depprune.importance.random()"
            )
        scores = scores.detach().float().cpu()
        if torch.isnan(scores).any():
            raise ImportanceError(f"importance gave NaN for group {group.index}")
        result[group.index] = scores
    return result
