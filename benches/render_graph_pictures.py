"""Regenerate the README's graph pictures: graph.to_html() pages shot by headless Chromium.

Traces (on the meta device, no weights) torchvision's resnet18 and a 2-layer
Llama with realistic ratios, writes their pages and screenshots them at
1200x800 into docs/images/. Needs torchvision, transformers and a
``chromium`` (or ``chromium-browser``) binary on PATH:

    python benches/render_graph_pictures.py            # writes docs/images/graph_*.png
    python benches/render_graph_pictures.py --keep-html /tmp/pages
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import depprune

ROOT = Path(__file__).resolve().parent.parent
SIZE = (1200, 800)


def resnet_graph() -> depprune.DependencyGraph:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18()
        return depprune.trace(model, torch.zeros(1, 3, 64, 64))


def llama_graph() -> depprune.DependencyGraph:
    import transformers

    # Llama-7B's ratios, scaled down: 8 query heads sharing 2 KV heads, MLP 2.7x hidden.
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
        return depprune.trace(model, torch.zeros(1, 8, dtype=torch.long))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no chromium on PATH: install it (Debian: apt-get install chromium) and rerun")


def screenshot(browser: str, page: Path, view: str, out: Path) -> None:
    """Shoot ``page`` opened at ``#view`` (the page reads its view from the address)."""
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--window-size={SIZE[0]},{SIZE[1]}",
            "--virtual-time-budget=3000",
            f"--screenshot={out}",
            f"{page.as_uri()}#{view}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--keep-html", type=Path, help="also keep the HTML pages here")
    args = parser.parse_args()
    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = [
        # The residual stages expanded, one downsampling block's channel group pinned.
        ("graph_resnet", resnet_graph, "resnet18", "depth=3&group=4"),
        # One decoder layer expanded with its KV-head group pinned.
        (
            "graph_llama_layer",
            llama_graph,
            "Llama (2 layers, hidden 256, GQA 8:2)",
            "open=model.layers.0&group=1",
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        pages = args.keep_html or Path(tmp)
        pages.mkdir(parents=True, exist_ok=True)
        for name, build, title, view in pictures:
            page = pages / f"{name}.html"
            build().to_html(page, title=title)
            screenshot(browser, page, view, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
