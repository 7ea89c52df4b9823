"""Trace stage: meta outputs of ATen calls, built without torch's meta kernels.

Takes one ATen call on meta tensors and gives its output tensors, as the
kernel would (same shapes, strides, dtypes), or says that the kernel must
run. On the meta device most of a traced forward's time is torch's meta
kernels: most are Python reference implementations that cost 50 to 1000 us
a call (``mul`` 150, ``_safe_softmax`` 800, ``native_layer_norm`` 1100),
against about 2 us to build a meta tensor. A kernel's output metadata is a
function of its arguments' metadata, and a model makes the same calls layer
after layer, so :class:`MetaOutputs` runs a kernel the first time it sees a
*signature* (the overload; every tensor argument's shape, strides, storage
offset and dtype; every other argument with its type; the default dtype)
and builds the outputs of later calls with that signature itself, with
``torch.empty_strided``. Exact by construction: nothing is inferred, only
repeated.

What always runs its kernel: views and every op whose outputs alias its
inputs (their C++ meta kernels are cheap, and storage sharing must stay),
ops that write to an argument other than ``self`` (``out=``), ops whose
output shape depends on values, and calls with a tensor that is not a plain
strided, non-complex meta tensor. A pointwise in-place op (``add_``,
``relu_``) is answered with its ``self`` once its kernel has returned
``self`` unchanged for that signature (the version counter is bumped above
the dispatch mode, as before).

Switches: ``DEPPRUNE_FAST_META=0`` runs every kernel; with
``DEPPRUNE_CHECK_FAST_META=1`` every built output is compared with the
kernel's (shape, dtype, strides, storage offset) and a difference raises
:class:`~depprune.errors.InternalError`. Both are read once at import;
:func:`configured` changes them for a block (tests, benchmarks).

>>> import torch
>>> outputs = MetaOutputs()
>>> x = torch.empty(2, 8, 4, device="meta").transpose(1, 2)
>>> first = outputs.run(torch.ops.aten.mul.Tensor, (x, 2.0), {})  # runs the kernel, learns
>>> again = outputs.run(torch.ops.aten.mul.Tensor, (x, 2.0), {})  # built without it
>>> again.shape, again.stride() == first.stride(), outputs.built
(torch.Size([2, 4, 8]), True, 1)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from depprune.errors import InternalError

__all__ = ["MetaOutputs", "configured", "enabled", "memoizable"]

#: Whether the trace and the replay build meta outputs themselves (DEPPRUNE_FAST_META=0: no).
ENABLED = os.environ.get("DEPPRUNE_FAST_META", "1") != "0"
#: Whether every built output is checked against its kernel (DEPPRUNE_CHECK_FAST_META=1).
CHECK = os.environ.get("DEPPRUNE_CHECK_FAST_META", "0") == "1"

_META = torch.device("meta")
_STRIDED = torch.strided
_TENSOR_TYPES = frozenset({torch.Tensor, nn.Parameter})
#: Complex tensors carry conjugate and negative bits that the signature does not hold.
_COMPLEX = frozenset({torch.complex32, torch.complex64, torch.complex128})
_END = object()  # closes a list in a signature

#: How an overload may be answered without its kernel (see :func:`memoizable`).
NEVER, FRESH, SELF = 0, 1, 2
#: Per signature: what the kernel gave, or that it cannot be repeated.
_UNREPEATABLE = None
_ALIASED = False  # an output shares an input's storage
_UNSEEN = object()


def enabled() -> bool:
    """Whether traces build meta outputs without kernels (see :func:`configured`).

    >>> isinstance(enabled(), bool)
    True
    """
    return ENABLED


@contextmanager
def configured(*, enabled: bool | None = None, check: bool | None = None) -> Iterator[None]:
    """Turn the fast path (``enabled``) or its check against the kernels (``check``) on or
    off inside the block; traces started in it keep the setting they started with.

    >>> with configured(enabled=False):
    ...     MetaOutputs().enabled
    False
    """
    global ENABLED, CHECK
    saved = ENABLED, CHECK
    if enabled is not None:
        ENABLED = enabled
    if check is not None:
        CHECK = check
    try:
        yield
    finally:
        ENABLED, CHECK = saved


def memoizable(func: Any) -> int:
    """``FRESH`` when ``func`` returns new tensors only, ``SELF`` for a pointwise in-place op
    that returns ``self``, ``NEVER`` otherwise (views, ``out=``, value-dependent shapes).

    >>> aten = torch.ops.aten
    >>> [memoizable(f) for f in (aten.mm.default, aten.add_.Tensor, aten.view.default)]
    [1, 2, 0]
    """
    schema = func._schema
    returns, arguments = schema.returns, schema.arguments
    tags = func.tags
    if not returns or torch.Tag.dynamic_output_shape in tags or torch.Tag.inplace_view in tags:
        return NEVER
    if any(str(r.type) != "Tensor" for r in returns):
        return NEVER  # lists, optionals and scalars: views (split) or value-dependent
    written = [a for a in arguments if a.alias_info is not None and a.alias_info.is_write]
    if all(r.alias_info is None for r in returns):
        return FRESH if not written and not func.is_view else NEVER
    is_self_in_place = (
        len(returns) == 1
        and len(written) == 1
        and written[0] is arguments[0]
        and arguments[0].name == "self"
        and returns[0].alias_info is not None
        and returns[0].alias_info.before_set == arguments[0].alias_info.before_set
    )
    return SELF if is_self_in_place and torch.Tag.pointwise in tags else NEVER


def _signature(values: Any, key: list) -> bool:
    """Append the metadata of ``values`` to ``key``; False when a value cannot be keyed."""
    for value in values:
        kind = type(value)
        if kind in _TENSOR_TYPES:
            dtype = value.dtype
            if not value.is_meta or value.layout is not _STRIDED or dtype in _COMPLEX:
                return False
            key.append((value.shape, value.stride(), value.storage_offset(), dtype))
        elif kind is list or kind is tuple:
            key.append(kind)
            if not _signature(value, key):
                return False
            key.append(_END)
        elif isinstance(value, torch.Tensor):
            return False  # a tensor subclass: its own dispatch may differ
        else:
            key.append(kind)  # 1, 1.0 and True are equal keys but promote differently
            key.append(value)
    return True


def _metadata(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype


class MetaOutputs:
    """Answers repeated ATen calls on meta tensors from the first call's outputs.

    One per trace or replay: ``run(func, args, kwargs)`` is ``func(*args,
    **kwargs)``, built without the kernel where the signature was seen.
    ``built`` and ``ran`` count the calls answered each way.

    >>> outputs = MetaOutputs()
    >>> x = torch.empty(3, 4, device="meta", dtype=torch.bfloat16)
    >>> [outputs.run(torch.ops.aten.add.Tensor, (x, 1.5), {}).dtype for _ in range(3)]
    [torch.bfloat16, torch.bfloat16, torch.bfloat16]
    >>> outputs.ran, outputs.built, outputs.policy(torch.ops.aten.t.default) == NEVER
    (1, 2, True)
    """

    def __init__(self) -> None:
        self.enabled = ENABLED
        self.check = CHECK
        self.policies: dict[Any, int] = {}
        self.outputs: dict[tuple, Any] = {}
        self.built = 0
        self.ran = 0

    def policy(self, func: Any) -> int:
        """:func:`memoizable` of ``func``, cached; ``NEVER`` when the fast path is off."""
        policy = self.policies.get(func)
        if policy is None:
            policy = memoizable(func) if self.enabled else NEVER
            self.policies[func] = policy
        return policy

    def run(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """``func(*args, **kwargs)``, from the outputs of an earlier call of the same signature."""
        policy = self.policies.get(func)
        if policy is None:
            policy = self.policy(func)
        if policy == NEVER:
            return func(*args, **kwargs)
        key: list = [func, torch.get_default_dtype()]
        if not _signature(args, key) or (kwargs and not _signature(kwargs.items(), key)):
            self.ran += 1
            return func(*args, **kwargs)
        signature = tuple(key)
        try:
            spec = self.outputs.get(signature, _UNSEEN)
        except TypeError:  # an unhashable argument
            self.ran += 1
            return func(*args, **kwargs)
        if spec is _UNSEEN:
            return self._learn(func, args, kwargs, signature, policy)
        if spec is _UNREPEATABLE:
            self.ran += 1
            return func(*args, **kwargs)
        self.built += 1
        if policy == SELF:
            out = args[0]
        elif type(spec) is list:
            out = tuple(
                torch.empty_strided(shape, stride, dtype=dtype, device=_META)
                for shape, stride, dtype in spec
            )
        else:
            shape, stride, dtype = spec
            out = torch.empty_strided(shape, stride, dtype=dtype, device=_META)
        if self.check:
            _check(func, out, func(*args, **kwargs))
        return out

    def _learn(self, func: Any, args: tuple, kwargs: dict, signature: tuple, policy: int) -> Any:
        """Run the kernel and keep what its outputs were, if a later call may repeat them."""
        self.ran += 1
        if policy == SELF:
            before = _metadata(args[0]) if args else None
            out = func(*args, **kwargs)
            same = before is not None and out is args[0] and _metadata(out) == before
            self.outputs[signature] = True if same else _UNREPEATABLE
            return out
        out = func(*args, **kwargs)
        spec = self.outputs[signature] = _fresh_spec(out, args, kwargs)
        if spec is _ALIASED:
            # Outputs that share an input's storage (``_unsafe_view``) do for every signature.
            self.outputs[signature] = _UNREPEATABLE
            self.policies[func] = NEVER
        return out


def _fresh_spec(out: Any, args: tuple, kwargs: dict) -> Any:
    """``(shape, stride, dtype)`` of a new output (a list of them for a tuple), or
    ``_UNREPEATABLE`` when ``empty_strided`` would not give the same tensors (``_ALIASED``
    when an output shares storage with an input or another output)."""
    outs = out if type(out) is tuple else (out,)
    inputs = [
        t
        for v in (*args, *kwargs.values())
        for t in (v if type(v) in (list, tuple) else (v,))
        if isinstance(t, torch.Tensor)
    ]
    specs = []
    for index, tensor in enumerate(outs):
        if (
            type(tensor) is not torch.Tensor
            or not tensor.is_meta
            or tensor.layout is not _STRIDED
            or tensor.storage_offset() != 0
            or tensor._is_view()
            or tensor.is_conj()
            or tensor.is_neg()
        ):
            return _UNREPEATABLE
        if any(torch._C._is_alias_of(tensor, t) for t in (*inputs, *outs[:index])):
            return _ALIASED
        shape, stride, dtype = tuple(tensor.shape), tensor.stride(), tensor.dtype
        twin = torch.empty_strided(shape, stride, dtype=dtype, device=_META)
        if twin.untyped_storage().nbytes() != tensor.untyped_storage().nbytes():
            return _UNREPEATABLE  # a kernel that keeps a larger buffer behind its output
        specs.append((shape, stride, dtype))
    return specs if type(out) is tuple else specs[0]


def _check(func: Any, built: Any, kernel: Any) -> None:
    """Raise when a built output differs from the kernel's (DEPPRUNE_CHECK_FAST_META=1)."""
    builts = built if type(built) is tuple else (built,)
    kernels = kernel if type(kernel) is tuple else (kernel,)
    if len(builts) != len(kernels) or any(
        b is not k and (type(k) is not torch.Tensor or _metadata(b) != _metadata(k))
        for b, k in zip(builts, kernels, strict=False)
    ):
        raise InternalError(
            f"the fast meta path built {[_metadata(b) for b in builts]} for {func} where its "
            f"kernel gives {[_metadata(k) for k in kernels if isinstance(k, torch.Tensor)]}; "
            "run with DEPPRUNE_FAST_META=0 to trace with the kernels"
        )
