"""Structural cuts: whole layers and whole experts, which change what the model computes.

A width cut removes units whose zeroing the model ignores, and the replay proves
it op by op. Removing a decoder layer or a routed expert changes the function
(the residual stream skips a block; the router picks among fewer experts), so
these cuts are kept apart in :class:`StructuralCuts` and proved differently: the
whole plan is applied to a meta shadow, whose forward on the example inputs must
run and give outputs of the original shapes and dtypes, and the new config must
rebuild the pruned architecture (:mod:`depprune.apply.containers`).

>>> import torch
>>> model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
>>> cuts = StructuralCuts(children={"": np.array([0, 2])}, sizes={"": 3})
>>> cuts.describe()
['layers of the model: 1 of 3 removed ([1])']
>>> prove_structure(model, cuts, torch.zeros(2, 4), lambda shadow: apply_structure(shadow, cuts))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils import _pytree as pytree

from depprune.apply.containers import drop_with_undo, renamed_after_drop
from depprune.errors import InvalidPlanError, PlanMismatchError

__all__ = [
    "StructuralCuts",
    "apply_structure",
    "prove_structure",
    "renamed",
    "set_config_fields",
]

ParamDim = tuple[str, int]


@dataclass
class StructuralCuts:
    """Children removed from module lists and expert slices removed from tensors."""

    #: Sorted kept positions of every ``nn.ModuleList``/``nn.Sequential`` that loses
    #: children (decoder layers, blocks, per-expert modules), by container name.
    children: dict[str, np.ndarray] = field(default_factory=dict)
    #: Children of each container in :attr:`children` before the cut.
    sizes: dict[str, int] = field(default_factory=dict)
    #: ``(tensor, dim)`` -> kept indices of cuts along an expert axis (router rows, fused
    #: expert tensors), under the names before any child is removed.
    tensors: dict[ParamDim, np.ndarray] = field(default_factory=dict)
    #: Integer module attributes the expert cut sets (``num_experts``), module name -> values.
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Config fields the expert cut sets (``num_local_experts``), on the model's config.
    config: dict[str, int] = field(default_factory=dict)
    #: Expert layers cut: MoE block name -> (experts before, kept expert ids), for reports.
    experts: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.children or self.tensors)

    def describe(self) -> list[str]:
        """One line per container and per expert layer: what goes."""
        lines = []
        for name, kept in self.children.items():
            size = self.sizes[name]
            gone = sorted(set(range(size)) - set(kept.tolist()))
            lines.append(f"layers of {name or 'the model'}: {len(gone)} of {size} removed ({gone})")
        for name, (size, kept) in self.experts.items():
            gone = sorted(set(range(size)) - set(kept.tolist()))
            lines.append(f"experts of {name}: {len(gone)} of {size} removed ({gone})")
        return lines

    def digest(self) -> bytes:
        """Bytes that change with any cut (for the plan's fingerprint)."""
        hasher = hashlib.blake2b(digest_size=16)
        hasher.update(
            json.dumps([self.sizes, self.attributes, self.config], sort_keys=True).encode()
        )
        for name, kept in sorted(self.children.items()):
            hasher.update(f"{name}\0".encode() + np.asarray(kept, np.int64).tobytes())
        for (name, dim), kept in sorted(self.tensors.items()):
            hasher.update(f"{name}\0{dim}\0".encode() + np.asarray(kept, np.int64).tobytes())
        return hasher.digest()

    def validate(self, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        """Kept positions sorted, unique and in range; expert cuts inside their dims."""
        for name, kept in self.children.items():
            size = self.sizes.get(name)
            if size is None:
                raise InvalidPlanError(f"the plan removes children of {name!r} but has no size")
            _check_sorted(kept, size, f"the kept children of {name!r}")
        for (name, dim), kept in self.tensors.items():
            shape = None if shapes is None else shapes.get(name)
            if shapes is not None and (shape is None or not 0 <= dim < len(shape)):
                raise InvalidPlanError(f"the plan cuts experts of {name!r} dim {dim}, unrecorded")
            _check_sorted(kept, None if shape is None else shape[dim], f"{name!r} dim {dim}")

    def params_removed(self, tensors: Mapping[str, Mapping[str, Any]]) -> set[str]:
        """The recorded parameter names that removed children hold."""
        return {n for n in tensors if renamed_after_drop(n, _lists(self.children)) is None}


def _check_sorted(kept: np.ndarray, size: int | None, what: str) -> None:
    if kept.ndim != 1 or kept.size == 0:
        raise InvalidPlanError(f"{what} keeps no index; every cut must keep at least one")
    if kept[0] < 0 or (size is not None and kept[-1] >= size) or np.any(np.diff(kept) <= 0):
        raise InvalidPlanError(
            f"{what} must be sorted, unique and in [0, {size}); the plan file may be corrupt"
        )


def _lists(children: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: [int(i) for i in kept] for name, kept in children.items()}


def renamed(cuts: StructuralCuts, names: Iterable[str]) -> dict[str, str | None]:
    """Each name after the children go (``None``: removed with its child).

    >>> cuts = StructuralCuts(children={"layers": np.array([1])}, sizes={"layers": 2})
    >>> renamed(cuts, ["layers.0.weight", "layers.1.weight", "head.weight"])
    {'layers.0.weight': None, 'layers.1.weight': 'layers.0.weight', 'head.weight': 'head.weight'}
    """
    lists = _lists(cuts.children)
    return {name: renamed_after_drop(name, lists) for name in names}


def apply_structure(
    model: nn.Module,
    cuts: StructuralCuts,
    then: Callable[[Callable[[str], str | None]], None] | None = None,
    *,
    optimizers: Iterable[Optimizer] = (),
) -> None:
    """Remove the children, then run ``then(rename)`` (the width and expert cuts); all or nothing.

    ``rename`` maps a name before the cut to its name after (``None`` if gone).
    If ``then`` raises, the children and the config are put back as they were.
    """
    lists = _lists(cuts.children)
    optimizers = list(optimizers)
    # Children go while the config still matches the tensors (their rebuild proves the
    # depth alone); the expert count is set before the tensor cut, whose rebuild needs it.
    put_back_children = drop_with_undo(model, lists, optimizers=optimizers)
    try:
        put_back_config = set_config_fields(model, cuts.config)
        try:
            if then is not None:
                then(lambda name: renamed_after_drop(name, lists))
        except BaseException:
            put_back_config()
            raise
    except BaseException:
        put_back_children()
        raise


def set_config_fields(model: nn.Module, fields: Mapping[str, int]) -> Callable[[], None]:
    """Set config fields (dotted for sub-configs: ``text_config.num_experts``); returns
    what puts them back. A field that cannot be set puts back the ones before it.

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> model.config = type("Config", (), {})()
    >>> model.config.num_experts = 8
    >>> put_back = set_config_fields(model, {"num_experts": 6})
    >>> model.config.num_experts, put_back(), model.config.num_experts
    (6, None, 8)
    """
    config = getattr(model, "config", None)
    done: list[tuple[Any, str, Any]] = []

    def put_back() -> None:
        for target, key, old in reversed(done):
            setattr(target, key, old)

    try:
        for dotted, value in fields.items():
            *path, key = dotted.split(".")
            target = config
            for part in path:
                target = getattr(target, part)
            old = getattr(target, key)
            setattr(target, key, value)
            done.append((target, key, old))
    except BaseException:
        put_back()
        raise
    return put_back


def prove_structure(
    model: nn.Module,
    cuts: StructuralCuts,
    example_inputs: Any,
    cut: Callable[[nn.Module], None],
) -> None:
    """``cut(shadow)`` on a meta shadow; its forward must give the original output shapes.

    Raises :class:`PlanMismatchError` naming the first difference; the model is
    never touched. A model without a meta shadow is not proved here (the width
    replay and the config rebuild still are).
    """
    from depprune.shadow import ShadowError, meta_inputs, meta_shadow
    from depprune.tracer import model_inputs

    try:
        before, after = meta_shadow(model), meta_shadow(model)
    except ShadowError:
        return
    cut(after)
    shapes = []
    for twin in (before, after):
        args, kwargs = meta_inputs(model_inputs(twin, example_inputs))
        try:
            with torch.no_grad():
                output = twin(*args, **kwargs)
        except Exception as exc:
            if twin is before:
                return  # the forward needs real values: nothing to compare on meta
            raise PlanMismatchError(
                f"{type(model).__name__} does not run after {'; '.join(cuts.describe())} "
                f"({type(exc).__name__}: {str(exc)[:300]}); the model is unchanged: remove "
                "other layers or experts, or fewer"
            ) from exc
        leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        shapes.append([(tuple(t.shape), t.dtype) for t in leaves])
    if shapes[0] != shapes[1]:
        raise PlanMismatchError(
            f"{type(model).__name__} gives outputs of other shapes after "
            f"{'; '.join(cuts.describe())} ({shapes[1][:3]} instead of {shapes[0][:3]}); the "
            "model is unchanged: remove other layers or experts"
        )


def to_file(cuts: StructuralCuts) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The cuts as JSON metadata and flat int64 arrays (for plan files)."""
    names, members = list(cuts.children), list(cuts.tensors)
    experts = list(cuts.experts)
    arrays = [cuts.children[n] for n in names] + [cuts.tensors[m] for m in members]
    arrays += [cuts.experts[e][1] for e in experts]
    offsets = np.cumsum([0] + [a.size for a in arrays]).astype(np.int64)
    values = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    meta = {
        "children": [[n, cuts.sizes[n]] for n in names],
        "tensors": [[n, d] for n, d in members],
        "experts": [[e, cuts.experts[e][0]] for e in experts],
        "attributes": cuts.attributes,
        "config": cuts.config,
    }
    return meta, {"structure_offsets": offsets, "structure_indices": values}


def from_file(meta: Any, offsets: np.ndarray, values: np.ndarray) -> StructuralCuts:
    """:func:`to_file`'s output back; malformed input raises :class:`InvalidPlanError`."""
    if not isinstance(meta, dict):
        raise InvalidPlanError("malformed plan: its structure is not a JSON object")
    children = _pairs(meta.get("children"), str, int, "structure children")
    members = _pairs(meta.get("tensors"), str, int, "structure tensors")
    experts = _pairs(meta.get("experts"), str, int, "structure experts")
    count = len(children) + len(members) + len(experts)
    offsets, values = np.asarray(offsets), np.asarray(values)
    if offsets.shape != (count + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise InvalidPlanError("malformed plan: the structure's offsets do not fit its entries")
    if offsets[-1] != values.size:
        raise InvalidPlanError("malformed plan: the structure's indices do not fit its offsets")
    parts = [values[offsets[i] : offsets[i + 1]].astype(np.int64) for i in range(count)]
    attributes = meta.get("attributes") or {}
    config = meta.get("config") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(v, dict) and all(type(x) is int for x in v.values()) for v in attributes.values()
    ):
        raise InvalidPlanError("malformed plan: structure attributes must be integers by module")
    if not isinstance(config, dict) or not all(type(v) is int for v in config.values()):
        raise InvalidPlanError("malformed plan: structure config fields must be integers")
    cuts = StructuralCuts(
        children={n: parts[i] for i, (n, _) in enumerate(children)},
        sizes=dict(children),
        tensors={m: parts[len(children) + i] for i, m in enumerate(members)},
        attributes=attributes,
        config=config,
        experts={
            e: (size, parts[len(children) + len(members) + i])
            for i, (e, size) in enumerate(experts)
        },
    )
    return cuts


def _pairs(value: Any, first: type, second: type, what: str) -> list[tuple[Any, Any]]:
    if not isinstance(value, list) or not all(
        isinstance(v, list) and len(v) == 2 and type(v[0]) is first and type(v[1]) is second
        for v in value
    ):
        raise InvalidPlanError(f"malformed plan: {what} must be a list of [name, number] pairs")
    return [(v[0], v[1]) for v in value]
