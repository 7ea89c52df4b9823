"""Matrix products and convolutions.

A product contracts one axis of each operand (they become one axis) and
passes the others to the output; a convolution does the same over channels,
with grouped channels written ``product(groups, channels per group)`` on both
sides so that whole groups, or the same slot in every group, go together.

>>> import torch
>>> from depprune.tracer import record
>>> result = record(torch.nn.Linear(4, 3), torch.zeros(2, 4))
>>> result.unsupported_ops
{}
"""

from __future__ import annotations

from depprune.equations import AxisEquations
from depprune.rules.common import OpCall, broadcast_into, freeze_axes

__all__ = ["RULES_BY_NAME"]


def _matmul(eqs: AxisEquations, left, right, out) -> None:
    """``left[..., n, k] @ right[..., k, m] -> out[..., n, m]`` with equal batch dims."""
    for a, b, o in zip(left[:-2], right[:-2], out[:-2], strict=True):
        eqs.equal(o, a)
        eqs.equal(o, b)
    eqs.equal(left[-1], right[-2])
    eqs.equal(out[-2], left[-2])
    eqs.equal(out[-1], right[-1])


def mm(eqs: AxisEquations, call: OpCall) -> None:
    """mm / bmm: contraction dims equal, batch and free dims pass to the output."""
    _matmul(eqs, call.args[0], call.args[1], call.outputs[0])


def addmm(eqs: AxisEquations, call: OpCall) -> None:
    """addmm / baddbmm: a product plus a bias that broadcasts to its output."""
    out = call.outputs[0]
    _matmul(eqs, call.args[1], call.args[2], out)
    broadcast_into(eqs, out, call.args[0])


def addbmm(eqs: AxisEquations, call: OpCall) -> None:
    """Batched products summed over the batch: the batch dims are contracted too."""
    left, right, out = call.args[1], call.args[2], call.outputs[0]
    eqs.equal(left[0], right[0])
    eqs.equal(left[2], right[1])
    eqs.equal(out[0], left[1])
    eqs.equal(out[1], right[2])
    broadcast_into(eqs, out, call.args[0])


def _matrix_vector(eqs: AxisEquations, matrix, vector, out) -> None:
    eqs.equal(matrix[1], vector[0])
    eqs.equal(out[0], matrix[0])


def mv(eqs: AxisEquations, call: OpCall) -> None:
    """Matrix times vector."""
    _matrix_vector(eqs, call.args[0], call.args[1], call.outputs[0])


def addmv(eqs: AxisEquations, call: OpCall) -> None:
    """Matrix times vector plus a broadcast bias."""
    out = call.outputs[0]
    _matrix_vector(eqs, call.args[1], call.args[2], out)
    broadcast_into(eqs, out, call.args[0])


def dot(eqs: AxisEquations, call: OpCall) -> None:
    """Two vectors contracted to a scalar."""
    eqs.equal(call.args[0][0], call.args[1][0])


def linear(eqs: AxisEquations, call: OpCall) -> None:
    """``x[..., in] @ weight[out, in].T + bias[out]``."""
    x, weight, bias, out = call.args[0], call.args[1], call.arg("bias"), call.outputs[0]
    for a, o in zip(x[:-1], out[:-1], strict=True):
        eqs.equal(o, a)
    eqs.equal(x[-1], weight[-1])
    if len(weight) == 2:
        eqs.equal(out[-1], weight[0])
    if bias is not None:
        broadcast_into(eqs, out, bias)


def grouped_mm(eqs: AxisEquations, call: OpCall) -> None:
    """``_grouped_mm(a, b, offs)``: one product per group, the way MoE experts run.

    The group axis (experts) and ``offs`` are routing data, so they are frozen,
    and so is the axis ``offs`` cuts into groups: the rows of a 2-d ``a``
    (tokens sorted by expert), the columns of a 2-d ``b``, or the contraction
    when both are 2-d. The other feature axes relate as in ``mm``: for MoE
    experts, ``x[S, hidden] @ w[E, hidden, out] -> [S, out]``. 3-d x 3-d is a
    batched product.
    """
    a, b, out = call.args[0], call.args[1], call.outputs[0]
    offs, bias = call.arg("offs"), call.arg("bias")
    eqs.equal(out[-2], a[-2])
    eqs.equal(out[-1], b[-1])
    if len(a) == 3 and len(b) == 3:
        for o, x, y in zip(out[:-2], a[:-2], b[:-2], strict=True):
            eqs.equal(o, x)
            eqs.equal(o, y)
    else:
        # The group axis of the 3-d operand (the 2-d x 2-d output's first dim) is frozen, and
        # so is the axis that offs cuts into groups: rows, columns or the contraction.
        freeze_axes(eqs, [t[0] for t in (a, b, out) if len(t) == 3])
        if len(a) == 2 and len(b) == 3:
            eqs.freeze(a[0])
        elif len(a) == 3:
            eqs.freeze(b[-1])
    if len(a) == 2 and len(b) == 2:
        freeze_axes(eqs, (a[-1], b[-2]))
    else:
        eqs.equal(a[-1], b[-2])
    if offs is not None:
        freeze_axes(eqs, offs)
    if bias is not None:
        eqs.equal(bias[-1], out[-1])
        freeze_axes(eqs, bias[:-1])


def convolution(eqs: AxisEquations, call: OpCall) -> None:
    """Convolutions of any rank, transposed or not, with any number of groups.

    Spatial dims (of input, output and kernel) are frozen: an output's
    spatial size is fixed by its input's, which no equation can express.
    """
    x, weight, out = call.args[0], call.args[1], call.outputs[0]
    bias = call.arg("bias")
    sizes = eqs.axis_sizes
    spatial = len(weight) - 2
    channel = len(x) - spatial - 1
    if channel == 1:
        eqs.equal(out[0], x[0])
    freeze_axes(eqs, (*x[channel + 1 :], *out[channel + 1 :], *weight[2:]))
    transposed = bool(call.arg("transposed", False)) or "transpose" in call.name
    x_channels, out_channels = x[channel], out[channel]
    if transposed:
        # weight is [in, out / groups, *kernel]
        groups = sizes[out_channels] // sizes[weight[1]]
        eqs.equal(x_channels, weight[0])
        in_slot, out_slot = None, weight[1]
    else:
        # weight is [out, in / groups, *kernel]
        groups = sizes[x_channels] // sizes[weight[1]]
        eqs.equal(out_channels, weight[0])
        in_slot, out_slot = weight[1], None
    if groups == 1:
        eqs.equal(out_channels if transposed else x_channels, weight[1])
    else:
        group_axis = eqs.axis(groups)
        _grouped(eqs, x_channels, group_axis, in_slot)
        _grouped(eqs, out_channels, group_axis, out_slot)
    if bias is not None:
        eqs.equal(bias[0], out_channels)


def _grouped(eqs: AxisEquations, channels: int, group_axis: int, slot: int | None) -> None:
    """``channels = product(groups, per group)``; one channel per group is the group axis."""
    per_group = eqs.axis_sizes[channels] // eqs.axis_sizes[group_axis]
    if per_group == 1:
        # A product with a size-1 factor would be frozen; depthwise in == out is an equality.
        eqs.equal(channels, group_axis)
    else:
        eqs.product(channels, [group_axis, slot if slot is not None else eqs.axis(per_group)])


RULES_BY_NAME = {
    **dict.fromkeys(("mm", "bmm", "_int_mm"), mm),
    **dict.fromkeys(("addmm", "baddbmm", "_addmm_activation"), addmm),
    "addbmm": addbmm,
    "mv": mv,
    "addmv": addmv,
    **dict.fromkeys(("dot", "vdot"), dot),
    "linear": linear,
    "_grouped_mm": grouped_mm,
    **dict.fromkeys(
        (
            "convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution",
            "cudnn_convolution", "cudnn_convolution_transpose", "miopen_convolution",
            "miopen_convolution_transpose", "miopen_depthwise_convolution",
            "_slow_conv2d_forward", "slow_conv3d_forward", "slow_conv_transpose2d",
            "slow_conv_transpose3d", "_conv_depthwise2d", "conv_depthwise3d",
            "_nnpack_spatial_convolution", "slow_conv_dilated2d", "slow_conv_dilated3d",
        ),
        convolution,
    ),
}  # fmt: skip
