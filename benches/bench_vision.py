"""Whole prune of vision models: depprune against Torch-Pruning, same models, same run.

depprune: ``make_plan`` (trace on the meta shadow, L2 magnitude, selection,
the proof) then ``plan.apply``. Torch-Pruning: ``MetaPruner`` (its
dependency graph) then ``step()``, with L2 magnitude and the classifier
ignored, its examples' recipe. Both at ratio 0.5 on a 1x3x224x224 input, one
thread, each on its own fresh copy of the model, best of ``--repeat`` runs.
Prints a row per model with the ratio, the median ratio, peak RSS and the
versions; ``--out`` writes the rows as JSON.

    python benches/bench_vision.py --out benches/results/bench_vision.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time

import torch
from torch import nn

RATIO = 0.5
#: torchvision classifiers both tools prune, across the families (residual, depthwise,
#: squeeze-excite, dense, channel shuffle, ConvNeXt's LayerNorm, plain VGG).
MODELS = [
    "resnet18",
    "resnet50",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2_x1_0",
    "mnasnet1_0",
    "squeezenet1_1",
    "vgg11_bn",
    "convnext_tiny",
    "alexnet",
]


def classifier(model: nn.Module) -> nn.Module:
    """The last Linear (or 1x1 conv head): its outputs are the classes, never pruned."""
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = module
    assert last is not None
    return last


def run_depprune(model: nn.Module, x: torch.Tensor) -> float:
    import depprune

    start = time.perf_counter()
    plan = depprune.make_plan(model, x, ratio=RATIO, progress=False)
    plan.apply(model)
    return time.perf_counter() - start


def run_torch_pruning(model: nn.Module, x: torch.Tensor) -> float:
    import torch_pruning as tp

    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=RATIO,
        ignored_layers=[classifier(model)],
    )
    pruner.step()
    return time.perf_counter() - start


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(name: str, repeat: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    base = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    row: dict = {"model": name, "params": params(base)}
    for tool, run in (("depprune", run_depprune), ("torch_pruning", run_torch_pruning)):
        times = []
        for _ in range(repeat):
            model = copy.deepcopy(base)
            try:
                times.append(run(model, x))
            except Exception as exc:  # a peer's failure is a row, not the end of the run
                row[f"{tool}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                break
            row[f"{tool}_params_after"] = params(model)
        if times:
            row[f"{tool}_s"] = min(times)
    if "depprune_s" in row and "torch_pruning_s" in row:
        row["speedup"] = row["torch_pruning_s"] / row["depprune_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch_pruning
    import torchvision

    import depprune

    # First calls pay one-off costs (imports, torch's kernel registries): not either tool's.
    warm = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten())
    for run in (run_depprune, run_torch_pruning):
        run(copy.deepcopy(warm), torch.randn(1, 3, 16, 16))
    rows = []
    print(f"{'model':<22}{'depprune s':>11}{'TP s':>9}{'TP/depprune':>13}{'kept % dp/TP':>16}")
    for name in args.models:
        row = measure(name, args.repeat)
        rows.append(row)
        kept = "/".join(
            f"{100 * row[k] / row['params']:.0f}" if k in row else "-"
            for k in ("depprune_params_after", "torch_pruning_params_after")
        )
        cells = [
            f"{row[key]:.3f}" if key in row else "-" for key in ("depprune_s", "torch_pruning_s")
        ]
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
        print(f"{name:<22}{cells[0]:>11}{cells[1]:>9}{speedup:>13}{kept:>16}")
        for key in ("depprune_error", "torch_pruning_error"):
            if key in row:
                print(f"  {key}: {row[key]}")
    speedups = [r["speedup"] for r in rows if "speedup" in r]
    summary = {
        "median_speedup": statistics.median(speedups) if speedups else None,
        "min_speedup": min(speedups) if speedups else None,
        "models": len(rows),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "versions": {
            "depprune": getattr(depprune, "__version__", "?"),
            "torch_pruning": getattr(torch_pruning, "__version__", "?"),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "threads": 1,
        "ratio": RATIO,
    }
    print(
        f"median TP/depprune {summary['median_speedup']:.2f}x, worst {summary['min_speedup']:.2f}x "
        f"over {len(speedups)} models; peak RSS {summary['peak_rss_gib']:.2f} GiB; "
        f"{summary['versions']}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
