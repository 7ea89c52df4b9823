"""Architecture as the result: widths exported as JSON, applied to fresh and sibling models."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

import depprune
from depprune.architecture import Architecture, apply_architecture, architecture
from depprune.errors import MethodError
from depprune.importance import random


class Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class StagedNet(nn.Module):
    """Two stages of residual MLP blocks; ``depth`` blocks per stage, ``width`` the first's."""

    def __init__(self, depth: tuple[int, int] = (2, 2), width: int = 8, stages: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.stage1 = nn.ModuleList(Block(width, 2 * width) for _ in range(depth[0]))
        self.down = nn.Linear(width, 2 * width)
        self.stage2 = nn.ModuleList(Block(2 * width, 4 * width) for _ in range(depth[1]))
        self.stage3 = nn.ModuleList(Block(2 * width, 2 * width) for _ in range(stages - 2))
        self.head = nn.Linear(2 * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.stage1:
            x = block(x)
        x = self.down(x)
        for block in [*self.stage2, *self.stage3]:
            x = block(x)
        return self.head(x)


X = torch.zeros(2, 4)


@functools.lru_cache(maxsize=1)
def pruned_net() -> tuple[nn.Module, depprune.PruneReport]:
    """Uneven widths: each block and stream keeps its own fraction (shared: do not change it)."""
    torch.manual_seed(0)
    model = StagedNet()
    ratios = {
        model.stem: 0.25,
        model.stage1[0]: 0.5,
        model.stage1[1]: 0.25,
        model.down: 0.5,
        model.stage2: 0.75,
    }
    return model, depprune.prune(model, X, ratio=0.0, ratios=ratios)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_json_round_trip_keeps_every_field(tmp_path):
    model, report = pruned_net()
    arch = architecture(report, model)
    assert arch.model_class == "StagedNet"
    assert arch.modules["stage1.0.fc1"] == {"in_features": 6, "out_features": 8}
    assert arch.roles["stage1.#.fc1.weight[0]:neurons"].fraction == (8 + 12) / 32
    assert arch.kinds["neurons"].groups == len(report.plan.groups)
    path = tmp_path / "arch.json"
    arch.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "depprune-architecture" and data["version"] == 1
    loaded = Architecture.load(path)
    assert loaded == arch
    assert loaded.to_dict() == arch.to_dict()


def edited(arch: Architecture, change) -> dict:
    data = json.loads(json.dumps(arch.to_dict()))
    change(data)
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(version=2), "version 2"),
        (lambda d: d.update(format="plan"), "format 'plan'"),
        (lambda d: d.pop("kinds"), r"missing \['kinds'\]"),
        (lambda d: d["groups"][0].update(kept=99), "keeping 99 of 8"),
        (lambda d: d["groups"][0].update(kept="4"), "kept '4', not a int"),
        (lambda d: d["groups"][0].update(kind="filters"), "unknown kind 'filters'"),
        (lambda d: d["groups"][0].pop("role"), "group 0 without exactly the fields"),
        (lambda d: d["groups"][1].update(role="x:neurons"), "role 'x:neurons'"),
        (lambda d: d["groups"][0].update(first_member="stem.weight"), "not '<tensor name>"),
        (lambda d: d["roles"]["stem.weight[0]:neurons"].update(kept=1), "roles that do not add"),
        (lambda d: d["modules"]["stem"].update(out_features=1.5), "not integers"),
    ],
)
def test_load_checks_every_field(tmp_path, change, message):
    model, report = pruned_net()
    arch = architecture(report, model)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(edited(arch, change)))
    with pytest.raises(MethodError, match=message):
        Architecture.load(path)


def test_load_of_a_file_that_is_not_json_raises(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text("{not json")
    with pytest.raises(MethodError, match="not a readable architecture"):
        Architecture.load(path)


def test_applied_to_a_fresh_model_the_widths_are_exactly_the_pruned_ones(tmp_path):
    pruned, report = pruned_net()
    arch = architecture(report.plan, pruned)
    arch.save(tmp_path / "arch.json")
    torch.manual_seed(1)  # another init: only the widths carry over
    fresh = StagedNet()
    result = apply_architecture(fresh, X, tmp_path / "arch.json")
    assert shapes(fresh) == shapes(pruned)
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert result.params_after == report.params_after
    modules = dict(fresh.named_modules())
    for name, widths in arch.modules.items():
        assert {k: getattr(modules[name], k) for k in widths} == widths
    # The architecture read from the model before pruning is the same.
    torch.manual_seed(0)
    unpruned = StagedNet()
    assert architecture(report.plan, unpruned).modules == arch.modules


def test_by_member_keeps_the_largest_fresh_weights():
    _, report = pruned_net()
    torch.manual_seed(2)
    fresh = StagedNet()
    norms = fresh.stage2[0].fc1.weight.detach().norm(dim=1) ** 2
    norms += (
        fresh.stage2[0].fc1.bias.detach() ** 2
        + fresh.stage2[0].fc2.weight.detach().norm(dim=0) ** 2
    )
    result = apply_architecture(fresh, X, architecture(report))
    group = next(g for g in result.plan.groups if g.first_member == "stage2.0.fc1.weight[0]")
    kept = result.plan.kept[("stage2.0.fc1.weight", 0)]
    assert kept.tolist() == sorted(torch.argsort(norms, descending=True)[: group.kept].tolist())


def role_fractions(report: depprune.PruneReport) -> dict[str, float]:
    return {role: w.fraction for role, w in architecture(report).roles.items()}


def test_by_role_a_deeper_sibling_gets_the_same_per_stage_fractions():
    _, report = pruned_net()
    arch = architecture(report)
    deeper = StagedNet(depth=(3, 4))
    result = apply_architecture(deeper, X, arch, by="role")
    assert role_fractions(result) == {r: w.fraction for r, w in arch.roles.items()}
    # Each block of a stage keeps the stage's fraction: 20 of 32 hidden units -> 10 of 16.
    assert [b.fc1.out_features for b in deeper.stage1] == [10, 10, 10]
    assert [b.fc1.out_features for b in deeper.stage2] == [8, 8, 8, 8]
    assert deeper.stem.out_features == 6 and deeper.down.out_features == 8


def test_by_role_a_wider_sibling_gets_the_same_fractions():
    _, report = pruned_net()
    arch = architecture(report)
    wider = StagedNet(width=16)
    result = apply_architecture(wider, X, arch, by="role")
    assert role_fractions(result) == {r: w.fraction for r, w in arch.roles.items()}
    assert wider.stem.out_features == 12 and wider.stage2[1].fc1.out_features == 16


def test_resnet18_widths_applied_to_resnet34_by_stage():
    tv = pytest.importorskip("torchvision.models")
    x = torch.zeros(1, 3, 32, 32)
    small = tv.resnet18(num_classes=10).eval()
    ratios = {small.layer1: 0.25, small.layer2: 0.5, small.layer3: 0.5, small.layer4: 0.75}
    plan = depprune.make_plan(small, x, ratio=0.5, ratios=ratios, importance=random(0))
    arch = architecture(plan)
    assert arch.roles["layer1.#.conv1.weight[0]:channels"].fraction == 48 / 64
    assert arch.roles["layer4.#.conv1.weight[0]:channels"].fraction == 128 / 512
    deep = tv.resnet34(num_classes=10).eval()
    result = apply_architecture(deep, x, arch, by="role", importance=random(0), count_macs=False)
    assert role_fractions(result) == {r: w.fraction for r, w in arch.roles.items()}
    assert [b.conv1.out_channels for b in deep.layer3] == [128] * 6
    assert deep(x).shape == (1, 10)


def test_mismatches_raise_naming_them_and_leave_the_model_as_it_was():
    _, report = pruned_net()
    arch = architecture(report)
    deeper = StagedNet(depth=(3, 2))
    before = shapes(deeper)
    with pytest.raises(MethodError, match=r"does not cover: stage1\.2\.fc1\.weight\[0\]"):
        apply_architecture(deeper, X, arch)
    three = StagedNet(stages=3)
    with pytest.raises(MethodError, match=r"no layer role stage3\.#\.fc1\.weight\[0\]:neurons"):
        apply_architecture(three, X, arch, by="role")
    shallower = StagedNet(depth=(1, 2))
    with pytest.raises(MethodError, match=r"the model lacks: stage1\.1\.fc1\.weight\[0\]"):
        apply_architecture(shallower, X, arch)
    with pytest.raises(MethodError, match="by is 'stage'"):
        apply_architecture(deeper, X, arch, by="stage")
    with pytest.raises(MethodError, match=r"needs a depprune\.Plan"):
        architecture(deeper)
    assert shapes(deeper) == before and shapes(three) == shapes(StagedNet(stages=3))


def test_groups_produced_by_the_model_itself_are_reproduced_by_member():
    from torchvision.models import VisionTransformer

    def vit():
        torch.manual_seed(0)
        return VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=4,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        )

    x = torch.randn(1, 3, 32, 32)
    pruned = vit()
    plan = depprune.make_plan(pruned, x, ratio=0.3, progress=False)
    plan.apply(pruned)
    fresh = vit()
    apply_architecture(fresh, x, architecture(plan), by="member", progress=False)
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert fresh.class_token.shape == pruned.class_token.shape
