"""A pruning plan: the kept indices of every parameter dim that shrinks.

A :class:`Plan` is independent of the graph that made it: it names tensors
and their shapes before pruning, so a plan made on a meta-device model
applies to the same architecture with real weights, and it saves to one
``.npz`` file (no pickle) that loads back with every field checked.

>>> import tempfile, os, torch, numpy as np
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
>>> plan = Plan.from_kept(model, {("0.weight", 0): np.array([0, 2]),
...                              ("0.bias", 0): np.array([0, 2]),
...                              ("1.weight", 1): np.array([0, 2])},
...                       example_inputs=torch.zeros(1, 3))
>>> plan.params_after(model)
14
>>> path = os.path.join(tempfile.mkdtemp(), "plan.npz")
>>> plan.save(path)
>>> Plan.load(path).apply(model)  # proved on a meta shadow with the saved input shapes
>>> model[0].out_features, model[1].in_features
(2, 2)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn
from torch.optim import Optimizer

from depprune._gc import paused_gc
from depprune.apply import apply_kept_indices, named_tensors
from depprune.errors import InvalidPlanError, PlanMismatchError
from depprune.shadow import input_spec, inputs_from_spec

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
    #: The example inputs as shapes and dtypes (:func:`depprune.shadow.input_spec`): what
    #: :meth:`apply` replays to prove the plan; ``None`` when they cannot be described.
    inputs: Any = None
    #: Unit ids removed from each group (group index -> sorted ids), when made by make_plan.
    removed: dict[int, np.ndarray] = field(default_factory=dict)
    #: Groups the proof kept whole, with the reason, by group index.
    kept_whole: dict[int, str] = field(default_factory=dict)
    #: Integer module attributes the cut sets beyond the built-in fixers (module name ->
    #: attribute -> value), inferred from the trace and proved by the replay.
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Traced sizes the plan changes -> their new sizes (what config fields may be sized by).
    widths: dict[int, list[int]] = field(default_factory=dict)
    #: (plan fingerprint, model class) of the proof make_plan ran; not saved.
    _proved: tuple[str, type] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_kept(
        cls,
        model: nn.Module,
        kept: Mapping[ParamDim, np.ndarray],
        groups: list[GroupChoice] | None = None,
        *,
        example_inputs: Any = None,
    ) -> Plan:
        """A plan from kept indices (as ``DependencyGraph.kept_indices`` gives) for ``model``.

        ``example_inputs`` are what :meth:`apply` traces and replays to prove it.
        """
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
        if example_inputs is not None:
            plan.inputs = input_spec(example_inputs)
            if plan.inputs is None:
                raise InvalidPlanError(
                    "example_inputs must be tensors, numbers, strings, None, or lists and "
                    "string-keyed dicts of them, so that the plan can replay them"
                )
        plan.validate()
        return plan

    def fingerprint(self) -> str:
        """A hash of every kept index list and shape (what a proof is about)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps([self.attributes, self.widths], sort_keys=True).encode())
        for (name, dim), indices in sorted(self.kept.items()):
            digest.update(f"{name}\0{dim}\0{self.shapes.get(name)}\0".encode())
            digest.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def mark_proved(self, model: nn.Module) -> None:
        """Record that this exact plan was proved on ``model``'s architecture."""
        self._proved = (self.fingerprint(), type(model))

    def validate(self) -> None:
        """Check that every index list is sorted, unique and inside its dim."""
        for (name, dim), indices in self.kept.items():
            shape = self.shapes.get(name)
            if shape is None or not 0 <= dim < len(shape):
                raise InvalidPlanError(f"the plan cuts {name!r} dim {dim} but has no shape for it")
            if any(size < 0 for size in shape):
                raise InvalidPlanError(
                    f"the plan's shape of {name!r} is {shape}, with a negative size"
                )
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

    def apply(
        self,
        model: nn.Module,
        *,
        example_inputs: Any = None,
        verify: bool = True,
        low_memory: bool = False,
        optimizers: Iterable[Optimizer] = (),
    ) -> None:
        """Cut ``model`` in place; on any error it is left exactly as it was.

        First the plan is proved (unless :func:`depprune.make_plan` proved
        this exact plan already): it is applied to a meta shadow of ``model``
        whose forward on ``example_inputs`` (by default the inputs the plan
        was made with, which plan files keep) is replayed against a trace of
        the model (:mod:`depprune.verify`). A plan that does not hold, or a
        plan file edited into kept indices that do not remove whole units,
        raises :class:`PlanMismatchError` before anything changes.
        ``verify=False`` cuts without the proof.

        Raises :class:`PlanMismatchError` if the model's tensors do not have
        the shapes the plan was made for. ``low_memory=True`` swaps one tensor
        at a time (peak: the model plus its largest cut tensor instead of the
        model plus every cut tensor); see :func:`depprune.apply.apply_kept_indices`.

        Pass the optimizers made before pruning as ``optimizers=[...]``: their
        state is cut like the parameters and their param groups hold the new
        ones, so training goes on (:mod:`depprune.apply.optimizer_state`); an
        optimizer left out that holds cut parameters gets a warning.
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
            if verify and self.kept and self._proved != (self.fingerprint(), type(model)):
                self._prove(model, example_inputs)
            apply_kept_indices(
                model,
                self.kept,
                low_memory=low_memory,
                optimizers=optimizers,
                attributes=self.attributes,
                widths=self.widths,
            )

    def _prove(self, model: nn.Module, example_inputs: Any) -> None:
        """Trace ``model``, check the plan removes whole units, and replay it on a shadow."""
        from depprune.api import trace
        from depprune.verify import replay_plan

        if example_inputs is None:
            if self.inputs is None:
                raise PlanMismatchError(
                    "this plan has no example inputs to prove it on; pass "
                    "plan.apply(model, example_inputs=...) (or verify=False to cut unproved)"
                )
            try:
                example_inputs = inputs_from_spec(self.inputs)
            except (ValueError, TypeError) as exc:
                raise InvalidPlanError(f"the plan's example inputs are malformed: {exc}") from exc
        graph = trace(model, example_inputs)
        keep = self._keep_mask(graph, model)
        divergence = replay_plan(
            model, graph, keep, graph.kept_indices(keep), attributes=self.attributes
        )
        if divergence is not None:
            raise PlanMismatchError(
                f"the plan does not hold on {type(model).__name__}: {divergence}; the model "
                "is unchanged. Make the plan again with depprune.make_plan, which keeps such "
                "groups whole"
            )
        self.mark_proved(model)

    def _keep_mask(self, graph: Any, model: nn.Module) -> np.ndarray:
        """The units the kept indices keep; raises unless they are exactly whole units."""
        keep = np.ones(graph.num_units, dtype=np.uint8)
        for group in graph.groups:
            for member, unit_map in graph.unit_maps(group).items():
                kept = self.kept.get(member)
                if kept is None:
                    continue
                units = unit_map[kept]
                mine = np.zeros(group.size, dtype=bool)
                mine[units[units >= 0]] = True
                keep[group.unit_offset : group.unit_offset + group.size] &= mine
        derived = graph.kept_indices(keep)
        sizes = {name: getattr(m, a).shape for name, (m, a, _) in named_tensors(model).items()}
        for key in set(derived) | set(self.kept):
            indices, planned = derived.get(key), self.kept.get(key)
            if planned is None and indices is not None and indices.size == sizes[key[0]][key[1]]:
                continue  # neither cuts it
            if planned is None or indices is None or not np.array_equal(planned, indices):
                raise PlanMismatchError(
                    f"the plan's kept indices of {key[0]!r} dim {key[1]} do not remove whole "
                    "units together with every coupled tensor (edited, or made for another "
                    "model); the model is unchanged"
                )
        return keep

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
            "inputs": self.inputs,
            "attributes": self.attributes,
            "widths": {str(k): v for k, v in self.widths.items()},
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
        where = _path_text(path)
        # Anything a damaged or hostile file can make numpy, zipfile or json raise (EOFError,
        # RecursionError from deep nesting, MemoryError from a forged header, ...) is caught.
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                offsets, indices = data["offsets"], data["indices"]
        except Exception as exc:
            raise InvalidPlanError(
                f"{where} is not a readable depprune plan ({type(exc).__name__}: "
                f"{_short(exc)}); write plans with Plan.save"
            ) from exc
        try:
            return cls._from_meta(meta, offsets, indices)
        except InvalidPlanError as exc:
            raise InvalidPlanError(f"{where}: {exc}") from exc
        except Exception as exc:
            raise InvalidPlanError(
                f"{where} holds a malformed plan ({type(exc).__name__}: {_short(exc)}); "
                "it may be corrupt or from another depprune version"
            ) from exc

    @classmethod
    def _from_meta(cls, meta: dict, offsets: np.ndarray, indices: np.ndarray) -> Plan:
        if not isinstance(meta, dict):
            raise InvalidPlanError(f"malformed plan: its metadata is a {type(meta).__name__}")
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise InvalidPlanError(
                f"not a version-{_VERSION} depprune plan (format {meta.get('format')!r}, "
                f"version {meta.get('version')!r})"
            )
        members = [
            (_typed(m[0], str, "member name"), _typed(m[1], int, "member dim"))
            for m in _records(meta.get("members"), 2, "members")
        ]
        if len(set(members)) != len(members):
            raise InvalidPlanError("malformed plan: a (tensor, dim) is listed twice in members")
        if not isinstance(offsets, np.ndarray) or not isinstance(indices, np.ndarray):
            raise InvalidPlanError("malformed plan: offsets and indices must be arrays")
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
        if indices.ndim != 1:
            raise InvalidPlanError(f"malformed plan: indices is a {indices.ndim}-d array")
        shapes_meta = meta.get("shapes")
        if not isinstance(shapes_meta, dict):
            raise InvalidPlanError(
                f"malformed plan: shapes must be a JSON object, not {type(shapes_meta).__name__}"
            )
        shapes = {}
        for name, sizes in shapes_meta.items():
            sizes = _typed(sizes, list, f"the shape of {name!r}")
            shapes[name] = tuple(_typed(size, int, f"a size of {name!r}") for size in sizes)
        kinds = (int, str, int, int, str)
        groups = [
            GroupChoice(*(_typed(v, t, "a group field") for v, t in zip(g, kinds, strict=True)))
            for g in _records(meta.get("groups"), 5, "groups")
        ]
        attributes = meta.get("attributes") or {}
        if not isinstance(attributes, dict) or not all(
            isinstance(name, str)
            and isinstance(values, dict)
            and all(isinstance(k, str) and type(v) is int for k, v in values.items())
            for name, values in attributes.items()
        ):
            raise InvalidPlanError("plan attributes must map module names to integer attributes")
        widths = meta.get("widths") or {}
        if not isinstance(widths, dict) or not all(
            isinstance(k, str)
            and k.isdigit()
            and isinstance(v, list)
            and all(type(x) is int and x >= 0 for x in v)
            for k, v in widths.items()
        ):
            raise InvalidPlanError("plan widths must map sizes to lists of sizes")
        plan = cls(
            kept=kept,
            shapes=shapes,
            groups=groups,
            inputs=meta.get("inputs"),
            attributes=attributes,
            widths={int(k): list(v) for k, v in widths.items()},
        )
        plan.validate()
        return plan

    def __repr__(self) -> str:
        cut = sum(c.size - c.kept for c in self.groups)
        return f"Plan({len(self.kept)} parameter dims cut, {cut} units removed)"


def _path_text(path: object) -> str:
    try:
        return repr(os.fspath(path))  # type: ignore[arg-type]
    except TypeError:
        return f"{type(path).__name__} {path!r:.80}"


def _short(exc: BaseException) -> str:
    """An exception's text, cut short: a hostile file must not flood the message."""
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + " ..."


def _records(value: object, width: int, what: str) -> list[list]:
    """A JSON list of ``width``-item lists, or InvalidPlanError."""
    if not isinstance(value, list) or not all(
        isinstance(v, list) and len(v) == width for v in value
    ):
        raise InvalidPlanError(
            f"malformed plan: {what} must be a list of {width}-item lists, got {value!r:.80}"
        )
    return value


def _typed(value: object, kind: type, what: str):
    """``value`` if it is a ``kind`` (an int that is not a bool), else InvalidPlanError."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidPlanError(
            f"malformed plan: {what} is {value!r:.80}, not {'an' if kind is int else 'a'} "
            f"{kind.__name__}"
        )
    return value
