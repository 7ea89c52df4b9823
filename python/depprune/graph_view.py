"""io stage: a dependency graph drawn as Graphviz DOT text or as one offline HTML page.

Takes a :class:`~depprune.DependencyGraph` (from :func:`depprune.trace`) and
gives text: :func:`to_dot` for Graphviz (groups as coloured nodes, tensors in
clusters that follow the module tree, one edge per member labelled with its
dim) and :func:`to_html`, a self-contained page (inline CSS and JS, nothing
fetched) with the module tree coloured by group, a legend of the groups with a
filter by kind, the frozen dims, ops without a rule and the trace's notes.
Hovering a group or a module shows its members, units and parameters per unit.
Both write the text to ``path`` when one is given.

>>> import torch, depprune
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
>>> graph = depprune.trace(model, torch.zeros(1, 2))
>>> print(to_dot(graph).splitlines()[0])
digraph depprune {
>>> page = to_html(graph, title="mlp")
>>> page.startswith("<!DOCTYPE html>") and "depprune-data" in page
True
"""

from __future__ import annotations

import colorsys
import html
import json
import os
from importlib import resources
from typing import Any

import numpy as np

from depprune.errors import CheckpointError, InvalidPlanError
from depprune.graph import DependencyGraph

__all__ = ["to_dot", "to_html", "view_data"]

# Identical numbered siblings (layers.0, layers.1, ...) shown as one row from this many.
_MIN_RUN = 3
# Tree levels open when the page loads; deeper modules start collapsed.
_OPEN_DEPTH = 2
# Golden angle: consecutive groups get hues far apart.
_HUE_STEP = 137.508


def _color(index: int) -> str:
    """A light, distinct colour per group (dark text stays readable on it)."""
    lightness = (0.66, 0.74, 0.58)[index % 3]
    r, g, b = colorsys.hls_to_rgb((index * _HUE_STEP % 360) / 360, lightness, 0.72)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def _module_of(name: str) -> str:
    """The module a tensor belongs to: its name without the last component."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _checked(graph: object) -> DependencyGraph:
    if not isinstance(graph, DependencyGraph):
        raise InvalidPlanError(
            f"a graph picture draws a DependencyGraph; got {type(graph).__name__} "
            "(make one with depprune.trace(model, example_inputs))"
        )
    return graph


def view_data(graph: DependencyGraph) -> dict[str, Any]:
    """The picture's content as plain JSON-ready data (what :func:`to_html` embeds).

    ``params``: one entry per tensor with its module and, per traced dim,
    ``[dim, length, [[group, frozen indices], ...]]`` (no groups: frozen).
    ``modules``: the module tree (index 0 is the root); ``kids`` lists
    children, a list of more than one id being a run of identical numbered
    blocks. ``groups``: kind, units, parameters per unit, colour and members
    ``[tensor, dim, length, frozen indices]``.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> data = view_data(depprune.trace(model, torch.zeros(1, 2)))
    >>> [m["name"] for m in data["modules"]], data["groups"][0]["members"]
    (['', '0', '1'], [[0, 0, 3, 0], [1, 0, 3, 0], [2, 1, 3, 0]])
    """
    graph = _checked(graph)
    names = list(graph.param_names)
    param_of = {name: i for i, name in enumerate(names)}
    # Every traced (tensor, dim): the graph's rows (it has no public list of them);
    # a dim in no group is frozen.
    traced: dict[str, dict[int, list]] = {name: {} for name in names}
    for name, dim in graph._row_keys:
        traced[name].setdefault(dim, [])
    lengths: dict[tuple[str, int], int] = {}
    groups: list[dict[str, Any]] = []
    for g in graph.groups:
        unit_maps = graph.unit_maps(g)
        members = []
        for name, dim in g.members:
            units = unit_maps[(name, dim)]
            frozen = int(np.count_nonzero(units < 0))
            lengths[(name, dim)] = int(units.size)
            traced[name].setdefault(dim, []).append([g.index, frozen])
            members.append([param_of[name], int(dim), int(units.size), frozen])
        groups.append(
            {
                "i": g.index,
                "kind": g.kind,
                "size": g.size,
                "ppu": g.params_per_unit,
                "color": _color(g.index),
                "members": members,
            }
        )

    modules: list[dict[str, Any]] = [
        {"name": "", "label": "", "parent": -1, "kids": [], "params": []}
    ]
    module_of: dict[str, int] = {"": 0}

    def module_id(path: str) -> int:
        known = module_of.get(path)
        if known is not None:
            return known
        parent = module_id(_module_of(path))
        label = path.rsplit(".", 1)[-1]
        modules.append({"name": path, "label": label, "parent": parent, "kids": [], "params": []})
        module_of[path] = len(modules) - 1
        modules[parent]["kids"].append(len(modules) - 1)
        return len(modules) - 1

    params: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        owner = module_id(_module_of(name))
        modules[owner]["params"].append(i)
        dims = [[dim, lengths.get((name, dim)), gs] for dim, gs in sorted(traced[name].items())]
        params.append({"name": name, "label": name.rsplit(".", 1)[-1], "m": owner, "dims": dims})
    for g in groups:
        g["modules"] = sorted({params[p]["m"] for p, *_ in g["members"]})

    _summarise_subtrees(modules, params, groups)
    for m in modules:
        m["kids"] = _runs(m["kids"], modules)
        del m["sig"]

    frozen_dims = [[i, dim] for i, p in enumerate(params) for dim, _, gs in p["dims"] if not gs]
    partial = [
        [g["i"], p, dim, length, frozen]
        for g in groups
        for p, dim, length, frozen in g["members"]
        if frozen
    ]
    kinds: dict[str, int] = {}
    for g in groups:
        kinds[g["kind"]] = kinds.get(g["kind"], 0) + 1
    return {
        "summary": {
            "groups": len(groups),
            "units": int(graph.num_units),
            "tensors": len(names),
            "param_dims": sum(len(p["dims"]) for p in params),
            "members": sum(len(g["members"]) for g in groups),
        },
        "kinds": kinds,
        "params": params,
        "modules": modules,
        "groups": groups,
        "frozen_dims": frozen_dims,
        "partial": partial,
        "unsupported_ops": {str(op): int(n) for op, n in graph.unsupported_ops.items()},
        "notes": [str(note) for note in graph.notes],
        "conflicts": len(graph.conflicts),
        "open_depth": _OPEN_DEPTH,
    }


def _summarise_subtrees(modules: list[dict], params: list[dict], groups: list[dict]) -> None:
    """Per module: its own groups, its subtree's groups and tensors, and a structure id.

    Children come after their parent in ``modules``, so one reverse pass sees
    every subtree before its root. Equal structure ids mean the same tensor
    names, dims, lengths and group kinds/sizes all the way down.
    """
    group_key = {g["i"]: (g["kind"], g["size"], g["ppu"]) for g in groups}
    signatures: dict[tuple, int] = {}
    for m in reversed(modules):
        own = sorted({g for p in m["params"] for _, _, gs in params[p]["dims"] for g, _ in gs})
        below = set(own)
        count = len(m["params"])
        for k in m["kids"]:
            below.update(modules[k]["groups"])
            count += modules[k]["tensors"]
        m["own"], m["groups"], m["tensors"] = own, sorted(below), count
        shape = tuple(
            (
                params[p]["label"],
                tuple(
                    (dim, length, tuple(sorted((*group_key[g], f) for g, f in gs)))
                    for dim, length, gs in params[p]["dims"]
                ),
            )
            for p in m["params"]
        )
        kids = tuple((modules[k]["label"], modules[k]["sig"]) for k in m["kids"])
        m["sig"] = signatures.setdefault((shape, kids), len(signatures))


def _runs(kids: list[int], modules: list[dict]) -> list[list[int]]:
    """Children as runs: consecutive numbered siblings of one structure become one entry."""
    out: list[list[int]] = []
    for k in kids:
        label, last = modules[k]["label"], out[-1] if out else None
        if (
            last is not None
            and label.isdigit()
            and modules[last[-1]]["label"].isdigit()
            and int(label) == int(modules[last[-1]]["label"]) + 1
            and modules[k]["sig"] == modules[last[-1]]["sig"]
        ):
            last.append(k)
        else:
            out.append([k])
    # Short runs read better spelled out.
    return [
        run for item in out for run in ([item] if len(item) >= _MIN_RUN else [[k] for k in item])
    ]


def _write(text: str, path: str | os.PathLike | None, what: str) -> str:
    if path is None:
        return text
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write the {what} to {os.fspath(path)!r}: {exc.strerror or exc}; "
            "pass a path in a directory that exists and is writable"
        ) from None
    return text


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def to_dot(graph: DependencyGraph, path: str | os.PathLike | None = None) -> str:
    """The graph as Graphviz DOT: a coloured node per group, tensors clustered by module.

    Each member is an edge from its group to its tensor, labelled with the
    dim (and the count of frozen indices, dashed, when some are frozen).
    Render with ``dot -Tsvg graph.dot -o graph.svg``.

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> dot = to_dot(depprune.trace(model, torch.zeros(1, 2)))
    >>> [line.strip() for line in dot.splitlines() if "->" in line][0]
    'g0 -> p0 [label="0", color="#e76a6a", tooltip="0.weight[0]"];'
    """
    data = view_data(graph)
    params, modules, groups = data["params"], data["modules"], data["groups"]
    s = data["summary"]
    lines = [
        "digraph depprune {",
        f'  graph [rankdir=LR, fontname="Helvetica", fontsize=11, labelloc=t, label="'
        f"{s['groups']} groups, {s['units']:,} units, {s['tensors']} tensors"
        f'", nodesep=0.15, ranksep=1.2];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9, arrowsize=0.5];',
    ]

    def dims_text(p: dict) -> str:
        shown = [f"{dim}: " + " ".join(f"g{g}" for g, _ in gs) for dim, _, gs in p["dims"] if gs]
        frozen = [str(dim) for dim, _, gs in p["dims"] if not gs]
        if frozen or not p["dims"]:
            shown.append(f"frozen {','.join(frozen)}" if frozen else "not traced")
        return " | ".join(shown)

    def emit(m: int, indent: str) -> None:
        node = modules[m]
        if m:
            lines.append(f"{indent}subgraph cluster_m{m} {{")
            lines.append(
                f'{indent}  label="{_dot_text(node["label"])}"; tooltip="{_dot_text(node["name"])}";'
                ' style="rounded"; color="#b8b8c4"; fontsize=10;'
            )
            indent += "  "
        for p in node["params"]:
            fill = "#ffffff" if any(gs for _, _, gs in params[p]["dims"]) else "#e8e8ec"
            label = f"{_dot_text(params[p]['label'])}\\n{_dot_text(dims_text(params[p]))}"
            lines.append(
                f'{indent}p{p} [label="{label}", fillcolor="{fill}", '
                f'tooltip="{_dot_text(params[p]["name"])}"];'
            )
        for run in node["kids"]:
            for k in run:
                emit(k, indent)
        if m:
            lines.append(f"{indent[:-2]}}}")

    emit(0, "  ")
    for g in groups:
        kind = f" {g['kind']}" if g["kind"] else ""
        per_unit = f" · {g['ppu']:,} params/unit" if g["ppu"] else ""
        lines.append(
            f'  g{g["i"]} [label="g{g["i"]}{_dot_text(kind)}\\n{g["size"]:,} units{per_unit}", '
            f'fillcolor="{g["color"]}", shape=ellipse, style=filled];'
        )
    for g in groups:
        for p, dim, length, frozen in g["members"]:
            name = _dot_text(params[p]["name"])
            if frozen:
                label, style = f"{dim} ({frozen}/{length} frozen)", ', style="dashed"'
            else:
                label, style = str(dim), ""
            lines.append(
                f'  g{g["i"]} -> p{p} [label="{label}", color="{g["color"]}"{style}, '
                f'tooltip="{name}[{dim}]"];'
            )
    lines.append("}")
    return _write("\n".join(lines) + "\n", path, "DOT text")


def _asset(name: str) -> str:
    """The page's stylesheet or script, shipped beside this module (inlined: no network)."""
    return resources.files("depprune").joinpath(name).read_text(encoding="utf-8")


def _embedded(data: dict) -> str:
    """JSON that cannot end the script element it sits in, whatever the tensor names are."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_html(
    graph: DependencyGraph,
    path: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> str:
    """One self-contained HTML page that draws the graph (inline CSS and JS; works offline).

    The module tree is coloured by group; hover (or click, to pin) a group chip,
    a legend row or a module to see members, units and parameters per unit.
    Deeper modules start collapsed and runs of identical blocks (``layers.0``
    ... ``layers.31``) show as one expandable row, so large models stay fast.
    The address's ``#`` part picks the view: ``depth=3``, ``open=name,...``
    (expand those modules), ``group=5`` or ``module=name`` (pin one),
    ``kind=heads,neurons`` (show only those kinds).

    >>> import torch, depprune
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    >>> page = to_html(depprune.trace(model, torch.zeros(1, 2)), title="<tiny>")
    >>> "<title>&lt;tiny&gt; · depprune graph</title>" in page, "http" in page
    (True, False)
    """
    data = view_data(graph)
    title = "model" if title is None else str(title)
    data["title"] = title
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)} · depprune graph</title>\n"
        f"<style>\n{_asset('graph_view.css')}</style>\n</head>\n<body>\n"
        '<pre id="dp-errors" hidden></pre>\n'
        f"<script>\n{_ERROR_TRAP}</script>\n"
        '<header><h1 id="dp-title"></h1><span id="dp-stats" class="stats"></span>'
        '<span class="tools"><button type="button" id="dp-expand">Expand all</button>'
        '<button type="button" id="dp-collapse">Collapse</button></span></header>\n'
        '<main>\n<section class="col">\n'
        '<div class="card tree-card"><h2>Module tree</h2><div id="dp-tree"></div></div>\n'
        '<div class="card"><h2>Frozen, unsupported, notes</h2><div id="dp-diag"></div></div>\n'
        '</section>\n<section class="col side">\n'
        '<div class="card detail" id="dp-detail"></div>\n'
        '<div class="card legend"><h2>Groups</h2><div id="dp-kinds" class="kinds"></div>'
        '<table id="dp-legend"><thead></thead><tbody></tbody></table></div>\n'
        "</section>\n</main>\n"
        f'<script type="application/json" id="depprune-data">{_embedded(data)}</script>\n'
        f"<script>\n{_asset('graph_view.js')}</script>\n"
        "</body>\n</html>\n"
    )
    return _write(page, path, "HTML page")


# Collects script errors into the page, so a headless browser's DOM shows them.
_ERROR_TRAP = """\
window.addEventListener("error", function (event) {
  var box = document.getElementById("dp-errors");
  box.hidden = false;
  box.textContent += "error: " + event.message + " (line " + event.lineno + ")\\n";
  document.documentElement.setAttribute("data-depprune-errors", "1");
});
"""
