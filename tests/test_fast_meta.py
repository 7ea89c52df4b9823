"""The fast meta path: outputs built without kernels are exactly the kernels' outputs.

Every case runs with the check against the kernels on (``configured(check=True)``, what
DEPPRUNE_CHECK_FAST_META=1 turns on), and graphs, op logs and plans are the same with the
fast path on and off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_DECODER, tokens
from torch import nn

import depprune
from depprune import fast_meta
from depprune.errors import InternalError
from depprune.fast_meta import FRESH, NEVER, SELF, MetaOutputs, configured, memoizable
from depprune.importance import random

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
CL = torch.channels_last
#: convolution's stride, padding, dilation, transposed, output padding, groups.
CONV = ([2, 2], [1, 1], [1, 1], False, [0, 0], 1)


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def metadata(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


#: name -> (overload, () -> (args, kwargs)): broadcasting, type promotion, layouts, edge shapes.
CASES = {
    "broadcast": (aten.mul.Tensor, lambda: ((meta(3, 1, 5), meta(4, 5)), {})),
    "int times float": (aten.mul.Tensor, lambda: ((meta(2, 3, dtype=torch.int64), meta(2, 3)), {})),
    "bf16 plus fp32 0-d": (
        aten.add.Tensor,
        lambda: ((meta(2, 3, dtype=torch.bfloat16), meta()), {}),
    ),
    "fp16 plus fp32": (
        aten.add.Tensor,
        lambda: ((meta(2, 3, dtype=torch.float16), meta(2, 3)), {"alpha": 2}),
    ),
    "bf16 times python float": (
        aten.mul.Tensor,
        lambda: ((meta(4, dtype=torch.bfloat16), 1.5), {}),
    ),
    "int plus python float": (aten.add.Tensor, lambda: ((meta(4, dtype=torch.int32), 0.5), {})),
    "uint8 plus python int": (aten.add.Tensor, lambda: ((meta(4, dtype=torch.uint8), 300), {})),
    "bool and bool": (
        aten.bitwise_and.Tensor,
        lambda: ((meta(3, 1, dtype=torch.bool), meta(1, 4, dtype=torch.bool)), {}),
    ),
    "int rsqrt": (aten.rsqrt.default, lambda: ((meta(3, dtype=torch.int64),), {})),
    "int true division": (
        aten.div.Tensor,
        lambda: ((meta(3, dtype=torch.int64), meta(3, dtype=torch.int64)), {}),
    ),
    "comparison": (aten.lt.Tensor, lambda: ((meta(2, 3), meta(3, dtype=torch.float64)), {})),
    "transposed": (aten.mul.Tensor, lambda: ((meta(4, 6).t(), meta(6, 4)), {})),
    "both permuted": (
        aten.add.Tensor,
        lambda: ((meta(2, 3, 4).permute(2, 0, 1), meta(2, 3, 4).permute(2, 0, 1)), {}),
    ),
    "channels_last plus contiguous": (
        aten.add.Tensor,
        lambda: ((meta(2, 3, 4, 5).to(memory_format=CL), meta(2, 3, 4, 5)), {}),
    ),
    "channels_last plus a bias": (
        aten.add.Tensor,
        lambda: ((meta(2, 3, 4, 5).to(memory_format=CL), meta(3, 1, 1)), {}),
    ),
    "size-1 dims with odd strides": (
        aten.mul.Tensor,
        lambda: ((torch.empty_strided((4, 1, 5), (5, 100, 1), device="meta"), meta(4, 1, 5)), {}),
    ),
    "0-d times 0-d": (aten.mul.Tensor, lambda: ((meta(), meta(dtype=torch.float64)), {})),
    "empty dim": (aten.add.Tensor, lambda: ((meta(0, 3), meta(3)), {})),
    "expanded": (aten.add.Tensor, lambda: ((meta(3, 1).expand(3, 4), meta(3, 4)), {})),
    "slice with a storage offset": (aten.mul.Tensor, lambda: ((meta(4, 8)[:, 2:], 2.0), {})),
    "unary on a transposed slice": (aten.silu.default, lambda: ((meta(6, 8)[1:, ::2].t(),), {})),
    "where with a broadcast mask": (
        aten.where.self,
        lambda: ((meta(1, 4, dtype=torch.bool), meta(3, 4), meta(3, 1, dtype=torch.float64)), {}),
    ),
    "pow by a scalar": (
        aten.pow.Tensor_Scalar,
        lambda: ((meta(2, 5, dtype=torch.bfloat16), 2), {}),
    ),
    "safe softmax on a permuted tensor": (
        aten._safe_softmax.default,
        lambda: ((meta(2, 3, 4).permute(2, 0, 1), 1), {}),
    ),
    "softmax to fp32": (aten._softmax.default, lambda: ((meta(2, 7), -1, False), {})),
    "log softmax of bf16": (
        aten._log_softmax.default,
        lambda: ((meta(2, 7, dtype=torch.bfloat16), 0, False), {}),
    ),
    "mean keepdim": (aten.mean.dim, lambda: ((meta(2, 5, 8), [-1], True), {})),
    "sum to fp64": (
        aten.sum.dim_IntList,
        lambda: ((meta(2, 5), [1], False), {"dtype": torch.float64}),
    ),
    "amax of channels_last": (
        aten.amax.default,
        lambda: ((meta(2, 3, 4, 5).to(memory_format=CL), [2, 3], True), {}),
    ),
    "layer norm": (
        aten.native_layer_norm.default,
        lambda: ((meta(2, 5, 8), [8], meta(8), meta(8), 1e-5), {}),
    ),
    "layer norm of bf16 without affine": (
        aten.native_layer_norm.default,
        lambda: ((meta(2, 5, 8, dtype=torch.bfloat16), [5, 8], None, None, 1e-5), {}),
    ),
    "batch norm, eval": (
        aten.native_batch_norm.default,
        lambda: ((meta(2, 3, 4, 4), meta(3), meta(3), meta(3), meta(3), False, 0.1, 1e-5), {}),
    ),
    "batch norm of channels_last, training": (
        aten.native_batch_norm.default,
        lambda: (
            (meta(2, 3, 4, 4).to(memory_format=CL), meta(3), meta(3), None, None, True, 0.1, 1e-5),
            {},
        ),
    ),
    "convolution of channels_last": (
        aten.convolution.default,
        lambda: ((meta(1, 3, 8, 8).to(memory_format=CL), meta(4, 3, 3, 3), meta(4), *CONV), {}),
    ),
    "mm of a transposed operand": (aten.mm.default, lambda: ((meta(5, 3).t(), meta(5, 4)), {})),
    "addmm": (aten.addmm.default, lambda: ((meta(4), meta(2, 3), meta(4, 3).t()), {})),
    "bmm": (aten.bmm.default, lambda: ((meta(2, 3, 4), meta(2, 5, 4).transpose(1, 2)), {})),
    "embedding": (
        aten.embedding.default,
        lambda: ((meta(10, 4), meta(2, 3, dtype=torch.int64)), {}),
    ),
    "cat": (aten.cat.default, lambda: (([meta(2, 3), meta(2, 5)], 1), {})),
    "cat of mixed dtypes": (
        aten.cat.default,
        lambda: (([meta(2, 3), meta(1, 3, dtype=torch.bfloat16)],), {}),
    ),
    "cat of channels_last": (
        aten.cat.default,
        lambda: (
            ([meta(1, 2, 3, 3).to(memory_format=CL), meta(1, 4, 3, 3).to(memory_format=CL)], 1),
            {},
        ),
    ),
    "clone of channels_last": (
        aten.clone.default,
        lambda: ((meta(1, 2, 3, 3).to(memory_format=CL),), {}),
    ),
    "clone to contiguous": (
        aten.clone.default,
        lambda: ((meta(4, 6).t(),), {"memory_format": torch.contiguous_format}),
    ),
    "to bf16": (aten._to_copy.default, lambda: ((meta(4, 6).t(),), {"dtype": torch.bfloat16})),
    "scalar tensor": (
        aten.scalar_tensor.default,
        lambda: ((2.0,), {"dtype": torch.float64, "device": torch.device("meta")}),
    ),
    "arange on meta": (aten.arange.default, lambda: ((7,), {"device": torch.device("meta")})),
}


@pytest.mark.parametrize("name", CASES)
def test_built_outputs_are_the_kernels(name):
    func, make = CASES[name]
    args, kwargs = make()
    with configured(check=True):
        outputs = MetaOutputs()
        first = outputs.run(func, args, kwargs)  # the kernel runs; its outputs are learned
        again = outputs.run(func, args, kwargs)  # built, then checked against the kernel
    assert (outputs.ran, outputs.built) == (1, 1)
    kernel = func(*args, **kwargs)
    for built, learned, expected in zip(
        as_tuple(again), as_tuple(first), as_tuple(kernel), strict=True
    ):
        assert metadata(built) == metadata(expected) == metadata(learned)
        assert built.is_meta and not built._is_view()


#: name -> (overload, width -> (args, kwargs)): calls whose outputs follow a layout formula.
GENERIC = {
    "unary": (aten.gelu.default, lambda w: ((meta(2, w, 3),), {})),
    "in place, scalars": (aten.hardtanh_.default, lambda w: ((meta(1, w, 4, 4), 0.0, 6.0), {})),
    "in place, untagged": (aten.hardswish_.default, lambda w: ((meta(1, w, 4, 4),), {})),
    "binary, one shape": (aten.add.Tensor, lambda w: ((meta(w, 5), meta(w, 5)), {"alpha": 2})),
    "in place, one shape": (aten.mul_.Tensor, lambda w: ((meta(w, 5), meta(w, 5)), {})),
    "bf16 comparison": (
        aten.lt.Scalar,
        lambda w: ((meta(w, 2, dtype=torch.bfloat16), 0.5), {}),
    ),
    "batch norm, eval": (
        aten.native_batch_norm.default,
        lambda w: ((meta(2, w, 4, 4), meta(w), meta(w), meta(w), meta(w), False, 0.1, 1e-5), {}),
    ),
    "batch norm of bf16 without affine, training": (
        aten.native_batch_norm.default,
        lambda w: (
            (meta(2, w, 3, dtype=torch.bfloat16), None, None, None, None, True, 0.1, 1e-5),
            {},
        ),
    ),
    "layer norm": (
        aten.native_layer_norm.default,
        lambda w: ((meta(2, 3, w), [w], meta(w), meta(w), 1e-5), {}),
    ),
    "layer norm of bf16 over two dims": (
        aten.native_layer_norm.default,
        lambda w: ((meta(2, w, 6, dtype=torch.bfloat16), [w, 6], None, None, 1e-5), {}),
    ),
}


@pytest.mark.parametrize("name", GENERIC)
def test_outputs_at_new_widths_follow_the_confirmed_formula(name):
    func, make = GENERIC[name]
    with configured(check=True):  # every built output is compared with the kernel's
        outputs = MetaOutputs()
        for width in (3, 5, 8):  # the first confirms the formula, the others are built
            args, kwargs = make(width)
            out = outputs.run(func, args, kwargs)
            expected = func(*make(width)[0], **kwargs)
            for built, kernel in zip(as_tuple(out), as_tuple(expected), strict=True):
                assert metadata(built) == metadata(kernel)
            if memoizable(func) == SELF:
                assert out is args[0]
    assert (outputs.ran, outputs.built) == (1, 2)


def test_calls_outside_a_formula_run_their_kernels_and_fail_as_they_would():
    outputs = MetaOutputs()
    norm = aten.native_batch_norm.default
    outputs.run(norm, (meta(2, 3, 4), meta(3), meta(3), meta(3), meta(3), False, 0.1, 1e-5), {})
    with pytest.raises(RuntimeError):  # a weight the plan forgot to cut: the kernel refuses
        outputs.run(norm, (meta(2, 5, 4), meta(4), meta(5), meta(5), meta(5), False, 0.1, 1e-5), {})
    outputs.run(aten.add.Tensor, (meta(3, 4), meta(3, 4)), {})
    for width in (5, 6):  # broadcasting, a transposed operand: no formula, the kernel runs
        outputs.run(aten.add.Tensor, (meta(width, 4), meta(4)), {})
        outputs.run(aten.add.Tensor, (meta(4, width).t(), meta(width, 4)), {})
    assert outputs.built == 0


def test_views_and_aliasing_ops_keep_running_their_kernels():
    outputs = MetaOutputs()
    x = meta(4, 6)
    for _ in range(2):
        for func, args in [
            (aten.transpose.int, (x, 0, 1)),
            (aten.view.default, (x, [24])),
            (aten.slice.Tensor, (x, 1, 2, 4)),
            (aten.expand.default, (meta(4, 1), [4, 3])),
            (aten._unsafe_view.default, (x, [2, 12])),
        ]:
            out = outputs.run(func, args, {})
            assert torch._C._is_alias_of(out, args[0]), func
    assert outputs.built == 0
    assert [memoizable(f) for f in (aten.transpose.int, aten.split.Tensor, aten.add.out)] == [
        NEVER,
        NEVER,
        NEVER,
    ]
    assert outputs.policies[aten._unsafe_view.default] == NEVER  # learned: it aliases


def test_in_place_ops_return_self():
    outputs = MetaOutputs()
    x, y = meta(3, 4), meta(4)
    with configured(check=True):
        results = [outputs.run(aten.add_.Tensor, (x, y), {}) for _ in range(2)]
    assert results[0] is x and results[1] is x and outputs.built == 1
    assert memoizable(aten.add_.Tensor) == SELF and memoizable(aten.mm.default) == FRESH
    with pytest.raises(RuntimeError):  # a call that fails is never learned
        outputs.run(aten.add_.Tensor, (meta(3, 1), meta(3, 4)), {})
    with pytest.raises(RuntimeError):
        outputs.run(aten.add_.Tensor, (meta(3, 1), meta(3, 4)), {})


def test_real_tensors_and_real_factories_run_their_kernels():
    outputs = MetaOutputs()
    a, b = torch.arange(4.0), torch.ones(4)
    for _ in range(2):
        assert torch.equal(outputs.run(aten.add.Tensor, (a, b), {}), a + 1)
        positions = outputs.run(aten.arange.default, (5,), {"device": torch.device("cpu")})
        assert positions.tolist() == [0, 1, 2, 3, 4]
    assert outputs.built == 0


def test_signatures_tell_scalar_types_and_the_default_dtype_apart():
    outputs = MetaOutputs()
    x = meta(3, dtype=torch.int64)
    dtypes = [outputs.run(aten.add.Tensor, (x, other), {}).dtype for other in (1, 1.0, True, 1)]
    assert dtypes == [torch.int64, torch.float32, torch.int64, torch.int64]
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert outputs.run(aten.add.Tensor, (x, 1.0), {}).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert outputs.run(aten.add.Tensor, (x, 1.0), {}).dtype == torch.float32


def test_the_check_raises_where_a_built_output_differs():
    with configured(check=True):
        outputs = MetaOutputs()
    x = meta(4, 6)
    outputs.run(aten.mul.Tensor, (x, 2.0), {})
    (signature,) = outputs.outputs
    outputs.outputs[signature] = ((4, 6), (1, 4), torch.float32)  # wrong strides
    with pytest.raises(InternalError, match=r"aten\.mul\.Tensor"):
        outputs.run(aten.mul.Tensor, (x, 2.0), {})


def test_the_switch_turns_the_fast_path_off():
    with configured(enabled=False):
        outputs = MetaOutputs()
    x = meta(4, 6)
    for _ in range(2):
        outputs.run(aten.mul.Tensor, (x, 2.0), {})
    assert outputs.built == 0 and fast_meta.enabled() == fast_meta.ENABLED


# --------------------------------------------------------------------------- whole models


class TinyViT(nn.Module):
    """Patch embedding, two pre-norm encoder layers (GELU), a class token and a head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        layer = nn.TransformerEncoderLayer(
            16, 2, 32, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        patches = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1)
        return self.head(self.norm(self.encoder(h))[:, 0])


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER)).eval()


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def mobilenet_v2():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25).eval()


MODELS = {
    "mobilenet_v2 (widths change block after block)": (
        mobilenet_v2,
        lambda: torch.randn(1, 3, 32, 32),
    ),
    "tiny llama": (tiny_llama, lambda: {"input_ids": tokens(seed=1)}),
    "resnet18": (resnet18, lambda: torch.randn(1, 3, 32, 32)),
    "resnet18, channels_last input": (
        resnet18,
        lambda: torch.randn(2, 3, 32, 32).to(memory_format=CL),
    ),
    "vit-like": (lambda: TinyViT().eval(), lambda: torch.randn(2, 3, 16, 16)),
}


def traced(model, inputs, enabled: bool):
    with configured(enabled=enabled, check=True):
        return depprune.trace(model, inputs)


def groups(graph):
    return [(g.size, g.members, g.kind) for g in graph.groups]


@pytest.mark.parametrize("name", MODELS)
def test_graphs_are_the_same_with_the_fast_path_on_and_off(name):
    build, inputs = MODELS[name]
    model, example = build(), inputs()
    fast, slow = traced(model, example, True), traced(model, example, False)
    assert fast.recording.meta_outputs_built > 0
    assert slow.recording.meta_outputs_built == 0
    assert groups(fast) == groups(slow) and groups(fast)
    assert fast.recording.log.funcs == slow.recording.log.funcs
    assert fast.recording.equations.axis_sizes == slow.recording.equations.axis_sizes
    keep = {g.index: np.arange(0, g.size, 2) for g in fast.groups}
    kept_fast = fast.kept_indices(fast.keep_mask(keep))
    kept_slow = slow.kept_indices(slow.keep_mask(keep))
    assert kept_fast.keys() == kept_slow.keys()
    assert all(np.array_equal(kept_fast[k], kept_slow[k]) for k in kept_fast)


def test_plans_and_their_replays_are_the_same_with_the_fast_path_on_and_off(monkeypatch):
    made: list[MetaOutputs] = []
    init = MetaOutputs.__init__

    def counted(self):
        init(self)
        made.append(self)

    monkeypatch.setattr(MetaOutputs, "__init__", counted)
    model, example = tiny_llama(), {"input_ids": tokens(seed=1)}
    plans = []
    for enabled in (True, False):
        with configured(enabled=enabled, check=True):
            plans.append(depprune.make_plan(model, example, ratio=0.5, importance=random(0)))
    fast, slow = plans
    assert [(g.kind, g.size, g.kept) for g in fast.groups] == [
        (g.kind, g.size, g.kept) for g in slow.groups
    ]
    assert fast.kept.keys() == slow.kept.keys() and not fast.kept_whole and not slow.kept_whole
    assert all(np.array_equal(fast.kept[k], slow.kept[k]) for k in fast.kept)
    replays = [m for m in made if m.enabled and m.built and m is not made[0]]
    assert replays, "the replay builds its meta outputs too"
