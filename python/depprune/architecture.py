"""Architecture stage: takes a pruning plan, gives the pruned widths as weight-free JSON
(:class:`Architecture`) and applies them to a freshly built model, of the same class
(group by group) or a deeper or wider sibling (each layer role's kept fraction).

"Rethinking the Value of Network Pruning" (Liu et al., ICLR 2019) finds that what
pruning gives is the architecture: the widths, trained from scratch, do as well as the
pruned weights, and a pruned model's per-stage widths guide the design of others
(Sec. 5). A pruned model no longer knows its original sizes, so the architecture is
read from the :class:`depprune.Plan` that made it: for each group of the traced graph
its first member (``"layer1.0.conv1.weight[0]"``), kind, size and units kept; for each
layer role (the first member with layer numbers blanked by
:func:`depprune.selection.layer_role`: ``layer1.0.conv1`` and ``layer1.1.conv1`` share
``layer1.#.conv1.weight[0]``, so a stage's role gives the stage's kept fraction) and
each kind the totals; and, given the model, each changed module's widths after
(``out_channels``, ``out_features``, ``num_heads`` ...).

>>> import os, tempfile, torch, depprune
>>> def mlp():
...     return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> x = torch.zeros(2, 8)
>>> plan = depprune.make_plan(mlp(), x, ratio=0.25)
>>> arch = architecture(plan)
>>> [(g.first_member, g.size, g.kept) for g in arch.groups]
[('0.weight[0]', 16, 12)]
>>> path = os.path.join(tempfile.mkdtemp(), "arch.json")
>>> arch.save(path)
>>> fresh = mlp()
>>> report = apply_architecture(fresh, x, Architecture.load(path))
>>> fresh[0].out_features
12
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from depprune.api import PruneReport, apply_with_report, make_plan, trace
from depprune.apply import apply_kept_indices, named_tensors
from depprune.errors import MethodError
from depprune.graph import Group
from depprune.importance import Importance
from depprune.kinds import KINDS
from depprune.plan import Plan
from depprune.selection import layer_role
from depprune.shadow import ShadowError, meta_shadow

__all__ = ["Architecture", "GroupWidth", "Width", "apply_architecture", "architecture"]

FORMAT = "depprune-architecture"
VERSION = 1

#: Module attributes that say how wide a module is (read where present, after pruning).
WIDTH_FIELDS = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "normalized_shape",
    "num_groups",
    "num_channels",
    "num_embeddings",
    "embedding_dim",
    "embed_dim",
    "kdim",
    "vdim",
    "num_heads",
    "head_dim",
    "num_key_value_heads",
    "num_key_value_groups",
    "hidden_size",
    "intermediate_size",
)

_LAYER_NUMBERS = re.compile(r"\.(\d+)\.")
_MEMBER = re.compile(r"^(.+)\[(\d+)\]$")


@dataclass(frozen=True)
class GroupWidth:
    """One group of the pruned model's graph: what it is, and how many units it keeps."""

    #: The group's producer, as ``"<tensor name>[<dim>]"`` (``"layer1.0.conv1.weight[0]"``).
    first_member: str
    #: One of :data:`depprune.kinds.KINDS`.
    kind: str
    size: int
    kept: int
    #: The group's layer role (see :func:`role_keys`).
    role: str


@dataclass(frozen=True)
class Width:
    """Totals over some groups (a role's, a kind's): how many, units before and kept."""

    groups: int
    size: int
    kept: int

    @property
    def fraction(self) -> float:
        """Kept units over units."""
        return self.kept / self.size

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups,
            "size": self.size,
            "kept": self.kept,
            "fraction": self.fraction,
        }


def _member(text: str) -> tuple[str, int]:
    match = _MEMBER.match(text)
    if match is None:
        raise MethodError(
            f"first member {text!r} is not '<tensor name>[<dim>]' (as plan.groups gives it)"
        )
    return match.group(1), int(match.group(2))


def role_keys(groups: list[tuple[str, str]]) -> list[str]:
    """The layer role of each group, given ``(first member, kind)`` in group index order.

    The role is the first member with layer numbers blanked, and the kind
    (``"layer1.#.conv1.weight[0]:channels"``); groups of one layer that share both (a
    fused projection's KV heads and queries per KV head) are told apart by their order,
    ``#1``, ``#2`` after the first.

    >>> role_keys([("layers.0.fc.weight[0]", "neurons"), ("layers.1.fc.weight[0]", "neurons")])
    ['layers.#.fc.weight[0]:neurons', 'layers.#.fc.weight[0]:neurons']
    """
    seen: dict[tuple[str, tuple[str, ...]], int] = {}
    keys = []
    for first_member, kind in groups:
        name, dim = _member(first_member)
        blanked = layer_role(Group(0, 1, ((name, dim),), 0, kind))[0]
        base = f"{blanked}[{dim}]:{kind}"
        layer = (base, tuple(_LAYER_NUMBERS.findall(name)))
        ordinal = seen.get(layer, 0)
        seen[layer] = ordinal + 1
        keys.append(base if ordinal == 0 else f"{base}#{ordinal}")
    return keys


def _totals(pairs: list[tuple[str, GroupWidth]]) -> dict[str, Width]:
    sums: dict[str, list[int]] = {}
    for key, g in pairs:
        total = sums.setdefault(key, [0, 0, 0])
        total[0] += 1
        total[1] += g.size
        total[2] += g.kept
    return {key: Width(*values) for key, values in sums.items()}


@dataclass
class Architecture:
    """A pruned model's widths, without weights: per group, per layer role, per kind, per module."""

    #: Every group of the traced graph, in group index order.
    groups: tuple[GroupWidth, ...]
    #: Widths after pruning of each module the plan changes (module name -> field -> value);
    #: empty when :func:`architecture` was given no model.
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The class of the model the plan was made for.
    model_class: str = ""

    @property
    def roles(self) -> dict[str, Width]:
        """Totals per layer role: a stage's role gives the stage's kept fraction."""
        return _totals([(g.role, g) for g in self.groups])

    @property
    def kinds(self) -> dict[str, Width]:
        """Totals per kind (channels, neurons, heads ...)."""
        return _totals([(g.kind, g) for g in self.groups])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form :meth:`save` writes (roles and kinds included, for readers)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_class": self.model_class,
            "groups": [dict(vars(g)) for g in self.groups],
            "roles": {k: w.to_dict() for k, w in self.roles.items()},
            "kinds": {k: w.to_dict() for k, w in self.kinds.items()},
            "modules": self.modules,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "the architecture") -> Architecture:
        """An architecture from :meth:`to_dict`'s form; every field is checked.

        >>> Architecture.from_dict({"format": "depprune-architecture", "version": 9})
        Traceback (most recent call last):
        ...
        depprune.errors.MethodError: the architecture has version 9; this depprune reads version 1: write it again with this version
        """
        return _parse(data, where)

    def save(self, path: str | os.PathLike) -> None:
        """Write the architecture as JSON (UTF-8, indented)."""
        try:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(self.to_dict(), handle, indent=1)
                handle.write("\n")
        except OSError as exc:
            raise MethodError(
                f"cannot write the architecture to {os.fspath(path)!r}: {exc}"
            ) from exc

    @classmethod
    def load(cls, path: str | os.PathLike) -> Architecture:
        """Read an architecture written by :meth:`save`; a damaged file raises MethodError."""
        where = repr(os.fspath(path))
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError, RecursionError) as exc:
            raise MethodError(
                f"{where} is not a readable architecture file ({type(exc).__name__}: {exc}); "
                "write architectures with Architecture.save"
            ) from exc
        return _parse(data, where)

    def __str__(self) -> str:
        lines = [f"{'kept':>8}  {'units':>14}  {'groups':>6}  role"]
        for role, w in self.roles.items():
            lines.append(
                f"{w.fraction:>8.1%}  {f'{w.size} -> {w.kept}':>14}  {w.groups:>6}  {role}"
            )
        return "\n".join(lines)


def _parse(data: Any, where: str) -> Architecture:
    def fail(problem: str) -> MethodError:
        return MethodError(
            f"{where} {problem}: write it again with depprune.architecture.architecture(plan).save"
        )

    if not isinstance(data, dict):
        raise fail(f"holds a {type(data).__name__}, not an architecture object")
    if data.get("format") != FORMAT:
        raise fail(f"has format {data.get('format')!r}, not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise MethodError(
            f"{where} has version {data.get('version')!r}; this depprune reads version "
            f"{VERSION}: write it again with this version"
        )
    expected = {"format", "version", "model_class", "groups", "roles", "kinds", "modules"}
    if set(data) != expected:
        missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
        raise fail(f"has fields missing {missing} and unknown {extra}")
    if not isinstance(data["model_class"], str):
        raise fail("has a model_class that is not a string")
    if not isinstance(data["groups"], list) or not data["groups"]:
        raise fail("has no list of groups")
    fields = {"first_member": str, "kind": str, "size": int, "kept": int, "role": str}
    groups = []
    for i, entry in enumerate(data["groups"]):
        if not isinstance(entry, dict) or set(entry) != set(fields):
            raise fail(f"has group {i} without exactly the fields {sorted(fields)}")
        for key, kind in fields.items():
            if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
                raise fail(f"has group {i} with {key} {entry[key]!r}, not a {kind.__name__}")
        if entry["kind"] not in KINDS:
            raise fail(f"has group {i} of unknown kind {entry['kind']!r} (kinds: {KINDS})")
        if not 1 <= entry["kept"] <= entry["size"]:
            raise fail(
                f"has group {i} keeping {entry['kept']} of {entry['size']} units; a group keeps "
                "between 1 and all of its units"
            )
        _member(entry["first_member"])
        groups.append(GroupWidth(**entry))
    roles = role_keys([(g.first_member, g.kind) for g in groups])
    for i, (g, role) in enumerate(zip(groups, roles, strict=True)):
        if g.role != role:
            raise fail(f"has group {i} with role {g.role!r}, but its first member gives {role!r}")
    arch = Architecture(tuple(groups), {}, data["model_class"])
    for name, totals in (("roles", arch.roles), ("kinds", arch.kinds)):
        stored = data[name]
        if not isinstance(stored, dict) or stored != {k: w.to_dict() for k, w in totals.items()}:
            raise fail(f"has {name} that do not add up from its groups (edited by hand?)")
    modules = data["modules"]
    if not isinstance(modules, dict):
        raise fail("has modules that are not an object")
    for name, widths in modules.items():
        if not isinstance(widths, dict) or not all(
            _is_width(v) and isinstance(k, str) for k, v in widths.items()
        ):
            raise fail(f"has module {name!r} whose widths are not integers or lists of them")
    arch.modules = {name: dict(widths) for name, widths in modules.items()}
    return arch


def _is_width(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def architecture(plan: Plan | Any, model: nn.Module | None = None) -> Architecture:
    """The architecture a plan (or a :class:`depprune.PruneReport`'s plan) gives.

    With ``model`` (the model the plan was made for, before or after ``plan.apply``) the
    architecture also holds each changed module's widths after pruning.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> report = depprune.prune(model, torch.zeros(1, 4), ratio=0.5)
    >>> arch = architecture(report, model)
    >>> arch.modules["0"]["out_features"], arch.roles["0.weight[0]:neurons"].fraction
    (4, 0.5)
    """
    plan = getattr(plan, "plan", plan)
    if not isinstance(plan, Plan):
        raise MethodError(
            f"architecture needs a depprune.Plan or PruneReport; got {type(plan).__name__}"
        )
    if not plan.groups:
        raise MethodError(
            "the plan has no groups (it was not made by depprune.make_plan), so its widths "
            "per group are unknown; make it with depprune.make_plan"
        )
    roles = role_keys([(g.first_member, g.kind) for g in plan.groups])
    groups = tuple(
        GroupWidth(g.first_member, g.kind, g.size, g.kept, role)
        for g, role in zip(plan.groups, roles, strict=True)
    )
    modules = _module_widths(plan, model) if model is not None else {}
    return Architecture(groups, modules, type(model).__name__ if model is not None else "")


def _module_widths(plan: Plan, model: nn.Module) -> dict[str, dict[str, Any]]:
    """Width fields of every module the plan cuts or sets, after the cut."""
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    tensors = named_tensors(model)
    shapes = {}
    for name in plan.shapes:
        if name not in tensors:
            raise MethodError(
                f"the plan cuts {name!r}, which {type(model).__name__} does not have; pass the "
                "model the plan was made for"
            )
        module, attr, _ = tensors[name]
        shapes[name] = tuple(getattr(module, attr).shape)
    after = {
        name: tuple(
            plan.kept[(name, d)].size if (name, d) in plan.kept else s for d, s in enumerate(shape)
        )
        for name, shape in plan.shapes.items()
    }
    if shapes == after:
        pruned = model
    elif shapes == plan.shapes:
        try:
            pruned = meta_shadow(model)
        except ShadowError as exc:
            raise MethodError(
                f"cannot read the widths after pruning from a copy ({exc}); pass the pruned "
                "model (after plan.apply)"
            ) from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_kept_indices(pruned, plan.kept, attributes=plan.attributes, widths=plan.widths)
    else:
        raise MethodError(
            f"{type(model).__name__}'s tensors have neither the shapes the plan was made for "
            "nor the shapes it leaves; pass the model the plan was made for"
        )
    owners = {name.rpartition(".")[0] for name in plan.shapes} | set(plan.attributes)
    modules = dict(pruned.named_modules())
    widths: dict[str, dict[str, Any]] = {}
    for name in sorted(owners):
        module = modules.get(name)
        if module is None:
            continue
        fields = {}
        for attr in (*WIDTH_FIELDS, *sorted(plan.attributes.get(name, {}))):
            value = getattr(module, attr, None)
            if isinstance(value, tuple):
                value = list(value)
            if _is_width(value):
                fields[attr] = value
        if fields:
            widths[name] = fields
    return widths


def apply_architecture(
    model: nn.Module,
    example_inputs: Any,
    arch: Architecture | str | os.PathLike,
    *,
    by: str = "member",
    importance: Importance | None = None,
    count_macs: bool = True,
    progress: bool | None = None,
) -> PruneReport:
    """Prune a freshly built ``model`` in place to the architecture's widths; a PruneReport.

    ``by="member"``: each group keeps the exported number of units, groups matched by
    first member, kind and size (the same class and configuration). ``by="role"``: each
    group keeps its layer role's kept fraction of its own size (rounded, at least one
    unit), so a deeper sibling (more blocks per stage) or a wider one gets the same
    per-stage ratios. Which units are kept does not matter for training from scratch:
    by default the largest in L2 norm of the fresh weights (``importance`` to choose
    otherwise). The plan is made and proved by :func:`depprune.make_plan`; a group the
    architecture does not cover, a role it lacks, or a plan that cannot keep the asked
    widths (the proof keeps a group whole) raises :class:`MethodError` naming them, and
    the model is left as it was.

    >>> import collections, torch, depprune
    >>> from torch import nn
    >>> def net(depth):
    ...     blocks = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    ...               for _ in range(depth)]
    ...     return nn.Sequential(collections.OrderedDict(blocks=nn.Sequential(*blocks)))
    >>> x = torch.zeros(2, 8)
    >>> arch = architecture(depprune.make_plan(net(2), x, ratio=0.75))
    >>> sorted(arch.roles)
    ['blocks.#.0.weight[0]:neurons', 'blocks.#.2.weight[0]:neurons']
    >>> deeper = net(3)
    >>> _ = apply_architecture(deeper, x, arch, by="role")
    >>> [block[0].out_features for block in deeper.blocks]
    [4, 4, 4]
    """
    if by not in ("member", "role"):
        raise MethodError(f"by is {by!r}; match groups by 'member' (same model) or 'role'")
    if isinstance(arch, (str, os.PathLike)):
        arch = Architecture.load(arch)
    if not isinstance(arch, Architecture):
        raise MethodError(
            f"arch must be an Architecture or the path of one; got {type(arch).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    graph = trace(model, example_inputs)
    targets = [(g, f"{g.members[0][0]}[{g.members[0][1]}]") for g in graph.groups]
    if by == "member":
        wanted = _by_member(arch, targets)
    else:
        wanted = _by_role(arch, targets)
    # Unit counts per group, not ratios per module: groups sharing a producer module, or
    # produced by a tensor of the model itself (a ViT's class token), keep theirs exactly.
    plan = make_plan(
        model,
        graph=graph,
        ratio=0.0,
        keep_units=dict(wanted),
        importance=importance,
        progress=progress,
    )
    wrong = [
        f"{g.first_member} ({g.kind}): asked {wanted[g.index]}, the plan keeps {g.kept}"
        + (f" ({plan.kept_whole[g.index]})" if g.index in plan.kept_whole else "")
        for g in plan.groups
        if g.kept != wanted[g.index]
    ]
    if wrong:
        raise MethodError(
            f"the plan for {type(model).__name__} cannot keep the architecture's widths: "
            f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}; the model is unchanged"
        )
    return apply_with_report(model, plan, graph, count_macs=count_macs)


def _listed(items: list[str]) -> str:
    return ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")


def _by_member(arch: Architecture, targets: list[tuple[Group, str]]) -> dict[int, int]:
    """Units each target group keeps: its exported group's, matched by member, kind, size."""

    def keyed(entries: list[tuple[str, str, int]]) -> list[tuple[str, str, int, int]]:
        seen: dict[tuple[str, str, int], int] = {}
        keys = []
        for entry in entries:
            keys.append((*entry, seen.get(entry, 0)))
            seen[entry] = seen.get(entry, 0) + 1
        return keys

    exported = dict(
        zip(
            keyed([(g.first_member, g.kind, g.size) for g in arch.groups]),
            [g.kept for g in arch.groups],
            strict=True,
        )
    )
    target_keys = keyed([(member, g.kind, g.size) for g, member in targets])
    uncovered = [f"{k[0]} ({k[2]} {k[1]})" for k in target_keys if k not in exported]
    absent = [f"{k[0]} ({k[2]} {k[1]})" for k in exported if k not in set(target_keys)]
    if uncovered or absent:
        problems = []
        if uncovered:
            problems.append(f"groups the architecture does not cover: {_listed(uncovered)}")
        if absent:
            problems.append(f"groups of the architecture the model lacks: {_listed(absent)}")
        raise MethodError(
            f"the model is not the architecture's {arch.model_class or 'model'} "
            f"({'; '.join(problems)}); build it with the same configuration, or apply "
            "by='role' for a deeper or wider sibling"
        )
    return {g.index: exported[key] for (g, _), key in zip(targets, target_keys, strict=True)}


def _by_role(arch: Architecture, targets: list[tuple[Group, str]]) -> dict[int, int]:
    """Units each target group keeps: its role's kept fraction of its size, rounded."""
    roles = arch.roles
    keys = role_keys([(member, g.kind) for g, member in targets])
    missing = sorted({key for key in keys if key not in roles})
    if missing:
        raise MethodError(
            f"the architecture has no layer role {_listed(missing)} of the model, so their "
            "groups have no kept fraction; apply an architecture of a sibling with the same "
            "stages and layers (roles: "
            f"{_listed(sorted(roles))})"
        )
    return {
        g.index: min(g.size, max(1, math.floor(roles[key].fraction * g.size + 0.5)))
        for (g, _), key in zip(targets, keys, strict=True)
    }
