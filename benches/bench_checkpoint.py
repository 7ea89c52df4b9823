"""Prune a checkpoint larger than this machine's memory with ``depprune prune``, streaming.

Writes a random-weight Llama checkpoint (by default the 13B shape in bf16,
about 26 GB, in 5 GB shards, tensor by tensor), measures the disk's
sequential read (buffered and O_DIRECT: the faster is the floor) and write
bandwidth on it (cold cache), runs ``depprune prune`` on it at 50% (heads,
neurons, hidden) in a child process, and reports wall time, the child's
peak RSS and throughput against the disk.
The output is checked against the architecture its config builds on the
meta device (every tensor's shape), and a small checkpoint is pruned both
streamed and in memory with the same plan and compared by logits. The
generated files are deleted at the end.

    python benches/bench_checkpoint.py                 # 13B shape, ~26 GB on disk
    python benches/bench_checkpoint.py --layers 4      # a quick run
    python benches/bench_checkpoint.py --wanda         # also plan with Wanda, layer by layer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import depprune
from depprune.io.safetensors_files import TensorEntry, write_all, write_header

SHAPE_13B = dict(
    hidden_size=5120,
    intermediate_size=13824,
    num_attention_heads=40,
    num_key_value_heads=40,
    num_hidden_layers=40,
    vocab_size=32000,
)


def llama_config(layers: int, **overrides):
    import transformers

    shape = {**SHAPE_13B, "num_hidden_layers": layers, **overrides}
    return transformers.LlamaConfig(**shape, tie_word_embeddings=False, dtype="bfloat16")


def write_checkpoint(folder: Path, config, shard_bytes: int) -> tuple[int, float]:
    """A random-weight bf16 checkpoint written tensor by tensor; returns (bytes, seconds)."""
    from depprune.io import load_skeleton

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    skeleton = load_skeleton(folder)
    names = [(n, tuple(t.shape)) for n, t in skeleton.state_dict().items() if n != "lm_head.weight"]
    names.append(("lm_head.weight", tuple(skeleton.lm_head.weight.shape)))
    # Random normal bf16 bytes, drawn once and reused at random offsets: the disk, not the
    # generator, sets the pace, and every tensor still has distinct values.
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 << 20, generator=generator) * 0.02).to(torch.bfloat16)
    pool = pool.view(torch.uint8).numpy()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        entries, offset = [], 0
        for name, shape in shard:
            nbytes = 2 * math.prod(shape)
            entries.append(TensorEntry(name, "BF16", shape, offset, offset + nbytes))
            offset += nbytes
            weight_map[name] = file
        with open(folder / file, "wb", buffering=0) as out:
            write_header(out, entries, {"format": "pt"})
            for entry in entries:
                left = entry.nbytes
                while left:
                    start = 2 * int(rng.integers(0, (pool.size - 2) // 2))
                    piece = min(left, pool.size - start)
                    write_all(out, pool[start : start + piece])
                    left -= piece
            os.fsync(out.fileno())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "tokenizer.json").write_text("{}")
    return total, time.perf_counter() - started


def drop_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache, so reads come from the disk."""
    for path in folder.glob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_bandwidth(folder: Path, *, direct: bool) -> float:
    """Cold sequential read of every shard, bytes per second (``O_DIRECT`` or buffered)."""
    from depprune.io.safetensors_files import DIRECT_ALIGNMENT, buffer_for

    drop_cache(folder)
    chunk = 64 << 20
    buffer = buffer_for(chunk)
    shift = -buffer.ctypes.data % DIRECT_ALIGNMENT
    view = memoryview(buffer[shift : shift + chunk])
    total = 0
    started = time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags)
        try:
            offset = 0
            while count := os.preadv(fd, [view], offset):
                offset += count
            total += offset
        finally:
            os.close(fd)
    return total / (time.perf_counter() - started)


# Runs the command line in a child and reports that child's own peak RSS on its last line.
_CHILD = (
    "import resource, sys\n"
    "from depprune.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_cli(*argv: str) -> tuple[float, int, str]:
    """``depprune ARGV`` in a child process: (seconds, its peak RSS in bytes, its output)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"depprune {argv[0]} failed ({result.returncode}):\n{result.stderr}")
    peak_kib = int(result.stderr.strip().splitlines()[-1])
    return seconds, peak_kib * 1024, result.stdout


def run_wanda(src: Path, root: Path) -> tuple[float, int]:
    """``depprune plan --importance wanda`` on 2 x 32 random tokens: (seconds, peak RSS)."""
    tokens = np.random.default_rng(0).integers(0, SHAPE_13B["vocab_size"], size=(2, 32))
    np.save(root / "calibration.npy", tokens)
    drop_cache(src)
    seconds, peak, _ = run_cli(
        "plan",
        str(src),
        "--ratio",
        "0.5",
        "--kinds",
        "heads,neurons",
        "--importance",
        "wanda",
        "--calibration",
        str(root / "calibration.npy"),
        "-o",
        str(root / "wanda.npz"),
    )
    return seconds, peak


def check_shapes(out: Path) -> int:
    """Every tensor written has the shape the pruned config builds on the meta device."""
    from depprune.io import Checkpoint, load_skeleton

    checkpoint = Checkpoint(out)
    model = load_skeleton(out)
    checked = 0
    for name, tensor in model.state_dict().items():
        if name in checkpoint.file_of:
            assert checkpoint.shape(name) == tuple(tensor.shape), name
            checked += 1
    assert checked == len(checkpoint.names), "tensors the pruned architecture does not have"
    return checked


def check_logits(folder: Path) -> float:
    """A small checkpoint pruned streamed and in memory with one plan: max logit difference."""
    import transformers

    from depprune.io import apply_to_checkpoint, plan_checkpoint

    config = llama_config(
        2,
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder / "small")
    kinds = ("heads", "neurons", "hidden")
    plan = plan_checkpoint(folder / "small", ratio=0.5, kinds=kinds, progress=False)
    apply_to_checkpoint(folder / "small", plan, folder / "small-pruned", progress=False)
    model = transformers.LlamaForCausalLM.from_pretrained(folder / "small").eval()
    plan.apply(model)
    streamed = transformers.LlamaForCausalLM.from_pretrained(folder / "small-pruned").eval()
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (streamed(tokens).logits - model(tokens).logits).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=SHAPE_13B["num_hidden_layers"])
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--wanda", action="store_true", help="also plan with Wanda, one decoder layer resident"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="depprune-bench-", dir=args.dir))
    try:
        config = llama_config(args.layers)
        src, out = root / "src", root / "out"
        total, write_seconds = write_checkpoint(src, config, int(args.shard_gb * 1e9))
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        buffered_rate = read_bandwidth(src, direct=False)
        direct_rate = read_bandwidth(src, direct=True)
        # The floor is the faster way this disk reads, whichever depprune uses.
        read_rate = max(buffered_rate, direct_rate)
        drop_cache(src)
        seconds, peak, output = run_cli(
            "prune", str(src), "-o", str(out), "--ratio", "0.5", "--kinds", "heads,neurons,hidden"
        )
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        tensors = check_shapes(out)
        drop_cache(out)
        difference = check_logits(root)
        write_rate = total / write_seconds
        # Scoring reads every weight once, the cut reads it again and writes what is kept.
        floor = 2 * total / read_rate + written / write_rate
        print(
            f"\ndepprune prune of a {args.layers}-layer 13B-width Llama, bf16: "
            f"{total / 1e9:.1f} GB in {len(list(src.glob('*.safetensors')))} shards, "
            f"this machine has {memory / 2**30:.0f} GiB of memory\n"
        )
        rows = [
            (
                "disk read (cold, sequential: buffered / O_DIRECT)",
                f"{buffered_rate / 1e9:.2f} / {direct_rate / 1e9:.2f} GB/s",
            ),
            ("disk write (writing the checkpoint)", f"{write_rate / 1e9:.2f} GB/s"),
            ("depprune prune, wall", f"{seconds:.1f} s"),
            ("peak RSS of depprune prune", f"{peak / 2**30:.2f} GiB"),
            ("read throughput (2 passes / wall)", f"{2 * total / seconds / 1e9:.2f} GB/s"),
            ("  vs the disk's read bandwidth", f"{2 * total / seconds / read_rate:.0%}"),
            ("disk floor (2 reads + 1 write)", f"{floor:.1f} s"),
            ("  wall / floor", f"{seconds / floor:.2f}x"),
            ("written", f"{written / 1e9:.1f} GB, {tensors} tensors, shapes checked"),
            ("small model, streamed vs in memory", f"max |logit diff| {difference:.1e}"),
        ]
        if args.wanda:
            wanda_seconds, wanda_peak = run_wanda(src, root)
            rows += [
                ("plan with Wanda (2 x 32 tokens), wall", f"{wanda_seconds:.1f} s"),
                ("  peak RSS (one decoder layer resident)", f"{wanda_peak / 2**30:.2f} GiB"),
            ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        print(
            f"\ndepprune {depprune.__version__}, torch {torch.__version__}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs\n--- depprune prune output"
        )
        print(output)
        assert difference == 0.0, "streamed and in-memory pruning disagree"
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
