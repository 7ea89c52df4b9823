"""Verify stage: prove a plan on a fresh shadow before a weight of the model is cut.

Takes the trace of a model (its op log and axes), a selection of units to
remove, and gives either nothing (proved) or the first place where the
pruned model stops being what the plan predicts. The plan, with every
attribute and config change, is applied to a meta-device shadow; its forward
is *replayed* under a dispatch mode that checks each ATen call against the
trace: the same overload in the same order, and every tensor with exactly
the shape the plan predicts from its axes (the kept size of each axis, from
the core). A literal size in a ``view``, an attribute no fixer knows, a
branch on a shape or a tensor created in ``forward`` all show up here.

:func:`prove` is the loop that makes a plan safe: where the replay diverges
it blames the groups behind the first diverging op (bisecting when the op
does not say), keeps them whole, and tries again; what it kept whole, and
why, is reported.

>>> import torch, depprune
>>> class Literal(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = torch.nn.Linear(4, 16), torch.nn.Linear(16, 2)
...         self.c, self.d = torch.nn.Linear(4, 6), torch.nn.Linear(6, 2)
...     def forward(self, x):
...         h = self.a(x).view(-1, 4, 4).relu().flatten(1)  # a literal 4: 16 is frozen in code
...         return self.b(h) + self.d(self.c(x).relu())
>>> report = depprune.prune(Literal(), torch.randn(3, 4), ratio=0.5)
>>> [(g.kind, g.size, g.kept) for g in report.plan.groups]
[('heads', 4, 4), ('head_dim', 4, 4), ('neurons', 6, 3)]
>>> print(report.kept_whole[0])
group 0 (4 heads, first member a.weight[0]) kept whole: the model: aten.view fails (RuntimeError: shape '[-1, 4, 4]' is invalid for input of size 24)
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from depprune.errors import ConfigWarning, PlanMismatchError
from depprune.graph import DependencyGraph
from depprune.shadow import ShadowError, meta_inputs, meta_shadow
from depprune.tracer import (
    OpLog,
    TraceResult,
    _Recorder,
    running_stats_kept,
    split_inputs,
)

__all__ = ["Divergence", "changed_widths", "infer_attributes", "prove", "replay_plan"]

#: Replays one prove may spend before it keeps every remaining pruned group whole.
MAX_REPLAYS = 64


@dataclass(frozen=True)
class Divergence:
    """Where a replay stopped matching the plan: the op index (-1: before the forward)."""

    op: int
    message: str

    def __str__(self) -> str:
        return self.message


_aten = torch.ops.aten
#: Alias ops that dispatch machinery inserts or not (a factory's detach under a mode):
#: they change no shape, so the replay neither expects nor counts them.
_BOOKKEEPING = frozenset(
    f
    for name in ("detach", "detach_", "alias", "lift_fresh", "lift_fresh_copy")
    for f in (getattr(getattr(_aten, name, None), "default", None),)
    if f is not None
)


#: Copies that ``reshape`` makes or not depending on strides (an expand of one KV head is
#: viewable, of two is not): the same values either way, so the replay may skip them.
_COPIES = frozenset(
    f
    for name in ("clone", "contiguous", "_to_copy")
    for f in (getattr(getattr(_aten, name, None), "default", None),)
    if f is not None
)
#: Overloads that compute the same thing and differ only in whether they copied first.
_SAME_AS = {_aten._unsafe_view.default: _aten.view.default}


def _same_op(a: Any, b: Any) -> bool:
    return a is b or _SAME_AS.get(a, a) is _SAME_AS.get(b, b)


class _Diverged(Exception):
    """Stops a replayed forward at its first divergence."""


class _Replayer(_Recorder):
    """Runs a forward and checks every ATen call against a recorded op log."""

    def __init__(
        self, log: OpLog, sizes: list[int], traced_sizes: list[int], on_values: bool
    ) -> None:
        TorchDispatchMode.__init__(self)
        self.log = log
        self.sizes = sizes
        self.traced_sizes = traced_sizes
        self.rules: dict[Any, Any] = {}
        self.notes: Counter[str] = Counter()
        self.num_ops = 0
        self.divergence: Divergence | None = None
        #: Replaying real values: sizes the plan does not change may follow the data.
        self.on_values = on_values
        #: The log's ops that the replay compares against, by position.
        self.order = [k for k, f in enumerate(log.funcs) if f not in _BOOKKEEPING]

    def _where(self, op: int) -> str:
        log = self.log
        if 0 <= op < len(log.modules):
            name = log.module_names[log.modules[op]]
            return f"{name or 'the model'}: "
        return ""

    def diverge(self, op: int, message: str) -> None:
        if self.divergence is None:
            self.divergence = Divergence(op, self._where(op) + message)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = self.rules.get(func)
        rule, _, rare = entry if entry is not None else self._entry(func)
        kwargs = kwargs or {}
        run = func
        if rare:
            # The same rare paths as the trace took, so the same calls come back.
            done, run = self._rare(func, rule, args, kwargs)
            if done:
                return run
        if func in _BOOKKEEPING:
            return func(*args, **kwargs)
        order, log = self.order, self.log
        op = order[self.num_ops] if self.num_ops < len(order) else len(log.funcs)
        if op < len(log.funcs) and not _same_op(log.funcs[op], func):
            following = order[self.num_ops + 1] if self.num_ops + 1 < len(order) else None
            if log.funcs[op] in _COPIES and following is not None:
                if _same_op(log.funcs[following], func):
                    self.num_ops += 1  # the trace copied here, the replay needs not
                    op = following
            elif func in _COPIES:
                return func(*args, **kwargs)  # a copy the trace did not need
        if op >= len(log.funcs) or not _same_op(log.funcs[op], func):
            traced = log.funcs[op].overloadpacket if op < len(log.funcs) else "nothing more"
            self.diverge(
                op,
                f"the pruned forward calls {func.overloadpacket} where the trace had {traced} "
                "(a branch on a size, or code that depends on the pruned width)",
            )
            raise _Diverged
        try:
            out = run(*args, **kwargs)
        except Exception as exc:
            self.diverge(op, f"{func.overloadpacket} fails ({type(exc).__name__}: {exc})")
            raise _Diverged from exc
        self.num_ops += 1
        got = out if isinstance(out, (tuple, list)) else (out,)
        sizes = self.sizes
        for index, axes in enumerate(log.outputs[op]):
            tensor = got[index] if axes is not None and index < len(got) else None
            if not isinstance(tensor, torch.Tensor):
                continue
            want = tuple(sizes[a] for a in axes)
            if tuple(tensor.shape) != want:
                traced = tuple(self.traced_sizes[a] for a in axes)
                if (
                    self.on_values
                    and len(want) == tensor.dim()
                    and all(
                        got == w or w == t
                        for got, w, t in zip(tensor.shape, want, traced, strict=True)
                    )
                ):
                    continue  # real values (detections kept) may size what the plan does not

                self.diverge(
                    op,
                    f"{func.overloadpacket} gives shape {tuple(tensor.shape)} where the plan "
                    f"predicts {want} (traced: {traced}; a size in the code that the plan "
                    "does not change)",
                )
                raise _Diverged
        return out


def _shadow_for(model: nn.Module, recording: TraceResult) -> tuple[nn.Module, bool]:
    """A fresh twin to cut: on meta when the trace ran there, else a real deep copy."""
    if recording.device == "meta":
        try:
            return meta_shadow(model), True
        except ShadowError:
            pass
    import copy

    return copy.deepcopy(model), False


def replay_plan(
    model: nn.Module,
    graph: DependencyGraph,
    keep: np.ndarray,
    kept: Mapping[tuple[str, int], np.ndarray],
    *,
    exact_config: bool = False,
    attributes: Mapping[str, Mapping[str, int]] | None = None,
) -> Divergence | None:
    """Apply ``kept`` to a fresh shadow of ``model`` and replay ``graph``'s trace on it.

    ``attributes`` (module name -> integer attribute -> value) are set on the
    shadow with the cut, as :func:`infer_attributes` proposes them.

    ``keep`` is the keep mask the kept indices came from (it predicts every
    traced tensor's shape). ``exact_config=True`` also refutes a plan whose
    Hugging Face config cannot describe the result (a model rebuilt from it
    on meta would differ), so that the checkpoint reloads exactly. Returns
    ``None`` when the replay matches.
    """
    from depprune.apply import apply_kept_indices

    recording: TraceResult | None = getattr(graph, "recording", None)
    if recording is None or recording.log is None:
        raise PlanMismatchError(
            "this graph has no recorded trace to verify a plan against; "
            "make it with depprune.trace(model, example_inputs)"
        )
    try:
        twin, on_meta = _shadow_for(model, recording)
    except Exception as exc:
        return Divergence(-1, f"the model cannot be copied to verify the plan ({exc})")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_kept_indices(  # a twin made here: no optimizer holds its tensors
                twin,
                kept,
                attributes=attributes,
                widths=changed_widths(graph, keep),
                warn_optimizers=False,
            )
    except Exception as exc:
        return Divergence(-1, f"applying the plan fails ({type(exc).__name__}: {exc})")
    for warning in caught if exact_config else ():
        if issubclass(warning.category, ConfigWarning):
            return Divergence(-1, f"the config cannot describe the result: {warning.message}")
    sizes = graph._analysis.kept_sizes(np.ascontiguousarray(keep, dtype=np.uint8)).tolist()
    original = recording.equations.axis_sizes
    args, kwargs = split_inputs(graph.example_inputs)
    if on_meta:
        args, kwargs = meta_inputs((args, kwargs))
    replayer = _Replayer(recording.log, sizes, original, on_values=not on_meta)
    try:
        with torch.no_grad(), running_stats_kept(twin), replayer:
            output = twin(*args, **kwargs)
    except Exception as exc:
        if replayer.divergence is None:
            order = replayer.order
            replayer.diverge(
                order[replayer.num_ops] if replayer.num_ops < len(order) else len(order),
                f"the pruned forward raises {type(exc).__name__}: {exc}",
            )
        return replayer.divergence
    if replayer.divergence is not None:
        return replayer.divergence
    if replayer.num_ops != len(replayer.order):
        return Divergence(
            replayer.order[replayer.num_ops],
            f"the pruned forward stops after {replayer.num_ops} of "
            f"{len(replayer.order)} traced ops (a branch on a size)",
        )
    got = [tuple(t.shape) for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
    want = [tuple(original[a] for a in axes) for axes in recording.output_axes]
    if got != want:
        return Divergence(-1, f"the pruned model's outputs have shapes {got}, not {want}")
    return None


def changed_widths(graph: DependencyGraph, keep: np.ndarray) -> dict[int, list[int]]:
    """Every traced size the plan changes, with the sizes it becomes (sorted).

    >>> import torch, depprune
    >>> graph = depprune.trace(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)),
    ...                        torch.zeros(3, 2))
    >>> changed_widths(graph, graph.keep_mask({0: [1, 2]}))
    {4: [2]}
    """
    traced = np.asarray(graph.recording.equations.axis_sizes, dtype=np.int64)
    kept = graph._analysis.kept_sizes(np.ascontiguousarray(keep, dtype=np.uint8))
    moved = traced != kept
    pairs = np.unique(np.stack([traced[moved], kept[moved]], axis=1), axis=0)
    widths: dict[int, list[int]] = {}
    for old, new in pairs.tolist():
        widths.setdefault(old, []).append(new)
    return widths


def infer_attributes(
    model: nn.Module, graph: DependencyGraph, keep: np.ndarray
) -> dict[str, dict[str, int]]:
    """Integer attributes that size a pruned axis, with their new values.

    An attribute of a module (``num_heads``, ``head_dim``, a split width) is
    proposed when its value is the traced size of an axis that the plan
    changes and that ops running in that module's own ``forward`` read or
    write, and every such axis of that size keeps the same new size. Only a
    proposal: :func:`prove` keeps it when the replay with it matches.

    >>> import torch, depprune
    >>> class Heads(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.num_heads = torch.nn.Linear(4, 16), torch.nn.Linear(16, 2), 4
    ...     def forward(self, x):
    ...         h = self.a(x).view(x.shape[0], self.num_heads, -1).softmax(-1)
    ...         return self.b(h.flatten(1))
    >>> model = Heads()
    >>> report = depprune.prune(model, torch.randn(3, 4), ratio=0.5)
    >>> model.num_heads, report.plan.attributes
    (2, {'': {'num_heads': 2}})
    """
    recording = graph.recording
    log, traced = recording.log, recording.equations.axis_sizes
    sizes = graph._analysis.kept_sizes(np.ascontiguousarray(keep, dtype=np.uint8)).tolist()
    by_module: dict[int, dict[int, set[int]]] = {}
    for op, module in enumerate(log.modules):
        for axis in log.axes_of(op):
            if sizes[axis] != traced[axis]:
                by_module.setdefault(module, {}).setdefault(traced[axis], set()).add(sizes[axis])
    from depprune.apply import FIXERS

    handled = tuple(cls for cls, _ in FIXERS)  # torch.nn layers: their fixers know every size
    modules = dict(model.named_modules())
    proposed: dict[str, dict[str, int]] = {}
    for index, by_size in by_module.items():
        name = log.module_names[index]
        module = modules.get(name)
        if module is None or isinstance(module, handled):
            continue
        for attr, value in vars(module).items():
            new = by_size.get(value) if type(value) is int and not attr.startswith("_") else None
            if new is not None and len(new) == 1:
                proposed.setdefault(name, {})[attr] = next(iter(new))
    return proposed


def _blame(
    divergence: Divergence, graph: DependencyGraph, keep: np.ndarray, candidates: list[int]
) -> list[int]:
    """Pruned groups whose units index a tensor of the diverging op."""
    recording = graph.recording
    log = recording.log
    if not 0 <= divergence.op < len(log.funcs):
        return []
    sizes = recording.equations.axis_sizes
    kept = graph._analysis.kept_sizes(np.ascontiguousarray(keep, dtype=np.uint8))
    # The op that failed, and the one before (a Python-level check between two ops).
    axes = [a for op in {divergence.op, max(divergence.op - 1, 0)} for a in log.axes_of(op)]
    changed = np.asarray([a for a in axes if kept[a] != sizes[a]], dtype=np.int64)
    if changed.size == 0:
        return []
    _, groups = graph._analysis.groups_of_axes(changed)
    wanted = set(candidates)
    return sorted({int(g) for g in groups.tolist()} & wanted)


def prove(
    model: nn.Module,
    graph: DependencyGraph,
    removed: Mapping[int, np.ndarray],
    reselect: Callable[[set[int]], Mapping[int, np.ndarray]],
    *,
    strict: bool = False,
    exact_config: bool = False,
    role_of: Callable[[int], object] | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, str], dict[str, dict[str, int]]]:
    """Remove units only where the replay proves it: ``(removed, kept whole, attributes)``.

    ``kept whole`` maps groups to the reason; ``attributes`` are the inferred
    integer attributes (:func:`infer_attributes`) the proved plan needs.

    ``reselect(excluded)`` selects again with the groups in ``excluded`` kept
    whole. At a divergence, the pruned groups on the diverging op's tensors
    are tried one at a time, then together, and when the op does not say
    (a Python check between ops), groups are bisected, whole roles at a time
    (``role_of``: groups a config sizes together). ``strict=True``
    raises :class:`PlanMismatchError` at the first divergence instead.
    """
    reasons: dict[int, str] = {}
    seen: dict[tuple, Divergence | None] = {}
    inferred: dict[tuple, dict[str, dict[str, int]]] = {}
    role_of = role_of or (lambda g: g)

    def replay(selection: Mapping[int, np.ndarray]) -> Divergence | None:
        key = tuple(sorted((g, np.asarray(u).tobytes()) for g, u in selection.items()))
        if key not in seen:
            keep = graph.keep_mask(selection)
            kept = graph.kept_indices(keep)
            seen[key] = replay_plan(model, graph, keep, kept, exact_config=exact_config)
            if seen[key] is not None:
                # Sizes kept in attributes no fixer knows: propose them, keep what proves.
                proposal = infer_attributes(model, graph, keep)
                if proposal and (
                    replay_plan(
                        model, graph, keep, kept, exact_config=exact_config, attributes=proposal
                    )
                    is None
                ):
                    seen[key], inferred[key] = None, proposal
        return seen[key]

    def without(excluded: set[int]) -> dict[int, np.ndarray]:
        return {g: u for g, u in reselect(excluded).items() if g not in excluded}

    removed = dict(removed)
    while removed:
        divergence = replay(removed)
        if divergence is None:
            break
        if strict:
            raise PlanMismatchError(
                f"the plan does not hold on the model: {divergence}; pass strict=False to "
                "keep the groups responsible whole"
            )
        keep = graph.keep_mask(removed)
        suspects = _blame(divergence, graph, keep, sorted(removed))
        trials = [[g] for g in suspects[:8]] if len(suspects) > 1 else []
        trials += [suspects] if suspects else []
        culprits: list[int] = []
        for trial in trials:
            again = replay(without(set(reasons) | set(trial)))
            if again is None or again.op > divergence.op:
                culprits = trial  # past the diverging op: these were the cause
                break
        if not culprits:
            culprits, divergence = _bisect(removed, replay, role_of)
        for g in culprits:
            reasons[g] = str(divergence)
        if len(seen) >= MAX_REPLAYS:
            for g in without(set(reasons)):
                reasons[g] = f"not proved within {MAX_REPLAYS} replays"
            return {}, reasons, {}
        removed = without(set(reasons))
    final = tuple(sorted((g, np.asarray(u).tobytes()) for g, u in removed.items()))
    return removed, reasons, inferred.get(final, {})


def _bisect(
    removed: Mapping[int, np.ndarray],
    replay: Callable[[Mapping[int, np.ndarray]], Divergence | None],
    role_of: Callable[[int], object],
) -> tuple[list[int], Divergence]:
    """The role whose removal first breaks the replay, adding roles in group order."""
    roles = list(dict.fromkeys(role_of(g) for g in sorted(removed)))

    def first(count: int) -> dict[int, np.ndarray]:
        chosen = set(roles[:count])
        return {g: u for g, u in removed.items() if role_of(g) in chosen}

    low, high = 0, len(roles)  # roles[:low] replay; roles[:high] do not
    while high - low > 1:
        middle = (low + high) // 2
        if replay(first(middle)) is None:
            low = middle
        else:
            high = middle
    divergence = replay(first(high))
    assert divergence is not None  # roles[:high] were seen to diverge
    culprit = min(g for g in removed if role_of(g) == roles[high - 1])
    return [culprit], divergence
