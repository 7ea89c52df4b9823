"""Layers that ATen keeps whole: norms, pooling, upsampling, attention, recurrent cells.

Spatial dims (pooling windows, upsampling, convolution) are frozen: an
output's spatial size is fixed by its input's and no equation says how.
Norm parameters lie along the normalised axes. Attention ties query and key
feature axes, key and value positions, and value features to the output.

>>> import torch
>>> from depprune.tracer import record
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
>>> record(model, torch.zeros(2, 4)).unsupported_ops
{}
"""

from __future__ import annotations

from depprune.equations import AxisEquations
from depprune.rules.common import (
    OpCall,
    broadcast_into,
    equal_dims,
    freeze_all,
    freeze_axes,
)

__all__ = ["RULES_BY_NAME"]


def batch_norm(eqs: AxisEquations, call: OpCall) -> None:
    """weight, bias, running mean and variance (and saved statistics) lie along dim 1."""
    x = call.args[0]
    channels = x[1] if len(x) > 1 else x[0]
    sizes = eqs.axis_sizes
    for vector in (*call.tensors(), *call.outputs[1:]):
        if vector is not None and len(vector) == 1 and sizes[vector[0]] == sizes[channels]:
            if vector[0] != channels:
                eqs.equal(vector[0], channels)
    equal_dims(eqs, call.outputs[0], x)


def layer_norm(eqs: AxisEquations, call: OpCall) -> str | None:
    """layer and RMS norms: parameters along the normalised trailing dims."""
    x = call.args[0]
    normalized = len(call.arg("normalized_shape"))
    lead = len(x) - normalized
    parameters = [call.arg(name) for name in ("weight", "bias")]
    for parameter in parameters:
        if parameter is not None:
            equal_dims(eqs, parameter, x[lead:])
    equal_dims(eqs, call.outputs[0], x)
    for statistic in call.outputs[1:]:
        if statistic is not None:
            equal_dims(eqs, statistic[:lead], x[:lead])
    if all(p is None for p in parameters):
        # No parameter records the width (LayerNorm(elementwise_affine=False)): the
        # module's normalized_shape could not follow a cut, so the width is fixed.
        freeze_axes(eqs, x[lead:])
        return "a layer norm without weight or bias keeps its normalised dims whole"
    return None


def group_norm(eqs: AxisEquations, call: OpCall) -> str | None:
    """Channels are ``product(groups, channels per group)``; parameters along channels."""
    x, out = call.args[0], call.outputs[0]
    groups = call.arg("group")
    channels = x[1]
    equal_dims(eqs, out, x)
    parameters = [call.arg(name) for name in ("weight", "bias")]
    for parameter in parameters:
        if parameter is not None:
            eqs.equal(parameter[0], channels)
    per_group = eqs.axis_sizes[channels] // groups
    group_axis = channels
    if groups > 1 and per_group > 1:
        group_axis = eqs.axis(groups)
        eqs.product(channels, [group_axis, eqs.axis(per_group)])
    for statistic in call.outputs[1:]:
        if statistic is not None and len(statistic) == 2:
            eqs.equal(statistic[0], x[0])
            if groups > 1:
                eqs.equal(statistic[1], group_axis)
    if all(p is None for p in parameters):
        # GroupNorm(affine=False): num_groups/num_channels could not follow a cut.
        eqs.freeze(channels)
        return "a group norm without weight or bias keeps its channels whole"
    return None


def prelu(eqs: AxisEquations, call: OpCall) -> None:
    """PReLU: a weight viewed to the input's rank broadcasts; a 1-d weight is channels (dim 1)."""
    x, weight, out = call.args[0], call.args[1], call.outputs[0]
    equal_dims(eqs, out, x)
    if len(weight) == len(x):
        broadcast_into(eqs, out, weight)
    elif len(weight) == 1 and eqs.axis_sizes[weight[0]] > 1:
        eqs.equal(weight[0], x[1] if len(x) > 1 else x[0])


def embedding(eqs: AxisEquations, call: OpCall) -> None:
    """Rows are picked by data (frozen, like the indices); features are the last dim."""
    weight, indices, out = call.args[0], call.args[1], call.outputs[0]
    equal_dims(eqs, out[:-1], indices)
    freeze_axes(eqs, indices)
    eqs.equal(out[-1], weight[1])
    eqs.freeze(weight[0])


def spatial(count: int):
    """A rule for ops over the last ``count`` dims of ``[..., C, *spatial]`` tensors.

    Leading dims (batch, channels) pass through; the spatial dims of the input
    and every output are frozen, and so is every other tensor (indices, grids).
    """

    def rule(eqs: AxisEquations, call: OpCall) -> None:
        x = call.args[0]
        lead = len(x) - count
        freeze_axes(eqs, x[lead:])
        for other in call.tensors():
            if other is not x:
                freeze_axes(eqs, other)
        for out in call.outputs:
            if out is None:
                continue
            equal_dims(eqs, out[:lead], x[:lead])
            freeze_axes(eqs, out[lead:])

    rule.__doc__ = f"Channels-first op over {count} spatial dims: leading dims equal."
    return rule


def attention(eqs: AxisEquations, call: OpCall) -> str | None:
    """Scaled dot-product attention, ``[..., heads, length, features]`` operands.

    q and k features are one axis, k and v positions are one axis, the output
    takes q's positions and v's features. With fewer key/value heads than
    query heads (GQA), query heads are ``product(kv heads, repeat)``.
    """
    q, k, v = call.args[0], call.args[1], call.args[2]
    out = call.outputs[0]
    sizes = eqs.axis_sizes
    heads = len(q) - 3
    for i in range(len(q) - 2):
        eqs.equal(out[i], q[i])
        if sizes[k[i]] == sizes[v[i]]:
            eqs.equal(k[i], v[i])
        if sizes[q[i]] == sizes[k[i]]:
            eqs.equal(q[i], k[i])
        elif i == heads and sizes[k[i]] > 1 and sizes[q[i]] % sizes[k[i]] == 0:
            eqs.product(q[i], [k[i], eqs.axis(sizes[q[i]] // sizes[k[i]])])
    eqs.equal(q[-1], k[-1])
    eqs.equal(k[-2], v[-2])
    eqs.equal(out[-2], q[-2])
    eqs.equal(out[-1], v[-1])
    mask = call.arg("attn_mask")
    if mask is None:
        mask = call.arg("attn_bias")
    if mask is not None:
        broadcast_into(eqs, [*out[:-1], k[-2]], mask)
    if call.arg("scale") is None and sizes[q[-1]] > 1:
        return (
            f"{call.name} has no explicit scale: pruning its head_dim changes the "
            "default 1/sqrt(head_dim) softmax scale"
        )
    return None


def native_multi_head_attention(eqs: AxisEquations, call: OpCall) -> None:
    """nn.MultiheadAttention's fused kernel: one embed_dim inside and out.

    The kernel splits ``qkv_weight`` rows into q, k and v of ``embed_dim``
    each (``product(3, embed_dim)``) and requires the input width to be
    ``embed_dim`` too, so all of them are one axis, split into
    ``product(heads, head_dim)``.
    """
    q, k, v, out = call.args[0], call.args[1], call.args[2], call.outputs[0]
    embed = q[-1]
    num_heads = call.arg("num_head")
    for i in range(len(q) - 2):
        eqs.equal(q[i], k[i])
        eqs.equal(k[i], v[i])
        eqs.equal(out[i], q[i])
    eqs.equal(out[-2], q[-2])
    eqs.equal(k[-2], v[-2])
    for axis in (k[-1], v[-1], out[-1]):
        eqs.equal(axis, embed)
    qkv_weight, qkv_bias = call.arg("qkv_weight"), call.arg("qkv_bias")
    proj_weight, proj_bias = call.arg("proj_weight"), call.arg("proj_bias")
    size = eqs.axis_sizes[embed]
    # Rows are q, k, v of embed_dim each; which of the three is not a prunable choice.
    which = eqs.axis(3)
    eqs.freeze(which)
    eqs.product(qkv_weight[0], [which, embed])
    for axis in (qkv_weight[1], proj_weight[0], proj_weight[1]):
        eqs.equal(axis, embed)
    if qkv_bias is not None:
        eqs.equal(qkv_bias[0], qkv_weight[0])
    if proj_bias is not None:
        eqs.equal(proj_bias[0], embed)
    head_dim = size // num_heads
    if num_heads > 1 and head_dim > 1:
        eqs.product(embed, [eqs.axis(num_heads), eqs.axis(head_dim)])
    mask = call.arg("mask")
    if mask is not None:
        freeze_axes(eqs, mask)


def frozen_layer(eqs: AxisEquations, call: OpCall) -> str:
    """Fused recurrent and transformer layers: their gates and parts are not expressed."""
    freeze_all(eqs, call)
    return f"{call.name}: fused layer, every axis it touches is frozen"


RULES_BY_NAME = {
    **dict.fromkeys(
        (
            "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
            "_native_batch_norm_legit_functional", "batch_norm", "_batch_norm_impl_index",
            "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_with_update",
            "_batch_norm_no_update", "instance_norm",
        ),
        batch_norm,
    ),
    **dict.fromkeys(("native_layer_norm", "layer_norm", "_fused_rms_norm", "rms_norm"), layer_norm),
    "native_group_norm": group_norm,
    **dict.fromkeys(("prelu", "_prelu_kernel"), prelu),
    "embedding": embedding,
    **dict.fromkeys(
        (
            "max_pool1d", "max_pool1d_with_indices", "avg_pool1d", "adaptive_avg_pool1d",
            "adaptive_max_pool1d", "upsample_nearest1d", "_upsample_nearest_exact1d",
            "upsample_linear1d",
        ),
        spatial(1),
    ),
    **dict.fromkeys(
        (
            "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "_adaptive_avg_pool2d",
            "adaptive_avg_pool2d", "adaptive_max_pool2d", "mkldnn_max_pool2d",
            "fractional_max_pool2d", "max_unpool2d", "upsample_nearest2d",
            "_upsample_nearest_exact2d", "upsample_bilinear2d", "_upsample_bilinear2d_aa",
            "upsample_bicubic2d", "_upsample_bicubic2d_aa", "grid_sampler_2d",
        ),
        spatial(2),
    ),
    **dict.fromkeys(
        (
            "max_pool3d", "max_pool3d_with_indices", "avg_pool3d", "_adaptive_avg_pool3d",
            "adaptive_avg_pool3d", "adaptive_max_pool3d", "mkldnn_max_pool3d",
            "max_unpool3d", "upsample_nearest3d", "_upsample_nearest_exact3d",
            "upsample_trilinear3d", "grid_sampler_3d",
        ),
        spatial(3),
    ),
    **dict.fromkeys(
        (
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_fused_attention_overrideable",
            "_scaled_dot_product_attention_math", "_scaled_dot_product_attention_math_for_mps",
            "scaled_dot_product_attention", "_efficient_attention_forward",
        ),
        attention,
    ),
    "_native_multi_head_attention": native_multi_head_attention,
    **dict.fromkeys(
        (
            "lstm", "gru", "rnn_tanh", "rnn_relu", "mkldnn_rnn_layer", "_cudnn_rnn", "miopen_rnn",
            "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
            "rnn_tanh_cell", "rnn_relu_cell", "quantized_lstm", "_lstm_mps",
            "_transformer_encoder_layer_fwd",
        ),
        frozen_layer,
    ),
}  # fmt: skip
