"""Network Slimming: L1 on BatchNorm scales, then one global threshold over them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import depprune
from depprune import MethodError
from depprune.importance import ScoreContext, batchnorm_scale
from depprune.methods import slimming
from depprune.sparsity import BatchNormL1

pytestmark = pytest.mark.usefixtures("one_thread")


IMAGE = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))


class ThreeBlocks(nn.Module):
    """Three conv-BN layers (4, 6, 8 channels), pooled into a classifier with 5 hidden neurons."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 8, 3)]
        )
        self.norms = nn.ModuleList([nn.BatchNorm2d(4), nn.BatchNorm2d(6), nn.BatchNorm2d(8)])
        self.fc = nn.Linear(8, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(norm(conv(x)))
        return self.out(torch.relu(self.fc(x.mean(dim=(2, 3)))))


class Residual(nn.Module):
    """A stem and one bottleneck block added to it: the stream's channels have two BatchNorms."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stem_norm = nn.BatchNorm2d(6)
        self.reduce = nn.Conv2d(6, 4, 1)
        self.reduce_norm = nn.BatchNorm2d(4)
        self.expand = nn.Conv2d(4, 6, 1)
        self.expand_norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        stream = torch.relu(self.stem_norm(self.stem(x)))
        block = self.expand_norm(self.expand(torch.relu(self.reduce_norm(self.reduce(stream)))))
        return self.head(torch.relu(stream + block).mean(dim=(2, 3)))


def three_blocks(scales=None) -> ThreeBlocks:
    torch.manual_seed(0)
    model = ThreeBlocks()
    if scales is not None:
        with torch.no_grad():
            for norm, values in zip(model.norms, scales, strict=True):
                norm.weight.copy_(values)
    return model


def test_step_adds_strength_times_sign_which_is_the_gradient_of_penalty():
    model = three_blocks(
        [torch.tensor([-0.5, 0.0, 0.25, 2.0]), torch.linspace(-1, 1, 6), torch.randn(8)]
    )
    reg = BatchNormL1(model, strength=0.3)
    want = [0.3 * torch.sign(norm.weight.detach()) for norm in model.norms]
    assert reg.penalty().item() == pytest.approx(
        0.3 * sum(norm.weight.abs().sum().item() for norm in model.norms), rel=1e-6
    )
    model.zero_grad(set_to_none=True)
    reg.step()
    by_step = [norm.weight.grad.clone() for norm in model.norms]
    model.zero_grad(set_to_none=True)
    reg.penalty().backward()
    by_autograd = [norm.weight.grad.clone() for norm in model.norms]
    for mine, theirs, expected in zip(by_step, by_autograd, want, strict=True):
        assert torch.allclose(mine, expected) and torch.allclose(theirs, expected)
    assert all(norm.bias.grad is None for norm in model.norms)  # only the scales
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert reg.penalty().dtype == torch.float32


def fraction_below_after_training(strength, threshold=0.1, steps=30):
    torch.manual_seed(0)
    model = three_blocks()
    with torch.no_grad():
        for norm in model.norms:
            norm.weight.uniform_(0.05, 0.6)
    targets = torch.randint(0, 2, (IMAGE.shape[0],), generator=torch.Generator().manual_seed(1))
    reg = BatchNormL1(model, strength=strength)
    before = reg.fraction_below(threshold)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(IMAGE), targets).backward()
        reg.step()
        optimizer.step()
    return before, reg.fraction_below(threshold)


def test_training_with_the_penalty_makes_batchnorm_scales_sparse():
    """30 SGD steps with strength 0.1: the share of scales below 0.1 grows by more than 30
    points, and ends more than 20 points above the same run without the penalty."""
    before, after = fraction_below_after_training(strength=0.1)
    control_before, control = fraction_below_after_training(strength=0.0)
    assert before == control_before
    assert after > before + 0.3
    assert after > control + 0.2


def test_one_global_threshold_removes_exactly_the_lowest_scales_across_layers():
    generator = torch.Generator().manual_seed(3)
    magnitudes = torch.linspace(0.05, 1.0, 18)[torch.randperm(18, generator=generator)]
    signs = torch.where(torch.rand(18, generator=generator) < 0.5, -1.0, 1.0)
    scales = list((magnitudes * signs).split([4, 6, 8]))
    model = three_blocks(scales)
    # Direct: the 9 lowest |gamma| of all 18 channels, wherever they are.
    lowest = set(torch.argsort(magnitudes)[:9].tolist())
    offsets = [0, 4, 10]
    want = [
        sorted(k - offsets[layer] for k in lowest if offsets[layer] <= k < offsets[layer] + size)
        for layer, size in enumerate((4, 6, 8))
    ]
    assert all(len(removed) < size for removed, size in zip(want, (4, 6, 8), strict=True))
    assert len({len(removed) for removed in want}) > 1  # not the same share per layer

    report = slimming.prune(model, IMAGE, ratio=0.5)
    by_conv = {g.members[0][0]: g.index for g in report.graph.groups}
    got = [report.plan.removed.get(by_conv[f"convs.{i}.weight"]) for i in range(3)]
    assert [units.tolist() if units is not None else [] for units in got] == want
    kept = [scale.abs() for scale in scales]
    for norm, values, removed in zip(model.norms, kept, want, strict=True):
        keep = [k for k in range(values.numel()) if k not in removed]
        assert torch.equal(norm.weight.detach().abs(), values[keep])
    # The classifier's hidden neurons have no BatchNorm: kept whole, and said so.
    assert model.fc.out_features == 5
    assert any(
        "fc.weight[0]" in reason and "no BatchNorm" in reason for reason in report.kept_whole
    )
    assert "no BatchNorm" in str(report)


def test_a_channel_with_several_batchnorms_scores_its_largest_scale():
    model = Residual()
    with torch.no_grad():
        model.stem_norm.weight.copy_(torch.tensor([0.01, 0.01, 0.9, 0.01, 0.5, 0.02]))
        model.expand_norm.weight.copy_(torch.tensor([0.01, -0.8, 0.01, 0.02, 0.01, 0.03]))
        model.reduce_norm.weight.copy_(torch.tensor([0.04, 0.6, 0.05, 0.7]))
    graph = depprune.trace(model, IMAGE)
    ctx = ScoreContext.from_model(graph, model)
    stream = next(g for g in graph.groups if g.members[0] == ("stem.weight", 0))
    inner = next(g for g in graph.groups if g.members[0] == ("reduce.weight", 0))
    largest = [0.01, 0.8, 0.9, 0.02, 0.5, 0.03]
    assert slimming.channel_scale(stream, ctx).tolist() == pytest.approx(largest)
    # batchnorm_scale sums the two BatchNorms instead.
    summed = [0.02, 0.81, 0.91, 0.03, 0.51, 0.05]
    assert batchnorm_scale(stream, ctx).tolist() == pytest.approx(summed)
    assert slimming.channel_scale.globally_comparable is True

    report = slimming.prune(model, IMAGE, ratio=0.5)  # 5 of the 10 scaled channels
    # Scores 0.01 0.02 0.03 (stream 0, 3, 5), 0.04 0.05 (inner 0, 2); stream channel 1 has a
    # 0.01 scale in one BatchNorm but 0.8 in the other, so it stays.
    assert report.plan.removed[stream.index].tolist() == [0, 3, 5]
    assert report.plan.removed[inner.index].tolist() == [0, 2]
    assert model.stem_norm.weight.detach().abs().tolist() == pytest.approx([0.01, 0.9, 0.5])


def test_bad_input_raises_and_leaves_the_model_unchanged():
    no_norm = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(MethodError, match="BatchNorm with a learnable scale"):
        slimming.prune(no_norm, torch.zeros(1, 3))
    with pytest.raises(MethodError, match="BatchNorm with a learnable scale"):
        slimming.regularizer(no_norm)
    model = three_blocks()
    with pytest.raises(MethodError, match="fraction of BatchNorm channels"):
        slimming.prune(model, IMAGE, ratio=1.0)
    with pytest.raises(MethodError, match="strength"):
        slimming.regularizer(model, strength=float("nan"))
    assert [norm.num_features for norm in model.norms] == [4, 6, 8]


def test_the_regularizer_follows_the_model_through_pruning():
    model = three_blocks()
    reg = slimming.regularizer(model, strength=0.1)
    slimming.prune(model, IMAGE, ratio=0.5)
    reg.step()
    for norm in model.norms:
        assert norm.weight.grad.shape == norm.weight.shape
