"""Importance: one score per unit of a group, computed on the params' device.

Every member (parameter, dim) of a group contributes through its unit map:
one ``scatter_add`` per member, never a Python loop over channels. Buffers
(BatchNorm running statistics, rotary frequencies) never count.

>>> import torch, depprune
>>> from depprune.importance import ScoreContext, magnitude
>>> eqs = depprune.AxisEquations()
>>> hidden = eqs.axis(3)
>>> eqs.param("w", 0, hidden)
>>> graph = eqs.solve()
>>> w = torch.nn.Parameter(torch.tensor([[1.0, 1.0], [0.0, 3.0], [2.0, 0.0]]))
>>> ctx = ScoreContext(graph, {"w": w})
>>> magnitude(p=1)(graph.groups[0], ctx).tolist()
[2.0, 3.0, 2.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from depprune.apply import masked_tensors, named_tensors
from depprune.errors import ImportanceError
from depprune.graph import DependencyGraph, Group
from depprune.tracer import split_inputs

__all__ = [
    "Importance",
    "ImportanceError",
    "ScoreContext",
    "batchnorm_scale",
    "magnitude",
    "random",
    "score_groups",
    "taylor",
    "wanda",
]


@dataclass
class ScoreContext:
    """What an importance may read: the graph and the tensors by name."""

    graph: DependencyGraph
    tensors: Mapping[str, torch.Tensor]
    #: The module owning each tensor name (for criteria that need the type).
    owners: Mapping[str, nn.Module] = field(default_factory=dict)

    #: Per-dim sums of transformed tensors, computed once per (criterion, tensor).
    _sums: dict[tuple[Hashable, int], list[torch.Tensor]] = field(default_factory=dict)

    def dim_sums(
        self, key: Hashable, tensor: torch.Tensor, dim: int, transform: Transform
    ) -> torch.Tensor:
        """``transform(tensor)`` summed over every dim but ``dim``, one value per index.

        The tensor is read once for all its dims, in float32 chunks of rows, so
        a weight that belongs to several groups costs one pass and no full
        float32 copy; ``key`` names the transform for the cache.
        """
        cached = self._sums.get((key, id(tensor)))
        if cached is None:
            cached = self._sums[(key, id(tensor))] = _all_dim_sums(tensor.detach(), transform)
        return cached[dim]

    @classmethod
    def from_model(cls, graph: DependencyGraph, model: nn.Module) -> ScoreContext:
        """Every parameter and buffer of ``model`` by name (tied ones under each name)."""
        named = named_tensors(model)
        tensors = {name: getattr(module, attr) for name, (module, attr, _) in named.items()}
        owners = {name: module for name, (module, _, _) in named.items()}
        for module_name, _, tensor_name in masked_tensors(model):
            # torch.nn.utils.prune: the forward uses weight_orig * weight_mask, so score that.
            name = f"{module_name}.{tensor_name}_orig" if module_name else f"{tensor_name}_orig"
            original = tensors[name]
            effective = nn.Parameter(
                original.detach() * tensors[name[: -len("_orig")] + "_mask"],
                requires_grad=original.requires_grad,
            )
            effective.grad = original.grad  # already masked by the product's backward
            tensors[name] = effective
        return cls(graph, tensors, owners)


Importance = Callable[[Group, ScoreContext], torch.Tensor]


def _scatter_members(
    group: Group,
    ctx: ScoreContext,
    per_index: Callable[[str, torch.Tensor, int], torch.Tensor | None],
) -> torch.Tensor:
    """Sum ``per_index(name, tensor, dim)`` over members into one score per unit."""
    scores: torch.Tensor | None = None
    seen: set[tuple[int, int]] = set()
    for (name, dim), unit_map in ctx.graph.unit_maps(group).items():
        tensor = ctx.tensors.get(name)
        if tensor is None:
            raise ImportanceError(
                f"the graph names {name!r}, which the model does not have; score a model "
                "with the graph traced from it"
            )
        # A tied tensor listed under two names counts once.
        if (id(tensor), dim) in seen:
            continue
        seen.add((id(tensor), dim))
        values = per_index(name, tensor, dim)
        if values is None:
            continue
        if scores is None:
            scores = torch.zeros(group.size, dtype=torch.float32, device=values.device)
        # One device for all members, also when the model is split across GPUs.
        values = values.float().to(scores.device)
        # A copy: the graph caches unit maps read-only, which from_numpy would warn about.
        units = torch.tensor(unit_map, device=scores.device)
        on_group = units >= 0
        scores.scatter_add_(0, units[on_group], values[on_group])
    if scores is None:
        raise ImportanceError(
            f"group {group.index} has no member this importance can score; "
            "use depprune.importance.magnitude() or pass a callable"
        )
    return scores


#: Elements converted to float32 at a time while scoring: 1 MB, so a chunk's
#: conversion, transform and sums stay in cache (5x faster than 64 MB chunks).
_CHUNK_ELEMENTS = 1 << 18

#: A transform gets a float32 copy of rows ``rows`` of a tensor (its own, free to
#: change in place) and returns the values to sum.
Transform = Callable[[torch.Tensor, slice], torch.Tensor]


def _all_dim_sums(tensor: torch.Tensor, transform: Transform) -> list[torch.Tensor]:
    """For every dim d: ``transform(tensor)`` summed over all dims but d."""
    if tensor.dim() == 0:
        return []
    rows = tensor.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, tensor[0].numel()))
    sums = [torch.zeros(size, dtype=torch.float32, device=tensor.device) for size in tensor.shape]
    for start in range(0, rows, step):
        part = slice(start, min(rows, start + step))
        values = transform(tensor[part].to(torch.float32, copy=True), part)
        sums[0][part] = values.reshape(values.shape[0], -1).sum(dim=1)
        for dim in range(1, tensor.dim()):
            others = [d for d in range(tensor.dim()) if d != dim]
            sums[dim] += values.sum(dim=others)
    return sums


def magnitude(p: float = 2) -> Importance:
    """L-p magnitude of every parameter slice a unit would remove (p=1: L1, p=2: L2).

    >>> magnitude(1).__name__
    'l1_magnitude'
    """

    if not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ImportanceError(f"magnitude needs a finite p > 0 (1: L1, 2: L2); got {p!r}")

    def power(rows: torch.Tensor, _: slice) -> torch.Tensor:
        if p == 2:
            return rows.mul_(rows)
        return rows.abs_() if p == 1 else rows.abs_().pow_(p)

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
            if not isinstance(tensor, nn.Parameter):
                return None
            return ctx.dim_sums(("magnitude", p), tensor, dim, power)

        total = _scatter_members(group, ctx, per_index)
        return total.pow(1.0 / p)

    score.__name__ = f"l{p:g}_magnitude"
    return score


def batchnorm_scale(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """|gamma| of the BatchNorm layers in the group (network slimming).

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, batchnorm_scale
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3),
    ...                             torch.nn.Conv2d(3, 1, 1))
    >>> _ = model[1].weight.data.copy_(torch.tensor([0.5, -2.0, 1.0]))
    >>> graph = depprune.trace(model, torch.zeros(1, 1, 4, 4))
    >>> batchnorm_scale(graph.groups[0], ScoreContext.from_model(graph, model)).tolist()
    [0.5, 2.0, 1.0]
    """

    def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        owner = ctx.owners.get(name)
        if isinstance(owner, nn.modules.batchnorm._NormBase) and name.endswith("weight"):
            return tensor.detach().abs().float()
        return None

    return _scatter_members(group, ctx, per_index)


def taylor(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """First-order Taylor: |sum of weight * grad| over each unit's slices.

    Run a backward pass first so that parameters hold ``.grad``.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, taylor
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> model(torch.randn(4, 2)).sum().backward()
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> taylor(graph.groups[0], ScoreContext.from_model(graph, model)).shape
    torch.Size([3])
    """

    def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        if not isinstance(tensor, nn.Parameter):
            return None
        if tensor.grad is None:
            raise ImportanceError(
                f"{name} has no gradient; call loss.backward() before scoring with taylor"
            )
        grad = tensor.grad

        def times_grad(rows: torch.Tensor, part: slice) -> torch.Tensor:
            return rows.mul_(grad[part].float())

        return ctx.dim_sums("taylor", tensor, dim, times_grad)

    return _scatter_members(group, ctx, per_index).abs()


def random(seed: int = 0) -> Importance:
    """Seeded random scores: a baseline, the same for the same seed and graph.

    Needs no weights, so it also plans models on the meta device.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, random
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> ctx = ScoreContext.from_model(graph, model)
    >>> torch.equal(random(5)(graph.groups[0], ctx), random(5)(graph.groups[0], ctx))
    True
    """

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + group.index)
        return torch.rand(group.size, generator=generator)

    score.__name__ = "random"
    return score


def wanda(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    progress: bool | None = None,
) -> Importance:
    """Activation-aware importance (Wanda): ``|W| x ||input feature||_2`` over calibration data.

    Runs ``model`` on every batch of ``calibration`` (each a tensor, a tuple
    or a dict of inputs, like ``example_inputs``) with forward hooks on every
    ``nn.Linear`` (and transformers' ``Conv1D``) that add up the squared
    norm of each input feature, so memory stays at one layer's activations.
    A unit's score sums ``|W_ij| * ||X_j||`` over the weight slices it would
    remove; groups with no such weight fall back to L2 magnitude. Shows a
    progress bar over batches (``progress=False`` silences it; ``None``:
    only on a terminal).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    >>> score = wanda(model, [torch.tensor([[3.0, 0.0], [4.0, 0.0]])], progress=False)
    >>> score.input_norms["0.weight"].tolist()
    [5.0, 0.0]
    """
    sums, input_dims, counted = _input_square_sums(model, calibration, progress)
    if not counted:
        raise ImportanceError(
            "calibration gave no batches, or the model has no nn.Linear layers to read "
            "inputs of; pass an iterable of example inputs"
        )
    norms = {name: total.sqrt() for name, total in sums.items()}
    fallback = magnitude(2)

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
            norm = norms.get(name)
            if norm is None:
                return None
            norm = norm.to(tensor.device)

            def weighted(rows: torch.Tensor, part: slice) -> torch.Tensor:
                # nn.Linear holds (out, in); Conv1D holds (in, out).
                scale = norm[None, :] if input_dims[name] == 1 else norm[part, None]
                return rows.abs_().mul_(scale)

            return ctx.dim_sums(("wanda", name), tensor, dim, weighted)

        try:
            return _scatter_members(group, ctx, per_index)
        except ImportanceError:
            return fallback(group, ctx)

    score.__name__ = "wanda"
    score.input_norms = norms  # type: ignore[attr-defined]
    return score


def _input_square_sums(
    model: nn.Module, calibration: Iterable[Any], progress: bool | None
) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """Squared L2 norm of every input feature of every linear layer, over all batches.

    Also gives, per weight name, which dim of the weight is the input dim.
    """
    sums: dict[str, torch.Tensor] = {}
    input_dims: dict[str, int] = {}
    hooks = []
    aliases: dict[str, list[str]] = {}
    first_name: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        is_conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        if not isinstance(module, nn.Linear) and not is_conv1d:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        input_dims[name] = 0 if is_conv1d else 1
        # A module reachable under several names is hooked once, scored under every name.
        if id(module) in first_name:
            aliases[first_name[id(module)]].append(name)
            continue
        first_name[id(module)] = name
        aliases[name] = []
        key = name

        def hook(_module, inputs, _output, key=key) -> None:
            x = inputs[0].detach()
            # Reduce at once: only this layer's activation is ever held.
            total = x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
            sums[key] = sums[key] + total if key in sums else total

        hooks.append(module.register_forward_hook(hook))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = 0
    try:
        with torch.no_grad():
            for batch in tqdm(calibration, desc="wanda calibration", disable=_quiet(progress)):
                batch = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch)
                args, kwargs = split_inputs(batch)
                model(*args, **kwargs)
                batches += 1
    finally:
        for handle in hooks:
            handle.remove()
    for name, others in aliases.items():
        for other in others:
            if name in sums:
                sums[other] = sums[name]
    return sums, input_dims, batches * bool(hooks)


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None shows bars only on a terminal."""
    return None if progress is None else not progress


def score_groups(
    groups: list[Group],
    importance: Importance,
    ctx: ScoreContext,
    *,
    progress: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Scores of every group as float32 CPU tensors, checked for shape and NaN.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, magnitude, score_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> ctx = ScoreContext.from_model(graph, model)
    >>> {k: v.shape for k, v in score_groups(graph.groups, magnitude(), ctx).items()}
    {0: torch.Size([3])}
    """
    if not callable(importance):
        raise ImportanceError(
            f"importance must be a callable (group, ctx) -> tensor, such as "
            f"depprune.importance.magnitude(); got {type(importance).__name__} {importance!r}"
        )
    result = {}
    for group in tqdm(groups, desc="scoring groups", disable=_quiet(progress), leave=False):
        try:
            scores = importance(group, ctx)
        except ImportanceError:
            raise
        except Exception as exc:
            name = getattr(importance, "__name__", type(importance).__name__)
            raise ImportanceError(
                f"importance {name} failed on group {group.index} ({type(exc).__name__}: "
                f"{exc}); it is called as importance(group, ctx) and must return one score "
                "per unit"
            ) from exc
        if not isinstance(scores, torch.Tensor) or scores.shape != (group.size,):
            raise ImportanceError(
                f"importance returned {getattr(scores, 'shape', type(scores))} for group "
                f"{group.index}; it must return a tensor of shape ({group.size},)"
            )
        if scores.is_meta:
            raise ImportanceError(
                "the weights are on the meta device, so they have no values to score; "
                "load real weights or use depprune.importance.random()"
            )
        scores = scores.detach().float().cpu()
        if torch.isnan(scores).any():
            raise ImportanceError(f"importance gave NaN for group {group.index}")
        result[group.index] = scores
    return result
