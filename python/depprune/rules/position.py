"""Ops whose values depend on positions along a dim: that dim is frozen.

The axis algebra relates elements, not positions: removing unit ``u`` drops
the elements at ``u`` and leaves every other element as it was. An op whose
output depends on *where* an element sits along a dim (``arange``, a causal
``tril``, a running ``cumsum``, a sort, a ``flip``, a bucket index) computes
other values once that dim is cut, so the dim is frozen on both sides and
every other dim passes through. Ops that treat a dim's elements as a set
(``softmax``, ``sum``, ``amax``) are not here and keep the dim prunable;
reductions that return indices (``argmax``, ``max(dim)``) freeze the reduced
dim in :mod:`depprune.rules.reduce`.

>>> import torch
>>> from depprune.equations import AxisEquations
>>> from depprune.rules.common import Axes, OpCall
>>> eqs = AxisEquations()
>>> x, out = Axes(eqs.axis(s) for s in (2, 3)), Axes(eqs.axis(s) for s in (2, 3))
>>> scan(eqs, OpCall(torch.ops.aten.cumsum.default, (x, -1), {}, [out]))
>>> sorted(eqs.frozen_axes) == sorted([x[1], out[1]]), eqs.num_equations
(True, 1)
"""

from __future__ import annotations

from depprune.equations import AxisEquations
from depprune.rules.common import (
    Axes,
    OpCall,
    equal_dims,
    equal_or_freeze_outputs,
    freeze_all,
    freeze_axes,
)

__all__ = ["RULES_BY_NAME"]


def triangle(eqs: AxisEquations, call: OpCall) -> None:
    """tril, triu: which elements are kept depends on (row, column): the last two dims freeze."""
    equal_or_freeze_outputs(eqs, call, (-2, -1))


def scan(eqs: AxisEquations, call: OpCall) -> None:
    """cumsum, cummax, ...: element ``i`` folds the elements before it: ``dim`` freezes."""
    equal_or_freeze_outputs(eqs, call, (call.arg("dim"),))


def reorder(eqs: AxisEquations, call: OpCall) -> None:
    """sort, topk, ...: output position ``i`` holds the ``i``-th by value: ``dim`` freezes."""
    dim = call.arg_or_default("dim")
    # msort has no dim argument: it sorts dim 0.
    equal_or_freeze_outputs(eqs, call, (0 if dim is None else dim,))


def flip(eqs: AxisEquations, call: OpCall) -> None:
    """flip, roll, rot90: elements change places along ``dims``, which freeze.

    ``roll`` without dims rolls the flattened tensor: every dim freezes.
    """
    dims = call.arg_or_default("dims")
    if not dims:
        freeze_all(eqs, call)
        return
    equal_or_freeze_outputs(eqs, call, dims)


def search(eqs: AxisEquations, call: OpCall) -> None:
    """searchsorted, bucketize: each value's answer is a position along the boundaries.

    The boundaries' last dim (and the sorter's) freezes; their leading dims
    are the values' leading dims; the output has the values' shape, one
    answer per value, so bucketizing features keeps them prunable.
    """
    values, out = call.arg("self"), call.outputs[0]
    for boundaries in (call.arg("sorted_sequence"), call.arg("boundaries"), call.arg("sorter")):
        if type(boundaries) is not Axes:
            continue
        if type(values) is Axes and len(boundaries) == len(values) > 1:
            equal_dims(eqs, boundaries[:-1], values[:-1])
            eqs.freeze(boundaries[-1])
        else:
            freeze_axes(eqs, boundaries)
    if type(values) is Axes:
        equal_dims(eqs, out, values)


def histogram(eqs: AxisEquations, call: OpCall) -> None:
    """histc: the output's bins are positions (frozen); the input is counted as a set."""
    freeze_axes(eqs, call.outputs[0])


#: Tensors whose values are positions or functions of them (frozen), from shape arguments.
#: Constant and random creation (``zeros``, ``full``, ``randn``) does not depend on
#: positions: its fresh axes stay free (``elementwise.CREATION_OPS``).
POSITION_CREATION_OPS = (
    "arange", "range", "linspace", "logspace", "eye", "randperm", "tril_indices",
    "triu_indices", "hann_window", "hamming_window", "blackman_window", "bartlett_window",
    "kaiser_window",
)  # fmt: skip

RULES_BY_NAME = {
    **dict.fromkeys(POSITION_CREATION_OPS, freeze_all),
    **dict.fromkeys(("tril", "triu"), triangle),
    **dict.fromkeys(
        ("cumsum", "cumprod", "logcumsumexp", "_logcumsumexp", "cummax", "cummin"), scan
    ),
    **dict.fromkeys(("sort", "argsort", "topk", "msort"), reorder),
    **dict.fromkeys(("flip", "roll", "rot90"), flip),
    **dict.fromkeys(("searchsorted", "bucketize"), search),
    "histc": histogram,
}  # fmt: skip
