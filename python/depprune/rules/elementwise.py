"""Elementwise ops, tensor creation and ops that change nothing about axes.

Every output of an elementwise op has the broadcast shape of its tensor
inputs: dims of equal size are the same axis, broadcast size-1 dims relate
nothing, scalars relate nothing. In-place variants return their input, whose
axes the trace reuses, so the same rule covers them.

>>> import torch
>>> from depprune.tracer import record
>>> result = record(torch.nn.ReLU(), torch.zeros(2, 3))
>>> result.num_ops
1
"""

from __future__ import annotations

from collections.abc import Sequence

from depprune.equations import AxisEquations
from depprune.rules.common import Axes, OpCall, broadcast_into, freeze_axes

__all__ = [
    "CREATION_OPS",
    "ELEMENTWISE_OPS",
    "NO_AXIS_OPS",
    "adopt_broadcast",
    "elementwise",
    "no_relation",
]


def elementwise(eqs: AxisEquations, call: OpCall) -> None:
    """Each output is the broadcast of every tensor input."""
    inputs = list(call.tensors())
    for out in call.outputs:
        if out is None:
            continue
        for operand in inputs:
            if len(operand) > len(out):
                # Not a broadcast after all (a reducing overload): nothing is known.
                freeze_axes(eqs, operand)
                freeze_axes(eqs, out)
            else:
                broadcast_into(eqs, out, operand)


def adopt_broadcast(
    eqs: AxisEquations, args: tuple, kwargs: dict, shape: Sequence[int]
) -> tuple[Axes | None, bool]:
    """The output shares the axes of the first tensor input of its own shape.

    The :func:`elementwise` rule would tie them dim by dim; sharing is the same
    relation without the axes and equations. With one tensor input it is all.

    >>> eqs = AxisEquations()
    >>> x, bias = Axes(eqs.axis(s) for s in (2, 3)), Axes([eqs.axis(3)])
    >>> adopt_broadcast(eqs, (x, bias), {}, (2, 3)) == (x, False)
    True
    """
    sizes = eqs.axis_sizes
    found = None
    tensors = 0
    for value in (*args, *kwargs.values()) if kwargs else args:
        if type(value) is Axes:
            tensors += 1
            if found is None and len(value) == len(shape):
                for axis, size in zip(value, shape, strict=True):
                    if sizes[axis] != size:
                        break
                else:
                    found = value
        elif type(value) in (list, tuple):
            return None, False  # tensors in a list: leave it to the rule
    return found, found is not None and tensors == 1


def no_relation(eqs: AxisEquations, call: OpCall) -> None:
    """Outputs get fresh axes from the trace and relate to nothing (shapes come from args)."""


#: Ops whose outputs broadcast their tensor inputs (besides those torch tags ``pointwise``).
ELEMENTWISE_OPS = (
    # arithmetic and math
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod",
    "pow", "neg", "abs", "sign", "sgn", "reciprocal", "sqrt", "rsqrt", "exp", "exp2",
    "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "asin", "acos", "atan",
    "atan2", "sinh", "cosh", "erf", "erfc", "erfinv", "floor", "ceil", "round", "trunc",
    "frac", "square", "lerp", "addcmul", "addcdiv", "maximum", "minimum", "fmax", "fmin",
    "clamp", "clamp_min", "clamp_max", "clip", "nan_to_num", "xlogy", "hypot", "copysign",
    # activations
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "softplus", "leaky_relu", "elu", "selu", "celu", "mish",
    "logit", "threshold", "rrelu_with_noise", "log_sigmoid_forward",
    "softshrink", "hardshrink", "sinc",
    # softmax-like: same shape along every dim, and a dim's elements are a set
    # (scans like cumsum and masks like tril depend on positions: rules/position.py)
    "_softmax", "_log_softmax", "_safe_softmax", "softmax", "log_softmax",
    # comparisons, masks and logic
    "eq", "ne", "lt", "le", "gt", "ge", "where", "masked_fill",
    "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "bitwise_left_shift",
    "bitwise_right_shift", "logical_and", "logical_or", "logical_xor", "logical_not",
    "isinf", "isnan", "isfinite", "isneginf", "isposinf", "signbit",
    # copies, casts and aliases
    "clone", "_to_copy", "to", "contiguous", "alias", "detach", "detach_", "lift_fresh",
    "lift_fresh_copy", "copy", "copy_", "_conj", "resolve_conj", "resolve_neg", "positive",
    "native_dropout", "dropout", "feature_dropout", "alpha_dropout", "bernoulli",
    "fill", "fill_", "zero_", "uniform_", "normal_", "bernoulli_", "exponential_",
    # creation that follows an input's shape
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "randint_like",
)  # fmt: skip

#: Ops that create tensors from shape arguments: fresh axes, no relation, free to cut.
#: Safe because every element has the same value (or an independent random draw), so a
#: cut tensor equals the cut of the full one; position-valued creation (``arange``,
#: ``eye``, ``linspace``) is frozen instead (``position.POSITION_CREATION_OPS``).
CREATION_OPS = (
    "zeros", "ones", "empty", "full", "scalar_tensor", "rand", "randn", "randint",
    "empty_strided", "empty_permuted", "new_zeros",
    "new_ones", "new_empty", "new_full", "new_empty_strided",
)  # fmt: skip

#: Ops that neither read nor produce axes worth relating (asserts, bookkeeping).
NO_AXIS_OPS = (
    "_assert_async", "_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
    "_functional_sym_constrain_range", "record_stream", "_print", "sym_size", "sym_numel",
    "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
    # value reads (.item(), bool(), torch.equal): a Python answer, no axes
    "_local_scalar_dense", "is_nonzero", "equal",
)  # fmt: skip
