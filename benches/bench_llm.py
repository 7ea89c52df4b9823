"""depprune against Torch-Pruning on random-weight Llama models, in one run.

Every measurement runs in its own child process (this script with
``--child``), so that its peak RSS is its own and a hang is recorded as
"did not finish in N s" instead of stopping the run. The child builds the
model (not timed), says it is ready, and the time limit counts from there.

Shapes (``transformers.LlamaForCausalLM``, random weights, no download):

- ``w256``: hidden 256, intermediate 688, 8 heads of 32, vocab 1000, fp32,
  multi-head attention, 2 to 128 layers: the speed comparison.
- ``w256-gqa``: the same with 4 KV heads, 2 layers: Torch-Pruning 1.6 does not
  finish ``get_all_groups`` when there are 2 query heads per KV head.
- ``llama3-8b``: hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab
  128256, bf16: 32 layers (16 GB of weights) and, so that Torch-Pruning's
  working memory fits beside the weights, 16 layers.
- ``llama3-70b``: hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 KV
  heads, vocab 128256 on the meta device: depprune trace + plan only.

Tasks: ``analysis`` is graph + groups (depprune: ``depprune.trace``;
Torch-Pruning: ``DependencyGraph().build_dependency`` + ``get_all_groups``);
``prune`` is the full 50% prune with L2 magnitude (depprune: trace,
``make_plan``, ``plan.apply``; Torch-Pruning: ``MetaPruner`` with
``MagnitudeImportance(p=2)``, then ``step``, then its example's config
fix-up). Both prune the hidden size, whole attention heads (Torch-Pruning:
``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False``,
``head_pruning_ratio=0.5``) and MLP neurons, never the vocabulary
(Torch-Pruning: ``ignored_layers=[lm_head]``; depprune: the logits are a model
output, so the vocabulary axis is frozen and lm_head only loses input columns).

Run: ``python benches/bench_llm.py`` (about an hour; needs ``pip install
".[bench,hf]"``); ``--quick`` is a smoke run (2 and 8 layers, no 8B or 70B);
``--profile 32`` prints where ``depprune.trace`` spends its time instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RATIO = 0.5
KINDS = ("hidden", "heads", "neurons")
SEQUENCE_LENGTH = 8
WIDTH_256_LAYERS = (2, 8, 32, 64, 128)
QUICK_LAYERS = (2, 8)
READY = "BENCH_READY"
MEMORY_FLOOR = 256 * 2**20  # bytes of available memory below which a child is stopped
NOTES = [
    "Both libraries prune the hidden size, whole attention heads and MLP neurons by 50%, "
    "never the vocabulary; the parameter counts after pruning agree (params_after).",
    "Torch-Pruning 1.6 with transformers 5.23 does not finish get_all_groups on a Llama "
    "with 2 query heads per KV head (8/4, 16/8 and 32/16 heads tried; 8/2, 16/4 and "
    "32/8 finish), so w256-gqa (8 heads, 4 KV heads) runs it under --gqa-timeout.",
    f"A child is stopped when the machine has under {MEMORY_FLOOR >> 20} MiB available, "
    "or killed by the kernel's OOM killer: 'out of memory at N GiB'. The llama3-8b rows at "
    "16 layers compare both libraries at the Llama-3-8B width with room to spare.",
    "Peak RSS is the child's ru_maxrss: interpreter, torch, transformers and the model "
    "included (rss_ready is the RSS once the model is built); for runs that did not finish "
    "it is sampled every 50 ms by the parent.",
]
RESULT = "BENCH_RESULT "
#: depprune's prune with ``plan.apply(model, low_memory=True)``: one tensor swapped at a time.
PRUNE_LOW_MEMORY = "prune, low_memory"

SHAPES: dict[str, dict[str, Any]] = {
    "w256": dict(hidden=256, intermediate=688, heads=8, kv_heads=8, vocab=1000, dtype="float32"),
    "w256-gqa": dict(
        hidden=256, intermediate=688, heads=8, kv_heads=4, vocab=1000, dtype="float32"
    ),
    "llama3-8b": dict(
        hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, dtype="bfloat16"
    ),
    "llama3-70b": dict(
        hidden=8192,
        intermediate=28672,
        heads=64,
        kv_heads=8,
        vocab=128256,
        dtype="bfloat16",
        device="meta",
    ),
}


# --------------------------------------------------------------------------- child side


def build_model(shape: str, layers: int):
    """A random-weight LlamaForCausalLM: built on meta, then one seeded block tiled in.

    The default init of 8B parameters takes minutes on a 2-core machine; copying
    one random block (a prime number of elements, so rows differ) takes seconds.
    """
    import torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    spec = SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        use_cache=False,  # Torch-Pruning traces the grad_fn of every output; a cache has none.
    )
    dtype = getattr(torch, spec["dtype"])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    if spec.get("device") == "meta":
        return model, torch.zeros((1, SEQUENCE_LENGTH), dtype=torch.long, device="meta")
    model.to_empty(device="cpu")
    block = torch.empty(1_000_003, dtype=dtype)
    block.uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # RMSNorm weights
                param.fill_(1.0)
                continue
            flat = param.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                piece = flat[start : start + block.numel()]
                piece.copy_(block[: piece.numel()])
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers are computed
    tokens = torch.randint(
        0, spec["vocab"], (1, SEQUENCE_LENGTH), generator=torch.Generator().manual_seed(0)
    )
    return model, tokens


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_depprune(task: str, model, tokens) -> dict[str, Any]:
    import depprune

    inputs = {"input_ids": tokens}
    phases: dict[str, float] = {}
    start = time.perf_counter()
    graph = depprune.trace(model, inputs)
    phases["trace"] = time.perf_counter() - start
    out: dict[str, Any] = {"groups": len(graph.groups)}
    if task in ("prune", PRUNE_LOW_MEMORY):
        mark = time.perf_counter()
        on_meta = tokens.is_meta
        importance = depprune.importance.random(0) if on_meta else None
        plan = depprune.make_plan(
            model, graph=graph, ratio=RATIO, kinds=KINDS, importance=importance
        )
        phases["make_plan"] = time.perf_counter() - mark
        if not on_meta:
            mark = time.perf_counter()
            plan.apply(model, low_memory=task == PRUNE_LOW_MEMORY)
            phases["apply"] = time.perf_counter() - mark
        else:
            out["params_planned"] = plan.params_after(model)
    out["seconds"] = time.perf_counter() - start
    out["phases"] = phases
    return out


def run_torch_pruning(task: str, model, tokens) -> dict[str, Any]:
    import torch_pruning as tp
    from torch import nn

    phases: dict[str, float] = {}
    start = time.perf_counter()
    if task == "analysis":
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=tokens)
        phases["build_dependency"] = time.perf_counter() - start
        mark = time.perf_counter()
        groups = list(
            graph.get_all_groups(
                ignored_layers=list(model.lm_head.modules()),
                root_module_types=[nn.Conv2d, nn.Linear, nn.LSTM],  # MetaPruner's default
            )
        )
        phases["get_all_groups"] = time.perf_counter() - mark
        return {"seconds": time.perf_counter() - start, "phases": phases, "groups": len(groups)}
    # The recipe of Torch-Pruning's examples/LLMs/prune_llm.py, with L2 magnitude.
    config = model.config
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=tokens,
        importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=False,
        pruning_ratio=RATIO,
        ignored_layers=[model.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=RATIO,
    )
    phases["MetaPruner()"] = time.perf_counter() - start
    mark = time.perf_counter()
    for group in pruner.step(interactive=True):
        group.prune()
    phases["step"] = time.perf_counter() - mark
    is_gqa = config.num_attention_heads != config.num_key_value_heads
    config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            config.num_attention_heads = module.q_proj.out_features // module.head_dim
            if not is_gqa:
                config.num_key_value_heads = config.num_attention_heads
            else:
                config.num_key_value_heads = module.k_proj.out_features // module.head_dim
            module.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        elif name.endswith("mlp"):
            config.intermediate_size = module.gate_proj.out_features
    return {"seconds": time.perf_counter() - start, "phases": phases}


def run_copy_floor(model) -> dict[str, Any]:
    """The memory floor of a cut: plain torch copies of every weight (read + write), best of
    two passes; each destination is allocated once, outside the timing."""
    import torch

    params = [p.detach() for p in model.parameters()]
    buffers: dict[tuple, torch.Tensor] = {}
    for param in params:
        buffers.setdefault((tuple(param.shape), param.dtype), torch.empty_like(param))
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for param in params:
            buffers[(tuple(param.shape), param.dtype)].copy_(param)
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "copied_bytes": 2 * model_bytes(model)}


def set_threads() -> None:
    import torch

    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


def child(spec: dict[str, Any]) -> None:
    import torch

    set_threads()
    start = time.perf_counter()
    model, tokens = build_model(spec["shape"], spec["layers"])
    out: dict[str, Any] = {
        "build_seconds": time.perf_counter() - start,
        "params_before": count_params(model),
        "model_bytes": model_bytes(model),
        "rss_ready": rss_now(),
        "threads": torch.get_num_threads(),
        "depprune_commit": depprune_commit(),
    }
    print(READY, flush=True)
    if spec["library"] == "depprune":
        out |= run_depprune(spec["task"], model, tokens)
    elif spec["library"] == "floor":
        out |= run_copy_floor(model)
    else:
        out |= run_torch_pruning(spec["task"], model, tokens)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if spec["task"] not in ("analysis", "copy") and not tokens.is_meta:
        # Not timed: the pruned model must still run and say how big it is.
        out["params_after"] = count_params(model)
        layer = model.model.layers[0]
        out["layer0_shapes"] = {
            name: list(getattr(layer, part).get_submodule(name).weight.shape)
            for part, names in (("self_attn", "q_proj k_proj v_proj o_proj"), ("mlp", "gate_proj"))
            for name in names.split()
        }
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
        out["logits_shape"] = list(logits.shape)
    print(RESULT + json.dumps(out), flush=True)


def depprune_commit() -> str:
    """The checkout's commit, with ``+dirty`` when the package or core has local changes."""
    try:
        git = ["git", "-C", str(HERE.parent)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "python", "rust"], capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if changed.stdout.strip() else "") or "unknown"


def rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- parent side


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a child; ``timeout`` counts from when the model is built."""
    import psutil

    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    lines: queue.Queue[str] = queue.Queue()
    errors: list[str] = []
    threading.Thread(target=lambda: [lines.put(s) for s in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    watched = psutil.Process(proc.pid)
    polled_peak = 0
    ready_at = None
    result: dict[str, Any] | None = None
    status = "error"
    while True:
        try:
            polled_peak = max(polled_peak, watched.memory_info().rss)
        except psutil.Error:
            pass
        if psutil.virtual_memory().available < MEMORY_FLOOR and proc.poll() is None:
            proc.kill()  # before the kernel's OOM killer picks a process of someone else
            proc.wait()
            status = "oom"
            break
        try:
            while True:
                line = lines.get_nowait()
                if line.startswith(READY):
                    ready_at = time.monotonic()
                elif line.startswith(RESULT):
                    result = json.loads(line[len(RESULT) :])
        except queue.Empty:
            pass
        if proc.poll() is not None:
            time.sleep(0.2)  # let the reader threads drain the pipes
            while not lines.empty():
                line = lines.get()
                if line.startswith(RESULT):
                    result = json.loads(line[len(RESULT) :])
            status = "ok" if result is not None and proc.returncode == 0 else "error"
            if proc.returncode == -9:
                status = "oom"  # SIGKILL that this script did not send: the OOM killer
            break
        if ready_at is not None and time.monotonic() - ready_at > timeout:
            proc.kill()
            proc.wait()
            status = "timeout"
            break
        time.sleep(0.05)
    out = dict(spec, status=status, timeout=timeout)
    if result is not None:
        out |= result
    if status == "timeout":
        out["peak_rss"] = polled_peak  # sampled every 50 ms: a lower bound
    elif status != "ok":
        out["error"] = f"exit code {proc.returncode}: " + "".join(errors[-20:]).strip()
        out["peak_rss"] = polled_peak
    return out


def best_of(spec: dict[str, Any], timeout: float, repeats: int) -> dict[str, Any]:
    """Fastest of up to ``repeats`` children; repeats stop once runs add up to 60 s."""
    best = None
    spent = 0.0
    peak = 0
    for _ in range(repeats):
        out = measure(spec, timeout)
        peak = max(peak, out.get("peak_rss", 0))
        if out["status"] != "ok":
            return out
        spent += out["seconds"]
        if best is None or out["seconds"] < best["seconds"]:
            best = out
        if spent > 60:
            break
    assert best is not None
    best["peak_rss"] = peak
    return best


def versions() -> dict[str, str]:
    import numpy
    import psutil
    import torch
    import torch_pruning
    import transformers

    import depprune

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            fields = dict(
                (key.strip(), value.strip())
                for key, _, value in (
                    line.partition(":") for line in info.read().split("\n\n")[0].splitlines()
                )
            )
        cpu = f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError):
        pass
    return {
        "depprune": depprune.__version__,
        "torch-pruning": torch_pruning.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "depprune commit": depprune_commit(),
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
    }


def seconds_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "timeout":
        return f"did not finish in {row['timeout']:.0f} s"
    if row["status"] == "oom":
        return f"out of memory at {row['peak_rss'] / 2**30:.1f} GiB"
    if row["status"] == "error":
        return "error"
    return f"{row['seconds']:.2f}"


def gib(row: dict[str, Any] | None) -> str:
    if row is None or not row.get("peak_rss"):
        return "-"
    bound = ">=" if row["status"] != "ok" else ""
    return f"{bound}{row['peak_rss'] / 2**30:.2f}"


def speedup(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    if ours is None or theirs is None or ours["status"] != "ok":
        return "-"
    if theirs["status"] == "timeout":
        return f">{theirs['timeout'] / ours['seconds']:.0f}x"
    if theirs["status"] != "ok":
        return "-"
    return f"{theirs['seconds'] / ours['seconds']:.1f}x"


def params_after(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    """Parameters left by depprune, and whether Torch-Pruning left the same number."""
    mine = (ours or {}).get("params_after") or (ours or {}).get("params_planned")
    if not mine:
        return "-"
    other = (theirs or {}).get("params_after")
    if other is None:
        return f"{mine / 1e6:,.1f} M"
    return f"{mine / 1e6:,.1f} M ({'same' if other == mine else f'TP {other / 1e6:,.1f} M'})"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per shape, layers and task; both libraries side by side."""
    index = {(r["shape"], r["layers"], r["task"], r["library"]): r for r in results}
    keys = list(dict.fromkeys((r["shape"], r["layers"], r["task"]) for r in results))
    lines = [
        "| shape | layers | task | depprune s | Torch-Pruning s | speedup "
        "| depprune peak RSS GiB | Torch-Pruning peak RSS GiB | params after |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, layers, task in keys:
        ours = index.get((shape, layers, task, "depprune"))
        theirs = index.get((shape, layers, task, "torch-pruning"))
        lines.append(
            f"| {shape} | {layers} | {task} | {seconds_text(ours)} | {seconds_text(theirs)} "
            f"| {speedup(ours, theirs)} | {gib(ours)} | {gib(theirs)} | {params_after(ours, theirs)} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"depprune": ("tab:blue", "o"), "torch-pruning": ("tab:red", "s")}
    for library, (color, marker) in styles.items():
        for task, line in (("analysis", "--"), ("prune", "-")):
            rows = [
                r
                for r in results
                if r["shape"] == "w256" and r["library"] == library and r["task"] == task
            ]
            done = [r for r in rows if r["status"] == "ok"]
            label = f"{'Torch-Pruning' if library == 'torch-pruning' else 'depprune'} {task}"
            ax.plot(
                [r["layers"] for r in done],
                [r["seconds"] for r in done],
                line,
                color=color,
                marker=marker,
                label=label,
            )
            for r in rows:
                if r["status"] == "timeout":
                    ax.plot(r["layers"], r["timeout"], "^", color=color, markersize=10)
                    ax.annotate("did not finish", (r["layers"], r["timeout"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    layers = sorted({r["layers"] for r in results if r["shape"] == "w256"})
    ax.set_xticks(layers, [str(n) for n in layers])
    ax.set_xlabel("decoder layers (Llama, hidden 256, 8 heads)")
    ax.set_ylabel("seconds")
    ax.set_title("graph + groups (dashed) and full 50% prune (solid)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile(shape: str, layers: int, top: int) -> None:
    """cProfile of depprune's trace, make_plan and apply: top functions by own time."""
    import cProfile
    import pstats

    import depprune

    model, tokens = build_model(shape, layers)
    inputs = {"input_ids": tokens}
    warm_model, warm_tokens = build_model("w256", 1)
    depprune.trace(warm_model, {"input_ids": warm_tokens})  # imports and op tables
    steps = [
        ("depprune.trace", lambda: depprune.trace(model, inputs)),
        (
            "make_plan",
            lambda graph: depprune.make_plan(model, graph=graph, ratio=RATIO, kinds=KINDS),
        ),
        ("plan.apply", lambda plan: plan.apply(model)),
    ]
    value = None
    for name, step in steps[: 1 if tokens.is_meta else 3]:
        profiler = cProfile.Profile()
        start = time.perf_counter()
        value = profiler.runcall(step) if value is None else profiler.runcall(step, value)
        print(f"{name}, {shape}, {layers} layers: {time.perf_counter() - start:.2f} s profiled")
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)


def plan_runs(args: argparse.Namespace) -> list[tuple[dict[str, Any], float, int]]:
    """(spec, time limit, repeats) of every measurement, in order; the heavy ones last."""
    runs = []
    libraries = ("depprune", "torch-pruning")
    for layers in args.layers:
        for task in ("analysis", "prune"):
            for library in libraries:
                spec = dict(shape="w256", layers=layers, task=task, library=library)
                runs.append((spec, args.timeout, args.repeats))
    for task in ("analysis", "prune"):
        for library in libraries:
            spec = dict(shape="w256-gqa", layers=2, task=task, library=library)
            runs.append((spec, args.gqa_timeout, args.repeats))
    if args.quick:
        return runs
    for task in ("analysis", "prune"):
        spec = dict(shape="llama3-70b", layers=80, task=task, library="depprune")
        runs.append((spec, args.timeout, args.repeats))
    if not args.skip_8b:
        for layers in (32, args.fewer_8b_layers):
            for task in ("analysis", "prune"):
                for library in libraries:
                    spec = dict(shape="llama3-8b", layers=layers, task=task, library=library)
                    runs.append((spec, args.timeout, 1))
            spec = dict(shape="llama3-8b", layers=layers, task=PRUNE_LOW_MEMORY, library="depprune")
            runs.append((spec, args.timeout, 1))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 and 8 layers only, no 8B/70B")
    parser.add_argument("--skip-8b", action="store_true", help="leave out the 16 GB models")
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds per measurement (default 300)"
    )
    parser.add_argument(
        "--gqa-timeout",
        type=float,
        default=None,
        help="seconds for Torch-Pruning on GQA shapes, where it hangs (default 120; 20 with --quick)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="best of N children for small shapes"
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="layer counts of the hidden-256 Llama"
    )
    parser.add_argument(
        "--fewer-8b-layers",
        type=int,
        default=16,
        help="layers of the second, smaller Llama-3-8B-shaped run (default 16)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each child (default 1: on a small shared machine, a second "
        "thread that competes for a core makes timings swing 10x; 0: torch's default)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="LAYERS",
        help="cProfile depprune (trace; make_plan and apply too on real weights) and exit",
    )
    parser.add_argument("--profile-shape", choices=sorted(SHAPES), default="w256")
    parser.add_argument("--profile-top", type=int, default=20, help="functions per listing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    if args.profile:
        set_threads()
        profile(args.profile_shape, args.profile, args.profile_top)
        return
    if args.layers is None:
        args.layers = QUICK_LAYERS if args.quick else WIDTH_256_LAYERS
    if args.gqa_timeout is None:
        args.gqa_timeout = 20 if args.quick else 120

    info = versions()
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results = []
    for spec, limit, repeats in plan_runs(args):
        row = best_of(spec, limit, repeats)
        results.append(row)
        extra = row.get("error", "").splitlines()[-1:] if row["status"] == "error" else []
        print(
            f"{spec['shape']:>10} {spec['layers']:>4} {spec['task']:<8} {spec['library']:<13} "
            f"{seconds_text(row):>24}  peak {gib(row):>7} GiB  {row.get('phases', '')} "
            + " ".join(extra),
            flush=True,
        )
    commits = sorted({r["depprune_commit"] for r in results if "depprune_commit" in r})
    if len(commits) > 1:
        print(f"warning: depprune changed during the run: {', '.join(commits)}")
    print()
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "llm-quick" if args.quick else "llm"
    document = {
        "versions": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "ratio": RATIO,
            "kinds": KINDS,
            "sequence_length": SEQUENCE_LENGTH,
            "timeout": args.timeout,
            "gqa_timeout": args.gqa_timeout,
            "repeats": args.repeats,
            "threads": args.threads or "torch default",
            "fewer_8b_layers": args.fewer_8b_layers,
        },
        "depprune_commits": commits,
        "notes": NOTES,
        "shapes": SHAPES,
        "results": results,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    plot(results, args.out / f"{stem}.png")
    print(f"wrote {args.out / f'{stem}.json'} and {args.out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
