"""Scoring and apply on the GPU against the device's own copy bandwidth, on a Llama-3-8B shape.

Builds a random-weight ``LlamaForCausalLM`` with Llama-3-8B widths (hidden
4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256) in bf16 directly on the
device, then measures in one run:

- the floor: the device copying every weight once (``copy_`` into fresh
  tensors, the bandwidth a cut cannot beat), and copying the bytes a 50%
  cut keeps;
- scoring: L2 magnitude of every group (``score_groups``), as weight bytes
  read per second;
- apply: ``plan.apply`` of a 50% plan (hidden, heads, neurons) against the
  device copying the kept bytes (target at least 70%);
- the end-to-end prune (trace, plan with its proof, apply) of a fresh model.

Peak device memory, the GPU, and the versions are printed. Without a CUDA
device it says so and exits 0. ``--device cpu --layers 2 --hidden 512``
runs the same code on the CPU (what CI-less checks of this script use).

    python benches/bench_gpu.py                     # on a GPU: the 8B shape
    python benches/bench_gpu.py --layers 8          # a quicker GPU run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import depprune
from depprune.importance import ScoreContext, magnitude, score_groups

KINDS = ("hidden", "heads", "neurons")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work) -> tuple[float, object]:
    """Seconds ``work()`` takes on ``device`` (queued kernels included)."""
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - started, result


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The model with random weights, made on ``device`` without a CPU copy."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(getattr(torch, args.dtype)).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    # to_empty leaves the rotary frequencies uninitialised: build them as the model does.
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copy_floor(model: torch.nn.Module, device: torch.device, plan=None) -> float:
    """Seconds for the device to copy every weight (or, with ``plan``, the kept part) once."""
    sizes = []
    for name, param in model.named_parameters():
        kept = param.numel()
        if plan is not None:
            kept = math.prod(
                plan.kept[(name, d)].size if (name, d) in plan.kept else s
                for d, s in enumerate(param.shape)
            )
        sizes.append((param, kept))

    def copy_all() -> None:
        for param, kept in sizes:
            source = param.detach().reshape(-1)[:kept]
            torch.empty_like(source).copy_(source)

    copy_all()  # warm the allocator and the kernels
    seconds, _ = timed(device, copy_all)
    return seconds


def measure(model: torch.nn.Module, device: torch.device, tokens: torch.Tensor) -> tuple:
    """Copy floors, trace, scoring, make_plan and apply on ``model`` (which is cut)."""
    total = weight_bytes(model)
    copy_seconds = copy_floor(model, device)
    graph_seconds, graph = timed(device, lambda: depprune.trace(model, {"input_ids": tokens}))
    chosen = [g for g in graph.groups if g.kind in KINDS]
    ctx = ScoreContext.from_model(graph, model)
    score_seconds, _ = timed(
        device, lambda: score_groups(chosen, magnitude(2), ctx, progress=False)
    )
    plan_seconds, plan = timed(
        device,
        lambda: depprune.make_plan(model, graph=graph, ratio=0.5, kinds=KINDS, progress=False),
    )
    kept_copy_seconds = copy_floor(model, device, plan)
    apply_seconds, _ = timed(device, lambda: plan.apply(model))
    with torch.no_grad():
        model(tokens)  # the pruned model runs on the device
    return (
        total,
        copy_seconds,
        graph_seconds,
        score_seconds,
        plan_seconds,
        kept_copy_seconds,
        apply_seconds,
        weight_bytes(model),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", help="also write the measured figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (run this where a GPU is lent)")
        if args.json:
            Path(args.json).write_text(json.dumps({"device": None}) + "\n")
        return 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = torch.zeros(1, 8, dtype=torch.long, device=device)

    measured = measure(build(args, device), device, tokens)
    prune_seconds, report = timed(
        device,
        lambda: depprune.prune(
            build(args, device), {"input_ids": tokens}, ratio=0.5, kinds=KINDS, count_macs=False
        ),
    )
    total, copy_seconds, graph_seconds, score_seconds, plan_seconds = measured[:5]
    kept_copy_seconds, apply_seconds, kept = measured[5:]

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    peak = (
        f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        if device.type == "cuda"
        else "n/a on the CPU (see bench_llm.py)"
    )
    rows = [
        ("weights", f"{total / 1e9:.2f} GB ({args.dtype}), {args.layers} layers"),
        ("device copy of every weight", f"{copy_seconds:.3f} s, {2 * total / copy_seconds / 1e9:.1f} GB/s (read + write)"),
        ("trace (meta shadow)", f"{graph_seconds:.3f} s"),
        ("scoring, L2 of every group", f"{score_seconds:.3f} s, {total / score_seconds / 1e9:.1f} GB/s of weights read"),
        ("make_plan (score, select, proof)", f"{plan_seconds:.3f} s"),
        ("device copy of the kept bytes", f"{kept_copy_seconds:.3f} s"),
        ("plan.apply, 50%", f"{apply_seconds:.3f} s: {kept_copy_seconds / apply_seconds:.0%} of the copy bandwidth"),
        ("kept", f"{kept / 1e9:.2f} GB ({kept / total:.1%})"),
        ("depprune.prune end to end", f"{prune_seconds:.3f} s ({report.params_after / 1e9:.2f} B parameters kept)"),
        ("peak device memory", peak),
    ]  # fmt: skip
    if args.json:
        figures = {
            "device": name,
            "weight_bytes": total,
            "copy_seconds": copy_seconds,
            "score_seconds": score_seconds,
            "kept_copy_seconds": kept_copy_seconds,
            "apply_seconds": apply_seconds,
            "prune_seconds": prune_seconds,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    width = max(len(k) for k, _ in rows)
    print(f"\n{name}: Llama with hidden {args.hidden}, {args.layers} layers\n")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    cuda = torch.version.cuda or "none"
    print(
        f"\ndepprune {depprune.__version__}, torch {torch.__version__} (CUDA {cuda}), "
        f"Python {platform.python_version()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
