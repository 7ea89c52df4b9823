"""The proof: plans are replayed on a meta shadow, and what the replay refutes stays whole.

Each model computes with a size the equations cannot see. Before the replay these came
out silently wrong or broken; now each is pruned exactly where the replay proves it, or
kept whole with the reason, and the model's forward always matches the exact cut.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pruning_oracle import assert_same_outputs, outputs, zeroed_copy
from tiny_models import TINY_DECODER
from torch import nn

import depprune
from depprune import Plan, PlanMismatchError
from depprune.verify import replay_plan

torch.manual_seed(0)


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 3)


class LiteralHeadDim(Base):
    def forward(self, x):
        return self.b(self.a(x).view(x.shape[0], -1, 4).softmax(-1).flatten(1))


class BothLiteral(Base):
    def forward(self, x):
        return self.b(self.a(x).view(-1, 4, 4).relu().flatten(1))


class HeadDimAttribute(Base):
    def __init__(self):
        super().__init__()
        self.head_dim = 4

    def forward(self, x):
        return self.b(self.a(x).view(x.shape[0], -1, self.head_dim).softmax(-1).flatten(1))


class HeadCountAttribute(Base):
    def __init__(self):
        super().__init__()
        self.num_heads = 4

    def forward(self, x):
        return self.b(self.a(x).view(x.shape[0], self.num_heads, -1).softmax(-1).flatten(1))


class BranchOnShape(Base):
    def forward(self, x):
        h = self.a(x)
        if h.shape[-1] == 16:
            h = h * 2
        return self.b(h.relu())


class OnesInForward(Base):
    def forward(self, x):
        return self.b(self.a(x).relu() * torch.ones(16))


class SplitBySize(Base):
    def forward(self, x):
        p, q = self.a(x).split(8, -1)
        return self.b(torch.cat([p.relu(), q.sigmoid()], -1))


class TensorAttribute(Base):
    def __init__(self):
        super().__init__()
        self.scale = torch.linspace(0.5, 2, 16)  # a plain attribute, not a buffer

    def forward(self, x):
        return self.b(self.a(x).relu() * self.scale)


class HookedTensor(Base):
    def __init__(self):
        super().__init__()
        captured = torch.randn(16)
        self.a.register_forward_hook(lambda module, inputs, output: output + captured)

    def forward(self, x):
        return self.b(self.a(x).relu())


class PositionsAdded(Base):
    def forward(self, x):
        h = self.a(x)
        return self.b(h + torch.arange(h.shape[-1]))


class LiteralShuffle(nn.Module):
    """A channel shuffle that views with a literal group count: only the slots can go."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        h = self.a(x).view(x.shape[0], 4, -1).transpose(1, 2).reshape(x.shape[0], -1)
        return self.b(h.relu())


CASES = {
    # model: (parameters after a 50% prune, reason expected for what stays whole)
    LiteralHeadDim: (67, None),  # -1 is the head count: whole heads of 4 go
    HeadDimAttribute: (67, None),
    HeadCountAttribute: (67, None),  # num_heads inferred from the trace, proved
    BothLiteral: (131, "aten.view fails"),
    BranchOnShape: (131, "calls aten.relu where the trace had aten.mul"),
    OnesInForward: (131, "aten.ones gives shape (16,) where the plan predicts (8,)"),
    SplitBySize: (131, "aten.split gives shape"),
    TensorAttribute: (131, "aten.mul fails"),
    HookedTensor: (131, "aten.add fails"),
    PositionsAdded: (131, None),  # arange freezes the axis: nothing to prune
    # The 4 groups are refuted; half of each group's slots go instead: half the width.
    LiteralShuffle: (67, "aten.view gives shape"),
}


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_sizes_in_code_are_proved_or_kept_whole(cls):
    params_after, reason = CASES[cls]
    torch.manual_seed(0)
    model = cls().eval()
    exact = copy.deepcopy(model)
    x = torch.randn(5, 4)
    report = depprune.prune(model, x, ratio=0.5)
    assert report.params_after == sum(p.numel() for p in model.parameters()) == params_after
    if reason is None:
        assert report.kept_whole == []
    else:
        assert any(reason in line for line in report.kept_whole), report.kept_whole
    # What was pruned is the exact cut: zeroing the removed units gives the same output.
    graph = depprune.trace(exact, x)
    expected = outputs(zeroed_copy(exact, graph, report.plan.removed), x)
    assert_same_outputs(expected, outputs(model, x))


def test_strict_raises_at_the_first_divergence_and_leaves_the_model():
    model = OnesInForward().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanMismatchError, match=r"aten\.ones gives shape"):
        depprune.prune(model, torch.randn(5, 4), strict=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trace_runs_on_a_shadow_and_changes_no_state_in_training_mode():
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.utils.spectral_norm(nn.Conv2d(3, 8, 3))
            self.norm = nn.BatchNorm2d(8)
            self.register_buffer("seen", torch.zeros(()))
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            self.seen += 1  # a custom running buffer
            return self.head(self.norm(self.conv(x)))

    model = Stateful().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = depprune.trace(model, torch.randn(2, 3, 8, 8))
    assert graph.recording.device == "meta"
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), f"{key} changed"


def test_the_shadow_is_the_copy_deepcopy_makes():
    from depprune import shadow

    class OwnCopy(nn.Linear):
        def __deepcopy__(self, memo):  # a module with its own copy hook goes through it
            twin = nn.Linear(self.in_features, self.out_features)
            twin.copied_by_hook = True
            return twin

    class Tree(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 3)
            self.again = self.shared  # one module under two names
            self.own = OwnCopy(3, 3)
            self.settings = {"width": 3, "names": ["a"]}
            self.register_buffer("mask", torch.ones(3))
            self.shared.register_forward_hook(lambda module, args, out: out * 2)

    model = Tree()
    fast = shadow.meta_shadow(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shadow, "_copied", copy.deepcopy)
        slow = shadow.meta_shadow(model)
    for twin in (fast, slow):
        assert twin.again is twin.shared and twin.shared is not model.shared
        assert twin.own.copied_by_hook and twin.settings == model.settings
        assert twin.settings is not model.settings and twin.mask.is_meta
        assert len(twin.shared._forward_hooks) == 1
    assert sorted(vars(fast)) == sorted(vars(slow))
    assert [(n, type(m)) for n, m in fast.named_modules()] == [
        (n, type(m)) for n, m in slow.named_modules()
    ]
    fast.settings["width"] = 1
    assert model.settings["width"] == 3


def test_a_plan_file_edited_into_partial_units_is_refused_before_the_model_is_touched(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    plan = depprune.make_plan(model, x, ratio=0.5)
    path = tmp_path / "plan.npz"
    plan.save(path)
    loaded = Plan.load(path)
    # Well-formed but inconsistent: the first layer keeps other rows than the second's columns.
    loaded.kept[("0.weight", 0)] = np.array([0, 1, 2, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanMismatchError, match="do not remove whole units"):
        loaded.apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    Plan.load(path).apply(model)  # the saved plan itself proves with its input shapes
    assert model[0].out_features == 4


def test_the_replay_predicts_every_shape_and_catches_a_wrong_one():
    model = HeadCountAttribute().eval()
    x = torch.randn(5, 4)
    graph = depprune.trace(model, x)
    heads = next(g for g in graph.groups if g.kind == "heads")
    keep = graph.keep_mask({heads.index: [0, 1]})
    # Without num_heads updated, view(B, 4, -1) gives 4 heads of 2: not what the plan says.
    divergence = replay_plan(model, graph, keep, graph.kept_indices(keep))
    assert divergence is not None and "aten.view gives shape (5, 4, 2)" in str(divergence)
    proved = replay_plan(
        model, graph, keep, graph.kept_indices(keep), attributes={"": {"num_heads": 2}}
    )
    assert proved is None


def test_heads_a_norm_spans_are_kept_whole_with_the_reason(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Olmo2Config(**TINY_DECODER)
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(config).eval()
    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    report = depprune.prune(model, {"input_ids": tokens})
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert any("q_norm normalises over every head" in line for line in report.kept_whole)
    assert report.params_after < report.params_before  # hidden and neurons still go
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_outputs(outputs(model, tokens), outputs(reloaded, tokens), atol=1e-6)
