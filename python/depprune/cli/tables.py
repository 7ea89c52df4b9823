"""io stage, on the command line: summaries of models, plans and checkpoints as rich tables.

Pipes and files get 120 columns unless COLUMNS says otherwise; a terminal its own width.

>>> _count(1234567), _kept(8, 6), _shape(()), _member([("fc.weight", 0), ("fc.bias", 0)])
('1,234,567', '75.0%', 'scalar', 'fc.weight[0]  (+1 more)')
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table


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


def _reasons(kept_whole: Any) -> list[str]:
    """The kept-whole reasons of a summary: a list of {group, reason} (or a dict, or strings)."""
    items = kept_whole.values() if isinstance(kept_whole, dict) else kept_whole or []
    return [item["reason"] if isinstance(item, dict) else str(item) for item in items]
