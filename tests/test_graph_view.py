"""The graph as a picture: DOT text, the offline HTML page, and the page run in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch import nn

import depprune
from depprune import AxisEquations, CheckpointError, InvalidPlanError
from depprune.graph_view import to_dot, to_html, view_data

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A ResNet basic block; a downsampling one when the width or stride changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TinyResNet(nn.Module):
    """Three identical blocks, a downsampling one, one more; a side path through an FFT."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layers = nn.Sequential(
            Block(8, 8), Block(8, 8), Block(8, 8), Block(8, 16, 2), Block(16, 16)
        )
        self.side = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x):
        h = self.layers(torch.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))
        # A real FFT has no axis rule: the side conv is frozen, and so are the
        # 4 inputs of fc it feeds (a member with frozen indices).
        spectrum = torch.fft.rfft(self.side(x), dim=-1).abs().mean(dim=(2, 3))
        return self.fc(torch.cat([h, spectrum], dim=1))


@pytest.fixture(scope="module")
def cnn_graph():
    torch.manual_seed(0)
    return depprune.trace(TinyResNet().eval(), torch.randn(1, 3, 8, 8))


def llama_graph(layers: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
        return depprune.trace(model, torch.zeros(1, 5, dtype=torch.long))


@pytest.fixture(scope="module")
def llama2():
    return llama_graph(2)


@pytest.fixture(scope="module")
def llama32():
    return llama_graph(32)


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def frozen_rows(graph) -> set[tuple[str, int]]:
    """Traced (tensor, dim)s in no group, found by asking the graph dim by dim."""
    members = {m for g in graph.groups for m in g.members}
    rows = set()
    for name in graph.param_names:
        for dim in range(8):
            try:
                graph.axis_of(name, dim)
            except InvalidPlanError:
                continue
            rows.add((name, dim))
    return rows - members


# --- the data both pictures are drawn from ---------------------------------------------


def test_data_holds_every_member_with_its_length_and_frozen_indices(cnn_graph):
    data = view_data(cnn_graph)
    names = [p["name"] for p in data["params"]]
    assert names == list(cnn_graph.param_names)
    assert len(data["groups"]) == len(cnn_graph.groups)
    for g, drawn in zip(cnn_graph.groups, data["groups"], strict=True):
        assert (drawn["kind"], drawn["size"], drawn["ppu"]) == (g.kind, g.size, g.params_per_unit)
        units = cnn_graph.unit_maps(g)
        expected = [[names.index(n), d, units[(n, d)].size, int((units[(n, d)] < 0).sum())]
                    for n, d in g.members]  # fmt: skip
        assert drawn["members"] == expected
    # Only fc's input dim mixes a group's channels with the FFT path's 4 frozen ones.
    assert [(names[p], d, n, f) for _, p, d, n, f in data["partial"]] == [("fc.weight", 1, 20, 4)]
    frozen = {(names[p], d) for p, d in data["frozen_dims"]}
    assert frozen == frozen_rows(cnn_graph)
    assert {("side.weight", 0), ("side.bias", 0), ("conv1.weight", 1)} <= frozen
    assert data["unsupported_ops"] == {"aten._fft_r2c": 1}


def test_modules_come_from_tensor_names(cnn_graph):
    data = view_data(cnn_graph)
    modules = data["modules"]
    ids = {m["name"]: i for i, m in enumerate(modules)}
    for p in data["params"]:
        assert modules[p["m"]]["name"] == module_of(p["name"])
    for i, m in enumerate(modules[1:], start=1):
        assert modules[m["parent"]]["name"] == module_of(m["name"])
        assert any(i in run for run in modules[m["parent"]]["kids"])
    # A module's groups are those of the tensors under it, found by name prefix.
    for name in ("layers.3", "layers.3.downsample", "fc", ""):
        under = [
            g.index
            for g in cnn_graph.groups
            if any(n.startswith(name + ".") or not name for n, _ in g.members)
        ]
        assert modules[ids[name]]["groups"] == under


def test_identical_numbered_blocks_form_one_run(cnn_graph):
    data = view_data(cnn_graph)
    names = [m["name"] for m in data["modules"]]
    (layers,) = (m for m in data["modules"] if m["name"] == "layers")
    # Blocks 0-2 have one structure; the downsampling block 3 and block 4 differ.
    assert [[names[k] for k in run] for run in layers["kids"]] == [
        ["layers.0", "layers.1", "layers.2"],
        ["layers.3"],
        ["layers.4"],
    ]


def test_32_decoder_layers_form_one_run(llama32):
    data = view_data(llama32)
    names = [m["name"] for m in data["modules"]]
    (layers,) = (m for m in data["modules"] if m["name"] == "model.layers")
    assert [[names[k] for k in run] for run in layers["kids"]] == [
        [f"model.layers.{i}" for i in range(32)]
    ]


# --- DOT ----------------------------------------------------------------------------


def parse_dot(text: str):
    """Clusters (label, parent), nodes (id -> attrs) and edges of the DOT we write."""
    attrs = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    clusters, stack, nodes, edges = {}, [None], {}, []
    for line in text.splitlines()[1:-1]:
        line = line.strip()
        if m := re.fullmatch(r"subgraph (cluster_m\d+) \{", line):
            clusters[m[1]] = {"parent": stack[-1]}
            stack.append(m[1])
        elif line == "}":
            stack.pop()
        elif m := re.fullmatch(r"(\w+) -> (\w+) \[(.*)\];", line):
            edges.append((m[1], m[2], dict(attrs.findall(m[3]))))
        elif m := re.fullmatch(r"([gp]\d+) \[(.*)\];", line):
            nodes[m[1]] = {**dict(attrs.findall(m[2])), "cluster": stack[-1]}
        elif line.startswith("label=") and stack[-1]:
            clusters[stack[-1]].update(dict(attrs.findall(line)))
        else:
            assert re.fullmatch(r"(graph|node|edge) \[.*\];", line), line
    assert stack == [None], "unbalanced braces"
    return clusters, nodes, edges


def test_dot_has_a_node_per_group_and_an_edge_per_member(cnn_graph, llama2):
    for graph in (cnn_graph, llama2):
        text = graph.to_dot()
        assert text.startswith("digraph depprune {\n") and text.endswith("}\n")
        clusters, nodes, edges = parse_dot(text)
        for g in graph.groups:
            assert nodes[f"g{g.index}"]["label"].startswith(
                f"g{g.index} {g.kind}\\n{g.size:,} units"
            )
        tensor_of = {node: a["tooltip"] for node, a in nodes.items() if node.startswith("p")}
        assert sorted(tensor_of.values()) == sorted(graph.param_names)
        drawn = sorted((int(g[1:]), tensor_of[p], int(a["label"].split()[0])) for g, p, a in edges)
        assert drawn == sorted((g.index, n, d) for g in graph.groups for n, d in g.members)
        # Each tensor sits in the cluster of its module, nested as the names are.
        for node, name in tensor_of.items():
            path, cluster = module_of(name), nodes[node]["cluster"]
            while path:
                assert clusters[cluster]["tooltip"] == path
                path, cluster = module_of(path), clusters[cluster]["parent"]
            assert cluster is None


def test_dot_marks_frozen_indices_and_is_accepted_by_graphviz(cnn_graph, tmp_path):
    text = cnn_graph.to_dot(tmp_path / "graph.dot")
    assert (tmp_path / "graph.dot").read_text() == text
    _, nodes, edges = parse_dot(text)
    (fc_in,) = [
        a for _, p, a in edges if nodes[p]["tooltip"] == "fc.weight" and "frozen" in a["label"]
    ]
    assert fc_in["label"] == "1 (4/20 frozen)" and fc_in["style"] == "dashed"
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip(
            "Graphviz's dot is not on PATH (apt-get install graphviz): DOT checked structurally only"
        )
    svg = subprocess.run([dot, "-Tsvg"], input=text, capture_output=True, text=True, timeout=60)
    assert svg.returncode == 0, svg.stderr
    titles = set(re.findall(r"<title>([^<]*)</title>", svg.stdout))
    assert {f"g{g.index}" for g in cnn_graph.groups} <= titles


# --- HTML ---------------------------------------------------------------------------

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


class Checker(HTMLParser):
    """Asserts every element is closed in order; keeps each script's text and every tag."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.scripts, self.tags, self.title = [], {}, [], ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1][0] == "script":
            self.scripts[self.stack[-1][1].get("id", len(self.scripts))] = data
        if self.stack and self.stack[-1][0] == "title":
            self.title += data


def check_page(text: str) -> Checker:
    checker = Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == [], f"unclosed: {checker.stack}"
    return checker


def test_page_is_well_formed_offline_and_embeds_every_group_and_member(cnn_graph, llama2):
    for graph in (cnn_graph, llama2):
        page = graph.to_html(title="tiny")
        assert page.startswith("<!DOCTYPE html>")
        checker = check_page(page)
        # Nothing is fetched: no src/href, no CSS url() or @import, no address at all.
        assert not [t for t, a in checker.tags if {"src", "href"} & a.keys()]
        assert "url(" not in page and "@import" not in page and "http" not in page
        assert {t for t, _ in checker.tags} >= {"style", "script", "table", "header", "main"}
        data = json.loads(checker.scripts["depprune-data"])
        names = data["params"]
        members = {(names[p]["name"], d) for g in data["groups"] for p, d, *_ in g["members"]}
        assert members == {m for g in graph.groups for m in g.members}
        assert [(g["i"], g["kind"], g["size"]) for g in data["groups"]] == [
            (g.index, g.kind, g.size) for g in graph.groups
        ]
        assert data["notes"] == graph.notes and data["title"] == "tiny"


def test_page_survives_names_that_look_like_markup(tmp_path):
    eqs = AxisEquations()
    hidden = eqs.axis(3)
    eqs.param("a</script><b>.weight", 0, hidden)
    eqs.param("c&amp;.weight", 1, hidden)
    graph = eqs.solve()
    page = to_html(graph, tmp_path / "page.html", title="</title><script>x</script>")
    assert (tmp_path / "page.html").read_text(encoding="utf-8") == page
    checker = check_page(page)
    assert checker.title == "</title><script>x</script> · depprune graph"
    data = json.loads(checker.scripts["depprune-data"])
    assert [p["name"] for p in data["params"]] == ["a</script><b>.weight", "c&amp;.weight"]
    assert data["groups"][0]["kind"] == "" and data["kinds"] == {"": 1}
    assert "c&amp;" in to_dot(graph) and '\\"' not in to_dot(graph)


def test_bad_arguments_name_the_fix(cnn_graph, tmp_path):
    with pytest.raises(CheckpointError, match="directory that exists"):
        cnn_graph.to_html(tmp_path / "missing" / "graph.html")
    with pytest.raises(CheckpointError, match="directory that exists"):
        cnn_graph.to_dot(tmp_path / "missing" / "graph.dot")
    with pytest.raises(InvalidPlanError, match=r"depprune\.trace\(model, example_inputs\)"):
        to_html(nn.Linear(2, 2))


# --- in a real browser ----------------------------------------------------------------

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
if BROWSER is None and os.environ.get("DEPPRUNE_REQUIRE_BROWSER"):
    # CI installs Chromium: there a missing browser is a failure, not a skip.
    raise RuntimeError("DEPPRUNE_REQUIRE_BROWSER is set but there is no chromium on PATH")
needs_browser = pytest.mark.skipif(
    BROWSER is None,
    reason="no chromium/chromium-browser on PATH (Debian: apt-get install chromium); "
    "the page's script is not run",
)


def browse(page, view: str = "", *args: str) -> str:
    """Chromium's output for ``page`` opened at ``#view`` (the DOM after its script ran)."""
    run = subprocess.run(
        [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
         *(args or ("--dump-dom",)), f"{page.as_uri()}#{view}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


class Dom(HTMLParser):
    """The elements of a dumped DOM: (tag, attrs, text inside) for each."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements, self.open = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), ""]
        self.elements.append(element)
        if tag not in VOID:
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for element in self.open:
            element[2] += data

    def having(self, attr: str) -> list:
        return [e for e in self.elements if attr in e[1]]


def rendered(text: str, graph) -> Dom:
    """The DOM, once asserted that the script ran to its end and raised nothing."""
    dom = Dom(text)
    (root,) = [e for e in dom.elements if e[0] == "html"]
    (errors,) = [e for e in dom.elements if e[1].get("id") == "dp-errors"]
    assert errors[2] == "" and "data-depprune-errors" not in root[1], errors[2]
    assert root[1]["data-depprune-rendered"] == str(len(graph.groups))
    return dom


@needs_browser
def test_script_draws_the_legend_tree_and_diagnostics(cnn_graph, tmp_path):
    page = tmp_path / "cnn.html"
    cnn_graph.to_html(page)
    dom = rendered(browse(page), cnn_graph)
    legend = [e for e in dom.having("data-g") if e[0] == "tr"]
    assert [int(e[1]["data-g"]) for e in legend] == [g.index for g in cnn_graph.groups]
    # Depth 0 and 1 open: the root, its 5 children, the 3 entries of layers (a run and 2 blocks).
    names = [m["name"] for m in view_data(cnn_graph)["modules"]]
    rows = [names[int(e[1]["data-n"])] for e in dom.having("data-n") if e[0] == "div"]
    assert rows == ["", "conv1", "bn1", "layers", "layers.3", "layers.4", "side", "fc"]
    (run,) = dom.having("data-run")
    assert "layers.0 … layers.2" in run[2] and "\u00d73 identical blocks" in run[2]
    (diag,) = [e for e in dom.elements if e[1].get("id") == "dp-diag"]
    assert (
        "aten._fft_r2c \u00d71" in diag[2]
        and "fc.weight[1] in g5: 4 of 20 indices frozen" in diag[2]
    )
    assert "side.weight[0, 1, 2, 3]" in diag[2] and "conv1.weight[1, 2, 3]" in diag[2]


@needs_browser
def test_a_pinned_group_lists_its_members_units_and_params_per_unit(llama2, tmp_path):
    page = tmp_path / "llama.html"
    llama2.to_html(page)
    group = llama2.groups("heads")[0]
    dom = rendered(browse(page, f"group={group.index}"), llama2)
    shown = [e[1]["data-member"] for e in dom.having("data-member")]
    assert shown == [f"{n}[{d}]" for n, d in group.members]
    (detail,) = [e for e in dom.elements if e[1].get("id") == "dp-detail"]
    assert f"{group.size}units{group.params_per_unit:,}params / unit" in detail[2]


@needs_browser
def test_a_pinned_module_is_revealed_with_its_tensors_and_groups(llama2, tmp_path):
    page = tmp_path / "llama.html"
    llama2.to_html(page)
    name = "model.layers.1.self_attn.k_proj"
    dom = rendered(browse(page, f"module={name}&kind=heads"), llama2)
    rows = [(e[1]["data-tensor"], e[2]) for e in dom.having("data-tensor")]
    # One table row per traced dim of k_proj.weight, naming the groups along it.
    assert [t for t, _ in rows] == [name + ".weight"] * 2
    for (_, text), dim in zip(rows, (0, 1), strict=True):
        along = [g.index for g in llama2.groups if (name + ".weight", dim) in g.members]
        assert re.findall(r"g(\d+)", text) == [str(g) for g in along]
    groups = [int(e[1]["data-group"]) for e in dom.having("data-group")]
    assert groups == [
        g.index for g in llama2.groups if any(n == name + ".weight" for n, _ in g.members)
    ]
    # Depth 2 would close layers.1: pinning a module deep in the tree opens the way to it.
    names = [m["name"] for m in view_data(llama2)["modules"]]
    shown = [names[int(e[1]["data-n"])] for e in dom.having("data-n") if e[0] == "div"]
    assert [n for n in shown if n.startswith("model.layers.")] == [
        "model.layers.0",
        "model.layers.1",
        "model.layers.1.self_attn",
        *(f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"),
        "model.layers.1.mlp",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
    ]
    hidden = {
        int(e[1]["data-g"]) for e in dom.having("data-g") if e[0] == "tr" and "hidden" in e[1]
    }
    assert hidden == {g.index for g in llama2.groups if g.kind != "heads"}


@needs_browser
def test_32_layers_open_only_where_asked(llama32, tmp_path):
    page = tmp_path / "llama32.html"
    llama32.to_html(page)
    dom = rendered(browse(page, "open=model.layers.7.mlp"), llama32)
    names = [m["name"] for m in view_data(llama32)["modules"]]
    shown = [names[int(e[1]["data-n"])] for e in dom.having("data-n") if e[0] == "div"]
    inside = ("self_attn", "mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
              "input_layernorm", "post_attention_layernorm")  # fmt: skip
    # The run opens to its 32 blocks (each closed); only block 7 opens, down to the mlp's
    # tensors; the rest stays as deep as the default depth.
    assert shown == [
        "", "model", "model.embed_tokens", "model.layers",
        *(f"model.layers.{i}" for i in range(8)),
        *(f"model.layers.7.{m}" for m in inside),
        *(f"model.layers.{i}" for i in range(8, 32)),
        "model.norm", "model.rotary_emb", "lm_head",
    ]  # fmt: skip
    (run,) = dom.having("data-run")
    assert "layers.0 … layers.31" in run[2] and "\u00d732 identical blocks" in run[2]


# Runs after the page's script: hovers, leaves and clicks as a user would, then records
# what the page shows in an attribute of <html> for the dumped DOM.
PROBE = """<script>
(function () {
  const d = document, out = {};
  const fire = (e, type) => e.dispatchEvent(new MouseEvent(type, { bubbles: type !== "mouseleave" }));
  const legend = d.getElementById("dp-legend");
  const legendRow = (g) => legend.querySelector('tbody tr[data-g="' + g + '"]');
  const members = () => [...d.querySelectorAll("#dp-detail [data-member]")].map((e) => e.dataset.member);
  const rows = (cls) => [...d.querySelectorAll("#dp-tree ." + cls + "[data-n]")].map((e) => +e.dataset.n);
  fire(legendRow(GROUP), "mouseover");
  out.hovered = members(); out.own = rows("hit-own"); out.sub = rows("hit-sub");
  out.run_hit = d.querySelector("#dp-tree [data-run]").classList.contains("hit-sub");
  fire(legend, "mouseleave");
  out.left = [members().length, d.querySelector("#dp-detail .hint").textContent];
  fire(d.querySelector('#dp-tree [data-n="MODULE"] .name'), "mouseover");
  out.module_groups = [...d.querySelectorAll("#dp-detail [data-group]")].map((e) => +e.dataset.group);
  fire(d.querySelector("#dp-tree [data-run] [data-toggle]"), "click");
  out.opened = rows("row");
  fire(legendRow(GROUP), "click"); fire(legend, "mouseleave");
  out.pinned = [members(), location.hash];
  fire(d.querySelector('#dp-kinds button[data-kind="channels"]'), "click");
  out.filtered = [[...legend.tBodies[0].rows].filter((r) => r.hidden).length,
    getComputedStyle(d.querySelector("#dp-tree .chip[data-g]")).display];
  d.documentElement.dataset.probe = JSON.stringify(out);
})();
</script>"""


@needs_browser
def test_hover_click_and_filter_as_a_user_would(cnn_graph, tmp_path):
    data = view_data(cnn_graph)
    names = [m["name"] for m in data["modules"]]
    group, module = cnn_graph.groups[5], names.index("layers.3")
    page = tmp_path / "probed.html"
    probe = PROBE.replace("GROUP", str(group.index)).replace("MODULE", str(module))
    page.write_text(to_html(cnn_graph).replace("</body>", probe + "\n</body>"), encoding="utf-8")
    dom = rendered(browse(page), cnn_graph)
    (root,) = [e for e in dom.elements if e[0] == "html"]
    out = json.loads(root[1]["data-probe"])
    member_names = [f"{n}[{d}]" for n, d in group.members]
    assert out["hovered"] == member_names
    # Of the rows on screen (depth 2 closed), fc holds a member; layers and its blocks hold some.
    under = {n for n, _ in group.members}
    assert {module_of(n) for n in under} >= {"fc", "layers.3.downsample.0", "layers.4.conv1"}
    assert [names[i] for i in out["own"]] == ["fc"]
    assert [names[i] for i in out["sub"]] == ["", "layers", "layers.3", "layers.4"]
    assert out["run_hit"] == any(
        n.startswith(("layers.0.", "layers.1.", "layers.2.")) for n in under
    )
    assert out["left"][0] == 0 and "Hover a group" in out["left"][1]
    assert out["module_groups"] == [
        g.index for g in cnn_graph.groups if any(n.startswith("layers.3.") for n, _ in g.members)
    ]
    assert [names[i] for i in out["opened"] if names[i].startswith("layers.")][:3] == [
        "layers.0",
        "layers.1",
        "layers.2",
    ]
    assert out["pinned"] == [member_names, f"#group={group.index}"]
    assert out["filtered"] == [len(cnn_graph.groups), "none"]


def png_pixels(data: bytes) -> np.ndarray:
    """An 8-bit RGB(A) PNG decoded with zlib, struct and numpy (height x width x channels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and color in (2, 6) and interlace == 0
        elif kind == b"IDAT":
            idat += body
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int64)
    prev = np.zeros(width * bpp, np.int64)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 0:
            row = line
        elif kind == 2:
            row = (line + prev) % 256
        elif kind == 1:  # each byte adds the one bpp to its left: a running sum per channel
            row = (np.cumsum(line.reshape(width, bpp), axis=0) % 256).reshape(-1)
        else:  # Average and Paeth depend on the decoded left byte: byte by byte
            row, line, up = [0] * (width * bpp), line.tolist(), prev.tolist()
            for i in range(width * bpp):
                a = row[i - bpp] if i >= bpp else 0
                b, c = up[i], (up[i - bpp] if i >= bpp else 0)
                if kind == 3:
                    row[i] = (line[i] + (a + b) // 2) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    row[i] = (
                        line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)
                    ) & 255
            row = np.asarray(row, np.int64)
        out[y] = prev = row
    return out.reshape(height, width, bpp)[..., :3].astype(np.uint8)


@needs_browser
def test_screenshot_shows_the_group_colours(cnn_graph, tmp_path):
    page, shot = tmp_path / "cnn.html", tmp_path / "cnn.png"
    cnn_graph.to_html(page)
    browse(page, "group=5", f"--screenshot={shot}", "--window-size=900,560", "--hide-scrollbars",
           "--force-device-scale-factor=1")  # fmt: skip
    pixels = png_pixels(shot.read_bytes())
    assert pixels.shape == (560, 900, 3)
    colours = {tuple(c) for c in np.unique(pixels.reshape(-1, 3), axis=0)}
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    # Every group's chip in the legend is drawn in the group's own colour.
    for g in view_data(cnn_graph)["groups"]:
        rgb = tuple(int(g["color"][i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, f"group {g['i']}'s colour {g['color']} is not on screen"
