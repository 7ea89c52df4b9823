"""Scores comparable across groups: a base importance to LAMP scores in [0, 1].

:func:`lamp` rescales a group's scores so that one global threshold fits
every group (Lee et al. 2021, "Layer-adaptive Sparsity for the
Magnitude-based Pruning"): ``depprune.make_plan(..., global_ranking=True)``
ranks its raw scores, without dividing each group's by their mean.

>>> import torch, depprune
>>> from depprune.importance import ScoreContext, lamp
>>> eqs = depprune.AxisEquations()
>>> eqs.param("w", 0, eqs.axis(3))
>>> graph = eqs.solve()
>>> ctx = ScoreContext(graph, {"w": torch.nn.Parameter(torch.tensor([[1.0], [2.0], [2.0]]))})
>>> lamp()(graph.groups[0], ctx).tolist()  # 1 / (1 + 4 + 4), then 4 / (4 + 4) for both ties
[0.1111111119389534, 0.5, 0.5]
"""

from __future__ import annotations

import torch

from depprune.errors import ImportanceError
from depprune.graph import Group
from depprune.importance.context import _META_MESSAGE, Importance, ScoreContext
from depprune.importance.weights import magnitude

__all__ = ["lamp"]


def lamp(base: Importance | None = None) -> Importance:
    """LAMP: each unit's squared base score over the sum of those not below it.

    Within a group, unit u scores ``s_u**2 / sum(s_v**2 for every v with
    s_v**2 >= s_u**2)``, where ``s`` is ``base`` (L2 magnitude of the unit's
    slices by default, as in the paper). The weakest unit is compared with
    the whole group and the strongest with itself (it scores 1), so a score
    says how much of what is left a unit carries, whatever the group's scale;
    tied units share one score (each counts the others as not below it), and
    selection then removes the lower-numbered first. The returned callable has
    ``globally_comparable = True``: under ``global_ranking=True`` make_plan
    ranks its scores raw.

    >>> import torch, depprune
    >>> from depprune.importance import lamp
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
    ...                             torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> plan = depprune.make_plan(model, torch.randn(2, 8), ratio=0.5, importance=lamp(),
    ...                           global_ranking=True)
    >>> sum(choice.size - choice.kept for choice in plan.groups)  # half of all 32 units
    16
    """
    base = magnitude(2) if base is None else base
    if not callable(base):
        raise ImportanceError(
            f"lamp's base must be an importance callable (group, ctx) -> scores, such as "
            f"depprune.importance.magnitude(2); got {type(base).__name__}"
        )

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        values = base(group, ctx)
        if not isinstance(values, torch.Tensor) or values.shape != (group.size,):
            raise ImportanceError(
                f"lamp's base returned {getattr(values, 'shape', type(values).__name__)} for "
                f"group {group.index}; it must return a tensor of shape ({group.size},)"
            )
        if values.is_meta:
            raise ImportanceError(_META_MESSAGE)
        return _lamp_scores(values.detach().float())

    score.__name__ = "lamp"
    score.globally_comparable = True  # type: ignore[attr-defined]
    return score


def _lamp_scores(values: torch.Tensor) -> torch.Tensor:
    """LAMP of one group's base scores: sort, reverse cumulative sum, scatter back."""
    squares = values.square()
    order = torch.argsort(squares, stable=True)
    ascending = squares[order]
    # tail[i]: the sum of the i-th smallest square and every one after it.
    tail = ascending.flip(0).cumsum(0).flip(0)
    # Tied squares all count each other: every one takes the tail of the first of them.
    _, tie, tie_sizes = torch.unique_consecutive(ascending, return_inverse=True, return_counts=True)
    first_of_tie = tie_sizes.cumsum(0) - tie_sizes
    denominator = tail[first_of_tie[tie]]
    # A zero denominator means every square from here on is zero: score 0, removed first.
    ranked = ascending / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    scores = torch.empty_like(ranked)
    scores[order] = ranked
    return scores
