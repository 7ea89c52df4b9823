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
        f"<style>\n{_STYLE}</style>\n</head>\n<body>\n"
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
        f"<script>\n{_SCRIPT}</script>\n"
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

_STYLE = """\
:root { --bg: #f5f5f8; --card: #fff; --line: #e2e2e8; --ink: #1c1c22; --mute: #6a6a76;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body { font: 13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--ink); background: var(--bg); display: flex; flex-direction: column; }
header { display: flex; gap: 14px; align-items: baseline; padding: 9px 16px;
  background: var(--card); border-bottom: 1px solid var(--line); white-space: nowrap; }
h1 { font-size: 17px; margin: 0; overflow: hidden; text-overflow: ellipsis; flex: 0 1 auto; }
.stats { color: var(--mute); overflow: hidden; text-overflow: ellipsis; flex: 0 1000 auto;
  min-width: 0; }
.tools { margin-left: auto; display: flex; gap: 6px; }
button { font: inherit; font-size: 12px; padding: 2px 9px; border: 1px solid var(--line);
  border-radius: 6px; background: #fafafc; cursor: pointer; }
button:hover { background: #eeeef4; }
main { flex: 1; min-height: 0; display: grid; gap: 12px; padding: 12px;
  grid-template-columns: minmax(0, 1fr) minmax(380px, 42%); }
.col { min-height: 0; overflow: auto; display: flex; flex-direction: column; gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 9px 12px; }
.card h2 { font-size: 11px; margin: 0 0 6px; text-transform: uppercase; letter-spacing: .06em;
  color: var(--mute); }
.detail { flex: 0 0 auto; max-height: 52%; overflow: auto; }
.legend { flex: 1 0 auto; }
.row { display: flex; align-items: flex-start; gap: 6px; padding: 1px 4px; border-radius: 4px;
  min-height: 21px; line-height: 19px; }
.row .body { display: flex; flex-wrap: wrap; align-items: center; gap: 2px 6px; flex: 1;
  min-width: 0; }
.row:hover { background: #f0f0f6; }
.row.hit-sub { box-shadow: inset 4px 0 0 var(--hc); }
.row.hit-own { box-shadow: inset 4px 0 0 var(--hc);
  background: color-mix(in srgb, var(--hc) 30%, white); }
.row.cur { outline: 1px solid #8a8aa0; }
.row.flash { animation: flash 1.2s; }
@keyframes flash { from { background: #ffe58a; } }
.tog { flex: 0 0 14px; text-align: center; color: var(--mute); cursor: pointer; user-select: none; }
.name { font-family: var(--mono); font-weight: 600; cursor: pointer; white-space: nowrap; }
.run > .name { color: #3b3b7a; }
.badge { font-size: 11px; color: #3b3b7a; background: #e8e8f8; border-radius: 9px;
  padding: 0 7px; }
.param { display: inline-flex; flex-wrap: wrap; align-items: center; gap: 2px 3px;
  margin-right: 6px; font-family: var(--mono); font-size: 12px; color: var(--mute); }
.pname { color: #44444e; margin-right: 2px; }
.dim { display: inline-flex; align-items: center; gap: 2px; }
.chip { display: inline-block; padding: 0 6px; border-radius: 9px; background: var(--c);
  color: #15151a; font: 11px/17px var(--mono); cursor: pointer;
  border: 1px solid rgba(0, 0, 0, .14); white-space: nowrap; }
.chip i { font-style: normal; opacity: .68; margin-left: 4px; }
.chip.part { background: repeating-linear-gradient(135deg, var(--c) 0 5px, #fff 5px 7px); }
.chip.frozen { background: #ececf0; color: #7a7a86; cursor: default; }
.chip.sel, .dot.sel { outline: 2px solid #15151a; outline-offset: 0; }
.sum { color: var(--mute); font-size: 12px; display: inline-flex; gap: 3px; align-items: center;
  flex-wrap: wrap; }
.dot { width: 10px; height: 10px; border-radius: 3px; background: var(--c); cursor: pointer;
  border: 1px solid rgba(0, 0, 0, .18); }
table { border-collapse: collapse; width: 100%; font-size: 12px; }
th, td { padding: 2px 6px; text-align: left; border-bottom: 1px solid #efeff3;
  white-space: nowrap; }
th { color: var(--mute); font-weight: 600; background: var(--card); position: sticky; top: 0; }
#dp-legend th { cursor: pointer; }
#dp-legend tbody tr, .detail tr[data-member], .detail tr[data-group] { cursor: pointer; }
#dp-legend tbody tr:hover, .detail tbody tr:hover { background: #f0f0f6; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono { font-family: var(--mono); }
td.first { max-width: 260px; overflow: hidden; text-overflow: ellipsis; }
.detail h3 { margin: 0 0 6px; font-size: 15px; display: flex; gap: 8px; align-items: center;
  flex-wrap: wrap; }
.detail h3 .mono { font-family: var(--mono); word-break: break-all; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(110px, 1fr));
  gap: 4px 12px; margin: 0 0 8px; }
.facts div { display: flex; flex-direction: column; }
.facts b { font-size: 15px; font-variant-numeric: tabular-nums; }
.facts span { color: var(--mute); font-size: 11px; }
.hint, .none { color: var(--mute); margin: 2px 0; }
.kinds { display: flex; flex-wrap: wrap; gap: 5px; margin-bottom: 6px; }
.kinds button.off { opacity: .45; text-decoration: line-through; }
#dp-diag h4 { margin: 6px 0 2px; font-size: 12px; }
#dp-diag ul { margin: 0; padding-left: 18px; font-family: var(--mono); font-size: 12px; }
#dp-errors { margin: 0; padding: 8px 16px; background: #fde8e8; color: #8a1010; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("depprune-data").textContent);
  const P = D.params, M = D.modules, G = D.groups;
  const LIMIT = 400;  // rows a detail table shows before "show all"
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  const fmt = (n) => (n === null || n === undefined ? "?" : Number(n).toLocaleString("en-US"));
  const byName = new Map(M.map((m, i) => [m.name, i]));

  // Subtree ranges (tin..tout over a pre-order), depth and the run each module sits in.
  const tin = new Array(M.length), tout = new Array(M.length), order = [];
  const depth = new Array(M.length).fill(0), runOf = new Array(M.length).fill(-1);
  const stack = [[0, false]];
  while (stack.length) {
    const [id, done] = stack.pop();
    if (done) { tout[id] = order.length; continue; }
    tin[id] = order.length; order.push(id); stack.push([id, true]);
    for (let k = M[id].kids.length - 1; k >= 0; k--) {
      const item = M[id].kids[k];
      for (let j = item.length - 1; j >= 0; j--) {
        depth[item[j]] = depth[id] + 1;
        if (item.length > 1) runOf[item[j]] = item[0];
        stack.push([item[j], false]);
      }
    }
  }
  const inside = (root, id) => tin[root] <= tin[id] && tin[id] < tout[root];
  const subSet = M.map((m) => new Set(m.groups)), ownSet = M.map((m) => new Set(m.own));
  const runCache = new Map();
  function runInfo(first) {
    if (!runCache.has(first)) {
      const parent = M[M[first].parent];
      const ids = parent.kids.find((item) => item[0] === first);
      const set = new Set();
      let tensors = 0;
      for (const id of ids) { M[id].groups.forEach((g) => set.add(g)); tensors += M[id].tensors; }
      runCache.set(first, { ids, set, groups: [...set].sort((a, b) => a - b), tensors });
    }
    return runCache.get(first);
  }

  const S = { open: new Set(), pin: null, hover: null, hidden: new Set(), all: false };
  const tree = document.getElementById("dp-tree"), detail = document.getElementById("dp-detail");
  const legend = document.getElementById("dp-legend"), kindBox = document.getElementById("dp-kinds");
  const kindStyle = document.head.appendChild(document.createElement("style"));

  function parseHash() {
    const out = {};
    for (const part of location.hash.replace(/^#/, "").split("&")) {
      if (!part) continue;
      const at = part.indexOf("=");
      out[decodeURIComponent(at < 0 ? part : part.slice(0, at))] =
        at < 0 ? "" : decodeURIComponent(part.slice(at + 1));
    }
    return out;
  }
  function openToDepth(limit) {
    S.open.clear();
    M.forEach((m, i) => { if (depth[i] < limit && m.kids.length) S.open.add("n" + i); });
  }
  function reveal(id) {
    for (let x = id; x > 0; x = M[x].parent) {
      S.open.add("n" + M[x].parent);
      if (runOf[x] >= 0) S.open.add("r" + runOf[x]);
    }
  }
  function openSubtree(id) {
    for (let t = tin[id]; t < tout[id]; t++) {
      const x = order[t];
      if (M[x].kids.length) S.open.add("n" + x);
      if (runOf[x] >= 0 && x !== id) S.open.add("r" + runOf[x]);
    }
  }
  const labelOf = (id) => {
    const m = M[id];
    if (id === 0) return D.title;
    return /^\d+$/.test(m.label) && m.parent > 0 ? M[m.parent].label + "." + m.label : m.label;
  };
  const kindName = (k) => (k === "" ? "(no kind)" : k);

  // A chip's kind is worth its width only where the graph has more than one kind.
  const KINDED = Object.keys(D.kinds).length > 1;
  function chip(g, frozen, length, bare) {
    const grp = G[g];
    const c = el("span", "chip" + (frozen ? " part" : ""), "g" + g);
    c.style.setProperty("--c", grp.color);
    c.dataset.g = g; c.dataset.kind = grp.kind;
    if (grp.kind && KINDED && !bare) c.append(el("i", null, grp.kind));
    c.title = "group " + g + " (" + kindName(grp.kind) + "): " + fmt(grp.size) + " units, " +
      fmt(grp.ppu) + " params/unit" + (frozen ? "; " + fmt(frozen) + " of " + fmt(length) +
      " indices frozen" : "");
    return c;
  }
  function dot(g) {
    const d = el("span", "dot");
    d.style.setProperty("--c", G[g].color);
    d.dataset.g = g; d.dataset.kind = G[g].kind;
    d.title = "group " + g + " (" + kindName(G[g].kind) + ")";
    return d;
  }
  function paramEl(pid) {
    const p = P[pid], s = el("span", "param");
    s.append(el("span", "pname", p.label));
    const frozen = [];
    for (const [dim, length, gs] of p.dims) {
      if (!gs.length) { frozen.push(dim); continue; }
      const d = el("span", "dim", dim + ":");
      for (const [g, f] of gs) d.append(chip(g, f, length));
      s.append(d);
    }
    if (frozen.length || !p.dims.length) {
      s.append(el("span", "chip frozen", frozen.length ? frozen.join(",") + ": frozen" : "not traced"));
    }
    return s;
  }
  function summary(groups, tensors) {
    const s = el("span", "sum", fmt(tensors) + (tensors === 1 ? " tensor" : " tensors") +
      (groups.length ? " · " + groups.length + (groups.length === 1 ? " group" : " groups") : ""));
    for (const g of groups.slice(0, 16)) s.append(dot(g));
    if (groups.length > 16) s.append(el("span", null, "+" + (groups.length - 16)));
    return s;
  }
  function row(depthLevel, key, open) {
    const r = el("div", "row");
    r.style.paddingLeft = 4 + 16 * depthLevel + "px";
    const t = el("span", "tog", key ? (open ? "▾" : "▸") : "");
    if (key) t.dataset.toggle = key;
    r.append(t);
    return r;
  }
  function addModule(out, id, level) {
    const m = M[id], key = m.kids.length ? "n" + id : "", open = S.open.has(key);
    const r = row(level, key, open);
    r.dataset.n = id;
    const name = el("span", "name", labelOf(id));
    name.title = m.name || D.title;
    // Wrapped tensors line up under the first one, not under the module's name.
    const body = el("span", "body");
    for (const p of m.params) body.append(paramEl(p));
    if (key && !open) body.append(summary(m.groups, m.tensors));
    r.append(name, body);
    out.push(r);
    if (key && open) for (const item of m.kids) addItem(out, item, level + 1);
  }
  function addItem(out, item, level) {
    if (item.length === 1) { addModule(out, item[0], level); return; }
    const key = "r" + item[0], open = S.open.has(key), info = runInfo(item[0]);
    const r = row(level, key, open);
    r.classList.add("run");
    r.dataset.run = item[0];
    const body = el("span", "body");
    body.append(el("span", "badge", "\u00d7" + item.length + " identical blocks"));
    if (!open) body.append(summary(info.groups, info.tensors));
    r.append(el("span", "name", labelOf(item[0]) + " … " + labelOf(item[item.length - 1])), body);
    out.push(r);
    if (open) for (const id of item) addModule(out, id, level + 1);
  }
  function renderTree() {
    const out = [];
    addModule(out, 0, 0);
    tree.replaceChildren(...out);
    document.documentElement.dataset.deppruneRows = out.length;
    highlight();
  }

  function current() { return S.hover || S.pin; }
  function highlight() {
    const cur = current();
    const g = cur && cur.g !== undefined ? cur.g : -1, m = cur && cur.m !== undefined ? cur.m : -1;
    for (const r of tree.children) {
      r.classList.remove("hit-own", "hit-sub", "cur");
      if (g >= 0) {
        r.style.setProperty("--hc", G[g].color);
        if ("n" in r.dataset) {
          const n = +r.dataset.n;
          if (ownSet[n].has(g)) r.classList.add("hit-own");
          else if (subSet[n].has(g)) r.classList.add("hit-sub");
        } else if (runInfo(+r.dataset.run).set.has(g)) r.classList.add("hit-sub");
      }
      if (m >= 0 && +r.dataset.n === m) r.classList.add("cur");
    }
    for (const c of document.querySelectorAll(".sel")) c.classList.remove("sel");
    if (g >= 0) for (const c of document.querySelectorAll('[data-g="' + g + '"]')) c.classList.add("sel");
  }

  function facts(pairs) {
    const box = el("div", "facts");
    for (const [value, label] of pairs) {
      const d = el("div");
      d.append(el("b", null, value), el("span", null, label));
      box.append(d);
    }
    return box;
  }
  function table(head, numeric) {
    const t = el("table"), tr = el("tr");
    head.forEach((h, i) => tr.append(el("th", numeric.includes(i) ? "num" : null, h)));
    t.append(el("thead"), el("tbody"));
    t.tHead.append(tr);
    return t;
  }
  function cells(tr, values, numeric) {
    values.forEach((v, i) => {
      const td = el("td", numeric.includes(i) ? "num" : "mono");
      if (v instanceof Node) td.append(v); else td.textContent = v;
      tr.append(td);
    });
    return tr;
  }
  function more(container, shown, total) {
    if (shown >= total) return;
    const b = el("button", null, "show all " + fmt(total) + " (" + fmt(total - shown) + " more)");
    b.addEventListener("click", () => { S.all = true; showDetail(); });
    container.append(b);
  }
  function groupDetail(g) {
    const grp = G[g], h = el("h3");
    h.append(chip(g, 0, 0), el("span", null, "Group " + g + " · " + kindName(grp.kind)));
    const members = grp.members;
    const first = members.length ? P[members[0][0]].name + "[" + members[0][1] + "]" : "";
    detail.append(el("h2", null, "Group"), h, facts([
      [fmt(grp.size), "units"], [fmt(grp.ppu), "params / unit"],
      [fmt(grp.size * grp.ppu), "params in all"], [fmt(members.length), "members"],
      [fmt(grp.modules.length), "modules"],
    ]));
    detail.append(el("p", "hint", "first member " + first));
    const t = table(["module", "tensor", "dim", "length", "frozen"], [2, 3, 4]);
    const shown = S.all ? members.length : Math.min(LIMIT, members.length);
    for (const [p, dim, length, frozen] of members.slice(0, shown)) {
      const tr = cells(el("tr"), [M[P[p].m].name || D.title, P[p].label, dim, fmt(length), fmt(frozen)], [2, 3, 4]);
      tr.dataset.member = P[p].name + "[" + dim + "]";
      tr.dataset.module = P[p].m;
      t.tBodies[0].append(tr);
    }
    detail.append(t);
    more(detail, shown, members.length);
  }
  function moduleDetail(id) {
    const m = M[id], h = el("h3");
    h.append(el("span", "mono", m.name || D.title));
    detail.append(el("h2", null, id === 0 ? "Model" : "Module"), h, facts([
      [fmt(m.tensors), "tensors"], [fmt(m.params.length), "own tensors"],
      [fmt(m.groups.length), "groups"], [fmt(m.own.length), "own groups"],
    ]));
    if (m.params.length) {
      const t = table(["tensor", "dim", "length", "groups"], [1, 2]);
      for (const p of m.params) {
        const dims = P[p].dims.length ? P[p].dims : [["\u2013", null, []]];
        for (const [dim, length, gs] of dims) {
          const box = el("span");
          if (gs.length) for (const [g, f] of gs) box.append(chip(g, f, length), " ");
          else box.append(el("span", "chip frozen", P[p].dims.length ? "frozen" : "not traced"));
          const tr = cells(el("tr"), [P[p].label, dim, fmt(length), box], [1, 2]);
          tr.dataset.tensor = P[p].name;
          t.tBodies[0].append(tr);
        }
      }
      detail.append(t);
    }
    if (m.groups.length) {
      detail.append(el("h2", null, "Groups in " + (id === 0 ? "the model" : "this module")));
      const t = table(["group", "kind", "units", "params/unit", "members here"], [2, 3, 4]);
      const shown = S.all ? m.groups.length : Math.min(LIMIT, m.groups.length);
      for (const g of m.groups.slice(0, shown)) {
        const here = G[g].members.filter(([p]) => inside(id, P[p].m)).length;
        const tr = cells(el("tr"), [chip(g, 0, 0, true), kindName(G[g].kind), fmt(G[g].size), fmt(G[g].ppu), fmt(here)], [2, 3, 4]);
        tr.dataset.group = g;
        t.tBodies[0].append(tr);
      }
      detail.append(t);
      more(detail, shown, m.groups.length);
    }
  }
  function showDetail() {
    const cur = current();
    detail.replaceChildren();
    if (!cur) {
      detail.append(el("h2", null, "Details"),
        el("p", "hint", "Hover a group chip, a legend row or a module to see its members, " +
          "units and parameters per unit; click to pin it."));
    } else if (cur.g !== undefined) groupDetail(cur.g);
    else moduleDetail(cur.m);
    highlight();
  }
  const same = (a, b) => (a === b) || (a && b && a.g === b.g && a.m === b.m);
  function hover(target) {
    if (same(S.hover, target)) return;
    S.hover = target; S.all = false;
    showDetail();
  }
  function pin(target) {
    S.pin = same(S.pin, target) ? null : target;
    S.hover = null; S.all = false;
    const hash = !S.pin ? "" : S.pin.g !== undefined ? "group=" + S.pin.g :
      "module=" + encodeURIComponent(M[S.pin.m].name);
    try { history.replaceState(null, "", "#" + hash); } catch (e) { /* file: pages may refuse */ }
    showDetail();
  }
  function jumpTo(id) {
    reveal(id);
    renderTree();
    const r = tree.querySelector('[data-n="' + id + '"]');
    if (r) { r.scrollIntoView({ block: "center" }); r.classList.add("flash"); }
  }
  function toggle(key) {
    if (!S.open.delete(key)) S.open.add(key);
    renderTree();
  }

  function applyKinds() {
    const rules = [];
    for (const k of S.hidden) {
      const q = '[data-kind="' + CSS.escape(k) + '"]';
      rules.push(".chip" + q + ", .dot" + q + " { display: none; }");
    }
    kindStyle.textContent = rules.join("\n");
    for (const r of legend.tBodies[0].rows) r.hidden = S.hidden.has(r.dataset.kind);
    for (const b of kindBox.querySelectorAll("button[data-kind]")) b.classList.toggle("off", S.hidden.has(b.dataset.kind));
  }
  const COLUMNS = [["group", (g) => g.i, true], ["kind", (g) => g.kind, false],
    ["units", (g) => g.size, true], ["params/unit", (g) => g.ppu, true],
    ["members", (g) => g.members.length, true], ["first member", (g) => g.members.length ? P[g.members[0][0]].name : "", false]];
  let sortBy = 0, sortDown = false;
  function renderLegend() {
    const tr = el("tr");
    COLUMNS.forEach(([name, , numeric], i) => {
      const th = el("th", numeric ? "num" : null, name + (i === sortBy ? (sortDown ? " ▾" : " ▴") : ""));
      th.dataset.col = i;
      tr.append(th);
    });
    legend.tHead.replaceChildren(tr);
    const key = COLUMNS[sortBy][1];
    const rows = G.slice().sort((a, b) => {
      const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : a.i - b.i) * (sortDown ? -1 : 1);
    }).map((g) => {
      const first = g.members.length ? P[g.members[0][0]].name + "[" + g.members[0][1] + "]" : "";
      const r = cells(el("tr"), [chip(g.i, 0, 0, true), kindName(g.kind), fmt(g.size), fmt(g.ppu), fmt(g.members.length), first], [2, 3, 4]);
      r.cells[5].className = "mono first";
      r.cells[5].title = first;
      r.dataset.g = g.i; r.dataset.kind = g.kind;
      return r;
    });
    legend.tBodies[0].replaceChildren(...rows);
    applyKinds();
    highlight();
  }
  function renderKinds() {
    const all = el("button", null, "all kinds");
    all.addEventListener("click", () => { S.hidden.clear(); applyKinds(); });
    kindBox.append(all);
    for (const [k, n] of Object.entries(D.kinds)) {
      const b = el("button", null, kindName(k) + " " + n);
      b.dataset.kind = k;
      b.addEventListener("click", () => { if (!S.hidden.delete(k)) S.hidden.add(k); applyKinds(); });
      kindBox.append(b);
    }
  }
  function renderDiag() {
    const box = document.getElementById("dp-diag");
    const section = (title, items, empty) => {
      box.append(el("h4", null, title));
      if (!items.length) { box.append(el("p", "none", empty)); return; }
      const ul = el("ul");
      for (const item of items.slice(0, LIMIT)) ul.append(el("li", null, item));
      if (items.length > LIMIT) ul.append(el("li", null, "… " + fmt(items.length - LIMIT) + " more"));
      box.append(ul);
    };
    const ops = Object.entries(D.unsupported_ops);
    section("Ops without an axis rule (the axes they touch are frozen)",
      ops.map(([op, n]) => op + " \u00d7" + n), "none: every op had a rule");
    const frozen = new Map();
    for (const [p, dim] of D.frozen_dims) frozen.set(p, [...(frozen.get(p) || []), dim]);
    section("Frozen tensor dims (" + fmt(D.frozen_dims.length) + " in " + fmt(frozen.size) + " tensors)",
      [...frozen].map(([p, dims]) => P[p].name + "[" + dims.join(", ") + "]"), "none");
    section("Members with frozen indices (" + fmt(D.partial.length) + ")",
      D.partial.map(([g, p, dim, length, frozen]) => P[p].name + "[" + dim + "] in g" + g + ": " +
        fmt(frozen) + " of " + fmt(length) + " indices frozen"), "none");
    section("Notes from the trace", D.notes, "none");
    if (D.conflicts) section("Conflicts", [D.conflicts + " equation(s) could only be frozen"], "");
  }

  tree.addEventListener("click", (e) => {
    const t = e.target.closest("[data-toggle]");
    if (t) { toggle(t.dataset.toggle); return; }
    const c = e.target.closest("[data-g]");
    if (c) { pin({ g: +c.dataset.g }); return; }
    const r = e.target.closest(".row");
    if (!r) return;
    if ("run" in r.dataset) { toggle("r" + r.dataset.run); return; }
    const id = +r.dataset.n;
    if (M[id].kids.length && !S.open.has("n" + id)) S.open.add("n" + id), renderTree();
    pin({ m: id });
  });
  tree.addEventListener("mouseover", (e) => {
    const c = e.target.closest("[data-g]");
    if (c) { hover({ g: +c.dataset.g }); return; }
    const r = e.target.closest(".row");
    if (r && "n" in r.dataset) hover({ m: +r.dataset.n });
  });
  tree.addEventListener("mouseleave", () => hover(null));
  legend.addEventListener("mouseover", (e) => {
    const r = e.target.closest("tbody tr");
    if (r) hover({ g: +r.dataset.g });
  });
  legend.addEventListener("mouseleave", () => hover(null));
  legend.addEventListener("click", (e) => {
    const th = e.target.closest("th");
    if (th) {
      const col = +th.dataset.col;
      sortDown = col === sortBy ? !sortDown : COLUMNS[col][2] && col > 1;
      sortBy = col;
      renderLegend();
      return;
    }
    const r = e.target.closest("tbody tr");
    if (r) pin({ g: +r.dataset.g });
  });
  detail.addEventListener("click", (e) => {
    const c = e.target.closest("[data-g]");
    if (c) { pin({ g: +c.dataset.g }); return; }
    const r = e.target.closest("tr[data-module]");
    if (r) jumpTo(+r.dataset.module);
  });
  document.getElementById("dp-expand").addEventListener("click", () => { openSubtree(0); renderTree(); });
  document.getElementById("dp-collapse").addEventListener("click", () => { openToDepth(1); renderTree(); });

  const H = parseHash();
  openToDepth(/^\d+$/.test(H.depth || "") ? +H.depth : D.open_depth);
  for (const name of (H.open === undefined ? [] : H.open.split(","))) {
    if (byName.has(name)) { reveal(byName.get(name)); openSubtree(byName.get(name)); }
  }
  if (H.kind !== undefined) {
    const shown = new Set(H.kind.split(","));
    for (const k of Object.keys(D.kinds)) if (!shown.has(k)) S.hidden.add(k);
  }
  if (/^\d+$/.test(H.group || "") && +H.group < G.length) S.pin = { g: +H.group };
  else if (H.module !== undefined && byName.has(H.module)) {
    S.pin = { m: byName.get(H.module) };
    reveal(S.pin.m);
    if (M[S.pin.m].kids.length) S.open.add("n" + S.pin.m);  // as a click on its row would
  }

  document.getElementById("dp-title").textContent = D.title;
  const s = D.summary;
  const count = (n, one, many) => fmt(n) + " " + (n === 1 ? one : many);
  document.getElementById("dp-stats").textContent = [
    count(s.groups, "group", "groups"), count(s.units, "unit", "units"),
    count(s.members, "member", "members"), count(s.tensors, "tensor", "tensors"),
    count(D.frozen_dims.length, "frozen dim", "frozen dims"),
    count(Object.keys(D.unsupported_ops).length, "op without a rule", "ops without a rule"),
    count(D.notes.length, "note", "notes"),
  ].join(" · ");
  renderKinds();
  renderLegend();
  renderDiag();
  renderTree();
  showDetail();
  if (S.pin && S.pin.m !== undefined) {
    const r = tree.querySelector('[data-n="' + S.pin.m + '"]');
    if (r) r.scrollIntoView({ block: "center" });
  }
  document.documentElement.dataset.deppruneRendered = G.length;
})();
"""
