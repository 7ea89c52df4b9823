"""Ops that pick elements by index tensors: the indexed dims are frozen.

Which elements an index tensor picks is data, so no unit of an indexed dim
may be removed; the index tensor's own dims become the output's and are
frozen too (how many elements it picks is fixed by the code or the input),
and every dim that is not indexed passes through. Writes (``index_add_``,
``x[rows] = y``, ``scatter``) relate the written values' other dims to the
target's, so a MoE layer that gathers its tokens, runs an expert and adds
the result back keeps one hidden axis. Ops that count or deduplicate values
(``bincount``, ``unique``) relate nothing and are frozen (``histc``,
``searchsorted``, ``bucketize``: :mod:`depprune.rules.position`).

>>> import torch
>>> from depprune.tracer import record
>>> record(torch.nn.Embedding(10, 4), torch.zeros(2, 3, dtype=torch.long)).unsupported_ops
{}
"""

from __future__ import annotations

import torch

from depprune.equations import AxisEquations
from depprune.rules.common import (
    Axes,
    OpCall,
    broadcast_into,
    equal_dims,
    equal_or_freeze,
    freeze_all,
    freeze_axes,
    normalize_dim,
)

__all__ = ["RULES_BY_NAME"]

_MASK_DTYPES = (torch.bool, torch.uint8)


class _Indexing:
    """How ``x[indices]`` lays out its result: the dims it picks and the dims that pass.

    An integer index tensor consumes one dim of ``x``; a boolean mask consumes
    as many dims as it has and picks a data-dependent number of elements. The
    picked dims (the broadcast of the index tensors, one dim for masks) stand
    where the first index was if the indices are adjacent, else in front.
    """

    def __init__(self, call: OpCall, x, indices: list) -> None:
        raw = call.raw_args[1] if len(call.raw_args) > 1 else None
        #: False when the dtypes of the indices (mask or integer) were not recorded.
        self.known = type(raw) in (list, tuple) and len(raw) == len(indices)
        if not self.known:
            raw = [None] * len(indices)
        self.tensors: list = []
        self.masks: list = []
        self.indexed: set[int] = set()
        entries: list[int] = []
        first = dim = 0
        for k, axes in enumerate(indices):
            if axes is None:
                dim += 1
                continue
            is_mask = raw[k] is not None and raw[k].dtype in _MASK_DTYPES
            (self.masks if is_mask else self.tensors).append(axes)
            if not entries:
                first = dim
            entries.append(k)
            width = len(axes) if is_mask else 1
            self.indexed.update(range(dim, dim + width))
            dim += width
        self.width = max([len(t) for t in self.tensors] + [1 if self.masks else 0])
        adjacent = bool(entries) and entries[-1] - entries[0] + 1 == len(entries)
        self.start = first if adjacent else 0
        self.passed = [a for k, a in enumerate(x) if k not in self.indexed]

    def layout(self) -> list[int | None]:
        """The result's dims: a passed axis of ``x``, or ``None`` for a picked dim."""
        return [*self.passed[: self.start], *[None] * self.width, *self.passed[self.start :]]


def index(eqs: AxisEquations, call: OpCall) -> None:
    """``x[i, :, j]`` with integer index tensors or boolean masks (advanced indexing)."""
    x, out = call.args[0], call.outputs[0]
    picks = _Indexing(call, x, call.arg("indices"))
    if not picks.known or not picks.indexed or len(out) != len(picks.layout()):
        freeze_all(eqs, call)
        return
    picked = out[picks.start : picks.start + picks.width]
    for tensor in picks.tensors:
        broadcast_into(eqs, picked, tensor)
        freeze_axes(eqs, tensor)
    for mask in picks.masks:
        # How many elements a mask picks is data.
        freeze_axes(eqs, mask)
        freeze_axes(eqs, picked)
    equal_dims(eqs, [*out[: picks.start], *out[picks.start + picks.width :]], picks.passed)
    freeze_axes(eqs, [x[k] for k in sorted(picks.indexed)])


def index_put(eqs: AxisEquations, call: OpCall) -> None:
    """``x[i, :, j] = values``: ``values`` broadcasts to what ``x[i, :, j]`` would be.

    Indexed dims are frozen (which elements are written is data); the dims
    that pass relate to the matching dims of ``values``, so ``x[tokens] = y``
    keeps the feature axis of ``x`` and ``y`` one axis.
    """
    x, out, values = call.args[0], call.outputs[0], call.arg("values")
    equal_dims(eqs, out, x)
    picks = _Indexing(call, x, call.arg("indices"))
    layout = picks.layout()
    if (
        not picks.known
        or not picks.indexed
        or type(values) is not Axes
        or len(values) > len(layout)
    ):
        freeze_all(eqs, call)
        return
    for tensor in (*picks.tensors, *picks.masks):
        freeze_axes(eqs, tensor)
    freeze_axes(eqs, [x[k] for k in sorted(picks.indexed)])
    sizes = eqs.axis_sizes
    for axis, target in zip(reversed(values), reversed(layout), strict=False):
        if target is None:
            eqs.freeze(axis)
        elif sizes[axis] == sizes[target]:
            if axis != target:
                eqs.equal(axis, target)
        elif sizes[axis] != 1:
            freeze_axes(eqs, (axis, target))


def index_select(eqs: AxisEquations, call: OpCall) -> None:
    """``x.index_select(dim, index)``: ``dim`` is frozen on both sides, others pass."""
    x, out = call.args[0], call.outputs[0]
    d = normalize_dim(call.arg("dim"), len(x))
    equal_or_freeze(eqs, x, out, (d,))


def gather(eqs: AxisEquations, call: OpCall) -> None:
    """``x.gather(dim, index)``: the output has the index's shape."""
    x, out, picks = call.args[0], call.outputs[0], call.arg("index")
    sizes = eqs.axis_sizes
    d = normalize_dim(call.arg("dim"), len(x))
    equal_dims(eqs, out, picks)
    freeze_axes(eqs, picks)
    for k, (a, b) in enumerate(zip(x, out, strict=True)):
        if k != d and sizes[a] == sizes[b]:
            eqs.equal(b, a)
        else:
            # The gathered dim, or one the index only partly covers.
            eqs.freeze(a)


def scatter(eqs: AxisEquations, call: OpCall) -> None:
    """scatter, scatter_add, scatter_reduce: ``self`` with elements along ``dim`` written by index.

    ``index`` (and ``src``) may be shorter than ``self`` in any dim: a dim
    they cover fully is one axis with ``self``'s, a dim they cover in part is
    frozen everywhere (which elements are written depends on its length).
    """
    x, out = call.args[0], call.outputs[0]
    equal_dims(eqs, out, x)
    d = normalize_dim(call.arg("dim"), len(x))
    sizes = eqs.axis_sizes
    others = [t for t in (call.arg("index"), call.arg("src")) if type(t) is Axes]
    for other in others:
        if len(other) != len(x):
            freeze_all(eqs, call)
            return
    eqs.freeze(x[d])
    for other in others:
        eqs.freeze(other[d])
    for k, axis in enumerate(x):
        if k == d:
            continue
        if all(sizes[other[k]] == sizes[axis] for other in others):
            for other in others:
                eqs.equal(other[k], axis)
        else:
            freeze_axes(eqs, [axis, *(other[k] for other in others)])


def index_add(eqs: AxisEquations, call: OpCall) -> None:
    """index_add, index_copy, index_reduce: slices of ``source`` go to rows of ``self``.

    Which rows of ``dim`` is data (frozen, with the index); every other dim of
    ``source`` is the same axis as ``self``'s: a MoE layer adds each expert's
    output for its tokens back, the hidden axis flows through.
    """
    x, out = call.args[0], call.outputs[0]
    source = call.arg("source")
    equal_dims(eqs, out, x)
    d = normalize_dim(call.arg("dim"), len(x))
    freeze_axes(eqs, call.arg("index"))
    if type(source) is not Axes or len(source) != len(x):
        # A 0-d source (one value for every row) relates no dim.
        eqs.freeze(x[d])
        if type(source) is Axes:
            freeze_axes(eqs, source)
        return
    equal_or_freeze(eqs, x, source, (d,))


def index_fill(eqs: AxisEquations, call: OpCall) -> None:
    """index_fill: rows of ``dim`` picked by index get one value; the other dims pass."""
    x, out = call.args[0], call.outputs[0]
    equal_dims(eqs, out, x)
    eqs.freeze(x[normalize_dim(call.arg("dim"), len(x))])
    for other in call.tensors():
        if other is not x:
            freeze_axes(eqs, other)


RULES_BY_NAME = {
    **dict.fromkeys(("index", "_unsafe_index"), index),
    "index_select": index_select,
    **dict.fromkeys(
        ("index_put", "index_put_", "_unsafe_index_put", "_index_put_impl_"), index_put
    ),
    "gather": gather,
    **dict.fromkeys(
        ("scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_"),
        scatter,
    ),
    **dict.fromkeys(
        ("index_add", "index_add_", "index_copy", "index_copy_", "index_reduce", "index_reduce_"),
        index_add,
    ),
    **dict.fromkeys(("index_fill", "index_fill_"), index_fill),
    **dict.fromkeys(
        (
            "masked_scatter", "masked_scatter_", "masked_select", "take", "nonzero",
            "nonzero_static", "put", "put_", "embedding_bag", "_embedding_bag",
            "_embedding_bag_forward_only",
            # counting and deduplicating values (histc, searchsorted: rules/position.py)
            "bincount", "_unique2", "unique_dim", "unique_consecutive",
        ),
        freeze_all,
    ),
}  # fmt: skip
