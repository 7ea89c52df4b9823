"""A pruning plan: the kept indices of every parameter dim that shrinks.

A :class:`Plan` is independent of the graph that made it: it names tensors
and their shapes before pruning, so a plan made on a meta-device model
applies to the same architecture with real weights, and it saves to one
``.npz`` file (no pickle) that loads back with every field checked.

>>> import tempfile, os, torch, numpy as np
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
>>> plan = Plan.from_kept(model, {("0.weight", 0): np.array([0, 2]),
...                              ("0.bias", 0): np.array([0, 2]),
...                              ("1.weight", 1): np.array([0, 2])})
>>> plan.params_after(model)
14
>>> path = os.path.join(tempfile.mkdtemp(), "plan.npz")
>>> plan.save(path)
>>> Plan.load(path).apply(model)
>>> model[0].out_features, model[1].in_features
(2, 2)
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from depprune._gc import paused_gc
from depprune.apply import apply_kept_indices, named_tensors
from depprune.errors import InvalidPlanError, PlanMismatchError

__all__ = ["GroupChoice", "Plan"]

ParamDim = tuple[str, int]
_FORMAT = "depprune-plan"
_VERSION = 1


@dataclass(frozen=True)
class GroupChoice:
    """What the plan does to one group: its kind hint and units before and after."""

    index: int
    kind: str
    size: int
    kept: int
    first_member: str


@dataclass
class Plan:
    """Kept indices per (tensor name, dim), with the shapes they were planned for."""

    #: Sorted kept indices of every (parameter or buffer name, dim) that shrinks.
    kept: dict[ParamDim, np.ndarray]
    #: Shape before pruning of every tensor the plan cuts.
    shapes: dict[str, tuple[int, ...]]
    #: One entry per group of the graph the plan came from (for reports).
    groups: list[GroupChoice] = field(default_factory=list)

    @classmethod
    def from_kept(
        cls,
        model: nn.Module,
        kept: Mapping[ParamDim, np.ndarray],
        groups: list[GroupChoice] | None = None,
    ) -> Plan:
        """A plan from kept indices (as ``DependencyGraph.kept_indices`` gives) for ``model``."""
        tensors = named_tensors(model)
        shrinking: dict[ParamDim, np.ndarray] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for (name, dim), indices in kept.items():
            if name not in tensors:
                raise PlanMismatchError(
                    f"the kept indices name {name!r}, which is not a parameter or buffer of "
                    f"{type(model).__name__}"
                )
            module, attr, _ = tensors[name]
            shape = tuple(getattr(module, attr).shape)
            indices = np.asarray(indices, dtype=np.int64)
            if not 0 <= dim < len(shape):
                raise PlanMismatchError(f"{name!r} has no dim {dim}; its shape is {shape}")
            if indices.size < shape[dim]:
                shrinking[(name, dim)] = indices
                shapes[name] = shape
        plan = cls(kept=shrinking, shapes=shapes, groups=list(groups or []))
        plan.validate()
        return plan

    def validate(self) -> None:
        """Check that every index list is sorted, unique and inside its dim."""
        for (name, dim), indices in self.kept.items():
            shape = self.shapes.get(name)
            if shape is None or not 0 <= dim < len(shape):
                raise InvalidPlanError(f"the plan cuts {name!r} dim {dim} but has no shape for it")
            if indices.ndim != 1 or indices.size == 0:
                raise InvalidPlanError(
                    f"the plan keeps {indices.size} indices of {name!r} dim {dim}; "
                    "every cut dim must keep at least one index"
                )
            if indices[0] < 0 or indices[-1] >= shape[dim] or np.any(np.diff(indices) <= 0):
                raise InvalidPlanError(
                    f"the kept indices of {name!r} dim {dim} must be sorted, unique and in "
                    f"[0, {shape[dim]}); the plan file may be corrupt"
                )

    def params_after(self, model: nn.Module) -> int:
        """Parameters ``model`` will have after :meth:`apply` (tied ones counted once)."""
        tensors = named_tensors(model)
        seen: set[int] = set()
        total = 0
        kept_sizes = {key: indices.size for key, indices in self.kept.items()}
        for name, (module, attr, is_param) in tensors.items():
            tensor = getattr(module, attr)
            if not is_param or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += math.prod(kept_sizes.get((name, d), s) for d, s in enumerate(tensor.shape))
        return total

    def apply(self, model: nn.Module, *, low_memory: bool = False) -> None:
        """Cut ``model`` in place; on any error it is left exactly as it was.

        Raises :class:`PlanMismatchError` if the model's tensors do not have
        the shapes the plan was made for. ``low_memory=True`` swaps one tensor
        at a time (peak: the model plus its largest cut tensor instead of the
        model plus every cut tensor); see :func:`depprune.apply.apply_kept_indices`.
        """
        tensors = named_tensors(model)
        for name, shape in self.shapes.items():
            if name not in tensors:
                raise PlanMismatchError(
                    f"the plan cuts {name!r}, which {type(model).__name__} does not have; "
                    "apply a plan to the architecture it was made for"
                )
            module, attr, _ = tensors[name]
            actual = tuple(getattr(module, attr).shape)
            if actual != shape:
                raise PlanMismatchError(
                    f"the plan was made for {name!r} of shape {shape}, but the model's has "
                    f"shape {actual}; was it already pruned, or is it another configuration?"
                )
        with paused_gc():
            apply_kept_indices(model, self.kept, low_memory=low_memory)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan to one ``.npz`` file (indices as int64 arrays, the rest as JSON)."""
        keys = list(self.kept)
        arrays = [self.kept[k] for k in keys]
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "members": [[name, dim] for name, dim in keys],
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "groups": [list(vars(g).values()) for g in self.groups],
        }
        offsets = np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)
        indices = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        with open(path, "wb") as handle:
            np.savez(
                handle,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                offsets=offsets,
                indices=indices.astype(np.int64),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`; a damaged file raises InvalidPlanError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                offsets, indices = data["offsets"], data["indices"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise InvalidPlanError(
                f"{os.fspath(path)!r} is not a readable depprune plan ({type(exc).__name__}: "
                f"{exc}); write plans with Plan.save"
            ) from exc
        try:
            return cls._from_meta(meta, offsets, indices)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            if isinstance(exc, InvalidPlanError):
                raise
            raise InvalidPlanError(
                f"{os.fspath(path)!r} holds a malformed plan ({type(exc).__name__}: {exc}); "
                "it may be corrupt or from another depprune version"
            ) from exc

    @classmethod
    def _from_meta(cls, meta: dict, offsets: np.ndarray, indices: np.ndarray) -> Plan:
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise InvalidPlanError(
                f"not a version-{_VERSION} depprune plan (format {meta.get('format')!r}, "
                f"version {meta.get('version')!r})"
            )
        members = [(str(name), int(dim)) for name, dim in meta["members"]]
        if offsets.dtype != np.int64 or indices.dtype != np.int64:
            raise InvalidPlanError("plan offsets and indices must be int64 arrays")
        if (
            offsets.shape != (len(members) + 1,)
            or offsets[0] != 0
            or offsets[-1] != indices.size
            or np.any(np.diff(offsets) < 0)
        ):
            raise InvalidPlanError(
                f"plan offsets do not split {indices.size} indices into {len(members)} lists"
            )
        kept = {key: indices[offsets[i] : offsets[i + 1]].copy() for i, key in enumerate(members)}
        shapes = {str(k): tuple(int(s) for s in v) for k, v in meta["shapes"].items()}
        groups = [
            GroupChoice(int(a), str(b), int(c), int(d), str(e)) for a, b, c, d, e in meta["groups"]
        ]
        plan = cls(kept=kept, shapes=shapes, groups=groups)
        plan.validate()
        return plan

    def __repr__(self) -> str:
        cut = sum(c.size - c.kept for c in self.groups)
        return f"Plan({len(self.kept)} parameter dims cut, {cut} units removed)"
