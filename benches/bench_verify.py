"""What the proof costs: trace on the meta shadow against the real forward, and the replay.

Builds a Llama with Llama-3-8B widths (hidden 4096, 32 heads, 8 KV heads, MLP
14336) and real bf16 weights for a few layers, then times, each the best of
``--repeat`` runs:

- ``depprune.trace`` on the meta shadow (the default) and with ``shadow=False``
  (the model's own forward, as before the shadow);
- one replay of a 50% plan on a fresh shadow (:func:`depprune.verify.replay_plan`),
  as a fraction of the trace;
- the whole ``make_plan`` (trace, score, select, proof).

    python benches/bench_verify.py --layers 4
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    import transformers

    import depprune
    from depprune.verify import replay_plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        torch_dtype="bfloat16",
    )
    start = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an fp32 8B would need 32 GB
    try:
        model = transformers.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    built = time.perf_counter() - start
    tokens = {"input_ids": torch.randint(0, 128256, (1, args.tokens))}
    params = sum(p.numel() for p in model.parameters())

    shadow = best(lambda: _record(model, tokens, shadow=True), args.repeat)
    real = best(lambda: _record(model, tokens, shadow=False), args.repeat)
    graph = depprune.trace(model, tokens)
    plan = depprune.make_plan(
        model, graph=graph, ratio=0.5, kinds=("heads", "neurons"), progress=False
    )
    keep = graph.keep_mask(plan.removed)
    kept = graph.kept_indices(keep)
    replay = best(lambda: replay_plan(model, graph, keep, kept), args.repeat)
    whole = best(
        lambda: depprune.make_plan(
            model, tokens, ratio=0.5, kinds=("heads", "neurons"), progress=False
        ),
        1,
    )

    print(
        f"depprune {depprune.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"Llama-3-8B widths, {args.layers} layers, {params / 1e9:.2f} B bf16 parameters "
        f"(built in {built:.1f} s), {args.tokens} tokens, {graph.recording.num_ops} ATen ops"
    )
    print(f"{'trace on the meta shadow':<40}{shadow:>9.3f} s")
    print(f"{'trace on the real forward (before)':<40}{real:>9.3f} s   ({real / shadow:.1f}x)")
    print(f"{'replay of a 50% plan':<40}{replay:>9.3f} s   ({replay / shadow:.0%} of the trace)")
    print(f"{'make_plan (trace, score, select, proof)':<40}{whole:>9.3f} s")


def _record(model, tokens, shadow: bool):
    """The trace and the core's groups, on the shadow or on the model's own forward."""
    from depprune._gc import paused_gc
    from depprune.tracer import record

    with paused_gc():
        return record(model, tokens, shadow=shadow).equations.solve()


if __name__ == "__main__":
    main()
