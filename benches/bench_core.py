"""Time the core through its Python binding on Llama-shaped equation sets.

Measures what a user pays from Python: building the flat arrays from an
``AxisEquations`` and solving them, for the equations a trace of a
Llama-style decoder writes (GQA, RoPE, SwiGLU), at several depths up to the
Llama-3-70B shape (80 layers, hidden 8192, 64 heads, 8 KV heads,
intermediate 28672), then the kept indices of a 50% plan.

Run: ``python benches/bench_core.py`` (after ``pip install .``).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import depprune
from depprune.synthetic import llama_equations


def best_of(repeats: int, work) -> float:
    """The fastest of ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"depprune {depprune.__version__}, numpy {np.__version__}, Python {platform.python_version()}"
    )
    print(f"CPU: {platform.processor() or platform.machine()}")
    print(
        f"{'layers':>6} {'equations':>10} {'solve ms':>9} {'eq/s':>10} {'kept ms':>8} {'groups':>7}"
    )
    for layers in (2, 8, 32, 80):
        eqs = llama_equations(
            layers=layers, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256
        )
        solve = best_of(args.repeats, eqs.solve)
        graph = eqs.solve()
        removed = {g.index: np.arange(g.size // 2) for g in graph.groups}
        mask = graph.keep_mask(removed)
        kept = best_of(args.repeats, lambda graph=graph, mask=mask: graph.kept_indices(mask))
        print(
            f"{layers:>6} {eqs.num_equations:>10,} {solve * 1e3:>9.2f} "
            f"{eqs.num_equations / solve:>10,.0f} {kept * 1e3:>8.1f} {len(graph.groups):>7}"
        )


if __name__ == "__main__":
    main()
