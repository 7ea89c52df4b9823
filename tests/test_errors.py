"""Bad input to the public API: a clear DeppruneError, and the model exactly as it was."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import depprune
from depprune import (
    DeppruneError,
    InvalidPlanError,
    Plan,
    PlanMismatchError,
    SelectionError,
    TraceError,
    UnsupportedOpError,
)


class Net(nn.Module):
    def __init__(self, fft: bool = False):
        super().__init__()
        self.fft = fft
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if self.fft:
            # A real FFT has no axis rule: strict mode must refuse it.
            x = torch.fft.rfft(x, dim=-1).abs()
        return self.head(x.mean(dim=(2, 3)))


def make_net(**kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs).eval()


IMAGE = torch.randn(2, 3, 8, 8)


def snapshot(model: nn.Module) -> dict:
    """Every tensor and the attributes of every module, to compare after a failed call."""
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    attrs = {
        name: {k: copy.copy(v) for k, v in vars(m).items() if not k.startswith("_")}
        for name, m in model.named_modules()
    }
    ids = {name: id(p) for name, p in model.named_parameters()}
    return {"state": state, "attrs": attrs, "ids": ids}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"], "parameters were replaced"
    assert after["attrs"] == before["attrs"], "module attributes changed"
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


def fails_cleanly(model, error, match, call):
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, DeppruneError)
    assert_unchanged(model, before)
    return info.value


def test_wrong_example_inputs_name_the_problem():
    model = make_net()
    fails_cleanly(
        model,
        TraceError,
        r"example_inputs did not run model Net: RuntimeError: .*Pass the inputs its forward takes",
        lambda: depprune.prune(model, torch.randn(2, 5, 8, 8)),
    )


def test_wrong_keyword_inputs():
    model = make_net()
    fails_cleanly(
        model,
        TraceError,
        r"TypeError: .*unexpected keyword argument 'pixels'",
        lambda: depprune.prune(model, {"pixels": IMAGE}),
    )


def test_missing_example_inputs_for_make_plan():
    model = make_net()
    fails_cleanly(model, TraceError, r"needs example_inputs", lambda: depprune.make_plan(model))


def test_a_module_not_in_the_model():
    model, stranger = make_net(), nn.Linear(8, 8)
    for kwargs in ({"ratios": {stranger: 0.3}}, {"ignored": [stranger]}):
        fails_cleanly(
            model,
            SelectionError,
            r"Linear object given in ratios/ignored is not a submodule of Net",
            lambda kwargs=kwargs: depprune.prune(model, IMAGE, **kwargs),
        )


def test_ignored_must_be_modules():
    model = make_net()
    fails_cleanly(
        model,
        TraceError,
        r"ignored must hold nn.Module objects .* got str",
        lambda: depprune.trace(model, IMAGE, ignored=["conv"]),
    )


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan"), "half"])
def test_ratio_outside_zero_one(ratio):
    model = make_net()
    fails_cleanly(
        model,
        SelectionError,
        r"ratio is .*; a ratio is the fraction of units to remove, in \[0, 1\)",
        lambda: depprune.prune(model, IMAGE, ratio=ratio),
    )


def test_scoped_ratio_outside_zero_one():
    model = make_net()
    fails_cleanly(
        model,
        SelectionError,
        r"the ratio of \('conv\.',\) is 2; a ratio is the fraction",
        lambda: depprune.prune(model, IMAGE, ratios={model.conv: 2}),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_units": 0}, "min_units is 0; every group must keep at least 1 unit"),
        ({"round_to": 0}, "round_to is 0; it must be a positive unit count"),
    ],
)
def test_bad_constraints(kwargs, match):
    model = make_net()
    fails_cleanly(model, SelectionError, match, lambda: depprune.prune(model, IMAGE, **kwargs))


def test_unknown_op_under_strict_names_it():
    model = make_net(fft=True)
    fails_cleanly(
        model,
        UnsupportedOpError,
        r"aten\._fft_r2c has no axis rule; pass strict=False to freeze its axes",
        lambda: depprune.prune(model, IMAGE, strict=True),
    )


def test_unknown_op_without_strict_is_reported_and_frozen():
    model = make_net(fft=True)
    report = depprune.prune(model, IMAGE, ratio=0.5)
    assert report.unsupported_ops == {"aten._fft_r2c": 1}
    assert "frozen by ops without a rule: aten._fft_r2c x1" in str(report)
    # The conv's channels flow into the FFT, so they are frozen, never guessed.
    assert model.conv.out_channels == 8


def test_plan_for_another_model_is_refused():
    model, other = make_net(), nn.Sequential(nn.Conv2d(3, 16, 3))
    plan = depprune.make_plan(model, IMAGE, ratio=0.5)
    fails_cleanly(
        other, PlanMismatchError, r"which Sequential does not have", lambda: plan.apply(other)
    )


def test_plan_applied_twice_is_refused():
    model = make_net()
    plan = depprune.make_plan(model, IMAGE, ratio=0.5)
    plan.apply(model)
    fails_cleanly(
        model,
        PlanMismatchError,
        r"made for 'conv.weight' of shape \(8, 3, 3, 3\), but the model's has shape \(4, 3, 3, 3\)",
        lambda: plan.apply(model),
    )


def test_corrupt_plan_files(tmp_path):
    model = make_net()
    plan = depprune.make_plan(model, IMAGE, ratio=0.5)
    good = tmp_path / "plan.npz"
    plan.save(good)
    loaded = Plan.load(good)
    assert loaded.kept.keys() == plan.kept.keys()
    assert all(np.array_equal(loaded.kept[k], plan.kept[k]) for k in plan.kept)
    assert loaded.groups == plan.groups

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InvalidPlanError, match=r"is not a readable depprune plan"):
        Plan.load(truncated)
    with pytest.raises(InvalidPlanError, match=r"is not a readable depprune plan"):
        Plan.load(tmp_path / "missing.npz")

    def rewrite(name, **arrays):
        with np.load(good) as data:
            contents = dict(data)
        contents.update(arrays)
        path = tmp_path / name
        np.savez(path, **contents)
        return path

    out_of_range = plan.kept[next(iter(plan.kept))].copy()
    out_of_range[-1] = 10_000
    indices = np.concatenate([out_of_range, *list(plan.kept.values())[1:]])
    with pytest.raises(InvalidPlanError, match=r"must be sorted, unique and in \[0, 8\)"):
        Plan.load(rewrite("range.npz", indices=indices))
    with pytest.raises(InvalidPlanError, match=r"plan offsets do not split"):
        Plan.load(rewrite("offsets.npz", offsets=np.array([0, 1], dtype=np.int64)))
    with pytest.raises(InvalidPlanError, match=r"not a version-1 depprune plan"):
        Plan.load(rewrite("meta.npz", meta=np.frombuffer(b'{"format": "x"}', dtype=np.uint8)))
    with pytest.raises(InvalidPlanError, match=r"malformed plan"):
        bad_meta = b'{"format": "depprune-plan", "version": 1, "members": 3}'
        Plan.load(rewrite("members.npz", meta=np.frombuffer(bad_meta, dtype=np.uint8)))


def test_apply_is_all_or_nothing_when_a_fixer_refuses():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    # Cutting only the query columns of c_attn leaves q, k and v of different widths,
    # which GPT-2's equal split cannot run; the MLP cut planned alongside must not land.
    queries = np.arange(0, 8)
    kept = {
        ("transformer.h.0.attn.c_attn.weight", 1): np.concatenate([queries, np.arange(16, 48)]),
        ("transformer.h.0.mlp.c_fc.weight", 1): np.arange(32),
    }
    plan = Plan.from_kept(model, kept)
    fails_cleanly(
        model,
        PlanMismatchError,
        r"transformer.h.0.attn: c_attn would keep .* prune q, k and v to the same sizes",
        lambda: plan.apply(model),
    )


def test_a_failing_assignment_rolls_every_cut_back():
    class Locked(nn.Linear):
        @property
        def out_features(self):  # read-only: the fixer's setattr must fail
            return self.weight.shape[0]

        @out_features.setter
        def out_features(self, value):
            if getattr(self, "_locked", False):
                raise AttributeError("out_features is locked")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Locked(8, 6), nn.ReLU(), nn.Linear(6, 2))
    model[2]._locked = True
    plan = depprune.make_plan(model, torch.randn(3, 4), ratio=0.5)
    fails_cleanly(
        model,
        PlanMismatchError,
        r"setting Locked.out_features failed \(AttributeError: out_features is locked\); every "
        "change was undone",
        lambda: plan.apply(model),
    )


def test_boolean_or_unsorted_kept_indices_are_refused():
    from depprune.apply import apply_kept_indices

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for indices, match in [
        (np.array([True, False, True, True]), "must be a 1-d integer array"),
        (np.array([2, 0]), "must be sorted and unique"),
        (np.array([-1, 2]), "keeps index -1 of dim 0"),
    ]:
        fails_cleanly(
            model,
            PlanMismatchError,
            match,
            lambda indices=indices: apply_kept_indices(model, {("0.weight", 0): indices}),
        )
