"""Apply stage, module attributes: takes the cut shapes, gives each module's new sizes.

A fixer per layer kind (linear, conv, norms, embeddings, attention, MLPs,
experts) reads the new shapes and kept indices through a :class:`_View`;
sizes no fixer knows are inferred from the trace and proved by the replay
(:func:`depprune.verify.infer_attributes`).

>>> import torch
>>> _has(torch.nn.Linear(2, 3), "in_features", "out_features")
True
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from depprune.apply.cuts import _Cut, masked_tensors, named_tensors
from depprune.errors import PlanMismatchError


def _kept_groups(index: torch.Tensor, group_size: int) -> int:
    """How many blocks of ``group_size`` consecutive indices keep any index."""
    # Kept indices are sorted: count where the block changes (numpy: no op dispatch).
    blocks = index.numpy() // group_size
    return int(blocks.size and np.count_nonzero(blocks[1:] != blocks[:-1]) + 1)


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
        # A per-slice cut (2-d: each expert its own neurons) keeps as many in every slice;
        # fixers read sizes and patterns, so they see the first slice's indices.
        self.changed = {
            name: {dim: index[0] if index.dim() == 2 else index for dim, index in dims.items()}
            for name, dims in changed.items()
        }
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
    low, high = np.searchsorted(rows.numpy(), [start, stop])  # sorted: a slice, not a mask
    rows = rows[int(low) : int(high)] - start
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


def _fix_state_space(m: nn.Module, p: str, v: _View) -> dict:
    """Selective state-space mixers (Mamba, Mamba2, the Mamba layers of hybrids): every size
    their forward splits and views by, read from the cut tensors.

    Mamba keeps ``A_log`` as [inner, state] and ``dt_proj`` as [inner, time-step rank];
    Mamba2 keeps one ``A_log`` entry per head and packs ``conv1d``'s channels as
    [x (inner), B, C (n_groups * state each)]. The trace alone cannot tell these apart
    when two of them share a size (heads 8, head_dim 8, state 8).
    """
    out_proj = v.shape(p + "out_proj.weight")
    inner = int(out_proj[1])
    sizes = {"hidden_size": int(out_proj[0]), "intermediate_size": inner}
    a_log = v.shape(p + "A_log")
    if len(a_log) == 2:
        sizes["ssm_state_size"] = int(a_log[1])
        if p + "dt_proj.weight" in v.tensors:
            sizes["time_step_rank"] = int(v.shape(p + "dt_proj.weight")[1])
    else:
        heads, conv = int(a_log[0]), int(v.shape(p + "conv1d.weight")[0])
        groups = getattr(m, "n_groups", 1)
        sizes |= {
            "num_heads": heads,
            "head_dim": inner // heads,
            "conv_dim": conv,
            "ssm_state_size": (conv - inner) // (2 * groups),
        }
    return {key: value for key, value in sizes.items() if type(getattr(m, key, None)) is int}


def _fix_grouped_norm(m: nn.Module, p: str, v: _View) -> dict:
    """A norm over groups of ``group_size`` features (Mamba2's gated RMS norm): as many
    groups as before, each as much smaller as the whole."""
    old, new = int(v.old_shape(p + "weight")[0]), int(v.shape(p + "weight")[0])
    return {"group_size": m.group_size * new // old} if m.group_size * new % old == 0 else {}


#: Rows of a (tokens, features) operand of torch's grouped_mm must start 16 bytes apart.
_GROUPED_MM_ALIGNMENT = 16


def _fix_experts(m: nn.Module, p: str, v: _View) -> dict:
    """MoE experts stored as 3-d tensors: ``down_proj`` is [experts, hidden, width].

    Every expert keeps the same neurons' slots (the storage is one tensor),
    so the width is one number, the config's ``moe_intermediate_size`` where
    it has one (Qwen-MoE), else its ``intermediate_size`` (Mixtral).
    ``is_transposed`` experts store [experts, width, hidden], and so do those
    (Llama 4) whose old ``down_proj`` has the module's hidden size last.
    """
    down, old = v.shape(p + "down_proj"), v.old_shape(p + "down_proj")
    transposed = bool(getattr(m, "is_transposed", False))
    known = [
        getattr(m, a) for a in ("hidden_size", "hidden_dim") if type(getattr(m, a, None)) is int
    ]
    if known and old[1] != old[2] and known[0] in (old[1], old[2]):
        transposed = old[2] == known[0]  # the layout read from the sizes, not from a flag
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
    if _has(module, "A_log", "D", "in_proj", "out_proj", "conv1d"):
        return _fix_state_space
    weight = getattr(module, "weight", None)
    if isinstance(getattr(module, "group_size", None), int) and (
        isinstance(weight, nn.Parameter) and weight.dim() == 1
    ):
        return _fix_grouped_norm
    if kind.endswith(("MLP", "Intermediate")) or _has(module, "intermediate_size"):
        return _fix_mlp
    return None


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


def _warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn with the location of the first frame outside depprune (the user's call)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # depprune/
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
