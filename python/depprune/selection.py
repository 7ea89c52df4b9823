"""Selection: which units of which groups to remove, from scores and ratios.

A ratio is the fraction of a group's units to remove. ``ratios`` maps a
module, or a tuple of modules (one scope ranked together), to its own ratio;
a group belongs to the most specific scope that contains the owner of its
first member (the parameter that produces its units: a conv's or linear's
output, an embedding's dim). Local ranking removes the lowest-scored units
of each group; global ranking ranks every unit of a scope together, after
dividing each group's scores by their mean so groups are comparable.

>>> import torch
>>> from depprune.selection import units_to_keep, lowest
>>> units_to_keep(size=10, ratio=0.5, round_to=4, min_units=1)
8
>>> lowest(torch.tensor([0.3, 0.1, 0.9, 0.2]), 2).tolist()
[1, 3]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from depprune.errors import SelectionError, TraceError
from depprune.graph import DependencyGraph, Group

__all__ = [
    "SelectionError",
    "check_ratios",
    "layer_role",
    "lowest",
    "select",
    "uneven_roles",
    "units_to_keep",
]

Scope = nn.Module | tuple[nn.Module, ...]


def _check_ratio(ratio: float, where: str) -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise SelectionError(
            f"{where} is {ratio!r}; a ratio is the fraction of units to remove, in [0, 1)"
        )
    return float(ratio)


def units_to_keep(size: int, ratio: float, round_to: int | None, min_units: int) -> int:
    """Units a group of ``size`` keeps at ``ratio``, a multiple of ``round_to``.

    >>> units_to_keep(100, 0.5, None, 1), units_to_keep(100, 0.5, 16, 1), units_to_keep(4, 0.9, None, 2)
    (50, 64, 2)
    """
    keep = size - math.floor(ratio * size + 1e-9)
    if round_to and round_to > 1:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return min(size, max(keep, min_units))


def lowest(scores: torch.Tensor, count: int) -> np.ndarray:
    """Indices of the ``count`` lowest scores, sorted; ties broken by index.

    >>> lowest(torch.tensor([3.0, 1.0, 1.0, 0.5]), 2).tolist()
    [1, 3]
    """
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    values = scores.detach().cpu()
    # float32/float64 as they are, others widened exactly (numpy has no bfloat16).
    values = (values if values.dtype in (torch.float32, torch.float64) else values.double()).numpy()
    if count >= values.size:
        return np.arange(values.size, dtype=np.int64)
    # The count-th lowest in linear time (a stable sort of 28,672 MLP scores per group
    # cost 1.5 ms, 0.25 s over a 70B plan): all below it, then its ties by index.
    kth = np.partition(values, count - 1)[count - 1]
    if np.isnan(kth):
        order = torch.argsort(scores, stable=True)[:count]  # NaNs sort last, as before
        return np.sort(order.numpy().astype(np.int64))
    below = np.flatnonzero(values < kth)
    ties = np.flatnonzero(values == kth)[: count - below.size]
    return np.sort(np.concatenate([below, ties])).astype(np.int64)


def balanced_lowest(scores: torch.Tensor, count: int, ranks: int) -> np.ndarray:
    """The ``count`` lowest-scored units, ``count / ranks`` from each rank's block.

    >>> balanced_lowest(torch.tensor([0.1, 0.2, 0.8, 0.9, 0.3, 0.4]), 2, 2).tolist()  # not [0, 1]
    [0, 4]
    """
    if count % ranks:
        raise SelectionError(f"{count} units cannot be removed evenly from {ranks} ranks")
    blocks = scores.detach().float().cpu().reshape(ranks, -1)
    order = torch.argsort(blocks, dim=1, stable=True)[:, : count // ranks]
    order += torch.arange(ranks).unsqueeze(1) * blocks.shape[1]
    return np.sort(order.reshape(-1).numpy())


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules(remove_duplicate=False)}


def _scope_prefixes(model: nn.Module, scope: Scope, names: Mapping[int, str]) -> tuple[str, ...]:
    modules = scope if isinstance(scope, tuple) else (scope,)
    if not modules:
        raise SelectionError("an empty tuple given in ratios holds no module; name modules")
    prefixes = []
    for module in modules:
        if id(module) not in names:
            raise SelectionError(
                f"{type(module).__name__} object given in ratios/ignored is not a submodule "
                f"of {type(model).__name__}; pass modules of the model being pruned"
            )
        name = names[id(module)]
        prefixes.append(f"{name}." if name else "")
    return tuple(prefixes)


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def check_ratios(
    model: nn.Module,
    ratio: float,
    ratios: Mapping[Scope, float] | None = None,
    ignored: Iterable[nn.Module] = (),
    round_to: int | None = None,
    min_units: int = 1,
) -> list[tuple[tuple[str, ...], float]]:
    """Validate ratios, scopes and constraints; return ``(prefixes, ratio)``, most specific first.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> check_ratios(model, 0.5, {model[0]: 0.25})
    [(('0.',), 0.25)]
    >>> check_ratios(model, 1.5)
    Traceback (most recent call last):
    ...
    depprune.errors.SelectionError: ratio is 1.5; a ratio is the fraction of units to remove, in [0, 1)
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"the model must be an nn.Module; got {type(model).__name__}")
    _check_ratio(ratio, "ratio")
    if not isinstance(min_units, int) or min_units < 1:
        raise SelectionError(f"min_units is {min_units!r}; every group must keep at least 1 unit")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise SelectionError(f"round_to is {round_to!r}; it must be a positive unit count")
    if ratios is not None and not isinstance(ratios, Mapping):
        raise SelectionError(
            f"ratios must map a module (or a tuple of modules) to its ratio, e.g. "
            f"{{model.layer1: 0.3}}; got {type(ratios).__name__}"
        )
    names = _module_names(model)
    if ignored:
        _scope_prefixes(model, tuple(ignored), names)
    scopes: list[tuple[tuple[str, ...], float]] = []
    for scope, value in (ratios or {}).items():
        prefixes = _scope_prefixes(model, scope, names)
        scopes.append((prefixes, _check_ratio(value, f"the ratio of {prefixes}")))
    scopes.sort(key=lambda s: -max(len(p) for p in s[0]))
    return scopes


def select(
    graph: DependencyGraph,
    scores: Mapping[int, torch.Tensor],
    model: nn.Module,
    *,
    ratio: float = 0.5,
    ratios: Mapping[Scope, float] | None = None,
    ignored: Iterable[nn.Module] = (),
    round_to: int | None = None,
    min_units: int = 1,
    global_ranking: bool = False,
    uniform: bool = False,
    multiples: Mapping[int, int] | None = None,
    normalize: bool = True,
    keep_units: Mapping[int, int] | None = None,
    balanced: Mapping[int, int] | None = None,
) -> dict[int, np.ndarray]:
    """Units to remove from each scored group: ``{group index: sorted unit ids}``.

    ``multiples`` maps groups to a unit count they must keep a multiple of on top
    of ``round_to`` (sizes a kernel needs, as ``grouped_mm``'s 16-byte rows).
    Global ranking divides each group's scores by their mean; ``normalize=False``
    ranks the raw scores, for criteria already comparable across groups (LAMP,
    Network Slimming's BatchNorm scales: one global threshold). ``keep_units``
    gives groups (by index) the number of units they keep instead of a ratio
    (iterative schedules that aim at a width of the original model); those
    groups are ranked on their own, outside any global ranking.
    ``balanced`` maps groups to a number of equal blocks (tensor-parallel
    ranks) that each lose the same number of units (:func:`balanced_lowest`);
    ``multiples`` must make their counts divisible by it.

    Groups without scores, and groups with a member inside an ``ignored``
    module, are kept whole. ``uniform=True`` removes the same number of
    units from every group of a :func:`layer_role` (the mean of what the
    ranking chose, each group still dropping its own weakest units); a role
    whose groups fall under different ratios or are partly ignored raises.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> from depprune import trace
    >>> graph = trace(model, torch.zeros(1, 2))
    >>> select(graph, {0: torch.tensor([0.4, 0.1, 0.3, 0.2])}, model, ratio=0.5)
    {0: array([1, 3])}
    >>> select(graph, {0: torch.tensor([0.4, 0.1, 0.3, 0.2])}, model, keep_units={0: 3})
    {0: array([1])}
    """
    scopes = check_ratios(model, ratio, ratios, ignored, round_to, min_units)
    names = _module_names(model)
    ignored_prefixes = _scope_prefixes(model, tuple(ignored), names) if ignored else ()

    by_scope: dict[int, list[Group]] = {}
    scope_ratio = [value for _, value in scopes] + [ratio]
    for group in graph.groups:
        if group.index not in scores:
            continue
        if ignored_prefixes and any(_inside(n, ignored_prefixes) for n, _ in group.members):
            continue
        by_scope.setdefault(_scope_of(group, scopes), []).append(group)

    def step(group: int) -> int | None:
        multiple = math.lcm(round_to or 1, (multiples or {}).get(group, 1))
        return multiple if multiple > 1 else None

    counted = _checked_keep_units(graph, keep_units)
    removed: dict[int, np.ndarray] = {}
    for which, groups in by_scope.items():
        r = scope_ratio[which]
        ranked = [g for g in groups if g.index not in counted]
        if global_ranking:
            removed.update(_select_global(ranked, scores, r, step, min_units, normalize))
        else:
            for g in ranked:
                keep = units_to_keep(g.size, r, step(g.index), min_units)
                removed[g.index] = lowest(scores[g.index], g.size - keep)
        for g in groups:
            if g.index in counted:
                multiple = step(g.index) or 1
                keep = min(
                    g.size, math.ceil(max(counted[g.index], min_units) / multiple) * multiple
                )
                removed[g.index] = lowest(scores[g.index], g.size - keep)
    if uniform:
        removed = _make_uniform(by_scope, scores, removed, step, min_units, graph)
    for g, ranks in (balanced or {}).items():
        if g in removed:
            removed[g] = balanced_lowest(scores[g], len(removed[g]), ranks)
    return {g: units for g, units in removed.items() if units.size}


def _checked_keep_units(
    graph: DependencyGraph, keep_units: Mapping[int, int] | None
) -> dict[int, int]:
    """``keep_units`` as ``{group index: units}``, every entry checked."""
    if keep_units is None:
        return {}
    if not isinstance(keep_units, Mapping):
        raise SelectionError(
            f"keep_units must map a group index to the units it keeps, e.g. {{0: 12}}; got "
            f"{type(keep_units).__name__}"
        )
    counted = {}
    for index, units in keep_units.items():
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < len(graph.groups):
            raise SelectionError(
                f"keep_units names group {index!r}; groups are numbered 0..{len(graph.groups) - 1}"
            )
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
            raise SelectionError(
                f"keep_units gives group {index} {units!r} units; every group keeps at least 1"
            )
        counted[int(index)] = int(units)
    return counted


def _scope_of(group: Group, scopes: list[tuple[tuple[str, ...], float]]) -> int:
    """The scope whose matching module is the most specific; len(scopes) for the default."""
    producer = group.members[0][0]
    best, best_length = len(scopes), -1
    for i, (prefixes, _) in enumerate(scopes):
        for prefix in prefixes:
            if producer.startswith(prefix) and len(prefix) > best_length:
                best, best_length = i, len(prefix)
    return best


def _make_uniform(
    by_scope: Mapping[int, list[Group]],
    scores: Mapping[int, torch.Tensor],
    removed: Mapping[int, np.ndarray],
    step: Callable[[int], int | None],
    min_units: int,
    graph: DependencyGraph,
) -> dict[int, np.ndarray]:
    """The same number of units removed from every group of a role: the floored mean."""
    scope_of = {g.index: which for which, groups in by_scope.items() for g in groups}
    by_role: dict[tuple, list[Group]] = {}
    for g in graph.groups:
        by_role.setdefault(layer_role(g), []).append(g)
    result = dict(removed)
    for role, groups in by_role.items():
        chosen = [g for g in groups if g.index in scope_of]
        if not chosen:
            continue
        if len(chosen) < len(groups) or len({scope_of[g.index] for g in chosen}) > 1:
            raise SelectionError(
                f"uniform=True needs every {role[0]}[{role[1]}] group to be pruned alike, but "
                "some are ignored, not scored or under another ratio; drop those ratios or "
                "ignored modules, or pass uniform=False"
            )
        count = sum(len(removed.get(g.index, ())) for g in chosen) / len(chosen)
        size = chosen[0].size  # one role, one size
        keep = units_to_keep(size, count / size, step(chosen[0].index), min_units)
        for g in chosen:
            result[g.index] = lowest(scores[g.index], size - keep)
    return result


def _select_global(
    groups: list[Group],
    scores: Mapping[int, torch.Tensor],
    ratio: float,
    step: Callable[[int], int | None],
    min_units: int,
    normalize: bool = True,
) -> dict[int, np.ndarray]:
    """Rank all units of ``groups`` together; each group keeps at least min_units."""
    ranked = [
        scores[g.index] / scores[g.index].mean().clamp_min(1e-12) if normalize else scores[g.index]
        for g in groups
    ]
    flat = torch.cat(ranked)
    owner = torch.cat([torch.full((g.size,), i) for i, g in enumerate(groups)])
    total = flat.numel()
    budget = math.floor(ratio * total + 1e-9)
    order = torch.argsort(flat, stable=True)[:budget]
    counts = torch.bincount(owner[order], minlength=len(groups)).tolist()
    result = {}
    for i, g in enumerate(groups):
        keep = units_to_keep(g.size, counts[i] / g.size, step(g.index), min_units)
        result[g.index] = lowest(scores[g.index], g.size - keep)
    return result


def layer_role(group: Group) -> tuple:
    """What a group is in its layer: its members with layer numbers blanked, and its size.

    Groups with the same role in different layers (every layer's KV heads)
    must keep the same number of units for one config to describe them; two
    groups of one layer (KV heads, and query heads per KV head) differ in
    their members.

    >>> layer_role(Group(0, 8, (("model.layers.3.mlp.up_proj.weight", 0),), 0, "neurons"))
    ('model.layers.#.mlp.up_proj.weight', 0, 8, 'neurons', (('model.layers.#.mlp.up_proj.weight', 0),))
    """
    name, dim = group.members[0]
    members = tuple((_LAYER_NUMBER.sub(".#.", n), d) for n, d in group.members)
    return (_LAYER_NUMBER.sub(".#.", name), dim, group.size, group.kind, members)


_LAYER_NUMBER = re.compile(r"\.\d+\.")


def uneven_roles(graph: DependencyGraph, removed: Mapping[int, np.ndarray]) -> list[str]:
    """Roles whose groups would keep different unit counts in different layers.

    >>> import numpy as np, torch, depprune
    >>> from collections import OrderedDict
    >>> def block():
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> model = torch.nn.Sequential(OrderedDict(layers=torch.nn.Sequential(block(), block())))
    >>> graph = depprune.trace(model, torch.zeros(1, 4))
    >>> [(g.index, g.kind, g.size) for g in graph.groups]
    [(0, 'neurons', 8), (1, 'neurons', 4), (2, 'neurons', 8)]
    >>> uneven_roles(graph, {0: np.array([0]), 2: np.array([0, 1])})
    ['layers.#.0.weight[0] (neurons: keeps [6, 7])']
    """
    kept: dict[tuple, set[int]] = {}
    for g in graph.groups:
        kept.setdefault(layer_role(g), set()).add(g.size - len(removed.get(g.index, ())))
    return [
        f"{role[0]}[{role[1]}] ({role[3] or 'units'}: keeps {sorted(counts)})"
        for role, counts in kept.items()
        if len(counts) > 1
    ]
