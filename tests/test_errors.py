"""Bad input to the public API: a clear DeppruneError, and the model exactly as it was."""

from __future__ import annotations

import copy
import io
import json
import re
import zipfile

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from torch import nn

import depprune
from depprune import (
    DeppruneError,
    ImportanceError,
    InvalidEquationsError,
    InvalidPlanError,
    Plan,
    PlanMismatchError,
    ResourceError,
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
    plan = Plan.from_kept(model, kept, example_inputs={"input_ids": torch.zeros(1, 4).long()})
    # The proof refuses it first: those columns are not whole units of any group.
    fails_cleanly(model, PlanMismatchError, r"do not remove whole units", lambda: plan.apply(model))
    # Unproved, the fixer refuses it, and the MLP cut must not land either.
    fails_cleanly(
        model,
        PlanMismatchError,
        r"transformer.h.0.attn: c_attn would keep .* prune q, k and v to the same sizes",
        lambda: plan.apply(model, verify=False),
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
    plan = depprune.make_plan(model, torch.randn(3, 4), ratio=0.5)
    model[2]._locked = True  # after the proof, which ran on a shadow that was not locked
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


class NoEmbeddings(nn.Module):
    """Like a transformers PreTrainedModel without input embeddings: the getter raises."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or type("Config", (), {"to_dict": lambda self: {}})()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def get_input_embeddings(self):
        raise NotImplementedError

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_get_input_embeddings_not_implemented_means_no_embedding():
    from depprune.apply.config import _hidden_width
    from depprune.apply.fixers import _View

    torch.manual_seed(0)
    model = NoEmbeddings()
    assert _hidden_width(model, _View(model, [], {})) is None
    # The config has no field for the width, so the replay keeps the group whole, but says why.
    report = depprune.prune(model, torch.randn(2, 4), ratio=0.5, uniform=True)
    assert "config cannot describe" in report.kept_whole[0]


def test_a_failing_mac_counter_reports_unknown(monkeypatch):
    from torch.utils import flop_counter

    def broken(self):
        raise AssertionError("FlopCounterMode cannot count this model")

    monkeypatch.setattr(flop_counter.FlopCounterMode, "__enter__", broken)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    report = depprune.prune(model, torch.randn(2, 4), ratio=0.5)
    assert report.macs_before is None and report.macs_after is None
    assert re.search(r"MACs\s+-\s+-\s+-", str(report))
    assert model[0].out_features == 4


def test_torch_prune_weights_are_cut_with_their_mask():
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.4)
    x = torch.randn(3, 4)
    original, mask = model[0].weight_orig.detach().clone(), model[0].weight_mask.clone()
    bias, second = model[0].bias.detach().clone(), model[2].weight.detach().clone()
    report = depprune.prune(model, x, ratio=0.5)
    kept = report.plan.kept[("0.weight_orig", 0)]
    assert np.array_equal(report.plan.kept[("0.weight_mask", 0)], kept)
    assert model[0].weight_orig.shape == model[0].weight_mask.shape == (4, 4)
    assert torch.equal(model[0].weight_mask, mask[kept])
    # The plain attribute is refreshed at once, and the mask still applies.
    assert torch.equal(model[0].weight, original[kept] * mask[kept])
    hidden = torch.relu(x @ (original * mask)[kept].T + bias[kept])
    expected = hidden @ second[:, kept].T + model[2].bias
    torch.testing.assert_close(model(x), expected)
    torch_prune.remove(model[0], "weight")
    assert model[0].weight.shape == (4, 4) and model(x).shape == (3, 2)


def test_torch_prune_weights_are_scored_as_masked():
    from torch.nn.utils import prune as torch_prune

    from depprune.importance import ScoreContext, magnitude

    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, 5.0], [1.0, 1.0], [2.0, 2.0]]))
        model[0].bias.zero_()
        model[1].weight.zero_()
    # The largest row is masked out: the forward never uses it, so it scores 0.
    torch_prune.custom_from_mask(model[0], "weight", torch.tensor([[0, 0], [1, 1], [1, 1]]))
    graph = depprune.trace(model, torch.zeros(1, 2))
    scores = magnitude(1)(graph.groups[0], ScoreContext.from_model(graph, model))
    assert scores.tolist() == [0.0, 2.0, 4.0]


def test_parametrized_weights_are_kept_whole_with_the_fix_named():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    parametrize.register_parametrization(model[0], "weight", Double())
    fix = r"parametrize.remove_parametrizations\(model.get_submodule\('0'\), 'weight'\)"
    fails_cleanly(
        model,
        PlanMismatchError,
        fix,
        lambda: depprune.prune(model, torch.randn(2, 4), ratio=0.5, strict=True),
    )
    report = depprune.prune(model, torch.randn(2, 4), ratio=0.5)
    assert model[0].out_features == 8 and re.search(fix, "\n".join(report.kept_whole))
    parametrize.remove_parametrizations(model[0], "weight")
    depprune.prune(model, torch.randn(2, 4), ratio=0.5)
    assert model[0].out_features == 4


def _saved_plan(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    keep = np.array([0, 2])
    kept = {("0.weight", 0): keep, ("0.bias", 0): keep, ("1.weight", 1): keep}
    path = tmp_path / "plan.npz"
    Plan.from_kept(model, kept).save(path)
    with np.load(path) as data:
        contents = dict(data)
    return path, contents, json.loads(bytes(contents["meta"]).decode())


def _with_meta(tmp_path, contents, meta_bytes, name="bad.npz"):
    path = tmp_path / name
    np.savez(path, **{**contents, "meta": np.frombuffer(meta_bytes, dtype=np.uint8)})
    return path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"members": {"0.weight": 0}}, r"members must be a list of 2-item lists"),
        ({"members": "ab"}, r"members must be a list of 2-item lists"),
        ({"shapes": {"0.weight": [[4], 3], "0.bias": [4], "1.weight": [2, 4]}}, r"not an int"),
        ({"shapes": []}, r"shapes must be a JSON object"),
        ({"groups": [[0, "neurons", 1e400, 2, "0.weight[0]"]]}, r"a group field is inf"),
        ({"members": [["0.weight", 0.5], ["0.bias", 0], ["1.weight", 1]]}, r"member dim is 0.5"),
        ({"members": [["0.bias", 0], ["0.bias", 0], ["1.weight", 1]]}, r"listed twice"),
    ],
)
def test_plan_files_with_wrong_json_types(tmp_path, change, match):
    _, contents, meta = _saved_plan(tmp_path)
    path = _with_meta(tmp_path, contents, json.dumps({**meta, **change}).encode())
    with pytest.raises(InvalidPlanError, match=rf"bad.npz.*{match}"):
        Plan.load(path)


def test_hostile_plan_files(tmp_path):
    good, contents, _ = _saved_plan(tmp_path)
    deep = b'{"format": "depprune-plan", "version": 1, "members": ' + b"[" * 10**5 + b"]" * 10**5
    with pytest.raises(InvalidPlanError, match=r"bad.npz.*RecursionError"):
        Plan.load(_with_meta(tmp_path, contents, deep + b"}"))
    huge = tmp_path / "huge.npz"
    np.savez(huge, **{**contents, "offsets": np.array([0, 2**62, 2**62 + 2, 6])})
    with pytest.raises(InvalidPlanError, match=r"huge.npz.*offsets do not split"):
        Plan.load(huge)
    # A forged header that claims petabytes of indices.
    forged = tmp_path / "forged.npz"
    with np.load(good) as data, zipfile.ZipFile(forged, "w") as archive:
        for key in data.files:
            buffer = io.BytesIO()
            np.save(buffer, data[key])
            raw = buffer.getvalue()
            archive.writestr(f"{key}.npy", raw.replace(b"(6,)", b"(999999999999999,)"))
    with pytest.raises(InvalidPlanError, match=r"forged.npz.* is not a readable depprune plan"):
        Plan.load(forged)
    with pytest.raises(InvalidPlanError, match=r"NoneType None is not a readable"):
        Plan.load(None)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(data=st.data())
def test_fuzzed_plan_files_raise_only_invalid_plan_error(tmp_path_factory, data):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    good, contents, meta = _saved_plan(tmp_path)
    raw = bytearray(good.read_bytes())
    how = data.draw(st.sampled_from(["bytes", "truncate", "json"]))
    if how == "bytes":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        path = tmp_path / "fuzzed.npz"
        path.write_bytes(bytes(raw))
    elif how == "truncate":
        path = tmp_path / "fuzzed.npz"
        path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw) - 1))]))
    else:
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
            max_leaves=8,
        )
        key = data.draw(st.sampled_from([*meta, "inputs"]))
        path = _with_meta(
            tmp_path, contents, json.dumps({**meta, key: data.draw(json_values)}).encode()
        )
    try:
        Plan.load(path)
    except InvalidPlanError as exc:
        assert "fuzzed.npz" in str(exc) or "bad.npz" in str(exc)


def _graph_of(size: int):
    eqs = depprune.AxisEquations()
    eqs.param("w", 0, eqs.axis(size))
    return eqs.solve()


def test_absurd_sizes_raise_resource_error():
    graph = _graph_of(depprune._core.MAX_AXIS_SIZE)
    with pytest.raises(ResourceError, match=r"needs more memory than the machine has"):
        graph.keep_mask({0: [1]})
    with pytest.raises(ResourceError, match=r"needs more memory than the machine has"):
        graph.kept_indices({0: [1]})


@pytest.mark.parametrize("bad", [np.array([4.0]), [4], None, np.zeros((1, 1), dtype=np.int64)])
def test_the_binding_names_a_bad_array_argument(bad):
    from depprune import _core

    eqs = depprune.AxisEquations()
    eqs.param("w", 0, eqs.axis(4))
    arrays, analysis = eqs.arrays(), eqs.solve()._analysis
    with pytest.raises(InvalidEquationsError, match=r"argument 'row_axes' must be a 1-d int64"):
        _core.analyze(**{**arrays, "row_axes": bad})
    for method, name, dtype in [
        (analysis.kept_indices, "keep", "uint8"),
        (analysis.kept_sizes, "keep", "uint8"),
        (analysis.unit_maps, "groups", "int64"),
        (analysis.groups_of_axes, "axes", "int64"),
    ]:
        with pytest.raises(InvalidPlanError, match=rf"argument '{name}' must be a 1-d {dtype}"):
            method(bad)
    with pytest.raises(InvalidPlanError, match=r"argument 'keep' must be a 1-d uint8"):
        analysis.kept_mask_of_axis(0, bad)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda e: e.param("w", 0, e.axis(2.7)), r"axis_sizes\[0\] is 2.7 \(float\)"),
        (lambda e: e.param("w", 0, e.axis("4")), r"axis_sizes\[0\] is '4' \(str\)"),
        (lambda e: e.param("w", 0, e.axis(2**70)), r"axis_sizes\[0\] is 1180591620717411303424"),
        (lambda e: e.equal(e.axis(4), 0.0), r"eq_right\[0\] is 0.0 \(float\)"),
        (lambda e: e.param("w", 0.5, e.axis(4)), r"row_dims\[0\] is 0.5"),
        (lambda e: e.param("w", 0, "x"), r"row_axes\[0\] is 'x'"),
        (lambda e: e.freeze(None), r"frozen_axes\[0\] is None"),
        (lambda e: e.param(3, 0, e.axis(4)), r"a parameter name must be a str"),
    ],
)
def test_non_integer_sizes_and_ids_are_refused(build, match):
    with pytest.raises(InvalidEquationsError, match=match):
        eqs = depprune.AxisEquations()
        build(eqs)
        eqs.solve()


def test_graph_methods_name_wrong_argument_types():
    graph = _graph_of(4)
    for removed in ([1, 0, 1, 1], None):
        with pytest.raises(InvalidPlanError, match=r"removed must be a mapping"):
            graph.kept_indices(removed)
        with pytest.raises(InvalidPlanError, match=r"removed must map a group"):
            graph.keep_mask(removed)
    with pytest.raises(InvalidPlanError, match=r"unit ids must be a flat list"):
        graph.keep_mask({0: [[0], [1, 2]]})
    with pytest.raises(InvalidPlanError, match=r"not a parameter dim of this graph"):
        graph.describe(["w"], 0)
    with pytest.raises(InvalidEquationsError, match=r"takes an AxisEquations; got dict"):
        depprune.DependencyGraph.from_equations({})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ratios": [0.3]}, SelectionError, r"ratios must map a module .* got list"),
        ({"ratios": {(): 0.3}}, SelectionError, r"an empty tuple given in ratios"),
        ({"importance": "l2"}, ImportanceError, r"importance must be a callable"),
        (
            {"importance": lambda group, ctx: 1 / 0},
            ImportanceError,
            r"importance <lambda> failed on group 0 \(ZeroDivisionError",
        ),
        (
            {"importance": lambda group, ctx: torch.ones(group.size + 1)},
            ImportanceError,
            r"it must return a tensor of shape \(8,\)",
        ),
    ],
)
def test_wrong_argument_types_for_prune(kwargs, error, match):
    model = make_net()
    fails_cleanly(model, error, match, lambda: depprune.prune(model, IMAGE, **kwargs))


def test_a_model_that_is_not_a_module():
    with pytest.raises(TraceError, match=r"the model must be an nn.Module; got str"):
        depprune.prune("model", IMAGE)
