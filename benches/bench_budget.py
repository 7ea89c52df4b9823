"""Budget search on Llama-3 8B and 70B shapes (meta device): time, widths, exactness.

For each shape (``transformers.LlamaConfig``, vocab 128256, bf16, built on
``torch.device("meta")``: no weight exists) and each target, this prints the
widths :func:`depprune.budget.search` chooses, its cost, the cost of the
model cut by the plan built from it (``make_plan(graph=..., **result.
make_plan_kwargs())``, proved by make_plan's replay, then ``plan.apply`` to a
copy of the meta model, parameters counted), the same for the exact kept
indices of the selection (``Plan.from_kept``), the miss under the target and
the cost one step of the finest width higher (which must exceed the target).
Memory is checked against a hand formula on the pruned model's config: the
weights in bf16 plus ``2 x layers x kv_heads x head_dim x batch x seq_len``
bf16 values of KV cache.

Run: ``python benches/bench_budget.py`` (about a minute; ``--round-to 1`` for
unrounded widths, ``--json PATH`` to keep the rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
import transformers

import depprune
from depprune.budget import search
from depprune.depth import given_layers
from depprune.plan import Plan
from depprune.selection import lowest

SHAPES = {
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}  # fmt: skip
TARGETS = {
    "8B": [({"params": 4e9}, None), ({"params": 6e9}, None), ({"memory_gb": 10.0}, None),
           ({"params": 4e9}, ("hidden", "heads", "neurons", "layers"))],
    "70B": [({"params": 35e9}, None), ({"memory_gb": 80.0}, None)],
}  # fmt: skip
BATCH, SEQ_LEN = 1, 4096


def build(shape: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128256, max_position_embeddings=8192, **SHAPES[shape]
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def memory_gb(model: torch.nn.Module) -> float:
    """bf16 weights plus the KV cache, from the pruned model's own config."""
    c = model.config
    cache = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * BATCH * SEQ_LEN
    return (count(model) + cache) * 2 / 1e9


def exact_cut(model: torch.nn.Module, result) -> int:
    """Parameters after cutting the selection's kept indices directly (widths only)."""
    graph = result.graph
    removed = {
        g: lowest(torch.zeros(graph.groups[g].size), graph.groups[g].size - kept)
        for g, kept in result.keep_units.items()
        if kept < graph.groups[g].size
    }
    twin = copy.deepcopy(model)
    Plan.from_kept(model, graph.kept_indices(removed)).apply(twin, verify=False)
    return count(twin)


def run(shape: str, round_to: int) -> list[dict]:
    model = build(shape)
    x = torch.zeros(1, 8, dtype=torch.long)
    started = time.perf_counter()
    graph = depprune.trace(model, x)
    trace_s = time.perf_counter() - started
    rows = []
    for target, kinds in TARGETS[shape]:
        result = search(model, x, target, graph=graph, round_to=round_to, kinds=kinds,
                        dtype=torch.bfloat16, batch=BATCH, seq_len=SEQ_LEN)  # fmt: skip
        kwargs = result.make_plan_kwargs()
        if "layers" in result.ratios:
            # On meta, make_plan needs the layers named: the deepest ones but the last.
            gone = 32 - result.chosen.widths["layers"]
            kwargs["layer_importance"] = given_layers(
                model, x, {"model.layers": range(31 - gone, 31)}
            )
        started = time.perf_counter()
        # Meta weights have no values: any units of the chosen counts (the cost is the same).
        importance = depprune.importance.random(0)
        plan = depprune.make_plan(
            model, graph=graph, importance=importance, progress=False, **kwargs
        )
        twin = copy.deepcopy(model)
        plan.apply(twin)
        plan_s = time.perf_counter() - started
        (metric, bound), = target.items()  # fmt: skip
        rows.append(
            {
                "shape": shape,
                "target": f"{metric} <= {bound:g}",
                "kinds": ",".join(result.kinds),
                "widths": result.chosen.widths,
                "cost": result.chosen.costs[metric],
                "make_plan": count(twin) if metric != "memory_gb" else memory_gb(twin),
                "kept_indices": exact_cut(model, result) if "layers" not in result.ratios else None,
                "params": result.chosen.costs["params"],
                "miss": result.miss(metric),
                "next_step": result.next_step.get(metric),
                "trace_s": trace_s,
                "search_s": result.seconds,
                "plan_s": plan_s,
                "feasible": result.feasible,
            }
        )
        print(result, flush=True)
    return rows


def fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} GB" if metric == "memory_gb" else f"{value / 1e9:.4f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-to", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [row for shape in SHAPES for row in run(shape, args.round_to)]
    print(f"\nround_to={args.round_to}, bf16, KV cache batch {BATCH} x {SEQ_LEN} tokens; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'shape':<5} {'target':<22} {'widths':<62} {'chosen':>12} {'make_plan':>12} "
          f"{'kept idx':>12} {'miss':>12} {'next step':>12} {'trace':>6} {'search':>7}")  # fmt: skip
    for r in rows:
        metric = r["target"].split()[0]
        widths = " ".join(f"{k}={v}" for k, v in r["widths"].items())
        kept = fmt(r["kept_indices"], "params") if metric != "memory_gb" else "-"
        print(f"{r['shape']:<5} {r['target']:<22} {widths:<62} {fmt(r['cost'], metric):>12} "
              f"{fmt(r['make_plan'], metric):>12} {kept:>12} {fmt(r['miss'], metric):>12} "
              f"{fmt(r['next_step'], metric):>12} {r['trace_s']:>5.2f}s {r['search_s']:>6.2f}s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
