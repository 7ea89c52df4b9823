"""io stage, on the command line: ``depprune inspect | plan | apply | prune``.

Takes a MODEL (a Hugging Face checkpoint directory, a ``package.module:callable``
or a torchvision/timm name, see :func:`depprune.cli_models.resolve_model`), a
plan file or a checkpoint directory, and gives tables on the terminal, plan
files, and pruned checkpoints written a tensor at a time (:mod:`depprune.io`),
so a checkpoint larger than memory prunes::

    depprune inspect ./llama-3-8b                 # groups, layer sizes, what is frozen
    depprune plan ./llama-3-8b --ratio 0.25 -o plan.npz
    depprune inspect plan.npz                     # what a plan file cuts
    depprune apply ./llama-3-8b plan.npz -o ./llama-pruned
    depprune prune ./llama-3-8b -o ./llama-pruned --ratio 0.25 --kinds neurons

Exit codes: 0 success, 1 a depprune error (bad model, plan or checkpoint; a
missing file), 2 a usage error (a bad option), 3 an internal error (a bug:
rerun with ``--debug`` for the traceback), 130 interrupted. Errors print one
line, ``error: <message>``, on stderr.

>>> main(["--version"])  # doctest: +ELLIPSIS
depprune ...
0
>>> import contextlib, io, json
>>> with contextlib.redirect_stdout(io.StringIO()) as out:
...     code = main(["inspect", "resnet18", "--json"])  # built on meta: nothing allocated
>>> code, json.loads(out.getvalue())["totals"]["groups"]
(0, 12)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["LayerRow", "app", "group_rows", "layer_rows", "macs_per_unit", "main"]

#: Exit codes, as ``depprune --help`` documents them.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_EPILOG = (
    "Exit codes: 0 success; 1 depprune error (bad model, plan or checkpoint, missing file); "
    "2 usage error (bad option or argument); 3 internal error (a bug: rerun with --debug and "
    "report it); 130 interrupted.\n\n"
    "Examples: depprune inspect resnet18 | depprune plan ./llama --ratio 0.25 -o plan.npz | "
    "depprune apply ./llama plan.npz -o ./llama-pruned"
)

# typer 0.29 vendors click: its exception classes, found through the public BadParameter.
_ClickException, _UsageError = (
    next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
    for name in ("ClickException", "UsageError")
)

app = typer.Typer(
    name="depprune",
    help="Structural pruning of PyTorch models and of checkpoints larger than memory.\n\n"
    "MODEL is a Hugging Face checkpoint directory (config.json and safetensors), a "
    "package.module:callable that returns an nn.Module, or a torchvision or timm model name; "
    "checkpoints are read a tensor at a time, never loaded whole.",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class _Options:
    quiet: bool = False
    debug: bool = False


# The options every command takes (before or after its name).
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print nothing but errors (inspect --json still prints its JSON)."
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]


def _version(value: bool) -> None:
    if value:
        print(f"depprune {_installed_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    quiet: Quiet = False,
    debug: Debug = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The options before the command's name, for every command."""
    ctx.obj = _Options(quiet=quiet, debug=debug)


def _options(ctx: typer.Context, quiet: bool, debug: bool) -> _Options:
    """The root's options merged with the command's; quiet mode silences logs and warnings."""
    options = ctx.obj if isinstance(ctx.obj, _Options) else _Options()
    options.quiet |= quiet
    options.debug |= debug
    if options.quiet:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
    return options


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("depprune")
    except PackageNotFoundError:
        import depprune

        return depprune.__version__


# ---------------------------------------------------------------------------------------------
# What inspect shows, as data (tested without a terminal).


@dataclass(frozen=True)
class LayerRow:
    """Modules with the same type and parameter shapes, their indices condensed."""

    #: The module name with each repeated index condensed, e.g. ``layers.{0-31}.mlp``.
    module: str
    type: str
    #: (parameter name, shape) of every parameter the module holds itself.
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    #: How many modules the row stands for.
    count: int
    #: Parameters of those modules (a tensor tied to an earlier one is not counted again).
    params: int


def layer_rows(model: Any) -> list[LayerRow]:
    """The modules that hold parameters, repeated blocks condensed into one row each.

    >>> import torch
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)], torch.nn.Linear(4, 2))
    >>> for row in layer_rows(model):
    ...     print(row.module, row.type, row.tensors, row.count, row.params)
    {0-2} Linear (('weight', (4, 4)), ('bias', (4,))) 3 60
    3 Linear (('weight', (2, 4)), ('bias', (2,))) 1 10
    """
    rows: dict[tuple, list] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        tensors = tuple(
            (attr, tuple(param.shape)) for attr, param in module.named_parameters(recurse=False)
        )
        if not tensors:
            continue
        fresh = 0
        for param in module.parameters(recurse=False):
            fresh += 0 if id(param) in seen else param.numel()
            seen.add(id(param))
        parts = name.split(".") if name else []
        template = tuple("#" if part.isdigit() else part for part in parts)
        numbers = tuple(int(part) for part in parts if part.isdigit())
        key = (template, type(module).__name__, tensors)
        row = rows.setdefault(key, [[], 0])
        row[0].append(numbers)
        row[1] += fresh
    result = []
    for (template, type_name, tensors), (numbers, params) in rows.items():
        columns = iter(zip(*numbers, strict=True)) if numbers and numbers[0] else iter(())
        parts = [
            part if part != "#" else _condensed(sorted(set(next(columns)))) for part in template
        ]
        result.append(
            LayerRow(".".join(parts) or "(model)", type_name, tensors, len(numbers), params)
        )
    return result


def _condensed(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``{0-2,5}``; one value as itself."""
    if len(values) == 1:
        return str(values[0])
    runs: list[str] = []
    start = previous = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if value is not None:
            start = previous = value
    return "{" + ",".join(runs) + "}"


def macs_per_unit(graph: Any, model: Any, example_inputs: Any) -> dict[int, int] | str:
    """Multiply-accumulates of the weight layers removed with one unit of each group.

    One forward pass of a meta-device twin under torch's ``FlopCounterMode``
    gives each module's own MACs (its total less its children's); a
    module's MACs are shared over its weight matrices by size (exact for
    Linear and convolution layers) and a unit removes, from each member's
    weight, the share of the indices it covers. Attention score products
    and other MACs between activations are not counted. Returns the reason
    as a string when the model cannot be counted.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> inputs = torch.zeros(3, 8)
    >>> macs_per_unit(depprune.trace(model, inputs), model, inputs)  # 3 rows x (8 in + 4 out)
    {0: 36}
    """
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from depprune.shadow import meta_inputs, meta_shadow
    from depprune.tracer import model_inputs, running_stats_kept

    try:
        twin = meta_shadow(model)
        args, kwargs = model_inputs(twin, meta_inputs(example_inputs))
    except Exception as exc:
        return f"the model has no meta-device twin to count on ({type(exc).__name__})"
    counted = None
    for grad in (False, True):  # FlopCounterMode fails under no_grad on some models
        counter = FlopCounterMode(display=False)
        try:
            with torch.set_grad_enabled(grad), running_stats_kept(twin), counter:
                twin(*args, **kwargs)
        except Exception as exc:
            counted = f"torch's FlopCounterMode cannot run it ({type(exc).__name__})"
            continue
        counted = counter.get_flop_counts()
        break
    if isinstance(counted, str) or counted is None:
        return counted or "nothing was counted"
    root = type(twin).__name__
    totals = {
        key[len(root) + 1 :] if key != root else "": sum(ops.values())
        for key, ops in counted.items()
        if key == root or key.startswith(root + ".")
    }
    macs_of: dict[int, float] = {}
    for name, module in twin.named_modules():
        prefix = f"{name}." if name else ""
        own = totals.get(name, 0) - sum(
            totals.get(prefix + child, 0) for child, _ in module.named_children()
        )
        weights = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
        size = sum(p.numel() for p in weights)
        for param in weights:
            macs_of[id(param)] = macs_of.get(id(param), 0) + own / 2 * param.numel() / size
    tensors = dict(twin.named_parameters(remove_duplicate=False))
    result = {}
    for group in graph.groups:
        total, counted_members = 0.0, set()
        for (name, dim), unit_map in graph.unit_maps(group).items():
            param = tensors.get(name)
            if param is None or (id(param), dim) in counted_members:
                continue  # a buffer, or a tied tensor listed under a second name
            counted_members.add((id(param), dim))
            covered = int(np.count_nonzero(unit_map >= 0))
            total += macs_of.get(id(param), 0.0) * covered / param.shape[dim] / group.size
        result[group.index] = round(total)
    return result


def group_rows(graph: Any, macs: dict[int, int] | None = None) -> list[dict[str, Any]]:
    """One dict per group: index, kind, units, params per unit, MACs per unit, members.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> group_rows(depprune.trace(model, torch.zeros(1, 2)))
    [{'index': 0, 'kind': 'neurons', 'units': 3, 'params_per_unit': 4, 'macs_per_unit': None, \
'members': [['0.weight', 0], ['0.bias', 0], ['2.weight', 1]]}]
    """
    return [
        {
            "index": g.index,
            "kind": g.kind,
            "units": g.size,
            "params_per_unit": g.params_per_unit,
            "macs_per_unit": (macs or {}).get(g.index),
            "members": [[name, dim] for name, dim in g.members],
        }
        for g in graph.groups
    ]


# ---------------------------------------------------------------------------------------------
# Output.


def _console(stderr: bool = False) -> Console:
    # Pipes and files get wide tables rather than rich's 80 columns.
    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() or "COLUMNS" in os.environ else 120
    return Console(stderr=stderr, markup=False, highlight=False, width=wide)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _kept(before: int, after: int) -> str:
    return f"{after / before:.1%}" if before else "-"


def _member(members: Sequence) -> str:
    name, dim = members[0]
    more = f"  (+{len(members) - 1} more)" if len(members) > 1 else ""
    return f"{name}[{dim}]{more}"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _bytes(count: int) -> str:
    from rich.filesize import decimal

    return decimal(count)


def _print_model(console: Console, summary: dict[str, Any]) -> None:
    groups, totals = summary["groups"], summary["totals"]
    console.print(
        f"{summary['class']} from {summary['name']} ({summary['source']}), traced on "
        f"{summary['inputs']}"
    )
    with_macs = isinstance(summary["macs"], dict)
    table = Table(title="Prunable groups", title_justify="left", header_style="bold")
    table.add_column("group", justify="right")
    table.add_column("kind")
    table.add_column("units", justify="right")
    table.add_column("params/unit", justify="right")
    if with_macs:
        table.add_column("MACs/unit", justify="right")
    table.add_column("first member", overflow="fold")
    for g in groups:
        cells = [
            str(g["index"]),
            g["kind"] or "-",
            _count(g["units"]),
            _count(g["params_per_unit"]),
        ]
        if with_macs:
            cells.append(_count(g["macs_per_unit"]))
        table.add_row(*cells, _member(g["members"]))
    console.print(table)
    if with_macs:
        console.print(
            "MACs/unit: the weight layers' multiply-accumulates one unit removes at this input "
            "shape (attention scores between activations not counted)."
        )
    else:
        console.print(f"MACs/unit not shown: {summary['macs']}.")
    layers = Table(title="Layers (repeated blocks condensed)", title_justify="left")
    layers.add_column("module", overflow="fold")
    layers.add_column("type")
    layers.add_column("tensors", overflow="fold")
    layers.add_column("count", justify="right")
    layers.add_column("params", justify="right")
    for row in summary["layers"]:
        tensors = ", ".join(f"{name} {_shape(shape)}" for name, shape in row["tensors"])
        layers.add_row(
            row["module"], row["type"], tensors, str(row["count"]), _count(row["params"])
        )
    console.print(layers)
    frozen = summary["frozen"]
    if frozen["unsupported_ops"]:
        ops = ", ".join(f"{op} x{n}" for op, n in frozen["unsupported_ops"].items())
        console.print(f"Frozen: ops without an axis rule (the axes they touch stay whole): {ops}")
    for note in frozen["notes"]:
        console.print(f"Frozen: {note}")
    if frozen["conflicts"]:
        console.print(
            f"Frozen: {frozen['conflicts']} equation(s) whose structure repeats a unit in a "
            "product could only be kept whole"
        )
    if not (frozen["unsupported_ops"] or frozen["notes"] or frozen["conflicts"]):
        console.print(
            "Frozen: only the sizes of the model's inputs and outputs (every op has a rule, "
            "and the trace noted nothing)."
        )
    by_kind = ", ".join(f"{kind} {units:,}" for kind, units in totals["units_by_kind"].items())
    console.print(
        f"Total: {totals['params']:,} parameters, {totals['groups']} groups, "
        f"{totals['units']:,} prunable units ({by_kind or 'none'})"
    )


def _plan_table(groups: Sequence[dict[str, Any]], only_cut: bool, title: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("group", justify="right")
    table.add_column("kind")
    table.add_column("units", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("first member", overflow="fold")
    for g in groups:
        if only_cut and g["kept"] == g["size"]:
            continue
        table.add_row(
            str(g["index"]),
            g["kind"] or "-",
            f"{g['size']:,} -> {g['kept']:,}",
            _kept(g["size"], g["kept"]),
            g["first_member"],
        )
    return table


def _print_plan(
    console: Console, summary: dict[str, Any], *, only_cut: bool, title: str = "Plan"
) -> None:
    groups, totals = summary["groups"], summary["totals"]
    made = _made_with(summary)
    if made:
        console.print(made)
    console.print(_plan_table(groups, only_cut, title))
    reasons = _reasons(summary.get("kept_whole"))
    untouched = sum(g["kept"] == g["size"] for g in groups) - len(reasons)
    if only_cut and untouched > 0:
        console.print(
            f"{untouched} group(s) not cut (other kinds, a ratio that removes no unit, round_to, "
            "or factors of a width another group cuts)"
        )
    for reason in reasons:
        console.print(f"Kept whole: {reason}")
    before, after = totals.get("params_before"), totals.get("params_after")
    sizes = (
        f"; parameters {before:,} -> {after:,} ({_kept(before, after)} kept)"
        if before is not None and after is not None
        else ""
    )
    console.print(
        f"Total: {totals['groups_cut']} of {len(groups)} groups cut, "
        f"{totals['units_removed']:,} units removed, {totals['tensors_cut']} tensors cut{sizes}"
    )


def _made_with(summary: dict[str, Any]) -> str:
    """Which architecture a plan is for and how it was made, from its summary's records."""
    parts = []
    architecture = summary.get("architecture") or {}
    if architecture.get("class"):
        kind = f" ({architecture['model_type']})" if architecture.get("model_type") else ""
        parts.append(f"for {architecture['class']}{kind}")
    choices = {k: v for k, v in (summary.get("choices") or {}).items() if v not in (None, False)}
    if choices:
        parts.append("made with " + ", ".join(f"{k}={_value(v)}" for k, v in choices.items()))
    if summary.get("version"):
        parts.append(
            f"plan file version {summary['version']}"
            + (
                f", depprune {summary['depprune_version']}"
                if summary.get("depprune_version")
                else ""
            )
        )
    return "Plan " + "; ".join(parts) if parts else ""


def _value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _print_report(console: Console, report: Any) -> None:
    table = Table(title="Checkpoint written", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    rate = (report.bytes_read + report.bytes_written) / report.seconds if report.seconds else 0
    table.add_row("output", os.fspath(report.out_dir))
    table.add_row("tensors", f"{report.tensors:,} ({report.tensors_cut:,} cut)")
    table.add_row(
        "parameters",
        f"{report.params_before:,} -> {report.params_after:,} "
        f"({_kept(report.params_before, report.params_after)} kept)",
    )
    table.add_row("read", _bytes(report.bytes_read))
    table.add_row("written", _bytes(report.bytes_written))
    table.add_row("time", f"{report.seconds:.2f} s")
    table.add_row("throughput", f"{_bytes(int(rate))}/s (read + written)")
    for label, names in (("files copied", report.copied), ("files left out", report.skipped)):
        if names:
            table.add_row(label, ", ".join(names))
    if report.unmatched:
        more = f" (+{len(report.unmatched) - 5} more)" if len(report.unmatched) > 5 else ""
        table.add_row("copied uncut", ", ".join(report.unmatched[:5]) + more)
    console.print(table)


class _Transfer:
    """A rich progress bar over bytes and tensors, fed by the io callback.

    Shown only on a terminal and when not quiet; a no-op callback otherwise.
    """

    def __init__(self, console: Console, label: str, enabled: bool) -> None:
        self._progress = None
        if enabled and console.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn(label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[tensors]}"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._progress.add_task(label, total=None, tensors="")

    def __enter__(self) -> _Transfer:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, bytes_done: int, bytes_total: int, tensors_done: int, tensors_total: int):
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=bytes_done,
                total=bytes_total,
                tensors=f"{tensors_done}/{tensors_total} tensors",
            )


@contextlib.contextmanager
def _status(console: Console, text: str, enabled: bool) -> Iterator[None]:
    """A spinner for a step with no progress to count (tracing, planning), on a terminal."""
    if enabled and console.is_terminal:
        with console.status(text):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# Argument parsing helpers.


def _shape_option(text: str | None) -> tuple[int, ...] | None:
    from depprune.cli_models import parse_shape

    if text is None:
        return None
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--input-shape'") from None


def _kinds_option(text: str | None) -> tuple[str, ...] | None:
    from depprune.kinds import KINDS

    if text is None:
        return None
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise typer.BadParameter(
            f"{text!r} holds {'unknown kinds ' + ', '.join(unknown) if unknown else 'no kind'}; "
            f"choose from {','.join(KINDS)}",
            param_hint="'--kinds'",
        )
    return kinds


def _calibration(path: Path | None) -> list | None:
    """Calibration batches from a .pt (a tensor, or a list of batches) or .npy file of token ids.

    A tensor or array of token ids of shape (samples, length) is split into
    batches of 8 samples.
    """
    if path is None:
        return None
    import numpy as np
    import torch

    from depprune.errors import ImportanceError

    if not path.is_file():
        raise FileNotFoundError(2, "no such calibration file", os.fspath(path))
    try:
        if path.suffix == ".npy":
            data: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ImportanceError(
            f"cannot read calibration file {os.fspath(path)!r} ({type(exc).__name__}: {exc}); "
            "save token ids with torch.save(tensor, 'calib.pt') or numpy.save"
        ) from exc
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            data = data.unsqueeze(0)
        return list(torch.split(data, 8))
    if isinstance(data, (list, tuple)) and data:
        return list(data)
    raise ImportanceError(
        f"calibration file {os.fspath(path)!r} holds a {type(data).__name__}; save a tensor of "
        "token ids (samples, length) or a non-empty list of input batches"
    )


def _importance(name: str, model: Any, calibration: list | None) -> Any:
    """The criterion of a name, for a model in memory (checkpoints use depprune.io's)."""
    from depprune.errors import ImportanceError
    from depprune.importance import magnitude, random, wanda

    if name == "wanda":
        if calibration is None:
            raise ImportanceError("--importance wanda needs --calibration FILE (token ids)")
        return wanda(model, calibration, progress=False)
    return {"l2": magnitude(2), "l1": magnitude(1), "random": random(0)}[name]


def _checked_output_file(path: Path) -> None:
    """Fail before the work when a file could not be written where asked."""
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(2, "no such directory for the output file", os.fspath(parent))
    if path.is_dir():
        raise IsADirectoryError(21, "the output is a directory, not a file", os.fspath(path))


def _params(model: Any) -> int:
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def _plan_summary(
    plan: Any, params_before: int | None = None, params_after: int | None = None
) -> dict[str, Any]:
    """``plan.summary()`` (what a plan file records), counts filled in where it has none."""
    summary = plan.summary()
    totals = summary["totals"]
    if totals.get("params_before") is None:
        totals["params_before"], totals["params_after"] = params_before, params_after
    return summary


def _plan_file_summary(path: Path) -> dict[str, Any]:
    """What a plan file cuts: its summary.json, read without loading the plan's arrays."""
    from depprune.errors import InvalidPlanError
    from depprune.plan import Plan, read_summary

    if not path.is_file():
        raise FileNotFoundError(2, "no such plan file", os.fspath(path))
    try:
        return read_summary(path)
    except InvalidPlanError:
        # A version-1 file has no summary.json; loading it says what else may be wrong.
        return _plan_summary(Plan.load(path))


def _reasons(kept_whole: Any) -> list[str]:
    """The kept-whole reasons of a summary: a list of {group, reason} (or a dict, or strings)."""
    items = kept_whole.values() if isinstance(kept_whole, dict) else kept_whole or []
    return [item["reason"] if isinstance(item, dict) else str(item) for item in items]


# ---------------------------------------------------------------------------------------------
# The commands.

_MODEL_HELP = (
    "A checkpoint directory (config.json + safetensors), a package.module:callable that "
    "returns an nn.Module, or a torchvision or timm model name"
)
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help=f"{_MODEL_HELP}.")]
ModelOrPlanArg = Annotated[
    str, typer.Argument(metavar="MODEL", help=f"{_MODEL_HELP}; or a plan file (.npz) to summarise.")
]
SrcDir = Annotated[
    Path, typer.Argument(metavar="SRC_DIR", help="The checkpoint directory to read.")
]
InputShape = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        metavar="SHAPE",
        help="Shape of the example input, e.g. 1,3,224,224 (vision default) or 1,128 (tokens).",
    ),
]
SeqLen = Annotated[
    int, typer.Option("--seq-len", min=1, help="Token count of a checkpoint's example input.")
]
Ratio = Annotated[
    float,
    typer.Option("--ratio", "-r", min=0.0, max=1.0, help="Share of each group's units to remove."),
]
Kinds = Annotated[
    str | None,
    typer.Option(
        "--kinds",
        metavar="K1,K2",
        help="Kinds of groups to prune: hidden, heads, head_dim, neurons, channels, conv_groups "
        "[default: every kind]",
        show_default=False,
    ),
]
ImportanceName = Annotated[
    Literal["l2", "l1", "random", "wanda"],
    typer.Option(
        "--importance",
        "-i",
        help="How units are scored: l2/l1 magnitude, random, or wanda (needs --calibration).",
    ),
]
RoundTo = Annotated[
    int | None, typer.Option("--round-to", min=1, help="Keep a multiple of N units per group.")
]
GlobalRanking = Annotated[
    bool, typer.Option("--global", help="Rank the groups of a scope together, not each alone.")
]
Calibration = Annotated[
    Path | None,
    typer.Option(
        "--calibration",
        metavar="FILE",
        help="Token ids for wanda: a .pt (tensor or list of batches) or .npy file.",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace OUT_DIR once the new checkpoint is complete.")
]
OutDir = Annotated[
    Path,
    typer.Option(
        "--output", "-o", metavar="OUT_DIR", help="Directory to write the pruned checkpoint to."
    ),
]


@app.command("inspect")
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
    from depprune.cli_models import resolve_model

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


def _model_summary(resolved: Any, graph: Any, macs: dict[int, int] | str) -> dict[str, Any]:
    import torch

    inputs = resolved.example_inputs
    tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
    shapes = {
        name: list(t.shape)
        for name, t in zip(inputs if isinstance(inputs, dict) else ["input"], tensors, strict=True)
        if isinstance(t, torch.Tensor)
    }
    by_kind: dict[str, int] = {}
    for g in graph.groups:
        by_kind[g.kind or "-"] = by_kind.get(g.kind or "-", 0) + g.size
    return {
        "name": resolved.name,
        "source": resolved.source,
        "class": type(resolved.model).__name__,
        "inputs": shapes,
        "macs": macs if isinstance(macs, dict) else f"{macs}",
        "groups": group_rows(graph, macs if isinstance(macs, dict) else None),
        "layers": [
            {**vars(row), "tensors": [[n, list(s)] for n, s in row.tensors]}
            for row in layer_rows(resolved.model)
        ],
        "frozen": {
            "unsupported_ops": dict(graph.unsupported_ops),
            "notes": list(graph.notes),
            "conflicts": len(graph.conflicts),
        },
        "totals": {
            "params": _params(resolved.model),
            "groups": len(graph.groups),
            "units": graph.num_units,
            "units_by_kind": by_kind,
        },
    }


@app.command("plan")
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
    extra = {"round_to": round_to, "global_ranking": global_ranking}
    status = _console(stderr=True)
    with _status(status, f"planning {model}", not options.quiet):
        import depprune
        from depprune.cli_models import resolve_model

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


@app.command("apply")
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


@app.command("prune")
def _prune(
    ctx: typer.Context,
    src_dir: SrcDir,
    output: OutDir,
    ratio: Ratio = 0.5,
    kinds: Kinds = None,
    importance: ImportanceName = "l2",
    round_to: RoundTo = None,
    global_ranking: GlobalRanking = False,
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
    from depprune.cli_models import resolve_model
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


# ---------------------------------------------------------------------------------------------
# The entry point.


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    # Plain writes: rich would wrap a long message over several lines.
    sys.stderr.write(f"error: {_one_line(message)}\n")
    sys.stderr.flush()


def _oserror_text(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {os.fspath(exc.filename)!r}"
    return str(exc)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"warning: {_one_line(str(message))}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     code = main(["plan", "resnet18", "--ratio", "2", "-o", "plan.npz"])
    >>> code, err.getvalue()  # doctest: +ELLIPSIS
    (2, "error: Invalid value for '--ratio' / '-r': ... (see 'depprune plan --help')\\n")
    """
    from depprune.errors import DeppruneError, InternalError

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        disabled = logging.root.manager.disable
        try:
            result = command.main(args, prog_name="depprune", standalone_mode=False)
            if result == EXIT_INTERRUPTED:  # typer turns Ctrl-C into this exit code
                _error(f"interrupted after {time.perf_counter() - started:.1f} s")
            return result if isinstance(result, int) else EXIT_OK
        except _UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                return EXIT_USAGE  # the help is printed already
            if debug:
                traceback.print_exc()
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _error(f"{exc.format_message()}{where}")
            return EXIT_USAGE
        except _ClickException as exc:
            _error(exc.format_message())
            return exc.exit_code
        except (typer.Abort, KeyboardInterrupt):
            _error(f"interrupted after {time.perf_counter() - started:.1f} s")
            return EXIT_INTERRUPTED
        except InternalError as exc:
            if debug:
                traceback.print_exc()
            _error(f"{exc} (a bug in depprune; rerun with --debug for the traceback and report it)")
            return EXIT_INTERNAL
        except DeppruneError as exc:
            if debug:
                traceback.print_exc()
            _error(str(exc))
            return EXIT_ERROR
        except OSError as exc:
            if debug:
                traceback.print_exc()
            _error(_oserror_text(exc))
            return EXIT_ERROR
        except Exception as exc:
            if debug:
                traceback.print_exc()
            detail = f"{type(exc).__name__}: {exc}"
            _error(
                f"internal error ({detail[:300]}); rerun with --debug for the traceback, and "
                "please report it"
            )
            return EXIT_INTERNAL
        finally:
            logging.disable(disabled)


if __name__ == "__main__":
    sys.exit(main())
