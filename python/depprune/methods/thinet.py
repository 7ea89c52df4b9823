"""ThiNet (Luo et al., ICCV 2017), scoring to apply: a model and calibration batches in,
channels chosen by the next layers' reconstruction error, consumer weights refit, report out.

A group's units are removed greedily: each step removes the unit whose
removal adds least to the squared error of the next layers' outputs, the
squared sum of the removed units' contributions over every calibration output
entry. With the contribution Gram ``M``
(:func:`~depprune.methods.reconstruction.unit_contribution_gram`) the error
of a removed set ``T`` is ``1_T^T M 1_T``, so removing ``c`` next adds
``2 (M 1_T)_c + M_cc``: one vector update per step. The removal order of all
units is the ranking, so the choice for every ratio is nested. ThiNet's
channel scaling is generalised to least squares on the kept input columns of
each consumer weight (with the constant term folded into its bias), see
:func:`~depprune.methods.reconstruction.least_squares`. Unlike the paper,
which samples output entries, the Gram sums over every entry of every
calibration batch.

>>> import torch
>>> gram = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, -1.0, 2.0]])
>>> greedy_removal_order(gram).tolist()  # unit 1 is cheapest, then 2 (it cancels 1)
[1, 2, 0]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from depprune.api import PruneReport
from depprune.errors import MethodError
from depprune.methods.reconstruction import (
    DEFAULT_MEMORY_BUDGET,
    CalibrationStatistics,
    ReconstructionImportance,
    prune_by_reconstruction,
)

__all__ = ["greedy_removal_order", "prune", "thinet_importance", "thinet_scores"]


def greedy_removal_order(gram: torch.Tensor) -> torch.Tensor:
    """Every unit in ThiNet's greedy removal order (first removed first).

    ``gram`` is the units' contribution Gram ``M`` (symmetric, PSD). Step ``t``
    removes the unit minimising ``1_T^T M 1_T`` over the removed set ``T``
    grown by it; ties go to the lowest index. One step per unit, each a vector
    update: ``O(units^2)`` in all.

    >>> greedy_removal_order(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist()
    [1, 2, 0]
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise MethodError(
            f"the contribution Gram must be a square matrix; got shape {tuple(gram.shape)}"
        )
    gram = gram.to(torch.float64)
    size = gram.shape[0]
    diagonal = torch.diagonal(gram).clone()
    # Twice the cross terms with the removed set, (M 1_T)_c, updated one column per step.
    cross = torch.zeros(size, dtype=torch.float64, device=gram.device)
    removed = torch.zeros(size, dtype=torch.bool, device=gram.device)
    order = torch.empty(size, dtype=torch.long, device=gram.device)
    for step in range(size):
        added = (2 * cross + diagonal).masked_fill(removed, float("inf"))
        chosen = torch.argmin(added)
        order[step] = chosen
        removed[chosen] = True
        cross += gram[:, chosen]
    return order


def thinet_scores(gram: torch.Tensor) -> torch.Tensor:
    """One score per unit: its step in :func:`greedy_removal_order` (lowest removed first).

    >>> thinet_scores(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).tolist()
    [2.0, 0.0, 1.0]
    """
    order = greedy_removal_order(gram)
    scores = torch.empty(order.numel(), dtype=torch.float32, device=order.device)
    scores[order] = torch.arange(order.numel(), dtype=torch.float32, device=order.device)
    return scores


def thinet_importance(statistics: CalibrationStatistics) -> ReconstructionImportance:
    """An Importance for :func:`depprune.make_plan` that ranks units by ThiNet's greedy order.

    ``statistics`` come from
    :func:`~depprune.methods.reconstruction.collect_input_statistics` on the
    groups' consumer weights; groups without a supported consumer rank by L1
    magnitude (the reason is in the importance's ``notes``).

    >>> import torch, depprune
    >>> from depprune.methods.reconstruction import collect_input_statistics
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1))
    >>> stats = collect_input_statistics(model, [torch.randn(8, 2)], ["1.weight"],
    ...                                  progress=False)
    >>> plan = depprune.make_plan(model, torch.zeros(1, 2), importance=thinet_importance(stats),
    ...                           progress=False)
    >>> plan.groups[0].kept
    2
    """
    return ReconstructionImportance(statistics, thinet_scores, "thinet")


def prune(
    model: nn.Module,
    example_inputs: Any,
    calibration: Iterable[Any],
    *,
    ratio: float = 0.5,
    reconstruct: bool = True,
    progress: bool | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ridge: float = 1e-6,
    count_macs: bool = True,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    **plan_options: Any,
) -> PruneReport:
    """Prune ``model`` in place with ThiNet; returns a :class:`depprune.PruneReport`.

    Input Grams of every consumer are collected on the original model over
    ``calibration`` (batches of model inputs; at most ``memory_budget`` bytes of
    Grams per pass), units are ranked by :func:`greedy_removal_order`,
    :func:`depprune.make_plan` removes ``ratio`` of each group (``plan_options``:
    ``ratios``, ``ignored``, ``round_to``, ``min_units``, ``global_ranking``,
    ``kinds``, ``uniform``, ``strict``), and with ``reconstruct`` each consumer's
    kept columns are refit by least squares (``ridge`` relative to the mean
    diagonal). Everything is computed before the cut, so on any error the model is
    left as it was. ``progress=False`` silences the progress bars.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> report = prune(model, torch.zeros(1, 4), [torch.randn(32, 4)], ratio=0.25,
    ...                progress=False)
    >>> model[0].out_features, report.notes
    (6, [])
    """
    return prune_by_reconstruction(
        "thinet",
        thinet_scores,
        model,
        example_inputs,
        calibration,
        ratio=ratio,
        reconstruct=reconstruct,
        progress=progress,
        memory_budget=memory_budget,
        ridge=ridge,
        count_macs=count_macs,
        optimizers=optimizers,
        **plan_options,
    )
