"""Li et al.'s L1-norm filter pruning: the producer's filter norms, residual streams, profiles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pruning_oracle import assert_same_outputs, outputs, zeroed_copy
from tiny_models import TINY_DECODER, tokens
from torch import nn

import depprune
from depprune.errors import DeppruneError, MethodError
from depprune.importance import ScoreContext, magnitude
from depprune.methods import l1_filter
from depprune.methods.l1_filter import filter_l1, producers, residual_groups
from depprune.selection import lowest


def conv_chain(norm: bool = True) -> nn.Sequential:
    """conv(3->8) [bn] relu conv(8->8) relu conv(8->8) relu conv(8->2): filters to rank."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if norm else []
    layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)]
    layers += [nn.ReLU(), nn.Conv2d(8, 2, 1)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                # Scales and shifts far from the convs' weights, so counting them would show.
                module.weight.copy_(torch.linspace(5.0, -5.0, 8))
                module.bias.copy_(torch.linspace(-3.0, 3.0, 8))
    return model.eval()


class Residual(nn.Module):
    """A stem and a block's second conv add into one stream; the block's first conv is inside."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.first = nn.Conv2d(8, 6, 3, padding=1)
        self.second = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.second(torch.relu(self.first(x)))
        return self.head(torch.relu(x))


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def group_of(graph: depprune.DependencyGraph, member: tuple[str, int]) -> depprune.Group:
    (group,) = [g for g in graph.groups if member in g.members]
    return group


def test_importance_is_the_producers_filter_l1_only():
    model = conv_chain()
    graph = depprune.trace(model, images())
    ctx = ScoreContext.from_model(graph, model)
    group = group_of(graph, ("0.weight", 0))
    expected = model[0].weight.detach().abs().sum(dim=(1, 2, 3))
    torch.testing.assert_close(filter_l1(group, ctx), expected)
    # The group also holds the BatchNorm, the bias and the next conv's kernels: not counted.
    assert not torch.allclose(magnitude(1)(group, ctx), expected)
    assert [p.name for p in producers(group, ctx)] == ["0.weight"]


def test_importance_reads_each_layer_kind_along_its_output_dim():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    # transformers' Conv1D holds (in, out): its filters lie along dim 1.
    model = nn.Sequential(Conv1D(5, 3), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    graph = depprune.trace(model, torch.randn(2, 3))
    ctx = ScoreContext.from_model(graph, model)
    conv1d = group_of(graph, ("0.weight", 1))
    torch.testing.assert_close(filter_l1(conv1d, ctx), model[0].weight.detach().abs().sum(0))
    linear = group_of(graph, ("2.weight", 0))
    torch.testing.assert_close(filter_l1(linear, ctx), model[2].weight.detach().abs().sum(1))


def test_importance_of_a_masked_weight_is_of_the_masked_filters():
    model = conv_chain()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    graph = depprune.trace(model, images())
    ctx = ScoreContext.from_model(graph, model)
    group = group_of(graph, ("0.weight_orig", 0))
    masked = (model[0].weight_orig * model[0].weight_mask).detach()
    torch.testing.assert_close(filter_l1(group, ctx), masked.abs().sum(dim=(1, 2, 3)))


def test_a_depthwise_conv_carries_channels_on_and_is_not_their_producer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 2, 1)
    )
    graph = depprune.trace(model, images())
    ctx = ScoreContext.from_model(graph, model)
    group = group_of(graph, ("0.weight", 0))
    assert [p.name for p in producers(group, ctx)] == ["0.weight"]
    torch.testing.assert_close(
        filter_l1(group, ctx), model[0].weight.detach().abs().sum(dim=(1, 2, 3))
    )
    assert residual_groups(graph, model) == {}


def test_residual_stream_kept_whole_with_skip_residual_and_pruned_without():
    x = images()
    graph = depprune.trace(Residual(), x)
    stream = group_of(graph, ("stem.weight", 0))
    assert ("second.weight", 0) in stream.members
    assert list(residual_groups(graph, Residual())) == [stream.index]

    kept = Residual()
    report = l1_filter.prune(kept, x, ratio=0.5, progress=False)
    assert (kept.stem.out_channels, kept.second.out_channels, kept.head.in_channels) == (8, 8, 8)
    assert kept.first.out_channels == 3
    assert any("skip_residual=True" in reason for reason in report.kept_whole)

    pruned = Residual()
    l1_filter.prune(pruned, x, ratio=0.5, skip_residual=False, progress=False)
    assert (pruned.stem.out_channels, pruned.second.out_channels, pruned.head.in_channels) == (
        4,
        4,
        4,
    )
    assert pruned.first.out_channels == 3


def test_several_producers_that_do_not_add_are_no_residual():
    class Gated(nn.Module):
        """A gated MLP (gate and up read one input) and a squeeze-excitation gate (multiplies)."""

        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.expand, self.squeeze = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)
            self.excite, self.project = nn.Conv2d(2, 6, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            features = torch.relu(self.expand(x))
            scale = torch.sigmoid(
                self.excite(torch.relu(self.squeeze(features.mean((2, 3), True))))
            )
            pooled = self.project(features * scale).mean((2, 3))
            return self.down(torch.relu(self.gate(pooled)) * self.up(pooled))

    model = Gated()
    graph = depprune.trace(model, images())
    ctx = ScoreContext.from_model(graph, model)
    neurons = group_of(graph, ("gate.weight", 0))
    expanded = group_of(graph, ("expand.weight", 0))
    assert {p.name for p in producers(neurons, ctx)} == {"gate.weight", "up.weight"}
    assert {p.name for p in producers(expanded, ctx)} == {"expand.weight", "excite.weight"}
    assert residual_groups(graph, model) == {}
    # Both parts' filters count: the gated neuron is made by gate and up together.
    torch.testing.assert_close(
        filter_l1(neurons, ctx),
        model.gate.weight.detach().abs().sum(1) + model.up.weight.detach().abs().sum(1),
    )


def test_a_decoders_residual_stream_is_its_hidden_size_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_DECODER))
    graph = depprune.trace(model, tokens(0))
    assert [graph.groups[g].kind for g in residual_groups(graph, model)] == ["hidden"]


def test_ratio_profile_and_lowest_filters_removed():
    model = conv_chain()
    reference = copy.deepcopy(model)
    graph = depprune.trace(reference, images())
    ctx = ScoreContext.from_model(graph, reference)
    report = l1_filter.prune(
        model, images(), ratio=0.5, ratios={model[3]: 0.25, (model[5],): 0.75}, progress=False
    )
    assert (model[0].out_channels, model[3].out_channels, model[5].out_channels) == (4, 6, 2)
    for member, count in ((("0.weight", 0), 4), (("3.weight", 0), 2), (("5.weight", 0), 6)):
        group = group_of(graph, member)
        expected = lowest(filter_l1(group, ctx), count)
        np.testing.assert_array_equal(report.plan.removed[group.index], expected)


def test_sensitive_layers_keep_their_filters_but_not_their_inputs():
    model = conv_chain()
    report = l1_filter.prune(model, images(), ratio=0.5, sensitive=[model[3]], progress=False)
    # The sensitive conv keeps all its filters; the conv before it still loses half.
    assert (model[3].out_channels, model[3].in_channels, model[0].out_channels) == (8, 4, 4)
    assert model[5].out_channels == 4
    assert any("sensitive layer 3" in reason for reason in report.kept_whole)


@pytest.mark.parametrize("skip_residual", [True, False])
def test_pruned_output_equals_zeroing_the_removed_filters(skip_residual):
    for model in (conv_chain(norm=False), Residual().eval()):
        x = images(3)
        original = copy.deepcopy(model)
        report = l1_filter.prune(model, x, ratio=0.5, skip_residual=skip_residual, progress=False)
        assert report.plan.removed
        expected = outputs(zeroed_copy(original, report.graph, report.plan.removed), x)
        assert_same_outputs(expected, outputs(model, x))


def test_bad_arguments_raise_and_leave_the_model_unchanged():
    model = conv_chain()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(MethodError, match="skip_residual"):
        l1_filter.prune(model, images(), skip_residual="yes")
    with pytest.raises(MethodError, match="sensitive"):
        l1_filter.prune(model, images(), sensitive=[3])
    with pytest.raises(DeppruneError, match="not a submodule"):
        l1_filter.prune(model, images(), sensitive=[nn.Linear(2, 2)])
    with pytest.raises(DeppruneError, match="ratio"):
        l1_filter.prune(model, images(), ratio=1.5)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
