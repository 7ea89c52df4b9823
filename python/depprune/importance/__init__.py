"""Importance: one score per unit of a group, computed on the params' device.

Every member (parameter, dim) of a group contributes through its unit map:
one ``scatter_add`` per member, never a Python loop over channels. Buffers
(BatchNorm running statistics, rotary frequencies) never count.

The criteria, one module each: from the weights (:func:`magnitude`,
:func:`batchnorm_scale`, :func:`random`), from gradients (:func:`taylor`,
:func:`taylor_elementwise`, :func:`hessian`), from calibration activations
(:func:`wanda`), by redundancy (:func:`fpgm`), and rescaled to compare
across groups (:func:`lamp`). Any callable ``(group, ctx) -> scores`` is an
:data:`Importance` too.

>>> import torch, depprune
>>> from depprune.importance import ScoreContext, magnitude
>>> eqs = depprune.AxisEquations()
>>> hidden = eqs.axis(3)
>>> eqs.param("w", 0, hidden)
>>> graph = eqs.solve()
>>> w = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [0.0, 3.0], [2.0, 0.0]]))
>>> ctx = ScoreContext(graph, {"w": w})
>>> magnitude(p=1)(graph.groups[0], ctx).tolist()
[2.0, 3.0, 2.0]
"""

from __future__ import annotations

from depprune.errors import ImportanceError

# The modules are named for what they read, never after a function they define,
# so importing one can never hide the function of the same name here.
from depprune.importance.activations import _input_square_sums as _input_square_sums
from depprune.importance.activations import wanda
from depprune.importance.context import _CHUNK_ELEMENTS as _CHUNK_ELEMENTS
from depprune.importance.context import Importance, ScoreContext, score_groups
from depprune.importance.context import Transform as Transform
from depprune.importance.context import _all_dim_sums as _all_dim_sums
from depprune.importance.context import _quiet as _quiet
from depprune.importance.context import _scatter_members as _scatter_members
from depprune.importance.geometric_median import fpgm
from depprune.importance.gradients import hessian, taylor, taylor_elementwise
from depprune.importance.layer_adaptive import lamp
from depprune.importance.weights import batchnorm_scale, magnitude, random

__all__ = [
    "Importance",
    "ImportanceError",
    "ScoreContext",
    "batchnorm_scale",
    "fpgm",
    "hessian",
    "lamp",
    "magnitude",
    "random",
    "score_groups",
    "taylor",
    "taylor_elementwise",
    "wanda",
]
