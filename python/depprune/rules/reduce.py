"""Reductions over dims: kept dims pass through, reduced dims relate nothing.

A reduced axis is not cut by the reduction: pruning it changes the value
(the mean of fewer elements), the way pruning a normalised axis does, and
the output no longer has it (or has a fresh size-1 dim with ``keepdim``).
A reduction that returns indices (``argmax``, ``max(dim)``, ``median(dim)``,
``mode``, ``kthvalue``) answers with positions along the reduced dims, which
change when they are cut: those dims are frozen. Sorts and scans keep the dim
and are in :mod:`depprune.rules.position`.

>>> import torch
>>> from depprune.tracer import record
>>> record(lambda x: x.mean(dim=1), torch.zeros(2, 3)).num_ops
1
"""

from __future__ import annotations

from typing import Any

from depprune.equations import AxisEquations
from depprune.rules.common import OpCall, freeze_axes, normalize_dim
from depprune.rules.elementwise import elementwise

__all__ = ["RULES_BY_NAME"]


def _reduced_dims(call: OpCall, ndim: int) -> set[int]:
    dims = call.arg_or_default("dim")
    if dims is None or (type(dims) in (list, tuple) and len(dims) == 0):
        return set(range(ndim))
    if type(dims) is int:
        dims = (dims,)
    return {normalize_dim(d, ndim) for d in dims}


_RETURNS_POSITIONS: dict[Any, bool] = {}


def _returns_positions(func: Any) -> bool:
    """argmax, argmin and every overload returning ``indices`` (``max.dim``, ``mode``)."""
    answer = _RETURNS_POSITIONS.get(func)
    if answer is None:
        names = {r.name for r in func._schema.returns}
        answer = func.overloadpacket.__name__ in ("argmax", "argmin") or "indices" in names
        _RETURNS_POSITIONS[func] = answer
    return answer


def reduction(eqs: AxisEquations, call: OpCall) -> None:
    """sum, mean, amax, var, norm, argmax, ... over ``dim`` with or without ``keepdim``."""
    if call.func._overloadname == "other":
        # max(a, b) / min(a, b): the binary elementwise overloads.
        elementwise(eqs, call)
        return
    x = call.args[0]
    reduced = _reduced_dims(call, len(x))
    if _returns_positions(call.func):
        # The indices are positions along the reduced dims: cutting them changes the answer.
        freeze_axes(eqs, [a for k, a in enumerate(x) if k in reduced])
    kept = [a for k, a in enumerate(x) if k not in reduced]
    for out in call.outputs:
        if out is None:
            continue
        if len(out) == len(x):
            for k, (a, b) in enumerate(zip(x, out, strict=True)):
                if k not in reduced and a != b:
                    eqs.equal(b, a)
        elif len(out) == len(kept):
            for a, b in zip(kept, out, strict=True):
                eqs.equal(b, a)
        else:
            freeze_axes(eqs, x)
            freeze_axes(eqs, out)


RULES_BY_NAME = {
    **dict.fromkeys(
        (
            "sum", "mean", "nansum", "nanmean", "prod", "amax", "amin", "aminmax", "max", "min",
            "argmax", "argmin", "var", "std", "var_mean", "std_mean", "logsumexp", "norm",
            "linalg_vector_norm", "any", "all", "count_nonzero", "median", "nanmedian", "mode",
            "kthvalue",
        ),
        reduction,
    ),
}  # fmt: skip
