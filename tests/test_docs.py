"""Every public module's docstring examples run against the installed package."""

import doctest
import importlib

import pytest

MODULES = [
    "depprune",
    "depprune._gc",
    "depprune.equations",
    "depprune.errors",
    "depprune.graph",
    "depprune.graph_view",
    "depprune.cli",
    "depprune.cli.app",
    "depprune.cli.commands",
    "depprune.cli.options",
    "depprune.cli.models",
    "depprune.cli.summaries",
    "depprune.cli.macs",
    "depprune.cli.tables",
    "depprune.cli.progress",
    "depprune.demo",
    "depprune.synthetic",
    "depprune.kinds",
    "depprune.api",
    "depprune.apply",
    "depprune.apply.cuts",
    "depprune.apply.fixers",
    "depprune.apply.config",
    "depprune.apply.optimizer_state",
    "depprune.apply.containers",
    "depprune.structure",
    "depprune.experts",
    "depprune.expert_widths",
    "depprune.depth",
    "depprune.structural_selection",
    "depprune.distributed",
    "depprune.distributed.accelerate",
    "depprune.distributed.dtensor",
    "depprune.distributed.tensor_parallel",
    "depprune.budget",
    "depprune.fast_meta",
    "depprune.plan",
    "depprune.io",
    "depprune.io.safetensors_files",
    "depprune.io.checkpoint",
    "depprune.io.skeleton",
    "depprune.io.scoring",
    "depprune.io.streaming",
    "depprune.io.layerwise",
    "depprune.io.pipeline",
    "depprune.selection",
    "depprune.importance",
    "depprune.importance.context",
    "depprune.importance.weights",
    "depprune.importance.gradients",
    "depprune.importance.activations",
    "depprune.importance.layer_adaptive",
    "depprune.importance.geometric_median",
    "depprune.tracer",
    "depprune.rules",
    "depprune.rules.common",
    "depprune.rules.elementwise",
    "depprune.rules.index",
    "depprune.rules.linalg",
    "depprune.rules.nn",
    "depprune.rules.reduce",
    "depprune.rules.shape",
    "depprune.rules.position",
    "depprune.shadow",
    "depprune.sparsity",
    "depprune.sparsity.group",
    "depprune.sparsity.batchnorm",
    "depprune.sparsity.schedule",
    "depprune.methods",
    "depprune.methods.slimming",
    "depprune.methods.depgraph",
    "depprune.methods.l1_filter",
    "depprune.methods.unstructured",
    "depprune.from_scratch",
    "depprune.methods.sss",
    "depprune.methods.reconstruction",
    "depprune.methods.thinet",
    "depprune.methods.channel_regression",
    "depprune.architecture",
    "depprune.experiments",
    "depprune.experiments.rethinking",
    "depprune.verify",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0


def test_demo_prunes_and_round_trips(capsys):
    from depprune.demo import main

    main(["--layers", "1"])
    out = capsys.readouterr().out
    assert "DependencyGraph(6 groups" in out
    assert "hidden       256 -> 128  model.embed_tokens.weight[1]" in out
    assert "neurons      688 -> 344  model.layers.0.mlp.gate_proj.weight[0]" in out
    assert "save_pretrained + from_pretrained: same logits" in out


def test_readme_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "DependencyGraph(" in out
    assert re.search(r"parameters\s+25,557,032\s+[\d,]+", out)
    assert out.rstrip().endswith("torch.Size([1, 1000])")
