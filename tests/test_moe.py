"""Mixture-of-experts models: trace, prune and reload Mixtral and Qwen-MoE exactly.

transformers 5 stores a layer's experts as 3-d tensors, ``gate_up_proj``
``[experts, 2 * width, hidden]`` and ``down_proj`` ``[experts, hidden,
width]``, and runs them by default with ``grouped_mm`` (tokens sorted by
expert, ``histc`` counts, one grouped product), or a ``batched_mm`` gather,
or the eager loop (``one_hot``, ``nonzero``, ``index_add_``). On every path
the routing only moves tokens: the hidden axis flows through, the expert
axis and the router's output are frozen, and each MoE layer has one neuron
group, a slot of every expert's MLP (one tensor keeps one width for all its
experts; removing slot ``j`` of every expert is exact). A shared expert is an
ordinary MLP with its own neuron group.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from pruning_oracle import (
    assert_same_outputs,
    norm_spanned_groups,
    outputs,
    predicted_param_count,
    zeroed_copy,
)
from tiny_models import TINY_DECODER, tokens
from torch import nn

import depprune
from depprune.apply import apply_kept_indices
from depprune.importance import ScoreContext, magnitude, score_groups
from depprune.plan import Plan
from depprune.selection import select
from depprune.tracer import record

transformers = pytest.importorskip("transformers")

TOKENS = tokens(seed=3)

# The shared tiny decoder; each family sets its own MLP widths below.
COMMON = {k: v for k, v in TINY_DECODER.items() if k != "intermediate_size"}
COMMON["num_experts_per_tok"] = 2

#: family -> (model class name, config class name, config fields beyond COMMON)
FAMILIES = {
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(intermediate_size=16, num_local_experts=4),
    ),
    # Layer 1 is a dense MLP (mlp_only_layers), so three widths live in one config.
    "qwen2_moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=4,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(moe_intermediate_size=32, num_experts=4, head_dim=8),
    ),
}
FAMILIES = {k: v for k, v in FAMILIES.items() if hasattr(transformers, v[0])}
IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


def make(family: str, experts_implementation: str | None = None, device: str = "cpu"):
    model_name, config_name, fields = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **fields)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    with torch.device(device):
        return getattr(transformers, model_name)(config).eval()


def moe_layers(model) -> list[str]:
    return [name for name, m in model.named_modules() if name.endswith("mlp.experts")]


def signature(graph) -> list[tuple[int, str, tuple]]:
    return sorted((g.size, g.kind, tuple(sorted(g.members))) for g in graph.groups)


# -- trace: the groups ------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trace_gives_hidden_heads_and_expert_neuron_groups(family, implementation):
    model = make(family, implementation)
    graph = depprune.trace(model, {"input_ids": TOKENS}, strict=True)
    assert graph.unsupported_ops == {}
    config = model.config
    owner = {member: g for g in graph.groups for member in g.members}

    [hidden] = graph.groups("hidden")
    assert hidden.size == config.hidden_size
    experts = moe_layers(model)
    assert experts
    for name in experts:
        block = name.removesuffix(".experts")
        for member in [
            (f"{block}.gate.weight", 1),
            (f"{name}.gate_up_proj", 2),
            (f"{name}.down_proj", 1),
        ]:
            assert owner[member] is hidden, member
        # One neuron group per layer: the same slot of every expert.
        width = model.get_submodule(name).intermediate_dim
        group = owner[(f"{name}.gate_up_proj", 1)]
        assert (group.size, group.kind) == (width, "neurons")
        assert set(group.members) == {(f"{name}.gate_up_proj", 1), (f"{name}.down_proj", 2)}
        # Which expert a token goes to is data: experts and router outputs stay.
        for frozen in [(f"{name}.gate_up_proj", 0), (f"{name}.down_proj", 0)]:
            assert frozen not in owner
        assert (f"{block}.gate.weight", 0) not in owner

    if family == "qwen2_moe":
        shared = "model.layers.0.mlp.shared_expert"
        group = owner[(f"{shared}.gate_proj.weight", 0)]
        assert (group.size, group.kind) == (config.shared_expert_intermediate_size, "neurons")
        assert set(group.members) == {
            (f"{shared}.gate_proj.weight", 0),
            (f"{shared}.up_proj.weight", 0),
            (f"{shared}.down_proj.weight", 1),
        }
        assert owner[("model.layers.0.mlp.shared_expert_gate.weight", 1)] is hidden
        assert ("model.layers.0.mlp.shared_expert_gate.weight", 0) not in owner  # one output
        dense = owner[("model.layers.1.mlp.gate_proj.weight", 0)]
        assert dense.size == config.intermediate_size
    # Attention as in Llama: KV head groups with their query heads, per layer.
    assert len(graph.groups("heads")) == 2 * config.num_hidden_layers


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_meta_trace_matches_cpu(family, implementation):
    cpu = depprune.trace(make(family, implementation), {"input_ids": TOKENS})
    meta = depprune.trace(make(family, implementation, "meta"), {"input_ids": TOKENS})
    assert meta.unsupported_ops == {}
    assert signature(meta) == signature(cpu)


def test_meta_eager_experts_say_how_routing_was_answered():
    result = record(make("mixtral", "eager", "meta"), {"input_ids": TOKENS})
    assert any("nonzero on a meta tensor was answered as if every" in n for n in result.notes)


# -- prune: shapes, parameter counts, the mask oracle, reload -----------------------


def plan(model, graph, groups, ratio=0.5):
    ctx = ScoreContext.from_model(graph, model)
    scores = score_groups([graph.groups[g] for g in groups], magnitude(2), ctx)
    return select(graph, scores, model, ratio=ratio)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_every_group_and_mask_oracle(family):
    model = make(family)
    reference = outputs(model, {"input_ids": TOKENS})
    graph = depprune.trace(model, {"input_ids": TOKENS})
    removed = plan(model, graph, range(len(graph.groups)))
    kept = graph.kept_indices(removed)
    predicted = predicted_param_count(model, kept)
    assert Plan.from_kept(model, kept).params_after(model) == predicted
    with pytest.warns(UserWarning, match="config"):  # head_dim pruned: RoPE rebuilds differ
        apply_kept_indices(model, kept)
    assert sum(p.numel() for p in model.parameters()) == predicted
    pruned = outputs(model, {"input_ids": TOKENS})
    assert [t.shape for t in pruned] == [t.shape for t in reference]

    # Zeroing what is removed equals removing it, on every group no norm spans.
    model = make(family)
    spanned = norm_spanned_groups(graph, model)
    free = [g.index for g in graph.groups if g.index not in spanned]
    if any(graph.groups[g].kind == "head_dim" for g in spanned):
        # Qwen3's per-head q/k norms span q/k head_dim; v keeps the same head_dim, so it stays.
        free = [g for g in free if graph.groups[g].kind != "head_dim"]
    kinds = {graph.groups[g].kind for g in free}
    assert {"heads", "neurons"} <= kinds
    removed = plan(model, graph, free)
    expected = outputs(zeroed_copy(model, graph, removed), {"input_ids": TOKENS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config warning again: v's head_dim is pruned
        apply_kept_indices(model, graph.kept_indices(removed))
    assert_same_outputs(expected, outputs(model, {"input_ids": TOKENS}), atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_round_trips_through_save_pretrained(family, tmp_path, recwarn):
    model = make(family)
    fields = FAMILIES[family][2]
    report = depprune.prune(
        model, {"input_ids": TOKENS}, ratio=0.5, kinds=("hidden", "heads", "neurons")
    )
    assert not [w for w in recwarn if "config" in str(w.message)]
    assert {g.kind for g in report.plan.groups if g.kept < g.size} == {
        "hidden",
        "heads",
        "neurons",
    }
    config = model.config
    assert config.hidden_size == 16
    # Half the query heads: one KV head of two, with its two query heads.
    assert config.num_attention_heads == 2 and config.num_key_value_heads == 1
    for field in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if field in fields:
            assert getattr(config, field) == fields[field] // 2, field
    for name in moe_layers(model):
        experts = model.get_submodule(name)
        assert experts.hidden_dim == 16 and experts.intermediate_dim == experts.down_proj.shape[2]
        assert model.get_submodule(name.removesuffix(".experts") + ".gate").hidden_dim == 16
    logits = outputs(model, {"input_ids": TOKENS})
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert_same_outputs(logits, outputs(reloaded, {"input_ids": TOKENS}), atol=1e-6)


def test_pruned_meta_plan_applies_to_the_real_model():
    real = make("qwen2_moe")
    plan_ = depprune.make_plan(
        make("qwen2_moe", device="meta"),
        {"input_ids": TOKENS},
        ratio=0.5,
        kinds=("neurons",),
        importance=depprune.importance.random(0),
    )
    plan_.apply(real)
    assert real.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 16, 32)
    assert real.model.layers[0].mlp.shared_expert.down_proj.in_features == 12
    assert real(TOKENS).logits.shape == (2, 7, 100)


def test_grouped_mm_experts_keep_sizes_it_can_run():
    # grouped_mm needs 16-byte rows: hidden and expert widths keep multiples of 4 in fp32
    # (the eager loop computes the same with other ops, which the replay cannot prove).
    model = make("mixtral")
    report = depprune.prune(model, {"input_ids": TOKENS}, ratio=0.3, kinds=("hidden", "neurons"))
    assert report.kept_whole == []
    assert model.config.hidden_size == 24 and model.config.intermediate_size % 4 == 0
    assert model.config._experts_implementation == "grouped_mm"
    assert model(TOKENS).logits.shape == (2, 7, 100)


# -- the rules MoE forwards use, on small modules ---------------------------------------


class GroupedExperts(nn.Module):
    """Tokens sorted by expert through ``torch._grouped_mm``, as transformers runs experts."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.experts = nn.Parameter(torch.randn(3, 12, 8))  # [experts, out, in]
        self.down = nn.Linear(12, 4)

    def forward(self, x):
        offsets = torch.tensor([2, 4, 6], dtype=torch.int32, device=x.device)
        return self.down(torch._grouped_mm(self.up(x), self.experts.transpose(-2, -1), offsets))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_grouped_mm_relates_features_and_freezes_experts(device):
    with torch.device(device):
        torch.manual_seed(0)
        model = GroupedExperts()
    graph = depprune.trace(model, torch.randn(6, 4), strict=True)
    assert sorted((g.size, set(g.members)) for g in graph.groups) == [
        (8, {("up.weight", 0), ("up.bias", 0), ("experts", 2)}),
        (12, {("experts", 1), ("down.weight", 1)}),
    ]


class ScatterBack(nn.Module):
    """Rows picked by index, processed, and written back: only the row dim is data."""

    def __init__(self, write):
        super().__init__()
        self.up, self.down, self.write = nn.Linear(4, 8), nn.Linear(8, 4), write

    def forward(self, x):
        h = self.up(x)
        rows = torch.tensor([0, 2, 2], device=x.device)
        out = torch.zeros_like(h)
        if self.write == "index_add":
            out.index_add_(0, rows, h[rows] * 2)
        elif self.write == "index_put":
            out[rows] = h[rows] * 2
        else:
            mask = x[:, 0] > 0
            out[mask] = h[mask] * 2
        return self.down(out)


@pytest.mark.parametrize("write", ["index_add", "index_put", "mask"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_token_scatter_keeps_the_feature_axis(write, device):
    with torch.device(device):
        model = ScatterBack(write)
    result = record(model, torch.randn(5, 4))
    groups = result.equations.solve().groups
    assert [(g.size, set(g.members)) for g in groups] == [
        (8, {("up.weight", 0), ("up.bias", 0), ("down.weight", 1)})
    ]
    if device == "meta" and write == "mask":
        assert any("boolean mask on a meta tensor" in n for n in result.notes)
    if device == "cpu":
        pruned = copy.deepcopy(model)
        graph = depprune.trace(pruned, torch.randn(5, 4))
        apply_kept_indices(pruned, graph.kept_indices({0: [1, 5]}))
        assert pruned(torch.randn(5, 4)).shape == (5, 4)
