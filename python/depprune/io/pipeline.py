"""io stage, the whole job from files: a checkpoint directory to a plan, or to a pruned checkpoint.

:func:`plan_checkpoint` builds the architecture on the meta device from
``config.json``, traces it, scores it from the checkpoint's files
(:func:`depprune.io.streamed`; Wanda's activations layer by layer with one
block's weights resident, :func:`depprune.io.layerwise.layerwise_wanda`), selects and
proves; :func:`prune_checkpoint` then streams the cut
(:func:`depprune.io.apply_to_checkpoint`). No step holds the model in memory.

>>> import tempfile, transformers
>>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/pruned"
>>> transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=16,
...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
...     vocab_size=10)).save_pretrained(src)
>>> plan, report = prune_checkpoint(src, out, ratio=0.5, kinds=("neurons",), progress=False)
>>> report.params_after < report.params_before
True
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from depprune.errors import CheckpointError, ImportanceError
from depprune.importance import Importance, magnitude, random
from depprune.io.checkpoint import Checkpoint
from depprune.io.scoring import streamed
from depprune.io.skeleton import example_inputs_for, load_skeleton
from depprune.io.streaming import (
    CheckpointReport,
    ProgressCallback,
    _check_destination,
    apply_to_checkpoint,
    check_architecture,
)
from depprune.plan import Plan

__all__ = ["IMPORTANCE_NAMES", "plan_checkpoint", "prune_checkpoint"]

#: The importance names the command line and :func:`plan_checkpoint` accept.
IMPORTANCE_NAMES = ("l2", "l1", "random", "wanda")


def _importance(
    name: str | Importance,
    checkpoint: Checkpoint,
    folder: str | os.PathLike,
    calibration: Iterable[Any] | None,
    progress: bool | None,
    names: dict[str, str],
) -> Importance:
    if callable(name):
        return streamed(name, checkpoint, names)
    if name == "l2":
        return streamed(magnitude(2), checkpoint, names)
    if name == "l1":
        return streamed(magnitude(1), checkpoint, names)
    if name == "random":
        return random(0)
    if name == "wanda":
        if calibration is None:
            raise ImportanceError(
                "importance 'wanda' needs calibration batches (e.g. token ids of shape "
                "(batch, length)); pass calibration=[...]"
            )
        from depprune.io.layerwise import layerwise_wanda

        return layerwise_wanda(folder, checkpoint, calibration, progress=progress)
    raise ImportanceError(
        f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCE_NAMES)} or pass "
        "a callable (group, ctx) -> scores"
    )


def _check_complete(checkpoint: Checkpoint, model: torch.nn.Module, where: dict) -> None:
    """Every parameter must be stored under its own name (or a tied one's), to be scored."""
    missing = [name for name, _ in model.named_parameters() if name not in where]
    if missing:
        stored = set(where.values())
        others = [name for name in checkpoint.names if name not in stored]
        raise CheckpointError(
            f"the checkpoint stores {len(missing)} of {type(model).__name__}'s parameters "
            f"under other names ({', '.join(missing[:2])} missing"
            + (f"; it has {', '.join(others[:2])}" if others else "")
            + "): transformers renames them on load (per-expert MoE weights are fused in "
            "transformers 5). Plan such a model in memory: from_pretrained, then "
            "depprune.make_plan / prune and save_pretrained"
        )


def plan_checkpoint(
    src_dir: str | os.PathLike,
    *,
    ratio: float = 0.5,
    kinds: Iterable[str] | None = None,
    importance: str | Importance = "l2",
    calibration: Iterable[Any] | None = None,
    example_inputs: Any = None,
    seq_len: int = 8,
    model: torch.nn.Module | None = None,
    progress: bool | None = None,
    **options: Any,
) -> Plan:
    """The plan for the checkpoint in ``src_dir``, made and proved without its weights in memory.

    ``importance`` is ``"l2"`` / ``"l1"`` (magnitude, one streamed pass over
    the tensors), ``"random"``, ``"wanda"`` (needs ``calibration``: token-id
    tensors or input dicts; run layer by layer) or a criterion of
    :mod:`depprune.importance` (its tensors are read from the files).
    ``example_inputs`` default to the model's main input on the meta device
    (:func:`depprune.io.skeleton.example_inputs_for`: ``input_ids`` of shape
    ``(1, seq_len)``, or ``pixel_values`` of the config's image size). Other ``options`` go to :func:`depprune.make_plan`
    (``round_to``, ``global_ranking``, ``ratios``, ``uniform``, ...).

    A checkpoint without ``config.json`` (any model saved with
    ``safetensors.torch.save_file(model.state_dict(), ...)``) is planned with
    ``model=`` giving its architecture (best built on the meta device) and
    ``example_inputs``; it is not changed.
    """
    from depprune.api import make_plan

    checkpoint = Checkpoint(src_dir)
    if model is None:
        model = load_skeleton(src_dir)
    elif example_inputs is None:
        raise CheckpointError("plan_checkpoint(model=...) needs example_inputs to trace it")
    where = check_architecture(checkpoint, model)
    _check_complete(checkpoint, model, where)
    if example_inputs is None:
        example_inputs = example_inputs_for(model, seq_len=seq_len)
    score = _importance(importance, checkpoint, src_dir, calibration, progress, where)
    plan = make_plan(
        model,
        example_inputs,
        ratio=ratio,
        kinds=kinds,
        importance=score,
        progress=progress,
        **options,
    )
    return plan


def prune_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    callback: ProgressCallback | None = None,
    **plan_options: Any,
) -> tuple[Plan, CheckpointReport]:
    """Plan (:func:`plan_checkpoint`) and write (:func:`apply_to_checkpoint`) in one call.

    Returns the plan (save it with ``plan.save``) and the write's report.
    """
    # A taken output directory fails now, not after the planning.
    _check_destination(Path(src_dir), Path(out_dir), overwrite)
    plan = plan_checkpoint(src_dir, progress=progress, **plan_options)
    report = apply_to_checkpoint(
        src_dir, plan, out_dir, overwrite=overwrite, progress=progress, callback=callback
    )
    return plan, report
