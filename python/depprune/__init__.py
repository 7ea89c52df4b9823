"""depprune: exact, fast structural pruning of PyTorch models.

>>> import depprune
>>> eqs = depprune.AxisEquations()
>>> hidden = eqs.axis(4)
>>> eqs.param("fc.weight", 0, hidden)
>>> [g.size for g in eqs.solve().groups]
[4]
"""

from depprune.equations import AxisEquations
from depprune.errors import (
    DeppruneError,
    InternalError,
    InvalidEquationsError,
    InvalidPlanError,
)
from depprune.graph import DependencyGraph, Group

__all__ = [
    "AxisEquations",
    "DependencyGraph",
    "DeppruneError",
    "Group",
    "InternalError",
    "InvalidEquationsError",
    "InvalidPlanError",
]

__version__ = "0.1.0"
