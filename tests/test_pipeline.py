"""Score, select and apply on graphs written by hand for small torch models.

These exercise the stages after tracing on their own: the equations are the
ones a trace of each model gives, written out so a failure points here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pruning_oracle import (
    assert_same_outputs,
    outputs,
    predicted_param_count,
    zeroed_copy,
)
from torch import nn

import depprune
from depprune.apply import PlanMismatchError, apply_kept_indices
from depprune.importance import (
    ImportanceError,
    ScoreContext,
    batchnorm_scale,
    magnitude,
    random,
    score_groups,
    taylor,
)
from depprune.selection import SelectionError, select


def mlp_and_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    eqs = depprune.AxisEquations()
    inp = eqs.axis(6)
    eqs.freeze(inp)
    previous = inp
    for index, layer in [(0, model[0]), (2, model[2]), (4, model[4])]:
        out, w_in = eqs.axis(layer.out_features), eqs.axis(layer.in_features)
        eqs.param(f"{index}.weight", 0, out)
        eqs.param(f"{index}.weight", 1, w_in)
        eqs.param(f"{index}.bias", 0, out)
        eqs.equal(w_in, previous)
        previous = out
    eqs.freeze(previous)
    return model, eqs.solve()


def conv_bn_and_graph(groups=2):
    """conv(4->8) -> bn -> relu -> grouped conv(8->8, groups) -> bn -> relu -> conv(8->2)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=groups),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 2, 1),
    )
    model.eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
    eqs = depprune.AxisEquations()
    x = eqs.axis(4)
    eqs.freeze(x)
    c1_out, c1_in = eqs.axis(8), eqs.axis(4)
    eqs.equal(c1_in, x)
    eqs.param("0.weight", 0, c1_out)
    eqs.param("0.weight", 1, c1_in)
    eqs.param("0.bias", 0, c1_out)
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        eqs.param(name, 0, c1_out)
    # Grouped conv: input = product(G, 8/G), weight dim 1 = 8/G, output = product(G, 8/G).
    g, per_in, per_out = eqs.axis(groups), eqs.axis(8 // groups), eqs.axis(8 // groups)
    eqs.product(c1_out, [g, per_in])
    c2_out, c2_in = eqs.axis(8), eqs.axis(8 // groups)
    eqs.equal(c2_in, per_in)
    eqs.product(c2_out, [g, per_out])
    eqs.param("3.weight", 0, c2_out)
    eqs.param("3.weight", 1, c2_in)
    eqs.param("3.bias", 0, c2_out)
    for name in ("4.weight", "4.bias", "4.running_mean", "4.running_var"):
        eqs.param(name, 0, c2_out)
    c3_out, c3_in = eqs.axis(2), eqs.axis(8)
    eqs.equal(c3_in, c2_out)
    eqs.param("6.weight", 0, c3_out)
    eqs.param("6.weight", 1, c3_in)
    eqs.param("6.bias", 0, c3_out)
    eqs.freeze(c3_out)
    return model, eqs.solve()


def prune_and_check(model, graph, example, removed):
    expected = outputs(zeroed_copy(model, graph, removed), example)
    kept = graph.kept_indices(removed)
    predicted = predicted_param_count(model, kept)
    apply_kept_indices(model, kept)
    assert sum(p.numel() for p in model.parameters()) == predicted
    assert_same_outputs(expected, outputs(model, example))


def test_mlp_prunes_neurons_and_matches_the_zeroed_model():
    model, graph = mlp_and_graph()
    assert [g.size for g in graph.groups] == [10, 8]
    scores = score_groups(list(graph.groups), magnitude(2), ScoreContext.from_model(graph, model))
    removed = select(graph, scores, model, ratio=0.5)
    assert {g: len(u) for g, u in removed.items()} == {0: 5, 1: 4}
    prune_and_check(model, graph, torch.randn(3, 6), removed)
    assert (model[0].out_features, model[2].in_features, model[2].out_features) == (5, 5, 4)
    assert model[4].in_features == 4


def test_grouped_conv_with_batchnorm_prunes_whole_groups():
    model, graph = conv_bn_and_graph(groups=2)
    sizes = [g.size for g in graph.groups]
    assert sizes == [2, 4, 4]  # conv groups, input slot per group, output slot per group
    removed = {0: np.array([1])}  # the second conv group, everywhere
    prune_and_check(model, graph, torch.randn(2, 4, 5, 5), removed)
    assert (model[0].out_channels, model[3].groups, model[3].in_channels) == (4, 1, 4)
    assert model[3].out_channels == 4 and model[4].num_features == 4
    assert model[6].in_channels == 4


def test_grouped_conv_prunes_the_same_slot_in_every_group():
    model, graph = conv_bn_and_graph(groups=2)
    removed = {1: np.array([0, 3]), 2: np.array([2])}
    prune_and_check(model, graph, torch.randn(2, 4, 5, 5), removed)
    assert (model[3].groups, model[3].in_channels, model[3].out_channels) == (2, 4, 6)


def test_batchnorm_scale_taylor_random_and_callable_importances():
    model, graph = conv_bn_and_graph()
    ctx = ScoreContext.from_model(graph, model)
    bn = score_groups(list(graph.groups), batchnorm_scale, ctx)
    # Group 0 (conv groups) is on bn1 and bn2: each group unit sums 4 + 4 |gamma|.
    gamma = model[1].weight.abs().view(2, 4).sum(1) + model[4].weight.abs().view(2, 4).sum(1)
    torch.testing.assert_close(bn[0], gamma.detach())
    with pytest.raises(ImportanceError, match="no gradient"):
        score_groups(list(graph.groups), taylor, ctx)
    model(torch.randn(2, 4, 5, 5)).sum().backward()
    assert all(
        s.shape == (g.size,)
        for g, s in zip(
            graph.groups, score_groups(list(graph.groups), taylor, ctx).values(), strict=True
        )
    )
    first = score_groups(list(graph.groups), random(seed=3), ctx)
    again = score_groups(list(graph.groups), random(seed=3), ctx)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(ImportanceError, match="shape"):
        score_groups(list(graph.groups), lambda g, c: torch.zeros(g.size + 1), ctx)


def test_selection_ratios_round_to_min_units_and_global_ranking():
    model, graph = mlp_and_graph()
    scores = score_groups(list(graph.groups), magnitude(1), ScoreContext.from_model(graph, model))
    removed = select(graph, scores, model, ratio=0.5, ratios={model[2]: 0.25})
    assert {g: len(u) for g, u in removed.items()} == {0: 5, 1: 2}
    removed = select(graph, scores, model, ratio=0.5, round_to=4)
    assert {g: len(u) for g, u in removed.items()} == {0: 2, 1: 4}  # keep 8 of 10, 4 of 8
    removed = select(graph, scores, model, ratio=0.9, min_units=3)
    assert {g: len(u) for g, u in removed.items()} == {0: 7, 1: 5}
    removed = select(graph, scores, model, ratio=0.5, global_ranking=True)
    assert sum(len(u) for u in removed.values()) == 9
    removed = select(graph, scores, model, ratio=0.5, ignored=[model[4]])
    assert set(removed) == {0}


@pytest.mark.parametrize("bad", [1.5, -0.1, 1.0, "half"])
def test_invalid_ratios_raise(bad):
    model, graph = mlp_and_graph()
    scores = score_groups(list(graph.groups), magnitude(), ScoreContext.from_model(graph, model))
    with pytest.raises(SelectionError, match=r"in \[0, 1\)"):
        select(graph, scores, model, ratio=bad)
    with pytest.raises(SelectionError, match=r"in \[0, 1\)"):
        select(graph, scores, model, ratios={model[0]: bad})


def test_a_module_outside_the_model_raises():
    model, graph = mlp_and_graph()
    scores = score_groups(list(graph.groups), magnitude(), ScoreContext.from_model(graph, model))
    with pytest.raises(SelectionError, match="not a submodule"):
        select(graph, scores, model, ratios={nn.Linear(2, 2): 0.3})


def test_a_plan_for_another_model_changes_nothing():
    _, graph = mlp_and_graph()
    other = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 8))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PlanMismatchError, match=r"'4\.weight'"):
        apply_kept_indices(other, graph.kept_indices({0: [1], 1: [2]}))
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert other[0].out_features == 10


def test_apply_keeps_requires_grad_dtype_and_tied_weights():
    model = nn.Sequential(nn.Embedding(5, 6), nn.Linear(6, 5, bias=False)).double()
    model[1].weight = model[0].weight  # tied: (5, 6) both
    model[0].weight.requires_grad_(False)
    kept = {("0.weight", 1): np.array([0, 2, 4]), ("1.weight", 1): np.array([0, 2, 4])}
    apply_kept_indices(model, kept)
    assert model[1].weight is model[0].weight
    assert model[0].weight.shape == (5, 3) and model[0].weight.dtype == torch.float64
    assert not model[0].weight.requires_grad
    assert model[0].embedding_dim == 3 and model[1].in_features == 3


def test_wanda_scores_weights_by_input_norms():
    from depprune.importance import ScoreContext, score_groups, wanda

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3) * torch.tensor([10.0, 1.0, 0.1]) for _ in range(3)]
    importance = wanda(model, batches, progress=False)
    # By hand: ||x_j|| over all tokens, and the hidden activations' norms.
    x = torch.cat(batches)
    hidden = torch.relu(model[0](x))
    w1, w2 = model[0].weight.detach(), model[2].weight.detach()
    expected = (w1.abs() * x.norm(dim=0)).sum(1) + (w2.abs() * hidden.norm(dim=0)).sum(0)
    graph = depprune.trace(model, x)
    scores = score_groups(list(graph.groups), importance, ScoreContext.from_model(graph, model))
    torch.testing.assert_close(scores[0], expected.detach())


def test_wanda_prunes_an_hf_model_and_needs_batches():
    from depprune.importance import ImportanceError, wanda

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": tokens[i : i + 1]} for i in range(2)]
    importance = wanda(model, batches, progress=False)
    assert set(importance.input_norms) >= {"model.layers.0.mlp.down_proj.weight", "lm_head.weight"}
    report = depprune.prune(
        model,
        {"input_ids": tokens},
        importance=importance,
        kinds=("heads", "neurons"),
        progress=False,
    )
    assert report.params_after < report.params_before
    assert model(tokens).logits.shape == (2, 9, 64)
    with pytest.raises(ImportanceError, match="calibration gave no batches"):
        wanda(model, [], progress=False)
