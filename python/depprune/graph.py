"""The dependency graph: groups of prunable units over named parameter dims.

A :class:`DependencyGraph` wraps the core's analysis of a set of axis
equations. Each :class:`Group` is a set of units (channels, neurons, heads,
...) that must be removed together; its members are the ``(parameter name,
dim)`` pairs that lose indices when one of its units goes.

>>> from depprune import AxisEquations
>>> eqs = AxisEquations()
>>> hidden, inp = eqs.axis(3), eqs.axis(2)
>>> eqs.param("fc1.weight", 0, hidden)
>>> eqs.param("fc1.weight", 1, inp)
>>> eqs.param("fc2.weight", 1, hidden)
>>> eqs.freeze(inp)
>>> graph = eqs.solve()
>>> graph.groups[0].members
(('fc1.weight', 0), ('fc2.weight', 1))
>>> graph.kept_indices({0: [1]})[("fc1.weight", 0)].tolist()
[0, 2]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from depprune import _core
from depprune.equations import AxisEquations
from depprune.errors import InvalidEquationsError, InvalidPlanError, ResourceError

__all__ = ["DependencyGraph", "Group", "GroupList"]

ParamDim = tuple[str, int]

# Members listed per group when a graph is printed; the rest are counted.
_MEMBERS_SHOWN = 4


@dataclass(frozen=True)
class Group:
    """Units that are removed together from every member (parameter, dim)."""

    index: int
    size: int
    members: tuple[ParamDim, ...]
    unit_offset: int
    #: What the units are (hidden, heads, head_dim, neurons, channels, conv_groups);
    #: set by :func:`depprune.trace`, empty for a graph solved from bare equations.
    kind: str = ""
    #: Parameters removed with each unit (tied parameters once); 0 when unknown.
    params_per_unit: int = 0

    def __str__(self) -> str:
        kind = f" ({self.kind})" if self.kind else ""
        per_unit = f", {self.params_per_unit:,} parameters each" if self.params_per_unit else ""
        return (
            f"group {self.index}: {self.size} units{kind}{per_unit}; {_members_text(self.members)}"
        )


class GroupList(tuple):
    """The groups of a graph: a tuple that, called, filters by kind.

    ``graph.groups[3]`` and ``graph.groups()`` give the groups,
    ``graph.groups("heads")`` those of one kind.
    """

    def __call__(self, kind: str | None = None) -> tuple[Group, ...]:
        return tuple(g for g in self if kind is None or g.kind == kind)


def _members_text(members: Sequence[ParamDim]) -> str:
    shown = ", ".join(f"{name}[{dim}]" for name, dim in members[:_MEMBERS_SHOWN])
    hidden = len(members) - _MEMBERS_SHOWN
    return shown + (f", ... (+{hidden} more)" if hidden > 0 else "")


def _as_keep_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean or integer mask (nonzero keeps) as the uint8 0/1 array the core takes."""
    if mask.ndim != 1 or mask.dtype.kind not in "biu":
        raise InvalidPlanError(
            f"a keep mask is a 1-d boolean or integer array (nonzero keeps); got a "
            f"{mask.ndim}-d {mask.dtype} array (use graph.keep_mask({{group: unit_ids}}))"
        )
    # Compare rather than cast: a cast to uint8 would turn 256 into 0 (removed).
    return np.ascontiguousarray(mask if mask.dtype == np.uint8 else mask != 0, dtype=np.uint8)


def _allocated(make, *args):
    """``make(*args)``, with numpy running out of memory raised as ResourceError."""
    try:
        return make(*args)
    except MemoryError as exc:
        raise ResourceError(
            f"a keep mask of this graph needs more memory than the machine has ({exc}); "
            "the axis sizes in the equations are likely wrong"
        ) from None


def _with_param_name(err: InvalidEquationsError, equations: AxisEquations) -> Exception:
    """The core's error, with the parameter named when it is about a parameter row."""
    row = getattr(err, "row", None)  # set by the binding on row errors
    if not isinstance(row, int) or not 0 <= row < len(equations.row_params):
        return err
    param, dim = equations.row_params[row], equations.row_dims[row]
    if not 0 <= param < len(equations.param_names):
        return err
    named = InvalidEquationsError(f"{err} (row {row} is {equations.param_names[param]}[{dim}])")
    named.row = row  # type: ignore[attr-defined]
    return named


class DependencyGraph:
    """Groups and index plans of a model's parameters, from the Rust core.

    Build one with :meth:`from_equations` (or ``AxisEquations.solve()``).
    """

    def __init__(self, analysis: _core.Analysis, equations: AxisEquations) -> None:
        self._analysis = analysis
        self._unit_maps: dict[int, dict[ParamDim, np.ndarray]] = {}
        #: The last keep mask kept_indices expanded, with the core's answer.
        self._last_kept: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.param_names: tuple[str, ...] = tuple(equations.param_names)
        self._row_keys: list[ParamDim] = [
            (self.param_names[p], d)
            for p, d in zip(equations.row_params, equations.row_dims, strict=True)
        ]
        self._row_of: dict[ParamDim, int] = {key: row for row, key in enumerate(self._row_keys)}
        self._row_axes: list[int] = list(equations.row_axes)
        sizes = analysis.group_sizes()
        unit_offsets = analysis.unit_offsets()
        member_offsets = analysis.member_offsets()
        member_rows = analysis.member_rows().tolist()
        self.groups: GroupList = GroupList(
            Group(
                index=g,
                size=int(sizes[g]),
                members=tuple(
                    self._row_keys[r]
                    for r in member_rows[member_offsets[g] : member_offsets[g + 1]]
                ),
                unit_offset=int(unit_offsets[g]),
            )
            for g in range(len(sizes))
        )
        #: Equations whose structures could only be frozen (-1: a unit repeated in a product).
        self.conflicts: tuple[int, ...] = tuple(analysis.conflicts().tolist())
        #: ATen ops without an axis rule seen by the trace (their axes are frozen), with counts.
        self.unsupported_ops: dict[str, int] = {}
        #: What the trace had to assume (e.g. neutral answers to .item() on meta tensors).
        self.notes: list[str] = []

    @classmethod
    def from_equations(cls, equations: AxisEquations) -> DependencyGraph:
        """Validate ``equations`` in the core and analyse them.

        Raises :class:`~depprune.InvalidEquationsError` naming the bad row
        (and, for a parameter row, the parameter's name).
        """
        if not isinstance(equations, AxisEquations):
            raise InvalidEquationsError(
                f"from_equations takes an AxisEquations; got {type(equations).__name__}"
            )
        try:
            analysis = _core.analyze(**equations.arrays())
        except InvalidEquationsError as err:
            raise _with_param_name(err, equations) from None
        return cls(analysis, equations)

    @property
    def num_units(self) -> int:
        """Units over all groups: the length of a keep mask."""
        return self._analysis.num_units

    def _group(self, group: object) -> Group:
        if isinstance(group, Group):
            group = group.index
        if not isinstance(group, (int, np.integer)) or not 0 <= int(group) < len(self.groups):
            numbered = (
                f"groups are numbered 0..{len(self.groups) - 1}"
                if self.groups
                else "this graph has no groups (nothing in it can be pruned)"
            )
            raise InvalidPlanError(f"group {group!r} does not exist; {numbered}")
        return self.groups[int(group)]

    def unit_maps(self, group: int | Group) -> dict[ParamDim, np.ndarray]:
        """For each member of ``group``: the unit of every index along its dim, or -1.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> graph = depprune.trace(model, torch.zeros(1, 2))
        >>> {k: v.tolist() for k, v in graph.unit_maps(0).items()}
        {('0.weight', 0): [0, 1, 2], ('0.bias', 0): [0, 1, 2], ('1.weight', 1): [0, 1, 2]}
        """
        g = self._group(group)
        cached = self._unit_maps.get(g.index)
        if cached is None:
            # Kinds, parameter counts and scores all read them: one core call per group.
            offsets, values = self._analysis.unit_maps(np.asarray([g.index], dtype=np.int64))
            values.flags.writeable = False
            cached = {m: values[offsets[k] : offsets[k + 1]] for k, m in enumerate(g.members)}
            self._unit_maps[g.index] = cached
        return dict(cached)

    def keep_mask(self, removed: Mapping[int | Group, Sequence[int] | np.ndarray]) -> np.ndarray:
        """A keep mask (uint8, one entry per unit) that removes the listed units.

        ``removed`` maps a group (or its index) to the integer unit ids to
        remove; groups not mentioned are kept whole.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> depprune.trace(model, torch.zeros(1, 2)).keep_mask({0: [1]}).tolist()
        [1, 0, 1]
        """
        if not isinstance(removed, Mapping):
            raise InvalidPlanError(
                f"removed must map a group (or its index) to the unit ids to remove, e.g. "
                f"{{0: [1, 3]}}; got {type(removed).__name__}"
            )
        keep = _allocated(np.ones, self.num_units, np.uint8)
        for key, ids in removed.items():
            g = self._group(key)
            try:
                units = np.asarray(ids).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise InvalidPlanError(
                    f"group {g.index}: unit ids must be a flat list or array of integers; "
                    f"got {type(ids).__name__} ({exc})"
                ) from None
            if units.size and units.dtype.kind not in "iu":
                raise InvalidPlanError(
                    f"group {g.index}: unit ids must be integers; got {units.dtype} values "
                    f"{units.tolist()[:8]} (for a boolean mask of units, pass "
                    "np.flatnonzero(mask))"
                )
            if units.size and (units.min() < 0 or units.max() >= g.size):
                bad = units[(units < 0) | (units >= g.size)]
                raise InvalidPlanError(
                    f"group {g.index} has units 0..{g.size - 1}; got unit {int(bad[0])}"
                    + (f" and {bad.size - 1} more out of range" if bad.size > 1 else "")
                )
            keep[g.unit_offset + units.astype(np.int64)] = 0
        return keep

    def kept_indices(
        self, removed: Mapping[int | Group, Sequence[int] | np.ndarray] | np.ndarray
    ) -> dict[ParamDim, np.ndarray]:
        """The indices each (parameter, dim) keeps once the ``removed`` units go.

        ``removed`` is a mapping as in :meth:`keep_mask`, or a keep mask itself.

        >>> import numpy as np, torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> graph = depprune.trace(model, torch.zeros(1, 2))
        >>> kept = graph.kept_indices(np.array([1, 0, 1], dtype=np.uint8))
        >>> kept[("1.weight", 1)].tolist()
        [0, 2]
        """
        if isinstance(removed, np.ndarray):
            if removed.size != self.num_units:
                raise InvalidPlanError(
                    f"the keep mask has {removed.size} entries but the groups have "
                    f"{self.num_units} units in all"
                )
            keep = _allocated(_as_keep_mask, removed)
        elif isinstance(removed, Mapping):
            keep = self.keep_mask(removed)
        else:
            raise InvalidPlanError(
                f"removed must be a mapping {{group: unit ids to remove}} or a keep mask "
                f"(a 1-d numpy array, one entry per unit); got {type(removed).__name__}"
            )
        # make_plan asks twice for the same choice (the replay's proof, then the plan).
        last = self._last_kept
        if last is not None and np.array_equal(last[0], keep):
            offsets, indices = last[1], last[2].copy()  # a copy: callers own their arrays
        else:
            offsets, indices = self._analysis.kept_indices(keep)
            self._last_kept = (keep.copy(), offsets, indices.copy())
        return {
            key: indices[offsets[row] : offsets[row + 1]] for row, key in enumerate(self._row_keys)
        }

    def axis_of(self, name: str, dim: int) -> int:
        """The axis id that parameter dim ``(name, dim)`` lies on."""
        try:
            return self._row_axes[self._row_of[(name, dim)]]
        except (KeyError, TypeError):
            raise InvalidPlanError(
                f"{name}[{dim}] is not a parameter dim of this graph; "
                f"known parameters: {', '.join(self.param_names[:5])}"
                f"{' ...' if len(self.param_names) > 5 else ''}"
            ) from None

    def describe(self, name: str, dim: int) -> str:
        """The structure along a parameter dim, e.g. ``product(g3[8], g4[64])``.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> depprune.trace(model, torch.zeros(1, 2)).describe("1.weight", 1)
        'g0[3]'
        """
        return self._analysis.describe_axis(self.axis_of(name, dim))

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        return (
            f"DependencyGraph({len(self.groups)} groups, {self.num_units} units, "
            f"{len(self._row_keys)} parameter dims, {len(self.conflicts)} conflicts)"
        )

    def annotate(self, kinds: Mapping[int, str], params_per_unit: Mapping[int, int]) -> None:
        """Record each group's kind and parameters per unit (the tracer knows the model)."""
        self.groups = GroupList(
            replace(
                g, kind=kinds.get(g.index, g.kind), params_per_unit=params_per_unit.get(g.index, 0)
            )
            for g in self.groups
        )

    def to_dot(self, path: str | os.PathLike | None = None) -> str:
        """The graph as Graphviz DOT text (written to ``path`` too when given).

        Groups are coloured nodes, tensors sit in clusters that follow the module
        tree, and each member is an edge labelled with its dim; see
        :func:`depprune.graph_view.to_dot`.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> depprune.trace(model, torch.zeros(1, 2)).to_dot().startswith("digraph depprune {")
        True
        """
        from depprune import graph_view  # the renderer loads only when a picture is asked for

        return graph_view.to_dot(self, path)

    def to_html(self, path: str | os.PathLike | None = None, *, title: str | None = None) -> str:
        """One self-contained HTML page drawing the graph (inline CSS and JS; works offline).

        The module tree is coloured by group, with a legend filtered by kind and
        the frozen dims, ops without a rule and notes; see
        :func:`depprune.graph_view.to_html`.

        >>> import torch, depprune
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> depprune.trace(model, torch.zeros(1, 2)).to_html(title="mlp").count("<script")
        3
        """
        from depprune import graph_view  # the renderer loads only when a picture is asked for

        return graph_view.to_html(self, path, title=title)

    def __str__(self) -> str:
        annotated = any(g.kind for g in self.groups)
        extra = f"{'kind':<12}{'params/unit':>12}  " if annotated else ""
        lines = [repr(self), f"{'group':>5}  {'units':>6}  {extra}members"]
        for g in self.groups:
            extra = f"{g.kind:<12}{g.params_per_unit:>12,}  " if annotated else ""
            lines.append(f"{g.index:>5}  {g.size:>6}  {extra}{_members_text(g.members)}")
        if self.unsupported_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in self.unsupported_ops.items())
            lines.append(f"frozen by ops without a rule: {ops}")
        return "\n".join(lines)
