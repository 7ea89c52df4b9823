"""LLM families: exact groups read from the trace, and plans made without weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from pruning_oracle import assert_same_outputs, outputs
from tiny_models import TINY_DECODER, tokens

import depprune
from depprune.importance import random

transformers = pytest.importorskip("transformers")

TOKENS = tokens(seed=3)
# 4 query heads in 2 KV groups of 2, head_dim 8, 2 layers.
SHAPE = dict(TINY_DECODER, head_dim=8)
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, {}),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config, {"pad_token_id": 0}),
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig, {}),
    "qwen3": (
        transformers.Qwen3ForCausalLM,
        transformers.Qwen3Config,
        {"tie_word_embeddings": True},
    ),
}


def build(family: str, device: str = "cpu"):
    model_class, config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    with torch.device(device):
        return model_class(config_class(**SHAPE, **extra)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_groups_are_read_from_the_trace(family):
    model = build(family)
    graph = depprune.trace(model, {"input_ids": TOKENS})
    assert graph.unsupported_ops == {}
    kinds = Counter((g.kind, g.size) for g in graph.groups)
    # One hidden size; per layer: 2 KV heads (each with its query heads), 2 query
    # slots per KV group, v head_dim 8, MLP neurons 64; RoPE pairs (j, j + 4) of the
    # q/k head_dim form one group shared by every layer (one cos/sin table).
    assert kinds == {
        ("hidden", 32): 1,
        ("heads", 2): 4,
        ("head_dim", 8): 2,
        ("head_dim", 4): 1,
        ("neurons", 64): 2,
    }
    hidden = graph.groups("hidden")[0]
    names = {name for name, _ in hidden.members}
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    if family == "qwen3":
        assert "lm_head.weight" in names  # tied to the embedding: listed, cut once
    layer0 = [g for g in graph.groups("heads") if "layers.0." in g.members[0][0]]
    kv_heads, query_slots = sorted(layer0, key=lambda g: -g.params_per_unit)

    def modules(group):
        return {name.split(".")[-2] for name, _ in group.members}

    # A KV head takes its keys, values and its query heads; a query slot only queries.
    assert modules(kv_heads) >= {"o_proj"} and modules(kv_heads) & {"k_proj", "qkv_proj"}
    assert "k_proj" not in modules(query_slots) and "v_proj" not in modules(query_slots)
    rope = graph.groups("head_dim")
    shared = next(g for g in rope if g.size == 4)
    assert any(name.endswith("inv_freq") for name, _ in shared.members)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_plan_made_on_meta_applies_to_real_weights(family):
    meta = build(family, "meta")
    plan = depprune.make_plan(
        meta, {"input_ids": TOKENS}, importance=random(7), kinds=("hidden", "heads", "neurons")
    )
    real, reference = build(family), build(family)
    same = depprune.make_plan(
        reference, {"input_ids": TOKENS}, importance=random(7), kinds=("hidden", "heads", "neurons")
    )
    assert plan.kept.keys() == same.kept.keys()
    assert all(np.array_equal(plan.kept[k], same.kept[k]) for k in plan.kept)
    plan.apply(real)
    same.apply(reference)
    assert_same_outputs(outputs(reference, TOKENS), outputs(real, TOKENS), atol=0)
    assert real.config.hidden_size == 16 and real.config.num_key_value_heads == 1


def test_data_dependent_calls_on_meta_are_answered_and_noted():
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.proj(x)
            if y.abs().max().item() > 1e6:  # data-dependent Python
                y = y * 0
            return y

    with torch.device("meta"):
        model = Gate()
    graph = depprune.trace(model, torch.zeros(2, 8))
    assert any("_local_scalar_dense" in note and "answered 0.0" in note for note in graph.notes)
