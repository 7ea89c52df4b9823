"""Record one forward pass at the ATen level and turn it into axis equations.

:func:`record` runs the model once under a ``TorchDispatchMode`` that gives
every tensor it sees one axis per dim and hands every ATen call to its rule
in :mod:`depprune.rules`. Tensor values are never read, so a model built on
the meta device traces without weights. There, calls that read values
(``.item()``, ``bool()``) get a neutral answer, and ops whose output shape
depends on values (``nonzero``, boolean masks, ``bincount``, ``unique``: MoE
routing) the fullest one (every element nonzero, every value distinct), so
every expert's code runs; the trace's notes say so. On meta, a call whose
signature the trace has seen before gets its outputs built without torch's
meta kernel (:mod:`depprune.fast_meta`): layer after layer, most of them.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> result = record(model, torch.zeros(3, 4))
>>> [(g.size, g.members) for g in result.equations.solve().groups]
[(8, (('0.weight', 0), ('0.bias', 0), ('2.weight', 1)))]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from depprune.equations import SUM, AxisEquations
from depprune.errors import DeppruneError, TraceError, UnsupportedOpError
from depprune.fast_meta import NEVER, MetaOutputs
from depprune.rules import ADOPTERS, rule_for
from depprune.rules.common import Axes, OpCall, freeze_all
from depprune.shadow import ShadowError, meta_inputs, meta_shadow

__all__ = ["TraceResult", "model_inputs", "record", "running_stats_kept", "split_inputs"]


@dataclass
class TraceResult:
    """What one recorded forward pass gives: equations plus what had to be assumed."""

    #: Axes, equations, frozen axes and parameter dims, ready for ``equations.solve()``.
    equations: AxisEquations
    #: ATen ops without an axis rule (their axes are frozen), sorted by name, with counts.
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    #: What the trace assumed or froze beyond the rules (neutral answers, fused layers).
    notes: list[str] = field(default_factory=list)
    #: ATen calls recorded.
    num_ops: int = 0
    #: Every parameter and buffer name, tied ones under each of their names.
    param_names: list[str] = field(default_factory=list)
    #: Axes of every input tensor, then of every output tensor, in pytree order (all frozen).
    input_axes: list[tuple[int, ...]] = field(default_factory=list)
    output_axes: list[tuple[int, ...]] = field(default_factory=list)
    #: Every recorded ATen call in order: what the replay of a plan must see again.
    log: OpLog | None = None
    #: "meta" when the forward ran on a meta shadow, "real" when on the model itself.
    device: str = "meta"
    #: Calls whose meta outputs were built without their kernels (:mod:`depprune.fast_meta`).
    meta_outputs_built: int = 0


_aten = torch.ops.aten
#: Calls that read tensor values; on meta tensors they get a neutral answer instead.
_DATA_DEPENDENT = {
    _aten._local_scalar_dense.default: ".item() (aten._local_scalar_dense) on a meta tensor",
    _aten.is_nonzero.default: "bool() (aten.is_nonzero) on a meta tensor",
    _aten.equal.default: "torch.equal (aten.equal) on meta tensors",
}
_MASK_DTYPES = (torch.bool, torch.uint8)


def _all_nonzero(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.numel(), x.dim()), dtype=torch.long)


def _all_selected(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.new_empty((torch.broadcast_shapes(x.shape, mask.shape).numel(),))


def _index_all_true(x: torch.Tensor, indices: list) -> Any:
    if not any(t is not None and t.dtype in _MASK_DTYPES for t in indices):
        return NotImplemented
    # A mask of every element true picks what its nonzero() coordinates pick.
    long_indices: list = []
    for t in indices:
        if t is not None and t.dtype in _MASK_DTYPES:
            long_indices += [t.new_empty((t.numel(),), dtype=torch.long)] * t.dim()
        else:
            long_indices.append(t)
    return _aten.index.Tensor(x, long_indices)


def _bincount_below_minlength(x: torch.Tensor, weights=None, minlength: int = 0) -> torch.Tensor:
    dtype = torch.float64 if weights is not None else torch.long
    if weights is not None and weights.dtype is torch.float32:
        dtype = torch.float32
    return x.new_empty((minlength or x.numel(),), dtype=dtype)


def _unique_all_distinct(
    x: torch.Tensor, sorted: bool = True, return_inverse: bool = False, return_counts: bool = False
) -> tuple:
    n = x.numel()
    inverse = x.new_empty(x.shape if return_inverse else (0,), dtype=torch.long)
    return x.new_empty((n,)), inverse, x.new_empty((n if return_counts else 0,), dtype=torch.long)


def _repeat_once(repeats: torch.Tensor, output_size=None) -> Any:
    if output_size is not None:
        return NotImplemented
    return repeats.new_empty((repeats.numel(),), dtype=torch.long)


#: Ops whose output shape depends on values (MoE routing, masks): on meta tensors they get
#: the answer of the fullest case, so that every branch the data could take is traced.
_DATA_DEPENDENT_SHAPES = {
    _aten.nonzero.default: ("torch.nonzero", "as if every element were nonzero", _all_nonzero),
    _aten.masked_select.default: ("masked_select", "as if the mask were all true", _all_selected),
    _aten.index.Tensor: ("indexing by a boolean mask", "as if it were all true", _index_all_true),
    _aten.bincount.default: (
        "torch.bincount",
        "as if every value were below minlength (or distinct)",
        _bincount_below_minlength,
    ),
    _aten._unique2.default: (
        "torch.unique",
        "as if every value were distinct",
        _unique_all_distinct,
    ),
    _aten.repeat_interleave.Tensor: (
        "repeat_interleave by a tensor",
        "as if every repeat were 1",
        _repeat_once,
    ),
}


def _nms_keeps_all(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> Any:
    return boxes.new_empty((boxes.shape[0],), dtype=torch.long)


#: Data-dependent ops of other libraries, by schema name, registered when first seen.
_NAMED_DATA_DEPENDENT_SHAPES = {
    # Detection heads suppress boxes by value: on meta, every box survives.
    "torchvision::nms": ("torchvision's nms", "as if every box were kept", _nms_keeps_all),
}

#: How a call runs (the third item of a recorder's entry): its kernel, a rare path
#: (``_Recorder._rare``), or outputs built without the kernel on meta (:mod:`depprune.fast_meta`).
_KERNEL, _RARE, _BUILT = 0, 1, 2

#: Modules whose fused kernels mix gates in ways no equation expresses; their params freeze.
_FROZEN_MODULES = (nn.RNNBase, nn.RNNCellBase)


@dataclass
class OpLog:
    """The recorded calls: overload, tensor input and output axes, and the module running it."""

    funcs: list[Any] = field(default_factory=list)
    inputs: list[tuple] = field(default_factory=list)
    outputs: list[list] = field(default_factory=list)
    modules: list[int] = field(default_factory=list)
    #: Module names by the index ``modules`` holds ("" is the model itself).
    module_names: list[str] = field(default_factory=list)

    def axes_of(self, op: int) -> list[int]:
        """Every axis op ``op`` read or wrote."""
        axes: list[int] = []
        for value in (*self.inputs[op], *self.outputs[op]):
            if isinstance(value, tuple):
                axes.extend(value)
        return axes


class _ModuleStack:
    """Which module of the traced model is running: global forward hooks, removed on exit."""

    def __init__(self, model: Any) -> None:
        modules = list(model.named_modules()) if isinstance(model, nn.Module) else []
        self.index = {id(m): i for i, (_, m) in enumerate(modules)}
        self.names = [name for name, _ in modules] or [""]
        self.stack = [0]
        self.handles: list[Any] = []

    def __enter__(self) -> _ModuleStack:
        from torch.nn.modules import module as module_hooks

        index, stack = self.index, self.stack

        def push(module: nn.Module, _inputs: Any) -> None:
            stack.append(index.get(id(module), stack[-1]))

        def pop(module: nn.Module, _inputs: Any, _output: Any) -> None:
            if len(stack) > 1:
                stack.pop()

        if self.index:
            self.handles = [
                module_hooks.register_module_forward_pre_hook(push),
                module_hooks.register_module_forward_hook(pop),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


class _Recorder(TorchDispatchMode):
    """Gives tensors axes and turns each ATen call into equations through its rule."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps __torch_dispatch__ in a dynamo guard unless told not to: two extra
        # frames per ATen op, and the trace never runs under torch.compile.
        return False

    #: Builds meta outputs without kernels; made on first use where ``__init__`` did not.
    _meta: MetaOutputs | None = None

    def __init__(self, equations: AxisEquations, strict: bool, stack: _ModuleStack) -> None:
        super().__init__()
        self._meta = MetaOutputs()
        self.equations = equations
        self.strict = strict
        self.log = OpLog(module_names=stack.names)
        self.stack = stack.stack
        self.model_notes: list[str] = []
        self.input_axes: list[Axes] = []
        self.axes: dict[int, Axes] = {}
        # Keeps every tensor seen alive so that no id() is reused during the trace.
        self.alive: list[torch.Tensor] = []
        self.rules: dict[Any, Any] = {}
        self.unsupported: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.num_ops = 0
        self.error: DeppruneError | None = None

    def axes_of(self, tensor: torch.Tensor) -> Axes:
        """The tensor's axes, fresh ones if it was not seen before."""
        axes = self.axes.get(id(tensor))
        if axes is None:
            axes = self.fresh(tensor)
        return axes

    def fresh(self, tensor: torch.Tensor) -> Axes:
        sizes = self.equations.axis_sizes
        first = len(sizes)
        shape = tensor.shape
        sizes.extend(shape)
        axes = Axes(range(first, first + len(shape)))
        self.axes[id(tensor)] = axes
        self.alive.append(tensor)
        return axes

    def _output_axes(self, tensor: torch.Tensor) -> Axes:
        axes = self.axes.get(id(tensor))
        if axes is None:
            return self.fresh(tensor)
        # In-place ops return their input; only a shape change (unsqueeze_) needs new axes.
        sizes = self.equations.axis_sizes
        if len(axes) != tensor.dim() or any(
            sizes[a] != s for a, s in zip(axes, tensor.shape, strict=True)
        ):
            return self.fresh(tensor)
        return axes

    def _wrap(self, values: Iterable[Any], found: list) -> tuple:
        """``values`` with tensors replaced by their axes; those axes are appended to ``found``."""
        known = self.axes
        wrapped = []
        for value in values:
            if isinstance(value, torch.Tensor):
                axes = known.get(id(value))
                if axes is None:
                    axes = self.fresh(value)
                wrapped.append(axes)
                found.append(axes)
            elif type(value) in (list, tuple):
                items = [self.axes_of(v) if isinstance(v, torch.Tensor) else v for v in value]
                wrapped.append(items)
                found.extend(v for v in items if type(v) is Axes)
            else:
                wrapped.append(value)
        return tuple(wrapped)

    def _entry(self, func: Any) -> tuple:
        """``(rule, adopter, path)`` of one overload, worked out on its first call: ``path``
        is ``_KERNEL``, ``_RARE`` or ``_BUILT`` (truthy: ``_rare`` says what to run)."""
        rule = rule_for(func)
        named = _NAMED_DATA_DEPENDENT_SHAPES.get(getattr(func, "name", lambda: "")())
        if named is not None:
            _DATA_DEPENDENT_SHAPES[func] = named
        if rule is None or func in _DATA_DEPENDENT or func in _DATA_DEPENDENT_SHAPES:
            path = _RARE
        else:
            path = _KERNEL if self._meta_outputs().policy(func) == NEVER else _BUILT
        entry = (rule, ADOPTERS.get(rule), path)
        self.rules[func] = entry
        return entry

    def _meta_outputs(self) -> MetaOutputs:
        meta = self._meta
        if meta is None:
            meta = self._meta = MetaOutputs()
        return meta

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = self.rules.get(func)
        rule, adopter, path = entry if entry is not None else self._entry(func)
        if kwargs is None:
            kwargs = {}
        run = func
        if path == _RARE:
            done, run = self._rare(func, rule, args, kwargs)
            if done:
                return run
            if rule is None and self.strict:
                self.error = UnsupportedOpError(
                    f"{func.overloadpacket} has no axis rule; pass strict=False to freeze its "
                    "axes, or add a rule in depprune/rules"
                )
                raise self.error
        found: list[Axes] = []
        in_args = self._wrap(args, found)
        in_kwargs = (
            dict(zip(kwargs, self._wrap(kwargs.values(), found), strict=True)) if kwargs else {}
        )
        out = self._meta.run(func, args, kwargs) if path == _BUILT else run(*args, **kwargs)
        self.num_ops += 1
        log = self.log
        log.funcs.append(func)
        log.inputs.append(tuple(found))
        log.modules.append(self.stack[-1])
        if isinstance(out, torch.Tensor):
            # The common case inline: a new tensor shares an input's axes or gets fresh ones.
            axes = self.axes.get(id(out))
            if axes is None:
                if adopter is not None:
                    axes, done = adopter(self.equations, in_args, in_kwargs, out.shape)
                    if axes is not None:
                        self.axes[id(out)] = axes
                        self.alive.append(out)
                        if done:
                            log.outputs.append([axes])
                            return out
                outputs = [self.fresh(out) if axes is None else axes]
            else:
                outputs = [self._output_axes(out)]
        elif isinstance(out, (tuple, list)):
            outputs = [self._output_axes(t) if isinstance(t, torch.Tensor) else None for t in out]
        else:
            outputs = []
        log.outputs.append(outputs)
        call = OpCall(func, in_args, in_kwargs, outputs, args)
        if rule is None:
            self.unsupported[str(func.overloadpacket)] += 1
            freeze_all(self.equations, call)
            return out
        try:
            note = rule(self.equations, call)
        except Exception as exc:
            # A rule that cannot read this call must not guess: its axes freeze.
            freeze_all(self.equations, call)
            note = f"the {func.overloadpacket} rule failed ({exc!r}); its axes are frozen"
        if note:
            self.notes[note] += 1
        return out

    def _rare(self, func, rule: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """The paths other than a plain kernel call, kept off the per-op fast path:
        ``(True, result)`` when answered here, else ``(False, what to run)``. The replay
        takes the same ones, built meta outputs included."""
        if self.rules[func][2] == _BUILT:
            meta = self._meta_outputs()
            return False, lambda *a, **k: meta.run(func, a, k)
        run = func
        if func in _DATA_DEPENDENT and args and args[0].is_meta:
            return True, self._neutral(func, args[0])
        if func in _DATA_DEPENDENT_SHAPES and args and args[0].is_meta:
            run = self._neutral_shape(func, args, kwargs)
        if rule is None:
            # Composite ops (conv2d under inference_mode) run as their decomposition,
            # whose ops come back through this mode and have rules.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return True, out
        return False, run

    def _neutral_shape(self, func, args: tuple, kwargs: dict) -> Any:
        """``func``, or its fullest-case answer on meta when its shape depends on values."""
        what, answer, fullest = _DATA_DEPENDENT_SHAPES[func]
        out = fullest(*args, **kwargs)
        if out is NotImplemented:
            return func
        self.notes[f"{what} on a meta tensor was answered {answer}"] += 1
        return lambda *_args, **_kwargs: out

    def _neutral(self, func, tensor: torch.Tensor) -> Any:
        if func is _aten._local_scalar_dense.default:
            if tensor.dtype is torch.bool:
                answer: Any = False
            elif tensor.dtype.is_complex:
                answer = 0j
            elif tensor.dtype.is_floating_point:
                answer = 0.0
            else:
                answer = 0
        else:
            answer = func is _aten.equal.default
        self.notes[f"{_DATA_DEPENDENT[func]} was answered {answer!r}"] += 1
        return answer


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword inputs from a tensor, a tuple or list, or a dict."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def model_inputs(model: Any, example_inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword inputs for ``model``, moved to meta if its weights are there."""
    args, kwargs = split_inputs(example_inputs)
    if isinstance(model, nn.Module) and _on_meta(model):
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    return args, kwargs


@contextmanager
def running_stats_kept(model: Any) -> Iterator[None]:
    """Run a forward pass in training mode without moving BatchNorm running statistics."""
    norms = [
        m
        for m in (model.modules() if isinstance(model, nn.Module) else ())
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    saved = [(m, {k: b.clone() for k, b in m._buffers.items() if b is not None}) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for key, value in buffers.items():
                    module._buffers[key].copy_(value)


def _on_meta(model: nn.Module) -> bool:
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first is not None and first.is_meta


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _freeze(equations: AxisEquations, axes: Iterable[int]) -> None:
    for axis in axes:
        equations.freeze(axis)


def record(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored: Iterable[nn.Module] = (),
    strict: bool = False,
    shadow: bool = True,
) -> TraceResult:
    """Run ``model`` once on ``example_inputs`` and return its axis equations.

    The forward runs on a meta shadow of the model (:mod:`depprune.shadow`):
    no weight is read and no state of ``model`` changes. A model that cannot
    be shadowed, or whose forward needs real values, is traced as it is
    (BatchNorm statistics kept), and the notes say so; ``shadow=False``
    asks for that.

    ``example_inputs`` is a tensor, a tuple or list of positional inputs, or a
    dict of keyword inputs; on a model whose parameters are on the meta
    device, input tensors are moved to meta. Inputs, outputs and the
    parameters of ``ignored`` modules (and of LSTM/GRU/RNN modules) are
    frozen. Ops without a rule are frozen and listed in ``unsupported_ops``;
    ``strict=True`` raises :class:`UnsupportedOpError` instead. Tensors seen
    during the pass are kept alive until it ends (cheap on meta).

    >>> import torch
    >>> from torch import nn
    >>> with torch.device("meta"):
    ...     model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1))
    >>> result = record(model, torch.zeros(1, 3, 8, 8))
    >>> [g.size for g in result.equations.solve().groups], result.unsupported_ops
    ([8], {})
    """
    if not callable(model):
        raise TraceError(f"model must be an nn.Module (or a callable); got {type(model).__name__}")
    ignored = tuple(ignored)
    for module in ignored:
        if not isinstance(module, nn.Module):
            raise TraceError(
                f"ignored must hold nn.Module objects (submodules of the model); "
                f"got {type(module).__name__}"
            )
    target, device, notes = model, "real", []
    if shadow and isinstance(model, nn.Module):
        try:
            target, device = meta_shadow(model), "meta"
        except ShadowError as exc:
            notes.append(f"traced on the model itself: no meta shadow ({exc})")
    try:
        recorder, output = _run(
            target, example_inputs, _same_modules(ignored, model, target), strict, device
        )
    except TraceError as exc:
        if device != "meta":
            raise
        # Code that needs real values (a custom kernel, a check on data): trace the model.
        recorder, output = _run(model, example_inputs, ignored, strict, "real")
        cause = exc.__cause__ or exc
        notes.append(
            f"traced on the model itself: its forward does not run on meta tensors "
            f"({type(cause).__name__}: {str(cause)[:200]})"
        )
        device = "real"
    equations = recorder.equations
    notes = recorder.model_notes + notes
    output_axes = [recorder.axes_of(t) for t in _tensor_leaves(output)]
    for axes in output_axes:
        _freeze(equations, axes)
    notes += _freeze_unrelated_params(equations)
    _freeze_leftovers(equations)
    notes += [f"{note} (x{count})" if count > 1 else note for note, count in recorder.notes.items()]
    return TraceResult(
        equations=equations,
        unsupported_ops=dict(sorted(recorder.unsupported.items())),
        notes=notes,
        num_ops=recorder.num_ops,
        param_names=list(equations.param_names),
        input_axes=[tuple(a) for a in recorder.input_axes],
        output_axes=[tuple(a) for a in output_axes],
        log=recorder.log,
        device=device,
        meta_outputs_built=recorder._meta_outputs().built,
    )


def _same_modules(modules: tuple[nn.Module, ...], model: Any, twin: Any) -> tuple[nn.Module, ...]:
    """``modules`` of ``model`` as the twin's modules of the same names."""
    if twin is model or not modules:
        return modules
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    twins = dict(twin.named_modules(remove_duplicate=False))
    return tuple(twins[names[id(m)]] if id(m) in names else m for m in modules)


def _run(
    model: Any, example_inputs: Any, ignored: tuple, strict: bool, device: str
) -> tuple[_Recorder, Any]:
    """One recorded forward of ``model`` (a shadow when ``device`` is "meta")."""
    args, kwargs = model_inputs(model, example_inputs)
    if device == "meta":
        args, kwargs = meta_inputs((args, kwargs))
    equations = AxisEquations()
    stack = _ModuleStack(model)
    recorder = _Recorder(equations, strict, stack)
    recorder.model_notes = (
        _register_model(model, recorder, ignored) if isinstance(model, nn.Module) else []
    )
    recorder.input_axes = [recorder.axes_of(t) for t in _tensor_leaves((args, kwargs))]
    for axes in recorder.input_axes:
        _freeze(equations, axes)
    model_name = type(model).__name__
    try:
        with torch.no_grad(), running_stats_kept(model), stack, recorder:
            output = model(*args, **kwargs)
    except DeppruneError:
        raise
    except Exception as exc:
        raise TraceError(
            f"example_inputs did not run model {model_name}: {type(exc).__name__}: {exc}. "
            "Pass the inputs its forward takes: a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs"
        ) from exc
    if recorder.error is not None:
        # The model swallowed the strict-mode error; it still stands.
        raise recorder.error
    return recorder, output


def _register_model(
    model: nn.Module, recorder: _Recorder, ignored: tuple[nn.Module, ...]
) -> list[str]:
    """Give parameters and buffers their axes; freeze ignored and recurrent modules."""
    equations = recorder.equations
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        for dim, axis in enumerate(recorder.axes_of(tensor)):
            equations.param(name, dim, axis)
    notes = []
    modules = list(model.modules())
    recurrent = [m for m in modules if isinstance(m, _FROZEN_MODULES)]
    if recurrent:
        notes.append(
            f"{len(recurrent)} recurrent module(s) ({type(recurrent[0]).__name__}, ...): "
            "their gates are interleaved in fused kernels, so their parameters are frozen"
        )
    for module in (*ignored, *recurrent):
        for tensor in (*module.parameters(), *module.buffers()):
            _freeze(equations, recorder.axes_of(tensor))
    for module in modules:
        if isinstance(module, nn.MultiheadAttention):
            _multihead_attention_widths(equations, recorder, module)
    return notes


def _multihead_attention_widths(
    equations: AxisEquations, recorder: _Recorder, module: nn.MultiheadAttention
) -> None:
    """nn.MultiheadAttention has one ``embed_dim``: query width, q/k/v width and output.

    Its fused kernel says so in the trace, its decomposed path (training,
    ``need_weights``) does not; these equations hold on both paths.
    """
    embed = recorder.axes_of(module.out_proj.weight)
    equations.equal(embed[0], embed[1])
    # The fused kernel splits embed_dim into num_heads x head_dim internally: say so, or
    # channels of different heads would be pruned as one width and re-split wrongly.
    heads, head_dim = equations.axis(module.num_heads), equations.axis(module.head_dim)
    equations.product(embed[1], [heads, head_dim])
    if module.in_proj_weight is not None:
        # Rows are q, k, v one after another: product(3, embed_dim), as the decomposed
        # path's unflatten says; which of q, k, v is not a prunable choice.
        packed = recorder.axes_of(module.in_proj_weight)
        which = equations.axis(3)
        equations.freeze(which)
        equations.product(packed[0], [which, embed[1]])
        equations.equal(packed[1], embed[1])
    else:
        for weight in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
            equations.equal(recorder.axes_of(weight)[0], embed[1])
        equations.equal(recorder.axes_of(module.q_proj_weight)[1], embed[1])


def _freeze_leftovers(equations: AxisEquations) -> None:
    """Freeze axes whose units cannot be removed: size-1 axes and unused slices of params.

    Removing the only unit of a size-1 axis empties its tensors. A slice of a
    parameter or buffer (``position_ids[:, :seq]``) leaves a rest that
    nothing reads: its length is capacity, not structure.
    """
    sizes = np.asarray(equations.axis_sizes, dtype=np.int64)
    for axis in np.nonzero(sizes == 1)[0].tolist():
        equations.freeze(axis)
    kinds = np.asarray(equations.kinds, dtype=np.int64)
    sums = np.nonzero(kinds == SUM)[0]
    if sums.size == 0:
        return
    lefts = np.asarray(equations.lefts, dtype=np.int64)
    rights = np.asarray(equations.rights, dtype=np.int64)
    offsets = equations.right_offsets
    uses = np.bincount(np.concatenate([lefts, rights]), minlength=sizes.size)
    is_param = np.zeros(sizes.size, dtype=bool)
    is_param[np.asarray(equations.row_axes, dtype=np.int64)] = True
    for row in sums[is_param[lefts[sums]]].tolist():
        for part in rights[offsets[row] : offsets[row + 1]].tolist():
            if uses[part] == 1:
                equations.freeze(part)


def _freeze_unrelated_params(equations: AxisEquations) -> list[str]:
    """Freeze parameter dims no equation touches (unused parameters); say which."""
    touched = np.zeros(equations.num_axes, dtype=bool)
    for listed in (equations.lefts, equations.rights, equations.frozen_axes):
        touched[np.asarray(listed, dtype=np.int64)] = True
    row_axes = np.asarray(equations.row_axes, dtype=np.int64)
    loose = np.unique(row_axes[~touched[row_axes]])
    for axis in loose.tolist():
        equations.freeze(axis)
    sizes = np.asarray(equations.axis_sizes, dtype=np.int64)
    rows = np.nonzero(~touched[row_axes] & (sizes[row_axes] > 1))[0]
    if rows.size == 0:
        return []
    names = sorted({equations.param_names[equations.row_params[r]] for r in rows.tolist()})
    shown = ", ".join(names[:5]) + (f", ... (+{len(names) - 5} more)" if len(names) > 5 else "")
    return [
        f"{len(names)} parameter(s) or buffer(s) unused by the forward pass are frozen: {shown}"
    ]
