"""Ops whose values depend on positions freeze the dims they depend on, and only those.

Each case is a tiny model, ``Linear(4, 16) -> op -> Linear(16, 3)``, whose
op uses the 16 features. Where the op's values depend on positions along the
features (``arange``, ``tril``, ``cumsum``, sort, ``flip``, ``one_hot``, the
indices of ``argmax``), the features are frozen: no group, and pruning
leaves the model as it was. Where it does not (``softmax`` or ``sum`` over
the features, ``cumsum`` along the batch, constant creation), the features
are one group, and the pruned model computes what the unpruned one computes
with the removed units zeroed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pruning_oracle import assert_same_outputs, outputs, predicted_param_count, zeroed_copy
from torch import nn

import depprune
from depprune.apply import apply_kept_indices

WIDTH = 16
FC1 = {("fc1.weight", 0), ("fc1.bias", 0)}


class Probe(nn.Module):
    """fc1 makes 16 prunable features, ``op`` uses them, fc2 reads 16 features."""

    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, WIDTH)
        self.fc2 = nn.Linear(WIDTH, 3)
        self.op = op

    def forward(self, x, labels=None):
        h = self.fc1(x)
        return self.fc2(self.op(h) if labels is None else self.op(h, labels))


def positions(h: torch.Tensor) -> torch.Tensor:
    return torch.arange(h.shape[-1], device=h.device)


def _pair(h: torch.Tensor) -> torch.Tensor:
    return h.unsqueeze(-1) * h.unsqueeze(-2)


#: Ops whose values depend on positions along the features: the features freeze.
FROZEN = {
    # creation from positions
    "arange": lambda h: h + positions(h),
    "arange_float": lambda h: h * positions(h).float(),
    "linspace": lambda h: torch.linspace(0, 1, h.shape[-1], device=h.device) * h,
    "logspace": lambda h: torch.logspace(0, 1, h.shape[-1], device=h.device) * h,
    "eye": lambda h: h @ (2 * torch.eye(h.shape[-1], device=h.device)),
    "randperm": lambda h: h * torch.randperm(h.shape[-1], device=h.device),
    "tril_indices": lambda h: h + torch.tril_indices(2, 8, 7, device=h.device)[1],
    "triu_indices": lambda h: h + torch.triu_indices(2, 8, -1, device=h.device)[1],
    "hann_window": lambda h: h * torch.hann_window(h.shape[-1], device=h.device),
    # triangular masks over (features, features)
    "tril": lambda h: torch.tril(_pair(h)).sum(-1),
    "triu": lambda h: torch.triu(_pair(h), 1).sum(-2),
    "tril_inplace": lambda h: _pair(h).tril_().sum(-1),
    # scans
    "cumsum": lambda h: h.cumsum(-1),
    "cumprod": lambda h: h.cumprod(-1),
    "logcumsumexp": lambda h: h.logcumsumexp(-1),
    "cummax": lambda h: h.cummax(-1).values,
    "cummin": lambda h: h.cummin(1).values,
    # sorts
    "sort": lambda h: h.sort(-1).values,
    "sort_stable": lambda h: h.sort(stable=True, dim=-1).values,
    "argsort": lambda h: h * h.argsort(-1),
    "msort": lambda h: torch.msort(h.t()).t(),
    "topk": lambda h: h.topk(WIDTH, -1).values,
    # reductions that return positions
    "kthvalue_indices": lambda h: h * h.kthvalue(3, keepdim=True).indices,
    "median_indices": lambda h: h * h.median(-1, keepdim=True).indices,
    "nanmedian_indices": lambda h: h * h.nanmedian(-1).indices[:, None],
    "mode_indices": lambda h: h * h.mode(-1).indices[:, None],
    "max_indices": lambda h: h * h.max(-1).indices[:, None],
    "argmax": lambda h: h * h.argmax(-1, keepdim=True),
    "argmin_flat": lambda h: h * h.argmin(),
    # moving elements
    "flip": lambda h: h.flip(-1),
    "roll": lambda h: torch.roll(h, 1, -1),
    "roll_flat": lambda h: torch.roll(h, 1),
    "rot90": lambda h: torch.rot90(h, 2),
    # positions as values
    "one_hot": lambda h, labels: h * F.one_hot(labels, WIDTH),
    "searchsorted": lambda h: h * torch.searchsorted(h, h),
    "histc_bins": lambda h: h + torch.histc(h, WIDTH, -1, 1),
}

#: Ops that do not depend on positions along the features: the features stay one group.
PRUNABLE = {
    "identity": lambda h: h,
    "softmax": lambda h: F.softmax(h, dim=-1),
    "log_softmax": lambda h: F.log_softmax(h, dim=-1),
    "sum": lambda h: h - h.sum(-1, keepdim=True),
    "amax": lambda h: h - h.amax(-1, keepdim=True),
    "max_all": lambda h: h - h.max(),
    "median_all": lambda h: h - h.median(),
    "cumsum_batch": lambda h: h.cumsum(0),
    "cummax_batch": lambda h: h.cummax(0).values,
    "sort_batch": lambda h: h.sort(0).values,
    "argmax_batch": lambda h: h * h.argmax(0, keepdim=True),
    "flip_batch": lambda h: h.flip(0),
    "roll_batch": lambda h: torch.roll(h, 1, 0),
    "tril_batch": lambda h: torch.tril(h[:, :, None, None].expand(-1, -1, 3, 3)).sum((-1, -2)),
    "arange_batch": lambda h: h * positions(h.t()).unsqueeze(-1),
    "bucketize": lambda h: h * torch.bucketize(h, torch.linspace(-1, 1, 5, device=h.device)),
    "histc_input": lambda h: h * torch.histc(h, 4, -1, 1)[0],
    # constant creation (sized from h, as a literal 16 could not be cut): one value everywhere
    "ones": lambda h: h + torch.ones(h.shape[-1], device=h.device),
    "zeros": lambda h: h + torch.zeros(h.shape[-1], device=h.device),
    "full": lambda h: h * torch.full((h.shape[-1],), 2.0, device=h.device),
    "new_ones": lambda h: h * h.new_ones(h.shape[-1]),
    "empty_filled": lambda h: h * torch.empty(h.shape[-1], device=h.device).fill_(3.0),
    "one_hot_batch": lambda h, labels: h * F.one_hot(labels % 2, 2).sum(0, keepdim=True).t(),
}

#: Values over the whole feature set (like a norm): cutting features changes them, so the
#: zeroed copy is no oracle there (zeros join the max, the softmax, the counts).
OVER_THE_FEATURES = {"softmax", "log_softmax", "amax", "max_all", "median_all", "histc_input"}


def inputs_for(op) -> tuple:
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    if op.__code__.co_argcount == 2:
        return (x, torch.tensor([3, 1]))
    return (x,)


def grouped(graph) -> set[tuple[str, int]]:
    return {member for group in graph.groups for member in group.members}


def test_every_case_is_listed_once():
    assert not set(FROZEN) & set(PRUNABLE)


@pytest.mark.parametrize("case", sorted(FROZEN))
def test_position_dependent_ops_freeze_the_features(case):
    op = FROZEN[case]
    graph = depprune.trace(Probe(op), inputs_for(op))
    assert graph.unsupported_ops == {}
    assert not [n for n in graph.notes if "rule failed" in n], graph.notes
    assert not FC1 & grouped(graph), [(g.size, g.members) for g in graph.groups]


@pytest.mark.parametrize("case", sorted(PRUNABLE))
def test_position_free_ops_keep_the_features_prunable(case):
    op = PRUNABLE[case]
    graph = depprune.trace(Probe(op), inputs_for(op))
    assert graph.unsupported_ops == {}
    [group] = graph.groups
    assert group.size == WIDTH
    assert set(group.members) == FC1 | {("fc2.weight", 1)}


@pytest.mark.parametrize("case", sorted(FROZEN))
def test_pruning_a_frozen_model_changes_nothing(case):
    op = FROZEN[case]
    if case == "randperm":
        pytest.skip("a random permutation differs between the two forward passes")
    example = inputs_for(op)
    model = Probe(op).eval()
    before = outputs(model, example)
    params = sum(p.numel() for p in model.parameters())
    report = depprune.prune(model, example, ratio=0.5, count_macs=False)
    assert report.params_before == report.params_after == params == 4 * 16 + 16 + 16 * 3 + 3
    assert model.fc1.out_features == model.fc2.in_features == WIDTH
    assert_same_outputs(before, outputs(model, example), atol=0)


@pytest.mark.parametrize("case", sorted(PRUNABLE))
def test_cutting_position_free_ops_is_exact(case):
    """Every other feature removed (the rules' claim, without selection or the replay)."""
    op = PRUNABLE[case]
    example = inputs_for(op)
    model = Probe(op).eval()
    graph = depprune.trace(model, example)
    removed = {0: np.arange(0, WIDTH, 2)}
    expected = outputs(zeroed_copy(model, graph, removed), example)
    kept = graph.kept_indices(removed)
    assert predicted_param_count(model, kept) == 4 * 8 + 8 + 8 * 3 + 3
    apply_kept_indices(model, kept)
    assert sum(p.numel() for p in model.parameters()) == 4 * 8 + 8 + 8 * 3 + 3
    assert model.fc1.out_features == model.fc2.in_features == WIDTH // 2
    got = outputs(model, example)
    if case in OVER_THE_FEATURES:
        assert [t.shape for t in got] == [t.shape for t in expected]
        return
    assert_same_outputs(expected, got)
