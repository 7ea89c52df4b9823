"""Method stage, Sparse Structure Selection (Huang & Wang, ECCV 2018): takes a model and its
structures (residual branches: submodules whose output is added to the stream they read),
gives a learnable scale per structure trained sparse, then removes the structures whose
scale reached zero (depth pruning) and folds the others' scales into their weights.

Each structure's output is multiplied by its scale, a scalar Parameter registered on
the structure as ``structure_scale`` (so it is in ``model.parameters()`` and any
optimizer made after :class:`StructureScales` trains it; :meth:`StructureScales.parameters`
lists them for a param group of their own). Train the task loss with the optimizer
and call :meth:`StructureScales.step` after each ``optimizer.step()``: the proximal
step of ``strength * sum |scale|`` (soft-thresholding, the paper's APG), which sets
scales exactly to zero. :func:`prune` then replaces every structure whose scale is
zero by a :class:`ZeroStructure` (zeros shaped like its input), so the model computes
exactly what it computed with the trained scales, with fewer parameters.

>>> import torch
>>> from torch import nn
>>> from depprune.methods import sss
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.branch = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
...     def forward(self, x):
...         return x + self.branch(x)
>>> model = nn.Sequential(Block(), Block())
>>> x = torch.randn(3, 4)
>>> scales = sss.StructureScales(model, example_inputs=x, strength=1.0)
>>> scales.names
('0.branch', '1.branch')
>>> with torch.no_grad():
...     _ = model[0].branch.structure_scale.fill_(0.5)
>>> scales.step(lr=0.5)  # soft-threshold by lr * strength
>>> scales.scales()
{'0.branch': 0.0, '1.branch': 0.5}
>>> before = model(x)
>>> report = sss.prune(model, x)
>>> report.removed, report.folded
(['0.branch'], {'1.branch': '1.branch.2'})
>>> torch.allclose(model(x), before), report.params_after < report.params_before
(True, True)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from depprune.api import _count_macs, _count_params, size_table
from depprune.errors import DeppruneError, InternalError, MethodError
from depprune.shadow import meta_inputs, meta_shadow
from depprune.tracer import model_inputs, running_stats_kept

__all__ = [
    "SCALE",
    "StructureReport",
    "StructureScales",
    "ZeroStructure",
    "prune",
    "residual_branches",
]

#: The attribute each scaled structure holds its scale in (a Parameter while training).
SCALE = "structure_scale"

Structures = Iterable[nn.Module | str] | Callable[[str, nn.Module], bool] | nn.Module | None

_aten = torch.ops.aten
_ADDS = (_aten.add.Tensor, _aten.add_.Tensor)


def _scaled_output(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
    """The forward hook of a scaled structure: its output times its scale.

    A module-level function (not a closure), so scaled models deep-copy and pickle.
    """
    if not isinstance(output, torch.Tensor):
        raise MethodError(
            f"a {type(module).__name__} with a structure scale returned "
            f"{type(output).__name__}, not a tensor; scale only structures whose output is "
            "one tensor (a residual branch), e.g. a submodule of it"
        )
    return output * getattr(module, SCALE)


def _scale_hooks(module: nn.Module) -> list[int]:
    return [key for key, hook in module._forward_hooks.items() if hook is _scaled_output]


def _is_scaled(module: nn.Module) -> bool:
    return bool(_scale_hooks(module)) and isinstance(getattr(module, SCALE, None), torch.Tensor)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise MethodError(
        f"the {type(module).__name__} given as a structure is not a submodule of "
        f"{type(model).__name__}; pass modules of the model being trained"
    )


def _non_negative(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _first_tensor(tree: Any) -> torch.Tensor | None:
    return next((t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)), None)


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.training = training


# ---------------------------------------------------------------------------------------
# Finding residual branches


class _Provenance(TorchDispatchMode):
    """Which tensors each tensor was computed from, and the operands of every add.

    Every op output (and an in-place op's new value) is a node whose parents are the
    nodes of the op's tensor inputs; nodes are numbered in order, so a parent is
    always a smaller number than its child.
    """

    def __init__(self) -> None:
        super().__init__()
        self.node_of: dict[int, int] = {}
        self.parents: list[tuple[int, ...]] = []
        self.shapes: list[tuple[int, ...]] = []
        # Held so that no tensor id is reused while the pass runs.
        self.held: list[torch.Tensor] = []
        self.adds: list[tuple[int, int]] = []
        self.ops = 0

    def node(self, tensor: torch.Tensor, parents: tuple[int, ...] | None = None) -> int:
        if parents is None and id(tensor) in self.node_of:
            return self.node_of[id(tensor)]
        self.parents.append(parents or ())
        self.shapes.append(tuple(tensor.shape))
        self.held.append(tensor)
        self.node_of[id(tensor)] = len(self.parents) - 1
        return len(self.parents) - 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        inputs = tuple(
            self.node(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        )
        if func in _ADDS and all(isinstance(a, torch.Tensor) for a in args[:2]):
            self.adds.append((self.node(args[0]), self.node(args[1])))
        output = func(*args, **kwargs)
        for tensor in pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                self.node(tensor, inputs)
        return output

    def upstream(self, ancestor: int, node: int) -> bool:
        """Whether ``node`` is ``ancestor`` or was computed from it."""
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if current == ancestor:
                return True
            if current < ancestor or current in seen:
                continue
            seen.add(current)
            stack.extend(self.parents[current])
        return False


@dataclass
class _Call:
    name: str
    inputs: tuple[int, ...]
    first_op: int
    last_op: int = 0
    output: int | None = None

    def ops(self) -> int:
        return self.last_op - self.first_op


def _record_calls(model: nn.Module, example_inputs: Any) -> tuple[_Provenance, list[_Call]]:
    """One forward pass under :class:`_Provenance`, with every module call's input and output nodes.

    Runs on a meta twin when the model has one that runs (no weight is read), else on
    the model itself without gradients and without moving BatchNorm statistics.
    """
    try:
        twin, inputs = meta_shadow(model), meta_inputs(example_inputs)
        return _record_on(twin, inputs)
    except Exception:
        pass  # no meta twin, or ops that read values (.item()) on meta: run for real
    with running_stats_kept(model):
        return _record_on(model, example_inputs)


def _record_on(model: nn.Module, example_inputs: Any) -> tuple[_Provenance, list[_Call]]:
    mode = _Provenance()
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    handles = []

    def before(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            call = _Call(name, tuple(mode.node(t) for t in leaves), mode.ops)
            calls.append(call)
            open_calls.setdefault(id(module), []).append(call)

        return hook

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = open_calls[id(module)].pop()
        call.last_op = mode.ops
        if isinstance(output, torch.Tensor):
            call.output = mode.node(output)

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        args, kwargs = model_inputs(model, example_inputs)
        with torch.no_grad(), mode:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return mode, calls


def residual_branches(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the submodules whose output is added to the stream their input came from.

    A submodule ``m`` is a residual branch when its tensor output is one operand of an
    add whose other operand ``s`` has the same shape and lies upstream of ``m``'s input:
    ``s`` itself (``x + m(x)``; a transformer layer's ``x + mlp(norm(x))``), or the input of
    the module that computed ``s`` (a projection shortcut: ``m(x) + downsample(x)``). When
    both sides of an add start from one input, the side with more ops is the branch and
    the other the shortcut; sides alike (a two-way split) are no residual. Of the modules
    that return the same tensor (a ``Sequential`` and its last layer) the outermost is taken.
    Where a block computes its branch in ``forward`` (torchvision's ``BasicBlock``) the
    branch's last module (``bn2``) is found; :func:`prune` then also removes the modules
    before it whose outputs no longer reach anything. Modules returning tuples are skipped
    (HF attention: its ``o_proj`` is found instead).

    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self, c_in, c_out):
    ...         super().__init__()
    ...         self.branch = nn.Sequential(nn.Linear(c_in, c_out), nn.ReLU(), nn.Linear(c_out, c_out))
    ...         self.shortcut = nn.Linear(c_in, c_out) if c_in != c_out else nn.Identity()
    ...     def forward(self, x):
    ...         return self.branch(x) + self.shortcut(x)
    >>> residual_branches(nn.Sequential(Block(4, 8), Block(8, 8)), torch.zeros(2, 4))
    ['0.branch', '1.branch']
    """
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    try:
        mode, calls = _record_calls(model, example_inputs)
    except DeppruneError:
        raise
    except Exception as exc:
        raise MethodError(
            f"example_inputs did not run {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "pass the inputs its forward takes: a tensor, a tuple or a dict"
        ) from exc
    producer: dict[int, _Call] = {}
    for call in calls:
        # Calls start in order: the first call returning a tensor is the outermost one.
        if call.output is not None and call.output not in producer:
            producer[call.output] = call
    found: list[str] = []
    for left, right in mode.adds:
        if mode.shapes[left] != mode.shapes[right]:
            continue
        sides = []
        for branch_out, stream in ((left, right), (right, left)):
            branch = producer.get(branch_out)
            if branch is None or not branch.name:
                continue
            shortcut = producer.get(stream)
            roots = (stream, *(shortcut.inputs if shortcut else ()))
            if any(mode.upstream(r, i) for r in roots for i in branch.inputs):
                sides.append(branch)
        if len(sides) == 2:
            # Both sides start from one input: the shortcut is the projection, the side
            # with fewer ops; sides alike (a two-way split) are no residual.
            sides = [max(sides, key=_Call.ops)] if sides[0].ops() != sides[1].ops() else []
        found += [b.name for b in sides if b.name not in found]
    return found


# ---------------------------------------------------------------------------------------
# Scales


class StructureScales:
    """One learnable scale (initially 1) per structure, multiplying the structure's output.

    ``structures``: a list of submodules (or their names); a callable
    ``(name, module) -> bool`` choosing among ``model.named_modules()``; or ``None`` for
    :func:`residual_branches` (needs ``example_inputs``). Each scale is a scalar
    Parameter named ``structure_scale`` on its structure, applied by a forward hook, so
    it is in ``model.parameters()``: make the optimizer after this (or add
    :meth:`parameters` to it). ``strength`` is the L1 weight (the paper's gamma).

    Train with the task loss only and call :meth:`step` after ``optimizer.step()``: the
    proximal step of ``strength * sum |scale|`` that sets small scales exactly to zero.
    (Adding :meth:`penalty` to the loss instead gives the plain subgradient, which
    rarely reaches zero; do not do both, or the L1 counts twice.) With
    ``example_inputs``, one forward pass checks that every structure runs and returns
    one tensor; without, the first forward raises if one does not.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> scales = StructureScales(model, [model[1]], strength=0.1)
    >>> scales.penalty()
    tensor(0.1000, grad_fn=<MulBackward0>)
    >>> [name for name, _ in model.named_parameters()][-1]
    '1.structure_scale'
    """

    def __init__(
        self,
        model: nn.Module,
        structures: Structures = None,
        *,
        example_inputs: Any = None,
        strength: float = 1e-2,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
        if not _non_negative(strength):
            raise MethodError(
                f"strength is {strength!r}; it is the L1 weight on the scales, a number >= 0"
            )
        names = self._chosen(model, structures, example_inputs)
        modules = dict(model.named_modules())
        if example_inputs is not None:
            _check_tensor_outputs(model, [modules[n] for n in names], names, example_inputs)
        self.model = model
        self.strength = float(strength)
        self.names: tuple[str, ...] = tuple(names)
        for name in names:
            module = modules[name]
            anchor = next(itertools.chain(module.parameters(), module.buffers()), None)
            device = anchor.device if anchor is not None else None
            module.register_parameter(SCALE, nn.Parameter(torch.ones((), device=device)))
            module.register_forward_hook(_scaled_output)

    @staticmethod
    def _chosen(model: nn.Module, structures: Structures, example_inputs: Any) -> list[str]:
        if structures is None:
            if example_inputs is None:
                raise MethodError(
                    "finding the residual branches needs example_inputs; pass them, or "
                    "name the structures (a list of submodules)"
                )
            names = residual_branches(model, example_inputs)
            what = "residual branch"
        elif isinstance(structures, nn.Module):
            names = [_module_name(model, structures)]
            what = "structure"
        elif callable(structures):
            names = [n for n, m in model.named_modules() if n and structures(n, m)]
            what = "module the filter accepts"
        elif isinstance(structures, Iterable) and not isinstance(structures, (str, bytes)):
            modules = dict(model.named_modules())
            names = []
            for item in structures:
                if isinstance(item, str):
                    if item not in modules:
                        raise MethodError(
                            f"{item!r} is not a submodule of {type(model).__name__}; name "
                            "structures as model.named_modules() does"
                        )
                    names.append(item)
                elif isinstance(item, nn.Module):
                    names.append(_module_name(model, item))
                else:
                    raise MethodError(
                        f"structures holds a {type(item).__name__}; give submodules or names"
                    )
            what = "structure"
        else:
            raise MethodError(
                f"structures must be submodules, names, a filter (name, module) -> bool, or "
                f"None to find residual branches; got {type(structures).__name__}"
            )
        if not names:
            raise MethodError(
                f"no {what} found in {type(model).__name__}, so there is nothing to scale; "
                "name the structures whose output is added to the stream"
            )
        if "" in names:
            raise MethodError(
                "the model itself cannot be a structure (nothing could replace it); name submodules"
            )
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise MethodError(f"structures {twice} are named twice; name each once")
        modules = dict(model.named_modules())
        for name in names:
            if hasattr(modules[name], SCALE):
                raise MethodError(
                    f"{name} already has a {SCALE!r} attribute (a StructureScales is "
                    "attached, or a kept scale buffer); attach one StructureScales per model"
                )
        return names

    def _scales(self) -> list[tuple[str, nn.Parameter]]:
        modules = dict(self.model.named_modules())
        found = []
        for name in self.names:
            module = modules.get(name)
            scale = getattr(module, SCALE, None) if module is not None else None
            if isinstance(scale, nn.Parameter):
                found.append((name, scale))
        if not found:
            raise MethodError(
                "the structure scales were removed from the model (depprune.methods.sss.prune "
                "ran); attach a new StructureScales to train again"
            )
        return found

    def parameters(self) -> list[nn.Parameter]:
        """The scales, e.g. for their own param group (without weight decay).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> [p.shape for p in StructureScales(model, ["0"]).parameters()]
        [torch.Size([])]
        """
        return [scale for _, scale in self._scales()]

    def scales(self) -> dict[str, float]:
        """Each structure's scale, by module name.

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> StructureScales(model, ["0"]).scales()
        {'0': 1.0}
        """
        return {name: float(scale.detach()) for name, scale in self._scales()}

    def penalty(self) -> torch.Tensor:
        """``strength * sum |scale|``, differentiable (for logging, or subgradient training).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> float(StructureScales(model, ["0", "1"], strength=0.5).penalty().detach())
        1.0
        """
        scales = self.parameters()
        return self.strength * torch.stack([s.abs().reshape(()) for s in scales]).sum()

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Soft-threshold every scale by ``lr * strength``: the proximal step of the L1 term.

        Call it after ``optimizer.step()`` with that step's learning rate; a scale whose
        magnitude is at most ``lr * strength`` becomes exactly zero.

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> scales = StructureScales(model, ["0"], strength=0.25)
        >>> scales.step(lr=2.0)
        >>> scales.scales()
        {'0': 0.5}
        """
        if not _non_negative(lr):
            raise MethodError(f"lr is {lr!r}; pass the optimizer's learning rate, a number >= 0")
        threshold = lr * self.strength
        for _, scale in self._scales():
            scale.copy_(scale.sign() * (scale.abs() - threshold).clamp_min(0))

    def remove(self, example_inputs: Any, *, threshold: float = 0.0) -> StructureReport:
        """:func:`prune` on this model: remove the structures whose ``|scale| <= threshold``.

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> StructureScales(model, ["0"]).remove(torch.zeros(1, 2)).folded
        {'0': '0'}
        """
        return prune(self.model, example_inputs, threshold=threshold)

    def __repr__(self) -> str:
        return f"StructureScales({len(self.names)} structures, strength={self.strength})"


def _check_tensor_outputs(
    model: nn.Module, modules: list[nn.Module], names: list[str], example_inputs: Any
) -> None:
    """One forward pass: every structure must run and return one tensor."""
    returned: dict[str, str] = {}
    handles = []

    def watch(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                returned[name] = type(output).__name__
            else:
                returned.setdefault(name, "")

        return hook

    try:
        for name, module in zip(names, modules, strict=True):
            handles.append(module.register_forward_hook(watch(name)))
        _forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    not_tensor = {n: t for n, t in returned.items() if t}
    if not_tensor:
        name, kind = next(iter(not_tensor.items()))
        raise MethodError(
            f"structure {name} returns a {kind}, not one tensor, so its output cannot be "
            "scaled or replaced by zeros; scale the submodule whose tensor is added instead"
        )
    idle = [n for n in names if n not in returned]
    if idle:
        raise MethodError(
            f"structures {idle} do not run in the forward on example_inputs, so their "
            "scales would never train; drop them from structures"
        )


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    """The model's output on ``example_inputs``, without gradients or BatchNorm updates."""
    args, kwargs = model_inputs(model, example_inputs)
    try:
        with torch.no_grad(), running_stats_kept(model):
            return model(*args, **kwargs)
    except DeppruneError:
        raise
    except Exception as exc:
        raise MethodError(
            f"example_inputs did not run {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "pass the inputs its forward takes: a tensor, a tuple or a dict"
        ) from exc


# ---------------------------------------------------------------------------------------
# Removal


class ZeroStructure(nn.Module):
    """What replaces a removed structure: zeros shaped like its (first tensor) input.

    ``dtype`` is the output dtype when it differs from the input's (``None``: the input's).

    >>> ZeroStructure("Sequential")(torch.ones(2, 3)).abs().sum().item()
    0.0
    """

    def __init__(self, replaced: str, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.replaced = replaced
        self.output_dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        like = _first_tensor((args, kwargs))
        if like is None:
            raise MethodError(
                f"the ZeroStructure that replaced a {self.replaced} was called without a "
                "tensor input, so it has no shape to return zeros of"
            )
        return torch.zeros_like(like, dtype=self.output_dtype or like.dtype)

    def extra_repr(self) -> str:
        dtype = f", dtype={self.output_dtype}" if self.output_dtype else ""
        return f"replaces a {self.replaced}{dtype}"


@dataclass
class StructureReport:
    """What :func:`prune` did: structures removed, scales folded or kept, sizes before/after."""

    #: Every structure's scale before removal, by module name.
    factors: dict[str, float]
    #: Structures replaced by a :class:`ZeroStructure` (``|scale| <= threshold``).
    removed: list[str]
    #: Kept structures whose scale was multiplied into a module's weight and bias:
    #: structure -> that module (the last op, whose output the structure returns).
    folded: dict[str, str]
    #: Kept structures whose scale stays a fixed buffer (``structure_scale``, applied by
    #: a forward hook): their output does not come straight from a linear, conv or norm.
    buffered: list[str]
    #: Modules outside the structures whose outputs no longer reach the model's output
    #: (the convs before torchvision's ``bn2``), replaced by zeros like their input.
    idle_removed: list[str]
    #: Such modules left in place: their output's shape is not their input's.
    idle_left: list[str]
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            *size_table(self.params_before, self.params_after, self.macs_before, self.macs_after),
            "",
            f"{'scale':>10}  structure",
        ]
        for name, factor in self.factors.items():
            if name in self.removed:
                what = "removed"
            elif name in self.folded:
                what = f"folded into {self.folded[name]}"
            else:
                what = f"kept as buffer {SCALE}"
            lines.append(f"{factor:>10.4g}  {name}: {what}")
        if self.idle_removed:
            lines.append(f"unused once removed, replaced by zeros: {', '.join(self.idle_removed)}")
        if self.idle_left:
            lines.append(
                f"unused once removed, left (output shape is not the input's): "
                f"{', '.join(self.idle_left)}"
            )
        lines += self.notes
        return "\n".join(lines)


#: Modules whose output is linear in their weight and bias together (scaling both
#: scales the output), when they have a weight.
_FOLDABLE = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass
class _Seen:
    """One module's calls in the reference forward pass."""

    #: (first tensor input's shape and dtype, output's shape and dtype or None, output id).
    calls: list[tuple[tuple | None, tuple | None, int | None]] = field(default_factory=list)
    #: ids of the structure's raw outputs (before its scale), for structures.
    raw: list[int] = field(default_factory=list)


def _reference_pass(
    model: nn.Module, structures: dict[str, nn.Module], example_inputs: Any
) -> tuple[Any, dict[str, _Seen]]:
    """The model's output and what every module took and returned, in one pass."""
    seen: dict[str, _Seen] = {name: _Seen() for name, _ in model.named_modules()}
    held: list[Any] = []
    handles = []

    def describe(tensor: Any) -> tuple | None:
        return (tuple(tensor.shape), tensor.dtype) if isinstance(tensor, torch.Tensor) else None

    def watch(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            held.append(output)
            seen[name].calls.append(
                (
                    describe(_first_tensor((args, kwargs))),
                    describe(output),
                    id(output) if isinstance(output, torch.Tensor) else None,
                )
            )

        return hook

    def raw(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            held.append(output)
            seen[name].raw.append(id(output))

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(watch(name), with_kwargs=True))
        for name, module in structures.items():
            handles.append(module.register_forward_hook(raw(name), prepend=True))
        output = _forward(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, output), seen


def _zeroable(name: str, seen: _Seen) -> tuple[bool, str, torch.dtype | None]:
    """Whether zeros like the input stand for the output at every call; why not; the dtype."""
    if not seen.calls:
        return False, f"{name} does not run on example_inputs", None
    dtype = None
    for given, returned, _ in seen.calls:
        if returned is None:
            return False, f"{name} returns no single tensor", None
        if given is None:
            return False, f"{name} takes no tensor input to take a shape from", None
        if given[0] != returned[0]:
            return (
                False,
                f"{name}'s output shape {list(returned[0])} is not its input's "
                f"{list(given[0])}, so the zeros replacing it cannot take their shape from "
                "its input",
                None,
            )
        dtype = returned[1] if returned[1] != given[1] else None
    return True, "", dtype


def _fold_target(
    model: nn.Module, name: str, module: nn.Module, seen: dict[str, _Seen]
) -> str | None:
    """The module inside ``name`` (or itself) whose output the structure returns, if its
    weight and bias can take the scale exactly: called as often, weights not shared."""
    raw = seen[name].raw
    if not raw:
        return None
    param_uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        param_uses[id(param)] = param_uses.get(id(param), 0) + 1
    module_uses: dict[int, int] = {}
    for _, sub in model.named_modules(remove_duplicate=False):
        module_uses[id(sub)] = module_uses.get(id(sub), 0) + 1
    for sub_name, sub in module.named_modules(prefix=name):
        if not isinstance(sub, _FOLDABLE) or not isinstance(
            getattr(sub, "weight", None), nn.Parameter
        ):
            continue
        if torch.nn.utils.parametrize.is_parametrized(sub) or module_uses[id(sub)] > 1:
            continue
        own = [p for p in sub.parameters(recurse=False)]
        if any(param_uses[id(p)] > 1 for p in own):
            continue
        outputs = seen[sub_name].raw if sub_name == name else [c[2] for c in seen[sub_name].calls]
        if len(outputs) == len(raw) and all(r in outputs for r in raw):
            return sub_name
    return None


def _used_outputs(model: nn.Module, example_inputs: Any) -> set[str] | None:
    """Modules whose output the model's output depends on (a gradient path reaches it).

    Every parameter and floating input requires grad for the pass, so every floating
    activation has a path if it is used. None when the output has nothing to
    differentiate (then nothing is called unused).
    """
    params = list({id(p): p for p in model.parameters() if p.is_floating_point()}.values())
    flags = [p.requires_grad for p in params]
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = []

    def watch(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                outputs.append((name, output))

        return hook

    try:
        for p in params:
            p.requires_grad_(True)
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(watch(name)))
        args, kwargs = model_inputs(model, example_inputs)
        args, kwargs = pytree.tree_map_only(
            torch.Tensor,
            lambda t: t.detach().requires_grad_() if t.is_floating_point() else t,
            (args, kwargs),
        )
        with torch.enable_grad(), running_stats_kept(model):
            output = model(*args, **kwargs)
        leaves = [
            t
            for t in pytree.tree_leaves(output)
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()
        ]
        if not leaves or not outputs:
            return None
        total = torch.stack([t.float().sum() for t in leaves]).sum()
        grads = torch.autograd.grad(total, [t for _, t in outputs], allow_unused=True)
    except Exception:
        return None
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return {name for (name, _), grad in zip(outputs, grads, strict=True) if grad is not None}


def _same(before: Any, after: Any) -> bool:
    left, right = pytree.tree_leaves(before), pytree.tree_leaves(after)
    if len(left) != len(right):
        return False
    for a, b in zip(left, right, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_meta or b.is_meta:
            continue  # no values to compare: the shapes are all a meta model has
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
            continue
        # Folding rounds differently from scaling: allow a few ulps of the output's range.
        rtol = max(1e-4, 16 * torch.finfo(a.dtype).eps)
        scale = float(a.abs().max()) if a.numel() else 0.0
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * max(scale, 1e-6)):
            return False
    return True


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    threshold: float = 0.0,
    fold: bool = True,
    remove_idle: bool = True,
    count_macs: bool = True,
) -> StructureReport:
    """Remove the scaled structures whose ``|scale| <= threshold``; fold the others' scales.

    Works on any model a :class:`StructureScales` was attached to (it finds the scales
    on the model itself). Each removed structure is replaced by a :class:`ZeroStructure`,
    zeros shaped like its input (a structure whose output shape is not its input's
    raises :class:`MethodError`); with ``remove_idle`` the modules whose outputs then
    reach nothing (the convs computing torchvision's branch before its ``bn2``) are
    replaced the same way where their output shape is their input's. Each kept scale is
    multiplied into the weight and bias of the module whose output the structure
    returns (a linear, conv or norm: exact), or else stays as a fixed buffer applied by
    the forward hook; the training hooks and Parameters are gone.

    The model's output on ``example_inputs`` is checked to equal its output before
    (with the trained scales, zeros included); if folding broke it, no scale is folded;
    on any error the model is left as it was. Optimizers made before hold stale
    parameters: make new ones to fine-tune.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> scales = StructureScales(model, [model[1]])
    >>> with torch.no_grad():
    ...     _ = model[1].structure_scale.fill_(0.5)
    >>> weight = model[1].weight.detach().clone()
    >>> report = prune(model, torch.zeros(1, 2))
    >>> torch.equal(model[1].weight, weight * 0.5), hasattr(model[1], "structure_scale")
    (True, False)
    """
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    if not _non_negative(threshold):
        raise MethodError(
            f"threshold is {threshold!r}; structures whose |scale| is at most it are removed, "
            "so it is a number >= 0"
        )
    structures = {name: m for name, m in model.named_modules() if _is_scaled(m)}
    if not structures:
        raise MethodError(
            f"{type(model).__name__} has no structure scales; attach "
            "depprune.methods.sss.StructureScales(model, ...) and train it first"
        )
    modes = _modes(model)
    try:
        model.eval()  # dropout off, so the outputs before and after can be compared
        factors = {n: float(getattr(m, SCALE).detach()) for n, m in structures.items()}
        below = [n for n in structures if abs(factors[n]) <= threshold]
        # A structure inside a removed one goes with it.
        removed = [n for n in below if not any(n.startswith(f"{o}.") for o in below)]
        # The output to keep is the model's with the removed scales at zero.
        with _zeroed([getattr(structures[n], SCALE) for n in below]):
            reference, seen = _reference_pass(model, structures, example_inputs)
        params_before = _count_params(model)
        macs_before = _count_macs(model, example_inputs) if count_macs else None
        notes: list[str] = []
        for name in list(removed):
            ok, why, _ = _zeroable(name, seen[name])
            if not ok:
                # Kept with its scale (folded or a buffer): the output stays exact, only smaller.
                removed.remove(name)
                notes.append(
                    f"structure {name} has scale {factors[name]:.4g} but is kept: {why}; "
                    "scale a submodule that keeps its input's shape to remove it"
                )
        used_before = _used_outputs(model, example_inputs) if remove_idle and removed else None
        for attempt_fold, attempt_idle in ((fold, remove_idle), (False, False)):
            undo: list[Callable[[], None]] = []
            try:
                report = _remove(
                    model,
                    example_inputs,
                    structures,
                    factors,
                    removed,
                    seen,
                    attempt_fold,
                    used_before if attempt_idle else None,
                    undo,
                )
                if _same(reference, _forward(model, example_inputs)):
                    break
            except BaseException:
                for step in reversed(undo):
                    step()
                raise
            for step in reversed(undo):
                step()
            if not (attempt_fold or attempt_idle):
                raise InternalError(
                    "removing the zero-scale structures changed the model's output on "
                    "example_inputs; please report this with the model"
                )
            notes.append(
                "folding scales or removing unused modules changed the output, so scales "
                "stay buffers and unused modules stay"
            )
        report.notes = notes + report.notes
        report.params_before = params_before
        report.params_after = _count_params(model)
        report.macs_before = macs_before
        report.macs_after = _count_macs(model, example_inputs) if count_macs else None
        return report
    finally:
        _restore_modes(modes)


def _remove(
    model: nn.Module,
    example_inputs: Any,
    structures: dict[str, nn.Module],
    factors: dict[str, float],
    removed: list[str],
    seen: dict[str, _Seen],
    fold: bool,
    used_before: set[str] | None,
    undo: list[Callable[[], None]],
) -> StructureReport:
    """Make the changes, recording how to undo each in ``undo``."""

    def replace(name: str, module: nn.Module, dtype: torch.dtype | None) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ZeroStructure(type(module).__name__, dtype))
        undo.append(lambda: setattr(parent, child, module))

    for name in removed:
        replace(name, structures[name], _zeroable(name, seen[name])[2])
    gone = tuple(f"{n}." for n in removed)
    folded: dict[str, str] = {}
    buffered: list[str] = []
    for name, module in structures.items():
        if name in removed or name.startswith(gone):
            continue
        scale = getattr(module, SCALE)
        hooks = {key: module._forward_hooks[key] for key in _scale_hooks(module)}
        target_name = _fold_target(model, name, module, seen) if fold else None
        delattr(module, SCALE)
        undo.append(lambda m=module, s=scale: _put_back(m, s))
        if target_name is not None:
            target = model.get_submodule(target_name)
            own = [p for p in target.parameters(recurse=False)]
            saved = [p.detach().clone() for p in own]
            with torch.no_grad():
                for p in own:
                    p.mul_(scale.detach().to(p.dtype))
            undo.append(lambda own=own, saved=saved: _copy_back(own, saved))
            for key in hooks:
                del module._forward_hooks[key]
            undo.append(lambda m=module, h=hooks: m._forward_hooks.update(h))
            folded[name] = target_name
        else:
            module.register_buffer(SCALE, scale.detach().clone())
            buffered.append(name)
    idle_removed: list[str] = []
    idle_left: list[str] = []
    if used_before is not None:
        used_after = _used_outputs(model, example_inputs)
        if used_after is not None:
            idle_removed, idle_left = _remove_idle(
                model, used_before - used_after, gone, seen, replace
            )
    return StructureReport(
        factors=factors,
        removed=removed,
        folded=folded,
        buffered=buffered,
        idle_removed=idle_removed,
        idle_left=idle_left,
        params_before=0,
        params_after=0,
    )


def _remove_idle(
    model: nn.Module,
    idle: set[str],
    gone: tuple[str, ...],
    seen: dict[str, _Seen],
    replace: Callable[[str, nn.Module, torch.dtype | None], None],
) -> tuple[list[str], list[str]]:
    """Replace the outermost modules with parameters whose output was used and is no more."""
    removed: list[str] = []
    left: list[str] = []
    for name, module in list(model.named_modules()):
        if name not in idle or name.startswith(gone):
            continue
        if any(name.startswith(f"{done}.") for done in removed):
            continue
        if not any(p.is_floating_point() for p in module.parameters()):
            continue
        ok, _, dtype = _zeroable(name, seen[name])
        if ok:
            replace(name, module, dtype)
            removed.append(name)
        elif not any(f"{name}.{child}" in idle for child, _ in module.named_children()):
            # Idle parameters that cannot be zeroed; where idle children exist, they go.
            left.append(name)
    return removed, left


@contextmanager
def _zeroed(scales: list[torch.Tensor]) -> Iterator[None]:
    saved = [s.detach().clone() for s in scales]
    try:
        with torch.no_grad():
            for s in scales:
                s.zero_()
        yield
    finally:
        with torch.no_grad():
            for s, value in zip(scales, saved, strict=True):
                s.copy_(value)


def _put_back(module: nn.Module, scale: torch.Tensor) -> None:
    if hasattr(module, SCALE):
        delattr(module, SCALE)
    module.register_parameter(SCALE, scale)


def _copy_back(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
