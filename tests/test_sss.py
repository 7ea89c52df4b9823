"""Sparse Structure Selection: scales on residual branches, proximal L1 steps, removal."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import depprune
from depprune.errors import MethodError
from depprune.importance import random
from depprune.methods import sss


class Block(nn.Module):
    """``x + branch(x)``; the branch ends in a linear (its scale folds into it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class ConvBlock(nn.Module):
    """``relu(x + branch(x))`` with a conv-BN branch, or a ReLU-ended one (no fold)."""

    def __init__(self, channels: int, last: str = "bn") -> None:
        super().__init__()
        layers = [nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)]
        if last == "relu":
            layers.append(nn.ReLU())
        self.branch = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.branch(x))


class DownBlock(nn.Module):
    """A stride-2 branch with a projection shortcut: zeros cannot follow its input's shape."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out)
        )
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


def tiny_cnn(down: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), ConvBlock(8), ConvBlock(8, "relu"), ConvBlock(8)]
    if down:
        layers.append(DownBlock(8, 16))
    width = 16 if down else 8
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))
    # Non-trivial BatchNorm statistics, so folding into BN is tested on real numbers.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def image(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def set_scales(scales: sss.StructureScales, values: list[float]) -> None:
    with torch.no_grad():
        for param, value in zip(scales.parameters(), values, strict=True):
            param.fill_(value)


def unhooked(module: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A branch's raw output, through its children (which carry no scale hook)."""
    for layer in module:
        x = layer(x)
    return x


def test_scales_multiply_the_branch_outputs():
    torch.manual_seed(0)
    model = ResidualMLP(depth=2)
    x = torch.randn(3, 4)
    scales = sss.StructureScales(model, [model.blocks[0].branch, "blocks.1.branch"])
    assert scales.scales() == {"blocks.0.branch": 1.0, "blocks.1.branch": 1.0}
    assert set(map(id, scales.parameters())) <= set(map(id, model.parameters()))
    set_scales(scales, [0.3, -1.5])
    h = model.stem(x)
    h = h + 0.3 * unhooked(model.blocks[0].branch, h)
    h = h - 1.5 * unhooked(model.blocks[1].branch, h)
    torch.testing.assert_close(model(x), model.head(h))


def test_proximal_step_soft_thresholds_exactly():
    model = ResidualMLP(depth=4)
    scales = sss.StructureScales(model, example_inputs=torch.zeros(2, 4), strength=0.25)
    set_scales(scales, [0.5, -0.3, 0.025, -0.01])
    scales.step(lr=0.1)  # threshold 0.025
    got = scales.scales()
    assert got["blocks.0.branch"] == pytest.approx(0.475, abs=1e-7)
    assert got["blocks.1.branch"] == pytest.approx(-0.275, abs=1e-7)
    assert got["blocks.2.branch"] == 0.0 and got["blocks.3.branch"] == 0.0
    scales.step(lr=0.0)  # no threshold: nothing moves
    assert scales.scales() == got


def test_penalty_and_its_gradient():
    model = ResidualMLP(depth=3)
    scales = sss.StructureScales(model, example_inputs=torch.zeros(2, 4), strength=0.5)
    set_scales(scales, [2.0, -1.0, 0.5])
    penalty = scales.penalty()
    assert penalty.item() == pytest.approx(0.5 * 3.5)
    penalty.backward()
    assert [p.grad.item() for p in scales.parameters()] == [0.5, -0.5, 0.5]


def train(model: nn.Module, scales: sss.StructureScales, steps: int = 150) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 4, generator=g)
    target = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = ((model(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scales.step(lr=0.1)


def test_training_with_a_strong_penalty_zeroes_some_scales_and_removal_is_exact():
    torch.manual_seed(0)
    model = ResidualMLP(depth=4)
    x = torch.randn(5, 4)
    scales = sss.StructureScales(model, example_inputs=x, strength=0.2)
    assert scales.names == tuple(f"blocks.{i}.branch" for i in range(4))
    train(model, scales)
    trained = scales.scales()
    zero = [n for n, v in trained.items() if v == 0.0]
    assert 1 <= len(zero) < 4, trained  # exactly zero, not just small

    before = model(x).detach()
    params_before = sum(p.numel() for p in model.parameters())
    branch_params = sum(p.numel() for p in model.blocks[0].branch.parameters())  # + its scale
    report = sss.prune(model, x)
    assert report.removed == zero
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    after = sum(p.numel() for p in model.parameters())
    # Removed branches lose every parameter; kept ones lose only their scale (folded).
    assert after == params_before - len(zero) * branch_params - (4 - len(zero))
    assert report.params_after == after and report.params_before == params_before
    for name in zero:
        assert isinstance(model.get_submodule(name), sss.ZeroStructure)
        assert not any(k.startswith(name + ".") for k in model.state_dict())
    assert not any(sss.SCALE in k for k in model.state_dict())
    assert not any(m._forward_hooks for m in model.modules())


def test_kept_scales_fold_into_the_last_linear_or_batchnorm_exactly():
    model = tiny_cnn()
    x = image()
    scales = sss.StructureScales(model, example_inputs=x)
    assert scales.names == ("1.branch", "2.branch", "3.branch")
    set_scales(scales, [0.7, -0.4, 0.0])
    bn = model[1].branch[1]
    weight, bias = bn.weight.detach().clone(), bn.bias.detach().clone()
    before = model(x)
    report = sss.prune(model, x)
    assert report.removed == ["3.branch"]
    assert report.folded == {"1.branch": "1.branch.1"}
    assert report.buffered == ["2.branch"]  # ends in a ReLU: the scale stays a buffer
    assert torch.equal(bn.weight, weight * 0.7) and torch.equal(bn.bias, bias * 0.7)
    assert float(model[2].branch.structure_scale) == pytest.approx(-0.4)
    assert "2.branch.structure_scale" in dict(model.named_buffers())
    assert not any(isinstance(p, nn.Parameter) and p.dim() == 0 for p in model.parameters())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert report.macs_after < report.macs_before


def test_threshold_removes_small_scales_and_output_follows_the_zeroed_model():
    model = tiny_cnn()
    x = image()
    scales = sss.StructureScales(model, example_inputs=x)
    set_scales(scales, [0.05, 1.0, 0.5])
    report = scales.remove(x, threshold=0.1)
    assert report.removed == ["1.branch"]
    reference = tiny_cnn()  # same seed: the same weights
    with torch.no_grad():
        h = reference[0](x)
        h = torch.relu(h)  # branch 1 removed: relu(h + 0)
        h = torch.relu(h + 1.0 * unhooked(reference[2].branch, h))
        h = torch.relu(h + 0.5 * unhooked(reference[3].branch, h))
        expected = reference[6](reference[5](reference[4](h)))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_a_zero_branch_that_changes_shape_is_kept_with_its_scale_and_a_note():
    model = tiny_cnn(down=True)
    x = image()
    scales = sss.StructureScales(model, example_inputs=x)
    assert "4.branch" in scales.names and "4.shortcut" not in scales.names
    set_scales(scales, [1.0, 1.0, 1.0, 0.0])
    before = model(x)
    report = sss.prune(model, x)
    # Zeros of its output's shape cannot stand in for it, so it stays, scaled by 0.
    assert "4.branch" not in report.removed
    assert isinstance(model[4].branch, nn.Sequential)
    assert any(
        re.search(r"4\.branch.*kept.*shape \[2, 16, 4, 4\].*\[2, 8, 8, 8\]", note)
        for note in report.notes
    )
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    # Kept at a nonzero scale, the same branch folds into its BatchNorm.
    model = tiny_cnn(down=True)
    scales = sss.StructureScales(model, example_inputs=x)
    set_scales(scales, [1.0, 1.0, 1.0, 0.5])
    before = model(x)
    assert sss.prune(model, x).folded["4.branch"] == "4.branch.1"
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


class TupleBranch(nn.Module):
    def forward(self, x):
        return x, x.sum()


class TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = TupleBranch()

    def forward(self, x):
        return x + self.branch(x)[0]


def test_tuple_outputs_and_bad_arguments_raise_method_errors():
    model = nn.Sequential(nn.Linear(4, 4), TupleBlock())
    with pytest.raises(MethodError, match=r"1\.branch returns a tuple"):
        sss.StructureScales(model, [model[1].branch], example_inputs=torch.zeros(2, 4))
    assert not hasattr(model[1].branch, sss.SCALE)
    with pytest.raises(MethodError, match="not a submodule"):
        sss.StructureScales(model, [nn.Linear(2, 2)])
    with pytest.raises(MethodError, match="strength"):
        sss.StructureScales(model, ["0"], strength=-1.0)
    with pytest.raises(MethodError, match="needs example_inputs"):
        sss.StructureScales(model)
    with pytest.raises(MethodError, match="no structure scales"):
        sss.prune(model, torch.zeros(2, 4))
    scales = sss.StructureScales(model, ["0"])
    with pytest.raises(MethodError, match="already has"):
        sss.StructureScales(model, ["0"])
    with pytest.raises(MethodError, match="lr"):
        scales.step(lr=-0.1)
    with pytest.raises(MethodError, match="threshold"):
        sss.prune(model, torch.zeros(2, 4), threshold=-1)


def test_residual_branches_of_torchvision_resnet_and_a_pre_norm_transformer_layer():
    tv = pytest.importorskip("torchvision.models")
    names = sss.residual_branches(tv.resnet18().eval(), torch.zeros(1, 3, 32, 32))
    # The branch's last module, never the projection shortcut (downsample).
    assert names == [f"layer{s}.{b}.bn2" for s in range(1, 5) for b in range(2)]

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

        def forward(self, x):
            h = self.norm1(x)
            x = x + self.proj(self.attn(h, h, h, need_weights=False)[0])
            return x + self.mlp(self.norm2(x))

    assert sss.residual_branches(Layer(), torch.zeros(2, 5, 8)) == ["proj", "mlp"]


def test_torchvision_blocks_go_whole_and_the_result_traces_and_prunes():
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tv.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    scales = sss.StructureScales(model, example_inputs=x)
    set_scales(scales, [0.0 if i % 2 else 0.8 for i in range(8)])
    before = model(x)
    idle = ["conv1", "bn1", "conv2"]
    freed = sum(
        p.numel()
        for s in range(1, 5)
        for name in [*idle, "bn2"]
        for p in model.get_submodule(f"layer{s}.1.{name}").parameters()
        if p.dim()  # the scales are counted below
    )
    params_before = sum(p.numel() for p in model.parameters())
    report = sss.prune(model, x, count_macs=False)
    assert report.removed == [f"layer{s}.1.bn2" for s in range(1, 5)]
    assert report.idle_removed == [f"layer{s}.1.{n}" for s in range(1, 5) for n in idle]
    assert report.params_after == params_before - freed - 8  # and the 8 scales
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)

    graph = depprune.trace(model, x)
    assert graph.groups and not graph.unsupported_ops
    pruned = depprune.prune(model, x, ratio=0.5, importance=random(0), count_macs=False)
    assert pruned.params_after < pruned.params_before
    assert model(x).shape == (1, 10)


def test_a_pruned_custom_model_traces_and_prunes_structurally():
    model = tiny_cnn()
    x = image()
    scales = sss.StructureScales(model, example_inputs=x)
    set_scales(scales, [0.0, 0.6, 0.9])
    sss.prune(model, x)
    report = depprune.prune(model, x, ratio=0.5)
    assert report.params_after < report.params_before
    assert [g.kept for g in report.plan.groups if g.kept < g.size]
    assert model(x).shape == (2, 3)
