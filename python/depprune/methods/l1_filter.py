"""Score stage, Li et al. (ICLR 2017): a model and a per-layer ratio profile in, a PruneReport out.

"Pruning Filters for Efficient ConvNets" removes, in each layer, the filters
whose sum of absolute kernel weights is smallest, with the feature maps they
make and the kernels of the next layer that read them. Only the *producing*
layer's filters are ranked, not every slice the removal takes: the score of a
unit is the L1 norm of the weight slices along the output dim of the layers
that write it (a conv's or linear's weight dim 0, transformers' ``Conv1D``
dim 1, an embedding's dim 1), never of the BatchNorm or the next layer.

The paper prunes with a predefined profile found by a sensitivity analysis:

* **VGG-16 on CIFAR-10** (VGG-16-pruned-A, 34% fewer FLOPs): 50% of the
  filters of conv layer 1 and of layers 8 to 13; layers 2 to 7 are
  sensitive and kept: ``ratio=0.5, sensitive=[conv2, ..., conv7],
  kinds=("channels",)`` (convs only, not the classifier's neurons), or
  ``ratio=0`` with ``ratios={conv1: 0.5, conv8: 0.5, ...}``.
* **ResNet-56 on CIFAR-10**: only the first conv of each residual block is
  pruned, the residual stream stays whole (``skip_residual=True``, the
  default here). Pruned-A removes 10% everywhere, skipping the sensitive
  layers 16, 20, 38 and 54 (convs counted from the stem, 1); pruned-B
  removes 60%, 30% and 10% in the three stages (``ratios`` with one ratio
  per stage module), skipping layers 16, 18, 20, 34, 38 and 54.
* **ResNet-34 on ImageNet**: pruned-A removes 30% of the first conv of the
  blocks of stages 1 to 3, pruned-B 50%, 60% and 40%; stage 4 is kept and
  layers 2, 8, 14, 16, 26, 28, 30 and 32 are skipped in both.

``sensitive`` layers are the paper's skipped layers: they keep all their
filters, while their input channels still follow the layers before them
(unlike depprune's ``ignored``, which freezes a module's inputs too).

>>> import torch, depprune
>>> from depprune.methods import l1_filter
>>> torch.manual_seed(0) and None
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
...                             torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
>>> report = l1_filter.prune(model, torch.randn(1, 3, 8, 8), ratio=0.5, progress=False)
>>> model[0].out_channels, model[1].num_features, model[3].in_channels
(4, 4, 4)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from depprune.api import PruneReport, trace
from depprune.api import prune as structural_prune
from depprune.apply import named_tensors
from depprune.errors import MethodError
from depprune.graph import DependencyGraph, Group
from depprune.importance import ScoreContext, _scatter_members, magnitude
from depprune.importance.context import Power
from depprune.selection import Scope, check_ratios

__all__ = ["Producer", "filter_l1", "producers", "prune", "residual_groups"]


@dataclass(frozen=True)
class Producer:
    """A layer weight whose output dim lies in a group: it writes the group's units."""

    #: The weight's name in the graph (``conv.weight``, or ``conv.weight_orig`` under a mask).
    name: str
    #: Its output dim (the filters).
    dim: int
    #: Its input dims (what the filters read); empty for an embedding.
    input_dims: tuple[int, ...]
    #: A grouped or depthwise conv: each output channel reads its own input channels, so
    #: it carries its input's channels on rather than producing new ones.
    channelwise: bool


def _layer_weight(module: nn.Module, attribute: str) -> tuple[int, tuple[int, ...], bool] | None:
    """(output dim, input dims, channel-wise) of a layer's weight; None if it is no layer weight."""
    # torch.nn.utils.prune keeps the weight as <name>_orig.
    attribute = attribute.removesuffix("_orig")
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and attribute == "weight":
        return 1, (0,), module.groups > 1
    if isinstance(module, nn.modules.conv._ConvNd) and attribute == "weight":
        return 0, (1,), module.groups > 1
    if isinstance(module, nn.Linear) and attribute == "weight":
        return 0, (1,), False
    if isinstance(module, nn.Bilinear) and attribute == "weight":
        return 0, (1, 2), False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and attribute == "weight":
        return 1, (0,), False  # transformers' Conv1D holds (in, out)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and attribute == "weight":
        return 1, (), False
    if isinstance(module, nn.MultiheadAttention) and attribute in (
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
    ):
        return 0, (1,), False
    return None


def _all_producers(group: Group, owners: Mapping[str, nn.Module]) -> list[Producer]:
    found = []
    for name, dim in group.members:
        owner = owners.get(name)
        if owner is None:
            continue
        role = _layer_weight(owner, name.rpartition(".")[2])
        if role is not None and role[0] == dim:
            found.append(Producer(name, dim, role[1], role[2]))
    return found


def producers(group: Group, ctx: ScoreContext) -> list[Producer]:
    """The layer weights whose filters make ``group``'s units (what Li et al. rank).

    Grouped and depthwise convs carry their input's channels on, so they count
    only when the group has no other producer.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 3, groups=4),
    ...                             torch.nn.Conv2d(4, 2, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 3, 6, 6))
    >>> [p.name for p in producers(graph.groups[0], ScoreContext.from_model(graph, model))]
    ['0.weight']
    """
    found = _all_producers(group, ctx.owners)
    own = [p for p in found if not p.channelwise]
    return own or found


#: For each graph: every (name, dim) member and the groups it belongs to.
_MEMBER_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _member_groups(graph: DependencyGraph) -> dict[tuple[str, int], frozenset[int]]:
    cached = _MEMBER_GROUPS.get(graph)
    if cached is None:
        collected: dict[tuple[str, int], set[int]] = {}
        for group in graph.groups:
            for member in group.members:
                collected.setdefault(member, set()).add(group.index)
        cached = _MEMBER_GROUPS[graph] = {m: frozenset(g) for m, g in collected.items()}
    return cached


def _sources(group: Group, ctx: ScoreContext) -> dict[Any, list[str]]:
    """The group's producers by what they read: layers that read one input count once.

    Layers reading the same input (q/k/v projections, a gated MLP's gate and up)
    are one layer split in parts; layers with different inputs writing the same
    units are added together (a residual stream). A producer whose input is not
    in any group (the image, a frozen axis) counts on its own.
    """
    member_groups = _member_groups(ctx.graph)
    by_source: dict[Any, list[str]] = {}
    for producer in producers(group, ctx):
        reads = frozenset().union(
            *(member_groups.get((producer.name, d), frozenset()) for d in producer.input_dims)
        )
        key = reads if reads else ("own input", producer.name)
        by_source.setdefault(key, []).append(producer.name)
    return by_source


_aten = torch.ops.aten
#: Elementwise sums of two tensors: what a residual connection records.
_ADDS = {_aten.add.Tensor, _aten.add_.Tensor, _aten.sub.Tensor, _aten.sub_.Tensor}

#: For each traced graph: the groups two same-shaped tensors are added along.
_ADDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _added_groups(graph: DependencyGraph) -> frozenset[int] | None:
    """Groups that some add of two same-shaped tensors carries on both operands.

    A bias or position embedding broadcasts, so it is not such an add; a
    squeeze-excitation gate multiplies. None for a graph without a recording
    (solved from bare equations).
    """
    cached = _ADDED.get(graph)
    if cached is not None:
        return cached
    recording = getattr(graph, "recording", None)
    log = getattr(recording, "log", None)
    if log is None:
        return None
    sizes = recording.equations.axis_sizes
    pairs: list[tuple[int, int]] = []
    for func, inputs in zip(log.funcs, log.inputs, strict=True):
        if func not in _ADDS:
            continue
        tensors = [value for value in inputs if isinstance(value, tuple)]
        if len(tensors) != 2 or len(tensors[0]) != len(tensors[1]):
            continue
        left, right = tensors
        if all(sizes[a] == sizes[b] for a, b in zip(left, right, strict=True)):
            pairs.extend(zip(left, right, strict=True))
    added: set[int] = set()
    if pairs:
        axes = np.asarray([axis for pair in pairs for axis in pair], dtype=np.int64)
        offsets, groups = graph._analysis.groups_of_axes(axes)
        of_axis = [
            frozenset(groups[offsets[i] : offsets[i + 1]].tolist()) for i in range(axes.size)
        ]
        for k in range(len(pairs)):
            added |= of_axis[2 * k] & of_axis[2 * k + 1]
    cached = _ADDED[graph] = frozenset(added)
    return cached


def residual_groups(graph: DependencyGraph, model: nn.Module) -> dict[int, str]:
    """Groups written by several layers with different inputs and added (a residual), with why.

    These are the channels ``skip_residual=True`` keeps whole, as the paper
    keeps ResNet's residual streams whole and prunes only inside the blocks.
    Several producers alone do not make a residual: layers reading one input
    (q/k/v, a gated MLP's gate and up) are one layer in parts, and a
    squeeze-excitation gate multiplies; the trace must also record an add of
    two same-shaped tensors carrying the group (a graph solved from bare
    equations has no trace, so its producers alone decide).

    >>> import torch, depprune
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem, self.inner = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 2, 1)
    ...         self.out, self.head = torch.nn.Conv2d(2, 4, 1), torch.nn.Conv2d(4, 1, 1)
    ...     def forward(self, x):
    ...         x = self.stem(x)
    ...         return self.head(x + self.out(self.inner(x)))
    >>> model = Block()
    >>> graph = depprune.trace(model, torch.zeros(1, 3, 4, 4))
    >>> residual_groups(graph, model)
    {0: 'written by stem.weight and out.weight, which read different inputs, and added'}
    """
    ctx = ScoreContext.from_model(graph, model)
    added = _added_groups(graph)
    found = {}
    for group in graph.groups:
        if added is not None and group.index not in added:
            continue
        sources = _sources(group, ctx)
        if len(sources) > 1:
            writers = [names[0] for names in sources.values()]
            found[group.index] = (
                f"written by {', '.join(writers[:-1])} and {writers[-1]}, which read "
                "different inputs, and added"
            )
    return found


_absolute = Power(1)


def filter_l1(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """Li et al.'s importance: the L1 norm of each unit's filters in the producing layer(s).

    Sums ``|W|`` over every dim but the output dim of each :func:`producers`
    weight; the BatchNorm, biases and the next layer's kernels do not count.
    A group with no layer weight producing it (an expert bank's 3-d weight,
    a bare parameter) falls back to the L1 norm of every slice it would remove.

    >>> import torch, depprune
    >>> from depprune.importance import ScoreContext
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0]]))
    >>> graph = depprune.trace(model, torch.zeros(1, 2))
    >>> filter_l1(graph.groups[0], ScoreContext.from_model(graph, model)).tolist()
    [3.0, 0.5, 0.0]
    """
    chosen = {(p.name, p.dim) for p in producers(group, ctx)}
    if not chosen:
        return magnitude(1)(group, ctx)

    def per_index(name: str, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        if (name, dim) not in chosen:
            return None
        return ctx.dim_sums("filter_l1", tensor, dim, _absolute)

    return _scatter_members(group, ctx, per_index)


def _modules_inside(model: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    """The name prefixes of ``modules`` inside ``model`` (every name of a shared module)."""
    wanted = {id(m) for m in modules}
    return [
        f"{name}." if name else ""
        for name, module in model.named_modules(remove_duplicate=False)
        if id(module) in wanted
    ]


def _kept_whole_scope(
    model: nn.Module,
    graph: DependencyGraph,
    targets: Mapping[int, str],
    ratios: Mapping[Scope, float] | None,
) -> tuple[dict[Scope, float], list[str]]:
    """``ratios`` with one ratio-0 scope over the layers that head the target groups.

    Selection puts a group under the scope of the module owning its first
    member, so that module's scope at ratio 0 keeps the group whole without
    freezing the module's inputs. Returns the new ratios and the reasons of
    groups kept whole only because they share that first layer.
    """
    tensors = named_tensors(model)
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    heads: dict[int, nn.Module] = {}
    for index in targets:
        owner = tensors[graph.groups[index].members[0][0]][0]
        if owner is model:
            raise MethodError(
                f"group {index} ({targets[index]}) starts at a parameter of the model itself, "
                "which no ratio can scope apart from the rest; move that parameter into a "
                "submodule, or pass skip_residual=False and no sensitive layers"
            )
        heads[id(owner)] = owner
    new_ratios: dict[Scope, float] = {}
    for scope, value in (ratios or {}).items():
        if isinstance(scope, tuple):
            rest = tuple(m for m in scope if id(m) not in heads)
            if rest:
                new_ratios[rest] = value
        elif id(scope) not in heads:
            new_ratios[scope] = value
    if heads:
        new_ratios[tuple(heads.values())] = 0.0
    prefixes = tuple(f"{names[key]}." for key in heads)
    alongside = [
        f"group {g.index} ({g.size} {g.kind or 'units'}, first member {g.members[0][0]}"
        f"[{g.members[0][1]}]) kept whole: its first layer also heads a group kept whole "
        "(skip_residual or sensitive)"
        for g in graph.groups
        if g.index not in targets and g.members[0][0].startswith(prefixes)
    ]
    return new_ratios, alongside


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float = 0.5,
    ratios: Mapping[Scope, float] | None = None,
    skip_residual: bool = True,
    sensitive: Iterable[nn.Module] = (),
    round_to: int | None = None,
    min_units: int = 1,
    global_ranking: bool = False,
    kinds: Iterable[str] | None = None,
    uniform: bool | None = None,
    strict: bool = False,
    count_macs: bool = True,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    progress: bool | None = None,
) -> PruneReport:
    """Prune ``model`` in place by filter L1 norm with a per-layer profile; returns the report.

    ``ratio`` is the fraction of filters removed from each layer, ``ratios``
    maps modules (or tuples of modules, ranked together) to their own ratio,
    as :func:`depprune.prune` takes them. ``skip_residual=True`` keeps whole
    every :func:`residual_groups` group (channels several layers with
    different inputs add into), as the paper prunes only the first layer of
    each residual block. ``sensitive`` lists layers (or modules
    holding them) that keep all their filters; the channels they read can
    still be pruned by the layers that make them. The remaining arguments are
    :func:`depprune.prune`'s. On any error the model is left as it was.

    Groups kept whole by ``skip_residual`` or ``sensitive`` are listed with the
    reason in ``report.kept_whole``.

    >>> import torch
    >>> class Residual(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem, self.first = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
    ...         self.second, self.head = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         x = self.stem(x)
    ...         return self.head(x + self.second(torch.relu(self.first(x))))
    >>> model = Residual()
    >>> report = prune(model, torch.randn(1, 3, 6, 6), ratio=0.5, progress=False)
    >>> model.stem.out_channels, model.first.out_channels
    (8, 4)
    >>> report.kept_whole[0]
    'group 0 (8 channels, first member stem.weight[0]) kept whole: written by stem.weight and second.weight, which read different inputs, and added (skip_residual=True)'
    """
    if not isinstance(skip_residual, bool):
        raise MethodError(
            f"skip_residual must be True (keep residual streams whole, as the paper) or False; "
            f"got {skip_residual!r}"
        )
    if isinstance(sensitive, nn.Module):
        sensitive = (sensitive,)
    if not isinstance(sensitive, Iterable) or not all(isinstance(m, nn.Module) for m in sensitive):
        raise MethodError(
            "sensitive must be an iterable of modules of the model (the layers that keep "
            f"their filters); got {sensitive!r}"
        )
    sensitive = tuple(sensitive)
    check_ratios(model, ratio, ratios, sensitive, round_to, min_units)
    graph = trace(model, example_inputs, strict=strict)
    ctx = ScoreContext.from_model(graph, model)
    targets: dict[int, str] = {}
    if skip_residual:
        for index, why in residual_groups(graph, model).items():
            targets[index] = f"{why} (skip_residual=True)"
    sensitive_prefixes = tuple(_modules_inside(model, sensitive))
    for group in graph.groups if sensitive_prefixes else ():
        made_by = [
            p.name
            for p in _all_producers(group, ctx.owners)
            if p.name.startswith(sensitive_prefixes)
        ]
        if made_by and group.index not in targets:
            targets[group.index] = (
                f"its filters are in sensitive layer {made_by[0].rpartition('.')[0]}"
            )
    new_ratios, alongside = _kept_whole_scope(model, graph, targets, ratios)
    report = structural_prune(
        model,
        graph=graph,
        ratio=ratio,
        importance=filter_l1,
        ratios=new_ratios,
        round_to=round_to,
        min_units=min_units,
        global_ranking=global_ranking,
        kinds=kinds,
        uniform=uniform,
        strict=strict,
        count_macs=count_macs,
        optimizers=optimizers,
        progress=progress,
    )
    report.kept_whole = [
        *(
            f"group {index} ({graph.groups[index].size} {graph.groups[index].kind or 'units'}, "
            f"first member {graph.groups[index].members[0][0]}[{graph.groups[index].members[0][1]}]"
            f") kept whole: {why}"
            for index, why in sorted(targets.items())
        ),
        *alongside,
        *report.kept_whole,
    ]
    return report
