"""Large and distributed models: plans applied where each tensor lives.

Three layouts, one module each: :mod:`~depprune.distributed.accelerate`
(accelerate's ``device_map`` dispatch with CPU and disk offload: offloaded
tensors are read for scoring and cut in their offload storage) and
:mod:`~depprune.distributed.dtensor` (DTensor / FSDP2 shards: each rank cuts
its shard, importance sums are reduced across ranks) and
:mod:`~depprune.distributed.tensor_parallel` (tensor-parallel ranks: plans
that keep every rank's share equal, per-rank checkpoint folders cut with
:func:`apply_to_tp_shards`). The apply stage calls
them per tensor kind, so ``plan.apply(model)`` is the same call for every
layout. :func:`broadcast_plan` hands one rank's plan to every rank.

>>> import torch, depprune
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> plan = depprune.make_plan(model, torch.zeros(1, 4), ratio=0.5)
>>> broadcast_plan(plan).fingerprint() == plan.fingerprint()  # one process: the plan itself
True
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from depprune.plan import Plan

from depprune.distributed.tensor_parallel import TensorParallel, apply_to_tp_shards

__all__ = ["TensorParallel", "apply_to_tp_shards", "broadcast_plan"]


def broadcast_plan(plan: Plan | None, *, src: int = 0, group: Any = None) -> Plan:
    """The plan of rank ``src`` on every rank of ``group`` (others pass ``None``).

    Rank ``src`` saves the plan file's bytes and broadcasts them; each rank
    loads them (every field checked, as :meth:`Plan.load` does). Without an
    initialised process group the plan is returned as it is.
    """
    import torch.distributed as dist

    from depprune.errors import InvalidPlanError
    from depprune.plan import Plan

    if not (dist.is_available() and dist.is_initialized()):
        if plan is None:
            raise InvalidPlanError("broadcast_plan got no plan and no process group to receive one")
        return plan
    rank = dist.get_rank()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "plan.npz")
        payload: list[bytes | None] = [None]
        if rank == src:
            if plan is None:
                raise InvalidPlanError(f"broadcast_plan needs the plan on rank {src}")
            plan.save(path)
            with open(path, "rb") as f:
                payload = [f.read()]
        dist.broadcast_object_list(payload, src=src, group=group)
        if rank == src:
            return plan  # type: ignore[return-value]
        with open(path, "wb") as f:
            f.write(io.BytesIO(payload[0]).getvalue())  # type: ignore[arg-type]
        return Plan.load(path)
