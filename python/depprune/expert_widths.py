"""Per-expert widths: takes a width plan's neuron counts, gives each routed expert its own neurons.

transformers 5 stores a MoE layer's experts fused (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``), and the trace couples the neuron axis ``I`` of all
of them: a width plan keeps the same neuron slots in every expert. Expert
``e`` reads only slice ``e`` of those tensors (that is what makes them fused
experts, :func:`depprune.experts.find_expert_layers`, and what removing an
expert relies on too), so each expert may keep other neurons, as long as
every expert keeps as many: the tensors keep the shape ``[E, 2k, H]``, the
config's one expert width still describes them, ``from_pretrained`` reloads
the checkpoint exactly and the replay that proved the uniform plan proves
these shapes.

Counts that differ by expert are not made: a fused tensor would store the
largest count for every expert (zero padding saves nothing over the largest
expert), and no transformers config describes a ragged experts module.
Experts held one module per expert (an ``nn.ModuleList``) are separate
groups already, each with its own width.

A group qualifies when every member is a fused expert tensor of one MoE
layer, cut along a dim other than the expert dim, with every index on a unit
of the group and no other group cutting the same dims (the per-expert choice
is then the whole cut of those dims). Scores are ``[experts, units]``: the
L-p magnitude of each unit's slices within each expert
(:func:`expert_unit_magnitude`), or any function of the same signature.

>>> import numpy as np, torch, transformers, depprune
>>> config = transformers.MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
>>> model = transformers.MixtralForCausalLM(config)
>>> plan = depprune.make_plan(model, torch.tensor([[1, 2, 3]]), ratio=0.5, kinds=("neurons",),
...                           per_expert=True, progress=False)
>>> rows = plan.per_expert[("model.layers.0.mlp.experts.down_proj", 2)]
>>> rows.shape, len({tuple(row) for row in rows}) > 1  # 4 experts, each its own 4 neurons
((4, 4), True)
>>> plan.apply(model)
>>> model.config.intermediate_size, tuple(model.model.layers[0].mlp.experts.down_proj.shape)
(4, (4, 8, 4))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from depprune.errors import ImportanceError, PlanMismatchError
from depprune.experts import ExpertLayer, find_expert_layers
from depprune.importance.context import ScoreContext, _member_tensor

__all__ = [
    "ExpertWidthGroup",
    "check_per_expert",
    "expert_unit_magnitude",
    "expert_width_groups",
    "per_expert_kept",
]

ParamDim = tuple[str, int]
#: Elements scored at once (float32): a few experts of a big fused tensor, not all of it.
_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class ExpertWidthGroup:
    """A group of the graph whose units each expert of one MoE layer may choose alone."""

    #: The group's index in the graph.
    group: int
    #: Module path of the MoE block.
    layer: str
    num_experts: int
    #: Units of the group (neurons of every expert).
    size: int
    #: Every member (fused expert tensor, dim) with the unit of each index along its dim.
    unit_maps: Mapping[ParamDim, np.ndarray] = field(repr=False, compare=False)


#: Scores of one group: ``[experts, units]``, higher kept first.
ExpertScores = Callable[[ExpertWidthGroup, ScoreContext], torch.Tensor]


def expert_width_groups(
    graph, model: nn.Module, layers: Sequence[ExpertLayer] | None = None
) -> list[ExpertWidthGroup]:
    """The groups of ``graph`` whose units each expert may keep its own of (module docs).

    ``layers`` defaults to :func:`depprune.experts.find_expert_layers` of ``model``.

    >>> import torch, transformers, depprune
    >>> config = transformers.Qwen3MoeConfig(vocab_size=16, hidden_size=8,
    ...     moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...     num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2)
    >>> model = transformers.Qwen3MoeForCausalLM(config)
    >>> graph = depprune.trace(model, torch.tensor([[1, 2]]))
    >>> [(g.layer, g.num_experts, g.size) for g in expert_width_groups(graph, model)]
    [('model.layers.0.mlp', 4, 8)]
    """
    layers = find_expert_layers(model) if layers is None else layers
    fused: dict[str, ExpertLayer] = {}
    for layer in layers:
        for name, dim in layer.tensors:
            if dim == 0 and any(name.startswith(path + ".") for path in layer.experts):
                fused[name] = layer
    if not fused:
        return []
    cutters: dict[ParamDim, int] = {}
    for group in graph.groups:
        for member in group.members:
            cutters[member] = cutters.get(member, 0) + 1
    found = []
    for group in graph.groups:
        owners = {fused.get(name) for name, _ in group.members}
        if len(owners) != 1 or None in owners:
            continue
        if any(dim == 0 or cutters[(name, dim)] > 1 for name, dim in group.members):
            continue
        unit_maps = graph.unit_maps(group)
        if any(np.any(units < 0) for units in unit_maps.values()):
            continue  # indices outside the group: another structure shares the dim
        (layer,) = owners
        found.append(
            ExpertWidthGroup(group.index, layer.name, layer.num_experts, group.size, unit_maps)
        )
    return found


def expert_unit_magnitude(p: float = 2) -> ExpertScores:
    """L-p magnitude of each unit's slices in each expert: ``[experts, units]``.

    Each fused tensor is read once, a few experts at a time in float32.

    >>> expert_unit_magnitude(1).__name__
    'l1_expert_magnitude'
    """
    if not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ImportanceError(f"expert_unit_magnitude needs a finite p > 0; got {p!r}")

    def score(group: ExpertWidthGroup, ctx: ScoreContext) -> torch.Tensor:
        total: torch.Tensor | None = None
        seen: set[tuple[int, int]] = set()
        for (name, dim), unit_map in group.unit_maps.items():
            tensor = _member_tensor(ctx, name)
            if (id(tensor), dim) in seen:
                continue  # tied under two names: once
            seen.add((id(tensor), dim))
            if tensor.is_meta:
                raise ImportanceError(
                    f"{name!r} is on the meta device: per-expert scores read the weights; "
                    "load them, or score with depprune.io.scoring from the checkpoint"
                )
            sums = _slice_sums(tensor.detach(), dim, p)
            if total is None:
                total = torch.zeros(group.num_experts, group.size, device=sums.device)
            units = torch.tensor(unit_map, device=total.device)
            total.index_add_(1, units, sums.to(total.device))
        if total is None:
            raise ImportanceError(f"group {group.group} has no tensor to score per expert")
        return total.pow(1.0 / p)

    score.__name__ = f"l{p:g}_expert_magnitude"
    return score


def _slice_sums(tensor: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """``|tensor|^p`` summed over every dim but 0 and ``dim``: ``[slices, tensor.shape[dim]]``."""
    others = [d for d in range(1, tensor.dim()) if d != dim]
    per_slice = max(1, math.prod(tensor.shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // per_slice)
    parts = []
    for start in range(0, tensor.shape[0], step):
        values = tensor[start : start + step].float().abs()
        values = values.square() if p == 2 else values if p == 1 else values.pow(p)
        parts.append(values.sum(dim=others) if others else values)
    return torch.cat(parts)


def per_expert_kept(
    groups: Sequence[ExpertWidthGroup],
    kept_units: Mapping[int, int],
    ctx: ScoreContext,
    scores: ExpertScores | None = None,
) -> dict[ParamDim, np.ndarray]:
    """Each expert's own kept indices: ``[experts, kept]`` per member of every group cut.

    ``kept_units`` gives the units each group keeps (every expert keeps as
    many); each expert keeps its highest-scoring ones (ties: the lower unit).
    A group that keeps all its units is left out.
    """
    scores = scores or expert_unit_magnitude(2)
    chosen: dict[ParamDim, np.ndarray] = {}
    for group in groups:
        keep = int(kept_units.get(group.group, group.size))
        if keep >= group.size:
            continue
        values = scores(group, ctx)
        if tuple(values.shape) != (group.num_experts, group.size):
            raise ImportanceError(
                f"per-expert scores of group {group.group} must have shape "
                f"({group.num_experts}, {group.size}) (experts, units); got {tuple(values.shape)}"
            )
        values = values.detach().float().cpu().numpy()
        if not np.all(np.isfinite(values)):
            raise ImportanceError(f"per-expert scores of group {group.group} are not all finite")
        # Highest first; a stable sort keeps the lower unit on ties.
        best = np.argsort(-values, axis=1, kind="stable")[:, :keep]
        mask = np.zeros((group.num_experts, group.size), dtype=bool)
        np.put_along_axis(mask, best, True, axis=1)
        for member, unit_map in group.unit_maps.items():
            chosen[member] = _member_rows(mask, unit_map)
    return chosen


def _member_rows(mask: np.ndarray, unit_map: np.ndarray) -> np.ndarray:
    """The indices of a member each expert keeps: ``[experts, kept]``, sorted in each row."""
    kept = mask[:, unit_map]
    # Every expert keeps as many units, and each unit spans as many indices: equal rows.
    return np.nonzero(kept)[1].reshape(mask.shape[0], -1).astype(np.int64)


def check_per_expert(
    graph,
    model: nn.Module,
    per_expert: Mapping[ParamDim, np.ndarray],
    kept: Mapping[ParamDim, np.ndarray],
) -> None:
    """Raise :class:`PlanMismatchError` unless ``per_expert`` keeps whole units alike everywhere.

    Every (tensor, dim) must belong to a group of :func:`expert_width_groups`,
    every member of that group must be listed, each expert must keep the same
    units in all of them, and as many as ``kept`` (the plan's uniform choice,
    which sized and proved the shapes) keeps.
    """
    if not per_expert:
        return
    groups = {m: g for g in expert_width_groups(graph, model) for m in g.unit_maps}
    for member in per_expert:
        if member not in groups:
            raise PlanMismatchError(
                f"the plan keeps other indices of {member[0]!r} dim {member[1]} in each expert, "
                "but that dim is not a fused expert width depprune can prove (see "
                "depprune.expert_widths); make the plan again"
            )
    for group in {id(g): g for g in (groups[m] for m in per_expert)}.values():
        mask: np.ndarray | None = None
        for member, unit_map in group.unit_maps.items():
            rows = per_expert.get(member)
            planned = kept.get(member)
            if rows is None or planned is None:
                raise PlanMismatchError(
                    f"the plan gives each expert its own indices of some members of group "
                    f"{group.group} but not of {member[0]!r} dim {member[1]}; they must be cut "
                    "alike"
                )
            if rows.ndim != 2 or rows.shape != (group.num_experts, planned.size):
                raise PlanMismatchError(
                    f"the per-expert indices of {member[0]!r} dim {member[1]} must be "
                    f"({group.num_experts}, {planned.size}); got {rows.shape}"
                )
            if mask is None:
                mask = np.zeros((group.num_experts, group.size), dtype=bool)
                np.put_along_axis(mask, unit_map[rows], True, axis=1)
            expected = mask[:, unit_map]
            if expected.sum(axis=1).tolist() != [planned.size] * group.num_experts or not (
                np.array_equal(np.nonzero(expected)[1].reshape(rows.shape), rows)
            ):
                raise PlanMismatchError(
                    f"the per-expert indices of {member[0]!r} dim {member[1]} do not keep whole "
                    f"units of group {group.group}, the same in every member (edited, or made "
                    "for another model); the model is unchanged"
                )
