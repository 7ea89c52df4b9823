"""Coverage: trace, prune 50% and check every supported architecture.

For each model: pruning every group by half runs, the forward pass keeps
its output shape, the parameter count equals what the plan predicts, and on
the groups no normalisation spans, the pruned model gives the same output as
the unpruned one with the removed units zeroed (the mask oracle).
"""

from __future__ import annotations

import pytest
import torch
from pruning_oracle import (
    assert_same_outputs,
    norm_spanned_groups,
    outputs,
    predicted_param_count,
    zeroed_copy,
)
from tiny_models import TINY_DECODER, LSTMClassifier, tokens
from torch import nn

import depprune
from depprune.apply import apply_kept_indices
from depprune.importance import ScoreContext, magnitude, score_groups
from depprune.plan import Plan
from depprune.selection import select


def plan(model, graph, groups, ratio=0.5):
    ctx = ScoreContext.from_model(graph, model)
    scores = score_groups([graph.groups[g] for g in groups], magnitude(2), ctx)
    return select(graph, scores, model, ratio=ratio)


def check_pruning(make_model, example, *, atol=1e-4, min_groups=1):
    """The shared check: full 50% prune, then the mask oracle on norm-free groups.

    Returns the graph and the fully pruned model.
    """
    model = make_model().eval()
    reference = outputs(model, example)
    graph = depprune.trace(model, example)
    assert len(graph.groups) >= min_groups, str(graph)

    removed = plan(model, graph, range(len(graph.groups)))
    assert removed, "nothing was selected for removal"
    kept = graph.kept_indices(removed)
    predicted = predicted_param_count(model, kept)
    assert Plan.from_kept(model, kept).params_after(model) == predicted
    apply_kept_indices(model, kept)
    assert sum(p.numel() for p in model.parameters()) == predicted
    pruned = outputs(model, example)
    assert [t.shape for t in pruned] == [t.shape for t in reference]
    fully_pruned = model

    model = make_model().eval()
    spanned = norm_spanned_groups(graph, model)
    free = [g.index for g in graph.groups if g.index not in spanned]
    if any(graph.groups[g].kind == "head_dim" for g in spanned):
        # Per-head q/k norms span q/k head_dim; v keeps the same head_dim, so it stays too.
        free = [g for g in free if graph.groups[g].kind != "head_dim"]
    if free:
        removed = plan(model, graph, free)
        expected = outputs(zeroed_copy(model, graph, removed), example)
        apply_kept_indices(model, graph.kept_indices(removed))
        assert_same_outputs(expected, outputs(model, example), atol=atol)
    return graph, fully_pruned


def seeded(factory):
    def make():
        torch.manual_seed(0)
        return factory()

    return make


# -- torchvision ---------------------------------------------------------------

tv = pytest.importorskip("torchvision.models")

IMAGE = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def small_vgg():
    model = tv.vgg11_bn(num_classes=10)
    # The stock classifier is 100M parameters; a narrower head keeps the test quick.
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10)
    )
    return model


def nonzero_head(model: nn.Module, head: str, seed: int = 0) -> nn.Module:
    """``model`` with its zero-initialised classifier ``head`` re-drawn from a seeded normal.

    A zero head makes every output zero, and an oracle comparing zeros cannot fail.
    """
    layer = model.get_submodule(head)
    with torch.no_grad():
        weight = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(seed))
        layer.weight.copy_(weight * 0.02)
    return model


TORCHVISION = {
    "resnet18": lambda: tv.resnet18(num_classes=10),
    "resnet50": lambda: tv.resnet50(num_classes=10),
    "densenet121": lambda: tv.densenet121(num_classes=10),
    "mobilenet_v2": lambda: tv.mobilenet_v2(num_classes=10),
    "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=10),
    "vgg11_bn": small_vgg,
    "resnext50_32x4d": lambda: tv.resnext50_32x4d(num_classes=10),
    "convnext_tiny": lambda: tv.convnext_tiny(num_classes=10),
    "googlenet": lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=True),
    # torchvision zero-initialises the ViT head.
    "vit_b_16": lambda: nonzero_head(
        tv.VisionTransformer(
            image_size=64,
            patch_size=16,
            num_layers=2,
            num_heads=4,
            hidden_dim=64,
            mlp_dim=128,
            num_classes=10,
        ),
        "heads.head",
    ),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_model(name):
    check_pruning(seeded(TORCHVISION[name]), IMAGE, atol=1e-3)


# -- small custom models ---------------------------------------------------------


class AttentionBlock(nn.Module):
    """Projections in and out, so embed_dim (32) is not the frozen input width (16) and
    the attention's heads can be cut."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x + self.mlp(x))


def test_lstm_model():
    tokens = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    check_pruning(seeded(LSTMClassifier), tokens)


def test_multihead_attention_model():
    make = seeded(AttentionBlock)
    graph = depprune.trace(make().eval(), torch.randn(2, 5, 16))
    assert {"heads", "head_dim"} <= {g.kind for g in graph.groups}
    # Default kinds: a ratio is of the width, so whole heads go (head_dim would change the
    # attention's 1/sqrt(head_dim) scale, which zeroing cannot show).
    model, x = make().eval(), torch.randn(2, 5, 16)
    reference = make().eval()
    report = depprune.prune(model, x, ratio=0.5)
    assert model.attn.num_heads == 2 and model.attn.head_dim == 8 and model.attn.embed_dim == 16
    removed = {g: u for g, u in report.plan.removed.items()}
    assert {graph.groups[g].kind for g in removed} == {"heads", "neurons"}
    expected = outputs(zeroed_copy(reference, graph, removed), x)
    assert_same_outputs(expected, outputs(model, x))


# -- Hugging Face transformers ----------------------------------------------------

transformers = pytest.importorskip("transformers")

TOKENS = tokens(seed=2)
LLAMA_LIKE = TINY_DECODER

HF = {
    "LlamaForCausalLM": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**LLAMA_LIKE)
    ),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**LLAMA_LIKE)
    ),
    "MistralForCausalLM": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**LLAMA_LIKE)
    ),
    "Phi3ForCausalLM": lambda: transformers.Phi3ForCausalLM(
        transformers.Phi3Config(**LLAMA_LIKE, pad_token_id=0)
    ),
    "GemmaForCausalLM": lambda: transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**LLAMA_LIKE, head_dim=8)
    ),
    "Gemma2ForCausalLM": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**LLAMA_LIKE, head_dim=8)
    ),
    "Gemma3ForCausalLM": lambda: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8)
    ),
    # Per-head q/k RMS norms, and tied input and output embeddings.
    "Qwen3ForCausalLM": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**LLAMA_LIKE, head_dim=8, tie_word_embeddings=True)
    ),
    "GPT2LMHeadModel": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ),
    "BertModel": lambda: transformers.BertModel(
        transformers.BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ),
}


def assert_config_rebuilds(model):
    """The updated config describes the pruned model: a model built from it takes its weights."""
    rebuilt = type(model)(model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


# Their configs derive head_dim from hidden_size and the head count, so a pruned
# head_dim cannot be written down; apply warns and leaves the config as it was.
HEAD_DIM_FROM_HIDDEN = {"BertModel", "GPT2LMHeadModel"}


@pytest.mark.parametrize("name", sorted(HF))
def test_transformers_model(name):
    if name in HEAD_DIM_FROM_HIDDEN:
        with pytest.warns(UserWarning, match="the config is left unchanged"):
            check_pruning(seeded(HF[name]), {"input_ids": TOKENS})
        return
    # Pruning head_dim changes the attention scale and RoPE frequencies a config rebuilds.
    with pytest.warns(UserWarning, match="loads, but its outputs would differ"):
        _, pruned = check_pruning(seeded(HF[name]), {"input_ids": TOKENS})
    assert pruned.config.hidden_size == pruned.get_input_embeddings().weight.shape[1]
    assert_config_rebuilds(pruned)


# Gemma scales embeddings by sqrt(hidden_size), a constant its config would recompute.
EMBED_SCALED = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"}


@pytest.mark.parametrize("name", sorted(set(HF) - HEAD_DIM_FROM_HIDDEN))
def test_transformers_round_trip(name, tmp_path, recwarn):
    """Heads, neurons (and hidden) pruned: save_pretrained + from_pretrained give the same logits."""
    model = seeded(HF[name])().eval()
    kinds = ("heads", "neurons") if name in EMBED_SCALED else ("hidden", "heads", "neurons")
    report = depprune.prune(model, {"input_ids": TOKENS}, ratio=0.5, kinds=kinds)
    assert not [w for w in recwarn if "config" in str(w.message)]
    assert {g.kind for g in report.plan.groups if g.kept < g.size} == set(kinds)
    config = model.config
    assert config.hidden_size == (32 if name in EMBED_SCALED else 16)
    assert config.intermediate_size == 32
    # Half the query heads: KV heads halve, queries per KV head stay (a ratio is of the width).
    assert config.num_key_value_heads == 1 and config.num_attention_heads == 2
    model.save_pretrained(tmp_path)
    # The loading path users take: the auto class reads the pruned config.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert_same_outputs(outputs(model, TOKENS), outputs(reloaded, TOKENS), atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(HF) - HEAD_DIM_FROM_HIDDEN))
def test_default_prune_reloads_exactly(name, tmp_path, recwarn):
    """Default kinds keep only what the config can express: the checkpoint reloads exactly."""
    model = seeded(HF[name])().eval()
    report = depprune.prune(model, {"input_ids": TOKENS}, ratio=0.5)
    assert not [w for w in recwarn if "config" in str(w.message)]
    assert report.params_after < report.params_before
    assert "head_dim" not in {g.kind for g in report.plan.groups if g.kept < g.size}
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_outputs(outputs(model, TOKENS), outputs(reloaded, TOKENS), atol=1e-6)


@pytest.mark.parametrize("name", sorted(EMBED_SCALED))
def test_gemma_embedding_scale_is_folded_into_the_weights(name, tmp_path, monkeypatch):
    """sqrt(hidden_size) scaling: the pruned model is the plain cut, and reloads exactly."""
    import depprune.apply as apply_module
    import depprune.apply.config as config_module

    model = seeded(HF[name])().eval()
    plan = depprune.make_plan(model, {"input_ids": TOKENS}, kinds=("hidden",))
    # The plain cut: its forward keeps multiplying by the old scale buffer, nothing folded.
    plain = seeded(HF[name])().eval()
    monkeypatch.setattr(config_module, "_fold_scales", lambda *args: [])
    apply_module.apply_kept_indices(plain, plan.kept)
    monkeypatch.undo()
    plan.apply(model)
    assert model.config.hidden_size == 16
    assert model.get_input_embeddings().scalar_embed_scale == pytest.approx(16**0.5)
    assert_same_outputs(outputs(plain, TOKENS), outputs(model, TOKENS), atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_outputs(outputs(model, TOKENS), outputs(reloaded, TOKENS), atol=1e-6)


def test_transformers_vit():
    def make():
        # A fresh config each time: pruning updates the config the model holds.
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        return transformers.ViTModel(config)

    with pytest.warns(UserWarning, match="loads, but its outputs would differ") as caught:
        graph, pruned = check_pruning(seeded(make), {"pixel_values": IMAGE[:, :, :32, :32]})
    assert caught[0].filename == __file__, "the warning should point at the caller"
    assert len(graph.groups) >= 4
    assert pruned.config.hidden_size == pruned.embeddings.patch_embeddings.projection.out_channels
    assert_config_rebuilds(pruned)


def test_uneven_layers_are_refused_before_touching_an_hf_model(tmp_path):
    from test_errors import assert_unchanged, snapshot

    def weak_first_layer():
        model = seeded(HF["LlamaForCausalLM"])().eval()
        mlp = model.model.layers[0].mlp
        with torch.no_grad():  # 48 of layer 0's 64 neurons nearly dead: global ranking takes them
            for weight in (mlp.gate_proj.weight, mlp.up_proj.weight):
                weight[:48].mul_(0.01)
            mlp.down_proj.weight[:, :48].mul_(0.01)
        return model

    model = weak_first_layer()
    inputs = {"input_ids": TOKENS}
    before = snapshot(model)
    with pytest.raises(
        depprune.SelectionError,
        match=r"layers would keep different sizes.*"
        r"model\.layers\.#\.mlp\.gate_proj\.weight\[0\] \(neurons: keeps \[\d+, \d+\]\)"
        r".*uniform=True",
    ):
        depprune.prune(model, inputs, kinds=("neurons",), global_ranking=True)
    assert_unchanged(model, before)

    depprune.prune(model, inputs, kinds=("neurons",), global_ranking=True, uniform=True)
    assert model.config.intermediate_size == 32
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert_same_outputs(outputs(model, TOKENS), outputs(reloaded, TOKENS), atol=1e-6)

    uneven = weak_first_layer()
    with pytest.warns(UserWarning, match="layers keep different sizes"):
        depprune.prune(uneven, inputs, kinds=("neurons",), global_ranking=True, uniform=False)
    assert uneven.model.layers[0].mlp.gate_proj.out_features != 32


def test_gpt2_neurons_round_trip_through_n_inner(tmp_path, recwarn):
    model = seeded(HF["GPT2LMHeadModel"])().eval()
    depprune.prune(model, {"input_ids": TOKENS}, kinds=("neurons",))
    assert not [w for w in recwarn if "config" in str(w.message)]
    assert model.config.n_inner == 64  # GPT-2 calls its MLP width n_inner (None: 4 x hidden)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert_same_outputs(outputs(model, TOKENS), outputs(reloaded, TOKENS), atol=1e-6)
