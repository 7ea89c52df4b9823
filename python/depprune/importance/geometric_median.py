"""Scoring by redundancy: a group's weights to each unit's distance from the others.

:func:`fpgm` (He et al. 2019, "Filter Pruning via Geometric Median for Deep
Convolutional Neural Networks Acceleration") scores a unit by the sum of its
distances to every other unit of its group: units near the geometric median
can be represented by the others, so they go first, whatever their norm.

>>> import torch, depprune
>>> from depprune.importance import ScoreContext, fpgm
>>> eqs = depprune.AxisEquations()
>>> eqs.param("w", 0, eqs.axis(3))
>>> graph = eqs.solve()
>>> w = torch.nn.Parameter(torch.tensor([[0.0], [1.0], [3.0]]))
>>> fpgm(p=1)(graph.groups[0], ScoreContext(graph, {"w": w})).tolist()  # 1 + 3, 1 + 2, 3 + 2
[4.0, 3.0, 5.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from depprune.errors import ImportanceError
from depprune.graph import Group
from depprune.importance.context import (
    _META_MESSAGE,
    Importance,
    ScoreContext,
    _member_tensor,
    _no_member_error,
)

__all__ = ["fpgm"]

#: Float32 elements of one gathered block of unit rows (16 MB).
_GATHER_ELEMENTS = 1 << 22
#: Float32 elements of the distances held at once, rows x units (64 MB): larger
#: groups are done a block of rows at a time, re-reading their weights.
_DISTANCE_ELEMENTS = 1 << 24


def fpgm(p: float = 2) -> Importance:
    """Sum of L-p distances from each unit to every other unit of its group.

    A unit's vector is the concatenation of its slices in every parameter
    member of the group (buffers never count; a tied tensor counts once):
    a conv filter, its bias and BatchNorm scale and shift, and the next
    layer's input slices, all its indices where a unit owns several (a head's
    rows, a channel's positions once flattened). The L-p distance of such
    vectors sums over members, so members are read one block at a time and
    nothing is concatenated. Scores are not comparable across groups; under
    ``global_ranking=True`` make_plan divides each group's by their mean.

    >>> import torch, depprune
    >>> from depprune.importance import fpgm
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> plan = depprune.make_plan(model, torch.randn(1, 3, 8, 8), ratio=0.25, importance=fpgm())
    >>> plan.groups[0].size, plan.groups[0].kept
    (8, 6)
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ImportanceError(
            f"fpgm needs a finite p > 0 for its L-p distance (1: L1, 2: Euclidean); got {p!r}"
        )

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        members = _members_by_unit(group, ctx)
        if not members:
            raise _no_member_error(group)
        return _distance_sums(members, group.size, float(p))

    score.__name__ = f"fpgm_l{p:g}"
    return score


@dataclass
class _UnitRows:
    """One member's tensor with the unit dim first, and where each index goes in a unit's row."""

    #: The tensor with the group's dim moved first (a view, never copied whole).
    moved: torch.Tensor
    #: Indices along that dim which belong to the group.
    indices: torch.Tensor
    #: The unit of each such index, and its place among that unit's indices.
    units: torch.Tensor
    positions: torch.Tensor
    #: The most indices one unit owns here (units owning fewer are padded with zeros).
    width: int


def _members_by_unit(group: Group, ctx: ScoreContext) -> list[_UnitRows]:
    """Every parameter member of ``group`` (tied ones once), ready to gather per unit."""
    members = []
    seen: set[tuple[int, int]] = set()
    for (name, dim), unit_map in ctx.graph.unit_maps(group).items():
        tensor = _member_tensor(ctx, name)
        if not isinstance(tensor, nn.Parameter) or (id(tensor), dim) in seen:
            continue
        seen.add((id(tensor), dim))
        if tensor.is_meta:
            raise ImportanceError(_META_MESSAGE)
        device = tensor.device
        units_along = torch.tensor(unit_map, device=device)
        indices = torch.nonzero(units_along >= 0).reshape(-1)
        if not indices.numel():
            continue
        units = units_along[indices]
        # Each index's place among its unit's: rank within the unit after a stable sort.
        order = torch.argsort(units, stable=True)
        owned = torch.bincount(units, minlength=group.size)
        starts = owned.cumsum(0) - owned
        positions = torch.empty_like(units)
        positions[order] = torch.arange(units.numel(), device=device) - starts[units[order]]
        moved = tensor.detach().movedim(dim, 0)
        if moved.dim() == 1:
            moved = moved.unsqueeze(1)
        members.append(_UnitRows(moved, indices, units, positions, int(owned.max())))
    return members


def _column_blocks(member: _UnitRows, size: int) -> list[slice]:
    """Slices of the member's second dim, each gathering at most ~_GATHER_ELEMENTS values."""
    columns = member.moved.shape[1]
    per_column = size * member.width * math.prod(member.moved.shape[2:])
    step = max(1, _GATHER_ELEMENTS // max(1, per_column))
    return [slice(start, min(columns, start + step)) for start in range(0, columns, step)]


def _gathered(member: _UnitRows, size: int, columns: slice) -> torch.Tensor:
    """The member's values in ``columns`` as one float32 row per unit, (size, -1)."""
    values = member.moved[member.indices, columns].float()
    rows = values.new_zeros((size, member.width, *values.shape[1:]))
    rows[member.units, member.positions] = values
    return rows.reshape(size, -1)


def _distance_sums(members: list[_UnitRows], size: int, p: float) -> torch.Tensor:
    """For each unit, the sum of L-p distances of its concatenated rows to every other unit's."""
    device = members[0].moved.device
    scores = torch.empty(size, dtype=torch.float32, device=device)
    block = max(1, min(size, _DISTANCE_ELEMENTS // size))
    for start in range(0, size, block):
        rows = slice(start, min(size, start + block))
        # Distances to the p-th power add up over the pieces of a concatenated vector.
        powered = torch.zeros(rows.stop - rows.start, size, dtype=torch.float32, device=device)
        for member in members:
            for columns in _column_blocks(member, size):
                vectors = _gathered(member, size, columns)
                powered += _powered_distances(vectors, rows, p).to(device)
        # A unit's distance to itself is 0; the matmul form would leave rounding there.
        local = torch.arange(rows.stop - rows.start, device=device)
        powered[local, local + rows.start] = 0.0
        scores[rows] = powered.clamp_min_(0.0).pow_(1.0 / p).sum(dim=1)
    return scores


def _powered_distances(vectors: torch.Tensor, rows: slice, p: float) -> torch.Tensor:
    """``||vectors[rows][i] - vectors[j]||_p ** p`` for every i in rows and every j."""
    if p == 2:
        # Distances do not move with the origin; centring keeps the matmul form accurate.
        vectors = vectors - vectors.mean(dim=0)
        squares = vectors.square().sum(dim=1)
        cross = vectors[rows] @ vectors.T
        return squares[rows, None] + squares[None, :] - 2.0 * cross
    return torch.cdist(vectors[rows], vectors, p=p).pow_(p)
