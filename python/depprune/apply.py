"""Apply kept indices to a model: cut every parameter, fix module attributes.

All or nothing: the whole plan is checked and every new tensor is built
before the first module is touched, so on any error the model is exactly as
it was. Tensors are cut on their own device and in their own dtype (on the
CPU a cut across columns is numpy's ``take`` on the same bytes, several times
faster than torch's element-wise gather there); ``requires_grad`` is kept;
tied parameters stay tied.

>>> import torch, depprune
>>> from depprune.apply import apply_kept_indices
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
>>> kept = {("0.weight", 0): torch.tensor([0, 2]), ("0.bias", 0): torch.tensor([0, 2]),
...         ("1.weight", 1): torch.tensor([0, 2])}
>>> apply_kept_indices(model, kept)
>>> model[0].out_features, model[1].in_features
(2, 2)
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune
from torch.optim import Optimizer

from depprune.errors import ConfigWarning, PlanMismatchError, ResourceError
from depprune.optimizer_state import (
    caller_name,
    check_optimizer_state,
    checked_optimizers,
    optimizers_referencing,
    prepare_remap,
)

__all__ = ["PlanMismatchError", "apply_kept_indices", "named_tensors"]

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

    def current(self) -> torch.Tensor:
        module, attr, is_param = self.owners[0]
        return (module._parameters if is_param else module._buffers)[attr]

    def build(self) -> torch.Tensor:
        """The cut tensor, on the old one's device and dtype (and class, for parameters)."""
        old = self.current()
        new = old.detach()
        cuts = {
            dim: index.to(old.device)
            for dim, index in self.dims.items()
            if index.numel() < old.shape[dim]
        }
        on_cpu = _take_on_cpu(new, cuts)
        if on_cpu is not None:
            new = on_cpu
        elif cuts.keys() == {0, 1}:
            # Rows and columns in one gather: 1.5-3x faster than two index_selects
            # (a weight matrix or conv kernel), and no half-cut intermediate.
            new = new[cuts[0][:, None], cuts[1]]
        else:
            # Dim 0 first: whole rows are contiguous copies, and later gathers get smaller.
            for dim, index in sorted(cuts.items()):
                new = new.index_select(dim, index)
        if self.fold is not None:
            new = self.fold(new if new.data_ptr() != old.data_ptr() else new.clone())
        if isinstance(old, nn.Parameter):
            new = _like_parameter(old, new)
        return new

    def assign(self, new: torch.Tensor, undo: list | None) -> None:
        for module, attr, is_param in self.owners:
            slots = module._parameters if is_param else module._buffers
            if undo is not None:
                undo.append((slots, attr, slots[attr], True))
            slots[attr] = new


#: Integer dtypes by element size: a cut only moves bytes, and numpy has no bfloat16.
_SAME_BYTES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: Source rows per chunk of a CPU cut (chunks run on torch's threads).
_CHUNK_BYTES = 8 << 20


def _take_on_cpu(tensor: torch.Tensor, cuts: Mapping[int, torch.Tensor]) -> torch.Tensor | None:
    """A CPU tensor cut along dim 1 (and maybe dim 0) with numpy's ``take``; else ``None``.

    torch gathers columns one element at a time on the CPU (rows and columns
    of a Llama-3-8B MLP matrix: ~65 ms against ~30 ms here; an embedding's
    columns: 1.3-3x slower); ``take`` works on an integer view of the same bytes.
    Rows go in chunks over ``torch.get_num_threads()`` threads (``take``
    releases the GIL). Indices were checked in range before, hence ``clip``.
    """
    as_int = _SAME_BYTES.get(tensor.element_size())
    if (
        tensor.device.type != "cpu"
        or as_int is None
        or tensor.is_complex()
        or tensor.dim() < 2
        or 1 not in cuts
        or not cuts.keys() <= {0, 1}
    ):
        return None
    try:
        source = tensor.view(as_int).numpy()
    except (RuntimeError, TypeError, ValueError):
        return None  # a tensor subclass, or one numpy cannot view: torch cuts it
    rows = cuts[0].numpy() if 0 in cuts else None
    columns = cuts[1].numpy()
    num_rows = source.shape[0] if rows is None else rows.size
    # torch's allocator (huge pages for big blocks) writes faster than np.empty's pages.
    cut = torch.empty((num_rows, columns.size, *source.shape[2:]), dtype=as_int)
    out = cut.numpy()
    chunk = max(1, _CHUNK_BYTES // max(1, source[:1].nbytes))

    def cut_rows(start: int) -> None:
        stop = min(start + chunk, num_rows)
        block = source[start:stop] if rows is None else source.take(rows[start:stop], axis=0)
        block.take(columns, axis=1, out=out[start:stop], mode="clip")

    starts = range(0, num_rows, chunk)
    workers = min(torch.get_num_threads(), len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(cut_rows, starts))
    else:
        for start in starts:
            cut_rows(start)
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
    indices: torch.Tensor | np.ndarray, name: str, dim: int, size: int
) -> np.ndarray:
    """The kept indices as int64 on the CPU: integers, sorted, unique, inside the dim."""
    array = (
        indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    )
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise PlanMismatchError(
            f"the kept indices of {name!r} dim {dim} must be a 1-d integer array; got a "
            f"{array.ndim}-d {array.dtype} array (a boolean mask? pass np.flatnonzero(mask))"
        )
    array = array.astype(np.int64, copy=False)
    bad = array[(array < 0) | (array >= size)]
    if bad.size:
        raise PlanMismatchError(
            f"the plan keeps index {int(bad[0])} of dim {dim} of {name!r}, which has "
            f"{size}; was the plan made for another model?"
        )
    if np.any(np.diff(array) <= 0):
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
        index = torch.from_numpy(_checked_indices(indices, name, dim, size))
        dims = dims_of.setdefault(id(tensor), {})
        # Tied names must agree, also when one of them keeps everything.
        if dim in dims and not torch.equal(dims[dim], index):
            raise PlanMismatchError(f"tied tensor {name!r} is cut differently under its names")
        dims[dim] = index
        if index.numel() == size:
            continue
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
            shape[dim] = index.numel()
        cuts.append(_Cut(owners[key], key, dims_of[key], torch.Size(shape)))
    return cuts, changed


def _like_parameter(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """A parameter of ``old``'s class, ``requires_grad`` and Python attributes over ``data``."""
    try:
        new = type(old)(data, requires_grad=old.requires_grad)
    except TypeError:
        new = nn.Parameter(data, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    return new


def _kept_groups(index: torch.Tensor, group_size: int) -> int:
    """How many blocks of ``group_size`` consecutive indices keep any index."""
    return int(torch.unique(torch.div(index, group_size, rounding_mode="floor")).numel())


class _View:
    """What a fixer may read: new shapes and kept indices, by full tensor name."""

    def __init__(
        self,
        model: nn.Module,
        cuts: list[_Cut],
        changed: Mapping,
        widths: Mapping[int, Iterable[int]] | None = None,
    ) -> None:
        #: Traced sizes the plan changes, with their new sizes (from the replay's axes):
        #: what config fields no tensor dim shows (a head count) may be sized by.
        self.widths = {int(k): {int(x) for x in v} for k, v in (widths or {}).items()}
        #: Value folds for cut tensors, by tensor name (see _fold_scales).
        self.folds: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._tensors = {n: getattr(m, a) for n, (m, a, _) in named_tensors(model).items()}
        self._new_shape = {c.key: c.shape for c in cuts}
        self.changed = dict(changed)
        # A torch.nn.utils.prune weight reads as its weight_orig (same shape, same cuts),
        # so fixers that look up "weight" see what the forward will compute.
        for module_name, _, tensor_name in masked_tensors(model):
            name = f"{module_name}.{tensor_name}" if module_name else tensor_name
            self._tensors[name] = self._tensors[name + "_orig"]
            if name + "_orig" in self.changed:
                self.changed[name] = self.changed[name + "_orig"]
        self.tensors = self._tensors

    def old_shape(self, name: str) -> torch.Size:
        return self._tensors[name].shape

    def shape(self, name: str) -> torch.Size:
        tensor = self._tensors[name]
        return self._new_shape.get(id(tensor), tensor.shape)

    def cut(self, name: str, dim: int) -> torch.Tensor | None:
        return self.changed.get(name, {}).get(dim)


# A fixer returns the attributes a module needs after its tensors were cut.
Fixer = Callable[[nn.Module, str, _View], dict]


def _fix_linear(m: nn.Module, p: str, v: _View) -> dict:
    w = v.shape(p + "weight")
    return {"out_features": w[0], "in_features": w[1]}


def _fix_conv(m: nn.Module, p: str, v: _View) -> dict:
    w = v.shape(p + "weight")
    groups = m.groups
    cut = v.cut(p + "weight", 0)
    if groups > 1 and cut is not None:
        # Weight dim 0 is product(groups, per-group slots): count groups kept.
        groups = _kept_groups(cut, m.weight.shape[0] // m.groups)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return {"in_channels": w[0], "out_channels": w[1] * groups, "groups": groups}
    return {"out_channels": w[0], "in_channels": w[1] * groups, "groups": groups}


def _fix_batch_norm(m: nn.Module, p: str, v: _View) -> dict:
    source = "weight" if m.weight is not None else "running_mean"
    return {"num_features": v.shape(p + source)[0]}


def _fix_layer_norm(m: nn.Module, p: str, v: _View) -> dict:
    return {"normalized_shape": tuple(v.shape(p + "weight"))}


def _fix_group_norm(m: nn.Module, p: str, v: _View) -> dict:
    groups = m.num_groups
    cut = v.cut(p + "weight", 0)
    if cut is not None:
        groups = _kept_groups(cut, m.num_channels // m.num_groups)
    return {"num_channels": v.shape(p + "weight")[0], "num_groups": groups}


def _fix_embedding(m: nn.Module, p: str, v: _View) -> dict:
    w = v.shape(p + "weight")
    return {"num_embeddings": w[0], "embedding_dim": w[1]}


def _fix_hf_conv1d(m: nn.Module, p: str, v: _View) -> dict:
    # transformers' Conv1D stores its weight as (in, out).
    weight = v.shape(p + "weight")
    return {"nf": weight[1], "nx": weight[0]} if hasattr(m, "nx") else {"nf": weight[1]}


def _heads_kept(
    v: _View, name: str, head_dim: int, start: int, stop: int, dim: int = 0
) -> tuple[int, int]:
    """(heads, head_dim) kept by rows ``start:stop`` of ``name``, viewed as (heads, head_dim)."""
    rows = v.cut(name, dim)
    if rows is None:
        return (stop - start) // head_dim, head_dim
    rows = rows[(rows >= start) & (rows < stop)] - start
    heads = _kept_groups(rows, head_dim)
    if heads == 0 or rows.numel() % heads:
        raise PlanMismatchError(
            f"{name}: the plan keeps {rows.numel()} rows in {heads} heads, which is not a "
            "whole number of rows per head; heads must keep equal head_dim"
        )
    return heads, rows.numel() // heads


def _attention_attrs(
    m: nn.Module, where: str, heads: int, kv_heads: int, head_dim: int, v_head_dim: int | None
) -> dict:
    """The new head counts and head_dim under every attribute name attention modules use."""
    if v_head_dim is not None and v_head_dim != head_dim:
        raise PlanMismatchError(
            f"{where}: queries would keep head_dim {head_dim} but values {v_head_dim}; "
            "this attention needs one head_dim, so prune them to the same size"
        )
    new: dict = {}
    for attr, value in [
        ("head_dim", head_dim),
        ("attention_head_size", head_dim),
        ("num_heads", heads),
        ("num_attention_heads", heads),
        ("all_head_size", heads * head_dim),
        ("num_key_value_heads", kv_heads),
        ("num_key_value_groups", heads // kv_heads),
    ]:
        if hasattr(m, attr):
            new[attr] = value
    config = {
        "config.num_attention_heads": heads,
        "config.num_key_value_heads": kv_heads,
        "config.head_dim": head_dim,
    }
    return new | config


def _fix_hf_attention(m: nn.Module, p: str, v: _View) -> dict:
    """Separate q/k(/v) projections viewed as (heads, head_dim): count what each kept."""
    head_dim = getattr(m, "head_dim", None) or m.attention_head_size
    names = ("q_proj", "k_proj", "v_proj") if hasattr(m, "q_proj") else ("query", "key", "value")
    q, k, val = (f"{p}{name}.weight" for name in names)
    heads, q_dim = _heads_kept(v, q, head_dim, 0, v.old_shape(q)[0])
    kv_heads, k_dim = _heads_kept(v, k, head_dim, 0, v.old_shape(k)[0])
    if k_dim != q_dim:
        raise PlanMismatchError(
            f"{p[:-1]}: queries would keep head_dim {q_dim} but keys {k_dim}; "
            "q and k head_dim must be pruned together"
        )
    # One head_dim attribute shapes q, k and v alike, so v must keep as many.
    v_dim = _heads_kept(v, val, head_dim, 0, v.old_shape(val)[0])[1] if val in v.tensors else None
    return _attention_attrs(m, p[:-1], heads, kv_heads, q_dim, v_dim)


def _fix_fused_qkv(m: nn.Module, p: str, v: _View) -> dict:
    """Phi-3's qkv_proj: rows are [queries | keys | values], sliced by head counts."""
    head_dim, kv = m.head_dim, m.num_key_value_heads
    name = p + "qkv_proj.weight"
    q_rows = v.old_shape(name)[0] - 2 * kv * head_dim
    heads, q_dim = _heads_kept(v, name, head_dim, 0, q_rows)
    kv_heads, k_dim = _heads_kept(v, name, head_dim, q_rows, q_rows + kv * head_dim)
    _, v_dim = _heads_kept(v, name, head_dim, q_rows + kv * head_dim, q_rows + 2 * kv * head_dim)
    if k_dim != q_dim:
        raise PlanMismatchError(f"{p[:-1]}: q and k would keep head_dim {q_dim} and {k_dim}")
    # Its forward slices qkv with config.num_attention_heads: the config must follow.
    return _attention_attrs(m, p[:-1], heads, kv_heads, q_dim, v_dim) | {"config.required": 1}


def _fix_gpt2_attention(m: nn.Module, p: str, v: _View) -> dict:
    """GPT-2's c_attn: columns are [q | k | v] of ``split_size`` each, viewed by head_dim."""
    name = p + "c_attn.weight"
    width, head_dim = m.split_size, m.head_dim
    cols = v.cut(name, 1)
    parts = []
    for start in range(0, v.old_shape(name)[1], width):
        kept = cols[(cols >= start) & (cols < start + width)] - start if cols is not None else None
        heads = (width // head_dim) if kept is None else _kept_groups(kept, head_dim)
        parts.append((heads, (width if kept is None else kept.numel()) // max(heads, 1)))
    if len(set(parts)) != 1:
        raise PlanMismatchError(
            f"{p[:-1]}: c_attn would keep (heads, head_dim) {parts} for q, k, v; GPT-2 splits "
            "them into equal parts, so prune q, k and v to the same sizes"
        )
    heads, new_dim = parts[0]
    attrs = _attention_attrs(m, p[:-1], heads, heads, new_dim, None)
    attrs.pop("config.num_key_value_heads")
    return attrs | {"split_size": heads * new_dim, "embed_dim": heads * new_dim}


def _fix_multihead_attention(m: nn.Module, p: str, v: _View) -> dict:
    """Heads kept (whole runs of head_dim channels) and the head_dim each keeps."""
    name = p + "out_proj.weight"
    heads, head_dim = _heads_kept(v, name, m.head_dim, 0, v.old_shape(name)[1], dim=1)
    new = {"embed_dim": heads * head_dim, "num_heads": heads, "head_dim": head_dim}
    if m._qkv_same_embed_dim:
        return new | {"kdim": heads * head_dim, "vdim": heads * head_dim}
    return new | {"kdim": v.shape(p + "k_proj_weight")[1], "vdim": v.shape(p + "v_proj_weight")[1]}


def _fix_torchvision_vit(m: nn.Module, p: str, v: _View) -> dict:
    # Its forward reshapes the patch embedding with hidden_dim.
    return {"hidden_dim": v.shape(p + "conv_proj.weight")[0]}


def _mlp_width_field(m: nn.Module, p: str) -> str:
    """The config field an MLP's width comes from: a MoE shared expert has its own."""
    config = getattr(m, "config", None)
    if p[:-1].rpartition(".")[2] in ("shared_expert", "shared_experts") and hasattr(
        config, "shared_expert_intermediate_size"
    ):
        return "shared_expert_intermediate_size"
    return "intermediate_size"


def _fix_mlp(m: nn.Module, p: str, v: _View) -> dict:
    """MLP blocks that record their width (Llama-style, BERT, GPT-2): the new width."""
    field = "config." + _mlp_width_field(m, p)
    if p + "gate_up_proj.weight" in v.tensors:
        # Phi-3 fuses gate and up and chunks them in two.
        width = v.shape(p + "gate_up_proj.weight")[0] // 2
        return {field: width}
    for name, dim in [
        ("gate_proj.weight", 0),
        ("up_proj.weight", 0),
        ("dense.weight", 0),
        ("c_fc.weight", 1),
        ("fc1.weight", 0),
    ]:
        if p + name in v.tensors:
            width = v.shape(p + name)[dim]
            attrs = {"intermediate_size": width} if hasattr(m, "intermediate_size") else {}
            return attrs | {field: width}
    return {}


#: Rows of a (tokens, features) operand of torch's grouped_mm must start 16 bytes apart.
_GROUPED_MM_ALIGNMENT = 16


def _fix_experts(m: nn.Module, p: str, v: _View) -> dict:
    """MoE experts stored as 3-d tensors: ``down_proj`` is [experts, hidden, width].

    Every expert keeps the same neurons' slots (the storage is one tensor),
    so the width is one number, the config's ``moe_intermediate_size`` where
    it has one (Qwen-MoE), else its ``intermediate_size`` (Mixtral).
    ``is_transposed`` experts store [experts, width, hidden].
    """
    down = v.shape(p + "down_proj")
    transposed = bool(getattr(m, "is_transposed", False))
    hidden, width = (int(down[2]), int(down[1])) if transposed else (int(down[1]), int(down[2]))
    attrs: dict = {}
    for attr, value in [
        ("intermediate_dim", width),
        ("intermediate_size", width),
        ("hidden_dim", hidden),
        ("hidden_size", hidden),
    ]:
        if isinstance(getattr(m, attr, None), int):
            attrs[attr] = value
    config = getattr(m, "config", None)
    field = "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else None
    return attrs | {f"config.{field or 'intermediate_size'}": width}


def _experts_fallback(m: nn.Module, p: str, v: _View) -> tuple[nn.Module, dict] | None:
    """Switch experts whose new sizes torch's ``grouped_mm`` rejects to the eager loop.

    grouped_mm (transformers' default experts implementation) needs rows
    16-byte aligned: hidden size and width multiples of 4 in fp32, 8 in
    bf16. The eager loop takes any size and computes the same function.
    """
    config = getattr(m, "config", None)
    if getattr(config, "_experts_implementation", None) != "grouped_mm":
        return None
    itemsize = m.down_proj.element_size()
    sizes = tuple(int(n) for n in v.shape(p + "down_proj")[1:])
    if not any(n * itemsize % _GROUPED_MM_ALIGNMENT for n in sizes):
        return None
    multiple = _GROUPED_MM_ALIGNMENT // itemsize
    _warn_at_caller(
        f"{p[:-1]} keeps expert sizes {sizes}, not multiples of {multiple}, which torch's "
        "grouped_mm cannot run; the model now uses experts_implementation='eager' (the same "
        "function). Pass round_to="
        f"{multiple} to keep grouped_mm, or load the saved model with "
        "from_pretrained(..., experts_implementation='eager')"
    )
    return config, {"_experts_implementation": "eager"}


def _fix_router(m: nn.Module, p: str, v: _View) -> dict:
    """A MoE router: its own ``weight`` [experts, hidden] and the hidden size it reshapes to."""
    return {"hidden_dim": int(v.shape(p + "weight")[1])}


FIXERS: list[tuple[type, Fixer]] = [
    (nn.Linear, _fix_linear),
    (nn.modules.conv._ConvNd, _fix_conv),
    (nn.modules.batchnorm._NormBase, _fix_batch_norm),
    (nn.LayerNorm, _fix_layer_norm),
    (nn.GroupNorm, _fix_group_norm),
    (nn.Embedding, _fix_embedding),
    (nn.MultiheadAttention, _fix_multihead_attention),
]


def _has(module: nn.Module, *attrs: str) -> bool:
    return all(hasattr(module, a) for a in attrs)


def _fixer_for(module: nn.Module) -> Fixer | None:
    for cls, fixer in FIXERS:
        if isinstance(module, cls):
            return fixer
    kind = type(module).__name__
    # Modules from other libraries, recognised by what they hold rather than imported.
    if kind == "Conv1D" and hasattr(module, "nf"):
        return _fix_hf_conv1d
    if _has(module, "qkv_proj", "head_dim", "num_key_value_heads"):
        return _fix_fused_qkv
    if _has(module, "c_attn", "split_size", "head_dim"):
        return _fix_gpt2_attention
    if _has(module, "q_proj", "k_proj", "head_dim") or _has(
        module, "query", "key", "attention_head_size"
    ):
        return _fix_hf_attention
    if kind == "VisionTransformer" and _has(module, "conv_proj", "hidden_dim"):
        return _fix_torchvision_vit
    down = getattr(module, "down_proj", None)
    if isinstance(down, nn.Parameter) and down.dim() == 3:
        return _fix_experts
    weight = getattr(module, "weight", None)
    if (
        isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and isinstance(getattr(module, "hidden_dim", None), int)
        and _has(module, "num_experts")
    ):
        return _fix_router
    if kind.endswith(("MLP", "Intermediate")) or _has(module, "intermediate_size"):
        return _fix_mlp
    return None


def _uniform_config(
    model: nn.Module, view: _View, changes: list[tuple[nn.Module, dict]]
) -> tuple[dict[str, object], list[tuple[nn.Module, dict]]]:
    """Config fields every layer agrees on, plus the hidden size from the input embedding;
    and the integer module attributes a model built from that config has (adopted).

    A config that cannot describe the pruned model (layers of different
    widths, or a head_dim the config derives from hidden_size and the head
    count) is left as it was, with a warning: the pruned model runs, but
    ``from_pretrained`` could not rebuild it.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}, []
    values: dict[str, set] = {}
    for _, attrs in changes:
        for key, value in attrs.items():
            if key.startswith("config."):
                values.setdefault(key.removeprefix("config."), set()).add(int(value))
    hidden = _hidden_width(model, view)
    if hidden is not None:
        values["hidden_size"] = {hidden}
    uneven = {key: sorted(found) for key, found in values.items() if len(found) > 1}
    if uneven:
        if any(attrs.get("config.required") for _, attrs in changes):
            raise PlanMismatchError(
                f"layers would keep different sizes {uneven}, but "
                f"{type(model).__name__}'s forward reads them from its one config; "
                "prune every layer by the same ratio (local ranking, no per-layer ratios)"
            )
        _config_warning(f"layers keep different sizes {uneven}", "the config is left unchanged")
        return {}, []
    required = values.pop("required", None) is not None
    if getattr(config, "model_type", "") == "gpt2" and "intermediate_size" in values:
        values["n_inner"] = values.pop("intermediate_size")  # GPT-2 names its MLP width so
    # Keys the config lacks stay out, except head_dim, which models read with getattr.
    new = {
        key: found.pop()
        for key, found in values.items()
        if hasattr(config, key) or key == "head_dim"
    }
    if "head_dim" in new and new["head_dim"] == getattr(config, "head_dim", None):
        del new["head_dim"]
    new = {key: value for key, value in new.items() if getattr(config, key, None) != value}
    # Rebuilt even when no field changes: a width the config has no field for shows up here.
    adopted: list[tuple[nn.Module, dict]] = []
    shapes, other = _rebuild_mismatch(model, config, new, view, changes, adopted)
    if shapes or other:
        inferred = _infer_config_fields(model, config, new, view, changes)
        if inferred is not None:
            new, adopted = inferred
            shapes, other = "", ""
    if shapes:
        if required:
            raise PlanMismatchError(
                f"{type(model).__name__}'s forward reads its sizes from the config, but a config "
                f"with {new} builds {shapes}; prune every layer by the same ratio"
            )
        _config_warning(f"a config with {new} builds {shapes}", "the config is left unchanged")
        return {}, []
    if other:
        _config_warning(
            f"a model built from it has {other}",
            f"the config gets {new}, so the pruned model loads, but its outputs would differ",
        )
    return new, adopted


def _infer_config_fields(
    model: nn.Module, config, new: dict, view: _View, changes: list[tuple[nn.Module, dict]]
) -> tuple[dict, list[tuple[nn.Module, dict]]] | None:
    """Config fields no fixer names (``ffn_dim``, ``n_inner``, ``d_ff``, ``n_head``...) by what
    they size: a field whose value is a width the plan changes, to one new size, gets it.
    The proposal holds only if a model built from it on meta matches the pruned one."""
    widths: dict[int, set[int]] = {k: set(v) for k, v in view.widths.items()}
    for name, dims in view.changed.items():
        old, now = view.old_shape(name), view.shape(name)
        for dim in dims:
            widths.setdefault(int(old[dim]), set()).add(int(now[dim]))
    proposals = {}
    for key, value in vars(config).items():
        if key.startswith("_") or key in new or type(value) is not int:
            continue
        found = widths.get(value)
        if found is not None and len(found) == 1:
            proposals[key] = next(iter(found))
    if not proposals:
        return None
    # All proposals, then without one or two of them (fields that only happen to match).
    keys = sorted(proposals)
    left_out: list[tuple[str, ...]] = [()] + [(k,) for k in keys]
    if len(keys) <= 6:
        left_out += list(itertools.combinations(keys, 2))
    for drop in left_out:
        candidate = new | {k: v for k, v in proposals.items() if k not in drop}
        adopted: list[tuple[nn.Module, dict]] = []
        if _rebuild_mismatch(model, config, candidate, view, changes, adopted) == ("", ""):
            return candidate, adopted
    return None


def _hidden_width(model: nn.Module, view: _View) -> int | None:
    """The hidden size after the cut, read from the input embedding; None if unknown."""
    try:
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    except (NotImplementedError, AttributeError):
        # transformers' PreTrainedModel raises this for models without input embeddings.
        return None
    names = {id(mod): name for name, mod in model.named_modules()}
    if id(embeddings) not in names:
        return None
    if isinstance(embeddings, nn.Embedding):
        return int(view.shape(f"{names[id(embeddings)]}.weight")[1])
    if isinstance(getattr(embeddings, "projection", None), nn.Conv2d):
        # Vision transformers embed patches with a conv: its channels are the hidden size.
        return int(view.shape(f"{names[id(embeddings)]}.projection.weight")[0])
    return None


def _config_warning(why: str, what: str) -> None:
    _warn_at_caller(
        category=ConfigWarning,
        message=f"the pruned model runs correctly, but its config cannot fully describe it ({why}); "
        f"{what}. Prune every layer by the same ratio, and heads rather than head_dim "
        "(kinds=('hidden', 'heads', 'neurons')), to keep a config from_pretrained rebuilds "
        "exactly",
    )


def _warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the location of the first frame outside depprune (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


#: Float attributes of scaled embeddings (Gemma's sqrt(hidden_size)) a config recomputes.
_EMBED_SCALES = ("scalar_embed_scale", "embed_scale")


def _fold_scales(
    model: nn.Module, view: _View, changes: list[tuple[nn.Module, dict]]
) -> list[tuple[nn.Module, dict]]:
    """Move a scaled embedding's old scale into its weights, so the new scale holds.

    The pruned model computes ``E[x] * old``; reloaded, it computes ``E'[x] * new``:
    with ``E' = E * old / new`` both are the old function. A head tied to the
    embedding would read ``E'`` too, so the final norm before it scales by
    ``new / old`` (``(1 + w)`` norms as Gemma's: ``w' = (1 + w) * c - 1``).
    """
    import inspect

    extra: list[tuple[nn.Module, dict]] = []
    names = {id(m): n for n, m in model.named_modules()}
    for module, attrs in changes:
        if not isinstance(module, nn.Embedding):
            continue
        for key, new_scale in list(attrs.items()):
            if key not in _EMBED_SCALES or not isinstance(new_scale, float):
                continue
            factor = float(getattr(module, key)) / new_scale
            weight = f"{names[id(module)]}.weight"
            view.folds[weight] = lambda t, f=factor: t.mul_(f)
            buffer = module._buffers.get("embed_scale")
            if buffer is not None:
                extra.append((module, {"embed_scale": torch.full_like(buffer, new_scale)}))
            head = getattr(model, "get_output_embeddings", lambda: None)()
            tied = head is not None and getattr(head, "weight", None) is module.weight
            norm = getattr(getattr(model, "model", None), "norm", None)
            if tied and norm is not None and getattr(norm, "weight", None) is not None:
                source = inspect.getsource(type(norm).forward)
                offset = "1.0 + self.weight" in source or "1 + self.weight" in source
                c = 1.0 / factor
                view.folds[f"{names[id(norm)]}.weight"] = (
                    (lambda t, c=c: t.add_(1.0).mul_(c).sub_(1.0))
                    if offset
                    else (lambda t, c=c: t.mul_(c))
                )
    return extra


def _rebuild_mismatch(
    model: nn.Module,
    config,
    new: dict,
    view: _View,
    changes: list[tuple[nn.Module, dict]],
    adopted: list[tuple[nn.Module, dict]] | None = None,
) -> tuple[str, str]:
    """How a model built from the updated config (on meta) differs: (shapes, other), "" if not.

    Tensor shapes must match; numbers the modules keep (attention ``scaling``
    derived from head_dim) must match the pruned modules'; and no buffer the
    constructor recomputes from the config (RoPE's ``inv_freq``) may be cut.
    """
    import copy

    candidate = copy.deepcopy(config)
    for key, value in new.items():
        setattr(candidate, key, value)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = type(model)(candidate)
    except Exception as exc:  # a config the architecture rejects is not describable either
        return f"no model ({type(exc).__name__}: {exc})", ""
    built = rebuilt.state_dict()
    ours = model.state_dict().keys()
    if built.keys() != ours:
        extra = sorted(set(built) ^ set(ours))
        return f"other tensors ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})", ""
    for name, tensor in built.items():
        if name in view.tensors and tuple(tensor.shape) != tuple(view.shape(name)):
            return f"{name} of shape {tuple(tensor.shape)}, not {tuple(view.shape(name))}", ""
    saved = rebuilt.state_dict().keys()
    for name, _ in rebuilt.named_buffers():
        if name not in saved and name in view.changed:
            return "", f"{name} recomputed from the config, not the pruned one"
    pending = {id(module): attrs for module, attrs in changes}
    modules = dict(model.named_modules())
    for name, built in rebuilt.named_modules():
        module = modules.get(name)
        if module is None:
            continue
        after = {**vars(module), **pending.get(id(module), {})}
        for key, value in vars(built).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in after or after[key] == value:
                    continue
                if (
                    key in _EMBED_SCALES
                    and isinstance(module, nn.Embedding)
                    and isinstance(value, float)
                    and adopted is not None
                ):
                    # sqrt(hidden_size) embedding scaling: folded into the weights (_fold_scales).
                    adopted.append((module, {key: value}))
                    continue
                if type(value) is int and type(after[key]) is int and adopted is not None:
                    # A size the constructor derives from the config (a layer's embed_dim):
                    # the pruned module takes it, and the replay proves its forward with it.
                    adopted.append((module, {key: value}))
                    continue
                return "", f"{name or 'the model'}.{key} = {value}, not {after[key]}"
    return "", ""


def _attribute_changes(model: nn.Module, view: _View) -> list[tuple[nn.Module, dict]]:
    changes = []
    fallbacks = []
    for module_name, module in model.named_modules():
        fixer = _fixer_for(module)
        prefix = f"{module_name}." if module_name else ""
        if fixer is None or not any(name.startswith(prefix) for name in view.changed):
            continue
        if fixer in (_fix_layer_norm, _fix_group_norm) and module.weight is None:
            continue
        changes.append((module, fixer(module, prefix, view)))
        if fixer is _fix_experts:
            fallback = _experts_fallback(module, prefix, view)
            if fallback is not None and all(fallback[0] is not m for m, _ in fallbacks):
                fallbacks.append(fallback)
    config_changes, adopted = _uniform_config(model, view, changes)
    adopted += _fold_scales(model, view, adopted)
    changes = [(m, {k: v for k, v in a.items() if "." not in k}) for m, a in changes]
    if config_changes:
        changes.append((model.config, config_changes))
    # Sizes the modules keep that the new config derives (a layer's hidden_size, embed_dim);
    # fixers' values win where both name one.
    return changes + adopted + fallbacks


def _named_attributes(
    model: nn.Module, attributes: Mapping[str, Mapping[str, int]]
) -> list[tuple[nn.Module, dict]]:
    """``(module, attributes)`` for module names, checked against the model."""
    modules = dict(model.named_modules())
    changes = []
    for name, values in attributes.items():
        module = modules.get(name)
        if module is None:
            raise PlanMismatchError(
                f"the plan sets attributes of {name!r}, which is not a module of "
                f"{type(model).__name__}; was the plan made for another model?"
            )
        for attr, value in values.items():
            if type(getattr(module, attr, None)) is not int or type(value) is not int:
                raise PlanMismatchError(
                    f"the plan sets {name or 'the model'}.{attr} to {value!r}, but only integer "
                    "attributes the model has can be set"
                )
        changes.append((module, dict(values)))
    return changes


def apply_kept_indices(
    model: nn.Module,
    kept: Kept,
    *,
    low_memory: bool = False,
    optimizers: Iterable[Optimizer] = (),
    attributes: Mapping[str, Mapping[str, int]] | None = None,
    widths: Mapping[int, Iterable[int]] | None = None,
) -> None:
    """Cut every (parameter or buffer, dim) of ``model`` down to its kept indices.

    ``widths`` maps traced sizes the plan changes to their new sizes (a plan's
    :attr:`~depprune.Plan.widths`): config fields may be sized by them.

    ``attributes`` maps module names to integer attributes to set as well (those
    :func:`depprune.verify.infer_attributes` found and the replay proved).

    ``kept`` maps ``(name, dim)`` to the indices to keep along that dim (as
    from :meth:`depprune.DependencyGraph.kept_indices`). The whole plan and
    every attribute change is checked first: :class:`PlanMismatchError`
    before anything changes.

    By default every cut tensor is built before the first is swapped in, so
    any failure leaves the model as it was, at the cost of holding the old
    and new tensors at once. ``low_memory=True`` builds and swaps one tensor
    at a time, so the old one is freed at once (peak: the model plus its
    largest cut tensor); only running out of memory midway can then leave
    some tensors cut, and it is raised as :class:`ResourceError` naming them.

    ``optimizers`` made before the cut keep training the model: every state
    tensor of a cut parameter is cut with its indices and the param groups
    list the new parameter (:mod:`depprune.optimizer_state`). Their new state
    is built with the new tensors and committed after the last swap, so on
    any error they are as they were too; with ``low_memory=True`` each
    parameter's state is cut and repointed right after that parameter is
    swapped, so the optimizers always match the (maybe partly) cut model.
    Any other optimizer still holding a cut parameter afterwards gets a
    warning naming it.

    >>> import numpy as np, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    >>> keep = np.array([1, 3])
    >>> apply_kept_indices(model, {("0.weight", 0): keep, ("0.bias", 0): keep,
    ...                            ("1.weight", 1): keep}, low_memory=True)
    >>> model[0], model(torch.zeros(5, 3)).shape
    (Linear(in_features=3, out_features=2, bias=True), torch.Size([5, 2]))
    """
    optimizers = checked_optimizers(optimizers)
    # Outside inference mode, so the new parameters can still be trained.
    with torch.inference_mode(False), torch.no_grad():
        cuts, changed = _plan_cuts(model, kept)
        view = _View(model, cuts, changed, widths)
        attribute_changes = _attribute_changes(model, view)
        for name, fold in view.folds.items():
            key = id(view.tensors[name])
            for cut in cuts:
                if cut.key == key:
                    cut.fold = fold
        attribute_changes += _named_attributes(model, attributes or {})
        # Weak: a cut tensor alive after the cut is held elsewhere (maybe by an optimizer).
        old_tensors = [weakref.ref(cut.current()) for cut in cuts]
        if low_memory:
            check_optimizer_state(optimizers, [(cut.current(), cut.dims) for cut in cuts])
        else:
            for cut in cuts:
                cut.new = cut.build()
        swaps = [] if low_memory else [(cut.current(), cut.new, cut.dims) for cut in cuts]
        remap = prepare_remap(optimizers, swaps)
        del swaps
    # Nothing above touched the model; from here on only assignments happen, and if
    # one fails (a read-only attribute, a config validator) every earlier one is undone.
    undo: list[tuple[object, str, object, bool]] = []
    where = ""
    try:
        for module, attributes in attribute_changes:
            for attr, value in attributes.items():
                where, old = f"{type(module).__name__}.{attr}", getattr(module, attr, _ABSENT)
                setattr(module, attr, value)
                undo.append((module, attr, old, False))
        if not low_memory:
            for cut in cuts:
                cut.assign(cut.new, undo)
            where = "a torch.nn.utils.prune mask"
            _refresh_masked(model, changed, undo)
            where = "the optimizers' parameters"
            remap.commit()  # last: it undoes itself if it fails
    except BaseException as exc:
        _undo(undo)
        if not isinstance(exc, Exception):
            raise  # Ctrl-C, SystemExit: undone, and passed on as they are
        raise PlanMismatchError(
            f"setting {where} failed ({type(exc).__name__}: {exc}); every change was undone, "
            "so the model is as it was"
        ) from exc
    del undo, remap
    if low_memory:
        _swap_one_by_one(cuts, optimizers)
        _refresh_masked(model, changed, None)
    _warn_stale_optimizers(old_tensors)


def _warn_stale_optimizers(old_tensors: list[weakref.ref]) -> None:
    """Warn about each optimizer that still holds tensors the cut replaced."""
    stale = [tensor for tensor in (ref() for ref in old_tensors) if tensor is not None]
    if not stale:
        return  # the common case: no walk over the process's objects
    for optimizer, count in optimizers_referencing(stale):
        name = caller_name(optimizer)
        _warn_at_caller(
            f"{type(optimizer).__name__} optimizer {name or hex(id(optimizer))!r} still holds "
            f"{count} {'parameter that was' if count == 1 else 'parameters that were'} cut, so "
            "it would keep training the old tensors; "
            f"pass optimizers=[{name or 'optimizer'}] to plan.apply (or depprune.prune) to "
            "carry its state over, or create the optimizer after pruning"
        )


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


def _undo(undo: list[tuple[object, str, object, bool]]) -> None:
    for target, attr, old, is_slot in reversed(undo):
        if is_slot:
            target[attr] = old  # type: ignore[index]
        elif old is _ABSENT:
            delattr(target, attr)  # a field the plan added (a config's head_dim)
        else:
            setattr(target, attr, old)


def _swap_one_by_one(cuts: list[_Cut], optimizers: Sequence[Optimizer]) -> None:
    done = 0
    with torch.inference_mode(False), torch.no_grad():
        for cut in cuts:
            try:
                new = cut.build()
                # This tensor's optimizer state: built before its swap, put in right after.
                remap = prepare_remap(optimizers, [(cut.current(), new, cut.dims)])
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise ResourceError(
                    f"out of memory while cutting {cut.owners[0][1]!r} of "
                    f"{type(cut.owners[0][0]).__name__} after {done} of {len(cuts)} tensors; "
                    "the model (and the optimizers given) are partly cut: reload it, free "
                    "memory and apply again"
                ) from exc
            except BaseException as exc:
                # The old tensors already swapped are freed: say what state is left.
                if hasattr(exc, "add_note"):
                    exc.add_note(
                        f"depprune: low_memory apply stopped after cutting {done} of "
                        f"{len(cuts)} tensors; the model is partly cut: reload it"
                    )
                raise
            cut.assign(new, None)
            remap.commit()
            del remap  # it holds the old tensor: free it before the next cut
            done += 1
