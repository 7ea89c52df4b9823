"""io stage, on the command line: what inspect and plan show, as JSON-ready data.

Rows of layers (repeated blocks condensed) and of groups, and the summaries of
a model, a plan and a plan file that ``inspect --json`` prints and the tables
of :mod:`depprune.cli.tables` show; tested without a terminal.

>>> import torch, depprune
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
>>> [row.module for row in layer_rows(model)], _params(model)
(['0', '2'], 13)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LayerRow", "group_rows", "layer_rows"]


@dataclass(frozen=True)
class LayerRow:
    """Modules with the same type and parameter shapes, their indices condensed."""

    #: The module name with each repeated index condensed, e.g. ``layers.{0-31}.mlp``.
    module: str
    type: str
    #: (parameter name, shape) of every parameter the module holds itself.
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    #: How many modules the row stands for.
    count: int
    #: Parameters of those modules (a tensor tied to an earlier one is not counted again).
    params: int


def layer_rows(model: Any) -> list[LayerRow]:
    """The modules that hold parameters, repeated blocks condensed into one row each.

    >>> import torch
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)], torch.nn.Linear(4, 2))
    >>> for row in layer_rows(model):
    ...     print(row.module, row.type, row.tensors, row.count, row.params)
    {0-2} Linear (('weight', (4, 4)), ('bias', (4,))) 3 60
    3 Linear (('weight', (2, 4)), ('bias', (2,))) 1 10
    """
    rows: dict[tuple, list] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        tensors = tuple(
            (attr, tuple(param.shape)) for attr, param in module.named_parameters(recurse=False)
        )
        if not tensors:
            continue
        fresh = 0
        for param in module.parameters(recurse=False):
            fresh += 0 if id(param) in seen else param.numel()
            seen.add(id(param))
        parts = name.split(".") if name else []
        template = tuple("#" if part.isdigit() else part for part in parts)
        numbers = tuple(int(part) for part in parts if part.isdigit())
        key = (template, type(module).__name__, tensors)
        row = rows.setdefault(key, [[], 0])
        row[0].append(numbers)
        row[1] += fresh
    result = []
    for (template, type_name, tensors), (numbers, params) in rows.items():
        columns = iter(zip(*numbers, strict=True)) if numbers and numbers[0] else iter(())
        parts = [
            part if part != "#" else _condensed(sorted(set(next(columns)))) for part in template
        ]
        result.append(
            LayerRow(".".join(parts) or "(model)", type_name, tensors, len(numbers), params)
        )
    return result


def _condensed(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``{0-2,5}``; one value as itself."""
    if len(values) == 1:
        return str(values[0])
    runs: list[str] = []
    start = previous = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return "{" + ",".join(runs) + "}"


def group_rows(graph: Any, macs: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """One dict per group: index, kind, units, params per unit, MACs per unit, members.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> group_rows(depprune.trace(model, torch.zeros(1, 2)))
    [{'index': 0, 'kind': 'neurons', 'units': 3, 'params_per_unit': 4, 'macs_per_unit': None, \
'members': [['0.weight', 0], ['0.bias', 0], ['2.weight', 1]]}]
    """
    return [
        {
            "index": g.index,
            "kind": g.kind,
            "units": g.size,
            "params_per_unit": g.params_per_unit,
            "macs_per_unit": (macs or {}).get(g.index),
            "members": [[name, dim] for name, dim in g.members],
        }
        for g in graph.groups
    ]


def _model_summary(resolved: Any, graph: Any, macs: dict[int, int] | str) -> dict[str, Any]:
    import torch

    inputs = resolved.example_inputs
    tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
    shapes = {
        name: list(t.shape)
        for name, t in zip(inputs if isinstance(inputs, dict) else ["input"], tensors, strict=True)
        if isinstance(t, torch.Tensor)
    }
    by_kind: dict[str, int] = {}
    for g in graph.groups:
        by_kind[g.kind or "-"] = by_kind.get(g.kind or "-", 0) + g.size
    return {
        "name": resolved.name,
        "source": resolved.source,
        "class": type(resolved.model).__name__,
        "inputs": shapes,
        "macs": macs if isinstance(macs, dict) else f"{macs}",
        "groups": group_rows(graph, macs if isinstance(macs, dict) else None),
        "layers": [
            {**vars(row), "tensors": [[n, list(s)] for n, s in row.tensors]}
            for row in layer_rows(resolved.model)
        ],
        "frozen": {
            "unsupported_ops": dict(graph.unsupported_ops),
            "notes": list(graph.notes),
            "conflicts": len(graph.conflicts),
        },
        "totals": {
            "params": _params(resolved.model),
            "groups": len(graph.groups),
            "units": graph.num_units,
            "units_by_kind": by_kind,
        },
    }


def _params(model: Any) -> int:
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def _plan_summary(
    plan: Any, params_before: int | None = None, params_after: int | None = None
) -> dict[str, Any]:
    """``plan.summary()`` (what a plan file records), counts filled in where it has none."""
    summary = plan.summary()
    totals = summary["totals"]
    if totals.get("params_before") is None:
        totals["params_before"], totals["params_after"] = params_before, params_after
    return summary


def _plan_file_summary(path: Path) -> dict[str, Any]:
    """What a plan file cuts: its summary.json, read without loading the plan's arrays."""
    from depprune.errors import InvalidPlanError
    from depprune.plan import Plan, read_summary

    if not path.is_file():
        raise FileNotFoundError(2, "no such plan file", os.fspath(path))
    try:
        return read_summary(path)
    except InvalidPlanError:
        # A version-1 file has no summary.json; loading it says what else may be wrong.
        return _plan_summary(Plan.load(path))
