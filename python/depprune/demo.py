"""Built-in example: prune a real model end to end and print what changed.

``python -m depprune.demo`` builds a small Llama (grouped-query attention,
RoPE, SwiGLU; random weights, no download), traces it, removes half of its
KV heads, query heads, MLP neurons and hidden size, checks that the pruned
model still runs and that ``save_pretrained``/``from_pretrained`` reload it
with the same logits, and prints the before/after table. ``--model
resnet50`` prunes a torchvision ResNet-50 instead (needs torchvision).

>>> report = main(["--layers", "1", "--quiet"])
>>> report.params_after < report.params_before
True
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn

from depprune.api import PruneReport, make_plan, prune, trace

__all__ = ["main"]


def _llama(layers: int) -> tuple[nn.Module, dict]:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            "the Llama demo needs transformers: pip install 'depprune[hf]', "
            "or run with --model resnet50"
        ) from exc
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    tokens = torch.randint(
        0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    return model, {"input_ids": tokens}


def _resnet50() -> tuple[nn.Module, torch.Tensor]:
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit("the ResNet-50 demo needs torchvision: pip install torchvision") from exc
    model = torchvision.models.resnet50(num_classes=1000).eval()
    return model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def main(argv: list[str] | None = None) -> PruneReport:
    """Run the demo; returns the prune report."""
    parser = argparse.ArgumentParser(prog="python -m depprune.demo", description=__doc__)
    parser.add_argument("--model", choices=("llama", "resnet50"), default="llama")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of units to remove")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.quiet else print

    torch.manual_seed(0)
    model, inputs = _llama(args.layers) if args.model == "llama" else _resnet50()
    # Heads rather than head_dim: the pruned Llama keeps a config from_pretrained rebuilds.
    kinds = ("hidden", "heads", "neurons") if args.model == "llama" else None
    say(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")

    start = time.perf_counter()
    graph = trace(model, inputs)
    say(f"traced and grouped in {time.perf_counter() - start:.2f} s: {graph!r}")
    start = time.perf_counter()
    plan = make_plan(model, graph=graph, ratio=args.ratio, kinds=kinds)
    say(f"planned in {time.perf_counter() - start:.2f} s (score, select): {plan!r}")
    # prune() reuses nothing from above; it traces again and counts MACs before and after.
    report = prune(model, inputs, ratio=args.ratio, kinds=kinds)
    say(report)

    logits = _logits(model, inputs)
    say(f"\nthe pruned model runs: output {tuple(logits.shape)}")
    if hasattr(model, "save_pretrained"):
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            reloaded = type(model).from_pretrained(folder).eval()
        same = torch.allclose(_logits(reloaded, inputs), logits, atol=1e-5)
        say(f"save_pretrained + from_pretrained: {'same logits' if same else 'LOGITS DIFFER'}")
        if not same:
            raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
