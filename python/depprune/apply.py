"""Apply kept indices to a model: cut every parameter, fix module attributes.

All or nothing: the whole plan is checked and every new tensor is built
before the first module is touched, so on any error the model is exactly as
it was. Tensors are cut with ``index_select`` on their own device and dtype;
``requires_grad`` is kept; tied parameters stay tied.

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

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from depprune.errors import DeppruneError

__all__ = ["PlanMismatchError", "apply_kept_indices"]

ParamDim = tuple[str, int]
Kept = Mapping[ParamDim, "torch.Tensor | np.ndarray"]


class PlanMismatchError(DeppruneError, ValueError):
    """The plan does not fit the model it is applied to."""


@dataclass
class _Cut:
    """One tensor's replacement: where it lives and what replaces it."""

    owners: list[tuple[nn.Module, str, bool]]  # (module, attribute, is_parameter)
    old: torch.Tensor
    new: torch.Tensor


def _named_tensors(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
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


def _index_tensor(indices: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(indices, np.ndarray):
        indices = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64))
    return indices.to(device=device, dtype=torch.long)


def _plan_cuts(
    model: nn.Module, kept: Kept
) -> tuple[list[_Cut], dict[str, dict[int, torch.Tensor]]]:
    """Check the plan against the model and build every new tensor."""
    tensors = _named_tensors(model)
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
        index = _index_tensor(indices, tensor.device)
        size = tensor.shape[dim]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise PlanMismatchError(
                f"the plan keeps index {int(index.max())} of dim {dim} of {name!r}, "
                f"which has only {size}; was the plan made for another model?"
            )
        if index.numel() == size:
            continue
        changed.setdefault(name, {})[dim] = index
        dims = dims_of.setdefault(id(tensor), {})
        if dim in dims and not torch.equal(dims[dim], index):
            raise PlanMismatchError(f"tied tensor {name!r} is cut differently under its names")
        dims[dim] = index
        originals[id(tensor)] = tensor
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {key: [] for key in originals}
    for module, attr, is_param in tensors.values():
        key = id(getattr(module, attr))
        if key in owners:
            owners[key].append((module, attr, is_param))
    cuts = []
    for key, tensor in originals.items():
        new = tensor.detach()
        for dim, index in sorted(dims_of[key].items()):
            new = new.index_select(dim, index)
        cuts.append(_Cut(owners=owners[key], old=tensor, new=new))
    return cuts, changed


def _kept_groups(index: torch.Tensor, group_size: int) -> int:
    """How many blocks of ``group_size`` consecutive indices keep any index."""
    return int(torch.unique(torch.div(index, group_size, rounding_mode="floor")).numel())


class _View:
    """What a fixer may read: new shapes and kept indices, by full tensor name."""

    def __init__(self, model: nn.Module, cuts: list[_Cut], changed: Mapping) -> None:
        self._tensors = {n: getattr(m, a) for n, (m, a, _) in _named_tensors(model).items()}
        self._new_shape = {id(c.old): c.new.shape for c in cuts}
        self.changed = changed

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
    return {"nf": v.shape(p + "weight")[1]}


def _fix_hf_attention(m: nn.Module, p: str, v: _View) -> dict:
    """q/k/v projections viewed as (heads, head_dim): count what each kept."""
    head_dim = m.head_dim
    q_rows, k_rows = v.cut(p + "q_proj.weight", 0), v.cut(p + "k_proj.weight", 0)
    q_size = v.shape(p + "q_proj.weight")[0]
    k_size = v.shape(p + "k_proj.weight")[0]
    heads = m.q_proj.weight.shape[0] // head_dim
    kv_heads = m.k_proj.weight.shape[0] // head_dim
    if q_rows is not None:
        heads = _kept_groups(q_rows, head_dim)
    if k_rows is not None:
        kv_heads = _kept_groups(k_rows, head_dim)
    new = {"head_dim": q_size // heads}
    if k_size // kv_heads != new["head_dim"]:
        raise PlanMismatchError(
            f"{p[:-1]}: queries would keep head_dim {new['head_dim']} but keys "
            f"{k_size // kv_heads}; q and k head_dim must be pruned together"
        )
    for attr, value in [
        ("num_heads", heads),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("num_key_value_groups", heads // kv_heads),
    ]:
        if hasattr(m, attr):
            new[attr] = value
    return new


FIXERS: list[tuple[type, Fixer]] = [
    (nn.Linear, _fix_linear),
    (nn.modules.conv._ConvNd, _fix_conv),
    (nn.modules.batchnorm._NormBase, _fix_batch_norm),
    (nn.LayerNorm, _fix_layer_norm),
    (nn.GroupNorm, _fix_group_norm),
    (nn.Embedding, _fix_embedding),
]


def _fixer_for(module: nn.Module) -> Fixer | None:
    for cls, fixer in FIXERS:
        if isinstance(module, cls):
            return fixer
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return _fix_hf_conv1d
    if all(hasattr(module, a) for a in ("q_proj", "k_proj", "head_dim")):
        return _fix_hf_attention
    return None


def _attribute_changes(model: nn.Module, view: _View) -> list[tuple[nn.Module, dict]]:
    changes = []
    for module_name, module in model.named_modules():
        fixer = _fixer_for(module)
        prefix = f"{module_name}." if module_name else ""
        if fixer is None or not any(name.startswith(prefix) for name in view.changed):
            continue
        if fixer in (_fix_layer_norm, _fix_group_norm) and module.weight is None:
            continue
        changes.append((module, fixer(module, prefix, view)))
    return changes


def apply_kept_indices(model: nn.Module, kept: Kept) -> None:
    """Cut every (parameter or buffer, dim) of ``model`` down to its kept indices.

    ``kept`` maps ``(name, dim)`` to the indices to keep along that dim (as
    from :meth:`depprune.DependencyGraph.kept_indices`). Raises
    :class:`PlanMismatchError` before changing anything if the plan does not
    fit the model.
    """
    with torch.no_grad():
        cuts, changed = _plan_cuts(model, kept)
        attribute_changes = _attribute_changes(model, _View(model, cuts, changed))
    # Nothing above touched the model; from here on only assignments happen.
    for cut in cuts:
        replacement: torch.Tensor = cut.new
        if isinstance(cut.old, nn.Parameter):
            replacement = nn.Parameter(cut.new, requires_grad=cut.old.requires_grad)
        for module, attr, is_param in cut.owners:
            (module._parameters if is_param else module._buffers)[attr] = replacement
    for module, attributes in attribute_changes:
        for attr, value in attributes.items():
            setattr(module, attr, value)
