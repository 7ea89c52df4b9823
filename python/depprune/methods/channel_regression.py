"""Regression-based feature reconstruction (He, Zhang & Sun, ICCV 2017), scoring to apply:
a model and calibration batches in, channels chosen by LASSO, consumer weights refit, report out.

A coefficient ``beta_c`` per unit scales its contribution ``Z_c`` to the next
layers' output ``Y = sum_c Z_c``; LASSO
``min ||Y - sum_c beta_c Z_c||^2 + lambda ||beta||_1`` drives coefficients
to zero as ``lambda`` grows, and ``lambda`` is driven to leave exactly the
number of units to keep (:func:`lasso_select`). In the Gram form the
objective is ``beta^T M beta - 2 beta^T M 1 + const + lambda |beta|_1`` with
the contribution Gram ``M``
(:func:`~depprune.methods.reconstruction.unit_contribution_gram`), solved
by FISTA for many ``lambda`` at once (one matmul per iteration, no loop over
units). The least squares of the consumer weights on the kept columns
follows (:func:`~depprune.methods.reconstruction.least_squares`).

The ranking given to :func:`depprune.make_plan` follows the exact ``lambda``
path, traced by homotopy (:func:`lasso_path_entries`): a unit scores the
``lambda`` from which it stays selected down to 0 (:func:`lasso_path_scores`),
so the ``k`` highest are the LASSO selection with ``k`` units wherever the path
only ever adds units, and the choices are nested. Paths of strongly correlated
channels also drop units on the way, so :func:`prune` then selects every cut
group at its exact keep count with :func:`lasso_select`, an independent solver.

>>> import torch
>>> gram = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
>>> lasso_select(gram, 2).tolist()
[0, 2]
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

__all__ = [
    "lasso_coefficients",
    "lasso_path_entries",
    "lasso_path_scores",
    "lasso_select",
    "prune",
    "regression_importance",
]

#: Ridge on the normalised Gram that makes the homotopy path unique (collinear units).
_PATH_RIDGE = 1e-9
#: Homotopy steps allowed per unit (units may leave and join again), and steps between
#: refactorisations of the selected block's inverse.
_PATH_STEPS_PER_UNIT = 4
_PATH_REFRESH = 64

#: Multisection of lambda for an exact keep count: points per round and rounds.
_SECTION_POINTS = 16
_SECTION_ROUNDS = 5


def _normalised(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gram`` in float64 scaled to largest eigenvalue 1, and its ``M 1`` (the fit target)."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise MethodError(
            f"the contribution Gram must be a square matrix; got shape {tuple(gram.shape)}"
        )
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2
    largest = float(torch.linalg.eigvalsh(gram)[-1]) if gram.numel() else 0.0
    if largest > 0:
        gram = gram / largest
    return gram, gram.sum(dim=1)


def _lambda_max(gram: torch.Tensor) -> float:
    """The smallest ``lambda`` at which every coefficient is zero, for a normalised Gram."""
    return 2 * float(gram.sum(dim=1).abs().max()) if gram.numel() else 0.0


def lasso_coefficients(
    gram: torch.Tensor,
    penalties: torch.Tensor,
    *,
    iterations: int = 3000,
    tolerance: float = 1e-10,
    largest_eigenvalue: float | None = None,
) -> torch.Tensor:
    """LASSO coefficients for every penalty at once: ``(units, len(penalties))``.

    Minimises ``beta^T M beta - 2 beta^T M 1 + lambda |beta|_1`` (the Gram form of
    ``||sum_c Z_c - sum_c beta_c Z_c||^2 + lambda ||beta||_1``) by FISTA with
    adaptive restart, every column its own ``lambda``, from ``beta = 0``; one
    matmul with the Gram per iteration. The step is the inverse of the gradient's
    Lipschitz constant, ``2 largest_eigenvalue`` (computed when not given); the
    solver stops when no coefficient moves by more than ``tolerance``.

    >>> import torch
    >>> beta = lasso_coefficients(torch.eye(2), torch.tensor([0.0, 1.0, 3.0]))
    >>> beta.round(decimals=6).tolist()
    [[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    """
    gram = gram.to(torch.float64)
    penalties = torch.as_tensor(penalties, dtype=torch.float64, device=gram.device).reshape(1, -1)
    target = gram.sum(dim=1, keepdim=True)
    largest = largest_eigenvalue
    if largest is None:
        largest = float(torch.linalg.eigvalsh((gram + gram.T) / 2)[-1]) if gram.numel() else 0.0
    step = 1.0 / (2 * largest) if largest > 0 else 1.0
    beta = torch.zeros(gram.shape[0], penalties.shape[1], dtype=torch.float64, device=gram.device)
    if largest <= 0:
        return beta
    momentum = beta.clone()
    speed = torch.ones_like(penalties)
    threshold = step * penalties
    for iteration in range(iterations):
        descent = momentum - step * 2 * (gram @ momentum - target)
        new = torch.sign(descent) * (descent.abs() - threshold).clamp_min(0)
        # Restart a column's momentum when it points uphill (O'Donoghue and Candes).
        uphill = ((momentum - new) * (new - beta)).sum(dim=0, keepdim=True) > 0
        next_speed = torch.where(
            uphill, torch.ones_like(speed), (1 + (1 + 4 * speed**2).sqrt()) / 2
        )
        weight = torch.where(uphill, torch.zeros_like(speed), (speed - 1) / next_speed)
        change = new - beta
        momentum = new + weight * change
        beta, speed = new, next_speed
        # Checking only now and then keeps the loop free of device syncs on a GPU.
        if iteration % 25 == 24 and float(change.abs().max()) <= tolerance:
            break
    return beta


def _contribution_sizes(gram: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(gram).clamp_min(0).sqrt()


def lasso_path_entries(gram: torch.Tensor) -> torch.Tensor:
    """The ``lambda`` (over ``lambda_max``) at which each unit last joins the LASSO solution.

    Follows the exact solution path from ``lambda_max`` to 0 by homotopy (LARS
    with the LASSO drop rule, Efron et al. 2004): between events the selected
    coefficients move linearly in ``lambda``, so each step computes, for every
    unit at once, when its residual correlation reaches ``lambda`` (it joins)
    or its coefficient reaches zero (it leaves), and jumps to the first such
    event. One step per event (about one per unit, like ThiNet's greedy
    steps), each a few vectorised products with the Gram; the inverse of the
    selected block is updated in place. A ``1e-9`` ridge on the normalised Gram
    makes the path unique when contributions are collinear. Units still
    unselected at ``lambda = 0`` (they contribute nothing) get 0.

    >>> import torch
    >>> lasso_path_entries(torch.diag(torch.tensor([4.0, 1.0, 2.0]))).tolist()
    [1.0, 0.25, 0.5]
    """
    gram, target = _normalised(gram)
    size = gram.shape[0]
    entries = torch.zeros(size, dtype=torch.float64, device=gram.device)
    top = _lambda_max(gram)
    if top <= 0:
        return entries
    gram = gram + _PATH_RIDGE * torch.eye(size, dtype=gram.dtype, device=gram.device)
    correlation = 2 * target
    penalty = top
    beta = torch.zeros(size, dtype=torch.float64, device=gram.device)
    first = int(torch.argmax(correlation.abs()))
    active = [first]
    signs = torch.sign(correlation[[first]])
    inverse = 1 / gram[[first]][:, [first]]
    entries[first] = 1.0
    just_left = -1
    for step in range(_PATH_STEPS_PER_UNIT * size):
        index = torch.tensor(active, device=gram.device)
        # d(beta_A) / d(decrease of lambda), and how fast every unit's correlation falls.
        direction = 0.5 * inverse @ signs
        slope = 2 * gram[:, index] @ direction
        outside = torch.ones(size, dtype=torch.bool, device=gram.device)
        outside[index] = False
        if just_left >= 0:
            outside[just_left] = False  # it sits on the boundary it just crossed
        joins = torch.full((size,), float("inf"), dtype=torch.float64, device=gram.device)
        for numerator, denominator in (
            (penalty - correlation, 1 - slope),
            (penalty + correlation, 1 + slope),
        ):
            when = numerator.clamp_min(0) / denominator
            valid = outside & (denominator > 1e-12)
            joins = torch.where(valid, torch.minimum(joins, when), joins)
        leaves = -beta[index] / direction
        leaves = torch.where(leaves > 1e-15 * top, leaves, torch.full_like(leaves, float("inf")))
        join_at, joiner = (float(v) for v in torch.min(joins, dim=0))
        leave_at, leaver = (
            (float(v) for v in torch.min(leaves, dim=0)) if active else (float("inf"), 0)
        )
        jump = min(join_at, leave_at, penalty)
        beta[index] += jump * direction
        correlation = correlation - jump * slope
        penalty -= jump
        if penalty <= 1e-12 * top:
            break
        just_left = -1
        if leave_at <= join_at:
            position = int(leaver)
            unit = active.pop(position)
            beta[unit] = 0.0
            entries[unit] = 0.0
            keep = torch.arange(len(active) + 1, device=gram.device)
            keep = keep[keep != position]
            pivot = inverse[position, position]
            column = inverse.index_select(0, keep)[:, position]
            inverse = inverse.index_select(0, keep).index_select(1, keep)
            inverse -= torch.outer(column, column) / pivot
            signs = signs[keep]
            just_left = unit
        else:
            unit = int(joiner)
            block_column = gram[index, unit]
            projected = inverse @ block_column
            schur = gram[unit, unit] - block_column @ projected
            grown = inverse.new_empty((len(active) + 1, len(active) + 1))
            grown[:-1, :-1] = inverse + torch.outer(projected, projected) / schur
            grown[:-1, -1] = grown[-1, :-1] = -projected / schur
            grown[-1, -1] = 1 / schur
            inverse = grown
            active.append(unit)
            signs = torch.cat([signs, torch.sign(correlation[[unit]])])
            entries[unit] = penalty / top
        if step % _PATH_REFRESH == _PATH_REFRESH - 1 and active:
            # Rank-one updates drift: refactor the selected block now and then.
            index = torch.tensor(active, device=gram.device)
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram[index][:, index]))
    return entries


def lasso_path_scores(gram: torch.Tensor) -> torch.Tensor:
    """One score per unit from the LASSO path: the ``lambda`` from which it stays selected.

    :func:`lasso_path_entries`, with ties among units that never join broken by
    the size of their contribution ``sqrt(M_cc)``. Where the path only ever
    adds units, the ``k`` highest are exactly the LASSO selection with ``k``
    units (what :func:`lasso_select` finds). Lowest is removed first.

    >>> import torch
    >>> lasso_path_scores(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).argsort().tolist()
    [1, 2, 0]
    """
    entries = lasso_path_entries(gram)
    sizes = _contribution_sizes(gram.to(torch.float64))
    tie = sizes / (float(sizes.max()) + 1) if sizes.numel() else sizes
    return (entries + 1e-6 * tie).float()


def _keep_top(gram: torch.Tensor, beta: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` units with the largest scaled coefficients, unselected ones last."""
    sizes = _contribution_sizes(gram)
    selected = beta != 0
    magnitude = beta.abs() * sizes
    key = torch.where(
        selected,
        2 + magnitude / (float(magnitude.max()) + 1e-300),
        sizes / (float(sizes.max()) + 1e-300),
    )
    return torch.sort(torch.topk(key, keep).indices).values


def lasso_select(gram: torch.Tensor, keep: int) -> torch.Tensor:
    """Units kept by LASSO with ``lambda`` driven until exactly ``keep`` are selected.

    ``lambda`` is searched in log space between 0 and ``lambda_max``, a grid of
    points solved together per round, narrowing to the bracket where the count
    of non-zero coefficients crosses ``keep``. When no ``lambda`` gives exactly
    ``keep`` (units leaving together), the ``lambda`` with the fewest selected
    above ``keep`` is used and its largest scaled coefficients
    ``|beta_c| sqrt(M_cc)`` are kept; fewer selected than ``keep`` even near
    ``lambda = 0`` (units that contribute nothing) are topped up by
    ``sqrt(M_cc)``. Returns sorted unit ids.

    >>> import torch
    >>> lasso_select(torch.diag(torch.tensor([3.0, 1.0, 2.0])), 1).tolist()
    [0]
    """
    gram, _ = _normalised(gram)
    size = gram.shape[0]
    if not isinstance(keep, int) or not 0 <= keep <= size:
        raise MethodError(f"keep is {keep!r}; give a unit count in [0, {size}]")
    if keep == size:
        return torch.arange(size, device=gram.device)
    top = _lambda_max(gram)
    if keep == 0 or top <= 0:
        return _keep_top(gram, torch.zeros(size, dtype=torch.float64, device=gram.device), keep)
    high, low = top, top * 1e-8
    fallback: tuple[int, torch.Tensor] | None = None
    for _ in range(_SECTION_ROUNDS):
        grid = torch.logspace(
            torch.log10(torch.tensor(high)),
            torch.log10(torch.tensor(low)),
            _SECTION_POINTS,
            dtype=torch.float64,
        ).to(gram.device)
        beta = lasso_coefficients(gram, grid, largest_eigenvalue=1.0)
        counts = (beta != 0).sum(dim=0)
        exact = torch.nonzero(counts == keep).reshape(-1)
        if exact.numel():
            return torch.sort(torch.nonzero(beta[:, exact[0]]).reshape(-1)).values
        over = torch.nonzero(counts > keep).reshape(-1)
        if not over.numel():
            # Even the smallest lambda selects fewer: the rest contribute nothing.
            return _keep_top(gram, beta[:, -1], keep)
        first = int(over[0])
        if fallback is None or int(counts[first]) < fallback[0]:
            fallback = (int(counts[first]), beta[:, first])
        if first == 0:
            break
        high, low = float(grid[first - 1]), float(grid[first])
    assert fallback is not None
    return _keep_top(gram, fallback[1], keep)


def regression_importance(statistics: CalibrationStatistics) -> ReconstructionImportance:
    """An Importance for :func:`depprune.make_plan` that ranks units along the LASSO path.

    Scores are :func:`lasso_path_scores` of each group's contribution Gram;
    groups without a supported consumer rank by L1 magnitude (the reason is in
    the importance's ``notes``).

    >>> import torch, depprune
    >>> from depprune.methods.reconstruction import collect_input_statistics
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1))
    >>> stats = collect_input_statistics(model, [torch.randn(8, 2)], ["1.weight"],
    ...                                  progress=False)
    >>> plan = depprune.make_plan(model, torch.zeros(1, 2),
    ...                           importance=regression_importance(stats), progress=False)
    >>> plan.groups[0].kept
    2
    """
    return ReconstructionImportance(statistics, lasso_path_scores, "channel_regression")


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
    """Prune ``model`` in place by LASSO channel selection and least squares.

    Input Grams of every consumer are collected on the original model over
    ``calibration`` (batches of model inputs; at most ``memory_budget`` bytes of
    Grams per pass); :func:`depprune.make_plan` ranks units by
    :func:`lasso_path_scores` to fix each group's keep count (``plan_options``:
    ``ratios``, ``ignored``, ``round_to``, ``min_units``, ``global_ranking``,
    ``kinds``, ``uniform``, ``strict``); each cut group then keeps
    :func:`lasso_select`'s units at that count (the plan is remade when that
    differs from the ranking), and with ``reconstruct`` every consumer's kept
    columns are refit by least squares (``ridge`` relative to the mean
    diagonal). Returns a :class:`depprune.PruneReport`; on any error the model
    is left as it was. ``progress=False`` silences the progress bars.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> report = prune(model, torch.zeros(1, 4), [torch.randn(32, 4)], ratio=0.5,
    ...                progress=False)
    >>> model[2].in_features
    4
    """
    return prune_by_reconstruction(
        "channel_regression",
        lasso_path_scores,
        model,
        example_inputs,
        calibration,
        ratio=ratio,
        reconstruct=reconstruct,
        progress=progress,
        memory_budget=memory_budget,
        ridge=ridge,
        refine=lasso_select,
        count_macs=count_macs,
        optimizers=optimizers,
        **plan_options,
    )
