"""Select stage, budgets: takes a model, its graph and a target (parameters, active
parameters, MACs or memory), gives the uniform widths, layer and expert counts that meet it.

Instead of a ratio, say what the pruned model may cost:

- ``"params"``: parameters after (tied ones once);
- ``"active_params"``: parameters one token touches: everything but the routed
  experts, plus ``top_k`` experts' worth of each MoE layer (the router's rows
  count in full); the same as ``"params"`` for a dense model;
- ``"macs"``: multiply-accumulates of one forward pass on the example inputs
  with torch's ``FlopCounterMode`` formulas (matmuls, convolutions, attention
  kernels), over the calls the trace recorded: what :func:`depprune.prune`
  reports (the count on the meta shadow). Attention that runs as one fused
  kernel on real weights (``nn.MultiheadAttention`` under ``no_grad``) counts
  its matmuls here; routing that depends on values (experts in a list) counts
  as on meta, every expert taking every token;
- ``"memory_gb"``: the weights in their dtype (or ``dtype``), plus, for a model
  that caches keys and values (a Hugging Face model that can generate with
  ``use_cache``), the KV cache of ``batch`` x ``seq_len`` tokens: per attention
  layer, a key and a value as wide as the layer's narrowest head projection
  (KV heads x head_dim: GQA included), in GB of 10^9 bytes.

A target is an absolute number (``4e9`` parameters, ``12.5`` GB) or a string
percentage of the original model (``"50%"``); several targets must all hold.

**The candidates** are uniform: every group of one role (the KV heads of every
layer, the MLP neurons of every layer) keeps the same number of units, as one
config needs. Each kind is one dimension of a grid: ``hidden``, ``kv_heads``
(the heads that key/value projections have; just ``heads`` without GQA),
``heads_per_kv`` (query heads per KV head: the query heads are their product),
``neurons``, ``channels``, and, when ``kinds`` asks, ``head_dim``,
``conv_groups``, ``layers`` (whole repeated blocks, one ratio for every list,
as :func:`depprune.make_plan` takes it) and ``experts`` (routed experts kept
per MoE layer). Where one kind has roles of different sizes (a CNN's stages),
they keep the same fraction. Every count is at least 1, its width (units x the
indices each unit spans: 1 for a channel, head_dim for a head) a multiple of
``round_to``; with ``tp_size`` the query heads, KV heads and neurons divide
by it (KV heads may divide ``tp_size`` instead when the model already has
fewer, as vLLM replicates them); kernel multiples (``grouped_mm`` experts)
hold as in make_plan.

**Costs are exact and read no weight.** The core describes every parameter
dim and every traced tensor axis as sums and products of group atoms
(``product(g1[8], g3[128])``); its kept size is the same expression in the
kept counts (what :meth:`DependencyGraph.kept_indices` gives), so every metric
is a polynomial in the dimensions' counts: built once from the parameter
dims, the matmul / convolution / attention calls of the trace and the
attention layers, with a layer's terms scaled by whether its block stays and
an expert tensor's expert dim by the experts kept. A candidate then costs one
evaluation of a few monomials, done for the whole grid at once with numpy:
the dimension with the most levels is bisected per combination of the others
(every cost grows with every count), so the chosen candidate is at most one
step of that dimension under the target.

**Ranking.** Among the combinations that fit, the best keeps the most
importance: ``retained`` is the parameter count with every kept count ``k``
of a role replaced by ``n * S(k)``, ``S(k)`` the share of the role's unit
scores its top ``k`` hold (summed over the role's groups; magnitude by
default, ``importance`` otherwise), layers and experts weighted alike by
their ``layer_importance`` / ``expert_importance`` when given; divided by the
original parameter count. Where no unit can be scored (weights on the meta
device) the widths shrink most evenly instead: the largest smallest kept
fraction, then ``retained`` (the parameter share). Ties go to the higher cost.
``rank="cost"`` takes the highest cost that fits. With ``score_fn`` (slow:
a plan is made, applied to a deep copy and scored per candidate), the ``top``
candidates are re-ranked by ``score_fn(pruned)`` (or its mean over
``calibration`` batches, called as ``score_fn(pruned, batch)``), higher is
better.

**Proof.** Candidates whose Hugging Face config would not validate
(transformers 5 wants the hidden size to divide by the heads) are passed over,
then the chosen widths are replayed on a meta shadow
(:func:`depprune.verify.replay_plan`) as make_plan would prove them; a count
the replay refutes on its own (HF's ``repeat_kv`` branches on one query head
per KV head) leaves the grid and the search runs again. The runners-up are
not replayed; layers and experts are proved by make_plan. The model is never
changed.

**Into a plan.** :meth:`BudgetResult.make_plan_kwargs` gives ``keep_units``
(every group of the graph), ``kinds`` and the layer / expert ``ratios`` for
``make_plan(model, graph=result.graph, **kwargs)``, with the same
``importance``; ``round_to`` is not passed again (the counts already are).

>>> import torch, depprune
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
>>> result = search(model, torch.randn(4, 8), {"params": "50%"})
>>> result.chosen.widths, result.chosen.costs["params"], result.original["params"]
({'neurons': 15}, 263, 552)
>>> plan = depprune.make_plan(model, graph=result.graph, **result.make_plan_kwargs())
>>> plan.params_after(model)
263
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from depprune.errors import DeppruneError, ImportanceError, InternalError, SelectionError
from depprune.graph import DependencyGraph
from depprune.kinds import KINDS

__all__ = ["DEFAULT_KINDS", "METRICS", "BudgetCandidate", "BudgetResult", "search"]

#: What a target may bound.
METRICS = ("params", "active_params", "macs", "memory_gb")
#: Kinds searched when ``kinds`` is None: the widths a config describes without surprises.
DEFAULT_KINDS = ("hidden", "heads", "neurons", "channels")
_STRUCTURAL = ("layers", "experts")
#: Combinations of the non-bisected dimensions evaluated at once; more are thinned.
_MAX_ROWS = 1 << 20
#: Replays spent proving the chosen candidate before giving up.
_MAX_REPLAYS = 12
_RANKS = ("importance", "cost")

# ---------------------------------------------------------------------------------------
# Polynomials in the kept counts: {monomial (sorted variable ids, repeated for powers): int}

Poly = dict


def _const(value: int) -> Poly:
    return {(): int(value)} if value else {}


def _plus(a: Poly, b: Poly) -> Poly:
    out = dict(a)
    for mono, coef in b.items():
        out[mono] = out.get(mono, 0) + coef
    return {m: c for m, c in out.items() if c}


def _times(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            mono = tuple(sorted(ma + mb))
            out[mono] = out.get(mono, 0) + ca * cb
    return {m: c for m, c in out.items() if c}


def _product(polys: Iterable[Poly]) -> Poly:
    out = _const(1)
    for p in polys:
        out = _times(out, p)
    return out


def _evaluate(poly: Poly, values: Sequence[Any], rows: int, dtype: Any = np.int64) -> np.ndarray:
    """The polynomial at every row: ``values[v]`` is variable ``v`` (an array or a number)."""
    total = np.zeros(rows, dtype=dtype)
    for mono, coef in poly.items():
        term: Any = coef
        for v in mono:
            term = term * values[v]
        total += term
    return total


_TOKENS = re.compile(r"(product|sum)\(|g(\d+)\[(\d+)\]|(?:frozen|free)\[(\d+)\]|(, )|(\))")


def _structure_poly(text: str, leaf: Callable[[int, int], Poly]) -> Poly:
    """An axis's kept size from the core's description of it (``describe_axis``).

    A leaf of group ``g`` keeps its group's kept units (``leaf(g, size)``), a
    frozen or free leaf its size; a sum adds, a product multiplies: the same
    recursion as the core's ``kept_sizes``.

    >>> _structure_poly("product(g1[2], sum(g3[4], g3[4]))", lambda g, n: {(g,): 1})
    {(1, 3): 2}
    """
    stack: list[tuple[str, list[Poly]]] = [("sum", [])]
    position = 0
    for match in _TOKENS.finditer(text):
        if match.start() != position:
            break
        position = match.end()
        opener, group, size, fixed, _comma, close = match.groups()
        if opener:
            stack.append((opener, []))
        elif group is not None:
            stack[-1][1].append(leaf(int(group), int(size)))
        elif fixed is not None:
            stack[-1][1].append(_const(int(fixed)))
        elif close and len(stack) > 1:
            kind, parts = stack.pop()
            combined = _product(parts) if kind == "product" else {}
            if kind == "sum":
                for part in parts:
                    combined = _plus(combined, part)
            stack[-1][1].append(combined)
    if position != len(text) or len(stack) != 1 or len(stack[0][1]) != 1:
        raise InternalError(f"cannot read the core's axis description {text!r}")
    return stack[0][1][0]


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class BudgetCandidate:
    """One candidate: what it keeps, what it costs, and how much importance it keeps."""

    #: Per dimension, what it keeps: units of its largest role (``hidden``, ``kv_heads``,
    #: ``query_heads`` = kv_heads x heads_per_kv, ``neurons``, ...), layers or experts.
    widths: dict[str, int]
    #: Units every group of the graph keeps: ``make_plan(keep_units=...)``.
    keep_units: dict[int, int]
    #: Ratios of whole layers and experts: ``make_plan(ratios=...)``.
    ratios: dict[str, float]
    #: ``params``, ``active_params``, ``macs`` (None where not counted), ``memory_gb``.
    costs: dict[str, float | None]
    #: Importance kept (see the module docs), 1.0 for the original model.
    retained: float
    #: ``score_fn`` of the candidate, when one was given.
    score: float | None = None


@dataclass
class BudgetResult:
    """What :func:`search` found: the chosen candidate, the runners-up, the costs.

    ``make_plan_kwargs()`` gives what :func:`depprune.make_plan` needs to cut it.
    """

    #: Each target as an absolute bound (``memory_gb`` in GB).
    target: dict[str, float]
    #: The original model's costs, in the same units.
    original: dict[str, float | None]
    chosen: BudgetCandidate
    #: The best candidates, best first (``chosen`` among them).
    candidates: list[BudgetCandidate]
    #: The kinds make_plan must prune (widths searched, then "layers", "experts").
    kinds: tuple[str, ...]
    #: Dimension label -> number of levels searched.
    levels: dict[str, int]
    #: Combinations of the dimensions but the finest that fit (each with the largest
    #: finest width that does).
    feasible: int
    seconds: float
    #: Costs one step of the finest dimension above the chosen one: each exceeds a target.
    next_step: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: What every dimension keeps in the original model.
    original_widths: dict[str, int] = field(default_factory=dict)
    graph: DependencyGraph | None = field(default=None, repr=False)
    #: Layer scores the search computed itself (children differ), for make_plan to reuse.
    layer_importance: Any = field(default=None, repr=False)

    @property
    def keep_units(self) -> dict[int, int]:
        """Units every group keeps in the chosen candidate."""
        return self.chosen.keep_units

    @property
    def ratios(self) -> dict[str, float]:
        """Ratios of layers and experts of the chosen candidate."""
        return self.chosen.ratios

    def miss(self, metric: str) -> float | None:
        """How far under its target the chosen candidate is (0 is exact)."""
        cost = self.chosen.costs.get(metric)
        return None if cost is None or metric not in self.target else self.target[metric] - cost

    def make_plan_kwargs(self) -> dict[str, Any]:
        """Arguments that make :func:`depprune.make_plan` cut the chosen candidate.

        Pass ``importance`` (and ``layer_importance`` / ``expert_importance``) as
        given to :func:`search`; ``round_to`` stays None: the counts are rounded.

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> search(model, torch.zeros(1, 4), {"params": 40}).make_plan_kwargs()
        {'keep_units': {0: 4}, 'exact_keep_units': True, 'kinds': ('neurons',)}
        """
        kwargs: dict[str, Any] = {
            "keep_units": dict(self.keep_units),
            "exact_keep_units": True,
            "kinds": self.kinds,
        }
        if self.ratios:
            kwargs["ratios"] = dict(self.ratios)
        if self.layer_importance is not None:
            kwargs["layer_importance"] = self.layer_importance
        return kwargs

    def table(self) -> str:
        """The targets, the original and the best candidates as a plain-text table.

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> print(search(model, torch.zeros(1, 4), {"params": 60}).table())
        ... # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
        budget: params <= 60 (78.9% of the original)
        searched neurons 8 levels: 1 combinations fit (... s)
                      neurons      params      active        MACs          GB  retained
        original            8          76          76          64    3.04e-07    1.0000
              *1            6          58          58          48    2.32e-07    0.8...

        Each candidate is the largest that fits for its combination of the other
        dimensions: one dimension, one candidate.
        """
        return "\n".join(_table_lines(self))

    def __str__(self) -> str:
        return self.table()


def _format_cost(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "memory_gb":
        return f"{value:,.2f}" if value >= 1 else f"{value:.3g}"
    return f"{int(value):,}"


_HEADERS = {"params": "params", "active_params": "active", "macs": "MACs", "memory_gb": "GB"}


def _table_lines(result: BudgetResult) -> list[str]:
    bounds = "; ".join(
        f"{m} <= {_format_cost(m, v)}"
        + (f" ({v / result.original[m]:.1%} of the original)" if result.original.get(m) else "")
        for m, v in result.target.items()
    )
    levels = ", ".join(f"{label} {count}" for label, count in result.levels.items())
    lines = [
        f"budget: {bounds}",
        f"searched {levels} levels: {result.feasible:,} combinations fit ({result.seconds:.2f} s)",
    ]
    labels = list(result.chosen.widths)
    metrics = [m for m in METRICS if result.original.get(m) is not None]
    width = {m: max(12, len(_format_cost(m, result.original[m])) + 1) for m in metrics}
    header = f"{'':>8}" + "".join(f"{label:>13}" for label in labels)
    header += "".join(f"{_HEADERS[m]:>{width[m]}}" for m in metrics) + f"{'retained':>10}"
    scored = any(c.score is not None for c in result.candidates)
    lines.append(header + (f"{'score':>10}" if scored else ""))
    rows = [("original", result.original_widths, result.original, 1.0, None)]
    rows += [
        (f"{'*' if c is result.chosen else ''}{k + 1}", c.widths, c.costs, c.retained, c.score)
        for k, c in enumerate(result.candidates)
    ]
    for name, widths, costs, retained, score in rows:
        line = f"{name:>8}" + "".join(f"{widths.get(label, ''):>13}" for label in labels)
        line += "".join(f"{_format_cost(m, costs.get(m)):>{width[m]}}" for m in metrics)
        line += f"{retained:>10.4f}"
        if scored:
            line += f"{score:>10.4g}" if score is not None else f"{'-':>10}"
        lines.append(line)
    lines += [f"note: {note}" for note in result.notes]
    return lines


# ---------------------------------------------------------------------------------------
# The space: dimensions, variables and the cost polynomials


@dataclass
class _Dim:
    label: str
    #: What each level keeps (units of the reference role, layers, experts), ascending.
    values: np.ndarray
    full: int
    #: make_plan's ratio per level, for layers and experts.
    ratios: np.ndarray | None = None


@dataclass
class _Var:
    dim: int
    #: The kept count per level of its dimension.
    table: np.ndarray
    full: int
    #: The score-weighted equivalent count per level (see the module docs).
    effective: np.ndarray


@dataclass
class _Role:
    var: int
    groups: list[int]
    size: int


@dataclass
class _Space:
    dims: list[_Dim]
    vars: list[_Var]
    roles: list[_Role]
    #: metric -> polynomial: params, active_params, macs (None if not counted), memory (bytes).
    polys: dict[str, Poly | None]
    sizes: dict[int, int]
    tp_size: int = 1
    #: (KV heads dim or None, their count when not searched, heads_per_kv dim): with
    #: tp_size > 1 the query heads, their product, must divide over the ranks.
    query_heads: tuple[int | None, int, int] | None = None
    notes: list[str] = field(default_factory=list)
    scored: bool = False
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    layer_importance: Any = None
    layer_lists: int = 0

    def values(self, levels: np.ndarray, effective: bool = False) -> list[np.ndarray]:
        return [(v.effective if effective else v.table)[levels[:, v.dim]] for v in self.vars]

    def full_values(self) -> list[int]:
        return [v.full for v in self.vars]

    def costs(self, levels: np.ndarray, metrics: Iterable[str]) -> dict[str, np.ndarray]:
        values = self.values(levels)
        return {
            m: _evaluate(self.polys[m], values, len(levels))  # type: ignore[arg-type]
            for m in metrics
        }


def _indices_per_unit(graph: DependencyGraph, group: Any, params: set[str]) -> int:
    """The gcd of the indices one unit spans over the group's parameter members."""
    width = 0
    for (name, _dim), unit_map in graph.unit_maps(group).items():
        if name in params:
            count = int(np.count_nonzero(unit_map >= 0))
            width = math.gcd(width, count // group.size if count % group.size == 0 else 1)
    return width or 1


def _allowed(size: int, step: int, label: str, tp_size: int) -> np.ndarray:
    """Counts a role of ``size`` units may keep: multiples of ``step``, the whole, tp rules."""
    counts = np.union1d(np.arange(step, size + 1, step, dtype=np.int64), [size])
    if tp_size > 1 and label in ("kv_heads", "heads", "neurons"):
        ok = counts % tp_size == 0
        if label == "kv_heads" and size < tp_size:
            ok |= tp_size % counts == 0  # fewer KV heads than ranks: replicated
        counts = counts[ok]
    return counts


def _width_roles(
    graph: DependencyGraph,
    model: nn.Module,
    wanted: frozenset[str],
    ignored: tuple[nn.Module, ...],
    round_to: int | None,
    tp_size: int,
    api: Any,
) -> tuple[list[tuple[str, list[int], int, np.ndarray]], set[int], list[str]]:
    """Searched roles as (dimension label, groups, size, allowed counts), the outermost
    heads groups (every layer's KV heads), and notes."""
    kind_of = {g.index: g.kind for g in graph.groups}
    if not all(kind_of.values()):
        from depprune.kinds import group_kinds

        kind_of = group_kinds(graph, model)
    notes = []
    heads = [g for g in graph.groups if kind_of[g.index] == "heads"]
    inner = api._outermost_factors(graph, heads)
    inner_heads = set(inner)
    outer_heads = set().union(*inner.values()) if inner else set()
    candidates = [g for g in graph.groups if kind_of[g.index] in wanted]
    excluded = set(api._heads_under_a_norm(graph, model, candidates, kind_of))
    if ignored:
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        prefixes = tuple(f"{names[id(m)]}." if names.get(id(m)) else "" for m in ignored)
        excluded |= {
            g.index for g in candidates if any(n.startswith(prefixes) for n, _ in g.members)
        }
    if excluded:
        notes.append(f"{len(excluded)} group(s) kept whole (ignored, or heads under one norm)")
    multiples = api._kernel_multiples(graph, model)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    by_role, _role_of = api._roles(graph)
    candidate_ids = {g.index for g in candidates}
    roles = []
    for groups in by_role.values():
        if not set(groups) <= candidate_ids or set(groups) & excluded:
            continue
        first = graph.groups[groups[0]]
        label = kind_of[first.index]
        if label == "heads":
            label = (
                "heads_per_kv"
                if first.index in inner_heads
                else "kv_heads"
                if first.index in outer_heads
                else "heads"
            )
        step = 1
        if round_to and round_to > 1:
            step = round_to // math.gcd(round_to, _indices_per_unit(graph, first, params))
        step = math.lcm(step, *(multiples.get(g, 1) for g in groups))
        counts = _allowed(first.size, step, label, tp_size)
        if counts.size == 0:
            raise SelectionError(
                f"no count of {label} ({first.size} units, e.g. {first.members[0][0]}) is a "
                f"multiple of {step} and divisible by tp_size={tp_size}; lower tp_size or "
                f"round_to, or leave {kind_of[first.index]!r} out of kinds"
            )
        roles.append((label, sorted(groups), first.size, counts))
    return roles, {g.index for g in heads if g.index not in inner_heads}, notes


def _role_effective(scores: list[torch.Tensor], table: np.ndarray, size: int) -> np.ndarray:
    """``size * S(k)`` per count: S the share of the groups' scores their top k hold."""
    stacked = torch.stack(scores).double().clamp_min(0)
    total = float(stacked.sum())
    if not math.isfinite(total) or total <= 0:
        return table.astype(np.float64)
    top = torch.sort(stacked, dim=1, descending=True).values.cumsum(dim=1).sum(dim=0)
    share = np.concatenate([[0.0], top.numpy() / total])
    return size * share[table]


def _location_finder(paths: Mapping[str, Any]) -> Callable[[str], Any]:
    """A lookup from a module path to the value of the closest listed ancestor (or None)."""
    cache: dict[str, Any] = {}

    def find(module: str) -> Any:
        if module not in cache:
            parts = module.split(".") if module else []
            found = (
                paths[p] for k in range(len(parts), 0, -1) if (p := ".".join(parts[:k])) in paths
            )
            cache[module] = next(found, None)
        return cache[module]

    return find


_aten = torch.ops.aten
_MATMULS = {_aten.mm: (0, 1), _aten.addmm: (1, 2), _aten.bmm: (0, 1), _aten.baddbmm: (1, 2)}
_CONVOLUTIONS = {
    getattr(_aten, name)
    for name in (
        "convolution",
        "_convolution",
        "cudnn_convolution",
        "_slow_conv2d_forward",
        "convolution_overrideable",
    )
    if hasattr(_aten, name)
}
#: Fused attention kernels, q / k / v as [batch, heads, sequence, dim].
_ATTENTION = {
    getattr(_aten, name)
    for name in (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(_aten, name)
}


def _op_macs(
    packet: Any, inputs: tuple, outputs: list, extent: Callable[[int], Poly], transposed: bool
) -> Poly | None:
    """Multiply-accumulates of one recorded call, as FlopCounterMode's formulas count them."""
    axes = [a for a in inputs if isinstance(a, tuple)]
    if packet in _MATMULS:
        left, right = _MATMULS[packet]
        a, b = axes[left], axes[right]
        return _product([*(extent(x) for x in a), extent(b[-1])])
    if packet in _CONVOLUTIONS:
        x, w = axes[0], axes[1]
        out = outputs[0] if outputs and isinstance(outputs[0], tuple) else None
        spatial = (x if transposed or out is None else out)[2:]
        return _product([extent(x[0]), *(extent(a) for a in w), *(extent(a) for a in spatial)])
    if packet in _ATTENTION:
        q, k, v = axes[0], axes[1], axes[2]
        scores = _product([extent(q[0]), extent(q[1]), extent(q[2]), extent(k[2])])
        return _times(scores, _plus(extent(q[3]), extent(v[3])))
    return None


def _caches_keys(model: nn.Module) -> bool:
    """Whether the model keeps a KV cache: a Hugging Face model that generates with use_cache."""
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    try:
        generates = bool(can_generate()) if callable(can_generate) else False
    except Exception:
        generates = False
    return generates and bool(getattr(config, "use_cache", False))


@dataclass
class _Bundle:
    """The cost polynomials of one place of the model (a block, or everything else)."""

    params: Poly = field(default_factory=dict)
    active: Poly = field(default_factory=dict)
    weight_bytes: Poly = field(default_factory=dict)
    kv: Poly = field(default_factory=dict)
    macs: Poly = field(default_factory=dict)

    def add(self, what: str, poly: Poly) -> None:
        setattr(self, what, _plus(getattr(self, what), poly))

    def key(self) -> tuple:
        return tuple(
            tuple(sorted(getattr(self, w).items()))
            for w in ("params", "active", "weight_bytes", "kv", "macs")
        )


def _build_space(
    model: nn.Module,
    example_inputs: Any,
    graph: DependencyGraph,
    *,
    wanted: frozenset[str],
    ignored: tuple[nn.Module, ...],
    round_to: int | None,
    tp_size: int,
    batch: int,
    seq_len: int,
    dtype: torch.dtype | None,
    importance: Any,
    layer_importance: Any,
    expert_importance: Any,
    kv_cache: bool | None,
) -> _Space:
    from depprune import api  # api serves make_plan(target=...) from this module

    roles, outer_heads, notes = _width_roles(graph, model, wanted, ignored, round_to, tp_size, api)
    dims: list[_Dim] = []
    variables: list[_Var] = []
    space_roles: list[_Role] = []
    var_of_group: dict[int, int] = {}
    labels = list(dict.fromkeys(label for label, *_ in roles))
    for label in labels:
        mine = [r for r in roles if r[0] == label]
        reference = max(mine, key=lambda r: r[2])
        dim = len(dims)
        dims.append(_Dim(label, reference[3], reference[2]))
        fractions = reference[3] / reference[2]
        for _, groups, size, counts in mine:
            # A smaller role keeps the smallest count it may that is no smaller a share.
            at = np.searchsorted(counts, fractions * size - 1e-9, side="left")
            table = counts[np.minimum(at, counts.size - 1)]
            var = len(variables)
            variables.append(_Var(dim, table, size, table.astype(np.float64)))
            space_roles.append(_Role(var, groups, size))
            var_of_group.update(dict.fromkeys(groups, var))
    space = _Space(dims, variables, space_roles, {}, {g.index: g.size for g in graph.groups})
    space.notes += notes
    space.tp_size = tp_size
    if tp_size > 1 and "heads_per_kv" in labels:
        kv_dim = labels.index("kv_heads") if "kv_heads" in labels else None
        space.query_heads = (
            kv_dim,
            graph.groups[min(outer_heads)].size,
            labels.index("heads_per_kv"),
        )
    _score_roles(space, graph, model, importance)

    lists = _layer_lists(model, example_inputs) if "layers" in wanted else []
    space.layer_lists = len(lists)
    expert_layers = _expert_layers(model, required="experts" in wanted, notes=space.notes)
    if "experts" in wanted:
        _add_expert_dim(space, expert_layers, expert_importance)
    experts_var = len(space.vars) - 1 if "experts" in wanted else None

    bundles, where = _bundles(
        model,
        graph,
        space,
        var_of_group,
        lists,
        expert_layers,
        experts_var,
        outer_heads,
        dtype,
        kv_cache,
        seq_len,
        batch,
    )
    fixed = bundles.pop(None, _Bundle())
    if lists:
        _add_layer_dim(space, model, example_inputs, lists, bundles, layer_importance, fixed)
    else:
        for bundle in bundles.values():
            for what in ("params", "active", "weight_bytes", "kv", "macs"):
                fixed.add(what, getattr(bundle, what))
    kv_elements = fixed.kv
    tokens_bytes = batch * seq_len * where["kv_bytes"]
    space.polys = {
        "params": fixed.params,
        "active_params": fixed.active,
        "macs": fixed.macs if where["macs_counted"] else None,
        "memory_gb": _plus(
            fixed.weight_bytes, {m: c * tokens_bytes for m, c in kv_elements.items()}
        ),
    }
    original = _evaluate(space.polys["params"], space.full_values(), 1)[0]
    expected = sum(p.numel() for p in model.parameters())
    if int(original) != expected:
        raise InternalError(
            f"the budget's parameter polynomial gives {int(original):,} for the original model, "
            f"which has {expected:,} parameters"
        )
    return space


def _score_roles(space: _Space, graph: DependencyGraph, model: nn.Module, importance: Any) -> None:
    """Score the searched roles' units and fill their variables' effective counts."""
    from depprune.importance import ScoreContext, magnitude, score_groups

    if not space.roles:
        return
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and importance is None:
        space.notes.append(
            "the weights are on the meta device: every unit scores alike, so the widths "
            "shrink most evenly"
        )
        return
    groups = [graph.groups[g] for role in space.roles for g in role.groups]
    try:
        scores = score_groups(
            groups,
            importance or magnitude(2),
            ScoreContext.from_model(graph, model),
            progress=False,
        )
    except ImportanceError as exc:
        if importance is not None:
            raise
        space.notes.append(f"units could not be scored ({exc}); every unit scores alike")
        return
    space.scores = scores
    space.scored = True
    for role in space.roles:
        var = space.vars[role.var]
        var.effective = _role_effective([scores[g] for g in role.groups], var.table, role.size)


def _layer_lists(model: nn.Module, example_inputs: Any) -> list:
    try:
        from depprune import depth
    except ImportError as exc:
        raise SelectionError(
            f"kinds asks for 'layers', but depprune.depth cannot be imported ({exc})"
        ) from None
    lists = [entry for entry in depth.find_layer_lists(model, example_inputs) if entry.removable]
    if not lists:
        raise SelectionError(
            f"kinds asks for 'layers', but {type(model).__name__} has no list of repeated "
            "blocks whose input and output agree; leave 'layers' out of kinds"
        )
    return lists


def _expert_layers(model: nn.Module, *, required: bool, notes: list[str]) -> list:
    try:
        from depprune import experts
    except ImportError as exc:
        if required:
            raise SelectionError(
                f"kinds asks for 'experts', but depprune.experts cannot be imported ({exc})"
            ) from None
        return []
    try:
        found = experts.find_expert_layers(model)
    except DeppruneError as exc:
        if required:
            raise
        notes.append(f"experts were not recognised ({exc}); active_params counts every weight")
        return []
    if required and not found:
        raise SelectionError(
            f"kinds asks for 'experts', but {type(model).__name__} has no mixture-of-experts "
            "layer (a router and its experts); leave 'experts' out of kinds"
        )
    return found


def _add_expert_dim(space: _Space, layers: list, expert_importance: Any) -> None:
    sizes = sorted({x.num_experts for x in layers})
    if len(sizes) > 1:
        raise SelectionError(
            f"the MoE layers have {sizes} experts, but make_plan keeps one count in every "
            "layer; leave 'experts' out of kinds"
        )
    size = sizes[0]
    floor = max(max(x.min_experts, x.top_k or 1) for x in layers)
    step = math.lcm(*(x.groups or 1 for x in layers))
    counts = np.arange(1, size + 1, dtype=np.int64)
    counts = counts[(counts >= floor) & ((counts % step == 0) | (counts == size))]
    effective = counts.astype(np.float64)
    if expert_importance is not None:
        given = getattr(expert_importance, "scores", expert_importance)
        shares = []
        for layer in layers:
            s = torch.as_tensor(given[layer.name]).double().clamp_min(0)
            total = float(s.sum())
            if total > 0:
                top = torch.sort(s, descending=True).values.cumsum(0).numpy() / total
                shares.append(np.concatenate([[0.0], top])[counts])
        if shares:
            effective = size * np.mean(shares, axis=0)
    dim = len(space.dims)
    space.dims.append(_Dim("experts", counts, size, ratios=(size - counts) / size))
    space.vars.append(_Var(dim, counts, size, effective))


def _bundles(
    model: nn.Module,
    graph: DependencyGraph,
    space: _Space,
    var_of_group: Mapping[int, int],
    lists: list,
    expert_layers: list,
    experts_var: int | None,
    outer_heads: set[int],
    dtype: torch.dtype | None,
    kv_cache: bool | None,
    seq_len: int,
    batch: int,
) -> tuple[dict[Any, _Bundle], dict[str, Any]]:
    """Cost polynomials per removable block (``(list, position)``), ``None`` for the rest."""
    sizes = space.sizes

    def leaf(group: int, size: int) -> Poly:
        var = var_of_group.get(group)
        if var is None:
            return _const(size)
        if size != sizes[group]:
            raise InternalError(f"an atom of group {group} has {size} units, not {sizes[group]}")
        return {(var,): 1}

    parsed: dict[str, Poly] = {}

    def poly_of(text: str) -> Poly:
        if text not in parsed:
            parsed[text] = _structure_poly(text, leaf)
        return parsed[text]

    def dim_poly(name: str, dim: int, size: int) -> Poly:
        try:
            return poly_of(graph.describe(name, dim))
        except DeppruneError:
            return _const(size)  # not traced: it keeps its size

    blocks = {entry.child_path(i): (k, i) for k, entry in enumerate(lists) for i in entry.removable}
    block_of = _location_finder(blocks)
    expert_dims = {(n, d): x for x in expert_layers for n, d in x.tensors}
    fused = {path: x for x in expert_layers for path in x.experts}
    fused_of = _location_finder(fused)
    children = {
        f"{path}.{i}": (x, i, f"{path}.{i}.")
        for x in expert_layers
        for path in x.children
        for i in range(x.num_experts)
    }
    child_of = _location_finder(children)
    experts_poly = {(experts_var,): 1} if experts_var is not None else None

    def expert_count(layer: Any) -> Poly:
        return experts_poly or _const(layer.num_experts)

    entries = []
    per_child: dict[tuple, dict[str, Poly]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        module = name.rpartition(".")[0]
        polys, active = [], []
        for d, size in enumerate(p.shape):
            poly = dim_poly(name, d, size)
            layer = expert_dims.get((name, d))
            if layer is not None and experts_poly is not None:
                if poly != _const(layer.num_experts):
                    raise SelectionError(
                        f"{name}[{d}] holds one entry per expert but is also cut as a width; "
                        "leave 'experts' out of kinds"
                    )
                poly = experts_poly
            polys.append(poly)
            # A token runs top_k of the experts: their dim counts top_k, the router all.
            is_fused = layer is not None and fused_of(module) is not None
            active.append(_const(layer.top_k or size) if is_fused else poly)
        params = _product(polys)
        owner = child_of(module)
        if owner is not None:
            per_child.setdefault(owner[:2], {})[name.removeprefix(owner[2])] = params
        entries.append((module, p, params, _product(active), owner))
    # Experts in a list that are all alike count as expert 0 times the experts kept.
    alike = {
        x.name
        for x in expert_layers
        if all(per_child.get((x, i)) == per_child.get((x, 0)) for i in range(1, x.num_experts))
    }
    for x in expert_layers:
        if x.children and x.name not in alike and experts_poly is not None:
            raise SelectionError(
                f"the experts of {x.name} differ in shape, so their count alone does not give "
                "the cost; leave 'experts' out of kinds"
            )
    bundles: dict[Any, _Bundle] = {}
    for module, p, params, active_poly, owner in entries:
        if owner is not None and owner[0].name in alike:
            layer, i, _ = owner
            if i:
                continue
            params = _times(params, expert_count(layer))
            active_poly = _times(active_poly, _const(layer.top_k or layer.num_experts))
        bundle = bundles.setdefault(block_of(module), _Bundle())
        bundle.add("params", params)
        bundle.add("active", active_poly)
        bundle.add("weight_bytes", {m: c * (dtype or p.dtype).itemsize for m, c in params.items()})

    where = {"kv_bytes": (dtype or torch.get_default_dtype()).itemsize, "macs_counted": False}

    def alike_expert(module: str) -> Any:
        owner = child_of(module)
        return owner if owner is not None and owner[0].name in alike else None

    _add_macs(
        model, graph, bundles, block_of, alike_expert, expert_count, poly_of, space.notes, where
    )
    caches = _caches_keys(model) if kv_cache is None else kv_cache
    if caches and seq_len and batch:
        _add_kv(model, graph, bundles, block_of, outer_heads, dim_poly, dtype, space.notes, where)
    return bundles, where


def _add_macs(
    model: nn.Module,
    graph: DependencyGraph,
    bundles: dict[Any, _Bundle],
    block_of: Callable[[str], Any],
    alike_expert: Callable[[str], Any],
    expert_count: Callable[[Any], Poly],
    poly_of: Callable[[str], Poly],
    notes: list[str],
    where: dict[str, Any],
) -> None:
    """Every matmul, convolution and attention call of the trace, in its block's bundle.

    Experts in a list that are alike run alike on meta (every one takes every routed
    token): expert 0's calls count once per expert kept.
    """
    from torch.utils.flop_counter import flop_registry

    recording = getattr(graph, "recording", None)
    log = getattr(recording, "log", None)
    if log is None:
        notes.append("the graph has no recorded trace, so MACs are not counted")
        return
    analysis = graph._analysis
    extents: dict[int, Poly] = {}

    def extent(axis: int) -> Poly:
        if axis not in extents:
            extents[axis] = poly_of(analysis.describe_axis(axis))
        return extents[axis]

    modules = dict(model.named_modules())
    left_out: dict[str, int] = {}
    for op, func in enumerate(log.funcs):
        packet = func.overloadpacket
        if packet not in flop_registry:
            continue
        module = log.module_names[log.modules[op]]
        owner = alike_expert(module)
        if owner is not None and owner[1]:
            continue  # experts in a list: counted as expert 0's calls x the experts kept
        transposed = isinstance(modules.get(module), nn.modules.conv._ConvTransposeNd)
        macs = _op_macs(packet, log.inputs[op], log.outputs[op], extent, transposed)
        if macs is None:
            left_out[str(packet)] = left_out.get(str(packet), 0) + 1
            continue
        if owner is not None:
            macs = _times(macs, expert_count(owner[0]))
        bundles.setdefault(block_of(module), _Bundle()).add("macs", macs)
    where["macs_counted"] = True
    if left_out:
        ops = ", ".join(f"{op} x{n}" for op, n in left_out.items())
        notes.append(f"MACs leave out calls the budget has no formula for: {ops}")


def _add_kv(
    model: nn.Module,
    graph: DependencyGraph,
    bundles: dict[Any, _Bundle],
    block_of: Callable[[str], Any],
    outer_heads: set[int],
    dim_poly: Callable[[str, int, int], Poly],
    dtype: torch.dtype | None,
    notes: list[str],
    where: dict[str, Any],
) -> None:
    """Per attention layer, a key and a value as wide as its narrowest head projection."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    found = False
    for index in sorted(outer_heads):
        group = graph.groups[index]
        widths = [
            (int(np.count_nonzero(unit_map >= 0)), name, dim)
            for (name, dim), unit_map in graph.unit_maps(group).items()
            if name in tensors and tensors[name].dim() >= 2
        ]
        if not widths:
            continue
        _, name, dim = min(widths, key=lambda w: w[0])
        param = tensors[name]
        poly = dim_poly(name, dim, param.shape[dim])
        module = name.rpartition(".")[0]
        bundles.setdefault(block_of(module), _Bundle()).add(
            "kv", {m: 2 * c for m, c in poly.items()}
        )
        where["kv_bytes"] = (dtype or param.dtype).itemsize
        found = True
    if found:
        return
    config = getattr(model, "config", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(
        config, "num_attention_heads", None
    )
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (
        hidden // getattr(config, "num_attention_heads", 1) if hidden else None
    )
    if not (heads and layers and head_dim):
        notes.append("no attention heads found in the graph or the config: no KV cache counted")
        return
    bundles.setdefault(None, _Bundle()).add("kv", _const(2 * layers * heads * head_dim))
    first = next(iter(tensors.values()), None)
    where["kv_bytes"] = (dtype or (first.dtype if first is not None else torch.float32)).itemsize
    notes.append("the KV cache is read from the config (its heads are not pruned)")


def _add_layer_dim(
    space: _Space,
    model: nn.Module,
    example_inputs: Any,
    lists: list,
    bundles: dict[Any, _Bundle],
    layer_importance: Any,
    fixed: _Bundle,
) -> None:
    """The layers dimension (one ratio for every list, as make_plan takes it) and a
    variable per kind of block: blocks of one list with the same costs are one kind."""
    from depprune import depth

    kinds: dict[tuple, tuple[_Bundle, list[tuple[int, int]]]] = {}
    for k, entry in enumerate(lists):
        for i in entry.removable:
            bundle = bundles.get((k, i), _Bundle())
            kinds.setdefault((k, bundle.key()), (bundle, []))[1].append((k, i))
    importance = layer_importance
    if importance is None and len(kinds) > len(lists):
        # Which blocks go changes the cost: rank them as make_plan would.
        if any(p.is_meta for p in model.parameters()):
            raise SelectionError(
                "the removable blocks differ in size, so which ones go changes the cost, and "
                "ranking them needs real weights; pass layer_importance="
                "depprune.depth.given_layers(...) or depprune.depth.block_influence(...)"
            )
        importance = depth.block_influence(model, [example_inputs], lists=lists, progress=False)
        space.layer_importance = importance
    if getattr(importance, "exact", False):
        amounts = [0.0]  # given layers: exactly those go
    else:
        amounts = sorted({j / len(e.removable) for e in lists for j in range(len(e.removable))})
    levels: dict[tuple, tuple[float, list[np.ndarray]]] = {}
    for amount in amounts:
        if importance is not None:
            chosen = depth.choose_layers(lists, importance, amount)
        else:
            chosen = {}  # blocks of a list alike: any of them, the first ones here
            for entry in lists:
                count = min(math.floor(amount * len(entry.removable) + 0.5), entry.size - 1)
                chosen[entry.name] = np.setdiff1d(np.arange(entry.size), entry.removable[:count])
        kept = [np.isin(np.arange(e.size), chosen.get(e.name, np.arange(e.size))) for e in lists]
        levels.setdefault(tuple(np.concatenate(kept).tolist()), (amount, kept))
    # From the fewest blocks kept to all of them: every cost grows with the level.
    ordered = sorted(levels.values(), key=lambda level: sum(int(m.sum()) for m in level[1]))
    dim = len(space.dims)
    space.dims.append(
        _Dim(
            "layers",
            np.array([sum(int(m.sum()) for m in kept) for _, kept in ordered], dtype=np.int64),
            sum(e.size for e in lists),
            ratios=np.array([amount for amount, _ in ordered]),
        )
    )
    scores = getattr(importance, "scores", None)
    for bundle, members in kinds.values():
        lists_of, positions = (np.array(v, dtype=np.int64) for v in zip(*members, strict=True))
        present = np.array(
            [
                [kept[li][i] for li, i in zip(lists_of, positions, strict=True)]
                for _, kept in ordered
            ]
        )
        table = present.sum(axis=1).astype(np.int64)
        effective = table.astype(np.float64)
        if scores is not None:
            values = np.array(
                [float(scores[lists[li].name][i]) for li, i in members], dtype=np.float64
            )
            values = np.where(np.isfinite(values), np.maximum(values, 0.0), 0.0)
            if values.sum() > 0:
                effective = len(members) * (present @ values) / values.sum()
        var = len(space.vars)
        space.vars.append(_Var(dim, table, len(members), effective))
        for what in ("params", "active", "weight_bytes", "kv", "macs"):
            fixed.add(what, _times(getattr(bundle, what), {(var,): 1}))


# ---------------------------------------------------------------------------------------
# Targets


def _targets(target: Any, original: Mapping[str, float | None]) -> dict[str, float]:
    if not isinstance(target, Mapping) or not target:
        raise SelectionError(
            f"target must map a budget to its bound, e.g. {{'params': 4e9}} or "
            f"{{'memory_gb': 16}}; got {target!r}"
        )
    resolved = {}
    for key, value in target.items():
        if key not in METRICS:
            raise SelectionError(
                f"target names {key!r}; a budget is one of {', '.join(METRICS)} "
                "(e.g. target={'params': 4e9})"
            )
        if original.get(key) is None:
            raise SelectionError(
                f"the {key} of this model cannot be counted (no recorded trace, or no "
                "matmul or convolution in it); use params or memory_gb"
            )
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d*)?\s*%\s*", value):
            bound = float(value.strip().rstrip("%")) / 100 * float(original[key])  # type: ignore[arg-type]
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, bool
        ):
            bound = float(value)
        else:
            raise SelectionError(
                f"the {key} target is {value!r}; give a number (an absolute count, GB for "
                "memory_gb) or a percentage of the original such as '50%'"
            )
        if not math.isfinite(bound) or bound <= 0:
            raise SelectionError(
                f"the {key} target is {value!r}; give a positive number (an absolute count, "
                "GB for memory_gb) or a percentage of the original such as '50%'"
            )
        resolved[key] = bound
    return resolved


# ---------------------------------------------------------------------------------------
# The grid


@dataclass
class _Rows:
    levels: np.ndarray  # rows x dims, the level of every dimension
    costs: dict[str, np.ndarray]
    retained: np.ndarray
    evenness: np.ndarray
    free: int | None
    free_positions: np.ndarray
    feasible: int
    notes: list[str]


def _bounds(targets: Mapping[str, float]) -> dict[str, float]:
    """Targets in the polynomials' units (memory in bytes)."""
    return {m: v * 1e9 if m == "memory_gb" else v for m, v in targets.items()}


def _fits(space: _Space, levels: np.ndarray, bounds: Mapping[str, float]) -> np.ndarray:
    costs = space.costs(levels, bounds)
    ok = np.ones(len(levels), dtype=bool)
    for metric, bound in bounds.items():
        ok &= costs[metric] <= bound
    return ok


def _bisection_test(
    space: _Space, levels: np.ndarray, free: int, bounds: Mapping[str, float]
) -> Callable[[np.ndarray], np.ndarray]:
    """Whether each row fits at given levels of the bisected dimension: every polynomial
    split by its monomials' part in that dimension's variables, the rest summed once."""
    mine = {v for v, var in enumerate(space.vars) if var.dim == free}
    values = space.values(levels)
    parts = {}
    for metric in bounds:
        split: dict[tuple, Poly] = {}
        for mono, coef in space.polys[metric].items():  # type: ignore[union-attr]
            inside = tuple(v for v in mono if v in mine)
            rest = tuple(v for v in mono if v not in mine)
            split.setdefault(inside, {})[rest] = split.get(inside, {}).get(rest, 0) + coef
        parts[metric] = [(i, _evaluate(p, values, len(levels))) for i, p in split.items()]

    def fits(at: np.ndarray) -> np.ndarray:
        ok = np.ones(len(levels), dtype=bool)
        for metric, bound in bounds.items():
            total = np.zeros(len(levels), dtype=np.int64)
            for inside, rest in parts[metric]:
                term = rest
                for v in inside:
                    term = term * space.vars[v].table[at]
                total += term
            ok &= total <= bound
        return ok

    return fits


def _solve(space: _Space, targets: Mapping[str, float], excluded: Mapping[int, set[int]]) -> _Rows:
    bounds = _bounds(targets)
    notes: list[str] = []
    positions = [
        np.array([i for i in range(len(d.values)) if i not in excluded.get(k, ())], np.int64)
        for k, d in enumerate(space.dims)
    ]
    coupled = set() if space.query_heads is None else {space.query_heads[0], space.query_heads[2]}
    choices = [k for k in range(len(space.dims)) if k not in coupled]
    free = max(choices, key=lambda k: len(positions[k])) if choices else None
    others = [k for k in range(len(space.dims)) if k != free]
    while math.prod(len(positions[k]) for k in others) > _MAX_ROWS:
        widest = max(others, key=lambda k: len(positions[k]))
        kept = positions[widest]
        positions[widest] = np.union1d(kept[::2], kept[-1:])
        notes.append(
            f"{space.dims[widest].label} thinned to {len(positions[widest])} levels "
            f"(over {_MAX_ROWS:,} combinations)"
        )
    grids = np.meshgrid(*(positions[k] for k in others), indexing="ij") if others else []
    count = grids[0].size if others else 1
    levels = np.zeros((count, len(space.dims)), dtype=np.int64)
    for k, grid in zip(others, grids, strict=True):
        levels[:, k] = grid.reshape(-1)
    if space.query_heads is not None:
        kv_dim, kv_constant, per_kv_dim = space.query_heads
        kv = space.dims[kv_dim].values[levels[:, kv_dim]] if kv_dim is not None else kv_constant
        queries = kv * space.dims[per_kv_dim].values[levels[:, per_kv_dim]]
        levels = levels[queries % space.tp_size == 0]
    free_positions = positions[free] if free is not None else np.zeros(0, np.int64)
    if free is not None and free_positions.size:
        fits = _bisection_test(space, levels, free, bounds)
        lo = np.full(len(levels), -1, dtype=np.int64)
        hi = np.full(len(levels), free_positions.size - 1, dtype=np.int64)
        while np.any(lo < hi):
            mid = (lo + hi + 1) // 2
            ok = fits(free_positions[np.maximum(mid, 0)]) & (mid >= 0)
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid - 1)
        keep = lo >= 0
        levels = levels[keep]
        levels[:, free] = free_positions[lo[keep]]
    else:
        levels = levels[_fits(space, levels, bounds)]
    costs = space.costs(levels, [m for m, p in space.polys.items() if p is not None])
    full_params = float(_evaluate(space.polys["params"], space.full_values(), 1)[0])
    effective = space.values(levels, effective=True)
    retained = _evaluate(space.polys["params"], effective, len(levels), np.float64) / full_params
    fractions = [d.values[levels[:, k]] / d.full for k, d in enumerate(space.dims)]
    evenness = np.min(fractions, axis=0) if fractions else np.ones(len(levels))
    return _Rows(levels, costs, retained, evenness, free, free_positions, len(levels), notes)


def _ranked(rows: _Rows, space: _Space, rank: str, primary: str) -> np.ndarray:
    """Row order, best first (np.lexsort sorts by its last key first)."""
    cost = rows.costs[primary].astype(np.float64)
    if rank == "cost":
        return np.lexsort((-rows.retained, -cost))
    if space.scored:
        return np.lexsort((-cost, -rows.retained))
    return np.lexsort((-cost, -rows.retained, -rows.evenness))


def _unreachable(
    space: _Space, targets: Mapping[str, float], excluded: Mapping[int, set[int]]
) -> SelectionError:
    """The error for a target no candidate meets: the smallest one left, and what the
    replay took out of the grid."""
    levels = np.array(
        [
            [
                min(set(range(len(d.values))) - excluded.get(k, set()))
                for k, d in enumerate(space.dims)
            ]
        ]
    )
    costs = space.costs(levels, targets)
    smallest = "; ".join(
        f"{m} {_format_cost(m, float(costs[m][0]) / (1e9 if m == 'memory_gb' else 1))}"
        for m in targets
    )
    widths = ", ".join(f"{d.label} {int(d.values[levels[0, k]])}" for k, d in enumerate(space.dims))
    bounds = "; ".join(f"{m} <= {_format_cost(m, v)}" for m, v in targets.items())
    refuted = [
        f"{space.dims[k].label} {int(space.dims[k].values[level])}"
        for k, levels_out in excluded.items()
        for level in sorted(levels_out)
    ]
    after = f" once the replay refuted {', '.join(refuted)}" if refuted else ""
    return SelectionError(
        f"no candidate meets {bounds}: the smallest has {smallest} ({widths}){after}; add "
        "kinds (e.g. 'layers'), lower round_to or tp_size, or raise the target"
    )


# ---------------------------------------------------------------------------------------
# Candidates, proof and the public search


def _keep_units(space: _Space, levels: np.ndarray) -> dict[int, int]:
    """Units every group keeps at one row's levels (groups not searched: all)."""
    keep_units = dict(space.sizes)
    for role in space.roles:
        var = space.vars[role.var]
        keep_units.update(dict.fromkeys(role.groups, int(var.table[levels[var.dim]])))
    return keep_units


def _candidate_widths(space: _Space, levels: Sequence[int], full: bool = False) -> dict[str, int]:
    """What each dimension keeps at ``levels`` (``full``: in the original model)."""
    widths = {
        dim.label: int(dim.full if full else dim.values[levels[k]])
        for k, dim in enumerate(space.dims)
    }
    if "kv_heads" in widths and "heads_per_kv" in widths:
        widths["query_heads"] = widths["kv_heads"] * widths["heads_per_kv"]
    return widths


def _candidate(space: _Space, rows: _Rows, row: int) -> BudgetCandidate:
    levels = rows.levels[row]
    widths = _candidate_widths(space, levels)
    ratios = {
        dim.label: float(dim.ratios[levels[k]])
        for k, dim in enumerate(space.dims)
        if dim.ratios is not None
    }
    costs: dict[str, float | None] = dict.fromkeys(METRICS)
    for metric, values in rows.costs.items():
        costs[metric] = int(values[row]) / 1e9 if metric == "memory_gb" else int(values[row])
    return BudgetCandidate(
        widths, _keep_units(space, levels), ratios, costs, float(rows.retained[row])
    )


def _replayed(
    model: nn.Module, graph: DependencyGraph, space: _Space, levels: np.ndarray, cache: dict
) -> str | None:
    """The replay's divergence for the widths at ``levels`` (None: proved), cached."""
    from depprune.selection import lowest
    from depprune.verify import replay_plan

    key = tuple(levels.tolist())
    if key not in cache:
        removed = {}
        for g, kept in _keep_units(space, levels).items():
            size = space.sizes[g]
            if kept < size:
                # The units make_plan removes: its scores' lowest (any, unscored).
                removed[g] = lowest(space.scores.get(g, torch.zeros(size)), size - kept)
        divergence = None
        if removed:
            keep = graph.keep_mask(removed)
            divergence = replay_plan(
                model,
                graph,
                keep,
                graph.kept_indices(keep),
                exact_config=hasattr(getattr(model, "config", None), "to_dict"),
            )
        cache[key] = None if divergence is None else str(divergence)
    return cache[key]


def _refuted(
    model: nn.Module,
    graph: DependencyGraph,
    space: _Space,
    levels: np.ndarray,
    cache: dict,
    valid: Callable[[np.ndarray], bool],
) -> tuple[list[tuple[int, int, str]], str | None]:
    """The divergence of a row's widths, and the first (dimension, level, why) that
    causes it alone (tried where the config check passes: alone, a width may not
    divide by the whole of another); layers and experts are left whole: make_plan
    proves them."""
    full = np.array([len(d.values) - 1 for d in space.dims], dtype=np.int64)
    levels = np.where([d.ratios is None for d in space.dims], levels, full)
    divergence = _replayed(model, graph, space, levels, cache)
    if divergence is None:
        return [], None
    # Head counts are what code branches on most: try them first, stop at the first culprit.
    heads = ("kv_heads", "heads_per_kv", "heads", "head_dim", "conv_groups")
    cut = [k for k, d in enumerate(space.dims) if d.ratios is None and levels[k] != full[k]]
    for k in sorted(cut, key=lambda k: space.dims[k].label not in heads):
        alone = full.copy()
        alone[k] = levels[k]
        if not valid(alone):
            continue
        why = _replayed(model, graph, space, alone, cache)
        if why is not None:
            return [(k, int(levels[k]), why if len(why) < 240 else why[:237] + "...")], divergence
    return [], divergence


class _ConfigCheck:
    """Whether a row's Hugging Face config would validate (transformers 5 checks, e.g.,
    that the hidden size divides by the heads): a cheap filter before the replay.

    Layer and expert counts follow the fields the apply stage sets for them
    (``num_hidden_layers``-like names, ``*experts`` counts). Any other integer
    field is taken to follow the width (a dimension, or the query heads: KV
    heads x heads per KV head) whose original value it alone equals, as the
    apply stage infers fields by value; a field equal to several is left as it
    is, for the replay to prove.
    """

    def __init__(self, model: nn.Module, space: _Space, lists: int) -> None:
        from depprune.apply.containers import _COUNT

        try:
            from depprune.experts import _counts_experts
        except ImportError:  # no experts module: no field counts experts

            def _counts_experts(key: str) -> bool:
                return False

        self.config = getattr(model, "config", None)
        self.space = space
        self.fields: dict[str, tuple[int, ...]] = {}
        self.seen: dict[tuple, bool] = {}
        if not hasattr(self.config, "to_dict"):
            return
        labels = [d.label for d in space.dims]
        widths = {(k,): int(d.full) for k, d in enumerate(space.dims) if d.ratios is None}
        if "kv_heads" in labels and "heads_per_kv" in labels:
            pair = (labels.index("kv_heads"), labels.index("heads_per_kv"))
            widths[pair] = math.prod(int(space.dims[k].full) for k in pair)
        structural = {}
        if "layers" in labels and lists == 1:  # one list: its count is a config field
            structural["layers"] = labels.index("layers")
        if "experts" in labels:
            structural["experts"] = labels.index("experts")
        for key, value in vars(self.config).items():
            if key.startswith("_") or type(value) is not int:
                continue
            counted = "layers" if _COUNT.match(key) else "experts" if _counts_experts(key) else None
            if counted is not None:
                if counted in structural and space.dims[structural[counted]].full == value:
                    self.fields[key] = (structural[counted],)
                continue
            matches = [q for q, full in widths.items() if full == value]
            if len(matches) == 1:
                self.fields[key] = matches[0]
        self.base = self.config.to_dict()
        if self.fields and not self(np.array([len(d.values) - 1 for d in space.dims])):
            self.fields = {}  # the original does not pass: the mapping is not to be trusted

    def __call__(self, levels: np.ndarray) -> bool:
        if not self.fields:
            return True
        values = {
            key: math.prod(int(self.space.dims[k].values[levels[k]]) for k in dims)
            for key, dims in self.fields.items()
        }
        key = tuple(values.items())
        if key not in self.seen:
            try:
                type(self.config)(**(self.base | values))
                self.seen[key] = True
            except Exception:
                self.seen[key] = False
        return self.seen[key]


def _kinds_searched(space: _Space) -> tuple[str, ...]:
    heads = ("kv_heads", "heads_per_kv")
    kinds = ["heads" if d.label in heads else d.label for d in space.dims]
    return tuple(dict.fromkeys(kinds))


def _scored_by(
    model: nn.Module,
    graph: DependencyGraph,
    candidate: BudgetCandidate,
    kinds: tuple[str, ...],
    score_fn: Callable[..., float],
    calibration: Iterable[Any] | None,
    importance: Any,
    layer_importance: Any,
    expert_importance: Any,
) -> float:
    """``score_fn`` of the candidate's plan applied to a deep copy of the model."""
    from depprune.api import make_plan

    plan = make_plan(
        model,
        graph=graph,
        keep_units=candidate.keep_units,
        exact_keep_units=True,
        kinds=kinds,
        ratios=candidate.ratios or None,
        importance=importance,
        layer_importance=layer_importance,
        expert_importance=expert_importance,
        progress=False,
    )
    pruned = copy.deepcopy(model)
    plan.apply(pruned)
    if calibration is None:
        return float(score_fn(pruned))
    values = [float(score_fn(pruned, batch)) for batch in calibration]
    if not values:
        raise SelectionError("calibration holds no batch to score the candidates on")
    return sum(values) / len(values)


def _check_arguments(
    tp_size: Any, batch: Any, seq_len: Any, round_to: Any, top: Any, rank: Any, kinds: Any
) -> frozenset[str]:
    for name, value, least in (("tp_size", tp_size, 1), ("batch", batch, 0), ("top", top, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SelectionError(f"{name} is {value!r}; it must be an integer >= {least}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise SelectionError(
            f"seq_len is {seq_len!r}; it must be the number of cached tokens (0 for weights only)"
        )
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise SelectionError(f"round_to is {round_to!r}; it must be a positive width")
    if rank not in _RANKS:
        raise SelectionError(f"rank is {rank!r}; choose one of {', '.join(_RANKS)}")
    if kinds is None:
        return frozenset(DEFAULT_KINDS)
    known = KINDS + _STRUCTURAL
    names = (kinds,) if isinstance(kinds, str) else kinds
    wanted = frozenset(names) if isinstance(names, Iterable) else frozenset()
    unknown = sorted(map(str, wanted - set(known)))
    if not wanted or unknown:
        problem = f"holds unknown kinds {unknown}" if unknown else "is empty"
        raise SelectionError(f"kinds {kinds!r} {problem}; choose from {', '.join(known)}")
    return wanted


def search(
    model: nn.Module,
    example_inputs: Any,
    target: Mapping[str, float | str],
    *,
    graph: DependencyGraph | None = None,
    importance: Any = None,
    kinds: Iterable[str] | None = None,
    round_to: int | None = None,
    tp_size: int = 1,
    batch: int = 1,
    seq_len: int = 4096,
    dtype: torch.dtype | None = None,
    top: int = 5,
    score_fn: Callable[..., float] | None = None,
    calibration: Iterable[Any] | None = None,
    rank: str = "importance",
    ignored: Iterable[nn.Module] = (),
    layer_importance: Any = None,
    expert_importance: Any = None,
    kv_cache: bool | None = None,
    verify: bool = True,
) -> BudgetResult:
    """The uniform widths (and layer / expert counts) that meet ``target``, best first.

    ``target`` maps ``"params"``, ``"active_params"``, ``"macs"`` or
    ``"memory_gb"`` to an absolute bound or a percentage string (``"50%"``);
    see the module docs for what each counts, the candidates, the ranking
    and the proof. ``kinds`` (default :data:`DEFAULT_KINDS`) may add
    ``"head_dim"``, ``"conv_groups"``, ``"layers"`` and ``"experts"``;
    ``round_to`` makes every kept width a multiple of it, ``tp_size`` makes
    heads and neurons divide over that many ranks. ``memory_gb`` counts
    ``batch`` x ``seq_len`` cached tokens (``kv_cache`` overrides whether the
    model caches; ``dtype`` the weights' and cache's dtype). ``graph`` reuses
    a :func:`depprune.trace` of the model; ``importance``, ``ignored``,
    ``layer_importance`` and ``expert_importance`` are make_plan's;
    ``verify=False`` skips the replay. The model is not changed.

    Raises :class:`SelectionError` for an unknown target, a bound that is not
    positive, or one that even the smallest candidate exceeds.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> result = search(model, torch.zeros(2, 16), {"params": 600, "macs": "60%"}, round_to=8)
    >>> result.chosen.widths, result.chosen.costs["params"], result.chosen.costs["macs"]
    ({'neurons': 24}, 508, 960)
    >>> search(model, torch.zeros(2, 16), {"params": 20})
    Traceback (most recent call last):
    ...
    depprune.errors.SelectionError: no candidate meets params <= 20: the smallest has params 25 \
(neurons 1); add kinds (e.g. 'layers'), lower round_to or tp_size, or raise the target
    """
    from depprune import api  # api serves make_plan(target=...) from this module

    started = time.perf_counter()
    wanted = _check_arguments(tp_size, batch, seq_len, round_to, top, rank, kinds)
    # Unknown or malformed targets fail before the trace.
    _targets(target, dict.fromkeys(METRICS, 1.0))
    ignored = api._ignored_modules(ignored)
    if graph is None:
        if example_inputs is None:
            raise SelectionError("search needs example_inputs to trace the model, or a graph")
        graph = api.trace(model, example_inputs, ignored=ignored)
    if example_inputs is None:
        example_inputs = graph.example_inputs
    space = _build_space(
        model,
        example_inputs,
        graph,
        wanted=wanted,
        ignored=ignored,
        round_to=round_to,
        tp_size=tp_size,
        batch=batch,
        seq_len=seq_len,
        dtype=dtype,
        importance=importance,
        layer_importance=layer_importance,
        expert_importance=expert_importance,
        kv_cache=kv_cache,
    )
    if not space.dims:
        raise SelectionError(
            f"kinds {sorted(wanted)} find nothing to prune in {type(model).__name__}; "
            f"choose from {', '.join(KINDS + _STRUCTURAL)}"
        )
    original: dict[str, float | None] = {}
    for metric, poly in space.polys.items():
        value = None if poly is None else int(_evaluate(poly, space.full_values(), 1)[0])
        original[metric] = value / 1e9 if metric == "memory_gb" and value is not None else value
    targets = _targets(target, original)
    primary = next(iter(targets))
    excluded: dict[int, set[int]] = {}
    refuted_rows: set[tuple] = set()
    cache: dict = {}
    notes = list(space.notes)
    valid = _ConfigCheck(model, space, space.layer_lists) if verify else (lambda levels: True)
    can_replay = verify and getattr(graph, "recording", None) is not None
    while True:
        rows = _solve(space, targets, excluded)
        if rows.feasible == 0:
            raise _unreachable(space, targets, excluded)
        order = (
            int(r)
            for r in _ranked(rows, space, rank, primary)
            if tuple(rows.levels[r].tolist()) not in refuted_rows and valid(rows.levels[r])
        )
        best = next(order, None)
        if best is None:
            raise SelectionError(
                "every candidate that meets the target is refuted (its config would not "
                "validate, or the replay diverges); pass verify=False to search without the "
                "proof, or choose other kinds"
            )
        if not can_replay:
            break
        culprits, divergence = _refuted(model, graph, space, rows.levels[best], cache, valid)
        if divergence is None:
            break
        if len(cache) >= _MAX_REPLAYS:
            raise SelectionError(
                f"the replay refutes the candidates tried ({divergence}); pass verify=False to "
                "search without it, or choose other kinds"
            )
        for k, level, why in culprits:
            excluded.setdefault(k, set()).add(level)
            dim = space.dims[k]
            notes.append(f"{dim.label} {int(dim.values[level])} refuted by the replay: {why}")
        if not culprits:
            refuted_rows.add(tuple(rows.levels[best].tolist()))
    picked: list[int] = []
    seen: set[tuple] = set()
    structural = [k for k, d in enumerate(space.dims) if d.ratios is not None]
    for r in itertools.chain([best], order):
        key = tuple(sorted(_keep_units(space, rows.levels[r]).items()))
        key += tuple(rows.levels[r][structural].tolist())
        if key not in seen:
            seen.add(key)
            picked.append(r)
        if len(picked) == top:
            break
    kinds_searched = _kinds_searched(space)
    candidates = [_candidate(space, rows, r) for r in picked]
    if score_fn is not None:
        for candidate in candidates:
            candidate.score = _scored_by(
                model,
                graph,
                candidate,
                kinds_searched,
                score_fn,
                calibration,
                importance,
                layer_importance if layer_importance is not None else space.layer_importance,
                expert_importance,
            )
        ranking = sorted(range(len(candidates)), key=lambda k: -candidates[k].score)  # type: ignore[operator]
        candidates = [candidates[k] for k in ranking]
        picked = [picked[k] for k in ranking]
    return BudgetResult(
        target=targets,
        original=original,
        chosen=candidates[0],
        candidates=candidates,
        kinds=kinds_searched,
        levels={d.label: len(d.values) for d in space.dims},
        original_widths=_candidate_widths(space, [len(d.values) - 1 for d in space.dims], True),
        feasible=rows.feasible,
        seconds=time.perf_counter() - started,
        next_step=_next_step(space, rows, picked[0]),
        notes=notes + rows.notes,
        graph=graph,
        layer_importance=space.layer_importance,
    )


def _next_step(space: _Space, rows: _Rows, row: int) -> dict[str, float | None]:
    """Costs with the bisected dimension one level above the row's (empty at the top)."""
    if rows.free is None:
        return {}
    levels = rows.levels[row].copy()
    above = rows.free_positions[rows.free_positions > levels[rows.free]]
    if above.size == 0:
        return {}
    levels[rows.free] = above[0]
    costs = space.costs(levels[None], [m for m, p in space.polys.items() if p is not None])
    return {m: (float(v[0]) / 1e9 if m == "memory_gb" else int(v[0])) for m, v in costs.items()}
