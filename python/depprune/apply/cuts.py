"""Apply stage, tensor cuts: takes kept indices per (tensor, dim), gives the cut tensors.

Kept indices are a sorted 1-d array per (tensor, dim), or a 2-d array
``[slices, kept]`` that keeps row ``s`` in slice ``s`` of dim 0 (each expert
of a fused ``[experts, ...]`` tensor its own neurons; :mod:`depprune.expert_widths`).
Every plan is checked against the model and each new tensor built on its own
device and dtype (on the CPU a cut of rows and columns is one pass of the
core over the same bytes, several times faster than torch's element-wise gather);
``requires_grad`` and the parameter class are kept; tied tensors are cut once.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4))
>>> sorted(named_tensors(model))
['0.bias', '0.weight']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from depprune._core import take_rows_columns
from depprune.distributed.accelerate import OffloadedEntry, offloaded_entries
from depprune.distributed.dtensor import cut_dtensor, is_dtensor
from depprune.errors import PlanMismatchError

ParamDim = tuple[str, int]

_ABSENT = object()

Kept = Mapping[ParamDim, "torch.Tensor | np.ndarray"]


@dataclass
class _Cut:
    """One tensor's cut: where it lives, the kept indices per dim, and its new shape."""

    owners: list[tuple[nn.Module, str, bool]]  # (module, attribute, is_parameter)
    key: int  # id() of the tensor before the cut
    dims: dict[int, torch.Tensor]
    shape: torch.Size
    new: torch.Tensor | None = None
    #: A value change folded into the cut tensor (an embedding scale moved into the weights).
    fold: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: Where the real values of an offloaded tensor live (the slot holds a meta placeholder).
    mirror: OffloadedEntry | None = None

    def current(self) -> torch.Tensor:
        module, attr, is_param = self.owners[0]
        return (module._parameters if is_param else module._buffers)[attr]

    def build(self) -> torch.Tensor:
        """The cut tensor, on the old one's device and dtype (and class, for parameters).

        An offloaded tensor (a meta placeholder) gets its real values cut too,
        staged in their storage until :meth:`assign` commits them.
        """
        old = self.current()
        new = self._cut_values(old.detach())
        if self.mirror is not None:
            self.mirror.stage(self._cut_values)
        if isinstance(old, nn.Parameter):
            new = _like_parameter(old, new)
        return new

    def _cut_values(self, values: torch.Tensor) -> torch.Tensor:
        cuts = {
            dim: index.to(values.device)
            for dim, index in self.dims.items()
            if index.dim() == 2 or index.numel() < values.shape[dim]
        }
        if values.is_meta and not is_dtensor(values):
            # Nothing to gather on meta: the cut is a contiguous tensor of the new shape.
            new = values.new_empty(self.shape) if cuts else values
        else:
            new = cut_tensor(values, cuts)
        if self.fold is not None:
            new = self.fold(new if new.data_ptr() != values.data_ptr() else new.clone())
        return new

    def assign(self, new: torch.Tensor, undo: list | None) -> None:
        for module, attr, is_param in self.owners:
            slots = module._parameters if is_param else module._buffers
            if undo is not None:
                undo.append((slots, attr, slots[attr], True))
            slots[attr] = new
        if self.mirror is not None:
            restore = self.mirror.commit()
            if undo is not None:
                undo.append(restore)


def cut_tensor(tensor: torch.Tensor, cuts: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``tensor`` keeping ``cuts[dim]`` (int64 indices on its device) along each dim.

    The fastest gather for the case (numpy's ``take`` for CPU columns, one
    gather for rows and columns, else dim 0 first); the result is
    contiguous, or ``tensor`` itself when nothing is cut.

    >>> cut_tensor(torch.arange(6).view(2, 3), {1: torch.tensor([0, 2])}).tolist()
    [[0, 2], [3, 5]]
    """
    per_slice = {dim: index for dim, index in cuts.items() if index.dim() == 2}
    if per_slice:
        return _cut_per_slice(tensor, cuts, per_slice)
    if is_dtensor(tensor):
        return cut_dtensor(tensor, cuts)  # each rank cuts its shard
    on_cpu = _take_on_cpu(tensor, cuts)
    if on_cpu is not None:
        return on_cpu
    if cuts.keys() == {0, 1}:
        # Rows and columns in one gather: 1.5-3x faster than two index_selects
        # (a weight matrix or conv kernel), and no half-cut intermediate.
        return tensor[cuts[0][:, None], cuts[1]]
    # Dim 0 first: whole rows are contiguous copies, and later gathers get smaller.
    for dim, index in sorted(cuts.items()):
        tensor = tensor.index_select(dim, index)
    return tensor


def _cut_per_slice(
    tensor: torch.Tensor, cuts: Mapping[int, torch.Tensor], per_slice: Mapping[int, torch.Tensor]
) -> torch.Tensor:
    """``tensor`` cut by 1-d indices first (slices of dim 0 too), then one gather per 2-d index.

    >>> cut_tensor(torch.arange(8).view(2, 4), {1: torch.tensor([[0, 3], [1, 2]])}).tolist()
    [[0, 3], [5, 6]]
    """
    if is_dtensor(tensor):
        raise PlanMismatchError(
            "a plan that keeps other indices in each slice (per-expert widths) cannot cut a "
            "DTensor shard by shard; prune the full model, then shard it"
        )
    plain = {dim: index for dim, index in cuts.items() if index.dim() == 1}
    tensor = cut_tensor(tensor, plain) if plain else tensor
    for dim, index in sorted(per_slice.items()):
        if 0 in plain:
            index = index[plain[0]]  # the rows of the slices dim 0 keeps
        view = [1] * tensor.dim()
        view[0], view[dim] = index.shape
        shape = list(tensor.shape)
        shape[dim] = index.shape[1]
        tensor = tensor.gather(dim, index.reshape(view).expand(shape))
    return tensor


#: The one column of a cut that keeps whole rows.
_FIRST = np.zeros(1, dtype=np.int64)
#: Integer dtypes by element size: a cut only moves bytes, and numpy has no bfloat16.
_SAME_BYTES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _take_on_cpu(tensor: torch.Tensor, cuts: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
    """A CPU tensor cut along dims 0 and 1 by the core, in one pass; else ``None``.

    torch gathers columns one element at a time on the CPU (rows and columns
    of a Llama-3-8B MLP matrix: ~65 ms), numpy's ``take`` row block by row
    block (~40 ms); the core copies each kept row's kept columns straight into
    the new tensor (an integer view of the same bytes), on torch's threads,
    without the GIL. Indices were checked in range before (the core checks again).
    """
    as_int = _SAME_BYTES.get(tensor.element_size())
    if (
        tensor.device.type != "cpu"
        or as_int is None
        or tensor.is_complex()
        or tensor.dim() < 2
        or not cuts.keys() <= {0, 1}
        or not cuts
    ):
        return None
    try:
        source = tensor.contiguous().view(as_int).numpy()
    except (RuntimeError, TypeError, ValueError):
        return None  # a tensor subclass, or one numpy cannot view: torch cuts it
    rows = cuts[0].numpy() if 0 in cuts else None
    num_rows = source.shape[0] if rows is None else rows.size
    if 1 in cuts:
        columns, num_columns, inner = cuts[1].numpy(), source.shape[1], math.prod(source.shape[2:])
        shape = (num_rows, columns.size, *source.shape[2:])
    else:  # whole rows: one cell of the row's length each
        columns, num_columns, inner = _FIRST, 1, math.prod(source.shape[1:])
        shape = (num_rows, *source.shape[1:])
    # torch's allocator (huge pages for big blocks) writes faster than np.empty's pages.
    cut = torch.empty(shape, dtype=as_int)
    take_rows_columns(
        source.reshape(-1),
        num_columns,
        inner,
        rows,
        columns,
        cut.numpy().reshape(-1),
        torch.get_num_threads(),
    )
    return cut.view(tensor.dtype)


def masked_tensors(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, tensor name) of every torch.nn.utils.prune reparametrisation.

    Such a module holds ``<name>_orig`` (a parameter) and ``<name>_mask`` (a
    buffer), and a forward pre-hook sets the plain attribute ``<name>`` to
    their product; cutting both alike keeps the mask working.
    """
    found = []
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                found.append((module_name, module, hook._tensor_name))
    return found


def _refuse_parametrized(model: nn.Module, names: list[str]) -> None:
    """PlanMismatchError if a cut tensor belongs to a torch.nn.utils.parametrize parametrization.

    A parametrization computes the weight from its originals with code the
    plan cannot see into (orthogonal, spectral norm's power iteration, ...),
    so a cut original need not give the cut weight.
    """
    lists = [
        (f"{name}." if name else "", module)
        for name, module in model.named_modules()
        if isinstance(module, parametrize.ParametrizationList)
    ]
    for name in names:
        for prefix, _ in lists:
            if name.startswith(prefix):
                path = prefix[:-1]
                if path.startswith("parametrizations."):  # the model itself is parametrized
                    owner, tensor_name = "", path.removeprefix("parametrizations.")
                else:
                    owner, _, tensor_name = path.rpartition(".parametrizations.")
                where = f"model.get_submodule({owner!r})" if owner else "model"
                raise PlanMismatchError(
                    f"the plan cuts {name!r}, part of a torch.nn.utils.parametrize "
                    f"parametrization of {tensor_name!r}, whose computed shape and values "
                    "depprune cannot prove; call torch.nn.utils.parametrize."
                    f"remove_parametrizations({where}, {tensor_name!r}) before pruning, then "
                    "register the parametrization again"
                )


def named_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Every parameter and buffer under all its names (tied ones too)."""
    found: dict[str, tuple[nn.Module, str, bool]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, value in module._parameters.items():
            if value is not None:
                found[prefix + attr] = (module, attr, True)
        for attr, value in module._buffers.items():
            if value is not None:
                found[prefix + attr] = (module, attr, False)
    return found


def _checked_indices(
    indices: torch.Tensor | np.ndarray, name: str, dim: int, shape: torch.Size
) -> np.ndarray:
    """The kept indices as int64 on the CPU: integers, sorted, unique, inside the dim.

    A 2-d array (one row per slice of dim 0) is checked row by row.
    """
    array = (
        indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    )
    slices = shape[0] if dim > 0 else None
    if (array.ndim != 1 and not (array.ndim == 2 and array.shape[0] == slices)) or (
        array.size and array.dtype.kind not in "iu"
    ):
        raise PlanMismatchError(
            f"the kept indices of {name!r} dim {dim} must be a 1-d integer array (or 2-d, one "
            f"row for each of the {slices} slices of dim 0); got a {array.ndim}-d "
            f"{array.dtype} array of shape {array.shape} (a boolean mask? pass "
            "np.flatnonzero(mask))"
            if slices is not None
            else f"the kept indices of {name!r} dim {dim} must be a 1-d integer array; got a "
            f"{array.ndim}-d {array.dtype} array (a boolean mask? pass np.flatnonzero(mask))"
        )
    size = shape[dim]
    array = array.astype(np.int64, copy=False)
    bad = array[(array < 0) | (array >= size)]
    if bad.size:
        raise PlanMismatchError(
            f"the plan keeps index {int(bad[0])} of dim {dim} of {name!r}, which has "
            f"{size}; was the plan made for another model?"
        )
    if np.any(np.diff(array, axis=-1) <= 0):
        raise PlanMismatchError(f"the kept indices of {name!r} dim {dim} must be sorted and unique")
    return array


def _plan_cuts(
    model: nn.Module, kept: Kept
) -> tuple[list[_Cut], dict[str, dict[int, torch.Tensor]]]:
    """Check the plan against the model and build every new tensor."""
    tensors = named_tensors(model)
    originals: dict[int, torch.Tensor] = {}
    dims_of: dict[int, dict[int, torch.Tensor]] = {}
    changed: dict[str, dict[int, torch.Tensor]] = {}
    for (name, dim), indices in kept.items():
        if name not in tensors:
            raise PlanMismatchError(
                f"the plan cuts {name!r}, which is not a parameter or buffer of "
                f"{type(model).__name__}; was the plan made for another model?"
            )
        module, attr, _ = tensors[name]
        tensor = getattr(module, attr)
        if not 0 <= dim < tensor.ndim:
            raise PlanMismatchError(
                f"the plan cuts dim {dim} of {name!r}, which has shape {tuple(tensor.shape)}"
            )
        size = tensor.shape[dim]
        index = torch.from_numpy(_checked_indices(indices, name, dim, tensor.shape))
        dims = dims_of.setdefault(id(tensor), {})
        # Tied names must agree, also when one of them keeps everything.
        if dim in dims and not torch.equal(dims[dim], index):
            raise PlanMismatchError(f"tied tensor {name!r} is cut differently under its names")
        dims[dim] = index
        if index.shape[-1] == size:
            continue  # sorted, unique and in range: every slice keeps all
        changed.setdefault(name, {})[dim] = index
        originals[id(tensor)] = tensor
    _refuse_parametrized(model, list(changed))
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {key: [] for key in originals}
    for module, attr, is_param in tensors.values():
        key = id(getattr(module, attr))
        if key in owners:
            owners[key].append((module, attr, is_param))
    cuts = []
    for key, tensor in originals.items():
        shape = list(tensor.shape)
        for dim, index in dims_of[key].items():
            shape[dim] = index.shape[-1]
        cuts.append(_Cut(owners[key], key, dims_of[key], torch.Size(shape)))
    # accelerate's offloaded tensors: the values to cut live in a hook's weights map.
    entries = offloaded_entries(model)
    by_key = {id(getattr(*tensors[name][:2])): entry for name, entry in entries.items()}
    for cut in cuts:
        cut.mirror = by_key.get(cut.key)
    return cuts, changed


def _like_parameter(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """A parameter of ``old``'s class, ``requires_grad`` and Python attributes over ``data``."""
    try:
        new = type(old)(data, requires_grad=old.requires_grad)
    except TypeError:
        new = nn.Parameter(data, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    return new


def _refresh_masked(model: nn.Module, changed: Mapping, undo: list | None) -> None:
    """Recompute the plain ``weight`` of torch.nn.utils.prune modules whose ``weight_orig`` was cut.

    Their forward pre-hook does the same before every forward; until then the
    old, uncut product would still sit in the attribute.
    """
    for module_name, module, tensor_name in masked_tensors(model):
        prefix = f"{module_name}." if module_name else ""
        if prefix + tensor_name + "_orig" not in changed:
            continue
        hook = next(
            h
            for h in module._forward_pre_hooks.values()
            if isinstance(h, torch_prune.BasePruningMethod) and h._tensor_name == tensor_name
        )
        old = getattr(module, tensor_name, _ABSENT)
        setattr(module, tensor_name, hook.apply_mask(module))
        if undo is not None:
            undo.append((module, tensor_name, old, False))
