"""What a group's units are: hidden size, heads, head_dim, neurons, channels or conv groups.

The kind is read from the unit maps, not from model-specific code: a unit
that covers a run of consecutive indices in some parameter is a whole head
(or a whole conv group) when another group subdivides that run; a unit
that appears several times in every parameter but norms, one index at a
time, is a slot inside heads (head_dim, even with per-head q/k norms);
otherwise a group with an embedding or a layer/RMS norm among its members
is the hidden size.

>>> import torch, depprune
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> graph = depprune.trace(model, torch.zeros(1, 4))
>>> group_kind(graph.groups[0], graph, model)
'neurons'
"""

from __future__ import annotations

import numpy as np
from torch import nn

from depprune.graph import DependencyGraph, Group

__all__ = ["KINDS", "group_kind", "group_kinds", "params_per_unit"]

#: Every kind :func:`group_kind` returns.
KINDS = ("hidden", "heads", "head_dim", "neurons", "channels", "conv_groups")


def _is_hidden_norm(module: nn.Module | None) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.modules.normalization.RMSNorm)):
        return True
    return module is not None and type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def group_kinds(graph: DependencyGraph, model: nn.Module) -> dict[int, str]:
    """The kind of every group of ``graph``, by group index.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
    ...                             torch.nn.Conv2d(8, 4, 1))
    >>> graph = depprune.trace(model, torch.zeros(1, 3, 8, 8))
    >>> group_kinds(graph, model)
    {0: 'channels'}
    """
    modules = dict(model.named_modules())
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    shared: dict[tuple[str, int], int] = {}
    for group in graph.groups:
        for member in group.members:
            shared[member] = shared.get(member, 0) + 1
    return {g.index: _kind(g, graph, modules, params, shared) for g in graph.groups}


def group_kind(group: Group, graph: DependencyGraph, model: nn.Module) -> str:
    """The kind of ``group``'s units in ``model``: one of :data:`KINDS`."""
    return group_kinds(graph, model)[group.index]


def _kind(
    group: Group,
    graph: DependencyGraph,
    modules: dict[str, nn.Module],
    params: set[str],
    shared: dict[tuple[str, int], int],
) -> str:
    owners = {name: modules.get(name.rpartition(".")[0]) for name, _ in group.members}
    if any(isinstance(m, nn.Embedding) for m in owners.values()):
        return "hidden"
    is_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in owners.values())
    fewest_copies = None
    whole_runs = None
    for (name, dim), unit_map in graph.unit_maps(group).items():
        if name not in params:
            continue  # buffers such as RoPE's inv_freq hold one entry per unit
        on = unit_map >= 0
        # A unit over a run of indices that another group subdivides is a whole head;
        # a run over frozen positions (channels flattened with space) is not.
        runs = np.any(on[1:] & (unit_map[1:] == unit_map[:-1]))
        if runs and shared[(name, dim)] > 1:
            # Runs in a linear layer too are heads (Mamba2's, next to a depthwise conv's
            # groups); runs only in convs and their norms are conv groups.
            if isinstance(owners[name], nn.Linear):
                return "heads"
            whole_runs = "conv_groups" if is_conv else "heads"
            continue
        if _is_hidden_norm(owners[name]):
            continue  # a per-head q/k norm holds one entry per head_dim slot
        copies = int(np.bincount(unit_map[on], minlength=group.size).min())
        fewest_copies = copies if fewest_copies is None else min(fewest_copies, copies)
    if whole_runs is not None:
        return whole_runs
    if is_conv:
        return "channels"  # also the same slot of every group of a grouped conv
    if fewest_copies is not None and fewest_copies > 1:
        return "head_dim"
    if any(_is_hidden_norm(m) for m in owners.values()):
        return "hidden"
    return "neurons"


def params_per_unit(graph: DependencyGraph, model: nn.Module) -> dict[int, int]:
    """Parameters removed with one unit of each group (tied parameters counted once).

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    >>> params_per_unit(depprune.trace(model, torch.zeros(1, 4)), model)  # 4 + 1 in, 2 out
    {0: 7}
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    counts: dict[int, int] = {}
    for group in graph.groups:
        seen: set[tuple[int, int]] = set()
        total = 0
        for (name, dim), unit_map in graph.unit_maps(group).items():
            param = tensors.get(name)
            if param is None or (id(param), dim) in seen:
                continue
            seen.add((id(param), dim))
            # Each index of this dim carries numel / size parameters.
            total += int(np.count_nonzero(unit_map >= 0)) * (param.numel() // param.shape[dim])
        counts[group.index] = total // group.size
    return counts
