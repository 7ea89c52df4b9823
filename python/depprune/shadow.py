"""Shadow stage: a meta-device twin of a model, and example inputs as shapes only.

Takes a model and gives a copy with the same module tree, classes, Python
attributes, hooks and config, whose parameters, buffers and tensor
attributes are meta tensors of the same shapes and dtypes. Tracing and
verifying on the shadow reads no weight and changes no state of the real
model, in any mode (training-mode buffers, caches filled by a forward,
spectral-norm vectors), and a plan can be tried on it by cutting meta
tensors for free.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).train()
>>> twin = meta_shadow(model)
>>> twin[0].weight.device.type, twin[0].weight.shape, twin[1].training
('meta', torch.Size([8, 4]), True)
>>> twin is not model and model[0].weight.device.type
'cpu'
>>> spec = input_spec((torch.zeros(2, 4), {"flag": True}))
>>> spec
[{'tensor': [[2, 4], 'float32']}, {'flag': True}]
>>> inputs_from_spec(spec)[0].shape, inputs_from_spec(spec)[1]
(torch.Size([2, 4]), {'flag': True})
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["ShadowError", "input_spec", "inputs_from_spec", "meta_inputs", "meta_shadow"]


class ShadowError(Exception):
    """The model cannot be shadowed; the message says why (the caller falls back)."""


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    if isinstance(tensor, nn.Parameter):
        param = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        param.__dict__.update(copy.copy(tensor.__dict__))
        return param
    return meta


def _meta_whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain meta tensor of a DTensor's global shape (a Parameter for a parameter)."""
    meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(meta, requires_grad=tensor.requires_grad)
    return meta


def _tensor_attributes(value: Any, found: list[torch.Tensor], depth: int = 0) -> None:
    """Tensors held in plain attributes, lists, tuples and dicts (caches, masks)."""
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            _tensor_attributes(item, found, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for item in value.values():
            _tensor_attributes(item, found, depth + 1)


def _device_cache(cache: dict, memo: dict[int, Any]) -> None:
    """A dict of tensors keyed by their own device (timm's eval-mode attention-bias cache)
    is a per-device cache: the shadow keys it by its device, so that its forward takes
    the cached tensors as the model's forward will, not the tables they came from."""
    if not cache or not all(
        isinstance(v, torch.Tensor) and k == str(v.device) for k, v in cache.items()
    ):
        return
    twin = {}
    for value in cache.values():
        meta = memo.get(id(value))
        if meta is None:
            meta = memo[id(value)] = _meta_like(value)
        twin["meta"] = meta
    memo[id(cache)] = twin


def meta_shadow(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every tensor it holds on the meta device.

    Raises :class:`ShadowError` when the model holds tensors that have no
    meta twin (tensor subclasses, sparse or quantized storage) or cannot be
    deep-copied.
    """
    from depprune.distributed.accelerate import shadow_memo, strip_offload_hooks
    from depprune.distributed.dtensor import is_dtensor, sharding_memo, strip_sharding

    # accelerate's hooks stay on the model; their weight maps stay out of the copy.
    memo: dict[int, Any] = shadow_memo(model)
    for module in model.modules():
        held: list[torch.Tensor] = []
        held += [t for t in module._parameters.values() if t is not None]
        held += [t for t in module._buffers.values() if t is not None]
        for key, value in vars(module).items():
            if not key.startswith("_"):
                _tensor_attributes(value, held)
        for key, value in vars(module).items():
            if not key.startswith("_") and isinstance(value, dict):
                _device_cache(value, memo)
        for tensor in held:
            if id(tensor) in memo:
                continue
            if is_dtensor(tensor):
                memo[id(tensor)] = _meta_whole(tensor)  # the global shape, as the module sees it
                continue
            if (
                tensor.layout is not torch.strided
                or tensor.is_quantized
                or (type(tensor) not in (torch.Tensor, nn.Parameter))
            ):
                raise ShadowError(
                    f"{type(module).__name__} holds a {type(tensor).__name__} with layout "
                    f"{tensor.layout}, which has no meta twin"
                )
            memo[id(tensor)] = _meta_like(tensor)
    try:
        sharding_memo(model, memo)  # FSDP2's modules: plain twins, without its hooks
        return strip_sharding(strip_offload_hooks(_copied(model, memo)))
    except Exception as exc:
        raise ShadowError(f"the model cannot be copied ({type(exc).__name__}: {exc})") from exc


#: Values deepcopy gives back as they are (its atomic types that modules hold).
_ATOMIC = frozenset({int, float, bool, complex, str, bytes, type(None), type, torch.dtype})
#: How deepcopy copies a plain module: these, as nn.Module defines them.
_COPY_HOOKS = ("__getstate__", "__setstate__", "__reduce_ex__", "__reduce__", "__deepcopy__")
_PLAIN_COPY: dict[type, bool] = {}
_MISSING = object()


def _plain_copy(cls: type) -> bool:
    """Whether ``cls`` copies as nn.Module does (no copy hook of its own)."""
    plain = _PLAIN_COPY.get(cls)
    if plain is None:
        plain = _PLAIN_COPY[cls] = all(
            getattr(cls, name, None) is getattr(nn.Module, name, None) for name in _COPY_HOOKS
        )
    return plain


def _copied(value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(value, memo)``, with module trees copied module by module.

    The same copy, several times faster on a big model: deepcopy rebuilds
    every module through ``__reduce_ex__`` and each of its dozen hook dicts
    (almost always empty) through the generic path. A module whose class has
    a copy hook of its own, and every value that is not a module, an atomic
    value or an empty dict, goes through deepcopy itself.

    >>> layer = nn.Linear(2, 3)
    >>> twin = _copied(layer, {})
    >>> twin is not layer and twin.weight is not layer.weight, torch.equal(twin.weight, layer.weight)
    (True, True)
    """
    cls = type(value)
    if cls in _ATOMIC:
        return value
    found = memo.get(id(value), _MISSING)
    if found is not _MISSING:
        return found
    if (cls is dict or cls is OrderedDict) and not value:
        twin = memo[id(value)] = cls()
        return twin
    if not (isinstance(value, nn.Module) and _plain_copy(cls)):
        return copy.deepcopy(value, memo)
    module = cls.__new__(cls)
    memo[id(value)] = module
    memo.setdefault(id(memo), []).append(value)  # as deepcopy keeps what its memo names alive
    state = value.__getstate__()
    for key, item in state.items():
        if key in ("_modules", "_parameters", "_buffers") and type(item) in (dict, OrderedDict):
            state[key] = type(item)((name, _copied(v, memo)) for name, v in item.items())
        else:
            state[key] = _copied(item, memo)
    module.__setstate__(state)
    return module


def meta_inputs(example_inputs: Any) -> Any:
    """``example_inputs`` with every tensor replaced by a meta tensor of its shape and dtype."""
    return pytree.tree_map_only(
        torch.Tensor, lambda t: torch.empty_like(t, device="meta"), example_inputs
    )


_JSON_SCALARS = (bool, int, float, str, type(None))


def input_spec(example_inputs: Any) -> Any:
    """The example inputs as JSON-ready data: tensors by shape and dtype, the rest as is.

    Returns ``None`` when an input is neither a tensor, a JSON scalar, nor a
    list, tuple or string-keyed dict of those (such inputs cannot be saved).
    """

    def encode(value: Any, depth: int) -> Any:
        if depth > 16:
            raise ValueError("inputs nested too deep")
        if isinstance(value, torch.Tensor):
            return {"tensor": [list(value.shape), str(value.dtype).removeprefix("torch.")]}
        if isinstance(value, _JSON_SCALARS):
            return value
        if isinstance(value, (list, tuple)):
            return [encode(v, depth + 1) for v in value]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            if "tensor" in value and len(value) == 1:
                raise ValueError("a dict input with the single key 'tensor' is ambiguous")
            return {k: encode(v, depth + 1) for k, v in value.items()}
        raise ValueError(f"a {type(value).__name__} input cannot be described")

    try:
        return encode(example_inputs, 0)
    except ValueError:
        return None


def inputs_from_spec(spec: Any) -> Any:
    """Meta-device example inputs rebuilt from :func:`input_spec` (tuples come back as lists)."""

    def decode(value: Any, depth: int) -> Any:
        if depth > 16:
            raise ValueError("input spec nested too deep")
        if isinstance(value, dict):
            if set(value) == {"tensor"}:
                shape, dtype = value["tensor"]
                torch_dtype = getattr(torch, str(dtype), None)
                if not isinstance(torch_dtype, torch.dtype):
                    raise ValueError(f"unknown dtype {dtype!r} in an input spec")
                if not isinstance(shape, list) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape
                ):
                    raise ValueError(f"bad tensor shape {shape!r} in an input spec")
                return torch.empty(shape, dtype=torch_dtype, device="meta")
            return {str(k): decode(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v, depth + 1) for v in value]
        if isinstance(value, _JSON_SCALARS):
            return value
        raise ValueError(f"a {type(value).__name__} in an input spec")

    return decode(spec, 0)
