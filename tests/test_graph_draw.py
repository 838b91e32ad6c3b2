"""Drawing the futures DAG: DOT text, collapsing, truncation, file output."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from flowcore.graph import draw
from flowcore.graph.draw import PALETTE, STATE_COLORS, to_digraph, write

HAVE_DOT = shutil.which("dot") is not None
IN_CI = os.environ.get("CI") == "true"


def need_dot(fmt="svg"):
    """Rendering tests run wherever a renderer exists (``dot``, or
    graphviz-pure except for PDF); in CI ``dot`` must exist."""
    if HAVE_DOT or (draw.find_renderer(fmt) and not IN_CI):
        return
    if IN_CI:
        pytest.fail("the Graphviz `dot` program is missing in CI; install graphviz")
    pytest.skip("the Graphviz `dot` program is not installed")


# --------------------------------------------------------------------------
# helpers: a small DOT reader (enough for what to_digraph emits)

_STMT = re.compile(r"^\t(\S+)(?: -> (\S+))? \[(.*)\]$")
_ATTR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|<.*>|[^\s"<]\S*)')


def _attrs(text):
    out = {}
    for key, value in _ATTR.findall(text):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"')
        out[key] = value
    return out


def parse(dot):
    """(nodes: name -> attrs, edges: list of (src, dst, attrs), graph attrs)."""
    nodes, edges, graph = {}, [], {}
    for line in dot.source.splitlines():
        if line.startswith("\tgraph ["):
            graph.update(_attrs(line[len("\tgraph ["):-1]))
            continue
        if line.startswith(("\tnode [", "\tedge [")):
            continue
        match = _STMT.match(line)
        if match:
            src, dst, attrs = match.groups()
            if dst is None:
                nodes[src] = _attrs(attrs)
            else:
                edges.append((src, dst, _attrs(attrs)))
        elif line.startswith("\t") and "->" in line:
            src, dst = (part.strip() for part in line.strip().split("->"))
            edges.append((src, dst, {}))
    return nodes, edges, graph


def by_label(nodes, label):
    found = [name for name, attrs in nodes.items() if attrs.get("label") == label]
    assert len(found) == 1, f"expected one node labelled {label!r}, got {found}"
    return found[0]


def fill(kind, state):
    return PALETTE[STATE_COLORS[kind][state]][0]


def task(id, state="FINISHED", label=None, group=None, kind="task"):
    return {"id": id, "kind": kind, "label": label or id, "state": state, "group": group}


# --------------------------------------------------------------------------
# a small mixed graph

SMALL_NODES = [
    {"id": "o1", "kind": "object", "label": "put", "state": "READY", "group": None},
    task("t1", "FINISHED", "load"),
    task("t2", "RUNNING", "train"),
    {"id": "A", "kind": "actor", "label": "Counter", "state": "ALIVE", "group": None},
    task("c1", "FINISHED", "Counter.add", kind="actor_call"),
    task("c2", "QUEUED", "Counter.get", kind="actor_call"),
]
SMALL_EDGES = [
    ("o1", "t1", "data"),
    ("t1", "t2", "data"),
    ("A", "c1", "order"),
    ("c1", "c2", "order"),
    ("t1", "c1", "data"),
]


@pytest.fixture
def small():
    return to_digraph(SMALL_NODES, SMALL_EDGES, title="small graph")


def test_shapes_by_kind(small):
    nodes, _, _ = parse(small)
    assert nodes[by_label(nodes, "load")]["shape"] == "box"
    assert nodes[by_label(nodes, "load")]["style"] == "filled"
    assert nodes[by_label(nodes, "Counter")]["shape"] == "doubleoctagon"
    call = nodes[by_label(nodes, "Counter.add")]
    assert call["shape"] == "box" and "rounded" in call["style"].split(",")
    assert nodes[by_label(nodes, "put")]["shape"] == "cylinder"


def test_fill_colours_by_state(small):
    nodes, _, _ = parse(small)
    assert nodes[by_label(nodes, "load")]["fillcolor"] == "#8fd18f"  # green
    assert nodes[by_label(nodes, "train")]["fillcolor"] == "#ffe45c"  # yellow
    assert nodes[by_label(nodes, "Counter.get")]["fillcolor"] == "#a6cee3"  # light blue
    assert nodes[by_label(nodes, "Counter")]["fillcolor"] == fill("actor", "ALIVE")
    assert nodes[by_label(nodes, "put")]["fillcolor"] == fill("object", "READY")


def test_palette_is_the_documented_one():
    expected = {
        "WAITING_FOR_ARGS": "grey", "QUEUED": "light blue", "INFEASIBLE": "orange",
        "RUNNING": "yellow", "FINISHED": "green", "FAILED": "red",
        "CANCELLED": "dark grey", "LOST": "purple",
    }
    assert STATE_COLORS["task"] == expected
    assert STATE_COLORS["actor_call"] == expected
    fills = [PALETTE[name][0] for name in expected.values()]
    assert len(set(fills)) == 8, "every task state needs its own colour"


@pytest.mark.parametrize("state", list(STATE_COLORS["task"]))
def test_every_task_state_gets_its_colour(state):
    nodes, _, _ = parse(to_digraph([task("x", state, "f")], []))
    attrs = nodes[by_label(nodes, "f")]
    assert attrs["fillcolor"] == fill("task", state)
    assert attrs["fontcolor"] == PALETTE[STATE_COLORS["task"][state]][1]


def test_cancelled_uses_light_text_on_dark_fill():
    nodes, _, _ = parse(to_digraph([task("x", "CANCELLED", "f")], []))
    assert nodes[by_label(nodes, "f")]["fontcolor"] == "#ffffff"


def test_edge_styles(small):
    nodes, edges, _ = parse(small)
    name = {label: by_label(nodes, label) for label in ("put", "load", "train", "Counter",
                                                        "Counter.add", "Counter.get")}
    styles = {(src, dst): attrs.get("style", "solid") for src, dst, attrs in edges}
    assert styles[(name["put"], name["load"])] == "solid"
    assert styles[(name["load"], name["train"])] == "solid"
    assert styles[(name["load"], name["Counter.add"])] == "solid"
    assert styles[(name["Counter"], name["Counter.add"])] == "dashed"
    assert styles[(name["Counter.add"], name["Counter.get"])] == "dashed"
    assert len(edges) == 5


def test_legend_and_title(small):
    _, _, graph = parse(small)
    label = graph["label"]
    assert label.startswith("<") and 'ID="legend"' in label
    assert "small graph" in label
    for chip in ("FINISHED 2", "RUNNING 1", "QUEUED 1", "actor ALIVE 1", "object READY 1"):
        assert chip in label
    assert 'BGCOLOR="#ffe45c"' in label  # the RUNNING chip
    assert "WAITING_FOR_ARGS" not in label  # only states present
    assert "dashed edge: call order" in label
    assert "octagon: actor" in label and "cylinder: object" in label


def test_labels_are_not_html_and_backslashes_survive():
    nodes, _, _ = parse(to_digraph([task("x", label="<lambda>"), task("y", label="a\\b")], []))
    assert by_label(nodes, "<lambda>")
    assert by_label(nodes, "a\\\\b")


def test_unknown_state_is_drawn_white():
    nodes, _, _ = parse(to_digraph([task("x", "SOMETHING_NEW", "f")], []))
    assert nodes[by_label(nodes, "f")]["fillcolor"] == "#ffffff"


@pytest.mark.parametrize(
    "nodes, edges, match",
    [
        ([task("a"), task("a")], [], "twice"),
        ([task("a")], [("a", "b", "data")], "unknown node 'b'"),
        ([task("a"), task("b")], [("a", "b", "sideways")], "unknown kind 'sideways'"),
        ([{"id": "a", "kind": "gizmo"}], [], "unknown kind 'gizmo'"),
        ([{"kind": "task"}], [], "'id'"),
    ],
)
def test_malformed_export_is_rejected(nodes, edges, match):
    with pytest.raises(ValueError, match=match):
        to_digraph(nodes, edges)


# --------------------------------------------------------------------------
# collapsing


def fan_in(n, states=None, group="fid"):
    states = states or ["FINISHED"] * n
    nodes = [task(f"t{i}", states[i], "f", group) for i in range(n)]
    nodes.append(task("r", "WAITING_FOR_ARGS", "reduce", "rid"))
    return nodes, [(f"t{i}", "r", "data") for i in range(n)]


def test_collapse_fan_in_with_state_summary():
    states = ["FINISHED"] * 990 + ["RUNNING"] * 7 + ["FAILED"] * 3
    nodes, edges = fan_in(1000, states)
    dot = to_digraph(nodes, edges)
    drawn, drawn_edges, graph = parse(dot)
    assert len(drawn) == 2
    (collapsed,) = [n for n, a in drawn.items() if a["label"].startswith("f ×1000")]
    attrs = drawn[collapsed]
    label = attrs["label"]
    assert "RUNNING 7" in label and "FINISHED 990" in label and "FAILED 3" in label
    # Least done among FINISHED/RUNNING/FAILED is RUNNING.
    assert attrs["fillcolor"] == fill("task", "RUNNING")
    assert attrs["peripheries"] == "2"
    reduce_ = by_label(drawn, "reduce")
    assert [(s, d) for s, d, _ in drawn_edges] == [(collapsed, reduce_)]
    assert "1001 graph nodes drawn as 2" in graph["label"]
    assert "FINISHED 990" in graph["label"] and "WAITING_FOR_ARGS 1" in graph["label"]


@pytest.mark.parametrize(
    "states, expected",
    [
        (["FINISHED"] * 9 + ["INFEASIBLE"], "INFEASIBLE"),
        (["QUEUED"] * 5 + ["WAITING_FOR_ARGS"] * 5, "WAITING_FOR_ARGS"),
        (["FINISHED"] * 9 + ["CANCELLED"], "CANCELLED"),
        (["FINISHED"] * 10, "FINISHED"),
        (["RUNNING"] * 9 + ["LOST"], "LOST"),
    ],
)
def test_collapsed_colour_is_least_done(states, expected):
    nodes, edges = fan_in(len(states), states)
    drawn, _, _ = parse(to_digraph(nodes, edges))
    (collapsed,) = [a for a in drawn.values() if a["label"].startswith("f ×10")]
    assert collapsed["fillcolor"] == fill("task", expected)


def test_collapse_threshold_boundary():
    drawn, _, _ = parse(to_digraph(*fan_in(8)))
    assert len(drawn) == 9
    drawn, _, _ = parse(to_digraph(*fan_in(9)))
    assert len(drawn) == 2
    drawn, _, _ = parse(to_digraph(*fan_in(9), collapse_threshold=20))
    assert len(drawn) == 10


def test_no_collapse_without_group():
    nodes, edges = fan_in(20, group=None)
    drawn, _, _ = parse(to_digraph(nodes, edges))
    assert len(drawn) == 21


def test_no_collapse_across_different_predecessors():
    nodes = [task(f"src{i}", group="s") for i in range(2)]
    nodes += [task(f"t{i}", label="f", group="fid") for i in range(20)]
    edges = [(f"src{i % 2}", f"t{i}", "data") for i in range(20)]
    drawn, drawn_edges, _ = parse(to_digraph(nodes, edges))
    labels = sorted(a["label"] for a in drawn.values())
    assert labels.count("f ×10\\nFINISHED 10") == 2
    assert len(drawn) == 4 and len(drawn_edges) == 2


def test_no_collapse_across_kinds_or_groups():
    nodes = [task(f"t{i}", label="f", group="g") for i in range(10)]
    nodes += [task(f"c{i}", label="f", group="g", kind="actor_call") for i in range(10)]
    nodes += [task(f"u{i}", label="f", group="h") for i in range(10)]
    drawn, _, _ = parse(to_digraph(nodes, []))
    assert len(drawn) == 3
    shapes = sorted(a.get("style") for a in drawn.values())
    assert shapes == ["filled", "filled", "rounded,filled"]


def test_edge_kind_matters_for_siblings():
    nodes = [task("A", "ALIVE", "Actor", kind="actor")]
    nodes += [task(f"c{i}", label="m", group="m", kind="actor_call") for i in range(10)]
    nodes += [task(f"d{i}", label="m", group="m", kind="actor_call") for i in range(10)]
    edges = [("A", f"c{i}", "order") for i in range(10)] + [("A", f"d{i}", "data") for i in range(10)]
    drawn, drawn_edges, _ = parse(to_digraph(nodes, edges))
    assert len(drawn) == 3
    assert sorted(a.get("style", "solid") for _, _, a in drawn_edges) == ["dashed", "solid"]


# --------------------------------------------------------------------------
# big graphs and truncation


def layered(layers=100, width=100):
    nodes, edges = [], []
    for layer in range(layers):
        for i in range(width):
            tid = f"t{layer}.{i}"
            nodes.append(task(tid, "QUEUED", f"step{layer}", f"g{layer}"))
            if layer:
                edges.append((f"o{layer - 1}", tid, "data"))
            edges.append((tid, f"o{layer}", "data"))
        nodes.append({"id": f"o{layer}", "kind": "object", "label": f"o{layer}",
                      "state": "READY", "group": None})
    return nodes, edges


def test_ten_thousand_fan_in_collapses():
    drawn, drawn_edges, _ = parse(to_digraph(*fan_in(10_000)))
    assert len(drawn) == 2 and len(drawn_edges) == 1
    assert any(a["label"].startswith("f ×10000\\n") for a in drawn.values())


def test_layered_collapses_per_layer():
    drawn, drawn_edges, graph = parse(to_digraph(*layered()))
    assert len(drawn) == 200
    assert len(drawn_edges) == 199
    assert "step57 ×100\\nQUEUED 100" in {a["label"] for a in drawn.values()}
    assert "QUEUED 10000" in graph["label"] and "object READY 100" in graph["label"]


def test_truncation_keeps_first_nodes_in_topological_order():
    # A chain given newest-first, so input order is not topological order.
    n = 50
    nodes = [task(f"t{i}", label=f"s{i}") for i in reversed(range(n))]
    edges = [(f"t{i}", f"t{i + 1}", "data") for i in range(n - 1)]
    drawn, drawn_edges, graph = parse(to_digraph(nodes, edges, max_nodes=10))
    assert len(drawn) == 11
    labels = {a["label"] for a in drawn.values()}
    assert labels == {f"s{i}" for i in range(10)} | {"… 40 more\\nnot drawn (max_nodes=10)"}
    assert drawn["more"]["shape"] == "note"
    # s9 feeds the hidden part, drawn as one dotted edge into "more".
    dotted = [(s, d) for s, d, a in drawn_edges if a.get("style") == "dotted"]
    assert dotted == [(by_label(drawn, "s9"), "more")]
    assert len(drawn_edges) == 10
    assert "50 graph nodes drawn as 11" in graph["label"]
    assert "FINISHED 50" in graph["label"]  # the legend counts hidden nodes too


def test_truncation_after_collapsing_counts_hidden_members():
    drawn, _, _ = parse(to_digraph(*layered(), collapse_threshold=10**9))
    assert len(drawn) == 2001
    assert drawn["more"]["label"] == "… 8100 more\\nnot drawn (max_nodes=2000)"

    drawn, _, _ = parse(to_digraph(*layered(), max_nodes=50))
    assert len(drawn) == 51
    assert drawn["more"]["label"].startswith("… 150 more\\n(7575 graph nodes)\\n")


def test_max_nodes_must_be_positive():
    with pytest.raises(ValueError, match="max_nodes"):
        to_digraph([task("a")], [], max_nodes=0)


# --------------------------------------------------------------------------
# writing files


def test_write_dot_and_gv_without_dot_program(small, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for name in ("graph.dot", "graph.gv"):
        path = write(small, tmp_path / name)
        assert path == str(tmp_path / name)
        with open(path, encoding="utf-8") as f:
            assert f.read() == small.source
    assert sorted(os.listdir(tmp_path)) == ["graph.dot", "graph.gv"]


def test_write_format_argument_appends_extension(small, tmp_path):
    path = write(small, tmp_path / "graph", format="dot")
    assert path == str(tmp_path / "graph.dot")
    assert os.listdir(tmp_path) == ["graph.dot"]
    # An explicit format wins over an existing extension, name kept as given.
    path = write(small, tmp_path / "graph.txt", format="gv")
    assert path == str(tmp_path / "graph.txt")
    with open(path, encoding="utf-8") as f:
        assert f.read().startswith("digraph flowcore {")


@pytest.mark.parametrize("filename, fmt", [("graph", None), ("graph.jpeg", None), ("g.dot", "bmp")])
def test_write_rejects_unknown_format(small, tmp_path, filename, fmt):
    with pytest.raises(ValueError, match="format"):
        write(small, tmp_path / filename, format=fmt)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "name, magic",
    [("graph.svg", b"<svg"), ("graph.png", b"\x89PNG\r\n\x1a\n"), ("graph.pdf", b"%PDF")],
)
def test_write_rendered_formats(small, tmp_path, name, magic):
    need_dot(name.rsplit(".", 1)[1])
    path = write(small, tmp_path / name)
    assert path == str(tmp_path / name)
    with open(path, "rb") as f:
        data = f.read()
    assert magic in data[:400]
    assert os.listdir(tmp_path) == [name], "no intermediate files may be left behind"


def test_rendered_svg_has_labels_and_legend(tmp_path):
    need_dot()
    nodes, edges = fan_in(30, ["FINISHED"] * 29 + ["FAILED"])
    path = write(to_digraph(nodes, edges, title="fan in"), tmp_path / "g.svg")
    with open(path, encoding="utf-8") as f:
        svg = f.read()
    assert "f ×30" in svg and "FAILED 1" in svg and "reduce" in svg and "fan in" in svg
    assert "WAITING_FOR_ARGS 1" in svg  # only the legend says so


def _check_missing_renderer(record, tmp_path, name):
    (warning,) = [w for w in record if issubclass(w.category, RuntimeWarning)]
    message = str(warning.message)
    for hint in ("flowcore[graph]", "apt-get install graphviz", "conda install graphviz",
                 "brew install graphviz", f"dot -T{name.split('.')[1]} "):
        assert hint in message
    assert os.listdir(tmp_path) == ["graph.dot"]


def test_missing_renderer_via_which(small, tmp_path, monkeypatch):
    monkeypatch.setattr(draw.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(draw, "RENDERERS", ("dot",))
    with pytest.warns(RuntimeWarning) as record:
        assert write(small, tmp_path / "graph.png") == str(tmp_path / "graph.dot")
    _check_missing_renderer(record, tmp_path, "graph.png")


def test_missing_renderer_via_path(small, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    monkeypatch.setattr(draw, "RENDERERS", ("dot",))
    with pytest.warns(RuntimeWarning) as record:
        write(small, tmp_path / "graph.svg")
    _check_missing_renderer(record, tmp_path, "graph.svg")


def test_missing_renderer_when_it_cannot_be_run(small, tmp_path, monkeypatch):
    # `which` claims dot exists, but running it fails: the same fallback.
    monkeypatch.setattr(draw.shutil, "which", lambda *a, **k: str(tmp_path / "nowhere" / "dot"))
    monkeypatch.setattr(draw, "RENDERERS", ("dot",))
    with pytest.warns(RuntimeWarning) as record:
        write(small, tmp_path / "graph.pdf")
    _check_missing_renderer(record, tmp_path, "graph.pdf")


def test_import_does_not_load_graphviz():
    code = (
        "import sys, flowcore.graph, flowcore.graph.draw, flowcore.graph.algorithms\n"
        "assert 'graphviz' not in sys.modules, 'graphviz imported eagerly'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
