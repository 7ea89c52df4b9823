"""Scoring context: the graph and the model's tensors by name, to per-unit scores.

:class:`ScoreContext` is what every criterion reads; :func:`score_groups`
calls a criterion on each group and checks what it gives (one finite float
per unit, on the CPU). The helpers here turn per-index values of each member
(parameter, dim) into per-unit sums with one ``scatter_add`` per member.

>>> import torch, depprune
>>> from depprune.importance.context import ScoreContext, score_groups
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
>>> graph = depprune.trace(model, torch.zeros(1, 2))
>>> ctx = ScoreContext.from_model(graph, model)
>>> sorted(ctx.tensors)
['0.bias', '0.weight', '1.bias', '1.weight']
>>> score_groups(graph.groups, lambda group, ctx: torch.ones(group.size), ctx)[0].tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from depprune._core import power_sums
from depprune.apply import masked_tensors, named_tensors
from depprune.distributed import dtensor
from depprune.distributed.accelerate import offloaded_values
from depprune.errors import ImportanceError
from depprune.graph import DependencyGraph, Group

__all__ = ["Importance", "ScoreContext", "Transform", "score_groups"]

#: Elements converted to float32 at a time while scoring: 1 MB, so a chunk's
#: conversion, transform and sums stay in cache (5x faster than 64 MB chunks).
_CHUNK_ELEMENTS = 1 << 18

#: A transform gets a float32 copy of rows ``rows`` of a tensor (its own, free to
#: change in place) and returns the values to sum.
Transform = Callable[[torch.Tensor, slice], torch.Tensor]


class Power:
    """``|x|^p`` as a :data:`Transform`. For p 1 and 2 on a float32 or bfloat16 CPU tensor
    the core sums it in one pass over the weight (no float32 copy).

    >>> Power(2)(torch.tensor([[-3.0, 1.0]]), slice(0, 1)).tolist()
    [[9.0, 1.0]]
    """

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, rows: torch.Tensor, _: slice) -> torch.Tensor:
        if self.p == 2:
            return rows.mul_(rows)
        return rows.abs_() if self.p == 1 else rows.abs_().pow_(self.p)


#: What every criterion says when the weights it would read are on the meta device.
_META_MESSAGE = (
    "the weights are on the meta device, so they have no values to score; "
    "load real weights or use depprune.importance.random()"
)


@dataclass
class ScoreContext:
    """What an importance may read: the graph and the tensors by name."""

    graph: DependencyGraph
    tensors: Mapping[str, torch.Tensor]
    #: The module owning each tensor name (for criteria that need the type).
    owners: Mapping[str, nn.Module] = field(default_factory=dict)

    #: Per-dim sums of transformed tensors, computed once per (criterion, tensor).
    _sums: dict[tuple[Hashable, int], list[torch.Tensor | None]] = field(default_factory=dict)
    _dims: dict[int, set[int]] | None = None

    def dim_sums(
        self, key: Hashable, tensor: torch.Tensor, dim: int, transform: Transform
    ) -> torch.Tensor:
        """``transform(tensor)`` summed over every dim but ``dim``, one value per index.

        The tensor is read once for all its dims, in float32 chunks of rows, so
        a weight that belongs to several groups costs one pass and no full
        float32 copy; ``key`` names the transform for the cache.
        """
        cached = self._sums.get((key, id(tensor)))
        if cached is None or cached[dim] is None:
            # Only the dims some group cuts (a conv's kernel dims never are): a pass each.
            dims = self._cut_dims().get(id(tensor), set()) | {dim}
            cached = self._sums[(key, id(tensor))] = _all_dim_sums(tensor.detach(), transform, dims)
        return cached[dim]

    def _cut_dims(self) -> dict[int, set[int]]:
        """The dims of each tensor (by id) that belong to some group of the graph."""
        if self._dims is None:
            self._dims = {}
            for group in self.graph.groups:
                for name, dim in group.members:
                    tensor = self.tensors.get(name)
                    if tensor is not None:
                        self._dims.setdefault(id(tensor), set()).add(dim)
        return self._dims

    @classmethod
    def from_model(cls, graph: DependencyGraph, model: nn.Module) -> ScoreContext:
        """Every parameter and buffer of ``model`` by name (tied ones under each name).

        accelerate's offloaded tensors are their real values, read when first scored.
        """
        named = named_tensors(model)
        tensors: Mapping[str, torch.Tensor] = {
            name: getattr(module, attr) for name, (module, attr, _) in named.items()
        }
        offloaded = offloaded_values(model)
        if offloaded:
            # The first map takes writes (a torch.nn.utils.prune product below).
            tensors = ChainMap({}, offloaded, tensors)  # type: ignore[arg-type]
        owners = {name: module for name, (module, _, _) in named.items()}
        for module_name, _, tensor_name in masked_tensors(model):
            # torch.nn.utils.prune: the forward uses weight_orig * weight_mask, so score that.
            name = f"{module_name}.{tensor_name}_orig" if module_name else f"{tensor_name}_orig"
            original = tensors[name]
            effective = nn.Parameter(
                original.detach() * tensors[name[: -len("_orig")] + "_mask"],
                requires_grad=original.requires_grad,
            )
            effective.grad = original.grad  # already masked by the product's backward
            tensors[name] = effective  # type: ignore[index]
        return cls(graph, tensors, owners)


Importance = Callable[[Group, ScoreContext], torch.Tensor]


def _member_tensor(ctx: ScoreContext, name: str) -> torch.Tensor:
    """The tensor the graph names, or an ImportanceError saying the graph is another model's."""
    tensor = ctx.tensors.get(name)
    if tensor is None:
        raise ImportanceError(
            f"the graph names {name!r}, which the model does not have; score a model "
            "with the graph traced from it"
        )
    return tensor


def _no_member_error(group: Group) -> ImportanceError:
    return ImportanceError(
        f"group {group.index} has no member this importance can score; "
        "use depprune.importance.magnitude() or pass a callable"
    )


def _scatter_members(
    group: Group,
    ctx: ScoreContext,
    per_index: Callable[[str, torch.Tensor, int], torch.Tensor | None],
) -> torch.Tensor:
    """Sum ``per_index(name, tensor, dim)`` over members into one score per unit."""
    scores: torch.Tensor | None = None
    seen: set[tuple[int, int]] = set()
    for (name, dim), unit_map in ctx.graph.unit_maps(group).items():
        tensor = _member_tensor(ctx, name)
        # A tied tensor listed under two names counts once.
        if (id(tensor), dim) in seen:
            continue
        seen.add((id(tensor), dim))
        values = per_index(name, tensor, dim)
        if values is None:
            continue
        if values.is_meta:
            # Scattering would need the values' nonzero pattern, which meta tensors lack.
            raise ImportanceError(_META_MESSAGE)
        if scores is None:
            scores = torch.zeros(group.size, dtype=torch.float32, device=values.device)
        # One device for all members, also when the model is split across GPUs.
        values = values.float().to(scores.device)
        # A copy: the graph caches unit maps read-only, which from_numpy would warn about.
        units = torch.tensor(unit_map, device=scores.device)
        on_group = units >= 0
        scores.scatter_add_(0, units[on_group], values[on_group])
    if scores is None:
        raise _no_member_error(group)
    return scores


def _all_dim_sums(
    tensor: torch.Tensor, transform: Transform, dims: Collection[int] | None = None
) -> list[torch.Tensor | None]:
    """For every dim d in ``dims`` (all by default): ``transform(tensor)`` summed over all
    dims but d; None for the others."""
    if dtensor.is_dtensor(tensor):
        return dtensor.dim_sums(tensor, transform, _all_dim_sums)  # shard sums, all_reduced
    if tensor.dim() == 0:
        return []
    wanted = range(tensor.dim()) if dims is None else sorted(dims)
    native = _native_sums(tensor, transform, wanted)
    if native is not None:
        return native
    rows = tensor.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, tensor[0].numel()))
    sums: list[torch.Tensor | None] = [None] * tensor.dim()
    for dim in wanted:
        sums[dim] = torch.zeros(tensor.shape[dim], dtype=torch.float32, device=tensor.device)
    for start in range(0, rows, step):
        part = slice(start, min(rows, start + step))
        values = transform(tensor[part].to(torch.float32, copy=True), part)
        for dim in wanted:
            if dim == 0:
                sums[0][part] = values.reshape(values.shape[0], -1).sum(dim=1)
            else:
                others = [d for d in range(tensor.dim()) if d != dim]
                sums[dim] += values.sum(dim=others)
    return sums


def _native_sums(
    tensor: torch.Tensor, transform: Transform, wanted: Iterable[int]
) -> list[torch.Tensor | None] | None:
    """The per-dim sums from the core's one-pass kernel, or None where it does not apply
    (another transform, dtype or device, one dim, no elements)."""
    power = transform.p if isinstance(transform, Power) else None
    if (
        power not in (1, 2)
        or tensor.dim() < 2
        or tensor.numel() == 0
        or tensor.device.type != "cpu"
        or tensor.dtype not in (torch.float32, torch.bfloat16)
        or type(tensor) not in (torch.Tensor, nn.Parameter)
    ):
        return None
    flat = tensor.detach().contiguous().reshape(-1)
    values = (
        flat.view(torch.int16).numpy().view(np.uint16)
        if flat.dtype == torch.bfloat16
        else flat.numpy()
    )
    rows = tensor.shape[0]
    row_sums, column_sums = power_sums(
        values, rows, flat.numel() // rows, int(power), torch.get_num_threads()
    )
    sums: list[torch.Tensor | None] = [None] * tensor.dim()
    columns = torch.from_numpy(column_sums).reshape(tensor.shape[1:])
    for dim in wanted:
        if dim == 0:
            sums[0] = torch.from_numpy(row_sums).to(torch.float32)
            continue
        others = [d - 1 for d in range(1, tensor.dim()) if d != dim]
        sums[dim] = (columns.sum(dim=others) if others else columns).to(torch.float32)
    return sums


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None shows bars only on a terminal."""
    return None if progress is None else not progress


def score_groups(
    groups: list[Group],
    importance: Importance,
    ctx: ScoreContext,
    *,
    progress: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Scores of every group as float32 CPU tensors, checked for shape and NaN.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, magnitude, score_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> ctx = ScoreContext.from_model(graph, model)
    >>> {k: v.shape for k, v in score_groups(graph.groups, magnitude(), ctx).items()}
    {0: torch.Size([3])}
    """
    if not callable(importance):
        raise ImportanceError(
            f"importance must be a callable (group, ctx) -> tensor, such as "
            f"depprune.importance.magnitude(); got {type(importance).__name__} {importance!r}"
        )
    result = {}
    for group in tqdm(groups, desc="scoring groups", disable=_quiet(progress), leave=False):
        try:
            scores = importance(group, ctx)
        except ImportanceError:
            raise
        except Exception as exc:
            name = getattr(importance, "__name__", type(importance).__name__)
            raise ImportanceError(
                f"importance {name} failed on group {group.index} ({type(exc).__name__}: "
                f"{exc}); it is called as importance(group, ctx) and must return one score "
                "per unit"
            ) from exc
        if not isinstance(scores, torch.Tensor) or scores.shape != (group.size,):
            raise ImportanceError(
                f"importance returned {getattr(scores, 'shape', type(scores))} for group "
                f"{group.index}; it must return a tensor of shape ({group.size},)"
            )
        if scores.is_meta:
            raise ImportanceError(_META_MESSAGE)
        scores = scores.detach().float().cpu()
        if torch.isnan(scores).any():
            raise ImportanceError(f"importance gave NaN for group {group.index}")
        result[group.index] = scores
    return result
