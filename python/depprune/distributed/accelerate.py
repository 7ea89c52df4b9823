"""Apply stage, offloaded tensors: accelerate's meta placeholders to their real values and cuts.

A model dispatched by accelerate (``dispatch_model``, ``cpu_offload``,
``disk_offload``, transformers' ``device_map`` with offload) keeps an
offloaded tensor as a meta placeholder in its module and the values in the
module's ``AlignDevicesHook.weights_map``: a dict in memory, or an
``OffloadedWeightsLoader`` reading ``.dat`` files of its offload folder or
the checkpoint's safetensors files. :func:`offloaded_entries` finds every
such tensor; an :class:`OffloadedEntry` reads the real values (for scoring)
and cuts them in their storage, staged first and committed with the model's
swap: a dict entry is replaced, a disk tensor is written to a new ``.dat``
file of the offload folder (a checkpoint file is never written) and the
folder's ``index.json`` gets the new shape. :func:`shadow_memo` and
:func:`strip_offload_hooks` make a meta shadow of such a model without
copying the offloaded values and without the hooks, which would move meta
tensors to the execution device.

>>> import torch, accelerate
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3))
>>> model = accelerate.cpu_offload(model, execution_device="cpu")
>>> entry = offloaded_entries(model)["0.weight"]
>>> model[0].weight.device.type, entry.read().device.type, tuple(entry.read().shape)
('meta', 'cpu', (3, 2))
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from depprune.errors import PlanMismatchError

__all__ = [
    "OffloadedEntry",
    "offloaded_entries",
    "offloaded_values",
    "shadow_memo",
    "strip_offload_hooks",
]

#: Suffixes of the files a cut stages and backs up beside an offloaded tensor's ``.dat``.
_NEW, _OLD = ".depprune-new", ".depprune-old"


def _align_hooks(module: nn.Module) -> list[Any]:
    """The AlignDevicesHooks on ``module`` (one, or several inside a SequentialHook)."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    hooks = getattr(hook, "hooks", (hook,))
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _has_hooks(model: nn.Module) -> bool:
    return any("_hf_hook" in module.__dict__ for module in model.modules())


class OffloadedEntry:
    """One offloaded tensor: where its values live, to read them and to cut them there."""

    def __init__(self, store: Any, key: str, hooks: list[Any]) -> None:
        #: The dict or OffloadedWeightsLoader holding the values, under ``key``.
        self.store, self.key, self.hooks = store, key, hooks
        self._staged: torch.Tensor | None = None
        self._undo: list[Callable[[], None]] = []

    def read(self) -> torch.Tensor:
        """The real values, on the CPU (read from disk each call when offloaded there)."""
        return self.store[self.key]

    @property
    def folder(self) -> str | None:
        """The offload folder a disk tensor is (re)written to; ``None`` for memory."""
        if isinstance(self.store, dict) or self.key in getattr(self.store, "state_dict", {}):
            return None
        return getattr(self.store, "save_folder", None)

    def stage(self, cut: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Build the cut values (``cut`` of the real ones); a disk tensor is written aside."""
        new = cut(self.read()).contiguous()
        folder = self.folder
        if folder is None and not isinstance(self.store, dict) and self.key in self.store.index:
            raise PlanMismatchError(
                f"the offloaded tensor {self.key!r} is read from a checkpoint file and its "
                "OffloadedWeightsLoader has no save_folder to write the cut values to; "
                "dispatch the model with an offload_folder"
            )
        if folder is not None:
            path = os.path.join(folder, f"{self.key}.dat{_NEW}")
            _write_dat(path, new)
            new = new.to("meta")  # only the shape and dtype: the values are in the file
        self._staged = new

    def commit(self) -> Callable[[], None]:
        """Put the staged values in the storage; gives the callable that undoes it."""
        if self._staged is None:
            raise PlanMismatchError(f"the offloaded tensor {self.key!r} was not staged")
        new, self._staged = self._staged, None
        old_ptr = self._old_pointer()
        folder = self.folder
        if folder is None:
            target = self.store if isinstance(self.store, dict) else self.store.state_dict
            old = target[self.key]
            target[self.key] = new

            def restore() -> None:
                target[self.key] = old

        else:
            dat = os.path.join(folder, f"{self.key}.dat")
            had_file = os.path.exists(dat)
            if had_file:
                os.replace(dat, dat + _OLD)
            os.replace(dat + _NEW, dat)
            old_info = self.store.index[self.key]
            self.store.index[self.key] = {
                "dtype": str(new.dtype).removeprefix("torch."),
                "shape": list(new.shape),
            }

            def restore() -> None:
                self.store.index[self.key] = old_info
                if had_file:
                    os.replace(dat + _OLD, dat)
                else:
                    os.remove(dat)

        self._retie(old_ptr)
        return restore

    def discard(self) -> None:
        """Remove what :meth:`stage` wrote, and backups left by a commit that stays."""
        self._staged = None
        folder = self.folder
        if folder is not None:
            for suffix in (_NEW, _OLD):
                path = os.path.join(folder, f"{self.key}.dat{suffix}")
                if os.path.exists(path):
                    os.remove(path)

    def _old_pointer(self) -> int | None:
        if isinstance(self.store, dict) or self.key in self.store.state_dict:
            return self.read().data_ptr()
        return None

    def _retie(self, old_ptr: int | None) -> None:
        """accelerate keys tied weights by the data pointer of their stored values."""
        if old_ptr is None:
            return
        for hook in self.hooks:
            tied = getattr(hook, "tied_params_map", None)
            if tied is not None and old_ptr in tied:
                tied[self.read().data_ptr()] = tied.pop(old_ptr)


def _write_dat(path: str, tensor: torch.Tensor) -> None:
    """A tensor as accelerate's raw ``.dat`` (bfloat16 as int16 bits, as accelerate does)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    array = tensor.cpu().numpy()
    if array.ndim == 0:
        array = array[None]
    mapped = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
    mapped[...] = array
    mapped.flush()
    del mapped


def write_indexes(entries: list[OffloadedEntry]) -> Callable[[], None]:
    """Rewrite the ``index.json`` of every offload folder a cut wrote to; gives the undo."""
    restores = []
    done: set[int] = set()
    for entry in entries:
        folder = entry.folder
        if folder is None or id(entry.store) in done:
            continue
        done.add(id(entry.store))
        path = os.path.join(folder, "index.json")
        old = open(path, "rb").read() if os.path.exists(path) else None
        on_disk = json.loads(old) if old is not None else {}
        # Only .dat entries belong in the folder's index (checkpoint entries live elsewhere).
        on_disk.update({k: v for k, v in entry.store.index.items() if "safetensors_file" not in v})
        with open(path, "w") as f:
            json.dump(on_disk, f, indent=2)

        def restore(path: str = path, old: bytes | None = old) -> None:
            if old is None:
                os.remove(path)
            else:
                with open(path, "wb") as f:
                    f.write(old)

        restores.append(restore)
    return lambda: [restore() for restore in reversed(restores)]


def offloaded_entries(model: nn.Module) -> dict[str, OffloadedEntry]:
    """Every offloaded tensor of ``model`` by name: meta in the module, values in a hook's map.

    Empty (and accelerate not imported) when no module carries an accelerate hook.

    >>> offloaded_entries(torch.nn.Linear(2, 2))
    {}
    """
    if not _has_hooks(model):
        return {}
    found: dict[str, OffloadedEntry] = {}
    for module_name, module in model.named_modules():
        for hook in _align_hooks(module):
            if not hook.offload or hook.weights_map is None:
                continue
            store, prefix = _store_of(hook.weights_map)
            prefix_here = f"{module_name}." if module_name else ""
            tensors = _module_tensors(module, recurse=hook.place_submodules)
            for local, tensor in tensors:
                key = prefix + local
                if tensor.is_meta and _holds(store, key):
                    found[prefix_here + local] = OffloadedEntry(store, key, [hook])
    return found


def _store_of(weights_map: Any) -> tuple[Any, str]:
    """The underlying store of a weights map and the prefix its keys carry there."""
    prefix = ""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):
        prefix = weights_map.prefix + prefix
        weights_map = weights_map.dataset
    return weights_map, prefix


def _holds(store: Any, key: str) -> bool:
    if isinstance(store, dict):
        return key in store
    # Not ``key in store``: an OffloadedWeightsLoader would read the tensor to answer.
    return key in getattr(store, "state_dict", {}) or key in getattr(store, "index", {})


def _module_tensors(module: nn.Module, *, recurse: bool) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=recurse)
    yield from module.named_buffers(recurse=recurse)


def offloaded_values(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """The real values of every offloaded tensor by name, read on first use and kept.

    What scoring reads instead of the meta placeholders; a read value stays
    for the mapping's life, so sums cached by tensor identity stay right.

    >>> len(offloaded_values(torch.nn.Linear(2, 2)))
    0
    """
    return _OffloadedValues(offloaded_entries(model), model)


class _OffloadedValues(Mapping):
    def __init__(self, entries: dict[str, OffloadedEntry], model: nn.Module) -> None:
        self._entries, self._read, self._model = entries, {}, model

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._read:
            value = self._entries[name].read()
            placeholder = self._model.get_parameter(name) if _is_param(self._model, name) else None
            if placeholder is not None:
                value = nn.Parameter(value, requires_grad=placeholder.requires_grad)
            self._read[name] = value
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in model.get_submodule(owner)._parameters


def shadow_memo(model: nn.Module) -> dict[int, Any]:
    """``copy.deepcopy`` memo entries that keep hooks' weight maps out of a shadow copy.

    >>> shadow_memo(torch.nn.Linear(2, 2))
    {}
    """
    memo: dict[int, Any] = {}
    if not _has_hooks(model):
        return memo
    for module in model.modules():
        for hook in _align_hooks(module):
            for attr in ("weights_map", "tied_params_map"):
                value = getattr(hook, attr, None)
                if value is not None:
                    memo[id(value)] = None
    return memo


def strip_offload_hooks(shadow: nn.Module) -> nn.Module:
    """Remove accelerate's hooks from a meta shadow copy (not from a real model), in place.

    The hooks' forward would move meta tensors to the execution device and
    swap in offloaded values; the shadow has no values to move.

    >>> import torch, accelerate, copy
    >>> model = accelerate.cpu_offload(torch.nn.Sequential(torch.nn.Linear(2, 3)), "cpu")
    >>> twin = strip_offload_hooks(copy.deepcopy(model, shadow_memo(model)))
    >>> hasattr(twin[0], "_hf_hook"), hasattr(model[0], "_hf_hook")
    (False, True)
    """
    if not _has_hooks(shadow):
        return shadow
    import accelerate.hooks

    # Attributes dispatch_model adds: a module-level list before accelerate 1.16, a marker since.
    listed = getattr(accelerate.hooks, "_accelerate_added_attributes", ())
    for module in shadow.modules():
        state = module.__dict__
        state.pop("_hf_hook", None)
        if "_old_forward" in state:
            old = state.pop("_old_forward")
            # The class's own forward, bound: drop the instance attribute instead.
            if getattr(old, "__func__", None) is getattr(type(module), "forward", None):
                state.pop("forward", None)
            else:
                state["forward"] = old
        marked = [k for k, v in state.items() if getattr(v, "_accelerate_added_attribute", False)]
        for attr in [*listed, *marked]:
            state.pop(attr, None)
    return shadow
