"""What every axis rule works with: the :class:`OpCall` record and small helpers.

A rule is a function ``rule(eqs, call)`` that emits equations on an
:class:`~depprune.equations.AxisEquations` for one ATen call. In ``call``
every tensor argument is replaced by its :class:`Axes` (one axis id per
dim), so a rule never touches tensor data; sizes come from
``eqs.axis_sizes``.

>>> from depprune.equations import AxisEquations
>>> eqs = AxisEquations()
>>> x = Axes(eqs.axis(s) for s in (2, 3))
>>> out = Axes(eqs.axis(s) for s in (2, 3))
>>> equal_dims(eqs, out, x)
>>> eqs.num_equations
2
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import Any

from depprune.equations import AxisEquations

__all__ = [
    "Adopter",
    "Axes",
    "OpCall",
    "Rule",
    "broadcast_into",
    "equal_dims",
    "equal_or_freeze",
    "equal_or_freeze_outputs",
    "freeze_all",
    "freeze_axes",
    "link_groups",
    "normalize_dim",
    "shape_of",
]


class Axes(tuple):
    """The axis ids of one tensor, one per dim (a tuple, told apart from int lists)."""

    __slots__ = ()


class OpCall:
    """One recorded ATen call: its overload, arguments as :class:`Axes`, and outputs.

    ``outputs`` holds one entry per returned value, flattened one level
    (``split`` returns a list): the output's :class:`Axes`, or ``None`` for a
    value that is not a tensor. A rule may return a note (a string) that the
    trace reports once, with a count.
    """

    __slots__ = ("args", "func", "kwargs", "outputs", "raw_args")

    def __init__(
        self,
        func: Any,
        args: tuple,
        kwargs: dict[str, Any],
        outputs: list[Axes | None],
        raw_args: tuple = (),
    ) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.outputs = outputs
        #: The positional arguments as the op got them (for dtypes; never read values).
        self.raw_args = raw_args

    def arg(self, name: str, default: Any = None) -> Any:
        """The argument called ``name`` in the op's schema, positional or keyword."""
        position = _positions(self.func).get(name)
        if position is not None and position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name, default)

    def arg_or_default(self, name: str) -> Any:
        """The argument called ``name``, or its schema default when the call leaves it out.

        ``None`` when the schema has no such argument (``msort`` has no ``dim``).
        """
        position = _positions(self.func).get(name)
        if position is not None and position < len(self.args):
            return self.args[position]
        if name in self.kwargs:
            return self.kwargs[name]
        if position is None:
            return None
        return self.func._schema.arguments[position].default_value

    def tensors(self) -> Iterator[Axes]:
        """Every tensor argument, including those inside lists, in order."""
        for value in (*self.args, *self.kwargs.values()):
            if type(value) is Axes:
                yield value
            elif type(value) in (list, tuple):
                for item in value:
                    if type(item) is Axes:
                        yield item

    @property
    def name(self) -> str:
        return str(self.func.overloadpacket)


Rule = Callable[[AxisEquations, OpCall], "str | None"]

#: ``adopt(eqs, args, kwargs, shape) -> (axes, done)``: axes a new output can share with
#: an input instead of fresh axes tied by equations (``None``: it cannot), and whether
#: that leaves nothing for the rule to relate. The tracer's fast path for common ops.
Adopter = Callable[[AxisEquations, tuple, dict, Sequence[int]], "tuple[Axes | None, bool]"]

_POSITIONS: dict[Any, dict[str, int]] = {}


def _positions(func: Any) -> dict[str, int]:
    """Argument positions by name, read once per overload from its schema."""
    positions = _POSITIONS.get(func)
    if positions is None:
        positions = {arg.name: i for i, arg in enumerate(func._schema.arguments)}
        _POSITIONS[func] = positions
    return positions


def shape_of(eqs: AxisEquations, axes: Sequence[int]) -> list[int]:
    """The sizes of ``axes``."""
    sizes = eqs.axis_sizes
    return [sizes[a] for a in axes]


def normalize_dim(dim: int, ndim: int) -> int:
    """A possibly negative dim as an index into a shape of ``ndim`` dims."""
    return dim + ndim if dim < 0 else dim


def equal_dims(eqs: AxisEquations, left: Sequence[int], right: Sequence[int]) -> None:
    """Equate two equally long axis lists pairwise (skipping pairs that are one axis)."""
    for a, b in zip(left, right, strict=True):
        if a != b:
            eqs.equal(a, b)


def equal_or_freeze(
    eqs: AxisEquations, src: Sequence[int], out: Sequence[int], frozen: Container[int]
) -> None:
    """Freeze dims ``frozen`` on both sides (elements move along them); equate the others."""
    for k, (a, b) in enumerate(zip(src, out, strict=True)):
        if k in frozen:
            eqs.freeze(a)
            eqs.freeze(b)
        elif a != b:
            eqs.equal(b, a)


def equal_or_freeze_outputs(eqs: AxisEquations, call: OpCall, frozen: Iterable[int]) -> None:
    """:func:`equal_or_freeze` from the first input to every tensor output.

    ``frozen`` dims may be negative. An output of another rank than the input
    is not understood: it and the input freeze whole.
    """
    src = call.args[0]
    dims = {normalize_dim(d, len(src)) for d in frozen}
    for out in call.outputs:
        if out is None:
            continue
        if len(out) == len(src):
            equal_or_freeze(eqs, src, out, dims)
        else:
            freeze_axes(eqs, src)
            freeze_axes(eqs, out)


def broadcast_into(eqs: AxisEquations, out: Sequence[int], operand: Sequence[int]) -> None:
    """Relate an operand to the output it broadcasts to, aligning dims from the right.

    Dims of the same size are the same axis; a size-1 dim that was broadcast
    relates nothing.
    """
    sizes = eqs.axis_sizes
    for o, a in zip(reversed(out), reversed(operand), strict=False):
        if o != a and sizes[o] == sizes[a]:
            eqs.equal(o, a)


def freeze_axes(eqs: AxisEquations, axes: Sequence[int]) -> None:
    """Freeze every axis in ``axes``."""
    for a in axes:
        eqs.freeze(a)


def freeze_all(eqs: AxisEquations, call: OpCall) -> None:
    """Freeze every axis of every tensor the call reads or writes."""
    for axes in call.tensors():
        freeze_axes(eqs, axes)
    for axes in call.outputs:
        if axes is not None:
            freeze_axes(eqs, axes)


def link_groups(eqs: AxisEquations, left: Sequence[int], right: Sequence[int]) -> None:
    """Relate two runs of axes that hold the same elements in row-major order.

    One axis on each side is an equality; several on one side make the single
    axis on the other their product; several on both sides share a new merged
    axis that is the product of each run.
    """
    if len(left) == 1 and len(right) == 1:
        if left[0] != right[0]:
            eqs.equal(left[0], right[0])
    elif len(right) == 1:
        eqs.product(right[0], left)
    elif len(left) == 1:
        eqs.product(left[0], right)
    else:
        sizes = eqs.axis_sizes
        merged = 1
        for a in left:
            merged *= sizes[a]
        axis = eqs.axis(merged)
        eqs.product(axis, left)
        eqs.product(axis, right)
