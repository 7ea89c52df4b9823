"""Budgets: the widths, layers and experts that meet a parameter, MAC or memory target."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import transformers
from tiny_models import TINY_DECODER, tokens
from torch import nn
from torchvision.models.resnet import BasicBlock

import depprune
from depprune import SelectionError
from depprune.api import _count_macs
from depprune.budget import search
from depprune.plan import Plan
from depprune.selection import lowest

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, VOCAB, HIDDEN = TINY_DECODER["num_hidden_layers"], TINY_DECODER["vocab_size"], 32
TOKENS = tokens(seed=1)


def llama(**changes) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**TINY_DECODER, **changes})
    ).eval()


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pruned_by_make_plan(model: nn.Module, result) -> nn.Module:
    plan = depprune.make_plan(model, graph=result.graph, **result.make_plan_kwargs())
    twin = copy.deepcopy(model)
    plan.apply(twin)
    return twin


def llama_params(hidden: int, kv: int, queries: int, neurons: int, head_dim: int = 8) -> int:
    """Parameters of the tiny Llama, by hand: embedding and head, then every layer."""
    attention = hidden * head_dim * (2 * queries + 2 * kv)
    layer = attention + 3 * hidden * neurons + 2 * hidden
    return 2 * VOCAB * hidden + LAYERS * layer + hidden


def test_gqa_llama_candidate_costs_what_the_pruned_model_has_and_is_the_grid_best():
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens(0)
    result = search(model, x, {"params": "60%"}, rank="cost")
    bound = result.target["params"]
    chosen = result.chosen
    twin = pruned_by_make_plan(model, result)
    assert chosen.costs["params"] == count(twin) <= bound
    assert chosen.costs["macs"] == _count_macs(twin, x)
    assert result.original["macs"] == _count_macs(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # Brute force over the same grid: every count 1..size; HF's config needs hidden to
    # divide by the query heads, and repeat_kv cannot go to one query head per KV head.
    best = max(
        llama_params(h, kv, kv * per_kv, n)
        for h, kv, per_kv, n in itertools.product(range(1, 33), (1, 2), (2,), range(1, 65))
        if h % (kv * per_kv) == 0 and llama_params(h, kv, kv * per_kv, n) <= bound
    )
    assert chosen.costs["params"] == best
    w = chosen.widths
    assert llama_params(w["hidden"], w["kv_heads"], w["query_heads"], w["neurons"]) == best


def test_importance_ranked_choice_is_among_the_largest_that_fit():
    model = llama()
    result = search(model, tokens(0), {"params": 15_000})
    w = result.chosen.widths
    hidden, kv, queries, neurons = w["hidden"], w["kv_heads"], w["query_heads"], w["neurons"]
    assert result.chosen.costs["params"] == llama_params(hidden, kv, queries, neurons) <= 15_000
    # No single width can grow by one step (to a size the config can describe) and still fit.
    bigger = [
        (next((h for h in range(hidden + 1, 33) if h % queries == 0), None), kv, queries, neurons),
        (hidden, kv + 1, queries // kv * (kv + 1), neurons) if kv < 2 else None,
        (hidden, kv, queries, neurons + 1) if neurons < 64 else None,
    ]
    for widths in bigger:
        if widths is not None and widths[0] is not None and widths[0] % widths[2] == 0:
            assert llama_params(*widths) > 15_000
    assert 0 < result.chosen.retained < 1
    assert result.chosen is result.candidates[0] and len(result.candidates) <= 5
    assert "budget: params <= 15,000" in str(result)


def test_query_heads_and_kv_heads_cut_together_cost_exactly_what_the_cut_model_has():
    model = llama(num_attention_heads=8, num_key_value_heads=2)
    x = tokens(1)
    result = search(model, x, {"params": "60%"})
    graph = result.graph
    removed = {
        g: lowest(torch.zeros(graph.groups[g].size), graph.groups[g].size - kept)
        for g, kept in result.keep_units.items()
        if kept < graph.groups[g].size
    }
    twin = copy.deepcopy(model)
    Plan.from_kept(model, graph.kept_indices(removed)).apply(twin, example_inputs=x)
    w = result.chosen.widths
    assert w["kv_heads"] < 2 and w["heads_per_kv"] < 4  # both factors are cut
    assert twin.config.num_key_value_heads == w["kv_heads"]
    assert twin.config.num_attention_heads == w["query_heads"] == w["kv_heads"] * w["heads_per_kv"]
    assert result.chosen.costs["params"] == count(twin) <= result.target["params"]
    assert result.chosen.costs["macs"] == _count_macs(twin, x)


def test_make_plan_keeps_both_head_factors_the_budget_chose():
    model = llama(num_attention_heads=8, num_key_value_heads=2)
    result = search(model, tokens(1), {"params": "60%"})
    # The same search as above cuts both factors; make_plan then keeps 4 queries per KV head.
    assert count(pruned_by_make_plan(model, result)) == result.chosen.costs["params"]


def test_tp_size_keeps_heads_kv_heads_and_neurons_divisible():
    model = llama(hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    result = search(model, tokens(2), {"params": "70%"}, tp_size=2, top=20)
    for candidate in result.candidates:
        w = candidate.widths
        assert w["kv_heads"] % 2 == 0 and w["query_heads"] % 2 == 0 and w["neurons"] % 2 == 0
    twin = pruned_by_make_plan(model, result)
    assert twin.config.num_key_value_heads % 2 == 0 and twin.config.num_attention_heads % 2 == 0
    assert count(twin) == result.chosen.costs["params"]


def test_round_to_rounds_widths_not_head_counts():
    model = llama()
    result = search(model, tokens(0), {"params": "60%"}, round_to=8, top=20)
    for candidate in result.candidates:
        assert candidate.widths["hidden"] % 8 == 0 and candidate.widths["neurons"] % 8 == 0
    # A head is head_dim (8) indices wide: any head count makes a multiple of 8.
    assert result.levels["kv_heads"] == 2


def test_memory_counts_weights_and_the_kv_cache_of_every_layer():
    model = llama()
    result = search(model, tokens(0), {"memory_gb": "70%"}, batch=2, seq_len=16)
    head_dim, weights = 8, count(model) * 4

    def cache(kv: int) -> int:
        return 2 * LAYERS * kv * head_dim * 2 * 16 * 4  # key and value, batch 2, fp32

    assert result.original["memory_gb"] * 1e9 == pytest.approx(weights + cache(2), abs=1e-3)
    chosen = result.chosen
    expected = chosen.costs["params"] * 4 + cache(chosen.widths["kv_heads"])
    assert chosen.costs["memory_gb"] * 1e9 == pytest.approx(expected, abs=1e-3)
    assert chosen.costs["memory_gb"] <= result.target["memory_gb"]
    bf16 = search(model, tokens(0), {"params": "70%"}, dtype=torch.bfloat16, seq_len=16)
    assert bf16.original["memory_gb"] * 1e9 == pytest.approx(count(model) * 2 + cache(2) / 4)
    plain = search(model, tokens(0), {"params": "70%"}, kv_cache=False)
    assert plain.original["memory_gb"] * 1e9 == pytest.approx(weights)


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8)),
        nn.Sequential(BasicBlock(8, 16, stride=2, downsample=down), BasicBlock(16, 16)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


@pytest.mark.parametrize("kinds", [None, ("channels", "layers")])
def test_cnn_channels_and_blocks_cost_what_the_pruned_cnn_has(kinds):
    model, x = tiny_resnet(), torch.randn(2, 3, 16, 16)
    result = search(model, x, {"params": "50%", "macs": "60%"}, kinds=kinds)
    twin = pruned_by_make_plan(model, result)
    assert result.chosen.costs["params"] == count(twin) <= result.target["params"]
    assert result.chosen.costs["macs"] == _count_macs(twin, x) <= result.target["macs"]
    assert result.original["macs"] == _count_macs(model, x)
    if kinds:
        assert result.chosen.widths["layers"] < 8 or result.levels["layers"] > 1


def tiny_mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=1,
    )
    return transformers.MixtralForCausalLM(config).eval()


def active(model: nn.Module) -> int:
    """Parameters one token touches: all but the experts, and one expert of each layer."""
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return count(model) - experts + experts // model.config.num_local_experts


def test_mixtral_expert_count_meets_a_parameter_budget():
    model = tiny_mixtral()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    routers = sum(p.numel() for n, p in model.named_parameters() if ".gate." in n)
    rest = count(model) - experts - routers
    per_expert, row = experts // 4, routers // 4  # an expert, and its router rows
    bound = rest + 2.5 * (per_expert + row)
    result = search(model, tokens(3), {"params": bound}, kinds=("experts",))
    twin = pruned_by_make_plan(model, result)
    assert twin.config.num_local_experts == result.chosen.widths["experts"] == 2
    assert result.chosen.costs["params"] == count(twin) == rest + 2 * (per_expert + row)
    # A token runs one expert, but the router scores both.
    assert result.chosen.costs["active_params"] == active(twin) == rest + per_expert + 2 * row


def test_mixtral_widths_and_experts_meet_an_active_parameter_budget():
    model, x = tiny_mixtral(), tokens(3)
    kinds = ("hidden", "heads", "neurons", "experts")
    result = search(model, x, {"active_params": "70%", "params": "50%"}, kinds=kinds)
    twin = pruned_by_make_plan(model, result)
    assert result.chosen.costs["params"] == count(twin) <= result.target["params"]
    assert result.chosen.costs["active_params"] == active(twin)
    assert active(twin) <= result.target["active_params"]
    assert result.original["active_params"] == active(model)
    assert result.chosen.costs["macs"] == _count_macs(twin, x)


class ListMoE(nn.Module):
    """A linear gate and one MLP module per expert, top-2 routing."""

    def __init__(self, hidden=6, width=5, experts=4):
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(hidden, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))
            for _ in range(experts)
        )

    def forward(self, x):
        weights, chosen = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return out


def test_experts_in_a_module_list_count_once_per_expert_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), ListMoE(), nn.Linear(6, 4)).eval()
    result = search(model, torch.randn(9, 3), {"params": "60%"}, kinds=("experts",))
    twin = pruned_by_make_plan(model, result)
    kept = len(twin[1].experts)
    assert kept == result.chosen.widths["experts"] == 2
    per_expert = count(twin[1].experts[0])
    assert result.chosen.costs["params"] == count(twin)
    assert result.chosen.costs["active_params"] == count(twin) - kept * per_expert + 2 * per_expert


def test_whole_layers_of_a_decoder_meet_the_budget_with_the_widths():
    model = llama()
    result = search(model, tokens(0), {"params": "75%"}, kinds=("hidden", "neurons", "layers"))
    twin = pruned_by_make_plan(model, result)
    assert twin.config.num_hidden_layers == result.chosen.widths["layers"]
    assert count(twin) == result.chosen.costs["params"] <= result.target["params"]


def test_score_fn_reranks_the_top_candidates():
    model = llama()

    def neurons_kept(pruned: nn.Module) -> float:
        return float(pruned.model.layers[0].mlp.up_proj.out_features)

    result = search(model, tokens(0), {"params": "60%"}, top=3, score_fn=neurons_kept)
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert result.chosen.score == max(c.widths["neurons"] for c in result.candidates)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"flops": 1e9}, "target names 'flops'; a budget is one of params"),
        ({"params": -5}, "give a positive number"),
        ({"params": 0}, "give a positive number"),
        ({"params": "half"}, "a percentage of the original such as '50%'"),
        ({}, "target must map a budget to its bound"),
        ({"params": 10}, "no candidate meets params <= 10: the smallest has params"),
    ],
)
def test_bad_or_unreachable_targets_raise_and_leave_the_model_alone(target, message):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SelectionError, match=message):
        search(model, tokens(0), target)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_counts_the_replay_refutes_leave_the_grid_and_the_error_says_so():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    # BERT's config derives the head size from hidden / heads: no head count but 4 reloads.
    with pytest.raises(SelectionError, match=r"once the replay refuted heads 1, heads 2"):
        search(model, tokens(0), {"params": "75%"})


def test_bad_arguments_name_the_fix():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.zeros(1, 4)
    with pytest.raises(SelectionError, match=r"kinds .* holds unknown kinds"):
        search(model, x, {"params": 40}, kinds=("rows",))
    with pytest.raises(SelectionError, match="tp_size is 0"):
        search(model, x, {"params": 40}, tp_size=0)
    with pytest.raises(SelectionError, match="has no mixture-of-experts layer"):
        search(model, x, {"params": 40}, kinds=("neurons", "experts"))
    graph = depprune.trace(model, x)
    graph.recording = None  # as a graph solved from bare equations: no calls to count
    with pytest.raises(SelectionError, match="the macs of this model cannot be counted"):
        search(model, x, {"macs": 10}, graph=graph)


def test_make_plan_meets_a_target_and_keeps_the_search_table():
    model = llama(num_attention_heads=8, num_key_value_heads=2)
    original = model.num_parameters()
    plan = depprune.make_plan(model, TOKENS, target={"params": "60%"})
    assert plan.params_after(model) <= 0.6 * original
    assert plan.params_after(model) == plan.budget.chosen.costs["params"]
    assert plan.choices["target"] == {"params": "60%"} and "params" in str(plan.budget)
    with pytest.raises(SelectionError, match="target_options holds \\['tp'\\]"):
        depprune.make_plan(model, TOKENS, target={"params": "60%"}, target_options={"tp": 2})
    with pytest.raises(SelectionError, match="not both"):
        depprune.make_plan(model, TOKENS, target={"params": "60%"}, keep_units={0: 1})
