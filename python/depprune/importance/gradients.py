"""Scoring from gradients: a group, its weights and their gradients to one score per unit.

First-order Taylor (the loss change of removing a unit, from ``.grad``) in
two forms, and :func:`hessian`, the second-order (Optimal Brain Damage)
criterion from the empirical Fisher diagonal over a few batches.

>>> import torch, depprune
>>> from depprune.importance import ScoreContext, taylor, taylor_elementwise
>>> model = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False), torch.nn.Linear(2, 1, bias=False))
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
...     _ = model[1].weight.copy_(torch.tensor([[1.0, -1.0]]))
>>> model[0].weight.grad = torch.tensor([[3.0], [1.0]])
>>> model[1].weight.grad = torch.tensor([[-3.0, 1.0]])
>>> graph = depprune.trace(model, torch.zeros(1, 1))
>>> ctx = ScoreContext.from_model(graph, model)
>>> taylor(graph.groups[0], ctx).tolist(), taylor_elementwise(graph.groups[0], ctx).tolist()
([0.0, 1.0], [6.0, 3.0])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from depprune.errors import ImportanceError
from depprune.graph import Group
from depprune.importance.context import (
    _META_MESSAGE,
    Importance,
    ScoreContext,
    Transform,
    _quiet,
    _scatter_members,
)

__all__ = ["hessian", "taylor", "taylor_elementwise"]


def _gradient_sums(
    group: Group, ctx: ScoreContext, key: str, transform: Callable[[torch.Tensor], Transform]
) -> torch.Tensor:
    """Per-unit sums of ``transform(grad)(weight rows)`` over the group's parameters."""

    def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        if not isinstance(tensor, nn.Parameter):
            return None
        if tensor.grad is None:
            raise ImportanceError(
                f"{name} has no gradient; call loss.backward() before scoring with {key}"
            )
        return ctx.dim_sums(key, tensor, dim, transform(tensor.grad))

    return _scatter_members(group, ctx, per_index)


def taylor(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """First-order Taylor: |sum of weight * grad| over each unit's slices.

    The first-order estimate of the loss change when the whole unit is
    removed at once (Molchanov et al. 2019): contributions of opposite sign
    cancel. :func:`taylor_elementwise` sums ``|weight * grad|`` instead.
    Run a backward pass first so that parameters hold ``.grad``.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, taylor
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> model(torch.randn(4, 2)).sum().backward()
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> taylor(graph.groups[0], ScoreContext.from_model(graph, model)).shape
    torch.Size([3])
    """

    def times_grad(grad: torch.Tensor) -> Transform:
        return lambda rows, part: rows.mul_(grad[part].float())

    return _gradient_sums(group, ctx, "taylor", times_grad).abs()


def taylor_elementwise(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """Element-wise first-order Taylor: sum of |weight * grad| over each unit's slices.

    What Torch-Pruning's ``GroupTaylorImportance`` computes by default: every
    weight's own first-order saliency, so contributions never cancel (a unit
    whose weights matter in opposite directions still scores high).
    :func:`taylor` takes the absolute value of the sum instead, the estimate
    for removing the unit as a whole. Needs ``.grad``, like :func:`taylor`.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext, taylor_elementwise
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> model(torch.randn(4, 2)).sum().backward()
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> bool((taylor_elementwise(graph.groups[0], ScoreContext.from_model(graph, model)) >= 0).all())
    True
    """

    def abs_times_grad(grad: torch.Tensor) -> Transform:
        return lambda rows, part: rows.mul_(grad[part].float()).abs_()

    return _gradient_sums(group, ctx, "taylor_elementwise", abs_times_grad)


def hessian(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    per_sample: bool = False,
    progress: bool | None = None,
) -> Importance:
    """Second-order (OBD) importance: ``0.5 * w**2 * H_diag`` over each unit's slices.

    ``H_diag`` is the empirical Fisher diagonal, the mean of squared
    gradients of ``loss_fn(model, batch)`` (a scalar tensor) over
    ``batches``: one gradient per batch by default, or one per sample with
    ``per_sample=True`` (every tensor of a batch split along dim 0; one
    backward pass per sample, so slower, and closer to the true Fisher).
    This is the criterion Torch-Pruning calls ``GroupHessianImportance``
    (LeCun et al. 1989, Optimal Brain Damage; Hassibi & Stork 1993): a unit's
    score is the loss increase its removal would cause under a diagonal
    Hessian, summed over every parameter slice the unit removes.

    The gradients are computed now with ``torch.autograd.grad``, in eval mode
    (BatchNorm statistics are not updated, dropout is off); the model's
    ``.grad`` tensors and every module's training mode are as they were
    afterwards. Tensors in each batch are moved to the model's device first.
    Parameters that do not require grad do not count. Shows a progress bar
    over batches (``progress=False`` silences it; ``None``: only on a terminal).

    >>> import torch
    >>> from depprune.importance import hessian
    >>> model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(2.0)
    >>> def loss_fn(model, x):
    ...     return model(x).sum()
    >>> score = hessian(model, loss_fn, [torch.ones(1, 1), torch.full((1, 1), 3.0)], progress=False)
    >>> score.fisher["0.weight"].tolist()  # the mean of 1**2 and 3**2
    [[5.0]]
    """
    if not isinstance(model, nn.Module):
        raise ImportanceError(f"hessian needs the nn.Module to score; got {type(model).__name__}")
    if not callable(loss_fn):
        raise ImportanceError(
            f"loss_fn must be a callable loss_fn(model, batch) -> scalar loss tensor; got "
            f"{type(loss_fn).__name__}"
        )
    fisher, count = _fisher_diagonal(model, loss_fn, batches, per_sample, progress)
    key = ("hessian", id(fisher))

    def score(group: Group, ctx: ScoreContext) -> torch.Tensor:
        def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
            curvature = fisher.get(name)
            if curvature is None or not isinstance(tensor, nn.Parameter):
                return None

            def saliency(rows: torch.Tensor, part: slice) -> torch.Tensor:
                return rows.mul_(rows).mul_(curvature[part]).mul_(0.5)

            return ctx.dim_sums(key, tensor, dim, saliency)

        return _scatter_members(group, ctx, per_index)

    score.__name__ = "hessian"
    #: The empirical Fisher diagonal by parameter name (float32, on each parameter's device).
    score.fisher = fisher  # type: ignore[attr-defined]
    #: How many gradients were averaged: batches, or samples with per_sample=True.
    score.gradients = count  # type: ignore[attr-defined]
    return score


def _samples(batch: Any, index: int) -> tuple[int, Callable[[int], Any]]:
    """How many samples ``batch`` holds (its tensors' common dim 0) and a getter of one."""
    sizes = {
        t.shape[0] for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()
    }
    if len(sizes) != 1:
        raise ImportanceError(
            f"per_sample=True splits batch {index} along dim 0, but its tensors have "
            f"{'no dim 0' if not sizes else f'dim 0 sizes {sorted(sizes)}'}; pass batches "
            "whose tensors all hold one row per sample, or per_sample=False"
        )

    def sample(i: int) -> Any:
        return pytree.tree_map_only(torch.Tensor, lambda t: t[i : i + 1] if t.dim() else t, batch)

    return sizes.pop(), sample


def _fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    per_sample: bool,
    progress: bool | None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean squared gradient of every trainable parameter, by every name it has."""
    names: dict[int, list[str]] = {}
    params: list[nn.Parameter] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        if param.is_meta:
            raise ImportanceError(_META_MESSAGE)
        if id(param) not in names:
            names[id(param)] = []
            params.append(param)
        names[id(param)].append(name)
    if not params:
        raise ImportanceError(
            "no parameter of the model requires grad, so hessian has no gradient to read; "
            "set requires_grad=True on the parameters to score"
        )
    try:
        batches = iter(batches)
    except TypeError:
        raise ImportanceError(
            f"batches must be an iterable of batches for loss_fn(model, batch), such as a "
            f"list or a DataLoader; got {type(batches).__name__}"
        ) from None
    device = params[0].device
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    saved_grads = [p.grad for p in params]
    modes = [(module, module.training) for module in model.modules()]
    count = 0
    try:
        model.eval()
        with torch.enable_grad():
            for index, batch in enumerate(
                tqdm(batches, desc="hessian batches", disable=_quiet(progress))
            ):
                batch = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), batch)
                if per_sample:
                    size, sample = _samples(batch, index)
                    pieces: Iterable[Any] = (sample(i) for i in range(size))
                else:
                    pieces = (batch,)
                for piece in pieces:
                    grads = _gradients(model, loss_fn, piece, params, index)
                    for total, grad in zip(sums, grads, strict=True):
                        if grad is not None:
                            grad = grad.float()
                            total.addcmul_(grad, grad)
                    count += 1
    finally:
        for param, grad in zip(params, saved_grads, strict=True):
            param.grad = grad
        for module, training in modes:
            module.training = training
    if not count:
        raise ImportanceError(
            "batches gave no batch (or only empty ones), so hessian has no gradient to "
            "average; pass a non-empty iterable of batches for loss_fn(model, batch)"
        )
    fisher = {}
    for param, total in zip(params, sums, strict=True):
        total.div_(count)
        for name in names[id(param)]:
            fisher[name] = total
    return fisher, count


def _gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    params: list[nn.Parameter],
    index: int,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``loss_fn(model, batch)`` by ``params`` (None where unused), .grad untouched."""
    try:
        loss = loss_fn(model, batch)
    except ImportanceError:
        raise
    except Exception as exc:
        raise ImportanceError(
            f"loss_fn failed on batch {index} ({type(exc).__name__}: {exc}); it is called as "
            "loss_fn(model, batch) and must return a scalar loss tensor"
        ) from exc
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ImportanceError(
            f"loss_fn returned {getattr(loss, 'shape', type(loss).__name__)} on batch {index}; "
            "it must return a scalar loss tensor (reduce it, e.g. loss.mean())"
        )
    if not loss.requires_grad:
        raise ImportanceError(
            f"the loss of batch {index} does not depend on any parameter that requires grad; "
            "compute it from model(batch) outside torch.no_grad() and without .detach()"
        )
    try:
        return torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
    except RuntimeError as exc:
        raise ImportanceError(
            f"backward through the loss of batch {index} failed ({exc}); loss_fn must return "
            "a loss that has not been backpropagated yet"
        ) from exc
