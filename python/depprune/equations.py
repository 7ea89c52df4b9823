"""Collect axis equations in flat arrays, the form the Rust core takes.

Every tensor axis the trace (or a test) cares about gets an integer id and a
size. Equations relate axes: ``equal`` (same elements, same order), ``sum``
(concatenation: the left axis is its parts one after another) and
``product`` (a merged axis: element ``(i, j)`` of ``product(A, B)`` sits at
flat index ``i * len(B) + j``). Parameters name the axes of their dims.

>>> eqs = AxisEquations()
>>> hidden, heads, head_dim = eqs.axis(8), eqs.axis(2), eqs.axis(4)
>>> eqs.product(hidden, [heads, head_dim])
>>> eqs.param("proj.weight", 0, hidden)
>>> graph = eqs.solve()
>>> [group.size for group in graph.groups]
[2, 4]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from depprune.errors import InvalidEquationsError

if TYPE_CHECKING:
    from depprune.graph import DependencyGraph

__all__ = ["EQUAL", "PRODUCT", "SUM", "AxisEquations"]

#: Equation kinds as the core numbers them.
EQUAL, SUM, PRODUCT = 0, 1, 2


class AxisEquations:
    """A growing set of axes, equations, frozen axes and parameter dims.

    Appending is O(1) per call and nothing is checked here: the core
    validates the whole set at once and names the bad row.
    """

    def __init__(self) -> None:
        self.axis_sizes: list[int] = []
        self.kinds: list[int] = []
        self.lefts: list[int] = []
        self.right_offsets: list[int] = [0]
        self.rights: list[int] = []
        self.frozen_axes: list[int] = []
        self.param_names: list[str] = []
        self._param_index: dict[str, int] = {}
        self.row_params: list[int] = []
        self.row_dims: list[int] = []
        self.row_axes: list[int] = []

    # The tracer calls these a few times per ATen op: plain appends, no conversions
    # (ids and sizes are ints; the core checks everything when the set is solved).
    def axis(self, size: int) -> int:
        """Create a new axis of ``size`` elements and return its id."""
        sizes = self.axis_sizes
        sizes.append(size)
        return len(sizes) - 1

    def _equation(self, kind: int, left: int, rights: Iterable[int]) -> None:
        self.kinds.append(kind)
        self.lefts.append(left)
        self.rights.extend(rights)
        self.right_offsets.append(len(self.rights))

    def equal(self, left: int, right: int) -> None:
        """``left`` and ``right`` are the same elements in the same order."""
        self.kinds.append(EQUAL)
        self.lefts.append(left)
        rights = self.rights
        rights.append(right)
        self.right_offsets.append(len(rights))

    def sum(self, left: int, parts: Sequence[int]) -> None:
        """``left`` is the concatenation of ``parts`` (cat, split, slice pieces)."""
        self._equation(SUM, left, parts)

    def product(self, left: int, factors: Sequence[int]) -> None:
        """``left`` is the row-major merge of ``factors`` (view, reshape, flatten)."""
        self._equation(PRODUCT, left, factors)

    def freeze(self, axis: int) -> None:
        """Never prune any element of ``axis`` (model inputs, outputs, unknown ops)."""
        self.frozen_axes.append(axis)

    def param(self, name: str, dim: int, axis: int) -> None:
        """Dim ``dim`` of parameter (or buffer) ``name`` lies along ``axis``."""
        if not isinstance(name, str):
            raise InvalidEquationsError(
                f"a parameter name must be a str (as model.named_parameters() gives); got "
                f"{type(name).__name__} {name!r}"
            )
        index = self._param_index.setdefault(name, len(self.param_names))
        if index == len(self.param_names):
            self.param_names.append(name)
        self.row_params.append(index)
        self.row_dims.append(dim)
        self.row_axes.append(axis)

    @property
    def num_axes(self) -> int:
        return len(self.axis_sizes)

    @property
    def num_equations(self) -> int:
        return len(self.kinds)

    def arrays(self) -> dict[str, np.ndarray]:
        """The flat int64 arrays the core takes, by argument name.

        Every size, id and dim is checked to be an integer here, once for the
        whole set (the appends above stay plain for the tracer's hot path).

        >>> eqs = AxisEquations()
        >>> eqs.param("w", 0, eqs.axis(2.7))
        >>> eqs.arrays()
        Traceback (most recent call last):
        ...
        depprune.errors.InvalidEquationsError: axis_sizes[0] is 2.7 (float); axis sizes, ids and dims must be integers in int64 range
        """
        return {
            "axis_sizes": _int64_array(self.axis_sizes, "axis_sizes"),
            "eq_kinds": _int64_array(self.kinds, "eq_kinds"),
            "eq_left": _int64_array(self.lefts, "eq_left"),
            "eq_right_offsets": _int64_array(self.right_offsets, "eq_right_offsets"),
            "eq_right": _int64_array(self.rights, "eq_right"),
            "frozen_axes": _int64_array(self.frozen_axes, "frozen_axes"),
            "row_params": _int64_array(self.row_params, "row_params"),
            "row_dims": _int64_array(self.row_dims, "row_dims"),
            "row_axes": _int64_array(self.row_axes, "row_axes"),
        }

    def solve(self) -> DependencyGraph:
        """Run the core on these equations and return the dependency graph."""
        from depprune.graph import DependencyGraph

        return DependencyGraph.from_equations(self)


def _int64_array(values: list, name: str) -> np.ndarray:
    """``values`` as an int64 array, or InvalidEquationsError naming the first non-integer.

    One vectorised conversion: numpy infers int64 for a list of ints, and any
    float, str, None, bool-only or out-of-range value shows in the inferred
    dtype, so the common case costs what ``np.asarray(values, np.int64)`` does.
    """
    if not values:
        return np.zeros(0, dtype=np.int64)
    try:
        array = np.asarray(values)
    except (TypeError, ValueError, OverflowError):
        array = None  # ragged nesting: find the culprit below
    if array is not None and array.ndim == 1 and array.dtype == np.int64:
        return array
    if array is not None and array.ndim == 1 and array.dtype.kind in "iu":
        info = np.iinfo(np.int64)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(np.int64)
    for position, value in enumerate(values):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or not -(2**63) <= int(value) < 2**63
        ):
            raise InvalidEquationsError(
                f"{name}[{position}] is {value!r} ({type(value).__name__}); axis sizes, ids and "
                "dims must be integers in int64 range"
            )
    return np.asarray(values, dtype=np.int64)  # pragma: no cover (a mix numpy could not infer)
