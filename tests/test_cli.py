"""The depprune command line: inspect, plan, apply and prune, their tables and their errors.

Each subcommand runs as a real process (``python -m depprune.cli``) on a tiny
model; the processes start together when the module does (each pays a 3-8 s
torch and transformers import), on a small pool, while the in-process tests
(MODEL resolution, the tables' data, the other error paths) run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_factories import tiny_convnet
from tiny_models import TINY_DECODER, tokens
from torch.utils.flop_counter import FlopCounterMode

import depprune
from depprune.apply import apply_kept_indices
from depprune.cli import group_rows, layer_rows, macs_per_unit, main
from depprune.cli.models import ModelSpecError, parse_shape, resolve_model

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")
depprune_io = pytest.importorskip("depprune.io")

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# Wide tables (no wrapping to match against), one thread, nothing fetched from the Hub.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
CONVNET = "tests.cli_factories:tiny_convnet"


def cli(*args: object) -> subprocess.CompletedProcess:
    """The command line as a user runs it, from the repository root."""
    command = [sys.executable, "-m", "depprune.cli", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama saved with save_pretrained (safetensors)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    path = tmp_path_factory.mktemp("cli") / "llama"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plan_file(checkpoint, tmp_path_factory) -> Path:
    """The library's plan for the checkpoint (what `depprune plan` must write), saved."""
    path = tmp_path_factory.mktemp("plans") / "plan.npz"
    depprune_io.plan_checkpoint(
        checkpoint, ratio=0.5, kinds=("heads", "neurons"), importance="l2", progress=False
    ).save(path)
    return path


HAS_PICTURES = hasattr(depprune.DependencyGraph, "to_dot")


class Runs:
    """The processes of this file, started together; ``result(name)`` waits for one."""

    def __init__(self, work: Path, futures: dict[str, Future]) -> None:
        self.work, self._futures = work, futures

    def result(self, name: str) -> subprocess.CompletedProcess:
        return self._futures[name].result()


@pytest.fixture(scope="module", autouse=True)
def runs(checkpoint, plan_file, tmp_path_factory) -> Runs:
    """Every process of this file, started at once (autouse: they overlap the other tests)."""
    work = tmp_path_factory.mktemp("runs")
    pictures = ["--dot", work / "graph.dot", "--html", work / "graph.html"] if HAS_PICTURES else []
    missing = work / "missing"
    jobs = {
        "inspect zoo": ("inspect", "resnet18", *pictures),
        "inspect callable": ("inspect", CONVNET, "--input-shape", "1,3,8,8", "--json"),
        "inspect checkpoint": ("inspect", checkpoint, "--seq-len", 4),
        "plan": ("plan", checkpoint, "-r", 0.5, "--kinds", "heads,neurons", "-o", work / "plan.npz"),
        "apply": ("apply", checkpoint, plan_file, "-o", work / "applied"),
        "prune": (
            "prune", checkpoint, "-o", work / "pruned", "--ratio", 0.25, "--kinds", "neurons",
            "--tensor-parallel", 2, "--save-plan", work / "pruned.npz", "--quiet",
        ),
        "debug": ("inspect", missing, "--debug"),
    }  # fmt: skip
    pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    yield Runs(work, {name: pool.submit(cli, *args) for name, args in jobs.items()})
    # With -k selecting a few tests, the runs no test waited for and not yet started are dropped.
    pool.shutdown(wait=True, cancel_futures=True)


def loaded(path: Path):
    model, info = transformers.LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    # Every tensor came from the files, none was initialised for a missing or resized one.
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_logits_of_plan(src: Path, out: Path, plan: depprune.Plan) -> None:
    """The written checkpoint computes what the plan applied in memory computes."""
    expected = loaded(src)
    plan.apply(expected)
    batch = tokens(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(out)(batch).logits, expected(batch).logits, rtol=0, atol=0
        )


# ---------------------------------------------------------------------------------------------
# MODEL resolution and the tables' data, in-process.


def test_zoo_names_are_built_on_meta_with_their_input_shapes():
    resnet = resolve_model("resnet18")
    assert resnet.source == "torchvision" and resnet.example_inputs.shape == (1, 3, 224, 224)
    assert {p.device.type for p in resnet.model.parameters()} == {"meta"}
    assert not resnet.model.training
    timm = pytest.importorskip("timm")
    vit = resolve_model("vit_tiny_patch16_384")
    assert vit.source == "timm" and {p.device.type for p in vit.model.parameters()} == {"meta"}
    # timm's configured input size, not the vision default.
    expected = timm.create_model("vit_tiny_patch16_384").pretrained_cfg["input_size"]
    assert tuple(vit.example_inputs.shape) == (1, *expected) == (1, 3, 384, 384)


def test_callables_and_checkpoints_resolve(checkpoint):
    convnet = resolve_model(CONVNET, input_shape=(2, 3, 9, 9))
    assert convnet.source == "callable" and convnet.example_inputs.shape == (2, 3, 9, 9)
    assert [p.shape for p in convnet.model.parameters()] == [
        p.shape for p in tiny_convnet().parameters()
    ]
    llama = resolve_model(os.fspath(checkpoint), seq_len=5)
    assert llama.source == "checkpoint" and llama.checkpoint == checkpoint
    ids = llama.example_inputs["input_ids"]
    assert ids.shape == (1, 5) and ids.dtype == torch.long and ids.device.type == "meta"
    assert {p.device.type for p in llama.model.parameters()} == {"meta"}


def test_bad_model_arguments_say_what_to_do(tmp_path):
    with pytest.raises(ModelSpecError, match=r"did you mean .*resnet18"):
        resolve_model("resnet_18")
    with pytest.raises(depprune.CheckpointError, match="no such directory"):
        resolve_model(os.fspath(tmp_path / "missing"))
    with pytest.raises(depprune.CheckpointError, match=re.escape("without config.json")):
        resolve_model(os.fspath(tmp_path))
    with pytest.raises(ModelSpecError, match="has no attribute 'nothing'"):
        resolve_model("tests.cli_factories:nothing")
    with pytest.raises(ModelSpecError, match="returned an object of type int"):
        resolve_model("tests.cli_factories:not_a_model")
    with pytest.raises(ModelSpecError, match=re.escape("cannot import 'no_such_package.models'")):
        resolve_model("no_such_package.models:build")
    assert parse_shape("1,3,8,8") == (1, 3, 8, 8) and parse_shape("2x5") == (2, 5)
    for bad in ("", "1,,3", "1,0", "a,b"):
        with pytest.raises(ValueError, match="is not a shape"):
            parse_shape(bad)


def test_layer_rows_condense_repeated_blocks(checkpoint):
    model = depprune_io.load_skeleton(checkpoint)
    rows = {row.module: row for row in layer_rows(model)}
    q_proj = rows["model.layers.{0-1}.self_attn.q_proj"]
    assert (q_proj.type, q_proj.count, q_proj.tensors) == ("Linear", 2, (("weight", (32, 32)),))
    assert q_proj.params == 2 * 32 * 32
    # Rows cover every parameter once: their counts add up to the model's.
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(row.params for row in rows.values()) == sum(unique.values())
    assert sum(row.count for row in rows.values()) == sum(
        1 for m in model.modules() if any(True for _ in m.parameters(recurse=False))
    )


def flops(model, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return counter.get_total_flops() // 2


@pytest.mark.filterwarnings("ignore::depprune.ConfigWarning")  # one unit off a config's size
@pytest.mark.parametrize("which", ["convnet", "llama"])
def test_macs_per_unit_is_what_removing_one_unit_saves(which):
    if which == "convnet":
        model, inputs = tiny_convnet().eval(), torch.randn(2, 3, 6, 6)
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER)).eval()
        inputs = {"input_ids": tokens(seed=1)}
    graph = depprune.trace(model, inputs)
    macs = macs_per_unit(graph, model, inputs)
    # Exact where a unit's MACs are all in weight layers (attention scores are not counted).
    checked = [g for g in graph.groups if g.kind in ("channels", "neurons", "hidden")]
    assert checked and isinstance(macs, dict)
    for group in checked:
        cut = copy.deepcopy(model)
        apply_kept_indices(cut, graph.kept_indices({group.index: [group.size - 1]}))
        assert macs[group.index] == flops(model, inputs) - flops(cut, inputs), group
    rows = group_rows(graph, macs)
    assert [(r["index"], r["kind"], r["units"]) for r in rows] == [
        (g.index, g.kind, g.size) for g in graph.groups
    ]


# ---------------------------------------------------------------------------------------------
# Each subcommand as a process.


def test_inspect_a_torchvision_name_on_meta(runs):
    result = runs.result("inspect zoo")
    assert result.returncode == 0, result.stderr
    with torch.device("meta"):
        params = sum(p.numel() for p in torchvision.models.resnet18().parameters())
    assert f"Total: {params:,} parameters, 12 groups, 2,880 prunable units" in result.stdout
    assert "MACs/unit" in result.stdout and "layer1.{0-1}.conv2" in result.stdout
    if not HAS_PICTURES:
        pytest.skip(
            "DependencyGraph.to_dot/to_html are not in this checkout: --dot/--html untested"
        )
    assert (runs.work / "graph.dot").read_text().startswith("digraph")
    assert "<html" in (runs.work / "graph.html").read_text().lower()


def test_inspect_a_callable_as_json_matches_the_trace(runs):
    result = runs.result("inspect callable")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    model, inputs = tiny_convnet().eval(), torch.zeros(1, 3, 8, 8)
    graph = depprune.trace(model, inputs)
    assert report["groups"] == group_rows(graph, macs_per_unit(graph, model, inputs))
    assert report["inputs"] == {"input": [1, 3, 8, 8]} and report["source"] == "callable"
    assert report["totals"]["params"] == sum(p.numel() for p in model.parameters())
    assert report["totals"]["units"] == 8 + 6


def test_inspect_a_checkpoint(runs, checkpoint):
    result = runs.result("inspect checkpoint")
    assert result.returncode == 0, result.stderr
    graph = depprune.trace(
        depprune_io.load_skeleton(checkpoint),
        {"input_ids": torch.zeros(1, 4, dtype=torch.long, device="meta")},
    )
    units = sum(g.size for g in graph.groups)
    assert f"{len(graph.groups)} groups, {units:,} prunable units" in result.stdout
    assert "LlamaForCausalLM" in result.stdout and "{'input_ids': [1, 4]}" in result.stdout
    assert "model.layers.{0-1}.mlp.up_proj" in result.stdout
    for note in graph.notes:  # what the trace froze, and why
        assert note in result.stdout


def test_plan_on_a_checkpoint_is_the_library_plan(runs, plan_file):
    result = runs.result("plan")
    assert result.returncode == 0, result.stderr
    assert "Wrote" in result.stdout and "heads" in result.stdout
    plan = depprune.Plan.load(runs.work / "plan.npz")
    same = depprune.Plan.load(plan_file)
    assert plan.kept.keys() == same.kept.keys() and plan.kept
    assert all(np.array_equal(plan.kept[key], same.kept[key]) for key in plan.kept)


def test_apply_writes_what_the_plan_computes(runs, checkpoint, plan_file):
    result = runs.result("apply")
    assert result.returncode == 0, result.stderr
    assert "Checkpoint written" in result.stdout
    out = runs.work / "applied"
    assert_logits_of_plan(checkpoint, out, depprune.Plan.load(plan_file))


def test_prune_quietly_writes_the_checkpoint_and_its_plan(runs, checkpoint):
    result = runs.result("prune")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    work = runs.work
    plan = depprune.Plan.load(work / "pruned.npz")
    assert {g.kind for g in plan.groups if g.kept < g.size} == {"neurons"}
    # Each of two tensor-parallel ranks keeps the same share of its neurons.
    assert plan.choices["tensor_parallel"] == 2
    depprune.distributed.TensorParallel(2).check(plan)
    assert_logits_of_plan(checkpoint, work / "pruned", plan)


def test_debug_shows_the_traceback_of_an_error(runs):
    result = runs.result("debug")
    missing = runs.work / "missing"
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1] == (
        f"error: no such directory: {os.fspath(missing)!r}"
    )


# ---------------------------------------------------------------------------------------------
# The rest of the errors and the plan file's table, in-process (same code, no start-up cost).


def test_inspect_a_plan_file(plan_file, capsys):
    assert main(["inspect", os.fspath(plan_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    plan = depprune.Plan.load(plan_file)
    assert [(g["index"], g["size"], g["kept"]) for g in summary["groups"]] == [
        (g.index, g.size, g.kept) for g in plan.groups
    ]
    assert summary["totals"]["tensors_cut"] == len(plan.shapes)
    assert main(["inspect", os.fspath(plan_file)]) == 0
    table = capsys.readouterr().out
    cut = [g for g in plan.groups if g.kept < g.size]
    assert cut and all(f"{g.size} -> {g.kept}" in table for g in cut)
    assert f"{len(cut)} of {len(plan.groups)} groups cut" in table
    assert main(["-q", "inspect", os.fspath(plan_file)]) == 0  # quiet before the command too
    assert capsys.readouterr() == ("", "")


def test_plan_on_a_callable_is_make_plan_with_the_same_inputs(tmp_path, capsys):
    path, calibration = tmp_path / "plan.npz", tmp_path / "images.pt"
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.save(images, calibration)
    args = ["plan", CONVNET, "--input-shape", "1,3,8,8", "-r", "0.5", "-o", os.fspath(path)]
    assert main([*args, "-i", "wanda", "--calibration", os.fspath(calibration), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    model = tiny_convnet().eval()
    batches = list(torch.split(images, 8))  # how the command line batches a calibration tensor
    importance = depprune.importance.wanda(model, batches, progress=False)
    same = depprune.make_plan(model, torch.zeros(1, 3, 8, 8), ratio=0.5, importance=importance)
    plan = depprune.Plan.load(path)
    assert plan.kept.keys() == same.kept.keys() and plan.kept
    assert all(np.array_equal(plan.kept[key], same.kept[key]) for key in plan.kept)
    choices = depprune.plan.read_summary(path)["choices"]
    assert choices["ratio"] == 0.5 and choices["importance"] == "wanda"
    assert main([*args, "-i", "wanda"]) == 1  # wanda without calibration
    assert "--calibration" in one_error_line(capsys.readouterr().err)


def test_the_progress_bar_follows_the_io_callback():
    from rich.console import Console

    from depprune.cli.progress import _Transfer

    console = Console(file=StringIO(), force_terminal=True, width=100)
    with _Transfer(console, "writing", enabled=True) as progress:
        progress(3_000_000, 4_000_000, 5, 7)
    shown = console.file.getvalue()
    assert "5/7 tensors" in shown and "3.0/4.0 MB" in shown
    quiet = Console(file=StringIO(), force_terminal=True)
    with _Transfer(quiet, "writing", enabled=False) as progress:
        progress(1, 2, 1, 2)
    assert quiet.file.getvalue() == ""


def test_usage_errors_exit_2_on_one_line(checkpoint, tmp_path, capsys):
    out = os.fspath(tmp_path / "out")
    assert main(["prune", os.fspath(checkpoint), "-o", out, "-r", "1.5"]) == 2
    assert "--ratio" in one_error_line(capsys.readouterr().err)
    assert main(["plan", "resnet18", "-o", out, "--kinds", "heads,rows"]) == 2
    assert "unknown kinds rows" in one_error_line(capsys.readouterr().err)
    assert main(["inspect", "resnet18", "--input-shape", "1,x"]) == 2
    assert "is not a shape" in one_error_line(capsys.readouterr().err)


def test_depprune_errors_exit_1_on_one_line(checkpoint, plan_file, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["apply", os.fspath(missing), os.fspath(plan_file), "-o", str(tmp_path / "o")]) == 1
    assert os.fspath(missing) in one_error_line(capsys.readouterr().err)
    assert main(["inspect", os.fspath(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no such directory" in one_error_line(captured.err)
    assert main(["inspect", "resnet_18"]) == 1
    assert "did you mean resnet18" in one_error_line(capsys.readouterr().err)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not a zip at all")
    assert main(["inspect", os.fspath(corrupt)]) == 1
    assert "not a readable depprune plan" in one_error_line(capsys.readouterr().err)
    out = tmp_path / "taken"
    out.mkdir()
    args = ["apply", os.fspath(checkpoint), os.fspath(plan_file), "-o", os.fspath(out)]
    assert main([*args[:2], os.fspath(corrupt), *args[3:]]) == 1
    assert "not a readable depprune plan" in one_error_line(capsys.readouterr().err)
    assert main(args) == 1
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert not any(out.iterdir())  # nothing written into the taken directory
    assert main([*args, "--overwrite", "-q"]) == 0
    assert (out / "config.json").is_file() and capsys.readouterr() == ("", "")


def test_an_internal_error_asks_for_debug(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(depprune, "trace", broken)
    assert main(["inspect", "resnet18"]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "RuntimeError: boom" in line and "rerun with --debug" in line


def test_help_documents_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 success", "1 depprune error", "2 usage error", "3 internal error"):
        assert code in text
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"depprune {depprune.__version__}"
