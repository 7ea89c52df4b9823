"""io stage, on the command line: the commands inspect, plan, apply and prune.

Each parses its options (:mod:`depprune.cli.options`), calls the library
(:mod:`depprune.io` for checkpoints), and prints the tables of
:mod:`depprune.cli.tables`; :func:`register` adds them to a typer app.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from depprune.cli.macs import macs_per_unit
from depprune.cli.options import (
    Calibration,
    Debug,
    GlobalRanking,
    ImportanceName,
    InputShape,
    Kinds,
    ModelArg,
    ModelOrPlanArg,
    OutDir,
    Overwrite,
    Quiet,
    Ratio,
    RoundTo,
    SeqLen,
    SrcDir,
    TensorParallelSize,
    _calibration,
    _checked_output_file,
    _importance,
    _kinds_option,
    _options,
    _shape_option,
)
from depprune.cli.progress import _status, _Transfer
from depprune.cli.summaries import _model_summary, _params, _plan_file_summary, _plan_summary
from depprune.cli.tables import _console, _print_model, _print_plan, _print_report

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the four commands to ``app``, in the order ``--help`` lists them.

    >>> app = typer.Typer()
    >>> register(app)
    >>> [command.name for command in app.registered_commands]
    ['inspect', 'plan', 'apply', 'prune']
    """
    app.command("inspect")(_inspect)
    app.command("plan")(_plan)
    app.command("apply")(_apply)
    app.command("prune")(_prune)


def _inspect(
    ctx: typer.Context,
    model: ModelOrPlanArg,
    input_shape: InputShape = None,
    seq_len: SeqLen = 8,
    dot: Annotated[
        Path | None, typer.Option("--dot", metavar="FILE", help="Write the graph as Graphviz DOT.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", metavar="FILE", help="Write the graph as an HTML page.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Show a model's prunable groups, layer sizes and what is frozen, or what a plan file cuts.

    Zoo models and checkpoints are built on the meta device: nothing is read or allocated, so
    inspecting a 70B checkpoint takes seconds.
    """
    options = _options(ctx, quiet, debug)
    console = _console()
    if model.endswith(".npz"):
        summary = _plan_file_summary(Path(model))
        if as_json:
            print(json.dumps(summary, indent=2))
        elif not options.quiet:
            _print_plan(console, summary, only_cut=False, title=f"Plan {model}")
        return
    import depprune
    from depprune.cli.models import resolve_model

    shape = _shape_option(input_shape)
    status = _console(stderr=True)
    with _status(status, f"tracing {model}", not options.quiet):
        resolved = resolve_model(model, input_shape=shape, seq_len=seq_len, device="meta")
        graph = depprune.trace(resolved.model, resolved.example_inputs)
        macs = macs_per_unit(graph, resolved.model, resolved.example_inputs)
    if dot is not None:
        _checked_output_file(dot)
        graph.to_dot(dot)
    if html is not None:
        _checked_output_file(html)
        graph.to_html(html, title=f"depprune inspect {model}")
    summary = _model_summary(resolved, graph, macs)
    if as_json:
        print(json.dumps(summary, indent=2))
    elif not options.quiet:
        _print_model(console, summary)
        for path in (dot, html):
            if path is not None:
                console.print(f"Wrote {path}")


def _plan(
    ctx: typer.Context,
    model: ModelArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Plan file to write (.npz; replaced if it exists).",
        ),
    ],
    ratio: Ratio = 0.5,
    kinds: Kinds = None,
    importance: ImportanceName = "l2",
    round_to: RoundTo = None,
    global_ranking: GlobalRanking = False,
    tensor_parallel: TensorParallelSize = None,
    calibration: Calibration = None,
    input_shape: InputShape = None,
    seq_len: SeqLen = 8,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Choose what to remove and save it as a plan file; the model is not changed.

    A checkpoint directory is scored from its files a tensor at a time (depprune.io); other
    models are built with their initial weights (zoo models have no pretrained ones here).
    """
    options = _options(ctx, quiet, debug)
    wanted = _kinds_option(kinds)
    shape = _shape_option(input_shape)
    _checked_output_file(output)
    batches = _calibration(calibration)
    extra = {
        "round_to": round_to,
        "global_ranking": global_ranking,
        "tensor_parallel": tensor_parallel,
    }
    status = _console(stderr=True)
    with _status(status, f"planning {model}", not options.quiet):
        import depprune
        from depprune.cli.models import resolve_model

        # A checkpoint is built on meta and scored from its files; anything else on the CPU.
        resolved = resolve_model(model, input_shape=shape, seq_len=seq_len, device="cpu")
        skeleton = resolved.model
        if resolved.source == "checkpoint":
            from depprune.io import plan_checkpoint

            plan = plan_checkpoint(
                model,
                ratio=ratio,
                kinds=wanted,
                importance=importance,
                calibration=batches,
                example_inputs=resolved.example_inputs,
                progress=False,
                **extra,
            )
        else:
            plan = depprune.make_plan(
                skeleton,
                resolved.example_inputs,
                ratio=ratio,
                kinds=wanted,
                importance=_importance(importance, skeleton, batches),
                progress=False,
                **extra,
            )
        _record_choices(plan, model, ratio, wanted, importance, round_to, global_ranking)
        plan.save(output)
    if not options.quiet:
        summary = _plan_summary(plan, _params(skeleton), plan.params_after(skeleton))
        _print_plan(_console(), summary, only_cut=True, title=f"Plan for {model}")
        _console().print(f"Wrote {output}")


def _record_choices(plan: Any, model: Any, ratio, kinds, importance, round_to, global_ranking):
    """Record in the plan file how it was made (what the library recorded itself wins)."""
    made = {
        "model": os.fspath(model),
        "ratio": ratio,
        "kinds": list(kinds) if kinds else None,
        "importance": importance,
        "round_to": round_to,
        "global_ranking": global_ranking,
    }
    plan.choices = {**made, **plan.choices}


def _apply(
    ctx: typer.Context,
    src_dir: SrcDir,
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="A plan file (.npz).")],
    output: OutDir,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Write SRC_DIR pruned by a plan file to OUT_DIR, one tensor at a time.

    The plan is proved on the architecture config.json describes first; nothing is written
    if it does not hold. OUT_DIR appears only once it is complete.
    """
    from depprune.io import apply_to_checkpoint
    from depprune.plan import Plan

    options = _options(ctx, quiet, debug)
    if not plan_file.is_file():
        raise FileNotFoundError(2, "no such plan file", os.fspath(plan_file))
    plan = Plan.load(plan_file)
    console = _console(stderr=True)
    with _Transfer(console, "writing", not options.quiet) as progress:
        report = apply_to_checkpoint(
            src_dir, plan, output, overwrite=overwrite, progress=False, callback=progress
        )
    if not options.quiet:
        _print_report(_console(), report)


def _prune(
    ctx: typer.Context,
    src_dir: SrcDir,
    output: OutDir,
    ratio: Ratio = 0.5,
    kinds: Kinds = None,
    importance: ImportanceName = "l2",
    round_to: RoundTo = None,
    global_ranking: GlobalRanking = False,
    tensor_parallel: TensorParallelSize = None,
    calibration: Calibration = None,
    input_shape: InputShape = None,
    seq_len: SeqLen = 8,
    save_plan: Annotated[
        Path | None,
        typer.Option("--save-plan", metavar="FILE", help="Also save the plan to FILE (.npz)."),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Plan and write a pruned checkpoint in one go (plan, then apply), a tensor at a time."""
    from depprune.cli.models import resolve_model
    from depprune.io import prune_checkpoint

    options = _options(ctx, quiet, debug)
    wanted = _kinds_option(kinds)
    shape = _shape_option(input_shape)
    if save_plan is not None:
        _checked_output_file(save_plan)
    batches = _calibration(calibration)
    example_inputs = None  # depprune.io's own, and its error for what is not a checkpoint
    if (src_dir / "config.json").is_file():
        spec = os.fspath(src_dir)
        example_inputs = resolve_model(spec, input_shape=shape, seq_len=seq_len).example_inputs
    console = _console(stderr=True)
    with _Transfer(console, "pruning", not options.quiet) as progress:
        plan, report = prune_checkpoint(
            src_dir,
            output,
            overwrite=overwrite,
            progress=False,
            callback=progress,
            ratio=ratio,
            kinds=wanted,
            importance=importance,
            calibration=batches,
            example_inputs=example_inputs,
            seq_len=seq_len,
            round_to=round_to,
            global_ranking=global_ranking,
            tensor_parallel=tensor_parallel,
        )
    if save_plan is not None:
        _record_choices(plan, src_dir, ratio, wanted, importance, round_to, global_ranking)
        plan.save(save_plan)
    if not options.quiet:
        out = _console()
        summary = _plan_summary(plan, report.params_before, report.params_after)
        _print_plan(out, summary, only_cut=True, title=f"Plan for {src_dir}")
        _print_report(out, report)
        if save_plan is not None:
            out.print(f"Wrote {save_plan}")
