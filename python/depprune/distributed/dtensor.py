"""Apply and score stages, sharded tensors: DTensor cuts per shard, FSDP2 re-wrap, reduced sums.

A parameter sharded as a ``DTensor`` (FSDP2's ``fully_shard``, tensor
parallel) is cut by every rank on its own shard: a dim that is not sharded
is cut locally; along a sharded dim each rank keeps the kept indices inside
its range, the ranks of that mesh dim gather only those kept slices, and each
takes its chunk of the result (DTensor's and FSDP2's even ``torch.chunk``
layout, which an uneven count of kept indices needs). After the swap,
:func:`refresh_sharded` re-derives FSDP2's per-parameter bookkeeping (padded
shard sizes, the all-gather layout) from the new shapes, the way FSDP2 does
after a meta-device init, so training continues. :func:`dim_sums` gives the
per-index sums an importance reads, each rank summing its shard and the
sums reduced over the sharding ranks with ``all_reduce``. For the trace,
:func:`sharding_memo` and :func:`strip_sharding` let the meta shadow of a
sharded model be a plain model of global shapes (FSDP2's modules as their
own classes without its hooks, TP modules with their class's forward).
When a rank keeps exactly its new chunk (a tensor-parallel plan), nothing
is gathered.

Without torch.distributed tensors in the process every function here is a
no-op and nothing of torch.distributed is imported.

>>> import torch
>>> is_dtensor(torch.zeros(2)), refresh_sharded(torch.nn.Linear(2, 2))() is None
(False, True)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from depprune.errors import PlanMismatchError

__all__ = [
    "cut_dtensor",
    "dim_sums",
    "is_dtensor",
    "refresh_sharded",
    "reshard_registered",
    "sharding_memo",
    "strip_sharding",
]


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it).

    >>> is_dtensor(torch.zeros(1))
    False
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _shard_dims(tensor: torch.Tensor) -> dict[int, int]:
    """Tensor dim -> the mesh dim sharding it; refuses layouts a per-shard cut cannot keep."""
    from torch.distributed.tensor import Replicate, Shard

    sharded: dict[int, int] = {}
    for mesh_dim, placement in enumerate(tensor.placements):
        if type(placement) is Shard and placement.dim not in sharded:
            sharded[placement.dim] = mesh_dim
        elif not isinstance(placement, Replicate):
            raise PlanMismatchError(
                f"a DTensor placed as {tuple(tensor.placements)} cannot be cut shard by shard "
                "(only Shard(d) once per dim and Replicate are); redistribute it to plain "
                "Shard/Replicate placements before pruning"
            )
    return sharded


def _chunk_starts(size: int, ranks: int) -> np.ndarray:
    """Where each rank's chunk starts in torch.chunk's layout (DTensor's and FSDP2's), and the end."""
    chunk = math.ceil(size / ranks) if size else 0
    return np.minimum(np.arange(ranks + 1) * chunk, size)


def cut_dtensor(tensor: torch.Tensor, cuts: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """A DTensor keeping ``cuts[dim]`` (global, sorted indices) along each dim, same placements.

    Collective over the ranks of each mesh dim that shards a cut dim: every
    rank calls it with the same cuts. Peak memory on a rank: its shard plus
    the kept slices of the sharded dim (gathered, then this rank's chunk kept).
    """
    from torch.distributed import all_gather
    from torch.distributed.tensor import DTensor

    mesh, placements = tensor.device_mesh, tensor.placements
    sharded = _shard_dims(tensor)
    local = tensor.to_local()
    shape = list(tensor.shape)
    for dim, index in sorted(cuts.items()):
        index = index.to(local.device)
        if dim not in sharded:
            local = local.index_select(dim, index)
        else:
            mesh_dim = sharded[dim]
            ranks, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
            starts = _chunk_starts(shape[dim], ranks)
            bounds = np.searchsorted(index.cpu().numpy(), starts)
            mine = index[bounds[rank] : bounds[rank + 1]] - int(starts[rank])
            counts = np.diff(bounds)
            new_starts = _chunk_starts(index.numel(), ranks)
            if np.array_equal(counts, np.diff(new_starts)):
                # Every rank keeps exactly its new chunk (a tensor-parallel plan): no gather.
                local = local.index_select(dim, mine)
                shape[dim] = index.numel()
                continue
            # The kept slices, padded to the largest count: all_gather needs equal sizes.
            piece = local.index_select(dim, mine).movedim(dim, 0)
            padded = piece.new_zeros((int(counts.max(initial=0)), *piece.shape[1:]))
            padded[: piece.shape[0]] = piece
            gathered = [torch.empty_like(padded) for _ in range(ranks)]
            all_gather(gathered, padded.contiguous(), group=mesh.get_group(mesh_dim))
            kept = torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)])
            start, stop = int(new_starts[rank]), int(new_starts[rank + 1])
            local = kept[start:stop].movedim(0, dim)
        shape[dim] = index.numel()
    local = local.contiguous()
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def dim_sums(
    tensor: torch.Tensor,
    transform: Callable[[torch.Tensor, slice], torch.Tensor],
    local_sums: Callable[..., list[torch.Tensor]],
) -> list[torch.Tensor]:
    """Per-dim sums of ``transform(tensor)`` over a DTensor: each rank its shard, then all_reduce.

    ``local_sums(local, transform)`` sums a plain tensor; ``transform`` sees
    global row numbers. Every rank gets the sums of the whole tensor.
    """
    from torch.distributed import ReduceOp, all_reduce
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = tensor.device_mesh, tensor.placements
    sharded = _shard_dims(tensor)
    local = tensor.to_local()
    _, offsets = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    first_row = offsets[0] if tensor.dim() else 0

    def global_rows(rows: torch.Tensor, part: slice) -> torch.Tensor:
        return transform(rows, slice(part.start + first_row, part.stop + first_row))

    partial = local_sums(local, global_rows)
    placed = torch.zeros(sum(tensor.shape), dtype=torch.float32, device=local.device)
    start = 0
    for dim, size in enumerate(tensor.shape):
        where = start + offsets[dim]
        placed[where : where + local.shape[dim]] = partial[dim]
        start += size
    # Each sharding mesh dim splits the tensor: its ranks' partial sums add up.
    for mesh_dim in sorted(set(sharded.values())):
        all_reduce(placed, op=ReduceOp.SUM, group=mesh.get_group(mesh_dim))
    return list(placed.split(list(tensor.shape)))


def sharding_memo(model: nn.Module, memo: dict[int, object]) -> None:
    """Add to a shadow's deep-copy ``memo`` plain twins of the modules FSDP2 wrapped.

    FSDP2 refuses ``deepcopy`` and its hooks are methods of its per-module
    state (process groups, all-gather buffers), meaningless on a meta copy:
    each wrapped module's twin is its original class with a deep copy of its
    attributes (``memo`` maps its DTensors to meta tensors), without those
    hooks. Innermost first, so an outer twin's copy finds the inner ones.

    >>> memo = {}
    >>> sharding_memo(torch.nn.Linear(2, 2), memo)
    >>> memo
    {}
    """
    import copy

    wrapped = _fsdp_modules(model)
    if not wrapped:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in wrapped:
        for hooks in (
            module._forward_pre_hooks,
            module._forward_pre_hooks_with_kwargs,
            module._forward_hooks,
            module._forward_hooks_with_kwargs,
            module._forward_hooks_always_called,
        ):
            memo[id(hooks)] = type(hooks)()
        for key, value in vars(module).items():
            if key.startswith("__composable_api_state_key"):  # where FSDP2 keeps its state
                memo[id(value)] = type(value)()
    for module in reversed(wrapped):  # modules() lists parents before their children
        plain = next(base for base in type(module).__bases__ if base is not FSDPModule)
        twin = plain.__new__(plain)
        memo[id(module)] = twin
        twin.__dict__.update(copy.deepcopy(module.__dict__, memo))


def strip_sharding(shadow: nn.Module) -> nn.Module:
    """Make a shadow copy of a tensor-parallel model a plain one, in place: the forwards
    that tensor parallelism installed on instances (transformers' ``tp_plan`` styles,
    which redistribute DTensors) are dropped, so each module runs its class's forward.

    >>> strip_sharding(torch.nn.Linear(2, 2)).__class__.__name__
    'Linear'
    """
    if "torch.distributed.tensor" not in sys.modules:
        return shadow  # nothing of this process was ever sharded
    for module in shadow.modules():
        if getattr(module, "_is_hooked", False) and "forward" in vars(module):
            del module.__dict__["forward"]  # the TP wrapper; the class's forward stays
            del module.__dict__["_is_hooked"]
    return shadow


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    if "torch.distributed.fsdp" not in sys.modules:
        return []  # FSDP2 never imported: no module of this process can be wrapped
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard_registered(model: nn.Module) -> None:
    """Make FSDP2 modules hold their sharded parameters (a forward may leave them unsharded).

    >>> reshard_registered(torch.nn.Linear(2, 2))
    """
    for module in _fsdp_modules(model):
        module.reshard()


def refresh_sharded(model: nn.Module) -> Callable[[], None]:
    """Re-derive FSDP2's bookkeeping of every parameter the cut swapped; gives the undo.

    FSDP2 keeps, per parameter, the original size, the padded shard size and
    the all-gather buffers. They are rebuilt from the new shape as after a
    meta-device ``fully_shard``, and the new sharded parameter is installed
    with :meth:`FSDPParam.reset_sharded_param`, which pads an uneven shard.
    """
    saved: list[tuple[object, dict]] = []

    def undo() -> None:
        for fsdp_param, state in reversed(saved):
            fsdp_param.__dict__.clear()
            fsdp_param.__dict__.update(state)
            fsdp_param._setattr_on_modules(fsdp_param.sharded_param)

    for module in _fsdp_modules(model):
        state = module._get_fsdp_state()
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                new = info.module._parameters[info.param_name]
                if new is fsdp_param.sharded_param:
                    continue
                saved.append((fsdp_param, dict(fsdp_param.__dict__)))
                try:
                    _reinit(fsdp_param, new)
                except BaseException:
                    undo()
                    raise
    return undo


def _reinit(fsdp_param, new: nn.Parameter) -> None:
    if getattr(fsdp_param, "is_dtensor", False) or getattr(fsdp_param, "is_spmd_types", False):
        raise PlanMismatchError(
            "cutting an FSDP2 parameter that is itself a DTensor (FSDP over tensor "
            "parallel) is not supported yet; prune before applying tensor parallelism"
        )
    placement = fsdp_param.fsdp_placement
    shape = nn.Parameter(
        torch.empty(new.shape, dtype=new.dtype, device="meta"), requires_grad=new.requires_grad
    )
    for attr in ("_unsharded_param", "_sharded_post_forward_param_data"):
        fsdp_param.__dict__.pop(attr, None)
    fsdp_param.all_gather_outputs = []
    fsdp_param._init_sharded_param(
        shape, fsdp_param.device, lambda _: placement, fsdp_param.mesh_info
    )
    if fsdp_param.post_forward_mesh_info:
        fsdp_param._init_sharded_post_forward_param_metadata(shape)
    fsdp_param._setattr_on_modules(new)
    fsdp_param.reset_sharded_param()
