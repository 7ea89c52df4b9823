"""Axis rules: one small function per ATen op family, in one table.

``RULES`` maps ``torch.ops.aten.*`` overload packets to rules; each rule
turns one recorded call (:class:`~depprune.rules.common.OpCall`) into axis
equations. :func:`rule_for` also accepts any op torch tags ``pointwise``
(those broadcast their inputs) and returns ``None`` for ops with no rule,
whose axes the trace freezes.

To support a new op, write ``rule(eqs, call)`` in the module of its family
and add its name to that module's ``RULES_BY_NAME``.

>>> import torch
>>> from depprune.rules import RULES, rule_for
>>> torch.ops.aten.cat in RULES
True
>>> rule_for(torch.ops.aten.addmm.default).__name__
'addmm'
"""

from __future__ import annotations

from typing import Any

import torch

from depprune.rules import index, linalg, nn, position, reduce, shape
from depprune.rules.common import Adopter, Axes, OpCall, Rule
from depprune.rules.elementwise import (
    CREATION_OPS,
    ELEMENTWISE_OPS,
    NO_AXIS_OPS,
    adopt_broadcast,
    elementwise,
    no_relation,
)

__all__ = ["ADOPTERS", "RULES", "Adopter", "Axes", "OpCall", "Rule", "rule_for"]


def _build() -> dict[Any, Rule]:
    by_name: dict[str, Rule] = {}
    families = [
        dict.fromkeys(ELEMENTWISE_OPS, elementwise),
        dict.fromkeys(CREATION_OPS + NO_AXIS_OPS, no_relation),
        shape.RULES_BY_NAME,
        linalg.RULES_BY_NAME,
        nn.RULES_BY_NAME,
        reduce.RULES_BY_NAME,
        position.RULES_BY_NAME,
        index.RULES_BY_NAME,
    ]
    for family in families:
        for name, rule in family.items():
            if name in by_name:
                raise RuntimeError(f"aten.{name} has two axis rules; keep one")
            by_name[name] = rule
    # Ops this torch build does not have are skipped: the table names ops across versions.
    return {
        packet: rule
        for name, rule in by_name.items()
        if (packet := getattr(torch.ops.aten, name, None)) is not None
    }


#: Axis rule of every ATen op family depprune understands, by overload packet.
RULES: dict[Any, Rule] = _build()

#: For rules whose new outputs can share an input's axes: the tracer's shortcut.
ADOPTERS: dict[Rule, Adopter] = {elementwise: adopt_broadcast, **shape.ADOPTERS}

_POINTWISE = torch.Tag.pointwise


def rule_for(func: Any) -> Rule | None:
    """The rule for one ATen overload, or ``None`` when its axes must be frozen.

    An in-place variant (``hardswish_``) without its own entry uses the rule
    of its out-of-place op: it returns its input, whose axes are reused.
    """
    packet = func.overloadpacket
    rule = RULES.get(packet)
    if rule is None and _POINTWISE in func.tags:
        rule = elementwise
    name = packet.__name__
    if rule is None and name.endswith("_") and not name.endswith("__"):
        base = getattr(torch.ops.aten, name[:-1], None)
        rule = RULES.get(base) if base is not None else None
    return rule
