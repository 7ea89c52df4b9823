"""Select and apply stages, tensor parallelism: plans every rank can cut alone, per-rank shards.

Tensor parallelism splits a linear's output rows (column-parallel: q/k/v,
gate/up) or its input columns (row-parallel: o, down) into equal contiguous
chunks, one per rank, as transformers' ``tp_plan`` styles say
(``"colwise"``, ``"rowwise"``, ``"packed_colwise"``, ...). A plan keeps the
model runnable on ``size`` ranks only if every rank keeps the same number of
heads and neurons from its own chunk: then rank r's part of the pruned
tensor is exactly the kept rows of its old part, each rank cuts its shard
alone, and the attention of every rank still sees whole heads.

:class:`TensorParallel` reads the split of every parameter from the model's
``tp_plan`` (or one given), makes selection keep equal shares
(``make_plan(..., tensor_parallel=2)``), checks a plan against the split
(:meth:`TensorParallel.check`), and translates the plan's kept indices into
each rank's local ones (:meth:`TensorParallel.local_kept`), which
:func:`apply_to_tp_shards` uses to cut checkpoints saved as one folder per
rank, a tensor at a time.

>>> import numpy as np
>>> split = Split(dim=0)
>>> split.local(np.array([0, 1, 4, 6]), size=8, ranks=2, rank=1).tolist()  # rows 4..7 live on rank 1
[0, 2]
>>> Split(dim=1, parts=2).local(np.array([0, 3, 4, 6]), size=8, ranks=2, rank=0).tolist()
[0, 2]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from depprune.errors import CheckpointError, PlanMismatchError, SelectionError

if TYPE_CHECKING:
    from depprune.graph import DependencyGraph, Group
    from depprune.plan import Plan

__all__ = ["Split", "TensorParallel", "apply_to_tp_shards", "split_of_style"]

#: transformers' tp_plan styles that split a module's weight: style -> (weight dim, bias split?, parts).
_MODULE_STYLES: dict[str, tuple[int, bool, int]] = {
    "colwise": (-2, True, 1),
    "colwise_rep": (-2, True, 1),
    "colwise_gather_output": (-2, True, 1),
    "rowwise": (-1, False, 1),
    "rowwise_rep": (-1, False, 1),
    "rowwise_split_input": (-1, False, 1),
    "packed_colwise": (-2, True, 2),
    "packed_rowwise": (-1, False, 2),
    "embedding_rowwise": (0, False, 1),
    "embedding_colwise": (1, False, 1),
}
#: Styles that keep every parameter whole on every rank (or only wrap the forward).
_WHOLE_STYLES = {
    "replicate",
    "replicated_with_grad_allreduce",
    "sequence_parallel",
    "all_reduce",
    "moe_tp_experts",
    "moe_identity_expert",
    "local_params",
}


@dataclass(frozen=True)
class Split:
    """How one tensor is split over the ranks: along ``dim``, in ``parts`` packed blocks.

    ``parts=2`` is a fused gate/up weight: each half is split on its own and
    rank r holds chunk r of every half, one after the other (transformers'
    ``_StridedShard``).
    """

    dim: int
    parts: int = 1

    def counts(self, kept: np.ndarray, size: int, ranks: int) -> np.ndarray:
        """Kept indices per (part, rank): the shares the ranks keep."""
        part, offset = np.divmod(np.asarray(kept, dtype=np.int64), size // self.parts)
        rank = offset // (size // self.parts // ranks)
        return np.bincount(part * ranks + rank, minlength=self.parts * ranks).reshape(
            self.parts, ranks
        )

    def local(self, kept: np.ndarray, size: int, ranks: int, rank: int) -> np.ndarray:
        """Rank ``rank``'s kept indices in its own shard (global sorted ``kept`` of ``size``)."""
        kept = np.asarray(kept, dtype=np.int64)
        part_len = size // self.parts
        chunk = part_len // ranks
        part, offset = np.divmod(kept, part_len)
        mine = offset // chunk == rank
        return part[mine] * chunk + offset[mine] - rank * chunk


def split_of_style(style: str, param: str, ndim: int) -> Split | None:
    """The split of parameter ``param`` (``"weight"``, ``"bias"``) of a module with ``style``.

    >>> split_of_style("colwise", "weight", 2), split_of_style("rowwise", "bias", 1)
    (Split(dim=0, parts=1), None)
    >>> split_of_style("packed_colwise", "gate_up_proj", 3)  # fused experts [E, 2I, H]
    Split(dim=1, parts=2)
    """
    if style in _WHOLE_STYLES:
        return None
    if style not in _MODULE_STYLES:
        raise SelectionError(
            f"tensor-parallel style {style!r} is not one depprune knows how a tensor is split "
            f"by ({', '.join(sorted(_MODULE_STYLES))} split; {', '.join(sorted(_WHOLE_STYLES))} "
            "do not); pass TensorParallel(size, plan={...}) with known styles"
        )
    dim, splits_bias, parts = _MODULE_STYLES[style]
    if ndim == 1:  # transformers splits a 1-d tensor plainly, even under a packed style
        return Split(0) if (splits_bias and param == "bias") or dim == 0 else None
    return Split(dim % ndim, parts)


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\*", r"[^.]+") + r"\Z")


@dataclass
class TensorParallel:
    """``size`` tensor-parallel ranks and the tp_plan (module or parameter pattern -> style).

    ``plan=None`` takes the model's own (transformers' ``model._tp_plan``, or
    the config's ``base_model_tp_plan`` under the base model's prefix).

    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> tp = TensorParallel(2, plan={"0": "colwise", "2": "rowwise"})
    >>> tp.splits(mlp)
    {'0.weight': Split(dim=0, parts=1), '0.bias': Split(dim=0, parts=1), '2.weight': Split(dim=1, parts=1)}
    """

    size: int
    plan: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise SelectionError(
                f"tensor_parallel needs the number of ranks, a positive int; got {self.size!r}"
            )

    @classmethod
    def of(cls, value: int | TensorParallel) -> TensorParallel:
        """``tensor_parallel=`` as make_plan takes it: a rank count or a TensorParallel."""
        return value if isinstance(value, TensorParallel) else cls(value)

    def plan_for(self, model: nn.Module) -> dict[str, str]:
        """The tp_plan in full parameter-path form."""
        if self.plan is not None:
            return dict(self.plan)
        own = getattr(model, "_tp_plan", None)
        if own:
            return dict(own)
        config = getattr(model, "config", None)
        base = getattr(config, "base_model_tp_plan", None) if config is not None else None
        if not base:
            raise SelectionError(
                f"{type(model).__name__} has no tensor-parallel plan (no _tp_plan, no "
                "config.base_model_tp_plan); pass TensorParallel(size, plan={'layers.*.mlp."
                "up_proj': 'colwise', ...}) naming how each module is split"
            )
        prefix = getattr(model, "base_model_prefix", "")
        prefix = f"{prefix}." if prefix and hasattr(model, prefix) else ""
        return {f"{prefix}{key}": style for key, style in base.items()}

    def splits(self, model: nn.Module) -> dict[str, Split]:
        """Every parameter the ranks split -> its :class:`Split`."""
        patterns = [(_pattern(name), style) for name, style in self.plan_for(model).items()]
        found: dict[str, Split] = {}
        for name, param in model.named_parameters():
            module_name, _, attr = name.rpartition(".")
            # An entry names one parameter (fused experts) or a module (its weight and bias);
            # the parameter's own entry wins over its module's.
            style = next((st for pattern, st in patterns if pattern.match(name)), None)
            if style is None:
                style = next((st for pattern, st in patterns if pattern.match(module_name)), None)
            split = split_of_style(style, attr, param.dim()) if style is not None else None
            if split is not None:
                found[name] = split
        return found

    def balanced_groups(
        self, graph: DependencyGraph, groups: Iterable[Group], model: nn.Module
    ) -> dict[int, int]:
        """Groups whose units lie in rank-sized contiguous blocks of a split tensor -> ranks.

        Selection keeps the same number of units from each block of such a
        group. A group whose units spread over every rank (query heads per KV
        head: the same slot of every KV head) needs nothing: each removal
        takes the same share from every rank, which :meth:`check` confirms.
        One probe per layer role: the first block removed alone must remove
        rows of rank 0 only, from every split member.
        """
        from depprune.selection import layer_role

        splits = self.splits(model)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        verdict: dict[tuple, str] = {}
        balanced: dict[int, int] = {}
        for group in groups:
            split_members = [
                (name, dim)
                for name, dim in group.members
                if name in splits and splits[name].dim == dim
            ]
            if not split_members:
                continue
            for name, dim in split_members:
                split, size = splits[name], shapes[name][dim]
                if size % (split.parts * self.size):
                    raise SelectionError(
                        f"{name!r} has {size} entries along dim {dim}, which {self.size} "
                        "tensor-parallel ranks cannot split evenly (group "
                        f"{group.index}); choose a tensor-parallel size that divides it, or "
                        "leave its module out of the plan (ignored=[...])"
                    )
            role = layer_role(group)
            if role not in verdict:
                verdict[role] = self._layout_of(graph, group, split_members, shapes, splits)
            if verdict[role] == "blocks":
                balanced[group.index] = self.size
            elif verdict[role] == "uneven":
                raise SelectionError(
                    f"group {group.index} ({group.size} units, first member "
                    f"{group.members[0][0]}) lies in blocks that {self.size} tensor-parallel "
                    "ranks cannot share evenly; choose a tensor-parallel size that divides "
                    "it, or leave its module out of the plan (ignored=[...])"
                )
        return balanced

    def _layout_of(self, graph, group, members, shapes, splits) -> str:
        """``"blocks"`` (rank r owns the r-th block of units), ``"spread"`` (every unit spans
        every rank alike), ``"uneven"`` (neither, with a count the ranks cannot share), or
        ``"other"`` (left to :meth:`check`)."""

        def counts(removed: np.ndarray) -> list[np.ndarray]:
            kept = graph.kept_indices({group.index: removed})
            found = []
            for name, dim in members:
                split, size = splits[name], shapes[name][dim]
                index = kept.get((name, dim), np.arange(size))
                full = size // split.parts // self.size
                found.append(full - split.counts(index, size, self.size))  # removed per rank
            return found

        if group.size % self.size == 0:
            removed = counts(np.arange(group.size // self.size))
            if all((r[:, 0] > 0).all() and (r[:, 1:] == 0).all() for r in removed):
                return "blocks"
        if all((r == r[0, 0]).all() and r[0, 0] > 0 for r in counts(np.arange(1))):
            return "spread"
        return "uneven" if group.size % self.size else "other"

    def check(self, plan: Plan) -> None:
        """Raise :class:`PlanMismatchError` unless every rank keeps an equal share of every split.

        Reads the splits make_plan recorded (``plan.choices``); a plan made for
        a multiple of ``size`` ranks holds for ``size`` too. :meth:`check_kept`
        checks against splits given directly.
        """
        recorded = plan.choices.get("tensor_parallel_splits")
        if recorded is None:
            raise PlanMismatchError(
                "the plan was not made for tensor parallelism; make it with "
                f"make_plan(..., tensor_parallel={self.size})"
            )
        self.check_kept(plan, {name: Split(*value) for name, value in recorded.items()})

    def check_kept(self, plan: Plan, splits: Mapping[str, Split]) -> None:
        """Every split tensor's kept indices: equal per rank, and equal over packed parts."""
        for (name, dim), kept in plan.kept.items():
            split = splits.get(name)
            if split is None or split.dim != dim:
                continue
            size = plan.shapes[name][dim]
            if size % (split.parts * self.size):
                raise PlanMismatchError(
                    f"{name!r} has {size} entries along dim {dim}, which {self.size} "
                    "tensor-parallel ranks do not split evenly; a plan cannot keep equal shares"
                )
            counts = split.counts(kept, size, self.size)
            if (counts != counts[0, 0]).any():
                raise PlanMismatchError(
                    f"{name!r} is split over {self.size} tensor-parallel ranks along dim {dim} "
                    f"and the plan keeps {counts.tolist()} of its entries per rank; every rank "
                    f"must keep the same share: make the plan with "
                    f"make_plan(..., tensor_parallel={self.size})"
                )

    def local_kept(self, plan: Plan, rank: int) -> dict[tuple[str, int], np.ndarray]:
        """The plan's kept indices as rank ``rank`` indexes its own shards."""
        if not 0 <= rank < self.size:
            raise PlanMismatchError(f"rank {rank} is not one of the {self.size} ranks")
        self.check(plan)
        splits = {
            name: Split(*value) for name, value in plan.choices["tensor_parallel_splits"].items()
        }
        local = {}
        for (name, dim), kept in plan.kept.items():
            split = splits.get(name)
            if split is not None and split.dim == dim:
                kept = split.local(kept, plan.shapes[name][dim], self.size, rank)
            local[(name, dim)] = kept
        return local

    def record(self, plan: Plan, model: nn.Module) -> None:
        """Store the size and the splits in the plan (saved with it), then check it."""
        splits = self.splits(model)
        plan.choices["tensor_parallel"] = self.size
        plan.choices["tensor_parallel_splits"] = {
            name: [split.dim, split.parts] for name, split in sorted(splits.items())
        }
        self.check_kept(plan, splits)


def check_model(plan: Plan, model: nn.Module) -> None:
    """Refuse a plan for a tensor-parallel model (transformers' ``tp_plan``) that splits unevenly.

    Such a model computes on each rank's local shard, so a cut that moves
    rows between ranks (as re-chunking an uneven count does) would split a
    head across ranks and run without an error.

    >>> import torch, depprune
    >>> check_model(depprune.Plan(kept={}, shapes={}), torch.nn.Linear(2, 2))  # not parallel
    """
    size = getattr(model, "_tp_size", None)
    if not isinstance(size, int) or size < 2 or not plan.kept:
        return
    TensorParallel(size).check(plan)


def apply_to_tp_shards(
    src_dirs: Sequence[str | os.PathLike],
    plan: Plan,
    out_dirs: Sequence[str | os.PathLike],
    *,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool | None = None,
) -> list[Any]:
    """Cut a checkpoint saved as one safetensors folder per tensor-parallel rank.

    ``src_dirs[r]`` holds rank r's shards (the full model's ``config.json``
    and each tensor's local part, as ``model.safetensors`` or indexed
    shards); ``plan`` was made with ``make_plan(..., tensor_parallel=len(src_dirs))``
    on the full model. Each rank's folder is written to ``out_dirs[r]`` a
    tensor at a time, cut with that rank's local indices, with the new
    ``config.json``. Every folder is checked (names, local shapes) before any
    is written, and a failure while writing leaves none of the outputs (each
    appears once all are complete). Returns one
    :class:`~depprune.io.CheckpointReport` per rank.
    """
    from depprune.io.checkpoint import Checkpoint
    from depprune.io.skeleton import load_skeleton, stored_as
    from depprune.io.streaming import (
        _check_destination,
        _config_dict,
        _copy_other_files,
        _layout,
        _move_into_place,
        _stored_folds,
        _with_changes,
        _write_index,
        _write_shards,
        report_of,
    )

    if len(src_dirs) != len(out_dirs) or not src_dirs:
        raise CheckpointError(
            f"apply_to_tp_shards needs one output folder per rank: {len(src_dirs)} sources, "
            f"{len(out_dirs)} outputs"
        )
    if plan.structure:
        raise CheckpointError(
            "the plan removes whole layers or experts; per-rank shards are cut for width plans "
            "only: prune in memory, or plan widths alone"
        )
    if plan.per_expert:
        raise CheckpointError(
            "the plan gives each expert its own neurons (per_expert), which a rank's shard "
            "cannot cut alone: prune in memory, or plan without per_expert"
        )
    tp = TensorParallel(len(src_dirs))
    tp.check(plan)  # a plan made for a multiple of the rank count holds too
    started = time.perf_counter()
    sources, outs = [Path(p) for p in src_dirs], [Path(p) for p in out_dirs]
    for src, out in zip(sources, outs, strict=True):
        _check_destination(src, out, overwrite)
    checkpoints = [Checkpoint(src) for src in sources]
    model = load_skeleton(sources[0])
    config_before = _config_dict(model)
    wheres = [stored_as(model, checkpoint.names) for checkpoint in checkpoints]
    # Value changes (a Gemma-style embedding scale) are elementwise: the same on every shard.
    folds = [_stored_folds(model, plan, where) for where in wheres]
    plan.apply(model, verify=verify)  # proves the plan on the full architecture (meta)
    new_config = _with_changes(checkpoints[0].config, config_before, _config_dict(model))
    splits = {name: Split(*v) for name, v in plan.choices["tensor_parallel_splits"].items()}
    per_rank = []
    for rank, (checkpoint, where) in enumerate(zip(checkpoints, wheres, strict=True)):
        local = tp.local_kept(plan, rank)
        cuts: dict[str, dict[int, np.ndarray]] = {}
        for (name, dim), kept in local.items():
            stored = where.get(name)
            if stored is None:
                raise CheckpointError(
                    f"rank {rank}'s folder {os.fspath(sources[rank])!r} has no tensor for "
                    f"{name!r}, which the plan cuts"
                )
            shape = checkpoint.shape(stored)
            split = splits.get(name)
            expected = plan.shapes[name][dim] // (tp.size if split and split.dim == dim else 1)
            if shape[dim] != expected:
                raise CheckpointError(
                    f"rank {rank}'s {stored!r} has {shape[dim]} entries along dim {dim}; its "
                    f"share of {plan.shapes[name][dim]} over {tp.size} ranks is {expected}: "
                    "the folders are not this model's tensor-parallel shards"
                )
            cuts.setdefault(stored, {})[dim] = kept
        per_rank.append(cuts)
    temporaries = [out.parent / f".{out.name}.depprune-{uuid.uuid4().hex[:8]}" for out in outs]
    reports = []
    try:
        for rank, (checkpoint, cuts) in enumerate(zip(checkpoints, per_rank, strict=True)):
            folder = temporaries[rank]
            folder.mkdir(parents=True)
            layout = _layout(checkpoint, cuts)
            read, written = _write_shards(
                checkpoint, cuts, folds[rank], layout, folder, progress=progress, callback=None
            )
            if checkpoint.index is not None:
                _write_index(checkpoint.index, layout, folder)
            (folder / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
            copied, skipped = _copy_other_files(sources[rank], folder, set(checkpoint.headers))
            reports.append(
                report_of(
                    outs[rank], layout, len(cuts), (read, written), started, copied, skipped, []
                )
            )
        for folder, out in zip(temporaries, outs, strict=True):
            _move_into_place(folder, out)
    except BaseException:
        for folder in temporaries:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return reports
