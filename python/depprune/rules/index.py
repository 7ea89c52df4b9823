"""Ops that pick elements by index tensors: the indexed dims are frozen.

Which elements an index tensor picks is data, so no unit of an indexed dim
may be removed; the index tensor's own dims become the output's and are
frozen too (how many elements it picks is fixed by the code or the input),
and every dim that is not indexed passes through.

>>> import torch
>>> from depprune.tracer import record
>>> record(torch.nn.Embedding(10, 4), torch.zeros(2, 3, dtype=torch.long)).unsupported_ops
{}
"""

from __future__ import annotations

import torch

from depprune.equations import AxisEquations
from depprune.rules.common import (
    OpCall,
    broadcast_into,
    equal_dims,
    freeze_all,
    freeze_axes,
    normalize_dim,
)

__all__ = ["RULES_BY_NAME"]

_MASK_DTYPES = (torch.bool, torch.uint8)


def index(eqs: AxisEquations, call: OpCall) -> None:
    """``x[i, :, j]`` with integer index tensors (advanced indexing)."""
    x, out = call.args[0], call.outputs[0]
    indices = call.arg("indices")
    raw = call.raw_args[1] if len(call.raw_args) > 1 else ()
    positions = [k for k, t in enumerate(indices) if t is not None]
    if not positions or any(raw[k] is not None and raw[k].dtype in _MASK_DTYPES for k in positions):
        # Boolean masks pick a data-dependent number of elements.
        freeze_all(eqs, call)
        return
    tensors = [indices[k] for k in positions]
    width = max(len(t) for t in tensors)
    adjacent = positions[-1] - positions[0] + 1 == len(positions)
    start = positions[0] if adjacent else 0
    picked = out[start : start + width]
    for tensor in tensors:
        broadcast_into(eqs, picked, tensor)
        freeze_axes(eqs, tensor)
    indexed = set(positions)
    equal_dims(
        eqs,
        [*out[:start], *out[start + width :]],
        [a for k, a in enumerate(x) if k not in indexed],
    )
    freeze_axes(eqs, [x[k] for k in positions])


def index_select(eqs: AxisEquations, call: OpCall) -> None:
    """``x.index_select(dim, index)``: ``dim`` is frozen on both sides, others pass."""
    x, out = call.args[0], call.outputs[0]
    d = normalize_dim(call.arg("dim"), len(x))
    for k, (a, b) in enumerate(zip(x, out, strict=True)):
        if k == d:
            eqs.freeze(a)
            eqs.freeze(b)
        elif a != b:
            eqs.equal(b, a)


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
    """scatter, index_add, index_fill, ...: ``self`` with its ``dim`` written by index."""
    x, out = call.args[0], call.outputs[0]
    equal_dims(eqs, out, x)
    d = normalize_dim(call.arg("dim"), len(x))
    eqs.freeze(x[d])
    for other in call.tensors():
        if other is not x:
            freeze_axes(eqs, other)


RULES_BY_NAME = {
    **dict.fromkeys(("index", "_unsafe_index"), index),
    "index_select": index_select,
    "gather": gather,
    **dict.fromkeys(
        (
            "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce",
            "scatter_reduce_", "index_add", "index_add_", "index_copy", "index_copy_",
            "index_fill", "index_fill_", "index_reduce", "index_reduce_",
        ),
        scatter,
    ),
    **dict.fromkeys(
        (
            "index_put", "index_put_", "_unsafe_index_put", "_index_put_impl_", "masked_scatter",
            "masked_scatter_", "masked_select", "take", "nonzero", "nonzero_static", "put",
            "put_", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only",
        ),
        freeze_all,
    ),
}  # fmt: skip
