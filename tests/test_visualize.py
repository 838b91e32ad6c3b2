"""visualize(), timeline() and progress() through the public API on a real
local cluster."""
from __future__ import annotations

import io
import json
import os
import re
import threading

import pytest

import flowcore
from flowcore.testing import Signal, wait_recorded

pytestmark = pytest.mark.timeout(60)


@flowcore.remote
def add(a, b=1):
    return a + b


@flowcore.remote
def fail(msg):
    raise ValueError(msg)


@flowcore.remote
def whoami():
    return os.getpid()


@flowcore.remote
def total(*xs):
    return sum(xs)


@flowcore.remote
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self, k=1):
        self.n += k
        return self.n


_NODE = re.compile(r'^\s*n\d+ \[label=(?P<label>"(?:[^"\\]|\\.)*"|\S+) .*'
                   r'tooltip="(?P<id>[0-9a-f]+) \((?P<kind>\w+), (?P<state>\w+)\)"')


def drawn(digraph) -> dict[str, tuple[str, str, str]]:
    """graph node id -> (label, kind, state), read back from the DOT text of
    uncollapsed nodes."""
    out = {}
    for line in digraph.source.splitlines():
        m = _NODE.match(line)
        if m:
            out[m["id"]] = (m["label"].strip('"'), m["kind"], m["state"])
    return out


# ---------------------------------------------------------------- visualize
def test_visualize_shows_names_and_states(cluster):
    sig = Signal()
    try:
        one = flowcore.put(1)  # kept: a put nobody references is freed, and not drawn
        ok = add.remote(one)
        later = add.remote(ok, ok)
        bad = fail.remote("boom")
        held = sig.wait_task.remote()
        assert flowcore.get(later, timeout=30) == 4
        flowcore.wait([bad], timeout=30)
        sig.wait_for_waiters(1)
        wait_recorded([ok, later, bad])

        g = flowcore.visualize([later, bad, held])
        nodes = drawn(g)
        assert nodes[ok.task_id] == ("add", "task", "FINISHED")
        assert nodes[later.task_id] == ("add", "task", "FINISHED")
        assert nodes[bad.task_id] == ("fail", "task", "FAILED")
        assert nodes[held.task_id][1:] == ("task", "RUNNING")
        assert nodes[held.task_id][0].endswith("wait_for_signal")
        assert nodes[one.hex()][0].startswith("put") and \
            nodes[one.hex()][1:] == ("object", "READY")
        assert len(nodes) == 5
        assert g.source.count("->") == 2  # put -> ok -> later (once, though used twice)

        # one ref: its producer and ancestors only
        assert set(drawn(flowcore.visualize(bad))) == {bad.task_id}
        assert set(drawn(flowcore.visualize(ok))) > {ok.task_id}
        assert later.task_id not in drawn(flowcore.visualize(ok))

        # default: everything this driver submitted that the head still tracks
        everything = drawn(flowcore.visualize())
        assert {ok.task_id, later.task_id, bad.task_id, held.task_id} <= set(everything)
        sig.set()
        assert flowcore.get(held, timeout=30) is True
        wait_recorded([held])
        assert drawn(flowcore.visualize(held))[held.task_id][2] == "FINISHED"
    finally:
        sig.close()


def test_visualize_actor_calls_in_order(cluster):
    c = Counter.remote()
    calls = [c.incr.remote() for _ in range(3)]
    after = add.remote(calls[-1])
    assert flowcore.get(after, timeout=30) == 4
    wait_recorded(calls + [after])
    g = flowcore.visualize(after)
    nodes = drawn(g)
    labels = sorted(label for label, _, _ in nodes.values())
    assert labels == ["Counter", "Counter.incr", "Counter.incr", "Counter.incr", "add"]
    assert all(state in ("ALIVE", "FINISHED") for _, _, state in nodes.values())
    assert g.source.count("style=dashed") == 3  # actor -> call 1 -> call 2 -> call 3
    flowcore.kill(c)


def test_visualize_writes_dot_svg_and_png(cluster, tmp_path):
    ref = add.remote(add.remote(1))
    flowcore.get(ref, timeout=30)
    g = flowcore.visualize(ref, filename=tmp_path / "dag.dot")
    assert (tmp_path / "dag.dot").read_text() == g.source
    assert "add" in g.source
    flowcore.visualize(ref, filename=str(tmp_path / "dag.svg"))
    svg = (tmp_path / "dag.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and ">add<" in svg
    flowcore.visualize(ref, filename=tmp_path / "dag.png")
    assert (tmp_path / "dag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # format= overrides the extension; a name without one gets it appended
    flowcore.visualize(ref, filename=tmp_path / "picture.out", format="svg")
    assert "<svg" in (tmp_path / "picture.out").read_text()
    flowcore.visualize(ref, filename=tmp_path / "bare", format="png")
    assert (tmp_path / "bare.png").exists()


@pytest.mark.timeout(120)
def test_visualize_a_2000_task_graph_collapses(cluster, tmp_path):
    parts = [add.remote(i) for i in range(2000)]
    whole = total.remote(*parts)
    assert flowcore.get(whole, timeout=100) == sum(range(1, 2001))
    wait_recorded(parts + [whole])
    g = flowcore.visualize(whole, filename=tmp_path / "big.svg")
    assert "add ×2000" in g.source
    assert "FINISHED 2001" in g.source  # the legend counts every graph node
    assert "2001 graph nodes drawn as 2" in g.source
    assert "<svg" in (tmp_path / "big.svg").read_text()


def test_visualize_bad_arguments(cluster, tmp_path):
    ref = add.remote(1)
    with pytest.raises(TypeError, match="ObjectRef"):
        flowcore.visualize(5)
    with pytest.raises(TypeError, match="item 1 is str"):
        flowcore.visualize([ref, "x"])
    with pytest.raises(ValueError, match="unknown format 'jpeg'"):
        flowcore.visualize(ref, filename=tmp_path / "x.jpeg")
    with pytest.raises(ValueError, match="cannot tell the format"):
        flowcore.visualize(ref, filename=tmp_path / "noextension")
    with pytest.raises(ValueError, match="needs a filename"):
        flowcore.visualize(ref, format="svg")
    with pytest.raises(TypeError, match="filename"):
        flowcore.visualize(ref, filename=3)
    with pytest.raises(TypeError, match="format"):
        flowcore.visualize(ref, filename=tmp_path / "x.svg", format=1)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- timeline
def test_timeline_events(cluster, tmp_path):
    sig = Signal()
    try:
        refs = [whoami.remote() for _ in range(6)]
        pids = flowcore.get(refs, timeout=30)
        bad = fail.remote("timeline boom")
        flowcore.wait([bad], timeout=30)
        held = sig.wait_task.remote()
        sig.wait_for_waiters(1)
        wait_recorded(refs + [bad])

        events = flowcore.timeline(tmp_path / "trace.json")
        with open(tmp_path / "trace.json") as f:
            assert json.load(f)["traceEvents"] == events
        node_names = {n["name"] for n in flowcore.nodes()}
        assert len(node_names) == 1
        assert {e["pid"] for e in events} == node_names  # one process row per node
        by_task = {e["args"]["task_id"]: e for e in events}
        for ref, pid in zip(refs, pids):
            e = by_task[ref.task_id]
            assert e["ph"] == "X" and e["name"] == "whoami"
            assert e["tid"] == pid  # the worker that ran it
            assert e["dur"] > 0 and e["ts"] > 1e15  # epoch microseconds
            assert e["args"]["state"] == "FINISHED" and e["args"]["attempt"] == 1
        # a worker runs one task at a time: its spans do not overlap
        for pid in set(pids):
            spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["tid"] == pid
                           and e["args"].get("kind") == "task")
            assert all(a[1] <= b[0] + 1e-3 for a, b in zip(spans, spans[1:]))
        failed = by_task[bad.task_id]
        assert failed["args"]["state"] == "FAILED"
        assert "timeline boom" in failed["args"]["error"]
        running = by_task[held.task_id]
        assert running["args"]["state"] == "RUNNING" and running["dur"] > 0
        assert running["tid"] == "running #1"
    finally:
        sig.set()
        sig.close()
    with pytest.raises(TypeError, match="filename"):
        flowcore.timeline(5)


# ---------------------------------------------------------------- progress
class Capture(io.StringIO):
    """A file for tqdm that tells when some text has been written."""

    def __init__(self, wanted: str):
        super().__init__()
        self.wanted = wanted
        self.seen = threading.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.wanted in self.getvalue():
            self.seen.set()
        return n


def test_progress_returns_when_all_refs_are_done(cluster):
    sig = Signal()
    try:
        fast = [add.remote(i) for i in range(2)]
        slow = sig.wait_task.remote()
        refs = [fast[0], slow, fast[1]]
        out = Capture("2/3")
        result: dict = {}

        def run():
            result["refs"] = flowcore.progress(refs, desc="work", file=out, mininterval=0,
                                               miniters=1)
            ready, _ = flowcore.wait([slow], timeout=0)
            result["slow_done_at_return"] = ready == [slow]

        t = threading.Thread(target=run)
        t.start()
        assert out.seen.wait(30), out.getvalue()  # the bar advanced to 2 of 3 ...
        assert "refs" not in result  # ... and progress() is still waiting
        sig.set()
        t.join(30)
        assert not t.is_alive()
        assert result == {"refs": refs, "slow_done_at_return": True}
        text = out.getvalue()
        assert "work" in text and "3/3" in text and "100%" in text
    finally:
        sig.close()


def test_progress_counts_failures_and_accepts_one_ref(cluster):
    out = io.StringIO()
    refs = [fail.remote("x"), add.remote(1)]
    assert flowcore.progress(refs, file=out) == refs
    assert "2/2" in out.getvalue() and "failed=1" in out.getvalue()
    one = add.remote(2)
    assert flowcore.progress(one, file=io.StringIO()) == [one]
    assert flowcore.progress([], file=io.StringIO()) == []


def test_progress_bad_arguments(cluster):
    ref = add.remote(1)
    with pytest.raises(TypeError, match="ObjectRef"):
        flowcore.progress(5)
    with pytest.raises(TypeError, match="item 1 is int"):
        flowcore.progress([ref, 1])
    with pytest.raises(TypeError, match="desc"):
        flowcore.progress([ref], desc=3)
    with pytest.raises(TypeError, match="total"):
        flowcore.progress([ref], total=5)
