"""depprune: exact, fast structural pruning of PyTorch models.

>>> import depprune
>>> eqs = depprune.AxisEquations()
>>> hidden = eqs.axis(4)
>>> eqs.param("fc.weight", 0, hidden)
>>> [g.size for g in eqs.solve().groups]
[4]
"""

from depprune.api import PruneReport, make_plan, prune, trace
from depprune.equations import AxisEquations
from depprune.errors import (
    CheckpointError,
    ConfigWarning,
    DeppruneError,
    ImportanceError,
    InternalError,
    InvalidEquationsError,
    InvalidPlanError,
    MethodError,
    PlanMismatchError,
    ResourceError,
    SelectionError,
    TraceError,
    UnsupportedOpError,
)
from depprune.from_scratch import scratch, scratch_budget, scratch_from_plan
from depprune.graph import DependencyGraph, Group
from depprune.plan import Plan

__all__ = [
    "AxisEquations",
    "CheckpointError",
    "ConfigWarning",
    "DependencyGraph",
    "DeppruneError",
    "Group",
    "ImportanceError",
    "InternalError",
    "InvalidEquationsError",
    "InvalidPlanError",
    "MethodError",
    "Plan",
    "PlanMismatchError",
    "PruneReport",
    "ResourceError",
    "SelectionError",
    "TraceError",
    "UnsupportedOpError",
    "make_plan",
    "prune",
    "scratch",
    "scratch_budget",
    "scratch_from_plan",
    "trace",
]

__version__ = "0.1.0"
