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
        self.frozen_axes.append(int(axis))

    def param(self, name: str, dim: int, axis: int) -> None:
        """Dim ``dim`` of parameter (or buffer) ``name`` lies along ``axis``."""
        index = self._param_index.setdefault(name, len(self.param_names))
        if index == len(self.param_names):
            self.param_names.append(name)
        self.row_params.append(index)
        self.row_dims.append(int(dim))
        self.row_axes.append(int(axis))

    @property
    def num_axes(self) -> int:
        return len(self.axis_sizes)

    @property
    def num_equations(self) -> int:
        return len(self.kinds)

    def arrays(self) -> dict[str, np.ndarray]:
        """The flat int64 arrays the core takes, by argument name."""

        def flat(values: list[int]) -> np.ndarray:
            return np.asarray(values, dtype=np.int64)

        return {
            "axis_sizes": flat(self.axis_sizes),
            "eq_kinds": flat(self.kinds),
            "eq_left": flat(self.lefts),
            "eq_right_offsets": flat(self.right_offsets),
            "eq_right": flat(self.rights),
            "frozen_axes": flat(self.frozen_axes),
            "row_params": flat(self.row_params),
            "row_dims": flat(self.row_dims),
            "row_axes": flat(self.row_axes),
        }

    def solve(self) -> DependencyGraph:
        """Run the core on these equations and return the dependency graph."""
        from depprune.graph import DependencyGraph

        return DependencyGraph.from_equations(self)
