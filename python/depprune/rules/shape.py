"""Ops that move, merge, split or cut axes: views, permutes, cat, split, slice, pad.

A reshape groups the dims of both shapes into runs with equal running
products (size-1 dims relate nothing) and makes each run a product; a
``cat`` makes the output axis the sum of its inputs' axes; a ``slice`` with
step 1 makes the input axis the sum of the part before, the slice and the
part after.

>>> from depprune.equations import AxisEquations, PRODUCT
>>> eqs = AxisEquations()
>>> hidden = [eqs.axis(s) for s in (2, 8)]
>>> heads = [eqs.axis(s) for s in (2, 4, 2)]
>>> relate_reshape(eqs, hidden, heads)
>>> eqs.kinds == [0, PRODUCT]
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from depprune.equations import AxisEquations
from depprune.rules.common import (
    Axes,
    OpCall,
    broadcast_into,
    equal_dims,
    equal_or_freeze,
    freeze_all,
    freeze_axes,
    link_groups,
    normalize_dim,
)

__all__ = ["ADOPTERS", "RULES_BY_NAME", "adopt_permuted", "relate_reshape"]


def relate_reshape(eqs: AxisEquations, src: Sequence[int], dst: Sequence[int]) -> None:
    """Relate two shapes holding the same elements in row-major order."""
    sizes = eqs.axis_sizes
    left = [a for a in src if sizes[a] != 1]
    right = [a for a in dst if sizes[a] != 1]
    left_sizes = [sizes[a] for a in left]
    right_sizes = [sizes[a] for a in right]
    if left_sizes == right_sizes and 0 not in left_sizes:
        # The common view that only adds or drops size-1 dims: dim for dim.
        for a, b in zip(left, right, strict=True):
            if a != b:
                eqs.equal(b, a)
        return
    if 0 in left_sizes or 0 in right_sizes or math.prod(left_sizes) != math.prod(right_sizes):
        # Empty tensors and dtype views are not reshapes of elements: relate nothing, safely.
        freeze_axes(eqs, src)
        freeze_axes(eqs, dst)
        return
    i = j = 0
    while i < len(left):
        run_left, run_right = [left[i]], [right[j]]
        product_left, product_right = left_sizes[i], right_sizes[j]
        i += 1
        j += 1
        while product_left != product_right:
            if product_left < product_right:
                run_left.append(left[i])
                product_left *= left_sizes[i]
                i += 1
            else:
                run_right.append(right[j])
                product_right *= right_sizes[j]
                j += 1
        link_groups(eqs, run_left, run_right)


def reshape(eqs: AxisEquations, call: OpCall) -> None:
    """view, reshape, flatten, unflatten, squeeze, unsqueeze and their aliases."""
    relate_reshape(eqs, call.args[0], call.outputs[0])


def _permuted(eqs: AxisEquations, src: Sequence[int], out: Sequence[int], order) -> None:
    for k, source in enumerate(order):
        if out[k] != src[source]:
            eqs.equal(out[k], src[source])


def permute(eqs: AxisEquations, call: OpCall) -> None:
    """Output dim ``k`` is input dim ``dims[k]``."""
    src = call.args[0]
    order = [normalize_dim(d, len(src)) for d in call.arg("dims")]
    _permuted(eqs, src, call.outputs[0], order)


def transpose(eqs: AxisEquations, call: OpCall) -> None:
    """Two dims swap places (``t`` swaps the only two of a matrix)."""
    src = call.args[0]
    order = list(range(len(src)))
    if call.arg("dim0") is None:
        # t / t_: a matrix swaps its two dims, a vector stays.
        first, second = (0, 1) if len(src) == 2 else (0, 0)
    else:
        first = normalize_dim(call.arg("dim0"), len(src))
        second = normalize_dim(call.arg("dim1"), len(src))
    order[first], order[second] = order[second], order[first]
    _permuted(eqs, src, call.outputs[0], order)


def adopt_permuted(
    eqs: AxisEquations, args: tuple, kwargs: dict, shape: Sequence[int]
) -> tuple[Axes | None, bool]:
    """A permute or transpose output is its input's axes in the new order.

    >>> eqs = AxisEquations()
    >>> x = Axes(eqs.axis(s) for s in (2, 3, 4))
    >>> adopt_permuted(eqs, (x, 0, 2), {}, (4, 3, 2))
    ((2, 1, 0), True)
    """
    if kwargs:
        return None, False  # dims by keyword: the rule reads them
    src = args[0]
    ndim = len(src)
    if len(args) > 1 and isinstance(args[1], (list, tuple)):
        order = [normalize_dim(d, ndim) for d in args[1]]  # permute(dims)
    else:
        order = list(range(ndim))
        if len(args) == 3:  # transpose(dim0, dim1)
            first, second = normalize_dim(args[1], ndim), normalize_dim(args[2], ndim)
        elif len(args) == 1 and ndim == 2:  # t
            first, second = 0, 1
        else:
            return None, False  # an odd form: the rule reads it
        order[first], order[second] = order[second], order[first]
    axes = Axes(src[k] for k in order)
    sizes = eqs.axis_sizes
    if len(axes) != len(shape) or any(sizes[a] != n for a, n in zip(axes, shape, strict=True)):
        return None, False
    return axes, True


def expand(eqs: AxisEquations, call: OpCall) -> None:
    """Broadcast: an expanded size-1 dim is a fresh axis (e.g. GQA's repeat factor)."""
    broadcast_into(eqs, call.outputs[0], call.args[0])


def repeat(eqs: AxisEquations, call: OpCall) -> None:
    """A dim repeated ``r`` times is ``product(r, dim)``: copy-major."""
    src, out = call.args[0], call.outputs[0]
    sizes = eqs.axis_sizes
    offset = len(out) - len(src)
    for k, axis in enumerate(src):
        times = call.arg("repeats")[offset + k]
        if times == 1:
            eqs.equal(out[offset + k], axis)
        elif sizes[axis] != 1:
            eqs.product(out[offset + k], [eqs.axis(times), axis])


def repeat_interleave(eqs: AxisEquations, call: OpCall) -> None:
    """Each element repeated ``r`` times in place is ``product(dim, r)``: element-major."""
    src, out = call.args[0], call.outputs[0]
    dim, repeats = call.arg("dim"), call.arg("repeats")
    if dim is None or type(repeats) is not int or len(src) != len(out):
        freeze_all(eqs, call)
        return
    d = normalize_dim(dim, len(src))
    equal_dims(
        eqs, [a for k, a in enumerate(out) if k != d], [a for k, a in enumerate(src) if k != d]
    )
    if repeats == 1:
        eqs.equal(out[d], src[d])
    else:
        eqs.product(out[d], [src[d], eqs.axis(repeats)])


def _equal_except(eqs: AxisEquations, left: Sequence[int], right: Sequence[int], d: int) -> None:
    for k, (a, b) in enumerate(zip(left, right, strict=True)):
        if k != d and a != b:
            eqs.equal(a, b)


def cat(eqs: AxisEquations, call: OpCall) -> None:
    """The output axis along ``dim`` is the sum of the inputs' axes; other dims are equal."""
    out = call.outputs[0]
    sizes = eqs.axis_sizes
    d = normalize_dim(call.arg("dim", 0), len(out))
    pieces = []
    for part in call.args[0]:
        if len(part) != len(out):
            # The legacy 1-d empty tensor that cat skips.
            continue
        _equal_except(eqs, out, part, d)
        if sizes[part[d]] > 0:
            pieces.append(part[d])
    if len(pieces) == 1:
        eqs.equal(out[d], pieces[0])
    elif pieces:
        eqs.sum(out[d], pieces)


def stack(eqs: AxisEquations, call: OpCall) -> None:
    """A new dim (frozen: its length is the number of tensors in the code) before ``dim``."""
    out = call.outputs[0]
    d = normalize_dim(call.arg("dim", 0), len(out))
    rest = [a for k, a in enumerate(out) if k != d]
    for part in call.args[0]:
        equal_dims(eqs, rest, part)
    eqs.freeze(out[d])


def split(eqs: AxisEquations, call: OpCall) -> None:
    """The input axis along ``dim`` is the sum of the pieces' axes (equal pieces are one axis)."""
    src = call.args[0]
    sizes = eqs.axis_sizes
    d = normalize_dim(call.arg("dim", 0), len(src))
    pieces = []
    for out in call.outputs:
        if out is None:
            continue
        _equal_except(eqs, src, out, d)
        if sizes[out[d]] > 0:
            pieces.append(out[d])
    if len(pieces) == 1:
        eqs.equal(src[d], pieces[0])
    elif pieces:
        eqs.sum(src[d], pieces)
        if type(call.arg("split_size")) is int:
            _same_size_pieces(eqs, pieces)


def _same_size_pieces(eqs: AxisEquations, pieces: list[int]) -> None:
    """``split(size)`` and ``chunk`` cut equal pieces, and must still do so after pruning.

    So the pieces lose the same units: they are one axis. A shorter last
    piece could not follow any cut of the others: then nothing may be cut.
    """
    sizes = eqs.axis_sizes
    if any(sizes[p] != sizes[pieces[0]] for p in pieces):
        freeze_axes(eqs, pieces)
        return
    for piece in pieces[1:]:
        eqs.equal(piece, pieces[0])


def unbind(eqs: AxisEquations, call: OpCall) -> None:
    """Each output is one index of ``dim``: that dim is frozen, the others are equal."""
    src = call.args[0]
    d = normalize_dim(call.arg("dim", 0), len(src))
    rest = [a for k, a in enumerate(src) if k != d]
    for out in call.outputs:
        if out is not None:
            equal_dims(eqs, out, rest)
    eqs.freeze(src[d])


def _slice_dim(
    eqs: AxisEquations, whole: int, piece: int, start: int | None, step: int | None
) -> None:
    """``piece`` is ``whole[start::step]`` for as many elements as ``piece`` has."""
    sizes = eqs.axis_sizes
    length, taken = sizes[whole], sizes[piece]
    if taken == length:
        eqs.equal(whole, piece)
        return
    if step not in (None, 1):
        # Strided slices are not contiguous pieces: neither side may be pruned.
        eqs.freeze(whole)
        eqs.freeze(piece)
        return
    if taken == 0:
        return
    start = 0 if start is None else start
    start = min(max(start + length if start < 0 else start, 0), length)
    parts = [piece]
    if start > 0:
        parts.insert(0, eqs.axis(start))
    after = length - start - taken
    if after > 0:
        parts.append(eqs.axis(after))
    eqs.sum(whole, parts)


def slice_(eqs: AxisEquations, call: OpCall) -> None:
    """``x[start:end]`` along ``dim``: input = sum(before, slice, after); step != 1 freezes."""
    src, out = call.args[0], call.outputs[0]
    d = normalize_dim(call.arg("dim", 0), len(src))
    _equal_except(eqs, src, out, d)
    _slice_dim(eqs, src[d], out[d], call.arg("start"), call.arg("step", 1))


def narrow(eqs: AxisEquations, call: OpCall) -> None:
    """``narrow(dim, start, length)``: a slice with step 1."""
    src, out = call.args[0], call.outputs[0]
    d = normalize_dim(call.arg("dim"), len(src))
    _equal_except(eqs, src, out, d)
    _slice_dim(eqs, src[d], out[d], call.arg("start"), 1)


def slice_scatter(eqs: AxisEquations, call: OpCall) -> None:
    """The output is ``self`` with a slice replaced by ``src``."""
    base, src, out = call.args[0], call.arg("src"), call.outputs[0]
    d = normalize_dim(call.arg("dim", 0), len(base))
    equal_dims(eqs, out, base)
    _equal_except(eqs, out, src, d)
    _slice_dim(eqs, out[d], src[d], call.arg("start"), call.arg("step", 1))


def select(eqs: AxisEquations, call: OpCall) -> None:
    """One index of ``dim`` is taken: the dim is frozen (which index is data)."""
    src = call.args[0]
    d = normalize_dim(call.arg("dim"), len(src))
    equal_dims(eqs, call.outputs[0], [a for k, a in enumerate(src) if k != d])
    eqs.freeze(src[d])


def select_scatter(eqs: AxisEquations, call: OpCall) -> None:
    """``self`` with one index of ``dim`` replaced by ``src``: that dim is frozen."""
    base, src, out = call.args[0], call.arg("src"), call.outputs[0]
    d = normalize_dim(call.arg("dim"), len(base))
    equal_dims(eqs, out, base)
    equal_dims(eqs, src, [a for k, a in enumerate(out) if k != d])
    eqs.freeze(out[d])


def constant_pad(eqs: AxisEquations, call: OpCall) -> None:
    """Padding adds frozen constant pieces on either side; cropping (negative pad) freezes."""
    src, out = call.args[0], call.outputs[0]
    pad = call.arg("pad")
    padded = {}
    for i in range(len(pad) // 2):
        before, after = pad[2 * i], pad[2 * i + 1]
        if before or after:
            padded[len(src) - 1 - i] = (before, after)
    for k, (a, b) in enumerate(zip(src, out, strict=True)):
        if k not in padded:
            if a != b:
                eqs.equal(b, a)
            continue
        before, after = padded[k]
        if before < 0 or after < 0:
            eqs.freeze(a)
            eqs.freeze(b)
            continue
        parts = [_constant_axis(eqs, before)] if before > 0 else []
        parts.append(a)
        if after > 0:
            parts.append(_constant_axis(eqs, after))
        eqs.sum(b, parts)


def _constant_axis(eqs: AxisEquations, size: int) -> int:
    """A frozen axis for elements the code adds (padding): its length is a constant."""
    axis = eqs.axis(size)
    eqs.freeze(axis)
    return axis


def edge_pad(eqs: AxisEquations, call: OpCall) -> None:
    """Reflection/replication padding copies edge elements: padded dims are frozen."""
    src, out = call.args[0], call.outputs[0]
    padded = len(call.arg("padding")) // 2
    equal_or_freeze(eqs, src, out, range(len(src) - padded, len(src)))


def unfold(eqs: AxisEquations, call: OpCall) -> None:
    """Sliding windows along ``dimension``: that dim and the window dim are frozen."""
    src, out = call.args[0], call.outputs[0]
    d = normalize_dim(call.arg("dimension"), len(src))
    _equal_except(eqs, src, out, d)
    freeze_axes(eqs, (src[d], out[d], out[-1]))


def glu(eqs: AxisEquations, call: OpCall) -> None:
    """``a * sigmoid(b)`` for the two halves of ``dim``: both halves are the output axis."""
    src, out = call.args[0], call.outputs[0]
    d = normalize_dim(call.arg("dim", -1), len(src))
    _equal_except(eqs, src, out, d)
    second = eqs.axis(eqs.axis_sizes[out[d]])
    eqs.sum(src[d], [out[d], second])
    eqs.equal(second, out[d])


def pixel_shuffle(eqs: AxisEquations, call: OpCall) -> None:
    """Channels ``C*r*r`` become ``C`` channels of an ``r``-times larger image."""
    src, out = call.args[0], call.outputs[0]
    factor = call.arg("upscale_factor")
    _shuffle_pixels(eqs, src, out, factor, channels_in=src[-3], channels_out=out[-3])


def pixel_unshuffle(eqs: AxisEquations, call: OpCall) -> None:
    """``C`` channels of an image become ``C*r*r`` channels of an ``r``-times smaller one."""
    src, out = call.args[0], call.outputs[0]
    factor = call.arg("downscale_factor")
    _shuffle_pixels(eqs, out, src, factor, channels_in=out[-3], channels_out=src[-3])


def _shuffle_pixels(eqs, wide, narrow_, factor, *, channels_in, channels_out) -> None:
    equal_dims(eqs, wide[:-3], narrow_[:-3])
    rows, cols = eqs.axis(factor), eqs.axis(factor)
    eqs.freeze(rows)
    eqs.freeze(cols)
    eqs.product(channels_in, [channels_out, rows, cols])
    freeze_axes(eqs, (*wide[-2:], *narrow_[-2:]))


def channel_shuffle(eqs: AxisEquations, call: OpCall) -> None:
    """``product(G, C/G)`` channels come out as ``product(C/G, G)``."""
    src, out = call.args[0], call.outputs[0]
    groups = call.arg("groups")
    _equal_except(eqs, src, out, 1)
    per_group = eqs.axis_sizes[src[1]] // groups
    group_axis, slot_axis = eqs.axis(groups), eqs.axis(per_group)
    eqs.product(src[1], [group_axis, slot_axis])
    eqs.product(out[1], [slot_axis, group_axis])


def as_strided(eqs: AxisEquations, call: OpCall) -> None:
    """Only the shape-keeping restride of at most one non-trivial dim is an identity."""
    src, out = call.args[0], call.outputs[0]
    sizes = eqs.axis_sizes
    same_shape = [sizes[a] for a in src] == [sizes[b] for b in out]
    if same_shape and sum(sizes[a] != 1 for a in src) <= 1 and not call.arg("storage_offset"):
        equal_dims(eqs, out, src)
    else:
        freeze_all(eqs, call)


RULES_BY_NAME = {
    **dict.fromkeys(
        (
            "view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy", "_reshape_copy",
            "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_",
            "squeeze_copy", "unsqueeze_copy", "view_as_real", "view_as_complex",
            "_reshape_alias_copy",
        ),
        reshape,
    ),
    **dict.fromkeys(("permute", "permute_copy"), permute),
    **dict.fromkeys(("transpose", "transpose_", "transpose_copy", "t", "t_", "t_copy"), transpose),
    **dict.fromkeys(("expand", "expand_copy"), expand),
    "repeat": repeat,
    "repeat_interleave": repeat_interleave,
    "cat": cat,
    "concat": cat,
    "stack": stack,
    **dict.fromkeys(
        (
            "split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes",
            "split_copy", "split_with_sizes_copy", "unsafe_chunk", "chunk",
        ),
        split,
    ),
    **dict.fromkeys(("unbind", "unbind_copy"), unbind),
    **dict.fromkeys(("slice", "slice_copy"), slice_),
    **dict.fromkeys(("narrow", "narrow_copy"), narrow),
    "slice_scatter": slice_scatter,
    **dict.fromkeys(("select", "select_copy"), select),
    "select_scatter": select_scatter,
    "constant_pad_nd": constant_pad,
    **dict.fromkeys(
        (
            "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
            "replication_pad1d", "replication_pad2d", "replication_pad3d",
        ),
        edge_pad,
    ),
    "unfold": unfold,
    "glu": glu,
    "pixel_shuffle": pixel_shuffle,
    "pixel_unshuffle": pixel_unshuffle,
    **dict.fromkeys(("channel_shuffle", "native_channel_shuffle"), channel_shuffle),
    **dict.fromkeys(("as_strided", "as_strided_", "as_strided_copy"), as_strided),
}  # fmt: skip

#: Rules whose outputs can share their input's axes (see ``common.Adopter``).
ADOPTERS = {permute: adopt_permuted, transpose: adopt_permuted}
