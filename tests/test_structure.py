"""Whole layers out of a model: the list rebuilt, layer numbers and the config following,
the depth oracle, generate with the cache, an exact reload, and plans that carry it.

The depth oracle: a pre-norm residual block whose output projections are zero
adds nothing to its input, so removing it must leave every output as it was.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import TINY_DECODER, tokens
from torch import nn

import depprune
from depprune import depth
from depprune.apply.containers import drop_children, renamed_after_drop
from depprune.errors import InvalidPlanError, PlanMismatchError, SelectionError
from depprune.plan import Plan, read_summary
from depprune.structure import StructuralCuts

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = tokens(seed=5)
FOUR_LAYERS = {**TINY_DECODER, "num_hidden_layers": 4}

#: family -> (model class, config class, config fields beyond FOUR_LAYERS, layer list)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}, "model.layers"),
    # Sliding and full attention alternate: layer_types must follow the kept layers.
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {"head_dim": 8, "sliding_window": 4},
        "model.layers",
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {"use_sliding_window": True, "max_window_layers": 2, "sliding_window": 4},
        "model.layers",
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        {"n_embd": 32, "n_layer": 4, "n_head": 4, "bos_token_id": 0, "eos_token_id": 0},
        "transformer.h",
    ),
}


def build(family: str) -> nn.Module:
    model_class, config_class, extra, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**FOUR_LAYERS, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def silence(block: nn.Module) -> None:
    """Zero the projections that write into the residual stream: the block becomes a skip."""
    for name, param in block.named_parameters():
        if name.rsplit(".", 2)[-2] in ("o_proj", "down_proj", "c_proj") or "attn.c_proj" in name:
            param.data.zero_()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_removing_a_silenced_layer_keeps_every_output(family):
    model = build(family)
    layers = model.get_submodule(FAMILIES[family][3])
    silence(layers[2])
    with torch.no_grad():
        expected = model(TOKENS).logits
    drop_children(model, {FAMILIES[family][3]: [0, 1, 3]})
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_and_reload_after_removing_layers(family, tmp_path):
    model = build(family)
    drop_children(model, {FAMILIES[family][3]: [0, 3]})
    numbers = [
        m.layer_idx
        for m in model.get_submodule(FAMILIES[family][3]).modules()
        if hasattr(m, "layer_idx")
    ]
    assert sorted(set(numbers)) == [0, 1]  # the KV cache is indexed by these
    with torch.no_grad():
        cached = model.generate(TOKENS, max_new_tokens=4, do_sample=False)
        plain = model.generate(TOKENS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, model(TOKENS).logits, rtol=0, atol=0)


def test_per_layer_config_lists_follow_the_kept_layers():
    model = build("gemma2")
    types = list(model.config.layer_types)
    drop_children(model, {"model.layers": [1, 2]})
    assert model.config.layer_types == types[1:3]
    assert [layer.self_attn.layer_type for layer in model.model.layers] == types[1:3]


def test_a_pattern_no_config_expresses_is_refused_and_nothing_changes():
    # Qwen2-MoE makes every second layer sparse (decoder_sparse_step=2): without layer 0,
    # the sparse layer 1 would come first, where the config puts a dense one.
    config = transformers.Qwen2MoeConfig(
        **{k: v for k, v in FOUR_LAYERS.items() if k != "intermediate_size"},
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=2,
    )
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanMismatchError, match="no config describes Qwen2MoeForCausalLM"):
        drop_children(model, {"model.layers": [1, 2, 3]})
    assert model.state_dict().keys() == before.keys() and model.config.num_hidden_layers == 4
    drop_children(model, {"model.layers": [0, 1]})  # the pattern holds: dense, sparse
    assert model.config.num_hidden_layers == 2


def test_layer_numbers_and_optimizers_follow_a_hand_written_stack():
    class Block(nn.Module):
        def __init__(self, index):
            super().__init__()
            self.layer_idx = index
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.linear(x)

    blocks = nn.ModuleList(Block(i) for i in range(4))
    optimizer = torch.optim.SGD(blocks.parameters(), lr=0.1, momentum=0.9)
    loss = sum(b.linear.weight.sum() for b in blocks)
    loss.backward()
    optimizer.step()
    kept_params = set(map(id, blocks[3].parameters()))
    drop_children(blocks, {"": [0, 3]}, optimizers=[optimizer])
    assert [b.layer_idx for b in blocks] == [0, 1]
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == 4 and kept_params <= set(map(id, held))
    assert set(map(id, optimizer.state)) <= set(map(id, held))


def test_bad_kept_children_are_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(PlanMismatchError, match="sorted, unique positions in \\[0, 2\\)"):
        drop_children(model, {"": [1, 0]})
    with pytest.raises(PlanMismatchError, match=r"not an nn\.ModuleList or nn\.Sequential"):
        drop_children(model, {"0": [0]})
    assert len(model) == 2


def test_names_after_the_drop():
    kept = {"model.layers": [0, 2], "model.layers.2.experts": [1]}
    assert renamed_after_drop("model.layers.2.experts.1.w", kept) == "model.layers.1.experts.0.w"
    assert renamed_after_drop("model.layers.2.experts.0.w", kept) is None
    assert renamed_after_drop("model.norm.weight", kept) == "model.norm.weight"


def test_a_plan_with_layers_saves_loads_and_applies_with_widths(tmp_path):
    model = build("llama")
    twin = copy.deepcopy(model)
    layers = model.model.layers
    kept_neurons = np.arange(0, 64, 2)
    kept = {}
    for i in range(4):  # every layer's MLP halved (one config width), and layer 3 goes
        for proj in ("gate_proj", "up_proj"):
            kept[(f"model.layers.{i}.mlp.{proj}.weight", 0)] = kept_neurons
        kept[(f"model.layers.{i}.mlp.down_proj.weight", 1)] = kept_neurons
    plan = Plan.from_kept(model, kept, example_inputs=TOKENS)
    plan.structure = StructuralCuts(
        children={"model.layers": np.array([0, 1, 2])}, sizes={"model.layers": 4}
    )
    assert plan.params_after(model) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers.3.")
    ) - 3 * (3 * 32 * 32)
    plan.save(tmp_path / "plan.npz")
    summary = read_summary(tmp_path / "plan.npz")
    assert summary["version"] == 3
    assert summary["structure"] == ["layers of model.layers: 1 of 4 removed ([3])"]
    loaded = Plan.load(tmp_path / "plan.npz")
    assert loaded.fingerprint() == plan.fingerprint()
    loaded.apply(model)  # proved: the pruned shadow runs and gives the same output shapes
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    assert model.config.intermediate_size == 32
    assert [layer.mlp.gate_proj.out_features for layer in layers] == [32, 32, 32]
    assert model.num_parameters() == plan.params_after(twin)
    with torch.no_grad():
        model(TOKENS)


def test_a_failing_width_cut_puts_the_layers_back():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = {("model.layers.0.mlp.gate_proj.weight", 0): np.array([0, 99])}  # out of range
    plan = Plan(kept=kept, shapes={"model.layers.0.mlp.gate_proj.weight": (64, 32)})
    plan.structure = StructuralCuts(
        children={"model.layers": np.array([0, 1])}, sizes={"model.layers": 4}
    )
    with pytest.raises(PlanMismatchError):
        plan.apply(model, verify=False)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_corrupt_structure_is_refused(tmp_path):
    model = build("llama")
    plan = Plan.from_kept(model, {}, example_inputs=TOKENS)
    plan.structure = StructuralCuts(
        children={"model.layers": np.array([2, 1])}, sizes={"model.layers": 4}
    )
    with pytest.raises(InvalidPlanError, match="must be sorted, unique"):
        plan.save(tmp_path / "plan.npz")
    plan.structure.children["model.layers"] = np.array([1, 2])
    plan.save(tmp_path / "plan.npz")
    loaded = Plan.load(tmp_path / "plan.npz").structure
    assert loaded.children["model.layers"].tolist() == [1, 2] and loaded.sizes == {
        "model.layers": 4
    }


def test_make_plan_removes_layers_and_neurons_in_one_plan(tmp_path):
    model = build("llama")
    twin = copy.deepcopy(model)
    plan = depprune.make_plan(
        model, TOKENS, kinds=("layers", "neurons"), ratios={"layers": 0.5}, ratio=0.25
    )
    assert plan.choices["structural_ratios"] == {"layers": 0.5}
    assert len(plan.structure.children["model.layers"]) == 2
    plan.save(tmp_path / "plan.npz")
    depprune.Plan.load(tmp_path / "plan.npz").apply(model)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 48
    assert model.num_parameters() == plan.params_after(twin)
    with torch.no_grad():
        cached = model.generate(TOKENS, max_new_tokens=3, do_sample=False)
        plain = model.generate(TOKENS, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_layers_and_experts_in_one_plan_reload_exactly(tmp_path):
    config = transformers.MixtralConfig(
        **{k: v for k, v in FOUR_LAYERS.items() if k != "intermediate_size"},
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    plan = depprune.make_plan(
        model, TOKENS, kinds=("layers", "experts"), ratios={"layers": 0.25, "experts": 0.5}
    )
    lines = plan.structure.describe()
    assert lines[0].startswith("layers of model.layers: 1 of 4 removed")
    assert len(lines) == 4  # the three kept layers' experts; the removed layer's are not cut
    plan.apply(model)
    assert (model.config.num_hidden_layers, model.config.num_local_experts) == (3, 2)
    model.save_pretrained(tmp_path)
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, model(TOKENS).logits, rtol=0, atol=0)


def test_layers_of_a_meta_model_need_an_importance():
    with torch.device("meta"):
        model = build("llama")
    with pytest.raises(SelectionError, match=r"layer_importance=depprune\.depth\.given_layers"):
        depprune.make_plan(model, TOKENS, kinds=("layers",))
    given = depth.given_layers(model, TOKENS, {"model.layers": [1, 2]})
    plan = depprune.make_plan(model, TOKENS, kinds=("layers",), layer_importance=given)
    assert plan.structure.children["model.layers"].tolist() == [0, 3]


def test_kind_ratios_are_checked_before_anything_runs():
    model = build("llama")
    with pytest.raises(SelectionError, match="kinds does not ask for it"):
        depprune.make_plan(model, TOKENS, ratios={"layers": 0.5})
    with pytest.raises(SelectionError, match="a kind of its own ratio is one of"):
        depprune.make_plan(model, TOKENS, kinds=("neurons",), ratios={"neurons": 0.5})
    with pytest.raises(SelectionError, match="ratio of 'layers'"):
        depprune.make_plan(model, TOKENS, kinds=("layers",), ratios={"layers": 1.5})
    with pytest.raises(SelectionError, match="no list of repeated blocks"):
        depprune.make_plan(
            nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), torch.zeros(1, 4), kinds=("layers",)
        )
