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

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from depprune._gc import paused_gc
from depprune.apply.optimizer_state import checked_optimizers
from depprune.distributed.tensor_parallel import TensorParallel
from depprune.errors import PlanMismatchError, SelectionError, TraceError
from depprune.expert_widths import expert_width_groups, per_expert_kept
from depprune.graph import DependencyGraph
from depprune.importance import Importance, ScoreContext, magnitude, score_groups
from depprune.kinds import KINDS, _is_hidden_norm, group_kinds, params_per_unit
from depprune.plan import GroupChoice, Plan
from depprune.selection import Scope, _check_ratio, check_ratios, layer_role, select
from depprune.shadow import input_spec, meta_shadow
from depprune.structural_selection import STRUCTURAL_KINDS, structural_cuts
from depprune.structure import prove_structure
from depprune.tracer import model_inputs, record, running_stats_kept
from depprune.verify import changed_widths, prove

__all__ = ["PruneReport", "apply_with_report", "make_plan", "prune", "trace"]


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
        result = record(model, example_inputs, ignored=_ignored_modules(ignored), strict=strict)
        _refuse_sharded(model, result.device)
        graph = result.equations.solve()
        graph.unsupported_ops = result.unsupported_ops
        graph.notes = result.notes
        # What a plan's replay needs: the recorded ops and the inputs they came from.
        graph.recording = result
        graph.example_inputs = example_inputs
        if isinstance(model, nn.Module):
            graph.annotate(group_kinds(graph, model), params_per_unit(graph, model))
    return graph


def _refuse_sharded(model: Any, traced_on: str) -> None:
    """A sharded model (FSDP2, tensor parallel) is traced on its meta shadow, where every
    DTensor has its global shape; traced as it is, its forward shows gathered shards."""
    from depprune.distributed.dtensor import is_dtensor

    sharded = isinstance(model, nn.Module) and any(is_dtensor(p) for p in model.parameters())
    if sharded and traced_on != "meta":
        raise TraceError(
            f"{type(model).__name__}'s parameters are DTensors (FSDP2 or tensor parallel) and "
            "its forward does not run on a meta shadow, so the trace would see gathered "
            "shards, not the named parameters; make the plan on the unsharded model (or the "
            "same architecture on the meta device), hand it to every rank with "
            "depprune.distributed.broadcast_plan and apply it there"
        )


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_macs(model: nn.Module, example_inputs: Any) -> int | None:
    """Multiply-accumulates of one forward pass (matmuls and convolutions); works on meta.

    None (the report prints "-") when torch's FlopCounterMode cannot count the
    model: it fails an assertion under ``no_grad`` on some models, so grad mode
    is tried second, and a counter failure never escapes as the user's error.
    """
    try:
        args, kwargs = model_inputs(model, example_inputs)
    except Exception:
        return None
    for grad in (False, True):
        counter = FlopCounterMode(display=False)
        try:
            with (
                torch.set_grad_enabled(grad),
                running_stats_kept(model),
                paused_gc(),
                counter,
            ):
                model(*args, **kwargs)
        except Exception:
            continue
        return counter.get_total_flops() // 2
    return None


def size_table(
    params_before: int, params_after: int, macs_before: int | None, macs_after: int | None
) -> list[str]:
    """The before/after/kept rows every report prints ("-" where MACs were not counted).

    >>> for row in size_table(200, 100, None, None):  # doctest: +NORMALIZE_WHITESPACE
    ...     print(row)
                          before           after    kept
    parameters               200             100   50.0%
    MACs                       -               -       -
    """

    def ratio(after: int | None, before: int | None) -> str:
        return f"{after / before:.1%}" if before and after is not None else "-"

    def count(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    return [
        f"{'':<12}{'before':>16}{'after':>16}{'kept':>8}",
        f"{'parameters':<12}{params_before:>16,}{params_after:>16,}"
        f"{ratio(params_after, params_before):>8}",
        f"{'MACs':<12}{count(macs_before):>16}{count(macs_after):>16}"
        f"{ratio(macs_after, macs_before):>8}",
    ]


@dataclass
class PruneReport:
    """What a prune did: sizes before and after, and the units each group kept."""

    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    plan: Plan
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The graph that was traced (groups, unit maps), for inspection and oracles.
    graph: DependencyGraph | None = None
    #: Groups the replay kept whole, each with the reason (see :mod:`depprune.verify`).
    kept_whole: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            *size_table(self.params_before, self.params_after, self.macs_before, self.macs_after),
            "",
            f"{'group':>5}  {'kind':<9}{'units':>14}  first member",
        ]
        for g in self.plan.groups:
            if g.kept < g.size:
                lines.append(
                    f"{g.index:>5}  {g.kind:<9}{f'{g.size} -> {g.kept}':>14}  {g.first_member}"
                )
        untouched = sum(g.kept == g.size for g in self.plan.groups) - len(self.kept_whole)
        if untouched:
            lines.append(
                f"{untouched} group(s) kept whole "
                "(other kinds, factors of a width another group prunes, ignored, ratio 0, "
                "min_units or round_to)"
            )
        for reason in self.kept_whole:
            lines.append(reason)
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
    verify: bool = True,
    keep_units: Mapping[int, int] | None = None,
    exact_keep_units: bool = False,
    layer_importance: Any = None,
    expert_importance: Any = None,
    target: Mapping[str, float | str] | None = None,
    target_options: Mapping[str, Any] | None = None,
    tensor_parallel: Any = None,
    per_expert: bool | Callable[..., Any] = False,
) -> Plan:
    """Choose what to remove from ``model`` without changing it; ``plan.apply(model)`` cuts.

    Traces ``model`` on ``example_inputs`` (or uses ``graph`` from
    :func:`trace`), scores every group with ``importance`` (L2 magnitude by
    default), and removes ``ratio`` of each group's units (``ratios`` per
    module or tuple of modules, ``ignored`` modules untouched, ``round_to``
    keeps multiples of N units, ``global_ranking`` ranks a scope's groups
    together (dividing each group's scores by their mean, unless the importance
    has ``globally_comparable = True``), ``kinds`` limits pruning to groups of those kinds, from
    :data:`depprune.kinds.KINDS`, e.g. ``("heads", "neurons")``). Scoring shows a
    progress bar on a terminal; ``progress=False`` silences it, ``True`` forces it.
    ``keep_units`` maps group indices of the graph to the units they keep,
    instead of a ratio (an iterative schedule aiming at the original widths);
    an inner factor (query heads per KV head, a conv group's channels) then
    stays whole where its outer factor is cut, as under a ratio, unless
    ``exact_keep_units=True`` (a budget's choice: every count stands).

    ``kinds`` may also name ``"layers"`` (whole repeated blocks: decoder layers,
    residual blocks; :mod:`depprune.depth`) and ``"experts"`` (whole routed
    experts of MoE layers; :mod:`depprune.experts`), alone or with widths in one
    plan; ``ratios={"layers": 0.25}`` gives a kind its own ratio (else
    ``ratio``). Layers are ranked by ``layer_importance`` (by default block
    influence on ``example_inputs``; :func:`depprune.depth.block_influence` on
    calibration batches, or :func:`depprune.depth.given_layers`), experts by
    ``expert_importance`` (by default routing frequency on ``example_inputs``).
    Such a plan changes the function, so it is proved by the pruned shadow's
    forward and a rebuild of the new config, not the replay.

    ``target={"params": 6e9}`` (also ``"active_params"``, ``"macs"``,
    ``"memory_gb"``; absolute, or ``"50%"`` of the original) replaces the
    ratios: :func:`depprune.budget.search` finds the uniform widths (and
    layer / expert counts, when ``kinds`` names them) that meet it, ranked by
    ``importance``, and the plan keeps those; ``target_options`` passes the
    search's other settings (``tp_size``, ``batch``, ``seq_len``, ``dtype``,
    ``top``, ``score_fn``, ``calibration``, ``rank``, ``kv_cache``), and
    ``plan.budget`` holds the search's result (``print(plan.budget)``: the
    best candidates as a table).

    ``per_expert=True`` lets each routed expert of a fused MoE tensor keep its
    own neurons (each as many as the plan keeps; by their L2 magnitude within
    the expert, or a function of an :class:`~depprune.expert_widths.ExpertWidthGroup`
    and the score context giving ``[experts, units]`` scores) instead of the
    same slots in every expert: ``plan.per_expert`` (:mod:`depprune.expert_widths`).
    Not with ``tensor_parallel``.

    ``tensor_parallel=N`` (or a
    :class:`~depprune.distributed.tensor_parallel.TensorParallel` with its own
    tp_plan) makes every one of N tensor-parallel ranks keep the same number
    of heads, KV heads and neurons from its own chunk of each split tensor
    (read from the model's transformers ``tp_plan``), so that each rank can
    cut its shard alone and the pruned model runs on N ranks; the splits are
    recorded in the plan (:func:`~depprune.distributed.apply_to_tp_shards`).

    ``uniform=True`` makes groups with the same role in every layer (all KV
    head groups, all MLP neuron groups) keep the same number of units, as a
    Hugging Face config needs; by default (``None``) a model with such a
    config raises :class:`SelectionError` if the selection would not be
    uniform, before anything is changed; ``uniform=False`` allows it.

    The plan is proved before it is returned (:mod:`depprune.verify`): it is
    applied, with every attribute and config change, to a meta shadow of the
    model whose forward is replayed against the trace. Groups whose removal
    the replay refutes (a literal size in a ``view``, a branch on a shape, a
    tensor created in ``forward``) are kept whole and listed with the reason
    in ``plan.kept_whole``; ``strict=True`` raises :class:`PlanMismatchError`
    instead. ``verify=False`` skips the proof (and ``plan.apply`` then proves
    it).

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> plan = depprune.make_plan(model, torch.randn(2, 8), ratio=0.25)
    >>> plan.groups[0].size, plan.groups[0].kept, model[0].out_features
    (16, 12, 16)
    """
    ignored = _ignored_modules(ignored)
    if target is not None:
        return _plan_for_target(
            model,
            example_inputs,
            target,
            dict(target_options or {}),
            graph=graph,
            importance=importance,
            ignored=ignored,
            round_to=round_to,
            kinds=kinds,
            uniform=uniform,
            strict=strict,
            progress=progress,
            verify=verify,
            keep_units=keep_units,
            ratios=ratios,
            layer_importance=layer_importance,
            expert_importance=expert_importance,
            tensor_parallel=tensor_parallel,
            per_expert=per_expert,
        )
    if per_expert and tensor_parallel is not None:
        raise SelectionError(
            "per_expert and tensor_parallel do not combine: a rank's shard cannot keep other "
            "neurons in each expert; choose one"
        )
    if not (isinstance(per_expert, bool) or callable(per_expert)):
        raise SelectionError(
            f"per_expert must be True, False or a function of (group, context) giving "
            f"[experts, units] scores; got {type(per_expert).__name__}"
        )
    parallel = TensorParallel.of(tensor_parallel) if tensor_parallel is not None else None
    wanted = _check_kinds(kinds)
    ratios, structural = _kind_ratios(ratios, ratio, wanted)
    # Check cheap arguments before the trace, so mistakes fail fast.
    check_ratios(model, ratio, ratios, ignored, round_to, min_units)
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
        cuts = structural_cuts(
            model,
            graph.example_inputs if example_inputs is None else example_inputs,
            structural,
            layer_importance=layer_importance,
            expert_importance=expert_importance,
            progress=progress,
        )
        # Groups inside layers that go are still chosen like their mates: one config
        # width for every layer; their cuts vanish with the layers.
        chosen = [g for g in graph.groups if kind_of[g.index] in wanted]
        spanned = _heads_under_a_norm(graph, model, chosen, kind_of)
        chosen = [g for g in chosen if g.index not in spanned]
        inner = _outermost_factors(graph, chosen)
        multiples = _kernel_multiples(graph, model)
        balanced = parallel.balanced_groups(graph, chosen, model) if parallel else {}
        for g, ranks in balanced.items():
            multiples[g] = math.lcm(multiples.get(g, 1), ranks)
        scores = score_groups(chosen, importance or magnitude(2), ctx, progress=progress)
        has_config = hasattr(getattr(model, "config", None), "to_dict")
        # A config sizes every layer alike: a group kept whole keeps its role whole.
        by_role, role_of = (
            _roles(graph) if uniform or (uniform is None and has_config) else ({}, {})
        )

        keep_units_given = set(keep_units or ()) if exact_keep_units else set()

        def choose(excluded: set[int]) -> dict[int, np.ndarray]:
            if role_of:
                excluded = {m for g in excluded for m in by_role[role_of[g]]}
            idle: set[int] = set()
            for _ in range(2):
                # An inner factor goes only where its outer ones stay whole (refuted, or
                # too small for the ratio to remove a unit): the second pass admits those.
                removed = select(
                    graph,
                    {
                        g: s
                        for g, s in scores.items()
                        if g not in excluded
                        # A count given for it (a budget's choice) stands with its outer ones.
                        and (g in keep_units_given or not (inner.get(g, set()) - excluded - idle))
                    },
                    model,
                    ratio=ratio,
                    ratios=ratios,
                    ignored=ignored,
                    round_to=round_to,
                    min_units=min_units,
                    global_ranking=global_ranking,
                    uniform=bool(uniform),
                    multiples=multiples,
                    # LAMP, BatchNorm scales after slimming: one threshold over raw scores.
                    normalize=not getattr(importance, "globally_comparable", False),
                    keep_units=keep_units,
                    balanced=balanced,
                )
                outers = set().union(*inner.values()) if inner else set()
                idle = {g for g in outers if g not in removed and g not in excluded}
                if not any(outs <= excluded | idle for outs in inner.values()):
                    break
            return removed

        removed = choose(set())
        if uniform is None and has_config:
            _check_even(model, graph, removed, role_of)
        reasons: dict[int, str] = dict(spanned)
        attributes: dict[str, dict[str, int]] = {}
        if verify and getattr(graph, "recording", None) is not None:
            # Default kinds promise a config that reloads exactly; explicit kinds only warn.
            removed, refuted, attributes = prove(
                model,
                graph,
                removed,
                choose,
                strict=strict,
                exact_config=kinds is None,
                role_of=role_of.get if role_of else None,
            )
            reasons.update(refuted)
        elif verify:
            raise PlanMismatchError(
                "make_plan needs a graph from depprune.trace (with its recorded ops) to prove "
                "the plan; trace again, or pass verify=False"
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
        plan = Plan.from_kept(model, graph.kept_indices(removed), choices)
        if per_expert:
            plan.per_expert = per_expert_kept(
                expert_width_groups(graph, model),
                {c.index: c.kept for c in choices},
                ctx,
                None if per_expert is True else per_expert,
            )
        plan.structure = cuts
        plan.removed = {g: np.asarray(u, dtype=np.int64) for g, u in removed.items()}
        plan.attributes = attributes
        if getattr(graph, "recording", None) is not None and removed:
            plan.widths = changed_widths(graph, graph.keep_mask(removed))
        plan.kept_whole = {
            g: f"group {g} ({graph.groups[g].size} {kind_of[g]}, first member "
            f"{choices[g].first_member}) kept whole: {why}"
            for g, why in sorted(reasons.items())
        }
        for g in sorted(reasons) if role_of else ():
            for mate in by_role[role_of[g]]:
                if mate not in plan.kept_whole and choices[mate].kept == choices[mate].size:
                    plan.kept_whole[mate] = (
                        f"group {mate} ({graph.groups[mate].size} {kind_of[mate]}, first "
                        f"member {choices[mate].first_member}) kept whole like group {g}: "
                        "one config sizes both"
                    )
        plan.inputs = input_spec(getattr(graph, "example_inputs", None))
        # How the plan was made, saved in plan files and shown by `depprune inspect`.
        plan.choices = {
            "ratio": ratio,
            "kinds": sorted(wanted) if kinds is not None else None,
            "importance": getattr(importance, "__name__", type(importance).__name__)
            if importance is not None
            else "l2_magnitude",
            "round_to": round_to,
            "min_units": min_units,
            "global_ranking": global_ranking,
            "per_module_ratios": len(ratios or {}),
            "ignored_modules": len(ignored),
            "keep_units": len(keep_units or {}),
        }
        if per_expert:
            plan.choices["per_expert"] = getattr(per_expert, "__name__", "l2_expert_magnitude")
        if parallel is not None:
            parallel.record(plan, model)
        if structural:
            plan.choices["structural_ratios"] = structural
            plan.choices["structure"] = cuts.describe()
        plan.validate()
        if verify and cuts:
            # The width cuts were replayed above; whole layers and experts are proved here.
            prove_structure(
                model,
                cuts,
                graph.example_inputs if example_inputs is None else example_inputs,
                lambda shadow: plan._cut(shadow, low_memory=False, optimizers=[]),
            )
        if verify:
            plan.mark_proved(model)
        return plan


def _plan_for_target(
    model: nn.Module,
    example_inputs: Any,
    target: Mapping[str, float | str],
    options: dict[str, Any],
    *,
    keep_units: Any,
    ratios: Any,
    layer_importance: Any,
    expert_importance: Any,
    tensor_parallel: Any,
    per_expert: Any,
    **common: Any,
) -> Plan:
    """make_plan with the widths a budget search chose for ``target``."""
    from depprune.budget import search

    if keep_units is not None or ratios is not None:
        raise SelectionError(
            "target chooses every width itself; pass target, or keep_units / ratios, not both"
        )
    known = {
        "tp_size",
        "batch",
        "seq_len",
        "dtype",
        "top",
        "score_fn",
        "calibration",
        "rank",
        "kv_cache",
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise SelectionError(
            f"target_options holds {unknown}, which the budget search does not take; it "
            f"takes {sorted(known)}"
        )
    if tensor_parallel is not None:
        options.setdefault("tp_size", TensorParallel.of(tensor_parallel).size)
    importance, graph = common["importance"], common["graph"]
    result = search(
        model,
        example_inputs,
        target,
        graph=graph,
        importance=importance,
        kinds=common["kinds"],
        round_to=common["round_to"],
        ignored=common["ignored"],
        layer_importance=layer_importance,
        expert_importance=expert_importance,
        verify=common["verify"],
        **options,
    )
    kwargs = {"expert_importance": expert_importance, **result.make_plan_kwargs()}
    plan = make_plan(
        model,
        example_inputs,
        graph=result.graph if graph is None else graph,
        importance=importance,
        ignored=common["ignored"],
        uniform=common["uniform"],
        strict=common["strict"],
        progress=common["progress"],
        verify=common["verify"],
        tensor_parallel=tensor_parallel,
        per_expert=per_expert,
        **kwargs,
    )
    plan.choices["target"] = {key: str(value) for key, value in target.items()}
    plan.budget = result
    return plan


def _kernel_multiples(graph: DependencyGraph, model: nn.Module) -> dict[int, int]:
    """Unit counts groups must keep multiples of for the kernels that run them.

    transformers' ``grouped_mm`` experts need 16-byte rows (hidden and expert
    widths multiples of 4 in fp32, 8 in bf16); the eager loop it could fall back
    to computes the same with other ops, which the replay cannot prove equal.
    """
    prefixes: dict[str, int] = {}
    for name, module in model.named_modules():
        down = getattr(module, "down_proj", None)
        config = getattr(module, "config", None)
        if (
            isinstance(down, nn.Parameter)
            and down.dim() == 3
            and getattr(config, "_experts_implementation", None) == "grouped_mm"
        ):
            prefixes[f"{name}." if name else ""] = max(1, 16 // down.element_size())
    multiples: dict[int, int] = {}
    for g in graph.groups if prefixes else ():
        for member, _ in g.members:
            for prefix, multiple in prefixes.items():
                if member.startswith(prefix):
                    multiples[g.index] = max(multiples.get(g.index, 1), multiple)
    return multiples


def _heads_under_a_norm(
    graph: DependencyGraph, model: nn.Module, chosen: list, kind_of: Mapping[int, str]
) -> dict[int, str]:
    """Head groups a norm spans (OLMo-2's q/k norms over every head), with the reason.

    Removing a head there changes what the norm divides the kept heads by, so their
    outputs would drift; a norm per head (Qwen3) spans head_dim, not heads.
    """
    modules = dict(model.named_modules())
    found = {}
    for g in chosen:
        if kind_of[g.index] != "heads":
            continue
        norms = [
            name for name, _ in g.members if _is_hidden_norm(modules.get(name.rpartition(".")[0]))
        ]
        if norms:
            found[g.index] = (
                f"{norms[0].rpartition('.')[0]} normalises over every head, so removing heads "
                "would change the kept heads' outputs"
            )
    return found


def _outermost_factors(graph: DependencyGraph, chosen: list) -> dict[int, set[int]]:
    """A ratio is of a layer's width: of groups that are factors of one width (KV heads x
    queries per KV head, conv groups x channels per group, heads x head_dim), only the
    outermost is pruned, so ``ratio=0.5`` removes half the width, not three quarters.

    Returns each inner factor with the outer factors it sits under: it is pruned only
    once every one of them is kept whole (a literal head count that the replay refutes).
    """
    by_member: dict[tuple[str, int], list] = {}
    for g in chosen:
        for member in g.members:
            by_member.setdefault(member, []).append(g)
    inner: dict[int, set[int]] = {}
    for member, groups in by_member.items():
        if len(groups) < 2:
            continue
        maps = {g.index: graph.unit_maps(g)[member] for g in groups}
        for a, b in itertools.combinations(sorted(maps), 2):
            # Where both index the dim (the q part of a fused qkv), the outer factor's
            # unit changes less often; groups on different parts are not factors.
            both = (maps[a] >= 0) & (maps[b] >= 0)
            if not both.any():
                continue
            changes_a, changes_b = (int(np.count_nonzero(np.diff(maps[g][both]))) for g in (a, b))
            if changes_a != changes_b:
                outer, within = (a, b) if changes_a < changes_b else (b, a)
                inner.setdefault(within, set()).add(outer)
    return inner


def _roles(graph: DependencyGraph) -> tuple[dict[tuple, list[int]], dict[int, tuple]]:
    """Groups by role, and each group's role: its layer role, and which of the layer's
    groups with that role it is (a fused qkv's KV heads and queries per KV head share
    their members)."""
    role_of: dict[int, tuple] = {}
    seen: dict[tuple, int] = {}
    bases = {g.index: layer_role(g) for g in graph.groups}
    counts: dict[tuple, int] = {}
    for g in graph.groups:
        key = (bases[g.index], tuple(_LAYER_NUMBER.findall(g.members[0][0])))
        counts[key] = counts.get(key, 0) + 1

    def order(g) -> tuple:
        # Same-member groups of a layer in a layer-independent order: outer factors first.
        key = (bases[g.index], tuple(_LAYER_NUMBER.findall(g.members[0][0])))
        if counts[key] == 1:
            return (0, g.index)
        units = graph.unit_maps(g)[g.members[0]]
        units = units[units >= 0]
        return (int(np.count_nonzero(units[1:] != units[:-1])), g.index)

    for g in sorted(graph.groups, key=order):
        base = bases[g.index]
        layer = tuple(_LAYER_NUMBER.findall(g.members[0][0]))
        ordinal = seen.get((base, layer), 0)
        seen[(base, layer)] = ordinal + 1
        role_of[g.index] = (base, ordinal)
    by_role: dict[tuple, list[int]] = {}
    for g, role in role_of.items():
        by_role.setdefault(role, []).append(g)
    return by_role, role_of


_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


def _check_even(
    model: nn.Module, graph: DependencyGraph, removed: dict, role_of: Mapping[int, tuple]
) -> None:
    kept: dict[tuple, set[int]] = {}
    for g in graph.groups:
        kept.setdefault(role_of[g.index], set()).add(g.size - len(removed.get(g.index, ())))
    uneven = [
        f"{role[0][0]}[{role[0][1]}] ({role[0][3] or 'units'}: keeps {sorted(counts)})"
        for role, counts in kept.items()
        if len(counts) > 1
    ]
    if uneven:
        raise SelectionError(
            f"layers would keep different sizes, which {type(model).__name__}'s config "
            f"cannot describe, so from_pretrained could not reload the result: "
            f"{'; '.join(uneven[:3])}{' ...' if len(uneven) > 3 else ''}. Pass "
            "uniform=True for the same size in every layer (each layer still drops its "
            "own weakest units), or uniform=False to prune unevenly anyway"
        )


def _ignored_modules(ignored: Any) -> tuple[nn.Module, ...]:
    """``ignored`` as a tuple of modules: one module, or an iterable of them."""
    if isinstance(ignored, nn.Module):
        return (ignored,)
    if not isinstance(ignored, Iterable):
        raise SelectionError(
            f"ignored must be a module or an iterable of modules; got {type(ignored).__name__}"
        )
    return tuple(ignored)


def _check_kinds(kinds: Iterable[str] | None) -> frozenset[str]:
    if kinds is None:
        return frozenset(KINDS)
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, Iterable) or not all(isinstance(k, str) for k in kinds):
        raise SelectionError(
            f"kinds must be kind names such as ('heads', 'neurons'); got {kinds!r}"
        )
    wanted = frozenset(kinds)
    known = KINDS + STRUCTURAL_KINDS
    unknown = sorted(wanted - set(known))
    if not wanted:
        raise SelectionError(f"kinds is empty, so nothing would be pruned; choose from {known}")
    if unknown:
        raise SelectionError(
            f"kinds {sorted(wanted)} holds unknown kinds {unknown}; choose from {', '.join(known)}"
        )
    return wanted


def _kind_ratios(
    ratios: Mapping[Any, float] | None, ratio: float, wanted: frozenset[str]
) -> tuple[dict[Any, float] | None, dict[str, float]]:
    """``ratios`` without kind-name keys, and each structural kind asked for -> its ratio."""
    if not isinstance(ratios, Mapping):
        by_scope, by_kind = ratios, {}
    else:
        by_scope = {k: v for k, v in ratios.items() if not isinstance(k, str)} or None
        by_kind = {k: v for k, v in ratios.items() if isinstance(k, str)}
    for kind, value in by_kind.items():
        if kind not in STRUCTURAL_KINDS:
            raise SelectionError(
                f"ratios names the kind {kind!r}; a kind of its own ratio is one of "
                f"{STRUCTURAL_KINDS} (widths take ratio, or ratios by module)"
            )
        if kind not in wanted:
            raise SelectionError(
                f"ratios gives {kind!r} a ratio, but kinds does not ask for it; add it to kinds"
            )
        _check_ratio(value, f"the ratio of {kind!r}")
    structural = {k: by_kind.get(k, ratio) for k in STRUCTURAL_KINDS if k in wanted}
    return by_scope, structural


def prune(
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
    count_macs: bool = True,
    low_memory: bool = False,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    progress: bool | None = None,
    keep_units: Mapping[int, int] | None = None,
    layer_importance: Any = None,
    expert_importance: Any = None,
) -> PruneReport:
    """Prune ``model`` in place and return a report; on any error it is left as it was.

    :func:`make_plan` then ``plan.apply(model, low_memory=low_memory,
    optimizers=optimizers)`` (optimizers made before pruning keep training
    the cut model, their state cut to match); the report has parameters and MACs (one forward pass each, skipped with
    ``count_macs=False``) before and after, and the units each group kept.
    It prints as a table. ``graph`` reuses a :func:`trace` of this model (as it is
    now) instead of tracing ``example_inputs`` again.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 2, 1))
    >>> report = depprune.prune(model, torch.randn(1, 3, 8, 8), ratio=0.25)
    >>> report.plan.groups[0].kept, model[1].num_features
    (6, 6)
    """
    ignored = _ignored_modules(ignored)
    # Check cheap arguments before the trace, so mistakes fail fast.
    check_ratios(
        model,
        ratio,
        _kind_ratios(ratios, ratio, _check_kinds(kinds))[0],
        ignored,
        round_to,
        min_units,
    )
    optimizers = checked_optimizers(optimizers)
    if graph is None:
        if example_inputs is None:
            raise TraceError("prune needs example_inputs to trace the model, or a graph")
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
        strict=strict,
        progress=progress,
        keep_units=keep_units,
        layer_importance=layer_importance,
        expert_importance=expert_importance,
    )
    return apply_with_report(
        model, plan, graph, count_macs=count_macs, low_memory=low_memory, optimizers=optimizers
    )


def apply_with_report(
    model: nn.Module,
    plan: Plan,
    graph: DependencyGraph,
    *,
    count_macs: bool = True,
    low_memory: bool = False,
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> PruneReport:
    """Cut ``plan`` (made from ``graph``) into ``model`` and report it, as :func:`prune` does.

    For methods that make their own plan (a custom selection, weights to
    write after the cut): parameters and MACs are counted on meta twins
    before the cut, so a failing count never leaves a half-reported model.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> graph = depprune.trace(model, torch.zeros(1, 4))
    >>> plan = depprune.make_plan(model, graph=graph, ratio=0.5)
    >>> apply_with_report(model, plan, graph).params_after, model[0].out_features
    (30, 4)
    """
    params_before = _count_params(model)
    params_after = plan.params_after(model)
    macs_before = macs_after = None
    if count_macs:
        # Both counts on meta twins, before the cut: the model's own forward never runs here.
        macs_before = _macs_on_shadow(model, graph, None)
        macs_after = _macs_on_shadow(model, graph, plan)
    plan.apply(model, low_memory=low_memory, optimizers=optimizers)
    return PruneReport(
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        plan=plan,
        unsupported_ops=dict(graph.unsupported_ops),
        notes=list(graph.notes),
        graph=graph,
        kept_whole=list(plan.kept_whole.values()),
    )


def _macs_on_shadow(model: nn.Module, graph: DependencyGraph, plan: Plan | None) -> Any:
    """MACs of the model, or of the plan applied to a twin of it (meta when possible)."""
    import copy
    import warnings

    from depprune.apply import apply_kept_indices
    from depprune.shadow import ShadowError

    on_meta = getattr(graph.recording, "device", "meta") == "meta"
    try:
        twin = meta_shadow(model) if on_meta else copy.deepcopy(model)
    except (ShadowError, Exception):
        return None
    if plan is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_kept_indices(twin, plan.kept, attributes=plan.attributes, widths=plan.widths)
    return _count_macs(twin, graph.example_inputs)
