"""Non-structured pruning, Han et al. (NeurIPS 2015): a model and a sparsity in, torch masks out.

The masks go on the conv/linear weights; a :class:`SparsityReport` says how sparse each is.

"Learning both Weights and Connections for Efficient Neural Networks" zeroes
the connections of smallest magnitude and retrains the rest, iterating to
higher sparsity; Han et al. choose a rate per layer (``scope="layer"``),
"Rethinking the Value of Network Pruning" prunes with one threshold over all
conv weights (``scope="global"``). The masks are ``torch.nn.utils.prune``'s
own (``weight_orig`` times the buffer ``weight_mask``), so training keeps the
pruned weights at zero, :func:`make_permanent` folds them in, and depprune's
structural pruning still applies to the masked model (it scores and cuts
``weight_orig`` and ``weight_mask`` alike).

>>> import torch
>>> from depprune.methods import unstructured
>>> model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
>>> report = unstructured.prune(model, 0.5)
>>> report.zeros, report.size
(60, 120)
>>> unstructured.make_permanent(model)
['0.weight', '2.weight']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from depprune.apply import masked_tensors
from depprune.errors import MethodError

__all__ = [
    "LayerSparsity",
    "SparsityReport",
    "make_permanent",
    "prunable_layers",
    "prune",
    "sparsity",
]


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros of one layer's weight: the mask's (masked weights are zero) and exact zeros alike."""

    #: The weight's name (``features.0.weight``, also while masked as ``weight_orig``).
    name: str
    zeros: int
    size: int

    @property
    def sparsity(self) -> float:
        """The fraction of the weight that is zero."""
        return self.zeros / self.size if self.size else 0.0


@dataclass
class SparsityReport:
    """Sparsity of every conv/linear weight and overall; prints as a table."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def zeros(self) -> int:
        """Zero weights over every layer."""
        return sum(layer.zeros for layer in self.layers)

    @property
    def size(self) -> int:
        """Weights over every layer."""
        return sum(layer.size for layer in self.layers)

    @property
    def overall(self) -> float:
        """The fraction of all the layers' weights that is zero."""
        return self.zeros / self.size if self.size else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(
            f"{name!r} is not a reported weight; reported: {[x.name for x in self.layers]}"
        )

    def __str__(self) -> str:
        width = max([len("overall"), *(len(layer.name) for layer in self.layers)])
        lines = [f"{'weight':<{width}}{'size':>14}{'zeros':>14}{'sparsity':>10}"]
        for layer in [*self.layers, LayerSparsity("overall", self.zeros, self.size)]:
            lines.append(
                f"{layer.name:<{width}}{layer.size:>14,}{layer.zeros:>14,}{layer.sparsity:>10.1%}"
            )
        return "\n".join(lines)


def _is_layer(module: nn.Module) -> bool:
    """Conv, transposed conv, linear, or transformers' Conv1D (a linear stored transposed)."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The weight the layer computes with: ``weight_orig * weight_mask`` while masked."""
    original = module._parameters.get("weight_orig")
    if original is not None and "weight_mask" in module._buffers:
        return original.detach() * module._buffers["weight_mask"]
    weight = module._parameters.get("weight")
    return None if weight is None else weight.detach()


def _mask_zeros(module: nn.Module) -> int:
    mask = module._buffers.get("weight_mask")
    return 0 if mask is None else int((mask == 0).sum())


def prunable_layers(
    model: nn.Module, modules: Iterable[nn.Module] | None = None
) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers (name, module) that :func:`prune` would mask, each once.

    ``nn.MultiheadAttention``'s ``out_proj`` is left out: the attention reads its
    weight directly, past the pre-hook that would apply a mask.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    >>> [name for name, _ in prunable_layers(model)]
    ['0']
    """
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    # nn.MultiheadAttention reads out_proj.weight in its own functional call, so the mask's
    # pre-hook would never run: the weight would be a stale product, freed after one backward.
    read_by_parent = {
        id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    }
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if id(module) in read_by_parent:
            continue
        if _is_layer(module) and _weight(module) is not None:
            found.setdefault(id(module), (name, module))
    if modules is None:
        layers = list(found.values())
    else:
        if isinstance(modules, nn.Module):
            modules = (modules,)
        if not isinstance(modules, Iterable):
            raise MethodError(
                f"modules must be an iterable of the model's conv/linear layers; got {modules!r}"
            )
        names = {id(m): name for name, m in model.named_modules()}
        layers = []
        for module in modules:
            if not isinstance(module, nn.Module) or id(module) not in names:
                raise MethodError(
                    f"{type(module).__name__} given in modules is not a submodule of "
                    f"{type(model).__name__}; pass layers of the model being pruned"
                )
            if id(module) not in found:
                raise MethodError(
                    f"module {names[id(module)]!r} ({type(module).__name__}) is not a conv or "
                    "linear layer with a weight; pass conv/linear layers, or modules=None for all"
                )
            if all(id(m) != id(module) for _, m in layers):
                layers.append(found[id(module)])
    if not layers:
        raise MethodError(
            f"{type(model).__name__} has no conv or linear layer with a weight to prune"
        )
    return layers


def sparsity(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> SparsityReport:
    """The zeros of every conv/linear weight (masked or exactly zero), per layer and overall.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    >>> _ = torch.nn.init.zeros_(model[0].weight[0])
    >>> print(sparsity(model))  # doctest: +NORMALIZE_WHITESPACE
    weight             size         zeros  sparsity
    0.weight              4             2     50.0%
    overall               4             2     50.0%
    """
    layers = prunable_layers(model, modules)
    report = SparsityReport()
    for name, module in layers:
        weight = _weight(module)
        assert weight is not None  # prunable_layers keeps layers with a weight
        full = f"{name}.weight" if name else "weight"
        report.layers.append(LayerSparsity(full, int((weight == 0).sum()), weight.numel()))
    return report


def prune(
    model: nn.Module,
    amount: float,
    *,
    scope: str = "global",
    modules: Iterable[nn.Module] | None = None,
) -> SparsityReport:
    """Mask the smallest-magnitude weights of ``model``'s conv/linear layers; returns the sparsity.

    ``amount`` is the sparsity to reach, in [0, 1): the fraction of the
    weights in scope masked after the call, ``round(amount * weights)`` of
    them, counting those already masked (so ``prune(model, 0.5)`` then
    ``prune(model, 0.75)`` is Han et al.'s iterative schedule: the second call
    masks a further quarter, among the weights still alive). ``scope="global"``
    ranks every weight of ``modules`` (default: every conv and linear layer)
    together, through ``torch.nn.utils.prune.global_unstructured`` with
    ``L1Unstructured``; ``scope="layer"`` reaches ``amount`` in each layer
    through ``l1_unstructured``. Biases are not pruned. Nothing changes when
    an argument is wrong.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.fill_(1.0)  # larger than any of the first layer's (under 0.5)
    >>> [layer.zeros for layer in prune(model, 0.5).layers]
    [16, 0]
    """
    if scope not in ("global", "layer"):
        raise MethodError(
            f"scope is {scope!r}; use 'global' (one threshold over every layer) or 'layer' "
            "(the same sparsity in each layer)"
        )
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise MethodError(
            f"amount is {amount!r}; it is the sparsity to reach, the fraction of weights "
            "masked, in [0, 1)"
        )
    layers = prunable_layers(model, modules)
    if scope == "layer":
        counts = []
        for name, module in layers:
            size = _weight(module).numel()
            counts.append(round(amount * size) - _mask_zeros(module))
            if counts[-1] < 0:
                raise MethodError(
                    f"layer {name!r} already has {_mask_zeros(module)} of its {size} weights "
                    f"masked, more than amount={amount} asks; masks only grow, so pass an "
                    "amount at least its current sparsity"
                )
        for (_, module), count in zip(layers, counts, strict=True):
            torch_prune.l1_unstructured(module, "weight", amount=count)
    else:
        weights = [_weight(module) for _, module in layers]
        kinds = {(w.device, w.dtype) for w in weights}
        if len(kinds) > 1:
            raise MethodError(
                f"global ranking needs every weight on one device and dtype; these are on "
                f"{sorted(str(k) for k in kinds)}: use scope='layer', or move the model first"
            )
        size = sum(w.numel() for w in weights)
        masked = sum(_mask_zeros(module) for _, module in layers)
        count = round(amount * size) - masked
        if count < 0:
            raise MethodError(
                f"{masked} of the {size} weights are already masked, more than amount={amount} "
                "asks; masks only grow, so pass an amount at least the current sparsity"
            )
        torch_prune.global_unstructured(
            [(module, "weight") for _, module in layers],
            pruning_method=torch_prune.L1Unstructured,
            amount=count,
        )
    return sparsity(model, [module for _, module in layers])


def make_permanent(model: nn.Module) -> list[str]:
    """Fold every ``torch.nn.utils.prune`` mask into its weight (``prune.remove``); returns their names.

    The weight becomes a plain parameter again, zero where the mask was, and
    the masks stop applying to what training does next.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> _ = prune(model, 0.5)
    >>> make_permanent(model), hasattr(model[0], "weight_mask")
    (['0.weight'], False)
    """
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    made = []
    for module_name, module, tensor_name in masked_tensors(model):
        torch_prune.remove(module, tensor_name)
        made.append(f"{module_name}.{tensor_name}" if module_name else tensor_name)
    return made
