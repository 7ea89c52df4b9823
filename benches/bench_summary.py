"""Every performance target of depprune in one run: depprune, the peer or the floor, the ratio.

One command measures, on this machine and in this run, each row of the
README's Performance table against the peer (Torch-Pruning 1.6) or the floor
it is held to, and says whether the target is met:

- ``trace``: ``bench_trace.py`` in a child: the trace of random-weight Llamas of
  width 256 at 2, 32, 128 and 1,024 layers against the forward under an empty
  ``TorchDispatchMode`` (CPU floor up to 128 layers, meta beyond), the growth
  per layer, and the Llama-3-70B shape on meta (trace + groups, trace + a
  proved ``make_plan``);
- ``llm``: ``bench_llm.py``'s children on random bf16 Llamas of Llama-3-8B
  widths: the analysis against Torch-Pruning's; the whole 50% prune with
  ``low_memory=True`` against the memory floor (plain torch copies of every
  weight, scaled to reading every weight twice and writing the kept bytes) and
  its peak RSS against the model's size; at 16 layers the prune against
  Torch-Pruning's (at 32 it runs out of memory here);
- ``vision``: ``bench_vision.py`` in a child: the whole 50% prune of 15
  torchvision classifiers against Torch-Pruning's, median and worst ratio;
- ``core``: the criterion cases of ``rust/depprune-core/benches/solve.rs`` that
  grow by 10x, the largest growth per 10x step;
- ``gpu``: ``bench_gpu.py`` in a child; without a CUDA device one row says so.

Writes ``--out``/summary.json (rows and raw results), summary.md (the table)
and summary.png (every row as measured/target; right of 1 is met), and prints
the table. About 25 minutes on 2 cores with 24 GiB (the 8B rows build 16 GB
models); ``--skip llm`` leaves those out, ``--quick`` is a smoke run (small
shapes, nothing held to a target).

    python benches/bench_summary.py
    python benches/bench_summary.py --skip llm core --out /tmp/summary
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ("trace", "llm", "vision", "core", "gpu")
#: criterion cases that grow by 10x, with their sizes (rust/depprune-core/benches/solve.rs).
CORE_CASES = {
    "sum_parts": ("one sum of k parts", (2_000, 20_000, 200_000)),
    "sum_chain": ("a chain of k sums under a product", (1_000, 10_000, 100_000)),
    "cut_points": ("k distinct cut points on one axis", (30, 300, 3_000)),
    "cut_points_shuffled": ("the same cuts in random order", (30, 300, 3_000)),
    "product_cuts": ("k cuts on both sides of a product", (30, 300, 3_000)),
    "parts_then_cuts": ("k parts, then cuts through them", (300, 3_000, 30_000)),
}

sys.path.insert(0, str(HERE))


def row(
    what: str,
    ours: float | None,
    reference: float | None,
    reference_name: str,
    *,
    unit: str = "s",
    target: float | None = None,
    higher_is_better: bool = False,
    ratio: float | None = None,
    absolute: bool = False,
    note: str = "",
) -> dict[str, Any]:
    """One table row. ``ratio`` defaults to ours/reference (lower is better) or
    reference/ours (a speedup, ``higher_is_better``); ``target`` bounds the ratio, or
    with ``absolute`` depprune's own figure (in seconds)."""
    if absolute:
        ratio = ours
    if ratio is None and ours is not None and reference:
        ratio = reference / ours if higher_is_better else ours / reference
    met = None
    if target is not None and ratio is not None:
        met = ratio >= target if higher_is_better else ratio <= target
    return {
        "what": what,
        "depprune": ours,
        "reference": reference,
        "reference_name": reference_name,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "higher_is_better": higher_is_better,
        "met": met,
        "absolute": absolute,
        "note": note,
    }


def child(command: list[str], limit: float) -> subprocess.CompletedProcess:
    """Run a benchmark script as a child, its output passed through."""
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, timeout=limit, check=False)


# --------------------------------------------------------------------------- sections


def measure_trace(out: Path, quick: bool) -> tuple[list[dict], dict]:
    path = out / "bench_trace.json"
    command = [sys.executable, str(HERE / "bench_trace.py"), "--repeat", "3", "--out", str(path)]
    if quick:
        command.append("--quick")
    child(command, 3600)
    if not path.exists():
        return [], {}
    raw = json.loads(path.read_text())
    rows = []
    by_layers = {r["layers"]: r for r in raw["w256"]}
    for layers, r in sorted(by_layers.items()):
        traced, meta_floor = r["trace"]["on"], r["meta_empty_dispatch"]
        cpu_floor = r.get("cpu_empty_dispatch")
        floor, name = (
            (cpu_floor, "empty-dispatch forward, CPU")
            if cpu_floor
            else (meta_floor, "empty-dispatch forward, meta (no CPU model: 3 GB)")
        )
        rows.append(
            row(
                f"`trace`, Llama width 256, {layers:,} layers ({r['ops']:,} ops; one thread, "
                "CPU time)",
                traced,
                floor,
                name,
                target=1.3,
                note=f"{traced / meta_floor:.2f}x the meta floor",
            )
        )
    if {32, 128, 1024} <= by_layers.keys():
        per = {k: by_layers[k]["trace"]["on"] / by_layers[k]["layers"] for k in (32, 128, 1024)}
        steep = (by_layers[1024]["trace"]["on"] - by_layers[128]["trace"]["on"]) / 896
        shallow = (by_layers[128]["trace"]["on"] - by_layers[32]["trace"]["on"]) / 96
        rows.append(
            row(
                "`trace` time per added layer, 128 -> 1,024 layers",
                steep,
                shallow,
                "the same, 32 -> 128 layers",
                target=1.3,
                note="linear growth; per layer overall: "
                + ", ".join(f"{1e3 * v:.1f} ms at {k}" for k, v in per.items()),
            )
        )
    big = raw.get("llama3_70b")
    if big:
        floor = big["meta_empty_dispatch"]
        for key, what, limit in (
            ("trace_groups", "Llama-3-70B shape on meta: trace + groups", 0.5),
            ("trace_plan", "Llama-3-70B shape on meta: trace + `make_plan` (proved)", 0.8),
        ):
            seconds = big[key]["on"]
            rows.append(
                row(
                    what,
                    seconds,
                    floor,
                    "empty-dispatch forward, meta",
                    absolute=True,
                    target=limit,
                    note=f"{seconds / floor:.2f}x the floor",
                )
            )
    return rows, raw


def measure_llm(quick: bool) -> tuple[list[dict], list[dict]]:
    import bench_llm

    shape, layers, fewer = ("w256", 8, 4) if quick else ("llama3-8b", 32, 16)
    specs = [
        dict(shape=shape, layers=layers, task="analysis", library="depprune"),
        dict(shape=shape, layers=layers, task="analysis", library="torch-pruning"),
        dict(shape=shape, layers=layers, task=bench_llm.PRUNE_LOW_MEMORY, library="depprune"),
        dict(shape=shape, layers=layers, task="copy", library="floor"),
        dict(shape=shape, layers=fewer, task="prune", library="depprune"),
        dict(shape=shape, layers=fewer, task="prune", library="torch-pruning"),
    ]
    raw = []
    for spec in specs:
        print(f"llm: {spec}", flush=True)
        result = bench_llm.measure(spec, timeout=600)
        print(
            f"  {result['status']}: {result.get('seconds', '-')} s, "
            f"peak {result.get('peak_rss', 0) / 2**30:.2f} GiB",
            flush=True,
        )
        raw.append(result)
    ours_a, theirs_a, low, copy, ours_p, theirs_p = raw
    label = "Llama-3-8B shape, bf16" if not quick else f"{shape}"

    def seconds(result: dict) -> float | None:
        return result.get("seconds") if result["status"] == "ok" else None

    def against_peer(what: str, ours: dict, theirs: dict) -> dict[str, Any]:
        """A row of depprune against Torch-Pruning on the same task: at least 10x faster."""
        failed = "" if theirs["status"] == "ok" else f"Torch-Pruning: {theirs['status']}"
        return row(
            what,
            seconds(ours),
            seconds(theirs),
            "Torch-Pruning",
            higher_is_better=True,
            target=10,
            note=failed,
        )

    rows = [against_peer(f"{label}, {layers} layers: analysis (graph + groups)", ours_a, theirs_a)]
    if low["status"] == "ok" and copy["status"] == "ok":
        total = low["model_bytes"]
        kept = total * low["params_after"] / low["params_before"]
        # Reading every weight twice (score, cut) and writing the kept bytes, at the rate of
        # the plain copies (which read and write every byte once).
        floor = copy["seconds"] * (2 * total + kept) / copy["copied_bytes"]
        rate = copy["copied_bytes"] / copy["seconds"] / 2**30
        rows.append(
            row(
                f"{label}, {layers} layers: 50% prune, `low_memory=True`",
                low["seconds"],
                floor,
                "memory floor (2 reads + kept writes)",
                target=1.5,
                note=f"copies at {rate:.1f} GiB/s; phases "
                + ", ".join(f"{k} {v:.1f} s" for k, v in low["phases"].items()),
            )
        )
        rows.append(
            row(
                f"{label}, {layers} layers: its peak RSS",
                low["peak_rss"] / 2**30,
                total / 2**30,
                "the model's weights",
                unit="GiB",
                target=1.1,
                note="interpreter, torch and transformers included",
            )
        )
    else:
        rows.append(
            row(f"{label}: 50% prune, `low_memory=True`", None, None, "", note=low["status"])
        )
    rows.append(against_peer(f"{label} width, {fewer} layers: 50% prune", ours_p, theirs_p))
    return rows, raw


def measure_vision(out: Path, quick: bool) -> tuple[list[dict], dict]:
    path = out / "bench_vision.json"
    command = [sys.executable, str(HERE / "bench_vision.py"), "--out", str(path)]
    if quick:
        command += ["--models", "resnet18", "mobilenet_v2", "--repeat", "1"]
    child(command, 3600)
    if not path.exists():
        return [], {}
    raw = json.loads(path.read_text())
    both = [r for r in raw["rows"] if "speedup" in r]
    if not both:
        return [], raw
    ours = statistics.median(r["depprune_s"] for r in both)
    theirs = statistics.median(r["torch_pruning_s"] for r in both)
    worst = min(both, key=lambda r: r["speedup"])
    best = max(both, key=lambda r: r["speedup"])
    rows = [
        row(
            f"{len(both)} torchvision models, one thread: whole 50% prune, median of the ratios",
            ours,
            theirs,
            "Torch-Pruning (`MetaPruner` + `step`)",
            higher_is_better=True,
            ratio=raw["summary"]["median_speedup"],
            target=5,
            note=f"medians of the times; worst {worst['model']} {worst['speedup']:.2f}x, "
            f"best {best['model']} {best['speedup']:.1f}x",
        )
    ]
    return rows, raw


def measure_core(quick: bool) -> tuple[list[dict], dict]:
    names = "|".join(CORE_CASES)
    seconds = ("0.5", "1") if quick else ("1", "3")
    command = ["cargo", "bench", "-q", "-p", "depprune-core", "--bench", "solve", "--"]
    command += [f"^({names})/", "--warm-up-time", seconds[0], "--measurement-time", seconds[1]]
    child(command, 3600)
    raw: dict[str, dict[int, float]] = {}
    rows = []
    for case, (what, sizes) in CORE_CASES.items():
        times = {}
        for size in sizes:
            estimates = ROOT / "target" / "criterion" / case / str(size) / "new" / "estimates.json"
            if estimates.exists():
                times[size] = json.loads(estimates.read_text())["median"]["point_estimate"] / 1e9
        raw[case] = times
        if len(times) != 3:
            continue
        small, middle, large = (times[s] for s in sizes)
        growth = max(middle / small, large / middle)
        rows.append(
            row(
                f"core: {what}, k = {sizes[1]:,} -> {sizes[2]:,}",
                large,
                middle,
                f"k = {sizes[1]:,}",
                ratio=growth,
                target=12,
                note=f"growth per 10x: {middle / small:.1f}x, {large / middle:.1f}x "
                f"({1e6 * small:.0f} / {1e6 * middle:.0f} / {1e6 * large:.0f} us)",
            )
        )
    return rows, raw


def measure_gpu(out: Path) -> tuple[list[dict], dict]:
    path = out / "bench_gpu.json"
    child([sys.executable, str(HERE / "bench_gpu.py"), "--json", str(path)], 1800)
    raw = json.loads(path.read_text()) if path.exists() else {"device": None}
    if not raw.get("device"):
        return [
            row(
                "GPU: apply of the 8B shape at 50% against the device's copy of the kept bytes",
                None,
                None,
                "",
                note="no CUDA device on this machine: not measured (benches/bench_gpu.py)",
            )
        ], raw
    gigabytes = raw["weight_bytes"] / 1e9
    return [
        row(
            f"GPU ({raw['device']}): `plan.apply`, 8B shape at 50%",
            raw["apply_seconds"],
            raw["kept_copy_seconds"],
            "the device copying the kept bytes",
            higher_is_better=True,
            target=0.7,
            note="ratio: share of the copy bandwidth",
        ),
        row(
            f"GPU ({raw['device']}): L2 scoring of every group",
            raw["score_seconds"],
            raw["copy_seconds"],
            "the device copying every weight",
            note=f"{gigabytes / raw['score_seconds']:.0f} GB/s of weights read",
        ),
        row(
            f"GPU ({raw['device']}): `depprune.prune` end to end",
            raw["prune_seconds"],
            None,
            "",
        ),
    ], raw


# --------------------------------------------------------------------------- output


def cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def target_text(r: dict) -> str:
    if r["target"] is None:
        return ""
    if r["absolute"]:
        return f"<= {r['target']} s"
    if r["higher_is_better"]:
        return f">= {r['target']:.0%}" if r["target"] < 1 else f">= {r['target']:g}x"
    return f"<= {r['target']:g}x"


def ratio_text(r: dict) -> str:
    if r["ratio"] is None:
        return "-"
    if r["target"] is not None and r["target"] < 1 and r["higher_is_better"]:
        return f"{r['ratio']:.0%}"
    if r["absolute"]:
        return f"{r['ratio']:.2f} s"
    return f"{r['ratio']:.2f}x"


def table(rows: list[dict]) -> str:
    lines = [
        "| what | depprune | peer or floor | | ratio | target | met |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        reference = cell(r["reference"], r["unit"]) if r["reference_name"] else ""
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(
            f"| {r['what']}{note} | {cell(r['depprune'], r['unit'])} | {reference} | "
            f"{r['reference_name']} | {ratio_text(r)} | {target_text(r)} | {met} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot")
        return
    shown = [r for r in rows if r["met"] is not None]
    if not shown:
        return
    scores = [  # above 1: better than the target by that factor
        r["ratio"] / r["target"] if r["higher_is_better"] else r["target"] / r["ratio"]
        for r in shown
    ]
    labels = [r["what"].replace("`", "") for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(shown) + 1.2))
    colors = ["tab:green" if r["met"] else "tab:red" for r in shown]
    ax.barh(range(len(shown)), scores, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("measured against target (right of 1: met)")
    ax.set_title("depprune's performance targets, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def versions() -> dict[str, str]:
    import bench_llm

    info = bench_llm.versions()
    info["depprune commit"] = bench_llm.depprune_commit()
    info["machine"] = platform.processor() or platform.machine()
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections left out")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    rows: list[dict] = []
    raw: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for section in SECTIONS:
        if section in args.skip:
            continue
        start = time.perf_counter()
        if section == "trace":
            got, raw[section] = measure_trace(args.out, args.quick)
        elif section == "llm":
            got, raw[section] = measure_llm(args.quick)
        elif section == "vision":
            got, raw[section] = measure_vision(args.out, args.quick)
        elif section == "core":
            got, raw[section] = measure_core(args.quick)
        else:
            got, raw[section] = measure_gpu(args.out)
        seconds[section] = time.perf_counter() - start
        rows += got
        print(f"{section}: {len(got)} rows in {seconds[section]:.0f} s", flush=True)
    if args.quick:  # small shapes: the targets are for the full sizes
        for r in rows:
            r["met"] = r["target"] = None
    text = table(rows)
    missed = [r["what"] for r in rows if r["met"] is False]
    print()
    print(text)
    print(f"\n{sum(r['met'] is True for r in rows)} targets met, {len(missed)} missed")
    stem = "summary-quick" if args.quick else "summary"
    document = {
        "versions": info,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "section_seconds": seconds,
        "rows": rows,
        "raw": raw,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(text + "\n")
    plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
