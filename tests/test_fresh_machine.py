"""A fresh machine has no Graphviz: the demo, the README's visualize() and
the dashboard's DAG tab still work (DOT written, the way to render it said),
and graphviz-pure, when installed, draws what ``dot`` draws."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from flowcore.graph import draw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODOT = os.path.join(ROOT, "tests", "nodot.py")


def run_nodot(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, NODOT, sys.executable, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=150)


@pytest.mark.timeout(180)
def test_demo_exits_0_without_graphviz(tmp_path):
    done = run_nodot([os.path.join(ROOT, "examples", "demo.py")], str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "demo-output"
    assert not (out / "dag.svg").exists()
    assert (out / "dag.dot").read_text().startswith("digraph flowcore {")
    assert "not drawn" in done.stdout and "pip install 'flowcore[graph]'" in done.stdout
    assert "dot -Tsvg demo-output/dag.dot -o demo-output/dag.svg" in done.stdout
    assert "Traceback" not in done.stderr


README_SNIPPET = r'''
import json, os, urllib.request, warnings
import flowcore

@flowcore.remote
def f(x):
    return x + 1

info = flowcore.init(num_cpus=1)
refs = [f.remote(i) for i in range(3)]
assert flowcore.get(refs) == [1, 2, 3]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    flowcore.visualize(refs, filename="dag.svg")
token = open(os.path.join(info["session_dir"], "token")).read().strip()
req = urllib.request.Request(info["dashboard_url"] + "/api/dag.svg",
                             headers={"Authorization": "Bearer " + token})
try:
    status, body = urllib.request.urlopen(req, timeout=30).status, b""
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
print(json.dumps({"warnings": [str(w.message) for w in caught], "status": status,
                  "body": body.decode()}))
flowcore.shutdown()
'''


@pytest.mark.timeout(120)
def test_visualize_and_dashboard_dag_without_graphviz(tmp_path):
    import json
    script = tmp_path / "snippet.py"
    script.write_text(README_SNIPPET)
    done = run_nodot([str(script)], str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not (tmp_path / "dag.svg").exists()
    assert (tmp_path / "dag.dot").read_text().startswith("digraph flowcore {")
    (message,) = report["warnings"]
    assert "DOT source was written to dag.dot" in message and "flowcore[graph]" in message
    assert report["status"] == 501
    assert "graphviz-pure" in report["body"] and "apt-get install graphviz" in report["body"]


def test_write_without_renderer_writes_dot_and_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(draw, "RENDERERS", ("flowcore-no-such-renderer",))
    graph = draw.to_digraph([{"id": "a", "kind": "task", "label": "f", "state": "FINISHED",
                              "group": None}], [])
    with pytest.warns(RuntimeWarning, match=r"dot -Tpng .*g\.dot -o .*g\.png"):
        path = draw.write(graph, tmp_path / "g.png")
    assert path == str(tmp_path / "g.dot")
    assert os.listdir(tmp_path) == ["g.dot"]


def _need_graphviz_pure() -> None:
    beside = os.path.join(os.path.dirname(sys.executable), "graphviz-pure")
    if draw.shutil.which("graphviz-pure") or os.path.exists(beside):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("graphviz-pure is missing under CI: pip install 'flowcore[graph]'")
    pytest.skip("graphviz-pure is not installed (pip install 'flowcore[graph]')")


def test_graphviz_pure_draws_labels_and_legend(tmp_path, monkeypatch):
    _need_graphviz_pure()
    monkeypatch.setattr(draw, "RENDERERS", ("graphviz-pure",))
    nodes = [{"id": f"t{i}", "kind": "task", "label": "f", "state": "FINISHED",
              "group": "f"} for i in range(12)]
    nodes.append({"id": "r", "kind": "task", "label": "reduce", "state": "FAILED",
                  "group": None})
    edges = [(f"t{i}", "r", "data") for i in range(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = draw.write(draw.to_digraph(nodes, edges, title="fan in"), tmp_path / "g.svg")
    svg = open(path, encoding="utf-8").read()
    assert svg.lstrip().startswith(("<?xml", "<svg", "<!DOCTYPE"))
    # the collapsed siblings, the failed reduce, the title and the HTML legend table
    assert "f ×12" in svg and "reduce" in svg and "fan in" in svg and "FAILED 1" in svg
    png = draw.write(draw.to_digraph(nodes, edges), tmp_path / "g.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
