"""Removing whole experts: found by structure, scored by routing, cut exactly, reloaded.

Each family brings something: Mixtral the plain router and fused experts (run
by grouped_mm, batched_mm and the eager loop); Qwen2-MoE a shared expert with
its gate and a dense layer (mlp_only_layers); Qwen3-MoE and OLMoE other
config names (OLMoE's model also counts experts for its auxiliary loss);
DeepSeek-V3 group-limited routing (n_group, a top-2 inside each group), a
dense first layer, shared experts and e_score_correction_bias; GPT-OSS a
router bias and expert biases stored transposed; Granite-MoE and PhiMoE
routers of their own. A hand-written block keeps one module per expert in an
``nn.ModuleList``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pruning_oracle import assert_generates_and_reloads, assert_same_outputs, outputs
from tiny_models import TINY_DECODER, tokens
from torch import nn

from depprune import ConfigWarning, ImportanceError, PlanMismatchError, SelectionError
from depprune.experts import (
    ExpertLayer,
    choose_experts,
    expert_cuts,
    expert_magnitude,
    find_expert_layers,
    remove_experts,
    routing_importance,
)

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

TOKENS = tokens(seed=3)
COMMON = {k: v for k, v in TINY_DECODER.items() if k != "intermediate_size"}
COMMON["num_experts_per_tok"] = 2

#: family -> (model class, config class, config fields beyond COMMON, expert-count field,
#: the per-expert tensors of a layer beyond the router weight and the fused experts)
FAMILIES = {
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(intermediate_size=16, num_local_experts=4),
        "num_local_experts",
        set(),
    ),
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
        "num_experts",
        set(),
    ),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(moe_intermediate_size=32, num_experts=4, head_dim=8),
        "num_local_experts",
        set(),
    ),
    "olmoe": (
        "OlmoeForCausalLM",
        "OlmoeConfig",
        dict(intermediate_size=16, num_experts=6, eos_token_id=1),
        "num_experts",
        set(),
    ),
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=4,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=8,
            v_head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "n_routed_experts",
        {"gate.e_score_correction_bias"},
    ),
    "gpt_oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(intermediate_size=16, num_local_experts=4, head_dim=8),
        "num_local_experts",
        {"router.bias"},
    ),
    "granitemoe": (
        "GraniteMoeForCausalLM",
        "GraniteMoeConfig",
        dict(intermediate_size=16, num_local_experts=4),
        "num_local_experts",
        set(),
    ),
    "phimoe": (
        "PhimoeForCausalLM",
        "PhimoeConfig",
        dict(intermediate_size=16, num_local_experts=4),
        "num_local_experts",
        set(),
    ),
}
FAMILIES = {k: v for k, v in FAMILIES.items() if hasattr(transformers, v[0])}


def make(family: str, device: str = "cpu", implementation: str | None = None, **fields):
    model_name, config_name, own, _, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **own, **fields})
    if implementation is not None:
        config._experts_implementation = implementation
    torch.manual_seed(0)
    with torch.device(device):
        return getattr(transformers, model_name)(config).eval()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key


# -- finding the layers -------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_are_found_by_structure(family):
    model = make(family)
    _, _, fields, count_field, router_extras = FAMILIES[family]
    count = getattr(model.config, count_field)
    layers = find_expert_layers(model)
    blocks = [
        name
        for name, m in model.named_modules()
        if hasattr(m, "experts") and not isinstance(m.experts, nn.ModuleList)
    ]
    assert [x.name for x in layers] == blocks  # dense layers (mlp_only, first_k_dense) are not
    for layer in layers:
        assert layer.num_experts == count and layer.top_k == 2 and not layer.children
        [experts] = layer.experts
        fused = {f"{experts}.{n}" for n, _ in model.get_submodule(experts).named_parameters()}
        router = layer.router_module
        expected = {layer.router, *fused, *(f"{layer.name}.{x}" for x in router_extras)}
        assert {name for name, _ in layer.tensors} == expected
        assert all(dim == 0 for _, dim in layer.tensors)
        assert not any("shared" in name for name, _ in layer.tensors)  # shared experts stay
        assert (router, "num_experts") in layer.attributes
        assert layer.groups == fields.get("n_group")
    # DeepSeek's router takes the top 2 of each group: two groups of four keep >= 2 each.
    assert layers[0].min_experts == (4 if family == "deepseek_v3" else 2)


def test_layers_are_found_on_meta_with_the_same_description():
    assert find_expert_layers(make("deepseek_v3", "meta")) == find_expert_layers(
        make("deepseek_v3")
    )


class ListMoE(nn.Module):
    """Hand-written top-k MoE: a linear gate and one MLP module per expert."""

    def __init__(self, hidden=6, width=5, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))
            for _ in range(experts)
        )

    def forward(self, x):
        weights, chosen = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return out


class ListModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.moe = ListMoE()
        self.head = nn.Linear(6, 4)  # as many outputs as experts, but no router

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.moe(h))


class Fused(nn.Module):
    def __init__(self, experts=4, hidden=6, width=5):
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, width, hidden))
        self.down = nn.Parameter(torch.randn(experts, hidden, width))


class FusedMoE(nn.Module):
    """Hand-written fused experts, a gate and a per-expert selection bias of the block's own."""

    def __init__(self, experts=4, hidden=6):
        super().__init__()
        self.num_experts, self.top_k = experts, 2
        self.router = nn.Linear(hidden, experts, bias=False)
        self.selection_bias = nn.Parameter(torch.zeros(experts))
        self.experts = Fused(experts, hidden)

    def forward(self, x):
        logits = self.router(x) + self.selection_bias
        weights, chosen = logits.softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        up = torch.einsum("nh,nkwh->nkw", x, self.experts.up[chosen]).relu()
        return torch.einsum("nkw,nkhw,nk->nh", up, self.experts.down[chosen], weights)


def test_hand_written_fused_experts_with_a_block_vector_are_cut_exactly():
    torch.manual_seed(0)
    model = FusedMoE()
    with torch.no_grad():
        model.selection_bias[1] = -1e4  # expert 1 is never chosen
    x = torch.randn(9, 6)
    reference = model(x).detach()
    [layer] = find_expert_layers(model)
    assert layer.tensors == (
        ("router.weight", 0),
        ("selection_bias", 0),
        ("experts.up", 0),
        ("experts.down", 0),
    )
    assert layer.attributes == (("", "num_experts"),) and layer.experts == ("experts",)
    # The router's own output misses the block's bias: say which expert goes.
    kept = choose_experts([layer], {"": torch.tensor([1.0, 0.0, 1.0, 1.0])}, 3)
    remove_experts(model, expert_cuts(model, [layer], kept))
    assert model.num_experts == 3 and model.experts.up.shape == (3, 5, 6)
    torch.testing.assert_close(model(x), reference)


def test_routers_and_vectors_shapes_cannot_tell_apart_raise():
    class TwoGates(FusedMoE):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(6, 4)  # a second module named like a router

    with pytest.raises(SelectionError, match="several modules that could route"):
        find_expert_layers(TwoGates())

    class NormedRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = nn.LayerNorm(6), nn.Linear(6, 6, bias=False)

    class SixExperts(FusedMoE):
        def __init__(self):
            super().__init__(experts=6)
            self.router = NormedRouter()  # its norm has 6 entries: hidden or experts?

    with pytest.raises(SelectionError, match="cannot be read from shapes"):
        find_expert_layers(SixExperts())


def test_a_list_of_classifier_blocks_is_no_moe_layer():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.head = nn.Linear(4, 3)  # three classes, three blocks

    assert find_expert_layers(Blocks()) == []


# -- importance -------------------------------------------------------------------------


def forced_mixtral():
    """Mixtral routing each token to one expert, never expert 3: rows u, -u, v and 0."""
    model = make("mixtral", num_experts_per_tok=1)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            u, v = torch.randn(2, 32, generator=generator)
            layer.mlp.gate.weight.copy_(torch.stack([u, -u, v, torch.zeros(32)]))
    return model


@pytest.mark.parametrize("metric", ["frequency", "gate_mass"])
def test_an_expert_the_router_never_picks_goes_first_and_nothing_changes(metric):
    model = forced_mixtral()
    reference = outputs(model, TOKENS)
    score = routing_importance(model, [TOKENS, TOKENS[:1]], metric=metric, progress=False)
    for layer_scores in score.scores.values():
        assert layer_scores.dtype == torch.float64 and layer_scores[3] == 0
        assert (layer_scores[:3] > 0).all()
        # One expert per token: 21 tokens, each counted once (weights renormalised to 1).
        assert layer_scores.sum().item() == pytest.approx(21)
    layers = find_expert_layers(model)
    kept = choose_experts(layers, score, 3)
    assert all(ids.tolist() == [0, 1, 2] for ids in kept.values())
    remove_experts(model, expert_cuts(model, layers, kept))
    assert model.config.num_local_experts == 3
    # Top-1 weights are renormalised: removing an expert no token picks changes nothing.
    assert_same_outputs(reference, outputs(model, TOKENS), atol=1e-6)


def test_routing_importance_counts_top_k_picks_on_every_layer():
    model = make("qwen2_moe")
    score = routing_importance(model, [TOKENS], progress=False)
    [name] = score.scores  # layer 1 is dense
    assert score.scores[name].sum().item() == TOKENS.numel() * 2
    mass = routing_importance(model, [TOKENS], metric="gate_mass", progress=False)
    # Qwen2-MoE does not renormalise its top-k: the mass is less than one per token.
    assert 0 < mass.scores[name].sum().item() < TOKENS.numel()


def llama4():
    config = transformers.Llama4TextConfig(
        **{**COMMON, "num_experts_per_tok": 1},
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_local_experts=4,
        head_dim=8,
    )
    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(config).eval()


def test_routing_importance_reads_scores_over_every_expert():
    # Llama 4's router returns sigmoid scores over all experts, zero but for its top-k.
    model = llama4()
    layers = find_expert_layers(model)
    assert [(x.top_k, x.min_experts) for x in layers] == [(1, 1), (1, 1)]
    frequency = routing_importance(model, [TOKENS], progress=False)
    assert all(s.sum() == TOKENS.numel() for s in frequency.scores.values())
    mass = routing_importance(model, [TOKENS], metric="gate_mass", progress=False)
    for name, s in mass.scores.items():
        assert 0 < s.sum() < TOKENS.numel()
        assert ((s > 0) == (frequency.scores[name] > 0)).all()


def test_routing_importance_reads_linear_logits():
    model = ListModel()
    with torch.no_grad():
        model.moe.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    frequency = routing_importance(model, [x], progress=False).scores["moe"]
    assert frequency[3] == 0 and frequency.sum() == 20


def test_routing_importance_errors():
    model = make("mixtral")
    with pytest.raises(ImportanceError, match="'gate_mass'"):
        routing_importance(model, [TOKENS], metric="usage")
    with pytest.raises(ImportanceError, match="no batches"):
        routing_importance(model, [], progress=False)
    with pytest.raises(ImportanceError, match="no mixture-of-experts"):
        routing_importance(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(ImportanceError, match="meta device"):
        routing_importance(make("mixtral", "meta"), [TOKENS], progress=False)


def test_expert_magnitude_is_the_norm_of_each_experts_slices():
    model = make("gpt_oss")
    layers = find_expert_layers(model)
    score = expert_magnitude(model, layers)
    experts = model.model.layers[1].mlp.experts
    expected = torch.stack(
        [
            torch.cat([p[e].reshape(-1) for p in experts.parameters()]).double().norm()
            for e in range(4)
        ]
    )
    torch.testing.assert_close(score.scores["model.layers.1.mlp"], expected)
    with pytest.raises(ImportanceError, match="meta device"):
        expert_magnitude(make("gpt_oss", "meta"))


# -- choosing ---------------------------------------------------------------------------


def test_choose_keeps_top_k_multiples_and_ranks_globally():
    layers = [ExpertLayer(f"{i}", 8, 2, f"{i}.g.weight", ((f"{i}.g.weight", 0),)) for i in range(2)]
    scores = {"0": torch.arange(8.0), "1": torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 9])}
    assert choose_experts(layers, scores, 0.9)["0"].tolist() == [6, 7]  # never below top-k
    assert choose_experts(layers, scores, 0.5)["0"].tolist() == [4, 5, 6, 7]
    assert choose_experts(layers, scores, 3, multiple_of=2)["0"].tolist() == [4, 5, 6, 7]
    assert len(choose_experts(layers, scores, 2, min_experts=5)["1"]) == 5
    # Globally, layer 1's flat middle goes before layer 0's ramp.
    chosen = choose_experts(layers, scores, 0.5, uniform=False)
    assert len(chosen["0"]) > len(chosen["1"]) >= 2
    assert sum(len(v) for v in chosen.values()) == 8
    assert chosen["1"].tolist()[0] == 0 and chosen["1"].tolist()[-1] == 7


def test_choose_keeps_deepseek_groups_even_and_above_what_the_router_needs():
    model = make("deepseek_v3")
    layers = find_expert_layers(model)
    score = routing_importance(model, [TOKENS], progress=False)
    for ratio, count in [(0.5, 4), (0.9, 4), (0.25, 6)]:
        for ids in choose_experts(layers, score, ratio).values():
            assert len(ids) == count
            assert np.bincount(ids // 4, minlength=2).tolist() == [count // 2] * 2


def test_choose_errors():
    layers = [ExpertLayer("a", 4, 2, "a.g.weight", (("a.g.weight", 0),))]
    scores = {"a": torch.ones(4)}
    for bad in [1.0, -0.1, True, "half", 0]:
        with pytest.raises(SelectionError):
            choose_experts(layers, scores, bad)
    with pytest.raises(SelectionError, match="cannot keep 5"):
        choose_experts(layers, scores, 5)
    with pytest.raises(SelectionError, match="no scores for a"):
        choose_experts(layers, {}, 0.5)
    with pytest.raises(SelectionError, match="4 finite numbers"):
        choose_experts(layers, {"a": torch.tensor([1.0, float("nan"), 1, 1])}, 0.5)
    other = ExpertLayer("b", 8, 2, "b.g.weight", (("b.g.weight", 0),))
    with pytest.raises(SelectionError, match="uniform=False"):
        choose_experts([*layers, other], {**scores, "b": torch.ones(8)}, 0.5)


# -- the cut: every family runs, generates and reloads ------------------------------------


def expert_params(model, layers, kept) -> int:
    """Parameters the cut removes: each removed expert's share of every per-expert tensor."""
    tensors = dict(model.named_parameters())
    removed = 0
    for layer in layers:
        share = 1 - len(kept[layer.name]) / layer.num_experts
        removed += sum(tensors[n].numel() for n, _ in layer.tensors if n in tensors) * share
    return round(removed)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remove_half_the_experts_generates_and_reloads(family, tmp_path):
    model = make(family)
    count_field = FAMILIES[family][3]
    count = getattr(model.config, count_field)
    before = model.config.to_dict()
    layers = find_expert_layers(model)
    kept = choose_experts(layers, routing_importance(model, [TOKENS], progress=False), 0.5)
    params = sum(p.numel() for p in model.parameters()) - expert_params(model, layers, kept)
    cuts = expert_cuts(model, layers, kept)
    assert cuts.config == {count_field: count // 2} and not cuts.notes
    remove_experts(model, cuts)

    after = model.config.to_dict()
    assert {k for k in before if before[k] != after.get(k)} == {count_field}
    assert sum(p.numel() for p in model.parameters()) == params
    for layer in layers:
        for path, attr in layer.attributes:
            assert getattr(model.get_submodule(path), attr) == count // 2
    for path, attrs in cuts.attributes.items():
        for attr, value in attrs.items():
            assert getattr(model.get_submodule(path), attr) == value
    assert model(TOKENS).logits.shape == (2, 7, 100)
    reloaded = assert_generates_and_reloads(model, TOKENS, tmp_path)
    assert getattr(reloaded.config, count_field) == count // 2


def test_olmoe_model_level_count_follows():
    model = make("olmoe")
    layers = find_expert_layers(model)
    cuts = expert_cuts(model, layers, choose_experts(layers, expert_magnitude(model), 3))
    assert cuts.attributes[""] == {"num_experts": 3}  # the auxiliary loss counts experts
    remove_experts(model, cuts)
    assert model.num_experts == 3
    assert model(TOKENS, labels=TOKENS, output_router_logits=True).aux_loss.isfinite()


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "eager"])
def test_every_experts_implementation_runs_the_cut_alike(implementation):
    model = make("mixtral", implementation=implementation)
    reference = make("mixtral", implementation="eager")
    for m in (model, reference):
        layers = find_expert_layers(m)
        remove_experts(m, expert_cuts(m, layers, {x.name: [1, 2, 3] for x in layers}))
    assert model.config._experts_implementation == implementation
    assert_same_outputs(outputs(reference, TOKENS), outputs(model, TOKENS), atol=1e-5)


def test_llama4_experts():
    # Llama 4 stores down_proj as [E, I, H] without an is_transposed flag.
    model = llama4()
    layers = find_expert_layers(model)
    remove_experts(model, expert_cuts(model, layers, {x.name: [0, 3] for x in layers}))
    assert model(TOKENS).logits.shape == (2, 7, 100)


def test_hand_written_expert_list_is_cut_and_keeps_training():
    model = ListModel()
    with torch.no_grad():
        model.moe.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).square().sum().backward()
    optimizer.step()  # the optimizer holds state for the router and every expert
    optimizer.zero_grad()
    reference = model(x).detach()

    [layer] = find_expert_layers(model)
    assert layer.children == ("moe.experts",) and layer.top_k == 2
    assert {n for n, _ in layer.tensors} == {"moe.gate.weight", "moe.gate.bias"}
    kept = choose_experts([layer], routing_importance(model, [x], progress=False), 3)
    assert kept["moe"].tolist() == [0, 1, 2]
    remove_experts(model, expert_cuts(model, [layer], kept), optimizers=[optimizer])
    assert len(model.moe.experts) == 3 and model.moe.gate.out_features == 3
    assert "moe.experts.2.0.weight" in model.state_dict()
    assert "moe.experts.3.0.weight" not in model.state_dict()
    torch.testing.assert_close(model(x), reference)
    model(x).square().sum().backward()
    optimizer.step()  # the state of the cut router follows it


# -- errors leave the model as it was ------------------------------------------------------


def test_too_few_experts_and_uneven_groups_raise_naming_the_fix():
    model = make("deepseek_v3")
    layers = find_expert_layers(model)
    name = layers[0].name
    before = state(model)
    with pytest.raises(SelectionError, match="top 2 experts, so it cannot keep 1; keep at least 2"):
        expert_cuts(model, layers, {name: [0]})
    with pytest.raises(SelectionError, match="keep at least 4"):
        expert_cuts(model, layers, {name: [0, 4]})
    with pytest.raises(SelectionError, match=r"keep \[3, 1\]"):
        expert_cuts(model, layers, {name: [0, 1, 2, 4]})
    with pytest.raises(SelectionError, match="sorted, unique"):
        expert_cuts(model, layers, {name: [1, 0, 4, 5]})
    with pytest.raises(PlanMismatchError, match="not one of the layers"):
        expert_cuts(model, layers, {"model.layers.0.mlp": [0, 1]})
    assert_same_state(before, model)


def test_a_failing_removal_undoes_config_and_expert_lists():
    model = ListModel()
    [layer] = find_expert_layers(model)
    cuts = expert_cuts(model, [layer], {"moe": [0, 1]})
    cuts.kept[("moe.missing", 0)] = np.array([0, 1])
    before = state(model)
    with pytest.raises(PlanMismatchError):
        remove_experts(model, cuts)
    assert len(model.moe.experts) == 4
    assert_same_state(before, model)

    model = make("mixtral")
    layers = find_expert_layers(model)
    cuts = expert_cuts(model, layers, {x.name: [0, 1] for x in layers})
    cuts.kept[("model.missing", 0)] = np.array([0])
    before = state(model)
    with pytest.raises(PlanMismatchError):
        remove_experts(model, cuts)
    assert model.config.num_local_experts == 4
    assert_same_state(before, model)
    # Layers found before a cut no longer describe the model after it.
    remove_experts(model, expert_cuts(model, layers, {x.name: [0, 1] for x in layers}))
    with pytest.raises(PlanMismatchError, match="find the layers again"):
        expert_cuts(model, layers, {layers[0].name: [0, 1]})


def test_layers_keeping_different_counts_run_but_leave_the_config():
    model = make("mixtral")
    layers = find_expert_layers(model)
    cuts = expert_cuts(model, layers, {layers[0].name: [0, 1], layers[1].name: [0, 1, 3]})
    assert cuts.config == {} and "keep [2, 3]" in cuts.notes[0]
    with pytest.warns(ConfigWarning):
        remove_experts(model, cuts)
    assert model.config.num_local_experts == 4
    assert model.model.layers[1].mlp.experts.num_experts == 3
    assert model(TOKENS).logits.shape == (2, 7, 100)


def test_an_expert_count_equal_to_another_field_changes_only_the_count():
    # Two experts, and eos_token_id is 2: only the expert count may change.
    model = make("mixtral", num_local_experts=2, num_experts_per_tok=1)
    layers = find_expert_layers(model)
    before = model.config.to_dict()
    remove_experts(model, expert_cuts(model, layers, {x.name: [1] for x in layers}))
    after = model.config.to_dict()
    assert {k: after[k] for k in before if before[k] != after[k]} == {"num_local_experts": 1}


def test_deepseek_dense_shared_and_routed_widths_each_get_their_field(tmp_path, recwarn):
    # One MLP class for the dense layer and the shared experts, sized by two fields: the
    # fixer's one field looks uneven, and the rebuild search finds the two.
    import depprune

    model = make("deepseek_v3")
    plan = depprune.make_plan(model, TOKENS, ratio=0.5, kinds=("neurons",), progress=False)
    plan.apply(model)
    assert not [w for w in recwarn if issubclass(w.category, ConfigWarning)]
    assert (model.config.intermediate_size, model.config.moe_intermediate_size) == (24, 8)
    assert model.model.layers[1].mlp.shared_experts.down_proj.in_features == 8
    assert_generates_and_reloads(model, TOKENS, tmp_path)
