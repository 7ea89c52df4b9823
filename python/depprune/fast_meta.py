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

A vision model changes its widths stage after stage, so exact signatures
repeat less there. For ops whose output metadata follows from the input
shapes by a known formula, :func:`generic_layout` also keys a call by its
*structure* (the overload, every tensor's dtype, every other argument) when
the call is in the formula's domain: pointwise ops whose tensor arguments
all have one shape and contiguous strides (the output is contiguous of that
shape; in place: ``self``), and ``native_batch_norm`` / ``native_layer_norm``
on a contiguous input with per-channel (per-feature) parameters of exactly
the normalised size. The first kernel call of a structure must give what
the formula says (only its dtypes are learned); later calls of the structure
at other widths are built from the formula. Arguments outside a formula's
domain (a mis-sized weight, a broadcast) always run the kernel, so every
error the kernel would raise is still raised.

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
_POINTWISE = torch.Tag.pointwise
_aten = torch.ops.aten
#: Elementwise overloads that torch leaves without the pointwise tag (MobileNetV3's
#: hardswish_ alone costs 10 ms a call on meta through its Python decomposition).
_UNTAGGED_POINTWISE = frozenset(
    {
        _aten.hardswish.default,
        _aten.hardswish_.default,
        _aten.gelu_.default,
        _aten.mish_.default,
        _aten.threshold_.default,
    }
)


def _pointwise(func: Any) -> bool:
    return _POINTWISE in func.tags or func in _UNTAGGED_POINTWISE


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
    return SELF if is_self_in_place and _pointwise(func) else NEVER


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


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides ``torch.empty(shape)`` has (a size-0 or size-1 dim steps like size 1)."""
    strides = [1] * len(shape)
    step = 1
    for dim in range(len(shape) - 1, -1, -1):
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def _plain_meta(value: Any) -> bool:
    return (
        type(value) in _TENSOR_TYPES
        and value.is_meta
        and value.layout is _STRIDED
        and value.dtype not in _COMPLEX
    )


def _dense(value: torch.Tensor) -> bool:
    return value.storage_offset() == 0 and value.stride() == _contiguous(tuple(value.shape))


def _structure(values: Any, key: list) -> bool:
    """Append ``values`` to ``key`` with every tensor reduced to its dtype; False when a
    value cannot be keyed (a tensor subclass, a tensor inside a list)."""
    for value in values:
        if type(value) in _TENSOR_TYPES:
            key.append(value.dtype)
        elif type(value) in (list, tuple):
            if any(isinstance(v, torch.Tensor) for v in value):
                return False
            key.append(type(value))
            key.extend(value)
            key.append(_END)
        elif isinstance(value, torch.Tensor):
            return False
        else:
            key.append(type(value))
            key.append(value)
    return True


#: (shape, strides) of each output, as a formula of the arguments.
Layout = list[tuple[tuple[int, ...], tuple[int, ...]]]


def _pointwise_layout(args: tuple, kwargs: dict) -> Layout | None:
    """Pointwise on tensors of one shape, all contiguous: one contiguous output of it."""
    shape = None
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if not _plain_meta(value) or not _dense(value):
                return None
            if shape is None:
                shape = tuple(value.shape)
            elif tuple(value.shape) != shape:
                return None  # broadcasting: the output's strides follow more rules
    if shape is None:
        return None
    return [(shape, _contiguous(shape))]


def _per_feature(values: Any, shape: tuple[int, ...]) -> bool:
    """Each value is None or a contiguous meta tensor of exactly ``shape``."""
    return all(
        v is None or (_plain_meta(v) and tuple(v.shape) == shape and _dense(v)) for v in values
    )


def _batch_norm_layout(args: tuple, kwargs: dict) -> Layout | None:
    """``native_batch_norm(input, weight, bias, mean, var, ...)``: the output like the
    input (contiguous), the saved statistics one per channel."""
    if kwargs or len(args) != 8 or not _plain_meta(args[0]) or not _dense(args[0]):
        return None
    shape = tuple(args[0].shape)
    if len(shape) < 2 or not _per_feature(args[1:5], shape[1:2]):
        return None
    return [(shape, _contiguous(shape)), (shape[1:2], (1,)), (shape[1:2], (1,))]


def _layer_norm_layout(args: tuple, kwargs: dict) -> Layout | None:
    """``native_layer_norm(input, normalized_shape, weight, bias, eps)``: the output like
    the input (contiguous), mean and rstd with the normalised dims kept as 1."""
    if kwargs or len(args) != 5 or not _plain_meta(args[0]) or not _dense(args[0]):
        return None
    shape, normalized = tuple(args[0].shape), tuple(args[1])
    axis = len(shape) - len(normalized)
    if not normalized or axis < 0 or shape[axis:] != normalized:
        return None
    if not _per_feature(args[2:4], normalized):
        return None
    stats = shape[:axis] + (1,) * len(normalized)
    return [(shape, _contiguous(shape)), (stats, _contiguous(stats)), (stats, _contiguous(stats))]


#: Non-pointwise overloads with a layout formula, and the positions of size arguments that
#: the formula checks (keyed by their length only, so that other widths share the structure).
_LAYOUTS = {
    _aten.native_batch_norm.default: (_batch_norm_layout, ()),
    _aten.native_layer_norm.default: (_layer_norm_layout, (1,)),
}


def generic_layout(func: Any, args: tuple, kwargs: dict) -> tuple[tuple, Layout] | None:
    """The call's structure key and its outputs' (shape, strides) by formula, or None when
    the call is outside every formula's domain (then only its exact signature repeats).

    >>> x = torch.empty(4, 6, device="meta")
    >>> key, layout = generic_layout(torch.ops.aten.gelu.default, (x,), {})
    >>> layout
    [((4, 6), (6, 1))]
    >>> generic_layout(torch.ops.aten.gelu.default, (x.t(),), {}) is None  # not contiguous
    True
    """
    formula, sizes = _LAYOUTS.get(func, (None, ()))
    if formula is None:
        if not _pointwise(func):
            return None
        formula = _pointwise_layout
    layout = formula(args, kwargs)
    if layout is None:
        return None
    key: list = [func, torch.get_default_dtype()]
    if sizes:
        args = tuple(len(a) if i in sizes else a for i, a in enumerate(args))
    if not _structure(args, key) or not _structure(kwargs.items(), key):
        return None
    try:
        structure = tuple(key)
        hash(structure)
    except TypeError:
        return None
    return structure, layout


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
        #: Per call structure (:func:`generic_layout`): the outputs' dtypes, ``True`` for an
        #: in-place op that returns ``self``, or ``_UNREPEATABLE``.
        self.generic: dict[tuple, Any] = {}
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
            return self._unseen(func, args, kwargs, signature, policy)
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

    def _unseen(self, func: Any, args: tuple, kwargs: dict, signature: tuple, policy: int) -> Any:
        """A new signature: built from its structure's formula when that was confirmed, else
        the kernel runs (and confirms the formula, or not, for later calls)."""
        generic = generic_layout(func, args, kwargs)
        if generic is None:
            return self._learn(func, args, kwargs, signature, policy)
        structure, layout = generic
        known = self.generic.get(structure, _UNSEEN)
        if known is _UNSEEN:
            out = self._learn(func, args, kwargs, signature, policy)
            self.generic[structure] = _confirmed(self.outputs[signature], layout, policy)
            return out
        if known is _UNREPEATABLE:
            return self._learn(func, args, kwargs, signature, policy)
        self.built += 1
        if policy == SELF:
            self.outputs[signature] = True
            out = args[0]
        else:
            spec = [
                (shape, stride, dtype) for (shape, stride), dtype in zip(layout, known, strict=True)
            ]
            self.outputs[signature] = spec if len(spec) > 1 else spec[0]
            outs = tuple(
                torch.empty_strided(shape, stride, dtype=dtype, device=_META)
                for shape, stride, dtype in spec
            )
            out = outs if len(outs) > 1 else outs[0]
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


def _confirmed(spec: Any, layout: Layout, policy: int) -> Any:
    """What a structure's later calls get: the learned dtypes when the kernel's outputs
    (``spec``, as learned for the exact signature) are the formula's layout, else
    ``_UNREPEATABLE``."""
    if policy == SELF:
        return True if spec is True else _UNREPEATABLE
    if spec is _UNREPEATABLE or spec is _ALIASED or spec is None:
        return _UNREPEATABLE
    specs = spec if type(spec) is list else [spec]
    if len(specs) != len(layout) or any(
        (shape, stride) != want for (shape, stride, _), want in zip(specs, layout, strict=True)
    ):
        return _UNREPEATABLE
    return [dtype for _, _, dtype in specs]


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
