"""The one-call API: trace a model, score, select, apply, report.

>>> import torch, depprune
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> report = depprune.prune(model, torch.randn(2, 8), ratio=0.5)
>>> model[0].out_features, report.params_after < report.params_before
(8, True)
>>> print(report)  # doctest: +NORMALIZE_WHITESPACE
                      before           after    kept
parameters               212             108   50.9%
MACs                     384             192   50.0%
<BLANKLINE>
group  kind              units  first member
    0  neurons         16 -> 8  0.weight[0]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from depprune._gc import paused_gc
from depprune.errors import InternalError, SelectionError, TraceError
from depprune.graph import DependencyGraph
from depprune.importance import Importance, ScoreContext, magnitude, score_groups
from depprune.kinds import KINDS, group_kinds, params_per_unit
from depprune.plan import GroupChoice, Plan
from depprune.selection import Scope, check_ratios, select, uneven_roles
from depprune.tracer import model_inputs, record, running_stats_kept

__all__ = ["PruneReport", "make_plan", "prune", "trace"]


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored: Iterable[nn.Module] = (),
    strict: bool = False,
) -> DependencyGraph:
    """Record one forward pass of ``model`` and return its dependency graph.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of
    keyword inputs. The graph's ``unsupported_ops`` lists ATen ops without a
    rule (their axes were frozen); ``strict=True`` raises instead. Nothing
    in the model changes (BatchNorm running statistics included).

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    >>> graph = depprune.trace(model, torch.zeros(3, 4))
    >>> [(g.kind, g.size, g.params_per_unit) for g in graph.groups()]
    [('neurons', 8, 7)]
    """
    with paused_gc():
        result = record(model, example_inputs, ignored=tuple(ignored), strict=strict)
        graph = result.equations.solve()
        graph.unsupported_ops = result.unsupported_ops
        graph.notes = result.notes
        if isinstance(model, nn.Module):
            graph.annotate(group_kinds(graph, model), params_per_unit(graph, model))
    return graph


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass (matmuls and convolutions); works on meta."""
    args, kwargs = model_inputs(model, example_inputs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), running_stats_kept(model), paused_gc(), counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


@dataclass
class PruneReport:
    """What a prune did: sizes before and after, and the units each group kept."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    plan: Plan
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def ratio(after: int, before: int) -> str:
            return f"{after / before:.1%}" if before else "-"

        lines = [
            f"{'':<12}{'before':>16}{'after':>16}{'kept':>8}",
            f"{'parameters':<12}{self.params_before:>16,}{self.params_after:>16,}"
            f"{ratio(self.params_after, self.params_before):>8}",
            f"{'MACs':<12}{self.macs_before:>16,}{self.macs_after:>16,}"
            f"{ratio(self.macs_after, self.macs_before):>8}",
            "",
            f"{'group':>5}  {'kind':<9}{'units':>14}  first member",
        ]
        for g in self.plan.groups:
            if g.kept < g.size:
                lines.append(
                    f"{g.index:>5}  {g.kind:<9}{f'{g.size} -> {g.kept}':>14}  {g.first_member}"
                )
        untouched = sum(g.kept == g.size for g in self.plan.groups)
        if untouched:
            lines.append(
                f"{untouched} group(s) kept whole "
                "(other kinds, ignored, ratio 0, min_units or round_to)"
            )
        if self.unsupported_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in self.unsupported_ops.items())
            lines.append(f"frozen by ops without a rule: {ops}")
        return "\n".join(lines)


def make_plan(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    graph: DependencyGraph | None = None,
    ratio: float = 0.5,
    importance: Importance | None = None,
    ratios: Mapping[Scope, float] | None = None,
    ignored: Iterable[nn.Module] = (),
    round_to: int | None = None,
    min_units: int = 1,
    global_ranking: bool = False,
    kinds: Iterable[str] | None = None,
    uniform: bool | None = None,
    strict: bool = False,
    progress: bool | None = None,
) -> Plan:
    """Choose what to remove from ``model`` without changing it; ``plan.apply(model)`` cuts.

    Traces ``model`` on ``example_inputs`` (or uses ``graph`` from
    :func:`trace`), scores every group with ``importance`` (L2 magnitude by
    default), and removes ``ratio`` of each group's units (``ratios`` per
    module or tuple of modules, ``ignored`` modules untouched, ``round_to``
    keeps multiples of N units, ``global_ranking`` ranks a scope's groups
    together, ``kinds`` limits pruning to groups of those kinds, from
    :data:`depprune.kinds.KINDS`, e.g. ``("heads", "neurons")``). Scoring shows a
    progress bar on a terminal; ``progress=False`` silences it, ``True`` forces it.

    ``uniform=True`` makes groups with the same role in every layer (all KV
    head groups, all MLP neuron groups) keep the same number of units, as a
    Hugging Face config needs; by default (``None``) a model with such a
    config raises :class:`SelectionError` if the selection would not be
    uniform, before anything is changed; ``uniform=False`` allows it.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> plan = depprune.make_plan(model, torch.randn(2, 8), ratio=0.25)
    >>> plan.groups[0].size, plan.groups[0].kept, model[0].out_features
    (16, 12, 16)
    """
    ignored = tuple(ignored)
    # Check cheap arguments before the trace, so mistakes fail fast.
    check_ratios(model, ratio, ratios, ignored, round_to, min_units)
    wanted = _check_kinds(kinds)
    with paused_gc():
        if graph is None:
            if example_inputs is None:
                raise TraceError("make_plan needs example_inputs to trace the model, or a graph")
            graph = trace(model, example_inputs, ignored=ignored, strict=strict)
        ctx = ScoreContext.from_model(graph, model)
        kind_of = (
            {g.index: g.kind for g in graph.groups}
            if all(g.kind for g in graph.groups)
            else group_kinds(graph, model)
        )
        chosen = [g for g in graph.groups if kind_of[g.index] in wanted]
        scores = score_groups(chosen, importance or magnitude(2), ctx, progress=progress)
        removed = select(
            graph,
            scores,
            model,
            ratio=ratio,
            ratios=ratios,
            ignored=ignored,
            round_to=round_to,
            min_units=min_units,
            global_ranking=global_ranking,
            uniform=bool(uniform),
        )
        if uniform is None and hasattr(getattr(model, "config", None), "to_dict"):
            uneven = uneven_roles(graph, removed)
            if uneven:
                raise SelectionError(
                    f"layers would keep different sizes, which {type(model).__name__}'s config "
                    f"cannot describe, so from_pretrained could not reload the result: "
                    f"{'; '.join(uneven[:3])}{' ...' if len(uneven) > 3 else ''}. Pass "
                    "uniform=True for the same size in every layer (each layer still drops its "
                    "own weakest units), or uniform=False to prune unevenly anyway"
                )
        choices = [
            GroupChoice(
                index=g.index,
                kind=kind_of[g.index],
                size=g.size,
                kept=g.size - len(removed.get(g.index, ())),
                first_member=f"{g.members[0][0]}[{g.members[0][1]}]",
            )
            for g in graph.groups
        ]
        return Plan.from_kept(model, graph.kept_indices(removed), choices)


def _check_kinds(kinds: Iterable[str] | None) -> frozenset[str]:
    if kinds is None:
        return frozenset(KINDS)
    if isinstance(kinds, str):
        kinds = (kinds,)
    wanted = frozenset(kinds)
    unknown = sorted(wanted - set(KINDS))
    if not wanted:
        raise SelectionError(f"kinds is empty, so nothing would be pruned; choose from {KINDS}")
    if unknown:
        raise SelectionError(
            f"kinds {sorted(wanted)} holds unknown kinds {unknown}; choose from {', '.join(KINDS)}"
        )
    return wanted


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float = 0.5,
    importance: Importance | None = None,
    ratios: Mapping[Scope, float] | None = None,
    ignored: Iterable[nn.Module] = (),
    round_to: int | None = None,
    min_units: int = 1,
    global_ranking: bool = False,
    kinds: Iterable[str] | None = None,
    uniform: bool | None = None,
    strict: bool = False,
    count_macs: bool = True,
    low_memory: bool = False,
    progress: bool | None = None,
) -> PruneReport:
    """Prune ``model`` in place and return a report; on any error it is left as it was.

    :func:`make_plan` then ``plan.apply(model, low_memory=low_memory)``; the
    report has parameters and MACs (one forward pass each, skipped with
    ``count_macs=False``) before and after, and the units each group kept.
    It prints as a table.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 2, 1))
    >>> report = depprune.prune(model, torch.randn(1, 3, 8, 8), ratio=0.25)
    >>> report.plan.groups[0].kept, model[1].num_features
    (6, 6)
    """
    ignored = tuple(ignored)
    # Check cheap arguments before the trace, so mistakes fail fast.
    check_ratios(model, ratio, ratios, ignored, round_to, min_units)
    _check_kinds(kinds)
    graph = trace(model, example_inputs, ignored=ignored, strict=strict)
    plan = make_plan(
        model,
        graph=graph,
        ratio=ratio,
        importance=importance,
        ratios=ratios,
        ignored=ignored,
        round_to=round_to,
        min_units=min_units,
        global_ranking=global_ranking,
        kinds=kinds,
        uniform=uniform,
        progress=progress,
    )
    params_before = _count_params(model)
    macs_before = _count_macs(model, example_inputs) if count_macs else 0
    plan.apply(model, low_memory=low_memory)
    try:
        macs_after = _count_macs(model, example_inputs) if count_macs else 0
    except Exception as exc:
        raise InternalError(
            f"the model was pruned, but its forward pass now fails ({type(exc).__name__}: "
            f"{exc}); this is a depprune bug, please report it with the model's config"
        ) from exc
    return PruneReport(
        params_before=params_before,
        params_after=_count_params(model),
        macs_before=macs_before,
        macs_after=macs_after,
        plan=plan,
        unsupported_ops=dict(graph.unsupported_ops),
        notes=list(graph.notes),
    )
