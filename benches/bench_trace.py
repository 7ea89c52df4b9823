"""How close ``depprune.trace`` comes to the dispatch floor, with the fast meta path on and off.

The trace runs the model's forward on a meta shadow under a ``TorchDispatchMode``
that hands every ATen call to its axis rule. Its floor is the same forward
under a mode that does nothing: on the meta device (where the trace runs) and
on the CPU (with real weights). Measured in one process, one thread, each the
best of ``--repeat`` runs, with the garbage collector paused during a run and
all the steps of one model taking turns. The clock is this process's CPU time
(``time.process_time``, ``--clock cpu``): on a shared machine other work
stretches wall time, not it; ``--clock wall`` measures wall time.

- random-weight ``LlamaForCausalLM`` of benches/bench_llm.py's ``w256`` shape
  (hidden 256, MLP 688, 8 heads of 32, vocab 1000, fp32, 8 tokens) at 2, 32,
  128 and 1024 layers: the plain forward on the CPU, the forward under an
  empty dispatch mode on the CPU and on meta (1024 layers: meta only, the
  model built on meta), ``tracer.record`` (the recorded forward) and
  ``depprune.trace`` (record, then the core's groups); ratios to the meta floor
  and time per layer (the growth must be linear);
- the Llama-3-70B shape on meta (hidden 8192, MLP 28672, 64 heads, 8 KV heads,
  vocab 128256, bf16, 80 layers, 128 tokens): the empty-dispatch forward,
  ``record``, ``depprune.trace`` (trace + groups) and trace + ``make_plan``
  (ratio 0.5 of heads, neurons and hidden, random importance, verify on).

Writes benches/results/bench_trace.json and benches/results/trace.png
(matplotlib; skipped with a message when it is missing).

    python benches/bench_trace.py            # about 10 minutes on 2 cores
    python benches/bench_trace.py --quick    # 2 and 32 layers, nothing written
    python benches/bench_trace.py --profile 32   # cProfile of one trace instead
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEPTHS = (2, 32, 128, 1024)
QUICK_DEPTHS = (2, 32)
#: Deepest model whose real CPU forward is measured (1024 layers would need 3 GB of weights).
CPU_MAX_LAYERS = 128
W256 = dict(hidden=256, intermediate=688, heads=8, kv_heads=8, vocab=1000, tokens=8)
LLAMA3_70B = dict(
    hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, tokens=128, layers=80
)
KINDS = ("heads", "neurons", "hidden")

_aten = torch.ops.aten
#: Calls that read values: on meta the empty mode answers them as the trace does.
_NEUTRAL = {
    _aten._local_scalar_dense.default: 0,
    _aten.is_nonzero.default: False,
    _aten.equal.default: True,
}


class EmptyDispatch(TorchDispatchMode):
    """Runs every ATen call as it is: the floor of any dispatch-mode trace."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # as the recorder: no dynamo guard frames per call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _NEUTRAL and args and args[0].is_meta:
            return _NEUTRAL[func]
        return func(*args, **(kwargs or {}))


def llama(shape: dict[str, int], layers: int, device: str, dtype: torch.dtype = torch.float32):
    """A random-weight LlamaForCausalLM and its input ids, on ``device`` ("cpu" or "meta")."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        use_cache=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    tokens = torch.zeros((1, shape["tokens"]), dtype=torch.long, device=device)
    if device == "meta":
        return model, tokens
    model.to_empty(device=device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.05, 0.05, generator=generator)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers are computed
    return model, tokens


#: The clock of every measurement (``--clock``).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def best(step: Callable[[], Any], repeat: int) -> float:
    """Fastest of ``repeat`` runs of ``step``, in seconds, the collector paused in each."""
    times = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = clock()
            step()
            times.append(clock() - start)
        finally:
            gc.enable()
    return min(times)


def fast_meta(enabled: bool, step: Callable[[], Any]) -> Callable[[], Any]:
    """``step`` with the fast meta path on or off."""
    from depprune.fast_meta import configured

    def run():
        with configured(enabled=enabled):
            return step()

    return run


def best_of_each(steps: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """The fastest of ``repeat`` runs of every step, the steps taking turns (round robin), so
    that a slow spell of a shared machine does not fall on one of them only."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            times[name].append(best(step, 1))
    return {name: min(values) for name, values in times.items()}


def forward_under(mode_type: type | None, model, tokens) -> Callable[[], Any]:
    def step():
        with torch.no_grad():
            if mode_type is None:
                return model(input_ids=tokens)
            with mode_type():
                return model(input_ids=tokens)

    return step


def on_and_off(times: dict[str, float], name: str) -> dict[str, float]:
    return {"on": times[f"{name} on"], "off": times[f"{name} off"]}


def measure_depth(layers: int, repeat: int) -> dict[str, Any]:
    """Floors and traces of the w256 Llama at one depth, in seconds."""
    import depprune
    from depprune.shadow import meta_shadow
    from depprune.tracer import record

    on_cpu = layers <= CPU_MAX_LAYERS
    model, tokens = llama(W256, layers, "cpu" if on_cpu else "meta")
    inputs = {"input_ids": tokens}
    shadow, meta_tokens = meta_shadow(model), tokens.to("meta")
    steps = {
        "meta_empty_dispatch": forward_under(EmptyDispatch, shadow, meta_tokens),
        "shadow": lambda: meta_shadow(model),
    }
    if on_cpu:
        steps["cpu_forward"] = forward_under(None, model, tokens)
        steps["cpu_empty_dispatch"] = forward_under(EmptyDispatch, model, tokens)
    for enabled in (True, False):
        switch = "on" if enabled else "off"
        steps[f"record {switch}"] = fast_meta(enabled, lambda: record(model, inputs))
        steps[f"trace {switch}"] = fast_meta(enabled, lambda: depprune.trace(model, inputs))
    times = best_of_each(steps, repeat)
    row: dict[str, Any] = {"layers": layers}
    row.update({k: v for k, v in times.items() if not k.endswith((" on", " off"))})
    row["record"], row["trace"] = on_and_off(times, "record"), on_and_off(times, "trace")
    result = record(model, inputs)
    row["ops"] = result.num_ops
    row["meta_outputs_built"] = result.meta_outputs_built
    return row


def measure_70b(repeat: int) -> dict[str, Any]:
    """The Llama-3-70B shape on meta: floor, trace, trace + groups, trace + a proved plan."""
    import depprune
    from depprune.shadow import meta_shadow
    from depprune.tracer import record

    model, tokens = llama(LLAMA3_70B, LLAMA3_70B["layers"], "meta", torch.bfloat16)
    inputs = {"input_ids": tokens}
    row: dict[str, Any] = {"layers": LLAMA3_70B["layers"], "tokens": LLAMA3_70B["tokens"]}
    shadow = meta_shadow(model)

    def trace_and_plan():
        graph = depprune.trace(model, inputs)
        importance = depprune.importance.random(0)
        return depprune.make_plan(
            model, graph=graph, ratio=0.5, kinds=KINDS, importance=importance, verify=True
        )

    steps = {
        "meta_empty_dispatch": forward_under(EmptyDispatch, shadow, tokens),
        "shadow": lambda: meta_shadow(model),
    }
    for enabled in (True, False):
        switch = "on" if enabled else "off"
        steps[f"record {switch}"] = fast_meta(enabled, lambda: record(model, inputs))
        steps[f"trace_groups {switch}"] = fast_meta(
            enabled, lambda: len(depprune.trace(model, inputs).groups)
        )
        steps[f"trace_plan {switch}"] = fast_meta(enabled, trace_and_plan)
    times = best_of_each(steps, repeat)
    row["meta_empty_dispatch"], row["shadow"] = times["meta_empty_dispatch"], times["shadow"]
    for name in ("record", "trace_groups", "trace_plan"):
        row[name] = on_and_off(times, name)
    plan = trace_and_plan()
    row["groups"] = len(plan.groups)
    row["kept_whole"] = len(plan.kept_whole)
    row["ops"] = record(model, inputs).num_ops
    return row


def versions() -> dict[str, str]:
    import numpy
    import transformers

    import depprune

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            first = info.read().split("\n\n")[0]
        fields = {
            k.strip(): v.strip() for k, _, v in (s.partition(":") for s in first.splitlines())
        }
        cpu = fields.get("model name", cpu)
    except OSError:
        pass
    return {
        "depprune": depprune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
    }


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:9.1f}"


def print_depths(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'layers':>6} {'ops':>6} {'cpu fwd':>9} {'cpu empty':>9} {'meta empty':>10} "
        f"{'trace on':>9} {'trace off':>9} {'on/meta':>7} {'off/meta':>8} {'on/cpu':>6} "
        f"{'ms/layer on':>11}   (ms)"
    )
    for row in rows:
        floor, trace = row["meta_empty_dispatch"], row["trace"]
        cpu_empty = row.get("cpu_empty_dispatch")
        on_cpu = f"{trace['on'] / cpu_empty:6.2f}" if cpu_empty else "     -"
        print(
            f"{row['layers']:>6} {row['ops']:>6} {ms(row.get('cpu_forward'))} {ms(cpu_empty)} "
            f"{ms(floor):>10} {ms(trace['on'])} {ms(trace['off'])} "
            f"{trace['on'] / floor:7.2f} {trace['off'] / floor:8.2f} {on_cpu} "
            f"{trace['on'] / row['layers'] * 1e3:11.3f}"
        )
    for before, after in itertools.pairwise(rows):
        added = after["layers"] - before["layers"]
        slope = (after["trace"]["on"] - before["trace"]["on"]) / added
        print(
            f"  {before['layers']} -> {after['layers']} layers: {slope * 1e3:.3f} ms per added "
            "layer (trace, fast path on)"
        )


def print_70b(row: dict[str, Any]) -> None:
    print(
        f"\nLlama-3-70B shape on meta ({row['layers']} layers, {row['tokens']} tokens, "
        f"{row['ops']} ops, {row['groups']} groups, {row['kept_whole']} kept whole)"
    )
    print(
        f"  empty-dispatch forward {row['meta_empty_dispatch']:.3f} s, shadow {row['shadow']:.3f} s"
    )
    for key, name in (
        ("record", "trace"),
        ("trace_groups", "trace + groups"),
        ("trace_plan", "trace + make_plan"),
    ):
        print(f"  {name:18s} fast path on {row[key]['on']:.3f} s, off {row[key]['off']:.3f} s")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    layers = [row["layers"] for row in rows]
    figure, (times, ratios) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [
        ("CPU forward", [row.get("cpu_forward") for row in rows], "k:"),
        ("CPU, empty dispatch", [row.get("cpu_empty_dispatch") for row in rows], "k--"),
        ("meta, empty dispatch", [row["meta_empty_dispatch"] for row in rows], "k-"),
        ("depprune.trace, fast meta off", [row["trace"]["off"] for row in rows], "C3o-"),
        ("depprune.trace, fast meta on", [row["trace"]["on"] for row in rows], "C0o-"),
    ]
    for label, values, style in series:
        points = [(n, v) for n, v in zip(layers, values, strict=True) if v is not None]
        times.plot([n for n, _ in points], [v * 1e3 / n for n, v in points], style, label=label)
    times.set(
        xscale="log",
        xlabel="decoder layers",
        ylabel="ms per layer",
        title="w256 Llama: time per layer",
    )
    times.set_ylim(bottom=0)
    times.legend(fontsize=8)
    for key, style, label in (("off", "C3o-", "fast meta off"), ("on", "C0o-", "fast meta on")):
        ratios.plot(
            layers,
            [row["trace"][key] / row["meta_empty_dispatch"] for row in rows],
            style,
            label=label,
        )
    ratios.axhline(1.3, color="grey", linestyle="--", label="target 1.3x")
    ratios.set(
        xscale="log",
        xlabel="decoder layers",
        ylabel="trace / meta empty-dispatch forward",
        title="depprune.trace against its floor",
    )
    ratios.set_ylim(bottom=0)
    ratios.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def profile(layers: int, top: int) -> None:
    """cProfile of one ``depprune.trace`` of the w256 Llama, by own time and cumulative."""
    import cProfile
    import pstats

    import depprune

    model, tokens = llama(W256, layers, "meta")
    depprune.trace(model, {"input_ids": tokens})  # imports, op tables
    profiler = cProfile.Profile()
    profiler.runcall(lambda: depprune.trace(model, {"input_ids": tokens}))
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 and 32 layers; nothing written")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (best)")
    parser.add_argument("--profile", type=int, metavar="LAYERS", help="profile one trace")
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="what is timed")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON written (default results/bench_trace.json; with --quick: none)",
    )
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    if args.profile:
        profile(args.profile, args.top)
        return
    info = versions() | {"clock": args.clock}
    print("  ".join(f"{k} {v}" for k, v in info.items()))
    import depprune

    warm_model, warm_tokens = llama(W256, 1, "meta")
    depprune.trace(warm_model, {"input_ids": warm_tokens})  # imports and op tables, untimed
    rows = []
    for layers in QUICK_DEPTHS if args.quick else DEPTHS:
        # Short runs are the noisiest on a shared machine: more of them.
        repeat = args.repeat * {2: 4, 32: 2}.get(layers, 1)
        if layers > CPU_MAX_LAYERS:
            repeat = max(2, args.repeat // 2)
        rows.append(measure_depth(layers, repeat))
        print_depths(rows[-1:])
    print_depths(rows)
    big = None if args.quick else measure_70b(max(2, args.repeat // 2))
    if big is not None:
        print_70b(big)
    if args.quick and args.out is None:
        return
    path = args.out or RESULTS / "bench_trace.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"versions": info, "w256": rows, "llama3_70b": big, "shape": W256}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    plot(rows, path.with_name("trace.png"))


if __name__ == "__main__":
    main()
