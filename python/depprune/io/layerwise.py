"""io stage, layer by layer: calibration batches and a checkpoint to Wanda's activation norms,
with one block's weights in memory at a time.

The model is built from ``config.json`` with parameters on the meta device
and the buffers its constructor computes. Everything outside the stack of
repeated blocks (embeddings, final norm, head: a small part of an LLM) is
read from the files; the inputs of the first block are caught per batch;
then each block in turn is read, run on every batch (hooks add up the
squared norm of every linear layer's input features), and dropped, its
outputs becoming the next block's inputs. A last pass runs the rest of the
model on the final hidden states, checking that the blocks form a chain
(each block reads the previous one's output), which the block-by-block run
assumes.

>>> import tempfile, torch, transformers
>>> from depprune.io import Checkpoint
>>> folder = tempfile.mkdtemp()
>>> transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=16,
...     intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
...     vocab_size=10)).save_pretrained(folder)
>>> score = layerwise_wanda(folder, Checkpoint(folder), [torch.tensor([[1, 2, 3]])],
...                         progress=False)
>>> score.input_norms["model.layers.1.mlp.down_proj.weight"].shape
torch.Size([32])
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from depprune.errors import DeppruneError, ImportanceError
from depprune.importance.activations import input_square_sums, wanda_from_sums
from depprune.importance.context import Importance, _quiet
from depprune.io.checkpoint import Checkpoint
from depprune.io.scoring import streamed
from depprune.io.skeleton import _model_class, load_config, real_buffers, stored_as
from depprune.tracer import split_inputs

__all__ = ["blocks_of", "layerwise_wanda"]


class _Caught(Exception):
    """Raised by the hook on the first block once its inputs are recorded."""


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of repeated blocks: the ModuleList of one class holding the most parameters.

    >>> model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3))
    >>> blocks_of(model)[0]
    '0'
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ImportanceError(
            f"{type(model).__name__} has no stack of repeated blocks (a ModuleList of one "
            "class) to run layer by layer; load the model and use depprune.importance.wanda"
        )
    return best[1], best[2]


class _Resident:
    """Reads a module's parameters from the checkpoint, and puts the meta ones back after."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.stored = stored_as(model, checkpoint.names)
        self.prefix_of = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        #: id of each resident parameter -> the meta parameter it stands in for (kept alive,
        #: so its id stays its own), and the reverse, so a tied copy shares the tensor read.
        self.meta_of: dict[int, nn.Parameter] = {}
        self.real_of: dict[int, nn.Parameter] = {}

    def load(self, module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
        skipped = {id(p) for s in skip for p in s.parameters()}
        prefix = self.prefix_of[id(module)]
        for name, owner in module.named_modules(prefix=prefix, remove_duplicate=False):
            for attr, param in list(owner._parameters.items()):
                if param is None or id(param) in skipped or not param.is_meta:
                    continue
                full = f"{name}.{attr}" if name else attr
                stored = self.stored.get(full)
                if stored is None:
                    raise ImportanceError(
                        f"the checkpoint does not store {full!r}, which the layer-by-layer "
                        "forward needs; is config.json the checkpoint's own?"
                    )
                real = self.real_of.get(id(param))
                if real is None:
                    real = nn.Parameter(self.checkpoint.read(stored), requires_grad=False)
                    self.real_of[id(param)] = real
                    self.meta_of[id(real)] = param
                owner._parameters[attr] = real

    def drop(self, module: nn.Module) -> None:
        """Put the meta parameters back: nothing holds the tensors read any more."""
        for owner in module.modules():
            for attr, param in list(owner._parameters.items()):
                meta = self.meta_of.get(id(param)) if param is not None else None
                if meta is not None:
                    owner._parameters[attr] = meta
                    self.real_of.pop(id(meta), None)
        resident = {id(p) for p in self.real_of.values()}
        self.meta_of = {k: v for k, v in self.meta_of.items() if k in resident}


def _skeleton_with_buffers(folder: str | os.PathLike) -> nn.Module:
    config = load_config(folder)
    with real_buffers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model_class(config)(config)
    return model.eval()


def _hidden_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first_input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def layerwise_wanda(
    folder: str | os.PathLike,
    checkpoint: Checkpoint,
    calibration: Iterable[Any],
    *,
    progress: bool | None = None,
) -> Importance:
    """Wanda's importance for the checkpoint in ``folder``, run one block at a time.

    ``calibration`` holds batches as the model takes them (token-id tensors,
    or dicts of inputs). Peak memory: the weights outside the blocks, one
    block's weights and the batches' hidden states. The returned importance
    reads the weights from ``checkpoint`` when it scores
    (:func:`depprune.io.streamed`).
    """
    try:
        return _layerwise_wanda(folder, checkpoint, calibration, progress)
    except DeppruneError:
        raise
    except Exception as exc:
        raise ImportanceError(
            f"the layer-by-layer Wanda forward failed ({type(exc).__name__}: {str(exc)[:300]}); "
            "check that the calibration batches are inputs the model takes, or load the model "
            "and use depprune.importance.wanda"
        ) from exc


def _layerwise_wanda(
    folder: str | os.PathLike,
    checkpoint: Checkpoint,
    calibration: Iterable[Any],
    progress: bool | None,
) -> Importance:
    model = _skeleton_with_buffers(folder)
    prefix, blocks = blocks_of(model)
    resident = _Resident(model, checkpoint)
    resident.load(model, skip=(blocks,))
    batches = [split_inputs(batch) for batch in calibration]
    if not batches:
        raise ImportanceError("calibration gave no batches; pass a list of example inputs")
    takes_cache = _accepts(model.forward, "use_cache")
    with torch.no_grad(), input_square_sums(model) as (sums, input_dims, counting):
        # 1. The first block's inputs, per batch (nothing counted: the last pass counts it).
        counting["on"] = False
        caught: list[tuple[tuple, dict]] = []

        def catch(_module, args, kwargs):
            caught.append((args, kwargs))
            raise _Caught

        handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for args, kwargs in batches:
                kwargs = {**kwargs, "use_cache": False} if takes_cache else kwargs
                try:
                    model(*args, **kwargs)
                except _Caught:
                    continue
                raise ImportanceError(
                    f"{type(model).__name__}'s forward never ran its block stack {prefix!r}; "
                    "load the model and use depprune.importance.wanda"
                )
        finally:
            handle.remove()
        # 2. Block by block: read, run every batch, drop.
        counting["on"] = True
        states = caught
        outputs: list[Any] = []
        for block in tqdm(blocks, desc="wanda, layer by layer", disable=_quiet(progress)):
            resident.load(block)
            outputs = [block(*args, **kwargs) for args, kwargs in states]
            states = [
                _with_hidden(args, kwargs, _hidden_of(out))
                for (args, kwargs), out in zip(states, outputs, strict=True)
            ]
            resident.drop(block)
        # 3. The rest of the model on the final hidden states; blocks return them.
        _run_tail(model, blocks, batches, outputs, takes_cache)
    return streamed(wanda_from_sums(sums, input_dims), checkpoint, resident.stored)


def _run_tail(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[tuple[tuple, dict]],
    outputs: list[Any],
    takes_cache: bool,
) -> None:
    """Run the model with each block answering the final output it already computed."""
    for (args, kwargs), final in zip(batches, outputs, strict=True):
        final_hidden = _hidden_of(final)
        seen = {"count": 0}

        def answer(*block_args, _final=final, _hidden=final_hidden, seen=seen, **block_kwargs):
            if seen["count"] and _first_input(block_args, block_kwargs) is not _hidden:
                raise ImportanceError(
                    "a block of the stack reads something other than the previous block's "
                    "output, so it cannot be run layer by layer; load the model and use "
                    "depprune.importance.wanda"
                )
            seen["count"] += 1
            return _final

        for block in blocks:
            block.forward = answer  # type: ignore[method-assign]
        try:
            kwargs = {**kwargs, "use_cache": False} if takes_cache else kwargs
            model(*args, **kwargs)
        finally:
            for block in blocks:
                del block.forward
        if seen["count"] != len(blocks):
            raise ImportanceError(
                f"the forward ran {seen['count']} of {len(blocks)} blocks; it cannot be run "
                "layer by layer"
            )


def _accepts(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
