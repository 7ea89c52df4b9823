"""Network Slimming (Liu et al., ICCV 2017): takes a model trained with L1 on its BatchNorm
scales, gives it pruned by one global threshold on those scales.

Train with :func:`regularizer` (``strength * sum |gamma|`` over every
BatchNorm scale, :class:`depprune.sparsity.BatchNormL1`), then :func:`prune`
ranks every BatchNorm-scaled unit of the model together by :func:`channel_scale`
and removes the ``ratio`` lowest: one threshold over all layers, so layers
whose scales went to zero lose many channels and the others few.

Only groups with a BatchNorm are ranked, and ``ratio`` is the fraction of
*their* units removed; a group no BatchNorm scales (a classifier's hidden
neurons, a conv with no norm after it) is left whole, and the report lists
it with that reason in ``kept_whole``.

Several BatchNorms in one group (a residual stream: the stem's BN and every
block's last BN and downsample BN scale the same channels): a unit's score
is the *largest* of its scales, so the threshold keeps its meaning: a channel
is removed only when every BatchNorm scale multiplying it is below the
threshold (a single-BN channel scores exactly its |gamma|).
:func:`depprune.importance.batchnorm_scale` sums the scales instead, which a
raw global threshold cannot compare across groups with different BN counts.

>>> import torch, depprune
>>> from depprune.methods import slimming
>>> model = torch.nn.Sequential(
...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
...     torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
...     torch.nn.Conv2d(8, 2, 1))
>>> with torch.no_grad():  # as if trained with slimming.regularizer(model)
...     _ = model[1].weight.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
...     _ = model[4].weight.copy_(torch.linspace(0.1, 0.8, 8))
>>> report = slimming.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5)
>>> model[1].num_features, model[4].num_features  # 6 near-zero scales + the 2 lowest of 8
(2, 6)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

import depprune
from depprune.apply import named_tensors
from depprune.errors import ImportanceError, MethodError
from depprune.graph import Group
from depprune.importance import ScoreContext
from depprune.sparsity import BatchNormL1

__all__ = ["channel_scale", "prune", "regularizer"]


def regularizer(model: nn.Module, strength: float = 1e-4) -> BatchNormL1:
    """Network Slimming's sparsity penalty, ``strength * sum |gamma|`` (add
    ``.penalty()`` to the loss, or call ``.step()`` after ``backward()``).

    >>> import torch
    >>> reg = regularizer(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)))
    >>> reg.strength
    0.0001
    """
    return BatchNormL1(model, strength)


def _is_scale(name: str, owners: Mapping[str, nn.Module], tensors: Mapping[str, Any]) -> bool:
    return (
        isinstance(owners.get(name), nn.modules.batchnorm._NormBase)
        and name.rpartition(".")[2] == "weight"
        and isinstance(tensors.get(name), nn.Parameter)
    )


def channel_scale(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """The largest |gamma| of the BatchNorm scales multiplying each unit; +inf where none does.

    Comparable across groups (``globally_comparable``): under
    ``global_ranking=True`` every unit is ranked on this raw value, one
    threshold for the whole model.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3),
    ...                             torch.nn.Conv2d(3, 1, 1))
    >>> _ = model[1].weight.data.copy_(torch.tensor([0.5, -2.0, 1.0]))
    >>> graph = depprune.trace(model, torch.zeros(1, 1, 4, 4))
    >>> channel_scale(graph.groups[0], ScoreContext.from_model(graph, model)).tolist()
    [0.5, 2.0, 1.0]
    """
    scores: torch.Tensor | None = None
    for (name, _), unit_map in ctx.graph.unit_maps(group).items():
        if not _is_scale(name, ctx.owners, ctx.tensors):
            continue
        values = ctx.tensors[name].detach().abs().float()
        if values.is_meta:
            raise ImportanceError(
                "the BatchNorm scales are on the meta device, so they have no values to "
                "rank; load real weights first"
            )
        if scores is None:
            scores = torch.full((group.size + 1,), -torch.inf, device=values.device)
        # Slot 0 collects the indices outside the group; a copy of the read-only unit map.
        units = torch.tensor(unit_map, device=scores.device) + 1
        scores.scatter_reduce_(0, units, values.to(scores.device), reduce="amax")
    if scores is None:
        return torch.full((group.size,), torch.inf)
    scores = scores[1:]
    return scores.masked_fill(scores == -torch.inf, torch.inf)


channel_scale.globally_comparable = True  # type: ignore[attr-defined]


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    *,
    ignored: Iterable[nn.Module] = (),
    round_to: int | None = None,
    min_units: int = 1,
    kinds: Iterable[str] | None = None,
    strict: bool = False,
    count_macs: bool = True,
    low_memory: bool = False,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    progress: bool | None = None,
) -> depprune.PruneReport:
    """Remove the ``ratio`` of BatchNorm-scaled units with the lowest :func:`channel_scale`,
    ranked across the whole model; prunes in place and returns the report.

    The other options are :func:`depprune.prune`'s. ``ratio`` counts the units
    of groups with a BatchNorm only; the others are kept whole (listed in the
    report's ``kept_whole``). A group with no BatchNorm whose first member
    belongs to a module that also starts a BatchNorm group (a parameter on the
    root module) is ranked with them at +inf: its units count in the total but
    go only once every BatchNorm channel has.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                             torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 6),
    ...                             torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> report = prune(model, torch.randn(1, 3, 5, 5), ratio=0.25)
    >>> model[1].num_features, model[4].out_features
    (6, 6)
    >>> print(report.kept_whole[0])
    group 1 (6 neurons, first member 4.weight[0]) kept whole: no BatchNorm scales its units (network slimming ranks BatchNorm channels only)
    """
    if not isinstance(model, nn.Module):
        raise MethodError(f"the model must be an nn.Module; got {type(model).__name__}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise MethodError(
            f"ratio is {ratio!r}; it is the fraction of BatchNorm channels to remove, in [0, 1)"
        )
    graph = depprune.trace(model, example_inputs, ignored=ignored, strict=strict)
    named = named_tensors(model)
    owners = {name: module for name, (module, _, _) in named.items()}
    tensors = {name: getattr(module, attr) for name, (module, attr, _) in named.items()}

    def has_scale(group: Group) -> bool:
        return any(_is_scale(name, owners, tensors) for name, _ in group.members)

    scaled = [g for g in graph.groups if has_scale(g)]
    if not scaled:
        raise MethodError(
            f"no group of {type(model).__name__} has a BatchNorm with a learnable scale, so "
            "network slimming has no channel to rank; use depprune.methods.depgraph (group "
            "norms) or depprune.prune"
        )
    # One scope holding every BatchNorm group's producer, ranked together; the rest at ratio 0.
    producers = tuple({id(m): m for m in (owners[g.members[0][0]] for g in scaled)}.values())
    report = depprune.prune(
        model,
        graph=graph,
        ratio=0.0,
        ratios={producers: float(ratio)},
        importance=channel_scale,
        global_ranking=True,
        ignored=ignored,
        round_to=round_to,
        min_units=min_units,
        kinds=kinds,
        strict=strict,
        count_macs=count_macs,
        low_memory=low_memory,
        optimizers=optimizers,
        progress=progress,
    )
    choices = {c.index: c for c in report.plan.groups}
    for group in report.graph.groups if report.graph is not None else ():
        choice = choices[group.index]
        already = any(reason.startswith(f"group {group.index} ") for reason in report.kept_whole)
        if has_scale(group) or choice.kept < choice.size or already:
            continue
        report.kept_whole.append(
            f"group {group.index} ({group.size} {choice.kind or 'units'}, first member "
            f"{choice.first_member}) kept whole: no BatchNorm scales its units (network "
            "slimming ranks BatchNorm channels only)"
        )
    return report
