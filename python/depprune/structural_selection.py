"""Select stage for whole layers and experts: takes the model and the kinds asked for,
gives the :class:`~depprune.structure.StructuralCuts` that :func:`depprune.make_plan`
puts in the plan next to the width cuts.

Layers come from :mod:`depprune.depth` (repeated blocks whose input and output
agree, ranked by block influence on calibration batches, or the user's
indices); experts from :mod:`depprune.experts` (routed experts ranked by routing
frequency, gate mass or weights). Without calibration data, a model with real
weights is ranked on its example inputs; a meta model needs an importance.

>>> import torch
>>> model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(4)))
>>> with torch.no_grad():
...     _ = model[2].weight.copy_(torch.eye(4)), model[2].bias.zero_()  # changes nothing
>>> cuts = structural_cuts(model, torch.randn(3, 4), {"layers": 0.25})
>>> cuts.describe()
['layers of the model: 1 of 4 removed ([2])']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from depprune.errors import SelectionError
from depprune.structure import StructuralCuts, renamed

__all__ = ["STRUCTURAL_KINDS", "structural_cuts"]

#: Kinds that remove whole modules instead of units of a width.
STRUCTURAL_KINDS = ("layers", "experts")


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def structural_cuts(
    model: nn.Module,
    example_inputs: Any,
    ratios: Mapping[str, float],
    *,
    layer_importance: Any = None,
    expert_importance: Any = None,
    progress: bool | None = None,
) -> StructuralCuts:
    """What goes for each structural kind in ``ratios`` (kind -> fraction removed).

    ``layer_importance`` is a :class:`depprune.depth.LayerImportance` (by
    default block influence on ``example_inputs``); ``expert_importance`` a
    :class:`depprune.experts.ExpertImportance` (by default routing frequency
    on ``example_inputs``). For one run of adjacent layers (angular-distance
    depth pruning), choose them with ``depprune.depth.choose_layers(...,
    consecutive=True)`` and pass them as :func:`depprune.depth.given_layers`.
    """
    cuts = StructuralCuts()
    if "layers" in ratios:
        _add_layers(cuts, model, example_inputs, ratios["layers"], layer_importance, progress)
    if "experts" in ratios:
        _add_experts(cuts, model, example_inputs, ratios["experts"], expert_importance, progress)
        _forget_removed_layers(cuts)
    return cuts


def _forget_removed_layers(cuts: StructuralCuts) -> None:
    """Expert cuts inside layers that go anyway are left out (of reports, of the cut)."""
    names = [*cuts.experts, *(n for n, _ in cuts.tensors), *cuts.attributes]
    gone = {name for name, new in renamed(cuts, names).items() if new is None}
    cuts.experts = {n: v for n, v in cuts.experts.items() if n not in gone}
    cuts.tensors = {k: v for k, v in cuts.tensors.items() if k[0] not in gone}
    cuts.attributes = {n: v for n, v in cuts.attributes.items() if n not in gone}


def _add_layers(
    cuts: StructuralCuts,
    model: nn.Module,
    example_inputs: Any,
    ratio: float,
    importance: Any,
    progress: bool | None,
) -> None:
    from depprune import depth

    lists = depth.find_layer_lists(model, example_inputs)
    if not any(entry.removable for entry in lists):
        raise SelectionError(
            f"kinds asks for 'layers', but {type(model).__name__} has no list of repeated blocks "
            "whose input and output agree (nn.ModuleList or nn.Sequential); prune widths only"
        )
    if importance is None:
        if _on_meta(model):
            raise SelectionError(
                "ranking layers needs real weights, and this model is on the meta device; pass "
                "layer_importance=depprune.depth.given_layers(model, example_inputs, {...}) "
                "with the layers to remove"
            )
        importance = depth.block_influence(model, [example_inputs], lists=lists, progress=progress)
    kept = depth.choose_layers(lists, importance, ratio)
    sizes = {entry.name: entry.size for entry in lists}
    for name, positions in kept.items():
        cuts.children[name] = np.asarray(positions, dtype=np.int64)
        cuts.sizes[name] = sizes[name]


def _add_experts(
    cuts: StructuralCuts,
    model: nn.Module,
    example_inputs: Any,
    ratio: float,
    importance: Any,
    progress: bool | None,
) -> None:
    from depprune import experts

    layers = experts.find_expert_layers(model)
    if not layers:
        raise SelectionError(
            f"kinds asks for 'experts', but {type(model).__name__} has no mixture-of-experts "
            "layer (a router and its experts); prune widths only"
        )
    if importance is None:
        if _on_meta(model):
            raise SelectionError(
                "ranking experts needs real weights, and this model is on the meta device; "
                "pass expert_importance= (depprune.experts.routing_importance on calibration "
                "batches of the real model, or your own ExpertImportance)"
            )
        importance = experts.routing_importance(
            model, [example_inputs], layers=layers, progress=progress
        )
    kept = experts.choose_experts(layers, importance, ratio)
    found = experts.expert_cuts(model, layers, kept)
    cuts.tensors.update(found.kept)
    for name, positions in found.children.items():
        cuts.children[name] = np.asarray(positions, dtype=np.int64)
        cuts.sizes[name] = len(model.get_submodule(name))
    for name, values in found.attributes.items():
        cuts.attributes.setdefault(name, {}).update(values)
    cuts.config.update(found.config)
    for layer in layers:
        if layer.name in kept and len(kept[layer.name]) < layer.num_experts:
            cuts.experts[layer.name] = (layer.num_experts, np.asarray(kept[layer.name], np.int64))
