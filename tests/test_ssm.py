"""State-space and hybrid models: Mamba, FalconMamba, Mamba2, Jamba and Bamba, pruned exactly.

transformers' torch path (no CUDA kernels) runs here. What a plan may cut, per family:

- Mamba / FalconMamba: the hidden size, the inner width (``intermediate_size``: conv,
  ``x_proj`` input, ``dt_proj``, ``A_log``, ``D``), the state (``ssm_state_size``, B and C
  of ``x_proj`` together) and the time-step rank (``time_step_rank``).
- Mamba2 / Bamba's Mamba layers: whole heads (``num_heads``; with ``expand`` following
  where the hidden size stays), the head_dim slots and the state (``ssm_state_size``:
  B and C of the packed ``in_proj`` and ``conv1d`` together). With ``n_groups > 1`` heads
  are heads within a group, cut alike in every group; the groups themselves are frozen
  (the replay refutes them: the forward views by its ``n_groups``).
- Jamba / Bamba also cut attention heads and MLP neurons; Jamba's expert neurons too.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from pruning_oracle import (
    assert_generates_and_reloads,
    assert_same_outputs,
    norm_spanned_groups,
    outputs,
    zeroed_copy,
)
from tiny_models import tokens

import depprune
from depprune.apply import apply_kept_indices
from depprune.importance import ScoreContext, magnitude, score_groups
from depprune.selection import select

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = tokens(seed=3)
MAMBA = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, expand=2, conv_kernel=4)
HYBRID = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(MAMBA, state_size=4, time_step_rank=8)),
    "falcon_mamba": (
        "FalconMambaForCausalLM",
        "FalconMambaConfig",
        dict(MAMBA, state_size=4, time_step_rank=8),
    ),
    "mamba2": (
        "Mamba2ForCausalLM",
        "Mamba2Config",
        dict(MAMBA, state_size=8, num_heads=8, head_dim=8, n_groups=1, chunk_size=4),
    ),
    "mamba2_groups": (
        "Mamba2ForCausalLM",
        "Mamba2Config",
        dict(MAMBA, state_size=8, num_heads=8, head_dim=8, n_groups=2, chunk_size=4),
    ),
    "jamba": (
        "JambaForCausalLM",
        "JambaConfig",
        dict(
            HYBRID,
            num_experts=4,
            num_experts_per_tok=2,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=8,
            use_mamba_kernels=False,
        ),
    ),
    "bamba": (
        "BambaForCausalLM",
        "BambaConfig",
        dict(
            HYBRID,
            mamba_n_heads=8,
            mamba_d_head=8,
            mamba_n_groups=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=4,
            attn_layer_indices=[1],
        ),
    ),
}


def build(family: str) -> torch.nn.Module:
    model_name, config_name, fields = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(transformers, config_name)(**fields)
        return getattr(transformers, model_name)(config).eval()


# (kind, size) -> number of groups, as the trace finds them.
MAMBA_GROUPS = {("hidden", 32): 1, ("channels", 64): 2, ("neurons", 4): 2, ("neurons", 8): 2}
GROUPS = {
    "mamba": MAMBA_GROUPS,
    "falcon_mamba": MAMBA_GROUPS,
    # Per layer: 8 heads, their 8 head_dim slots (a conv channel each), the 8 state units.
    "mamba2": {("hidden", 32): 1, ("heads", 8): 2, ("channels", 8): 4},
    # Heads split into 2 groups (of B and C) x 4 heads within a group.
    "mamba2_groups": {("hidden", 32): 1, ("heads", 2): 2, ("heads", 4): 2, ("channels", 8): 4},
    # Layer 0 is Mamba + MLP; layer 1 attention + 4 experts. The state and time-step rank
    # pass RMS norms (b/c/dt_layernorm), so they read as "hidden".
    "jamba": {
        ("hidden", 32): 1,
        ("channels", 64): 1,
        ("hidden", 4): 1,
        ("hidden", 8): 1,
        ("neurons", 64): 2,
        ("heads", 2): 2,
        ("head_dim", 8): 2,
    },
    "bamba": {
        ("hidden", 32): 1,
        ("neurons", 64): 2,
        ("heads", 8): 1,
        ("channels", 8): 2,
        ("heads", 2): 2,
        ("head_dim", 2): 1,
        ("head_dim", 4): 1,
        ("head_dim", 8): 1,
    },
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trace_finds_the_state_space_groups(family):
    model = build(family)
    graph = depprune.trace(model, {"input_ids": TOKENS})
    assert graph.unsupported_ops == {}
    assert Counter((g.kind, g.size) for g in graph.groups) == GROUPS[family]
    mixer = "mixer" if "mamba" in family else "mamba"
    heads = [g for g in graph.groups if any(n.endswith(f"{mixer}.A_log") for n, _ in g.members)]
    # Every group through A_log also cuts the conv or x_proj: units are whole state-space units.
    for group in heads:
        names = {name.rpartition(".")[0].rpartition(".")[2] for name, _ in group.members}
        assert names & {"conv1d", "x_proj"}, names


# Config fields the default plan (ratio 0.5) changes, with their new values.
CONFIG_AFTER = {
    "mamba": {"hidden_size": 16, "intermediate_size": 32, "state_size": 2, "time_step_rank": 4},
    "falcon_mamba": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "state_size": 2,
        "time_step_rank": 4,
    },
    "mamba2": {"hidden_size": 16, "num_heads": 4, "state_size": 4},
    "mamba2_groups": {"hidden_size": 16, "num_heads": 4, "state_size": 4},
    "jamba": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "mamba_d_state": 2,
        "mamba_dt_rank": 4,
        "head_dim": 8,
    },
    "bamba": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "mamba_n_heads": 4,
        "mamba_d_state": 4,
        "head_dim": 8,
    },
}
# Mixer attributes after that plan (the torch path splits and views by them).
MIXER_AFTER = {
    "mamba": {"hidden_size": 16, "intermediate_size": 32, "ssm_state_size": 2, "time_step_rank": 4},
    "mamba2": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 4,
        "head_dim": 8,
        "ssm_state_size": 4,
        "conv_dim": 40,
    },
    "mamba2_groups": {"num_heads": 4, "n_groups": 2, "ssm_state_size": 4, "conv_dim": 48},
    "jamba": {"hidden_size": 16, "intermediate_size": 32, "ssm_state_size": 2, "time_step_rank": 4},
    "bamba": {"num_heads": 4, "head_dim": 8, "ssm_state_size": 4, "conv_dim": 40},
}
MIXER_AFTER["falcon_mamba"] = MIXER_AFTER["mamba"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_plan_generates_and_reloads_exactly(family, tmp_path):
    model = build(family)
    before = model.config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error", depprune.errors.ConfigWarning)
        plan = depprune.make_plan(model, {"input_ids": TOKENS}, ratio=0.5)
        plan.apply(model)
    if family == "mamba2_groups":
        # The groups of B and C: the forward views by n_groups, so the replay refutes them.
        assert sorted(plan.kept_whole) == [1, 5]
        assert "aten.view" in plan.kept_whole[1] and "like group 1" in plan.kept_whole[5]
    else:
        assert plan.kept_whole == {}
    after = model.config.to_dict()
    changed = {k: after[k] for k in after if before.get(k) != after[k]}
    changed.pop("transformers_version", None)
    assert changed == CONFIG_AFTER[family]
    mixers = [m for n, m in model.named_modules() if n.endswith((".mixer", ".mamba"))]
    assert mixers
    for mixer in mixers:
        assert {k: getattr(mixer, k) for k in MIXER_AFTER[family]} == MIXER_AFTER[family]

    assert model(TOKENS).logits.shape == (2, 7, 100)
    assert_generates_and_reloads(model, TOKENS, tmp_path)


# One width at a time: where the hidden size stays, the ratio field follows the inner width.
ONE_KIND = [
    ("mamba2", ("heads",), {"num_heads": 4, "expand": 1}),
    ("mamba2", ("hidden",), {"hidden_size": 16, "expand": 4}),
    ("mamba2", ("channels",), {"head_dim": 4, "state_size": 4, "expand": 1}),
    ("bamba", ("hidden",), {"hidden_size": 16, "mamba_expand": 4, "head_dim": 8}),
    (
        "mamba",
        ("channels", "neurons"),
        {"intermediate_size": 32, "state_size": 2, "time_step_rank": 4},
    ),
]


@pytest.mark.parametrize(("family", "kinds", "fields"), ONE_KIND)
def test_one_kind_keeps_a_config_that_rebuilds(family, kinds, fields, tmp_path):
    model = build(family)
    before = model.config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error", depprune.errors.ConfigWarning)
        depprune.make_plan(model, {"input_ids": TOKENS}, ratio=0.5, kinds=kinds).apply(model)
    after = model.config.to_dict()
    changed = {k: after[k] for k in after if before.get(k) != after[k]}
    changed.pop("transformers_version", None)
    assert changed == fields
    logits = model(TOKENS).logits
    model.save_pretrained(tmp_path)
    assert torch.equal(type(model).from_pretrained(tmp_path).eval()(TOKENS).logits, logits)


def gated_norm_groups(graph, model) -> set[int]:
    """Groups through Mamba2's gated RMS norm (``*RMSNormGated``), which the oracle's
    norm test does not know by name: its statistics span the heads and head_dim."""
    modules = dict(model.named_modules())
    return {
        g.index
        for g in graph.groups
        for name, _ in g.members
        if "RMSNormGated" in type(modules.get(name.rpartition(".")[0])).__name__
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mask_oracle_on_every_group_no_norm_spans(family):
    model = build(family)
    graph = depprune.trace(model, {"input_ids": TOKENS})
    spanned = norm_spanned_groups(graph, model) | gated_norm_groups(graph, model)
    if family == "falcon_mamba":
        # Its mixer RMS-normalises B, C and dt inline (rms_forward, no module): the state and
        # time-step rank change the function like the hidden size does.
        spanned |= {g.index for g in graph.groups if g.kind == "neurons"}
    # Attention's q/k and v head_dim must shrink together (the apply refuses one alone).
    free = [g for g in graph.groups if g.index not in spanned and g.kind != "head_dim"]
    ctx = ScoreContext.from_model(graph, model)
    removed = select(graph, score_groups(free, magnitude(2), ctx), model, ratio=0.5)
    assert {g.index for g in free} == set(removed)  # every free group loses units
    expected = outputs(zeroed_copy(model, graph, removed), {"input_ids": TOKENS})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # configs are the other tests' business
        apply_kept_indices(model, graph.kept_indices(removed))
    assert_same_outputs(expected, outputs(model, {"input_ids": TOKENS}), atol=1e-5)
