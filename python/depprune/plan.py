"""A pruning plan: the kept indices of every parameter dim that shrinks.

A :class:`Plan` is independent of the graph that made it: it names tensors
and their shapes before pruning, so a plan made on a meta-device model
applies to the same architecture with real weights, and it saves to one
``.npz`` file (no pickle) that loads back with every field checked.

A plan file (version 2) also records the architecture the plan was made for
(class, Hugging Face config, every tensor's shape and dtype), how it was
made (:attr:`Plan.choices`) and the depprune version that wrote it, and
holds a ``summary.json`` member that :func:`read_summary` (or any zip and
JSON reader) reads without numpy. Version-1 files still load.

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
>>> read_summary(path)["totals"]
{'tensors_cut': 3, 'groups_cut': 0, 'units_removed': 0, 'params_before': 26, 'params_after': 14}
>>> Plan.load(path).apply(model)  # proved on a meta shadow with the saved input shapes
>>> model[0].out_features, model[1].in_features
(2, 2)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
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
from depprune.structure import StructuralCuts, apply_structure, from_file, prove_structure, to_file

__all__ = ["GroupChoice", "Plan", "architecture_of", "read_summary"]

ParamDim = tuple[str, int]
_FORMAT = "depprune-plan"
_VERSION = 4
#: The plan file versions this depprune reads (3 added structural cuts: layers, experts;
#: 4 per-expert indices). A plan without per-expert indices is written as version 3.
_READS = (1, 2, 3, 4)
_SUMMARY = "summary.json"
#: A summary.json claiming more is forged (a real one holds a few lines per group).
_MAX_SUMMARY_BYTES = 64 * 2**20
#: How many differences an architecture mismatch names.
_SHOWN = 5
_TENSOR_FIELDS = ("shape", "dtype", "kind", "tied_to")
#: Summary fields copied from the plan file's metadata; Plan.load checks they agree with it.
_COPIED = (
    "format",
    "version",
    "depprune_version",
    "architecture",
    "choices",
    "inputs",
    "groups",
    "kept_whole",
)


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
    #: What the plan was made for (:func:`architecture_of`), recorded by :meth:`from_kept`;
    #: :meth:`apply` refuses a model that differs. ``None`` for version-1 files.
    architecture: dict[str, Any] | None = None
    #: How the plan was made (make_plan's ratio, kinds, importance, ...) as JSON values.
    choices: dict[str, Any] = field(default_factory=dict)
    #: The depprune version that wrote the plan file (``None`` unless loaded from a v2 file).
    depprune_version: str | None = None
    #: Whole layers and experts removed (:mod:`depprune.structure`); empty for width plans.
    structure: StructuralCuts = field(default_factory=StructuralCuts)
    #: Fused expert tensors whose experts each keep their own indices (made by
    #: ``make_plan(..., per_expert=True)``, :mod:`depprune.expert_widths`): (name, dim) ->
    #: ``[experts, kept]``, row ``e`` cut from slice ``e``; ``kept`` holds the uniform
    #: choice of as many indices, which sizes and proves the shapes.
    per_expert: dict[ParamDim, np.ndarray] = field(default_factory=dict)
    #: The budget search's result when make_plan was given a target (its table); not saved.
    budget: Any = field(default=None, repr=False, compare=False)
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

        ``example_inputs`` are what :meth:`apply` traces and replays to prove it. The
        plan records ``model``'s architecture (:func:`architecture_of`), which
        :meth:`apply` checks a model against.
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
        plan.architecture = architecture_of(model)
        if example_inputs is not None:
            plan.inputs = input_spec(example_inputs)
            if plan.inputs is None:
                raise InvalidPlanError(
                    "example_inputs must be tensors, numbers, strings, None, or lists and "
                    "string-keyed dicts of them, so that the plan can replay them"
                )
        plan.validate()
        return plan

    @property
    def architecture_hash(self) -> str | None:
        """A short hash of the recorded tensor names and shapes; ``None`` without a record.

        Dtypes, devices and the config are left out, as :meth:`apply`'s check leaves
        them out: a bf16 meta skeleton and the float32 model it describes share it.

        >>> import torch
        >>> def record_hash(layer):
        ...     return Plan.from_kept(layer, {}).architecture_hash
        >>> real = record_hash(torch.nn.Linear(3, 4))
        >>> real == record_hash(torch.nn.Linear(3, 4, dtype=torch.bfloat16, device="meta"))
        True
        >>> real == record_hash(torch.nn.Linear(3, 5))
        False
        """
        return None if self.architecture is None else _tensors_hash(self.architecture["tensors"])

    def fingerprint(self) -> str:
        """A hash of every kept index list and shape (what a proof is about)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps([self.attributes, self.widths], sort_keys=True).encode())
        digest.update(self.structure.digest())
        for (name, dim), indices in sorted(self.kept.items()):
            digest.update(f"{name}\0{dim}\0{self.shapes.get(name)}\0".encode())
            digest.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
        for (name, dim), rows in sorted(self.per_expert.items()):
            digest.update(f"per expert\0{name}\0{dim}\0{rows.shape}\0".encode())
            digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
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
        for (name, dim), rows in self.per_expert.items():
            planned, shape = self.kept.get((name, dim)), self.shapes.get(name)
            if (
                planned is None
                or shape is None
                or dim == 0
                or rows.ndim != 2
                or rows.shape != (shape[0], planned.size)
            ):
                raise InvalidPlanError(
                    f"the per-expert indices of {name!r} dim {dim} must be [experts, kept] "
                    "with as many kept as the plan's kept indices of that dim; the plan file "
                    "may be corrupt"
                )
            if rows.min() < 0 or rows.max() >= shape[dim] or np.any(np.diff(rows, axis=1) <= 0):
                raise InvalidPlanError(
                    f"the per-expert indices of {name!r} dim {dim} must be sorted, unique and in "
                    f"[0, {shape[dim]}) in every row; the plan file may be corrupt"
                )
        self.structure.validate(
            None
            if self.architecture is None
            else {n: tuple(e["shape"]) for n, e in self.architecture["tensors"].items()}
        )
        if not isinstance(self.choices, dict):
            raise InvalidPlanError(
                f"plan.choices must be a dict of JSON values, not a {type(self.choices).__name__}"
            )
        _check_json(self.choices, "plan.choices")
        recorded = self.architecture["tensors"] if self.architecture is not None else None
        for name, shape in self.shapes.items() if recorded is not None else ():
            entry = recorded.get(name)
            if entry is None or tuple(entry["shape"]) != shape:
                raise InvalidPlanError(
                    f"the plan cuts {name!r} of shape {shape}, but its architecture record "
                    f"has {'no such tensor' if entry is None else tuple(entry['shape'])}; the "
                    "plan file may be corrupt"
                )

    def params_after(self, model: nn.Module) -> int:
        """Parameters ``model`` will have after :meth:`apply` (tied ones counted once)."""
        tensors = named_tensors(model)
        seen: set[int] = set()
        total = 0
        kept_sizes = self._kept_sizes()
        gone = self.structure.params_removed(tensors)
        for name, (module, attr, is_param) in tensors.items():
            tensor = getattr(module, attr)
            if not is_param or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if name not in gone:
                total += math.prod(kept_sizes.get((name, d), s) for d, s in enumerate(tensor.shape))
        return total

    def _kept_sizes(self) -> dict[ParamDim, int]:
        sizes = {key: indices.size for key, indices in self.kept.items()}
        sizes.update({key: indices.size for key, indices in self.structure.tensors.items()})
        return sizes

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
        from depprune.distributed.tensor_parallel import check_model

        tensors = named_tensors(model)
        self.check_shapes(
            {name: getattr(module, attr).shape for name, (module, attr, _) in tensors.items()},
            owner=type(model).__name__,
        )
        check_model(self, model)
        with paused_gc():
            cutting = self.kept or self.structure
            if verify and cutting and self._proved != (self.fingerprint(), type(model)):
                self._prove(model, example_inputs)
            self._cut(model, low_memory=low_memory, optimizers=list(optimizers))

    def _cut(self, model: nn.Module, *, low_memory: bool, optimizers: list[Optimizer]) -> None:
        """The cut itself, unproved: children first, then every tensor under its new name."""
        if not self.structure:
            apply_kept_indices(
                model,
                {**self.kept, **self.per_expert},
                low_memory=low_memory,
                optimizers=optimizers,
                attributes=self.attributes,
                widths=self.widths,
            )
            return
        cuts = self.structure

        def cut_tensors(rename) -> None:
            kept = {}
            own = [*self.kept.items(), *self.per_expert.items(), *cuts.tensors.items()]
            for (name, dim), indices in own:
                new = rename(name)
                if new is not None:
                    kept[(new, dim)] = indices
            attributes = {}
            for name, values in [*self.attributes.items(), *cuts.attributes.items()]:
                new = rename(name)
                if new is not None:
                    attributes.setdefault(new, {}).update(values)
            apply_kept_indices(
                model,
                kept,
                low_memory=low_memory,
                optimizers=optimizers,
                attributes=attributes,
                widths=self.widths,
            )

        apply_structure(model, cuts, cut_tensors, optimizers=optimizers)

    def check_shapes(
        self, shapes: Mapping[str, Iterable[int]], *, owner: str = "the model"
    ) -> None:
        """Raise :class:`PlanMismatchError` unless ``shapes`` (name -> shape) fit the plan.

        With an architecture record (plans from :meth:`from_kept`, version-2 files)
        every recorded tensor must be in ``shapes`` with its recorded shape, and
        ``shapes`` may hold no other; without one, the tensors the plan cuts must
        have their planned shapes. Dtypes are not compared. The message names the
        first differences (the cut tensors' first). :meth:`apply` runs this on the
        model's parameters and buffers (tied names included) before anything changes.

        >>> import torch, numpy as np
        >>> plan = Plan.from_kept(torch.nn.Linear(3, 4), {("weight", 0): np.array([1]),
        ...                                                ("bias", 0): np.array([1])})
        >>> plan.check_shapes({"weight": (4, 3), "bias": (4,)})
        >>> plan.check_shapes({"weight": (1, 3), "bias": (1,)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        depprune.errors.PlanMismatchError: the plan was made for 'weight' of shape (4, 3), but ...
        """
        recorded = (
            {name: tuple(entry["shape"]) for name, entry in self.architecture["tensors"].items()}
            if self.architecture is not None
            else dict(self.shapes)
        )
        given = {name: tuple(shape) for name, shape in shapes.items()}
        differences, reshaped = [], False
        # The tensors the plan cuts first: a difference there says most (already pruned?).
        for name in [*self.shapes, *(n for n in recorded if n not in self.shapes)]:
            want = recorded[name] if name in recorded else self.shapes[name]
            actual = given.get(name)
            if actual is None:
                what = "cuts" if name in self.shapes else "was made for a model with"
                differences.append(f"the plan {what} {name!r}, which {owner} does not have")
            elif actual != want:
                reshaped = True
                differences.append(
                    f"the plan was made for {name!r} of shape {want}, but the model's has "
                    f"shape {actual}"
                )
        made_for = ""
        if self.architecture is not None:
            made_for = f" ({self.architecture['class']}, architecture {self.architecture_hash})"
            differences += [
                f"{owner} has {name!r}, which the model the plan was made for did not have"
                for name in given
                if name not in recorded
            ]
        if not differences:
            return
        shown = "; ".join(differences[:_SHOWN])
        if len(differences) > _SHOWN:
            shown += f" (and {len(differences) - _SHOWN} more differences)"
        question = "; was it already pruned, or is it another configuration?" if reshaped else ";"
        raise PlanMismatchError(
            f"{shown}{question} apply a plan to the architecture it was made for{made_for}, "
            "or make one for this model with depprune.make_plan; nothing was changed"
        )

    def summary(self) -> dict[str, Any]:
        """What the plan does, as the JSON that :meth:`save` writes and :func:`read_summary` reads.

        Keys: format, version, depprune_version, architecture (class, hash,
        model_type, or ``None``), choices, inputs, groups (one row per group),
        kept_whole (group and reason), structure (layers and experts removed),
        per_expert (the (tensor, dim) pairs each expert cuts alone) and totals (tensors_cut, groups_cut,
        units_removed, params_before, params_after; the parameter counts are
        ``None`` without an architecture record).

        >>> import torch, numpy as np
        >>> plan = Plan.from_kept(torch.nn.Linear(3, 4), {("weight", 0): np.array([1]),
        ...                                                ("bias", 0): np.array([1])})
        >>> plan.summary()["totals"]
        {'tensors_cut': 2, 'groups_cut': 0, 'units_removed': 0, 'params_before': 16, 'params_after': 4}
        """
        return self._summary(self.depprune_version or _depprune_version())

    def _summary(self, version: str) -> dict[str, Any]:
        architecture = None
        params_before = params_after = None
        if self.architecture is not None:
            config = self.architecture["config"] or {}
            architecture = {
                "class": self.architecture["class"],
                "hash": self.architecture_hash,
                "model_type": config.get("model_type"),
            }
            params_before, params_after = self._recorded_params()
        summary = {
            "format": _FORMAT,
            "version": self._file_version(),
            "depprune_version": version,
            "architecture": architecture,
            "choices": self.choices,
            "inputs": self.inputs,
            "groups": [dict(vars(choice)) for choice in self.groups],
            "kept_whole": [
                {"group": group, "reason": why} for group, why in sorted(self.kept_whole.items())
            ],
            "structure": self.structure.describe(),
            "per_expert": [[name, dim] for name, dim in sorted(self.per_expert)],
            "totals": {
                "tensors_cut": len(self.shapes),
                "groups_cut": sum(choice.kept < choice.size for choice in self.groups),
                "units_removed": sum(choice.size - choice.kept for choice in self.groups),
                "params_before": params_before,
                "params_after": params_after,
            },
        }
        # Through JSON, so that the dict is exactly what read_summary gives back (lists, not tuples).
        return json.loads(_json_bytes(summary))

    def _file_version(self) -> int:
        """4 where the plan keeps per-expert indices, else 3 (what older depprune reads)."""
        return _VERSION if self.per_expert else 3

    def _recorded_params(self) -> tuple[int, int]:
        """Parameters before and after, from the architecture record (tied ones counted once)."""
        assert self.architecture is not None
        kept_sizes = self._kept_sizes()
        gone = self.structure.params_removed(self.architecture["tensors"])
        before = after = 0
        for name, entry in self.architecture["tensors"].items():
            # Under its first name only, as params_after(model) counts a tied parameter.
            if entry["kind"] != "parameter" or entry["tied_to"] is not None:
                continue
            before += math.prod(entry["shape"])
            if name not in gone:
                shape = entry["shape"]
                after += math.prod(kept_sizes.get((name, d), s) for d, s in enumerate(shape))
        return before, after

    def _prove(self, model: nn.Module, example_inputs: Any) -> None:
        """Trace ``model``, check the plan removes whole units, and replay it on a shadow."""
        from depprune.api import trace
        from depprune.expert_widths import check_per_expert
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
        if self.kept:
            graph = trace(model, example_inputs)
            keep = self._keep_mask(graph, model)
            check_per_expert(graph, model, self.per_expert, self.kept)
            divergence = replay_plan(
                model, graph, keep, graph.kept_indices(keep), attributes=self.attributes
            )
            if divergence is not None:
                raise PlanMismatchError(
                    f"the plan does not hold on {type(model).__name__}: {divergence}; the "
                    "model is unchanged. Make the plan again with depprune.make_plan, which "
                    "keeps such groups whole"
                )
        if self.structure:
            # Layers and experts change the function: the pruned shadow must run alike.
            prove_structure(
                model,
                self.structure,
                example_inputs,
                lambda shadow: self._cut(shadow, low_memory=False, optimizers=[]),
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
        """Write the plan to one ``.npz`` file: indices as int64 arrays, the rest as JSON.

        The file (plan format version 2) is a zip that ``numpy.load`` opens; its
        ``summary.json`` member is plain JSON (:meth:`summary`), which
        :func:`read_summary`, ``unzip -p plan.npz summary.json`` or any zip
        reader gives without numpy.
        """
        self.validate()
        version = _depprune_version()
        keys = list(self.kept)
        removed = sorted(self.removed)
        per_expert = sorted(self.per_expert)
        meta = {
            "format": _FORMAT,
            "version": self._file_version(),
            "depprune_version": version,
            "members": [[name, dim] for name, dim in keys],
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "groups": [list(vars(g).values()) for g in self.groups],
            "inputs": self.inputs,
            "attributes": self.attributes,
            "widths": {str(k): v for k, v in self.widths.items()},
            "kept_whole": {str(g): why for g, why in sorted(self.kept_whole.items())},
            "removed": removed,
            "architecture": self.architecture,
            "choices": self.choices,
        }
        structure_meta, structure_arrays = to_file(self.structure)
        meta["structure"] = structure_meta
        if per_expert:
            meta["per_expert"] = [[name, dim] for name, dim in per_expert]
        offsets, indices = _packed([self.kept[k] for k in keys])
        removed_offsets, removed_units = _packed([self.removed[g] for g in removed])
        arrays = {
            "meta": np.frombuffer(_json_bytes(meta), dtype=np.uint8),
            "offsets": offsets,
            "indices": indices,
            "removed_offsets": removed_offsets,
            "removed_units": removed_units,
            **structure_arrays,
        }
        if per_expert:
            rows = [self.per_expert[k] for k in per_expert]
            arrays["per_expert_offsets"], arrays["per_expert_indices"] = _packed(
                [r.reshape(-1) for r in rows]
            )
        summary = _json_bytes(self._summary(version), indent=1)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            # Written as np.savez writes them, so numpy.load reads the arrays as before.
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
            # The date np.savez's members get too: the same plan gives the same bytes.
            member = zipfile.ZipInfo(_SUMMARY, date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(member, summary, compress_type=zipfile.ZIP_DEFLATED)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`; a damaged file raises InvalidPlanError.

        Version-1 files (depprune before plan files recorded the architecture)
        load with ``architecture=None`` and empty ``choices``; a file from a newer
        depprune raises InvalidPlanError saying to upgrade.
        """
        where = _path_text(path)
        # Anything a damaged or hostile file can make numpy, zipfile or json raise (EOFError,
        # RecursionError from deep nesting, MemoryError from a forged header, ...) is caught.
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                names = ["offsets", "indices"]
                if isinstance(meta, dict) and meta.get("version") in _READS[1:]:
                    names += ["removed_offsets", "removed_units"]
                if isinstance(meta, dict) and meta.get("version") in (3, 4):
                    names += ["structure_offsets", "structure_indices"]
                if isinstance(meta, dict) and meta.get("per_expert"):
                    names += ["per_expert_offsets", "per_expert_indices"]
                arrays = {name: data[name] for name in names}
        except Exception as exc:
            raise InvalidPlanError(
                f"{where} is not a readable depprune plan ({type(exc).__name__}: "
                f"{_short(exc)}); write plans with Plan.save"
            ) from exc
        try:
            plan = cls._from_meta(meta, arrays)
        except InvalidPlanError as exc:
            raise InvalidPlanError(f"{where}: {exc}") from exc
        except Exception as exc:
            raise InvalidPlanError(
                f"{where} holds a malformed plan ({type(exc).__name__}: {_short(exc)}); "
                "it may be corrupt or from another depprune version"
            ) from exc
        if meta["version"] >= 2:
            summary, mine = read_summary(path), plan.summary()
            mine["version"] = meta["version"]  # a version-2 file loads as what it says it is
            copied = _COPIED + (("structure",) if meta["version"] >= 3 else ())
            copied += ("per_expert",) if meta["version"] >= 4 else ()
            disagree = [key for key in copied if summary.get(key) != mine[key]]
            if disagree:
                raise InvalidPlanError(
                    f"{where}: its {_SUMMARY} disagrees with the plan it summarises (on "
                    f"{', '.join(disagree)}); the file was edited or is corrupt: make the plan "
                    "again and save it with Plan.save"
                )
        return plan

    @classmethod
    def _from_meta(cls, meta: dict, arrays: dict[str, np.ndarray]) -> Plan:
        if not isinstance(meta, dict):
            raise InvalidPlanError(f"malformed plan: its metadata is a {type(meta).__name__}")
        version = meta.get("version")
        if meta.get("format") == _FORMAT and type(version) is int and version > _VERSION:
            raise InvalidPlanError(_newer(version))
        if meta.get("format") != _FORMAT or version not in _READS or type(version) is not int:
            raise InvalidPlanError(
                f"not a version-1 depprune plan, nor a version-2 one (format "
                f"{meta.get('format')!r}, version {version!r}); write plans with Plan.save"
            )
        members = [
            (_typed(m[0], str, "member name"), _typed(m[1], int, "member dim"))
            for m in _records(meta.get("members"), 2, "members")
        ]
        if len(set(members)) != len(members):
            raise InvalidPlanError("malformed plan: a (tensor, dim) is listed twice in members")
        kept = dict(
            zip(
                members,
                _unpacked(arrays["offsets"], arrays["indices"], len(members), "indices"),
                strict=True,
            )
        )
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
        if version >= 2:
            plan._read_v2_fields(meta, arrays)
        if version >= 3:
            plan.structure = from_file(
                meta.get("structure"), arrays["structure_offsets"], arrays["structure_indices"]
            )
        if version >= 4 and meta.get("per_expert"):
            plan.per_expert = _per_expert_rows(meta["per_expert"], arrays, plan)
        plan.validate()
        return plan

    def _read_v2_fields(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Check and set what version 2 added: who wrote it, for what, how; removed units."""
        self.depprune_version = _typed(meta.get("depprune_version"), str, "depprune_version")
        self.architecture = _checked_architecture(meta.get("architecture"))
        self.choices = _typed(meta.get("choices"), dict, "choices")
        kept_whole = _typed(meta.get("kept_whole"), dict, "kept_whole")
        for group, why in kept_whole.items():
            if not group.isdigit():
                raise InvalidPlanError(f"malformed plan: kept_whole names group {group!r:.80}")
            _typed(why, str, f"the reason group {group} was kept whole")
        self.kept_whole = {int(group): why for group, why in kept_whole.items()}
        removed = [
            _typed(g, int, "a group with removed units")
            for g in _typed(meta.get("removed"), list, "removed")
        ]
        if len(set(removed)) != len(removed):
            raise InvalidPlanError("malformed plan: removed lists a group twice")
        sizes = {choice.index: choice.size for choice in self.groups}
        units = _unpacked(
            arrays["removed_offsets"], arrays["removed_units"], len(removed), "removed units"
        )
        for group, ids in zip(removed, units, strict=True):
            size = sizes.get(group)
            if ids.size and (ids[0] < 0 or (size is not None and ids[-1] >= size)):
                raise InvalidPlanError(
                    f"the plan removes unit {int(ids[-1] if ids[0] >= 0 else ids[0])} of group "
                    f"{group}, which has {size} units; the plan file may be corrupt"
                )
            if np.any(np.diff(ids) <= 0):
                raise InvalidPlanError(f"the removed units of group {group} must be sorted, unique")
        self.removed = dict(zip(removed, units, strict=True))

    def __repr__(self) -> str:
        cut = sum(c.size - c.kept for c in self.groups)
        return f"Plan({len(self.kept)} parameter dims cut, {cut} units removed)"


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """What a plan for ``model`` records of it: class, HF config, every tensor's shape and dtype.

    ``tensors`` maps every parameter and buffer name (tied names too, with
    ``tied_to`` naming the first name of the same tensor) to its shape, dtype
    and kind; ``config`` is ``model.config.to_dict()`` made JSON-able, or
    ``None`` for a model without one. Nothing is read from the tensors' data,
    so a meta-device model gives the same record as the real one.

    >>> import torch
    >>> record = architecture_of(torch.nn.Linear(3, 4))
    >>> record["class"], record["config"], record["tensors"]["weight"]
    ('Linear', None, {'shape': [4, 3], 'dtype': 'float32', 'kind': 'parameter', 'tied_to': None})
    """
    tensors: dict[str, dict[str, Any]] = {}
    first_name: dict[int, str] = {}
    for name, (module, attr, is_param) in named_tensors(model).items():
        tensor = getattr(module, attr)
        first = first_name.setdefault(id(tensor), name)
        tensors[name] = {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "kind": "parameter" if is_param else "buffer",
            "tied_to": None if first == name else first,
        }
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    config = _jsonable(to_dict()) if callable(to_dict) else None
    return {
        "class": type(model).__name__,
        "config": config if isinstance(config, dict) else None,
        "tensors": tensors,
    }


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The ``summary.json`` of a plan file (:meth:`Plan.summary`), read with zipfile and json only.

    Needs neither numpy nor torch at run time: what a tool that lists plans,
    or a look before loading a large one, uses. A file that is not a version-2
    plan (a version-1 one has no summary) raises :class:`InvalidPlanError`.

    >>> import os, tempfile, torch, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "plan.npz")
    >>> kept = {("weight", 0): np.array([1]), ("bias", 0): np.array([1])}
    >>> Plan.from_kept(torch.nn.Linear(3, 4), kept).save(path)
    >>> summary = read_summary(path)
    >>> summary["architecture"]["class"], summary["totals"]["params_after"]
    ('Linear', 4)
    """
    where = _path_text(path)
    names: set[str] = set()
    summary = None
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if _SUMMARY in names:
                size = archive.getinfo(_SUMMARY).file_size
                if size > _MAX_SUMMARY_BYTES:
                    raise ValueError(f"its {_SUMMARY} claims {size} bytes, far more than a summary")
                summary = json.loads(archive.read(_SUMMARY).decode("utf-8"))
    except Exception as exc:  # whatever a damaged or hostile zip makes zipfile or json raise
        raise InvalidPlanError(
            f"{where} is not a readable depprune plan ({type(exc).__name__}: {_short(exc)}); "
            "write plans with Plan.save"
        ) from exc
    if summary is None and "removed_units.npy" in names:  # a member only version 2 writes
        raise InvalidPlanError(
            f"{where} is a version-2 plan file without its {_SUMMARY}: it is damaged; make the "
            "plan again and save it with Plan.save"
        )
    if summary is None and "meta.npy" in names:
        raise InvalidPlanError(
            f"{where} has no {_SUMMARY}: it is a version-1 plan file; Plan.load(path).summary() "
            "gives its summary, and Plan.load(path).save(path) rewrites it as version 2"
        )
    if summary is None:
        raise InvalidPlanError(f"{where} has no {_SUMMARY}, so it is not a depprune plan file")
    if not isinstance(summary, dict):
        raise InvalidPlanError(
            f"{where}: its {_SUMMARY} is a JSON {type(summary).__name__}, not an object; the "
            "file is corrupt"
        )
    version = summary.get("version")
    if summary.get("format") == _FORMAT and type(version) is int and version > _VERSION:
        raise InvalidPlanError(f"{where} {_newer(version)}")
    if summary.get("format") != _FORMAT or version not in _READS[1:]:
        raise InvalidPlanError(
            f"{where}: its {_SUMMARY} is not a version-2 or -3 depprune plan summary (format "
            f"{summary.get('format')!r:.80}, version {version!r:.80})"
        )
    fields = {"groups": list, "kept_whole": list, "totals": dict, "choices": dict}
    wrong = [key for key, kind in fields.items() if not isinstance(summary.get(key), kind)]
    if wrong or not all(isinstance(row, dict) for row in summary["groups"]):
        raise InvalidPlanError(
            f"{where}: its {_SUMMARY} lacks or misshapes {', '.join(wrong) or 'group rows'}; the "
            "file is corrupt"
        )
    return summary


def _depprune_version() -> str:
    import depprune  # here, not at the top: depprune's __init__ imports this module

    return depprune.__version__


def _newer(version: int) -> str:
    return (
        f"was written by a newer depprune (plan file version {version}; this depprune reads "
        f"versions {', '.join(map(str, _READS))}): upgrade depprune (pip install -U depprune) "
        "to read it"
    )


def _json_bytes(value: object, indent: int | None = None) -> bytes:
    return json.dumps(value, indent=indent, separators=None if indent else (",", ":")).encode()


def _tensors_hash(tensors: Mapping[str, Mapping[str, Any]]) -> str:
    names_and_shapes = sorted((name, list(entry["shape"])) for name, entry in tensors.items())
    return hashlib.blake2b(_json_bytes(names_and_shapes), digest_size=8).hexdigest()


def _per_expert_rows(members: object, arrays: dict[str, np.ndarray], plan: Plan) -> dict:
    """The per-expert indices of a version-4 file, each reshaped to [experts, kept]."""
    keys = [
        (_typed(m[0], str, "per-expert member name"), _typed(m[1], int, "per-expert member dim"))
        for m in _records(members, 2, "per_expert")
    ]
    if len(set(keys)) != len(keys):
        raise InvalidPlanError("malformed plan: a (tensor, dim) is listed twice in per_expert")
    flat = _unpacked(
        arrays["per_expert_offsets"], arrays["per_expert_indices"], len(keys), "per-expert indices"
    )
    rows = {}
    for key, values in zip(keys, flat, strict=True):
        planned, shape = plan.kept.get(key), plan.shapes.get(key[0])
        if planned is None or shape is None or values.size != shape[0] * planned.size:
            raise InvalidPlanError(
                f"malformed plan: the per-expert indices of {key[0]!r} dim {key[1]} do not "
                "match its kept indices"
            )
        rows[key] = values.reshape(shape[0], planned.size)
    return rows


def _packed(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and concatenation of int64 arrays (how a plan file stores lists of indices)."""
    offsets = np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    return offsets, values.astype(np.int64)


def _unpacked(offsets: object, values: object, count: int, what: str) -> list[np.ndarray]:
    """The ``count`` lists :func:`_packed` stored, after checking offsets and values fit."""
    if not isinstance(offsets, np.ndarray) or not isinstance(values, np.ndarray):
        raise InvalidPlanError(f"malformed plan: offsets and {what} must be arrays")
    if offsets.dtype != np.int64 or values.dtype != np.int64:
        raise InvalidPlanError(f"plan offsets and {what} must be int64 arrays")
    if values.ndim != 1:
        raise InvalidPlanError(f"malformed plan: {what} is a {values.ndim}-d array")
    if (
        offsets.shape != (count + 1,)
        or offsets[0] != 0
        or offsets[-1] != values.size
        or np.any(np.diff(offsets) < 0)
    ):
        raise InvalidPlanError(f"plan offsets do not split {values.size} {what} into {count} lists")
    return [values[offsets[i] : offsets[i + 1]].copy() for i in range(count)]


def _checked_architecture(value: object) -> dict[str, Any] | None:
    """A plan file's architecture record, after checking every field's type."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"class", "config", "tensors"}:
        raise InvalidPlanError(
            "malformed plan: its architecture must be a JSON object of class, config and tensors"
        )
    _typed(value["class"], str, "the architecture's class")
    if value["config"] is not None:
        _typed(value["config"], dict, "the architecture's config")
    tensors = _typed(value["tensors"], dict, "the architecture's tensors")
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or set(entry) != set(_TENSOR_FIELDS):
            raise InvalidPlanError(
                f"malformed plan: the architecture's record of {name!r:.80} must have "
                f"{', '.join(_TENSOR_FIELDS)}"
            )
        shape = _typed(entry["shape"], list, f"the recorded shape of {name!r:.80}")
        if not all(type(size) is int and size >= 0 for size in shape):
            raise InvalidPlanError(
                f"malformed plan: the recorded shape of {name!r:.80} is {shape!r:.80}"
            )
        _typed(entry["dtype"], str, f"the recorded dtype of {name!r:.80}")
        if entry["kind"] not in ("parameter", "buffer"):
            raise InvalidPlanError(f"malformed plan: {name!r:.80} is a {entry['kind']!r:.80}")
        tied_to = entry["tied_to"]
        first = tensors.get(tied_to) if isinstance(tied_to, str) else None
        if tied_to is not None and not (
            isinstance(first, dict) and first.get("tied_to") is None and first.get("shape") == shape
        ):
            raise InvalidPlanError(
                f"malformed plan: {name!r:.80} is recorded as tied to {tied_to!r:.80}, which is "
                "not a first name of a tensor of its shape"
            )
    return value


def _check_json(value: object, what: str, depth: int = 0) -> None:
    """Raise InvalidPlanError unless ``value`` is plain JSON (finite numbers, string keys)."""
    if depth > 32:
        raise InvalidPlanError(f"{what} nests deeper than 32 levels")
    if (
        value is None
        or isinstance(value, str | int)
        or (isinstance(value, float) and math.isfinite(value))
    ):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_json(item, what, depth + 1)
        return
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        for item in value.values():
            _check_json(item, what, depth + 1)
        return
    raise InvalidPlanError(
        f"{what} must hold only JSON values (strings, finite numbers, booleans, None, lists "
        f"and string-keyed dicts); {value!r:.80} is of type {type(value).__name__}: convert it "
        "(int(), float(), str(), list())"
    )


def _jsonable(value: object, depth: int = 0) -> object:
    """``value`` as plain JSON: tuples as lists, other objects (a torch.dtype, ...) as text."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < 32 and isinstance(value, list | tuple):
        return [_jsonable(item, depth + 1) for item in value]
    if depth < 32 and isinstance(value, dict):
        return {str(key): _jsonable(item, depth + 1) for key, item in value.items()}
    return str(value)


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
