"""The one-call API: trace, make_plan, Plan.apply, prune and the report."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from pruning_oracle import assert_same_outputs, outputs
from torch import nn

import depprune
from depprune import SelectionError
from depprune.kinds import KINDS, group_kinds

IMAGE = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    ).eval()


def test_prune_under_inference_mode_matches_no_grad_and_stays_trainable():
    reference = small_cnn()
    depprune.prune(reference, IMAGE, ratio=0.5)
    model = small_cnn()
    with torch.inference_mode():
        graph = depprune.trace(model, IMAGE)
        report = depprune.prune(model, IMAGE, ratio=0.5)
    assert graph.unsupported_ops == {}
    assert report.params_after == sum(p.numel() for p in reference.parameters())
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    # Parameters made in inference mode could not be trained; these can.
    model.train()
    model(IMAGE).sum().backward()
    assert model[0].weight.grad is not None


def test_make_plan_leaves_the_model_alone_and_apply_matches_prune():
    model, twin = small_cnn(), small_cnn()
    plan = depprune.make_plan(model, IMAGE, ratio=0.25)
    assert model[0].out_channels == 8
    assert plan.params_after(model) < sum(p.numel() for p in model.parameters())
    plan.apply(model)
    depprune.prune(twin, IMAGE, ratio=0.25)
    assert_same_outputs(outputs(twin, IMAGE), outputs(model, IMAGE), atol=0)
    assert model[0].out_channels == 6 and model[4].in_features == 6 * 36


def test_plan_made_on_meta_applies_to_real_weights():
    with torch.device("meta"):
        meta = small_cnn()
    # Scores from meta weights are not real values; the structure is what carries over.
    plan = depprune.make_plan(meta, IMAGE, ratio=0.5, importance=depprune.importance.random(0))
    real = small_cnn()
    plan.apply(real)
    assert real[0].weight.shape == (4, 3, 3, 3) and real[0].weight.device.type == "cpu"
    assert real(IMAGE).shape == (2, 4)


def test_dtype_device_and_requires_grad_are_kept():
    model = small_cnn().to(torch.bfloat16)
    model[4].weight.requires_grad_(False)
    depprune.prune(model, IMAGE.to(torch.bfloat16), ratio=0.5)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model[4].weight.requires_grad and model[0].weight.requires_grad
    assert isinstance(model[0].weight, nn.Parameter)


def test_report_table_lists_pruned_groups():
    model = small_cnn()
    report = depprune.prune(model, IMAGE, ratio=0.5)
    text = str(report)
    assert "parameters" in text and "MACs" in text
    assert "    0  channels         8 -> 4  0.weight[0]" in text
    assert report.macs_after < report.macs_before


def test_kinds_limit_what_is_pruned():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    report = depprune.prune(model, torch.randn(3, 4), ratio=0.5, kinds="channels")
    assert report.params_after == report.params_before  # only neurons here
    with pytest.raises(SelectionError, match=r"unknown kinds \['head'\]; choose from hidden"):
        depprune.prune(model, torch.randn(3, 4), kinds=("head",))


def test_kinds_from_unit_maps():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    graph = depprune.trace(model, {"input_ids": torch.zeros(1, 5, dtype=torch.long)})
    kinds = {
        (g.size, kind)
        for g, kind in zip(graph.groups, group_kinds(graph, model).values(), strict=True)
    }
    # hidden; 2 KV heads; 2 query heads per KV head; RoPE half head_dim; v head_dim; MLP
    assert kinds == {
        (32, "hidden"),
        (2, "heads"),
        (4, "head_dim"),
        (8, "head_dim"),
        (48, "neurons"),
    }
    assert set(group_kinds(graph, model).values()) <= set(KINDS)


def test_kinds_of_grouped_convolutions():
    tv = pytest.importorskip("torchvision.models")
    model = tv.resnext50_32x4d().eval()
    graph = depprune.trace(model, torch.randn(1, 3, 32, 32))
    counts = Counter(group_kinds(graph, model).values())
    # Every grouped conv gives whole conv groups and the same slot of every group.
    assert counts == {"channels": 37, "conv_groups": 16}


def test_groups_carry_kind_and_parameters_per_unit():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    graph = depprune.trace(model, torch.randn(3, 4))
    (group,) = graph.groups()
    # One neuron: a row of 4 weights and a bias in the first layer, a column of 2 in the second.
    assert (group.kind, group.size, group.params_per_unit) == ("neurons", 8, 4 + 1 + 2)
    assert graph.groups("neurons") == (group,) and graph.groups("heads") == ()
    assert str(group) == (
        "group 0: 8 units (neurons), 7 parameters each; 0.weight[0], 0.bias[0], 2.weight[1]"
    )
    assert "    0       8  neurons                7  0.weight[0]" in str(graph)


def test_norms_without_weights_keep_their_width():
    for norm in (nn.LayerNorm(8, elementwise_affine=False), nn.GroupNorm(4, 8, affine=False)):
        torch.manual_seed(0)
        body = nn.Linear(4, 8) if isinstance(norm, nn.LayerNorm) else nn.Conv2d(4, 8, 1)
        model = nn.Sequential(body, norm, nn.ReLU())
        x = torch.randn(2, 4) if isinstance(norm, nn.LayerNorm) else torch.randn(2, 4, 3, 3)
        graph = depprune.trace(model, x)
        # The norm's width lives only in its attributes, which no cut could update.
        assert graph.groups() == ()
        assert any("without weight or bias" in note for note in graph.notes)


def test_tracing_a_training_model_keeps_batchnorm_statistics():
    model = small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    depprune.make_plan(model, IMAGE, ratio=0.5)
    depprune.trace(model, IMAGE)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_the_most_specific_scope_wins_even_inside_a_tuple():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        nn.Linear(8, 2),
    )
    plan = depprune.make_plan(
        model, torch.randn(3, 4), ratios={(model[0], model[1]): 0.25, model[1][0]: 0.75}
    )
    kept = {g.first_member: g.kept for g in plan.groups}
    assert kept == {"0.0.weight[0]": 6, "1.0.weight[0]": 2}


class Stack(nn.Module):
    """Two blocks with the same role: layers.0.fc and layers.1.fc."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(4, 8), "out": nn.Linear(8, 4)}) for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["out"](torch.relu(layer["fc"](x)))
        return x


def test_uniform_refuses_to_override_scoped_ratios():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(3, 4)
    with pytest.raises(SelectionError, match=r"uniform=True needs every layers\.#\.fc\.weight"):
        depprune.make_plan(model, x, ratios={model.layers[0]: 0.0}, uniform=True)
    plan = depprune.make_plan(model, x, ratio=0.5, global_ranking=True, uniform=True)
    assert {g.kept for g in plan.groups} == {4}


def test_a_meta_model_can_be_pruned_and_counted():
    with torch.device("meta"):
        model = small_cnn()
    report = depprune.prune(model, IMAGE, ratio=0.5, importance=depprune.importance.random(0))
    assert model[0].weight.shape == (4, 3, 3, 3) and model[0].weight.is_meta
    assert report.macs_after < report.macs_before


def test_magnitude_needs_a_positive_finite_p():
    with pytest.raises(depprune.ImportanceError, match="finite p > 0"):
        depprune.importance.magnitude(float("inf"))


def test_low_memory_apply_gives_the_same_model():
    model, twin = small_cnn(), small_cnn()
    plan = depprune.make_plan(model, IMAGE, ratio=0.5)
    plan.apply(model)
    plan.apply(twin, low_memory=True)
    assert_same_outputs(outputs(model, IMAGE), outputs(twin, IMAGE), atol=0)
    assert [p.shape for p in model.parameters()] == [p.shape for p in twin.parameters()]


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.bool]
)
@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 3, 3), (2100, 1000)])
@pytest.mark.parametrize("dims", [(1,), (0,), (0, 1)])
def test_cpu_cuts_by_bytes_match_torch_indexing(dtype, shape, dims):
    """The CPU fast path (the core copying bytes, over threads for big tensors) is exact."""
    from depprune.apply import cuts as apply

    source = (torch.randn(*shape) * 10).to(dtype)
    if dims == (1,):
        source = source.transpose(0, 1).contiguous().transpose(0, 1)  # strided, not contiguous
    kept = {0: torch.tensor([0, 2, 3, shape[0] - 1]), 1: torch.tensor([1, 3, 0])}
    cuts = {d: kept[d] for d in dims}
    expected = source
    for dim, index in cuts.items():
        expected = expected.index_select(dim, index)
    cut = apply._take_on_cpu(source, cuts)
    assert cut is not None and cut.dtype == dtype and cut.is_contiguous()
    assert torch.equal(cut, expected)


def test_cpu_cut_declines_what_torch_should_do():
    from depprune.apply import cuts as apply

    assert apply._take_on_cpu(torch.zeros(4), {0: torch.tensor([0])}) is None
    assert apply._take_on_cpu(torch.zeros(4, 4, 4), {2: torch.tensor([0])}) is None
    assert apply._take_on_cpu(torch.zeros(4, 4, device="meta"), {1: torch.tensor([0])}) is None
    assert (
        apply._take_on_cpu(torch.zeros(4, 4, dtype=torch.complex64), {1: torch.tensor([0])}) is None
    )


def test_the_garbage_collector_pauses_during_work_and_comes_back_even_on_errors():
    import gc

    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append(gc.isenabled())
            return super().forward(x)

    model = nn.Sequential(Probe(4, 8), nn.ReLU(), nn.Linear(8, 2))
    depprune.prune(model, torch.zeros(1, 4), ratio=0.5)
    assert seen and not any(seen)  # traced and counted with the collector off
    assert gc.isenabled()
    with pytest.raises(depprune.TraceError):
        depprune.trace(model, torch.zeros(1, 3))
    assert gc.isenabled()
    gc.disable()
    try:
        depprune.trace(model, torch.zeros(1, 4))
        assert not gc.isenabled()  # a caller's choice is left alone
    finally:
        gc.enable()


def test_keep_units_sets_counts_and_bad_counts_raise_before_anything_changes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 6),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 2),
    )
    x = torch.randn(2, 4)
    plan = depprune.make_plan(model, x, ratio=0.5, keep_units={0: 7})
    assert [(g.size, g.kept) for g in plan.groups] == [(8, 7), (6, 3)]
    # Under global ranking the counted group is left out of the ranking, the rest ranked.
    plan = depprune.make_plan(model, x, ratio=0.5, keep_units={1: 5}, global_ranking=True)
    assert plan.groups[1].kept == 5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ({9: 3}, {0: 0}, {0: True}, [(0, 3)]):
        with pytest.raises(depprune.SelectionError, match="keep_units"):
            depprune.prune(model, x, keep_units=bad)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
