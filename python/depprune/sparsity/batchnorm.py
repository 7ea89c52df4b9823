"""Sparse training stage: takes a model, gives Network Slimming's L1 penalty on BatchNorm scales.

Network Slimming (Liu et al., ICCV 2017) trains with ``strength * sum |gamma|``
over the scale (``weight``) of every BatchNorm, so channels the network does
not need end with a scale near zero; :mod:`depprune.methods.slimming` then
removes the channels below one global threshold. Use it like
:class:`~depprune.sparsity.GroupRegularizer`: add :meth:`BatchNormL1.penalty`
to the loss, or call :meth:`BatchNormL1.step` after ``loss.backward()`` (it
adds the subgradient ``strength * sign(gamma)``). The layers are looked up
on every call, so the regulariser keeps working on the same model after it is
pruned. Under ``DistributedDataParallel`` pass the wrapped model: the added
gradient is a function of the replicated scales, so the ranks stay in sync.

>>> import torch
>>> from depprune.sparsity import BatchNormL1
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
>>> reg = BatchNormL1(model, strength=0.5)
>>> reg.penalty().item()  # 0.5 * four scales of 1
2.0
>>> reg.step()
>>> model[1].weight.grad.tolist()
[0.5, 0.5, 0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from depprune.errors import MethodError
from depprune.sparsity.group import check_number, unwrapped

__all__ = ["BatchNormL1", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm (and affine InstanceNorm) of ``model`` that has a learnable scale.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2, affine=False))
    >>> len(batchnorm_layers(model))
    1
    """
    return [
        module
        for module in unwrapped(model).modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        and isinstance(module.weight, nn.Parameter)
    ]


class BatchNormL1:
    """``strength * sum |gamma|`` over every BatchNorm scale of ``model``.

    >>> import torch
    >>> reg = BatchNormL1(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    >>> reg.strength, len(reg.layers)
    (0.0001, 1)
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4) -> None:
        if not isinstance(model, nn.Module):
            raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
        self.strength = check_number(strength, "strength", "Network Slimming uses 1e-4 or 1e-5")
        self.model = unwrapped(model)
        #: The BatchNorm layers penalised (their current ``weight`` is read on every call).
        self.layers = batchnorm_layers(self.model)
        if not self.layers:
            raise MethodError(
                f"{type(self.model).__name__} has no BatchNorm with a learnable scale "
                "(affine=True), so network slimming has nothing to make sparse; use "
                "depprune.sparsity.GroupRegularizer instead"
            )

    def _scales(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for layer in self.layers:
            scale = layer.weight
            # A scale shared by two layers counts once.
            if isinstance(scale, nn.Parameter) and id(scale) not in seen:
                seen.add(id(scale))
                yield scale

    def penalty(self) -> torch.Tensor:
        """``strength * sum |gamma|``: a float32 scalar to add to the loss (also under autocast).

        >>> import torch
        >>> reg = BatchNormL1(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), strength=1.0)
        >>> reg.penalty().item()
        3.0
        """
        total: torch.Tensor | None = None
        for scale in self._scales():
            term = scale.float().abs().sum()
            total = term if total is None else total + term.to(total.device)
        if total is None:
            return torch.zeros(())
        return total * self.strength

    @torch.no_grad()
    def step(self) -> None:
        """Add ``strength * sign(gamma)`` to every scale's ``.grad`` (after ``backward()``).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([-2.0, 0.0]))
        >>> BatchNormL1(model, strength=0.5).step()
        >>> model[0].weight.grad.tolist()
        [-0.5, 0.0]
        """
        for scale in self._scales():
            if not scale.requires_grad:
                continue
            if scale.grad is None:
                scale.grad = torch.zeros_like(scale)
            scale.grad.add_(torch.sign(scale), alpha=self.strength)

    @torch.no_grad()
    def fraction_below(self, threshold: float) -> float:
        """The fraction of all BatchNorm scales with ``|gamma| < threshold`` (to watch training).

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([0.0, 0.005, 0.5, 1.0]))
        >>> BatchNormL1(model).fraction_below(0.01)
        0.5
        """
        threshold = check_number(threshold, "threshold", "e.g. 1e-2")
        below = total = 0
        for scale in self._scales():
            below += int((scale.abs() < threshold).sum())
            total += scale.numel()
        return below / total if total else 0.0
