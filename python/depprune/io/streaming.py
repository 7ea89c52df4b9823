"""io stage, streaming apply: a checkpoint on disk and a plan to a pruned checkpoint on disk.

:func:`apply_to_checkpoint` proves the plan on the architecture built from
``config.json`` (on the meta device), checks every tensor the plan cuts
against the checkpoint's headers, then writes new shards tensor by tensor:
a cut tensor is read, cut and written (peak memory: about the largest
tensor, its cut and the next tensor read ahead); an uncut one is copied
by the kernel without entering this process. The output is written to a
temporary directory beside ``out_dir``, checked against the architecture
its new config describes, and renamed into place only when complete, so
an interrupted or failed run never leaves a half-written checkpoint.

>>> import tempfile, torch, transformers, depprune
>>> from depprune.io import apply_to_checkpoint, load_skeleton
>>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/pruned"
>>> config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...     num_attention_heads=2, num_key_value_heads=1, vocab_size=10)
>>> transformers.LlamaForCausalLM(config).save_pretrained(src)
>>> skeleton = load_skeleton(src)
>>> plan = depprune.make_plan(skeleton, {"input_ids": torch.zeros(1, 4, dtype=torch.long,
...     device="meta")}, importance=depprune.importance.random(0), kinds=("neurons",))
>>> report = apply_to_checkpoint(src, plan, out, progress=False)
>>> transformers.AutoConfig.from_pretrained(out).intermediate_size
16
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from depprune.apply import value_changes
from depprune.errors import CheckpointError, DeppruneError, PlanMismatchError
from depprune.io.checkpoint import INDEX_NAME, Checkpoint
from depprune.io.safetensors_files import (
    DTYPE_BYTES,
    TensorEntry,
    buffer_for,
    copy_range,
    cut_bytes,
    torch_dtype,
    write_all,
    write_header,
)
from depprune.io.skeleton import load_skeleton, stored_as
from depprune.plan import Plan
from depprune.shadow import meta_shadow

__all__ = ["CheckpointReport", "ProgressCallback", "apply_to_checkpoint", "check_architecture"]

#: ``callback(bytes_done, bytes_total, tensors_done, tensors_total)``, after each tensor.
ProgressCallback = Callable[[int, int, int, int], None]

# Weights in other formats are not copied: they would hold the unpruned model.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


@dataclass
class CheckpointReport:
    """What :func:`apply_to_checkpoint` wrote, and how fast."""

    out_dir: str
    tensors: int
    tensors_cut: int
    bytes_read: int
    bytes_written: int
    #: Elements stored in the checkpoint before and after (tied tensors once).
    params_before: int
    params_after: int
    seconds: float
    #: Files copied unchanged (tokenizer, generation config, ...).
    copied: list[str] = field(default_factory=list)
    #: Files left out: weights in other formats, which would hold the unpruned model.
    skipped: list[str] = field(default_factory=list)
    #: Checkpoint tensors the architecture does not name, copied unchanged.
    unmatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.bytes_read / self.seconds / 2**30 if self.seconds else float("nan")
        rows = [
            ("written to", self.out_dir),
            ("tensors", f"{self.tensors} ({self.tensors_cut} cut)"),
            ("parameters", f"{self.params_before:,} -> {self.params_after:,}"),
            (
                "GiB read / written",
                f"{self.bytes_read / 2**30:.3f} / {self.bytes_written / 2**30:.3f}",
            ),
            ("seconds", f"{self.seconds:.2f} ({rate:.2f} GiB/s read)"),
        ]
        if self.copied:
            rows.append(("files copied", ", ".join(self.copied)))
        if self.skipped:
            rows.append(("files left out", ", ".join(self.skipped)))
        if self.unmatched:
            rows.append(("copied uncut", ", ".join(self.unmatched[:5])))
        width = max(len(key) for key, _ in rows)
        return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def apply_to_checkpoint(
    src_dir: str | os.PathLike,
    plan: Plan,
    out_dir: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool | None = None,
    callback: ProgressCallback | None = None,
) -> CheckpointReport:
    """Write the checkpoint ``src_dir`` pruned by ``plan`` to ``out_dir``, a tensor at a time.

    ``src_dir`` is a Hugging Face safetensors checkpoint (``model.safetensors``
    or shards with ``model.safetensors.index.json``). Its architecture comes
    from ``config.json`` (:func:`depprune.io.load_skeleton`) unless ``model``
    gives it (any module with the checkpoint's tensor names; it is not
    changed). The plan is proved on that architecture first (``verify=False``
    skips the proof, not the checks of names and shapes). Tensors keep their
    dtypes and shards; ``config.json`` gets the new sizes; every other file
    (tokenizer, generation config) is copied.

    Raises :class:`CheckpointError`, before anything is written, when a tensor
    the plan cuts is missing or of another shape, when ``out_dir`` exists
    (unless ``overwrite=True``), or when the new config would not rebuild the
    pruned shapes; :class:`PlanMismatchError` when the plan does not hold.
    """
    started = time.perf_counter()
    src, out = Path(src_dir), Path(out_dir)
    if plan.structure:
        raise CheckpointError(
            f"the plan removes whole layers or experts ({'; '.join(plan.structure.describe())}), "
            "which renames and drops stored tensors; streaming does not do that yet: prune in "
            "memory (from_pretrained, plan.apply, save_pretrained)"
        )
    if plan.per_expert:
        raise CheckpointError(
            "the plan gives each expert its own neurons (per_expert), which transformers "
            "checkpoints store expert by expert and convert on load; streaming does not cut "
            "them: prune in memory (from_pretrained, plan.apply, save_pretrained)"
        )
    _check_destination(src, out, overwrite)
    checkpoint = Checkpoint(src)
    source_config = checkpoint.config
    if model is None:
        model = load_skeleton(src)
    else:
        model = meta_shadow(model)  # the caller's model stays as it is
    where = check_architecture(checkpoint, model)
    cuts, unmatched = _match_tensors(checkpoint, model, plan, where)
    folds = _stored_folds(model, plan, where)
    config_before = _config_dict(model)
    try:
        plan.apply(model, verify=verify)
    except DeppruneError:
        raise
    except Exception as exc:
        raise PlanMismatchError(
            f"the plan could not be applied to {type(model).__name__} built from {src}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    new_config = None
    if source_config is not None and config_before is not None:
        new_config = _with_changes(source_config, config_before, _config_dict(model))
    layout = _layout(checkpoint, cuts)
    temporary = out.parent / f".{out.name}.depprune-{uuid.uuid4().hex[:8]}"
    try:
        temporary.mkdir(parents=True)
        read, written = _write_shards(
            checkpoint, cuts, folds, layout, temporary, progress=progress, callback=callback
        )
        if checkpoint.index is not None:
            _write_index(checkpoint.index, layout, temporary)
        if new_config is not None:
            (temporary / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        copied, skipped = _copy_other_files(src, temporary, set(checkpoint.headers))
        if new_config is not None:
            _check_rebuilds(temporary, model, layout)
        _move_into_place(temporary, out)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise CheckpointError(
            f"writing the pruned checkpoint failed ({exc.strerror or exc}"
            + (f": {exc.filename}" if exc.filename else "")
            + f"); nothing was written to {os.fspath(out)!r}"
        ) from exc
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return report_of(out, layout, len(cuts), (read, written), started, copied, skipped, unmatched)


def report_of(
    out: Path,
    layout: Mapping[str, list[tuple[TensorEntry, TensorEntry]]],
    tensors_cut: int,
    read_written: tuple[int, int],
    started: float,
    copied: list[str],
    skipped: list[str],
    unmatched: list[str],
) -> CheckpointReport:
    """The report of one written folder, from its layout (source and output entries)."""
    pairs = [pair for shard in layout.values() for pair in shard]
    return CheckpointReport(
        out_dir=os.fspath(out),
        tensors=len(pairs),
        tensors_cut=tensors_cut,
        bytes_read=read_written[0],
        bytes_written=read_written[1],
        params_before=sum(math.prod(source.shape) for source, _ in pairs),
        params_after=sum(math.prod(new.shape) for _, new in pairs),
        seconds=time.perf_counter() - started,
        copied=copied,
        skipped=skipped,
        unmatched=unmatched,
    )


def _check_destination(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and out.resolve() == src.resolve():
        raise CheckpointError(
            f"the output {os.fspath(out)!r} is the checkpoint being read; write to a new directory"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"the output {os.fspath(out)!r} exists and is not a directory")
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"the output directory {os.fspath(out)!r} exists; choose another or pass "
            "overwrite=True (--overwrite) to replace it once the new one is complete"
        )


def _match_tensors(
    checkpoint: Checkpoint, model: nn.Module, plan: Plan, where: Mapping[str, str]
) -> tuple[dict[str, dict[int, np.ndarray]], list[str]]:
    """The cuts by stored tensor name; and the stored tensors the model does not name.

    ``where`` maps model names to stored ones (:func:`check_architecture`).
    Every check that can fail runs here, before anything is written.
    """
    state = model.state_dict(keep_vars=True)

    cuts: dict[str, dict[int, np.ndarray]] = {}
    for (name, dim), kept in plan.kept.items():
        found = where.get(name)
        if found is None:
            if name not in state:
                continue  # a buffer the model does not save: the constructor rebuilds it
            raise CheckpointError(
                f"the plan cuts {name!r}, which the checkpoint does not store (nor any tied "
                "copy of it); a checkpoint whose tensors transformers renames on load "
                "(per-expert MoE weights, legacy names) must be pruned in memory: "
                "from_pretrained, plan.apply, save_pretrained"
            )
        shape = checkpoint.shape(found)
        if shape != plan.shapes[name]:
            raise CheckpointError(
                f"the plan was made for {name!r} of shape {list(plan.shapes[name])}, but the "
                f"checkpoint's {found!r} has shape {list(shape)}; make the plan for this "
                "checkpoint"
            )
        previous = cuts.setdefault(found, {}).get(dim)
        if previous is not None and not np.array_equal(previous, kept):
            raise PlanMismatchError(
                f"the plan cuts the tied names of {found!r} dim {dim} differently"
            )
        cuts[found][dim] = kept
    for name in cuts:
        if checkpoint.entry(name).dtype not in DTYPE_BYTES:
            raise CheckpointError(
                f"{name!r} is stored as {checkpoint.entry(name).dtype}, whose elements are "
                "not whole bytes, so it cannot be cut on disk; dequantize the checkpoint first"
            )
    known = set(where.values())
    unmatched = [name for name in checkpoint.names if name not in known]
    changed = set(plan.widths) | {plan.shapes[n][d] for n, d in plan.kept}
    for name in unmatched:
        shape = checkpoint.shape(name)
        if any(size in changed for size in shape):
            raise CheckpointError(
                f"the checkpoint stores {name!r} (shape {list(shape)}), which "
                f"{type(model).__name__} has no tensor named like, and a size of it is a "
                "width the plan changes, so it cannot be copied uncut; transformers may "
                "rename it on load: prune in memory (from_pretrained, plan.apply, "
                "save_pretrained)"
            )
    return cuts, unmatched


def _stored_folds(
    model: nn.Module, plan: Plan, where: Mapping[str, str]
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The cut's value changes (a scaled embedding's old scale), by stored tensor name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plan.apply on the skeleton warns once, next
        folds, replaced = value_changes(model, plan.kept, plan.widths)
    # A tensor the cut gives new values (not a cut of the old ones) cannot come from the files.
    stored_replaced = [name for name in replaced if name in where]
    if stored_replaced:
        raise CheckpointError(
            f"the cut gives {stored_replaced[0]!r} new values, which a streamed cut cannot "
            "compute; prune in memory (from_pretrained, plan.apply, save_pretrained)"
        )
    stored = {}
    for name, fold in folds.items():
        if name not in where:
            raise CheckpointError(
                f"the cut rescales {name!r}, which the checkpoint does not store; prune in "
                "memory (from_pretrained, plan.apply, save_pretrained)"
            )
        stored[where[name]] = fold
    return stored


def check_architecture(checkpoint: Checkpoint, model: nn.Module) -> dict[str, str]:
    """Each model tensor name -> the checkpoint name storing it; shapes must agree.

    Raises :class:`CheckpointError` on the first stored tensor whose shape is
    not the architecture's (a config that is not the checkpoint's own).
    """
    where = stored_as(model, checkpoint.names)
    state = model.state_dict(keep_vars=True)
    for name, found in where.items():
        if checkpoint.shape(found) != tuple(state[name].shape):
            raise CheckpointError(
                f"the checkpoint's {found!r} has shape {list(checkpoint.shape(found))}, but "
                f"{type(model).__name__} built from its config has {list(state[name].shape)}; "
                "is config.json the checkpoint's own?"
            )
    return where


def _config_dict(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return copy.deepcopy(config.to_dict()) if hasattr(config, "to_dict") else None


def _with_changes(source: dict, before: dict, after: dict) -> dict:
    """``source`` (config.json as written) with the fields the cut changed, nested too."""
    result = dict(source)
    for key, value in after.items():
        old = before.get(key)
        if value == old:
            continue
        if isinstance(value, dict) and isinstance(old, dict) and isinstance(result.get(key), dict):
            result[key] = _with_changes(result[key], old, value)
        else:
            result[key] = value
    return result


def _layout(
    checkpoint: Checkpoint, cuts: Mapping[str, Mapping[int, np.ndarray]]
) -> dict[str, list[tuple[TensorEntry, TensorEntry]]]:
    """Per shard, in data order: (source entry, output entry with new shape and offsets)."""
    layout = {}
    for file, header in checkpoint.headers.items():
        offset = 0
        pairs = []
        for entry in sorted(header.tensors.values(), key=lambda e: e.begin):
            dims = cuts.get(entry.name, {})
            shape = tuple(dims[d].size if d in dims else s for d, s in enumerate(entry.shape))
            size = entry.nbytes if not dims else math.prod(shape) * DTYPE_BYTES[entry.dtype]
            pairs.append(
                (entry, TensorEntry(entry.name, entry.dtype, shape, offset, offset + size))
            )
            offset += size
        layout[file] = pairs
    return layout


def _write_shards(
    checkpoint: Checkpoint,
    cuts: Mapping[str, Mapping[int, np.ndarray]],
    folds: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    layout: Mapping[str, list[tuple[TensorEntry, TensorEntry]]],
    folder: Path,
    *,
    progress: bool | None,
    callback: ProgressCallback | None,
) -> tuple[int, int]:
    """Write every shard; returns (bytes read, bytes written)."""
    total = checkpoint.nbytes
    count = sum(len(pairs) for pairs in layout.values())
    order = [(file, source) for file, pairs in layout.items() for source, _ in pairs]
    rewritten = set(cuts) | set(folds)
    upcoming = iter([(f, s) for f, s in order if s.name in rewritten])
    done_bytes = done_tensors = written = 0
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="writing checkpoint",
        disable=None if progress is None else not progress,
    )
    # One read ahead of the cut being made: the disk keeps busy while the CPU cuts.
    with ThreadPoolExecutor(max_workers=1) as reader, bar:
        # Two read buffers take turns: the one being cut and the one being filled.
        largest = max((s.nbytes for _, s in order if s.name in rewritten), default=0)
        buffers = [buffer_for(largest) for _ in range(2 if largest else 0)]

        def read_next() -> Future | None:
            step = next(upcoming, None)
            if step is None:
                return None
            buffers.reverse()
            return reader.submit(checkpoint.read_raw, step[1].name, buffers[0])

        pending = read_next()
        for file, pairs in layout.items():
            header = checkpoint.headers[file]
            with (
                open(header.path, "rb") as source_file,
                open(folder / file, "wb", buffering=0) as out,
            ):
                write_header(out, [new for _, new in pairs], header.metadata)
                for source, new in pairs:
                    if source.name in rewritten:
                        assert pending is not None
                        raw = pending.result()
                        pending = read_next()
                        data = cut_bytes(raw, source, cuts.get(source.name, {}))
                        if source.name in folds:
                            _fold(data, new, folds[source.name])
                        write_all(out, data)
                        del raw, data
                    else:
                        copy_range(
                            source_file, out, header.data_start + source.begin, source.nbytes
                        )
                    written += new.nbytes
                    done_bytes += source.nbytes
                    done_tensors += 1
                    bar.update(source.nbytes)
                    if callback is not None:
                        callback(done_bytes, total, done_tensors, count)
                os.fsync(out.fileno())
    return done_bytes, written


def _fold(data: np.ndarray, entry: TensorEntry, fold: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``fold`` in place to the cut bytes ``data``, in the tensor's own dtype."""
    dtype = torch_dtype(entry.dtype)
    if dtype is None or not dtype.is_floating_point:
        raise CheckpointError(f"the cut rescales {entry.name!r}, stored as {entry.dtype}")
    fold(torch.from_numpy(data).view(dtype).view(entry.shape))


def _write_index(
    index: dict, layout: Mapping[str, list[tuple[TensorEntry, TensorEntry]]], folder: Path
) -> None:
    entries = [new for pairs in layout.values() for _, new in pairs]
    new = dict(index)
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(e.nbytes for e in entries)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(math.prod(e.shape) for e in entries)
    new["metadata"] = metadata
    (folder / INDEX_NAME).write_text(json.dumps(new, indent=2, sort_keys=False) + "\n")


def _copy_other_files(src: Path, folder: Path, shards: set[str]) -> tuple[list[str], list[str]]:
    """Copy every file but the weights; returns (copied, left out)."""
    copied, skipped = [], []
    for path in sorted(src.iterdir()):
        name = path.name
        if name in shards or name in (INDEX_NAME, "config.json") or name.startswith("."):
            continue
        if name.endswith(_OTHER_WEIGHTS) or name.endswith((".bin.index.json", ".safetensors")):
            skipped.append(name)
        elif path.is_dir():
            shutil.copytree(path, folder / name)
            copied.append(name + "/")
        else:
            shutil.copy2(path, folder / name)
            copied.append(name)
    return copied, skipped


def _check_rebuilds(
    folder: Path, cut_model: nn.Module, layout: Mapping[str, list[tuple[TensorEntry, TensorEntry]]]
) -> None:
    """The new config must build the architecture whose shapes were written."""
    written = {new.name: new.shape for pairs in layout.values() for _, new in pairs}
    rebuilt = load_skeleton(folder)
    stored = stored_as(rebuilt, written)
    expected = {n: tuple(t.shape) for n, t in cut_model.state_dict(keep_vars=True).items()}
    for name, tensor in rebuilt.state_dict(keep_vars=True).items():
        shape = tuple(tensor.shape)
        on_disk = written.get(stored[name]) if name in stored else None
        for where, other in (("written", on_disk), ("cut", expected.get(name))):
            if other is not None and other != shape:
                raise CheckpointError(
                    f"the pruned config.json builds {name!r} with shape {list(shape)}, but the "
                    f"{where} tensor has {list(other)}, so from_pretrained could not load it; "
                    "nothing was written. Prune every layer alike (local ranking, no "
                    "per-layer ratios) so one config describes the model"
                )


def _move_into_place(temporary: Path, out: Path) -> None:
    """Rename the finished directory to ``out`` (replacing it only now, when asked to)."""
    old: Path | None = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(temporary, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
