"""Trace + rules: each ATen op family on a tiny model, checked on the groups it yields.

Every test also checks that each emitted equation is size-consistent (equal
sizes match, sums add up, products multiply) and that every parameter row
names an axis of the parameter's own size.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_DECODER, LSTMClassifier
from torch import nn

from depprune.equations import EQUAL, SUM
from depprune.errors import TraceError, UnsupportedOpError
from depprune.tracer import TraceResult, record

# -- helpers ---------------------------------------------------------------------


def assert_consistent(result: TraceResult, model: nn.Module | None = None) -> None:
    """Every equation is size-consistent; every parameter row fits its tensor."""
    eqs = result.equations
    sizes = eqs.axis_sizes
    for row, kind in enumerate(eqs.kinds):
        left = sizes[eqs.lefts[row]]
        parts = [sizes[a] for a in eqs.rights[eqs.right_offsets[row] : eqs.right_offsets[row + 1]]]
        if kind == EQUAL:
            assert parts == [left], f"equation {row}: equal sizes {left} != {parts}"
        elif kind == SUM:
            assert sum(parts) == left, f"equation {row}: sum {parts} != {left}"
        else:
            assert math.prod(parts) == left, f"equation {row}: product {parts} != {left}"
    if model is not None:
        tensors = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        for param, dim, axis in zip(eqs.row_params, eqs.row_dims, eqs.row_axes, strict=True):
            assert tensors[eqs.param_names[param]].shape[dim] == sizes[axis]
    assert not [n for n in result.notes if "rule failed" in n], result.notes


def trace(model, inputs, **kwargs) -> TraceResult:
    result = record(model, inputs, **kwargs)
    assert_consistent(result, model if isinstance(model, nn.Module) else None)
    return result


def groups_of(result: TraceResult) -> list[tuple[int, set]]:
    """(size, member set) of every group, sorted by size then members."""
    graph = result.equations.solve()
    return sorted(
        ((g.size, set(g.members)) for g in graph.groups), key=lambda g: (g[0], sorted(g[1]))
    )


def group_sizes(result: TraceResult) -> list[int]:
    return sorted(g.size for g in result.equations.solve().groups)


def unit_map(result: TraceResult, member: tuple[str, int], size: int) -> list[int]:
    """The unit map of ``member`` in the only group of ``size`` units that holds it."""
    graph = result.equations.solve()
    [group] = [g for g in graph.groups if g.size == size and member in g.members]
    return graph.unit_maps(group)[member].tolist()


def frozen(result: TraceResult) -> set[int]:
    return set(result.equations.frozen_axes)


def members(*names: str, dim: int = 0) -> set[tuple[str, int]]:
    return {(name, dim) for name in names}


# -- linear layers, MLPs ----------------------------------------------------------


def test_mlp_hidden_neurons_form_one_group_and_io_is_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    result = trace(model, torch.randn(2, 4))
    assert groups_of(result) == [(16, {("0.weight", 0), ("0.bias", 0), ("2.weight", 1)})]
    assert result.unsupported_ops == {}
    assert result.num_ops == 5
    for axes in (*result.input_axes, *result.output_axes):
        assert set(axes) <= frozen(result)


def test_tied_weights_share_axes():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(torch.relu(self.mid(self.embed(tokens))))

    model = Tied()
    result = trace(model, torch.zeros(2, 3, dtype=torch.long))
    assert {"embed.weight", "head.weight"} <= set(result.param_names)
    # Tied: the embedding's features are the head's inputs, so mid's input is its output.
    assert groups_of(result) == [
        (
            8,
            {
                ("embed.weight", 1),
                ("head.weight", 1),
                ("mid.weight", 0),
                ("mid.weight", 1),
                ("mid.bias", 0),
            },
        )
    ]


def test_ignored_module_parameters_are_frozen():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    assert groups_of(trace(model, torch.zeros(2, 4), ignored=[model[2]])) == []


def test_explicit_matmul_with_a_parameter():
    class MatMul(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.proj = nn.Parameter(torch.randn(6, 5))
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x) @ self.proj)

    assert groups_of(trace(MatMul(), torch.zeros(2, 3, 4))) == [
        (5, {("proj", 1), ("fc2.weight", 1)}),
        (6, {("fc1.weight", 0), ("fc1.bias", 0), ("proj", 0)}),
    ]


# -- one op family at a time: Linear(4 -> 6) -> op -> Linear(-> 2) -----------------


class Sandwich(nn.Module):
    """fc1 makes 6 prunable features, ``op`` transforms them, fc2 reads the result."""

    def __init__(self, op, width_out: int, extra: nn.Module | None = None):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.extra = extra
        self.op = op
        self.fc2 = nn.Linear(width_out, 2)

    def forward(self, x):
        h = self.fc1(x)
        h = self.op(h) if self.extra is None else self.op(h, self.extra)
        return self.fc2(h)


HIDDEN = {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}
FC1 = {("fc1.weight", 0), ("fc1.bias", 0)}

SANDWICH_CASES = {
    # elementwise: the 6 features pass through
    "relu": (torch.relu, 6, [6]),
    "gelu_tanh": (lambda h: F.gelu(h, approximate="tanh"), 6, [6]),
    "silu_inplace": (lambda h: F.silu(h, inplace=True), 6, [6]),
    "hardswish": (F.hardswish, 6, [6]),
    "hardsigmoid_inplace": (lambda h: F.hardsigmoid(h, inplace=True), 6, [6]),
    "softplus": (F.softplus, 6, [6]),
    "leaky_relu": (F.leaky_relu, 6, [6]),
    "clamp": (lambda h: h.clamp(-1, 1), 6, [6]),
    "pow_rsqrt": (lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), 6, [6]),
    "exp_log_neg": (lambda h: torch.log(torch.exp(-h) + 1), 6, [6]),
    "where": (lambda h: torch.where(h > 0, h, h * 0.1), 6, [6]),
    "masked_fill": (lambda h: h.masked_fill(h < 0, 0.0), 6, [6]),
    "dropout_train": (lambda h: F.dropout(h, 0.5, training=True), 6, [6]),
    "softmax": (lambda h: F.softmax(h, dim=-1), 6, [6]),
    "cumsum": (lambda h: h.cumsum(-1), 6, []),  # a running sum depends on positions
    "cumsum_batch": (lambda h: h.cumsum(0), 6, [6]),
    "broadcast_bias": (lambda h: h + torch.ones(6) + torch.ones(1), 6, [6]),
    "to_dtype": (lambda h: h.to(torch.float64).to(torch.float32), 6, [6]),
    "detach_clone": (lambda h: h.detach().clone().contiguous(), 6, [6]),
    "inplace_add": (lambda h: h.add_(1.0).mul_(h), 6, [6]),
    # shapes
    "unsqueeze_flatten": (lambda h: h.unsqueeze(1).flatten(1), 6, [6]),
    "channel_shuffle_view": (lambda h: h.view(-1, 2, 3).transpose(1, 2).reshape(-1, 6), 6, [2, 3]),
    "expand_reduce": (lambda h: h[:, None, :].expand(-1, 3, -1).sum(1), 6, [6]),
    "repeat": (lambda h: h.repeat(1, 2), 12, [2, 6]),
    "repeat_interleave": (lambda h: h.repeat_interleave(2, dim=1), 12, [2, 6]),
    "stack": (lambda h: torch.stack([h, h], 1).flatten(1), 12, [6]),
    "cat_twice": (lambda h: torch.cat([h, h], dim=1), 12, [6]),
    "split_equal": (lambda h: h.split(3, dim=-1)[0] * h.split(3, dim=-1)[1], 3, [3]),
    "chunk_glu": (lambda h: F.glu(h, dim=-1), 3, [3]),
    "split_sizes_swap": (lambda h: torch.cat(h.split([2, 4], dim=1)[::-1], dim=1), 6, [2, 4]),
    "slice_head": (lambda h: h[:, :3], 3, [3, 3]),
    "slice_strided": (lambda h: h[:, ::2], 3, []),
    "narrow_tail": (lambda h: h.narrow(1, 2, 4), 4, [2, 4]),
    "pad": (lambda h: F.pad(h, (1, 2)), 9, [6]),
    "flip": (lambda h: h.flip(1), 6, []),
    "mean_over_merged": (lambda h: h.view(-1, 2, 3).mean(1), 3, [2, 3]),
    "amax_keepdim": (lambda h: h.view(-1, 2, 3).amax(2, keepdim=True).squeeze(-1), 2, [2, 3]),
    "var_std": (lambda h: h - h.var(-1, keepdim=True) * h.std(-1, keepdim=True), 6, [6]),
    "index_batch": (lambda h: h[torch.tensor([1, 0])], 6, [6]),
    "index_features": (lambda h: h[:, torch.tensor([0, 2])], 2, []),
    "index_select_batch": (lambda h: h.index_select(0, torch.tensor([1, 0])), 6, [6]),
    "sort_features": (lambda h: h.sort(dim=1).values, 6, []),
    "topk_features": (lambda h: h.topk(2, dim=1).values, 2, []),
}


@pytest.mark.parametrize("case", sorted(SANDWICH_CASES))
def test_op_family_on_features(case):
    op, width_out, sizes = SANDWICH_CASES[case]
    result = trace(Sandwich(op, width_out), torch.randn(2, 4))
    assert result.unsupported_ops == {}
    assert group_sizes(result) == sorted(sizes)


def test_unary_ops_and_transposes_share_axes_and_give_the_rules_groups(monkeypatch):
    """The tracer's shortcut (outputs share input axes) adds no axes and changes no group."""

    def chain(h):
        return (torch.relu(h) * 2).t().transpose(0, 1).permute(1, 0).T.contiguous().neg()

    shortcut = trace(Sandwich(chain, 6), torch.randn(2, 4))
    x = shortcut.input_axes[0]
    plain = trace(Sandwich(lambda h: h, 6), torch.randn(2, 4))
    assert shortcut.equations.num_axes == plain.equations.num_axes
    assert shortcut.equations.num_equations == plain.equations.num_equations
    assert x == plain.input_axes[0]
    monkeypatch.setattr("depprune.tracer.ADOPTERS", {})
    by_rules = trace(Sandwich(chain, 6), torch.randn(2, 4))
    assert by_rules.equations.num_equations > plain.equations.num_equations
    assert groups_of(shortcut) == groups_of(by_rules) == [(6, HIDDEN)]


def test_cat_of_a_tensor_with_itself_ties_both_halves():
    result = trace(Sandwich(lambda h: torch.cat([h, h], dim=1), 12), torch.randn(2, 4))
    assert groups_of(result) == [(6, HIDDEN)]
    assert unit_map(result, ("fc2.weight", 1), 6) == [0, 1, 2, 3, 4, 5] * 2


def test_slice_sums_the_rest():
    result = trace(Sandwich(lambda h: h[:, :3], 3), torch.randn(2, 4))
    assert groups_of(result) == [(3, FC1), (3, HIDDEN)]


def test_repeat_is_copy_major_and_repeat_interleave_element_major():
    repeat = trace(Sandwich(lambda h: h.repeat(1, 2), 12), torch.randn(2, 4))
    assert unit_map(repeat, ("fc2.weight", 1), 6) == [0, 1, 2, 3, 4, 5] * 2
    interleave = trace(Sandwich(lambda h: h.repeat_interleave(2, dim=1), 12), torch.randn(2, 4))
    assert unit_map(interleave, ("fc2.weight", 1), 6) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_norms_and_prelu_parameters_join_the_features():
    for layer, extra in [
        (nn.LayerNorm(6), {("op.weight", 0), ("op.bias", 0)}),
        (nn.RMSNorm(6), {("op.weight", 0)}),
        (nn.PReLU(6), {("op.weight", 0)}),
        (
            nn.BatchNorm1d(6),
            {("op.weight", 0), ("op.bias", 0), ("op.running_mean", 0), ("op.running_var", 0)},
        ),
    ]:
        model = Sandwich(layer, 6).eval()
        result = trace(model, torch.randn(2, 4))
        assert groups_of(result) == [(6, HIDDEN | extra)], type(layer).__name__


def test_embedding_rows_are_frozen_features_are_prunable():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.fc = nn.Linear(6, 2)

        def forward(self, tokens):
            return self.fc(self.embed(tokens))

    result = trace(Embed(), torch.zeros(2, 3, dtype=torch.long))
    assert groups_of(result) == [(6, {("embed.weight", 1), ("fc.weight", 1)})]


# -- convolutions -------------------------------------------------------------------


def test_conv_bn_relu_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    result = trace(model.eval(), torch.randn(1, 3, 10, 10))
    bn = members("1.weight", "1.bias", "1.running_mean", "1.running_var")
    assert groups_of(result) == [(8, {("0.weight", 0), ("0.bias", 0), ("3.weight", 1)} | bn)]
    # Kernel dims are never prunable.
    eqs = result.equations
    rows = zip(eqs.row_params, eqs.row_dims, eqs.row_axes, strict=True)
    kernel = [axis for p, d, axis in rows if eqs.param_names[p] == "0.weight" and d >= 2]
    assert len(kernel) == 2
    assert set(kernel) <= frozen(result)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        out = self.b(torch.relu(self.a(h)))
        out += h
        return self.head(torch.relu(out))


def test_residual_block_couples_the_stream():
    result = trace(Residual(), torch.randn(1, 3, 8, 8))
    assert groups_of(result) == [
        (6, {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}),
        (
            8,
            {
                ("stem.weight", 0),
                ("stem.bias", 0),
                ("a.weight", 1),
                ("b.weight", 0),
                ("b.bias", 0),
                ("head.weight", 1),
            },
        ),
    ]


def test_grouped_conv_prunes_whole_groups_or_one_slot_per_group():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Conv2d(8, 12, 3, groups=4, padding=1), nn.Conv2d(12, 2, 1)
    )
    result = trace(model, torch.randn(1, 3, 6, 6))
    assert groups_of(result) == [
        (2, {("0.weight", 0), ("0.bias", 0), ("1.weight", 1)}),
        (3, {("1.weight", 0), ("1.bias", 0), ("2.weight", 1)}),
        (4, {("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("2.weight", 1)}),
    ]
    assert unit_map(result, ("0.weight", 0), 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert unit_map(result, ("1.weight", 0), 3) == [0, 1, 2] * 4


def test_depthwise_conv_in_equals_out():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.Conv2d(8, 2, 1)
    )
    result = trace(model, torch.randn(1, 3, 6, 6))
    assert groups_of(result) == [
        (8, {("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("2.weight", 1)})
    ]


def test_depthwise_conv_with_multiplier():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    result = trace(model, torch.randn(1, 3, 6, 6))
    assert groups_of(result) == [
        (2, {("1.weight", 0), ("1.bias", 0), ("2.weight", 1)}),
        (4, {("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("2.weight", 1)}),
    ]


def test_concat_densenet_like():
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 6, 3, padding=1)
            self.c3 = nn.Conv2d(10, 2, 1)

        def forward(self, x):
            a = self.c1(x)
            b = self.c2(torch.relu(a))
            return self.c3(torch.relu(torch.cat([a, b], dim=1)))

    result = trace(Dense(), torch.randn(1, 3, 6, 6))
    assert groups_of(result) == [
        (4, {("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 1), ("c3.weight", 1)}),
        (6, {("c2.weight", 0), ("c2.bias", 0), ("c3.weight", 1)}),
    ]
    assert unit_map(result, ("c3.weight", 1), 6) == [-1] * 4 + list(range(6))


class ConvSandwich(nn.Module):
    def __init__(self, op, width_out: int, width: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 1)
        self.op = op
        self.c2 = nn.Conv2d(width_out, 2, 1)

    def forward(self, x):
        return self.c2(self.op(self.c1(x)))


CONV_CASES = {
    "max_pool": (nn.MaxPool2d(2), 8, [8]),
    "avg_pool": (nn.AvgPool2d(2), 8, [8]),
    "adaptive_avg_pool": (nn.AdaptiveAvgPool2d(2), 8, [8]),
    "adaptive_avg_pool_1x1": (nn.AdaptiveAvgPool2d(1), 8, [8]),
    "adaptive_max_pool": (nn.AdaptiveMaxPool2d(3), 8, [8]),
    "upsample_nearest": (nn.Upsample(scale_factor=2), 8, [8]),
    "upsample_bilinear": (nn.Upsample(scale_factor=2, mode="bilinear"), 8, [8]),
    "spatial_pad": (lambda h: F.pad(h, (1, 1, 2, 2)), 8, [8]),
    "reflection_pad": (nn.ReflectionPad2d(1), 8, [8]),
    "group_norm": (nn.GroupNorm(2, 8), 8, [2, 4]),
    "instance_norm_like_group_norm": (nn.GroupNorm(8, 8), 8, [8]),
    "channel_shuffle": (nn.ChannelShuffle(2), 8, [2, 4]),
    "pixel_shuffle": (nn.PixelShuffle(2), 2, [2]),
    "pixel_unshuffle": (nn.PixelUnshuffle(2), 32, [8]),
    "conv_transpose": (nn.ConvTranspose2d(8, 6, 2, stride=2), 6, [6, 8]),
    "grouped_conv_transpose": (nn.ConvTranspose2d(8, 12, 3, groups=4), 12, [2, 3, 4]),
    "hardswish_inplace": (nn.Hardswish(inplace=True), 8, [8]),
    "prelu": (nn.PReLU(8), 8, [8]),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_op_family_on_channels(case):
    op, width_out, sizes = CONV_CASES[case]
    result = trace(ConvSandwich(op, width_out).eval(), torch.randn(1, 3, 8, 8))
    assert result.unsupported_ops == {}
    assert group_sizes(result) == sorted(sizes)


def test_conv1d_and_conv3d():
    conv1d = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU(), nn.Conv1d(5, 2, 1))
    assert group_sizes(trace(conv1d, torch.randn(1, 3, 9))) == [5]
    conv3d = nn.Sequential(nn.Conv3d(3, 5, 3), nn.MaxPool3d(2), nn.Conv3d(5, 2, 1))
    assert group_sizes(trace(conv3d, torch.randn(1, 3, 6, 6, 6))) == [5]


def test_spatial_positions_are_never_prunable():
    class PositionAfterConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 4, stride=4)
            self.pos = nn.Parameter(torch.zeros(1, 4, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            tokens = self.conv(x).flatten(2).transpose(1, 2) + self.pos.transpose(1, 2)
            return self.fc(tokens.mean(1))

    result = trace(PositionAfterConv(), torch.randn(1, 3, 8, 8))
    assert groups_of(result) == [
        (4, {("conv.weight", 0), ("conv.bias", 0), ("pos", 1), ("fc.weight", 1)})
    ]


# -- attention ------------------------------------------------------------------------


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Llama-style attention: heads by view + transpose, RoPE, SDPA, optional GQA."""

    def __init__(self, heads=4, kv_heads=4, head_dim=4, hidden=16, repeat_by_expand=True):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.repeat_by_expand = repeat_by_expand
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))

    def repeat_kv(self, x):
        batch, kv_heads, length, head_dim = x.shape
        rep = self.heads // kv_heads
        x = x[:, :, None, :, :].expand(batch, kv_heads, rep, length, head_dim)
        return x.reshape(batch, kv_heads * rep, length, head_dim)

    def forward(self, x):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        freqs = (
            torch.arange(length, dtype=x.dtype, device=x.device)[:, None] * self.inv_freq[None, :]
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_heads != self.heads and self.repeat_by_expand:
            k, v = self.repeat_kv(k), self.repeat_kv(v)
        gqa = self.kv_heads != self.heads and not self.repeat_by_expand
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


def test_attention_heads_head_dims_and_rope_halves():
    result = trace(Attention(), torch.randn(2, 5, 16))
    assert result.unsupported_ops == {}
    assert groups_of(result) == [
        # RoPE: channel j and j + 2 of q and k go together, with their frequency.
        (2, {("q.weight", 0), ("k.weight", 0), ("inv_freq", 0)}),
        (4, {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)}),
        (4, {("v.weight", 0), ("o.weight", 1)}),
    ]
    assert unit_map(result, ("q.weight", 0), 2) == [0, 1, 0, 1] * 4
    heads = [
        g for g in result.equations.solve().groups if ("k.weight", 0) in g.members and g.size == 4
    ]
    graph = result.equations.solve()
    assert graph.unit_maps(heads[0])[("q.weight", 0)].tolist() == [
        h for h in range(4) for _ in range(4)
    ]


@pytest.mark.parametrize("repeat_by_expand", [True, False], ids=["repeat_kv", "enable_gqa"])
def test_gqa_query_heads_are_kv_heads_times_repeat(repeat_by_expand):
    model = Attention(heads=4, kv_heads=2, repeat_by_expand=repeat_by_expand)
    result = trace(model, torch.randn(2, 5, 16))
    groups = groups_of(result)
    kv = {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)}
    assert (2, kv) in groups
    assert (2, {("q.weight", 0), ("o.weight", 1)}) in groups
    assert (4, {("v.weight", 0), ("o.weight", 1)}) in groups
    assert sorted(size for size, _ in groups) == [2, 2, 2, 4]
    # Query head h reads key/value head h // 2.
    graph = result.equations.solve()
    [kv_group] = [g for g in graph.groups if set(g.members) == kv]
    assert graph.unit_maps(kv_group)[("q.weight", 0)].tolist() == [0] * 8 + [1] * 8


def test_multihead_attention_fused_kernel():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    result = trace(Block().eval(), torch.randn(2, 5, 8))
    assert result.unsupported_ops == {}
    # Training mode takes the decomposed path; the module's one embed_dim holds there too.
    decomposed = trace(Block().train(), torch.randn(2, 5, 8))
    assert groups_of(decomposed) == groups_of(result)
    assert result.equations.solve().conflicts == decomposed.equations.solve().conflicts == ()
    shared = {
        ("inp.weight", 0),
        ("inp.bias", 0),
        ("attn.in_proj_weight", 0),
        ("attn.in_proj_weight", 1),
        ("attn.in_proj_bias", 0),
        ("attn.out_proj.weight", 0),
        ("attn.out_proj.weight", 1),
        ("attn.out_proj.bias", 0),
        ("out.weight", 1),
    }
    assert groups_of(result) == [(4, shared), (4, shared)]


def test_lstm_is_frozen_with_a_note():
    Recurrent = LSTMClassifier

    tokens = torch.zeros(2, 5, dtype=torch.long)
    cpu = trace(Recurrent(), tokens)
    assert groups_of(cpu) == [
        (16, {("head.0.weight", 0), ("head.0.bias", 0), ("head.2.weight", 1)})
    ]
    assert any("recurrent" in note for note in cpu.notes)
    with torch.device("meta"):
        meta_model = Recurrent()
    # On meta the LSTM decomposes into cell ops; its frozen parameters keep the same result.
    assert groups_of(trace(meta_model, tokens)) == groups_of(cpu)


# -- meta device, data-dependent calls, errors, input and output structures -------------


def test_meta_model_traces_without_weights_and_matches_cpu():
    torch.manual_seed(0)
    cpu = trace(Attention(heads=4, kv_heads=2), torch.randn(2, 5, 16))
    with torch.device("meta"):
        model = Attention(heads=4, kv_heads=2)
    meta = trace(model, torch.randn(2, 5, 16))
    assert groups_of(meta) == groups_of(cpu)


def test_item_on_meta_gets_a_neutral_answer_and_a_note():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x):
            h = self.fc1(x)
            if h.max().item() > 1e9 or bool(h.sum() > 1e9):
                h = h * 2
            return self.fc2(h)

    with torch.device("meta"):
        model = DataDependent()
    result = trace(model, torch.zeros(2, 4))
    assert groups_of(result) == [(6, HIDDEN)]
    assert any(".item()" in note and "0.0" in note for note in result.notes)
    # A CPU model traces on its meta shadow too; traced as it is, values are real.
    cpu = record(DataDependent(), torch.zeros(2, 4), shadow=False)
    assert not any(".item()" in note for note in cpu.notes)
    assert cpu.unsupported_ops == {}
    assert (
        trace(DataDependent(), torch.zeros(2, 4), strict=True, shadow=False).num_ops == cpu.num_ops
    )


def test_unknown_op_is_frozen_and_listed():
    model = Sandwich(lambda h: torch.diagonal(h.view(-1, 2, 3), dim1=1, dim2=2), 2)
    result = trace(model, torch.randn(2, 4))
    assert result.unsupported_ops == {"aten.diagonal": 1}
    assert groups_of(result) == []


def test_strict_raises_naming_the_op():
    model = Sandwich(lambda h: torch.diagonal(h.view(-1, 2, 3), dim1=1, dim2=2), 2)
    with pytest.raises(UnsupportedOpError, match=r"aten\.diagonal has no axis rule.*strict=False"):
        record(model, torch.randn(2, 4), strict=True)


def test_inputs_that_do_not_fit_raise_trace_error():
    with pytest.raises(TraceError, match="did not run model Linear") as info:
        record(nn.Linear(4, 3), torch.zeros(2, 5))
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(TraceError, match=r"ignored must hold nn\.Module"):
        record(nn.Linear(4, 3), torch.zeros(2, 4), ignored=["fc"])


def test_dict_inputs_and_tuple_dict_outputs():
    class Structured(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 2)
            self.gate = nn.Linear(4, 5)
            self.fc3 = nn.Linear(5, 2)

        def forward(self, x, *, scale):
            hidden = self.fc1(x)
            return self.fc2(hidden) * scale, {"hidden": hidden, "gate": self.fc3(self.gate(x))}

    result = trace(Structured(), {"x": torch.randn(2, 4), "scale": torch.ones(2, 1)})
    # hidden is an output (frozen); gate's 5 units are internal.
    assert groups_of(result) == [(5, {("gate.weight", 0), ("gate.bias", 0), ("fc3.weight", 1)})]
    assert len(result.input_axes) == 2
    assert len(result.output_axes) == 3


def test_tuple_inputs_and_plain_callables():
    fc = nn.Linear(4, 3)
    result = trace(lambda a, b: fc(a) + fc(b), (torch.zeros(2, 4), torch.zeros(2, 4)))
    assert result.num_ops > 0
    assert result.param_names == []


def test_unused_parameters_are_frozen_with_a_note():
    model = Sandwich(torch.relu, 6)
    model.unused = nn.Linear(3, 3)
    result = trace(model, torch.randn(2, 4))
    assert groups_of(result) == [(6, HIDDEN)]
    assert any("unused.weight" in note for note in result.notes)


def test_slice_of_a_buffer_keeps_its_capacity():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("position_ids", torch.arange(16)[None, :])
            self.embed = nn.Embedding(16, 6)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(x + self.embed(self.position_ids[:, : x.shape[1]]))

    result = trace(Positions(), torch.randn(2, 5, 6))
    assert groups_of(result) == []


# -- whole models -------------------------------------------------------------------------


def test_torchvision_resnet_has_every_op_covered():
    tv = pytest.importorskip("torchvision.models")
    result = trace(tv.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32))
    assert result.unsupported_ops == {}
    # Three groups a stage: the stream and each block's inner channels.
    assert group_sizes(result) == sorted([64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512])


def test_llama_on_meta_matches_cpu():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**TINY_DECODER)
    tokens = torch.randint(0, 100, (2, 7))
    cpu = trace(transformers.LlamaForCausalLM(config).eval(), {"input_ids": tokens})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    meta = trace(model, {"input_ids": tokens})
    assert cpu.unsupported_ops == meta.unsupported_ops == {}
    assert groups_of(cpu) == groups_of(meta)
    # Per layer: kv heads, repeat, v head_dim, mlp; plus the stream, and one RoPE half
    # head_dim for both layers: they share cos/sin, so channel pairs go in every layer.
    assert group_sizes(meta) == sorted([32, 4] + [2, 2, 8, 64] * 2)
    stream = max(groups_of(meta), key=lambda g: len(g[1]))[1]
    assert {
        ("model.embed_tokens.weight", 1),
        ("lm_head.weight", 1),
        ("model.norm.weight", 0),
    } <= stream


def test_deep_model_on_meta():
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(200)])
    result = trace(model, torch.zeros(4, 64))
    assert result.num_ops == 600
    assert group_sizes(result) == [64] * 199
