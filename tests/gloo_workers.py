"""Two CPU processes over gloo, as the distributed tests run them: spawn, wait, collect reports."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest


def run_workers(worker: Callable[..., None], folder: str, *, ranks: int = 2, limit_s: float = 180):
    """Run ``worker(rank, store_path, folder)`` on ``ranks`` processes; each rank's JSON report.

    Every worker writes ``folder/<rank>.json``; a worker still running after
    ``limit_s`` is killed and the test fails with a timeout.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    mp = pytest.importorskip("torch.multiprocessing")
    context = mp.start_processes(
        worker,
        args=(os.path.join(folder, "store"), folder),
        nprocs=ranks,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + limit_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {ranks} gloo workers did not finish in {limit_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    reports = []
    for rank in range(ranks):
        with open(os.path.join(folder, f"{rank}.json")) as f:
            reports.append(json.load(f))
    return reports
