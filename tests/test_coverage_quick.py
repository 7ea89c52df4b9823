"""A fast subset of the coverage sweep (benches/coverage.py), one model per rule family.

Each model is pruned in-process under both settings of the sweep (default, and
``kinds=("heads", "neurons")``) and must not come out BROKEN, WRONG, with an
escaping error, or with a cache or reload mismatch depprune did not warn about.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_DECODER


def _load_bench():
    # By path and under its own name: "coverage" is also coverage.py, which pytest-cov imports.
    path = Path(__file__).resolve().parent.parent / "benches" / "coverage.py"
    spec = importlib.util.spec_from_file_location("depprune_coverage_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
FAILING, SETTINGS, Case, check = bench.FAILING, bench.SETTINGS, bench.Case, bench.check

tv = pytest.importorskip("torchvision.models")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
bench.quiet()


def image(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids}


CASES = [
    Case("resnet18", "torchvision", "cnn", lambda: (tv.resnet18(num_classes=10), image(32))),
    Case(
        "mobilenet_v3_small",
        "torchvision",
        "depthwise+SE",
        lambda: (tv.mobilenet_v3_small(num_classes=10), image(32)),
    ),
    Case(
        "timm/vit_tiny_patch16_224@32",
        "timm",
        "vit",
        lambda: (
            timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2
            ),
            image(32),
        ),
        atol=1e-3,
    ),
    Case(
        "hf/Mixtral",
        "hf",
        "moe",
        lambda: (
            transformers.MixtralForCausalLM(
                transformers.MixtralConfig(
                    **dict(TINY_DECODER, intermediate_size=16),
                    num_local_experts=4,
                    num_experts_per_tok=2,
                )
            ),
            tokens(),
        ),
        auto="AutoModelForCausalLM",
        causal_lm=True,
    ),
    # The sweep's own tiny configs: a GQA decoder, and one with learned positions.
    *(c for c in bench.hf_cases() if c.name in ("hf/Llama", "hf/OPT")),
]


@pytest.mark.parametrize(
    ("case", "setting"),
    [pytest.param(c, s, id=f"{c.name}-{s}") for c in CASES for s in SETTINGS],
)
def test_coverage_quick(case, setting):
    result = check(case, setting)
    print(result)  # shown on failure: the status, why, what was kept whole
    assert result.status not in FAILING, f"{result.status}: {result.reason}"
    assert result.status != "unavailable", result.reason
