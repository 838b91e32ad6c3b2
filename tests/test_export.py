"""Unit tests of ``flowcore.scheduler.export.export_graph``: the futures DAG
exported from a ``SchedulerState`` fed with messages (no sockets, no
processes)."""
from __future__ import annotations

from typing import Any

import pytest

from flowcore.graph.draw import to_digraph
from flowcore.ids import IdSource, object_id
from flowcore.scheduler.export import export_graph
from flowcore.scheduler.machine import SchedulerState

pytestmark = pytest.mark.timeout(30)

C, C2, NODE = "c1", "c2", "n1"
FID_A, FID_B = b"A" * 16, b"B" * 16


class Head:
    """Feeds well-formed messages to a ``SchedulerState``."""

    def __init__(self) -> None:
        self.state = SchedulerState()
        self.ids = {C: IdSource(), C2: IdSource()}
        for cid in (C, C2):
            self.state.handle(cid, {"op": "register_client", "kind": "driver"})
        self.state.handle(NODE, {"op": "register_node", "node_id": NODE, "name": NODE,
                                 "address": "tcp://n1:1", "resources": {"CPU": 8.0}})

    def put(self, client: str = C, size: int = 3) -> bytes:
        oid = object_id(self.ids[client].task_id(), 0)
        self.state.handle(client, {"op": "put", "oid": oid, "size": size, "inline": b"v" * size})
        return oid

    def task(self, *deps: bytes, name: str = "f", fid: bytes = FID_A, client: str = C,
             **extra: Any) -> bytes:
        tid = self.ids[client].task_id()
        spec = {"tid": tid, "fid": fid, "name": name, "args": b"a", "deps": list(deps),
                "nret": 1, "res": {"CPU": 1.0}, "retries": 0, **extra}
        self.state.handle(client, {"op": "submit", "tasks": [spec]})
        return tid

    def done(self, tid: bytes, status: str = "ok") -> None:
        self.state.handle(NODE, {"op": "task_done", "tid": tid, "status": status, "pid": 77,
                                 "results": [{"oid": object_id(tid), "inline": b"r", "size": 1,
                                              "error": status == "error"}]})

    def actor(self, *deps: bytes, cls: str = "Counter", name: str | None = None,
              client: str = C) -> bytes:
        tid = self.ids[client].task_id()
        spec = {"tid": tid, "aid": tid, "fid": b"K" * 16, "name": f"{cls}.__init__",
                "class_name": cls, "args": b"a", "deps": list(deps), "actor_name": name}
        self.state.handle(client, {"op": "create_actor", "rid": 1, "spec": spec})
        return tid

    def ready(self, aid: bytes) -> None:
        self.state.handle(NODE, {"op": "actor_ready", "aid": aid, "pid": 99})

    def call(self, aid: bytes, method: str, *deps: bytes, client: str = C) -> bytes:
        tid = self.ids[client].task_id()
        cls = self.state.actors[aid].class_name
        spec = {"tid": tid, "fid": b"", "actor": aid, "method": method, "name": f"{cls}.{method}",
                "args": b"a", "deps": list(deps), "nret": 1, "res": {}, "retries": 0}
        self.state.handle(client, {"op": "submit", "tasks": [spec]})
        return tid

    def drop(self, *oids: bytes, client: str = C) -> None:
        self.state.handle(client, {"op": "decref", "oids": list(oids)})


def h(x: bytes) -> str:
    return x.hex()


def nodes_of(g: dict) -> dict[str, tuple]:
    return {n["id"]: (n["kind"], n["label"], n["state"], n["group"]) for n in g["nodes"]}


def edges_of(g: dict) -> set[tuple]:
    return {tuple(e) for e in g["edges"]}


def check_drawable(g: dict) -> None:
    # the export is what the drawing module takes (it raises on a malformed one)
    to_digraph(g["nodes"], g["edges"])


def test_two_puts_feed_a_task_that_feeds_a_task():
    head = Head()
    p1, p2 = head.put(), head.put(size=2048)
    a = head.task(p1, p2, name="load")
    b = head.task(object_id(a), name="train", fid=FID_B)
    head.done(a)
    g = export_graph(head.state, None, None)
    assert nodes_of(g) == {
        h(p1): ("object", "put\n3 B", "READY", "put"),
        h(p2): ("object", "put\n2.0 KiB", "READY", "put"),
        h(a): ("task", "load", "FINISHED", FID_A.hex()),
        h(b): ("task", "train", "RUNNING", FID_B.hex()),
    }
    assert edges_of(g) == {(h(p1), h(a), "data"), (h(p2), h(a), "data"),
                           (h(a), h(b), "data")}
    assert g["omitted"] == 0
    # nodes come oldest first: dependencies before their users
    ids = [n["id"] for n in g["nodes"]]
    assert ids.index(h(p1)) < ids.index(h(a)) < ids.index(h(b))
    check_drawable(g)


def test_waiting_and_failed_states_and_a_repeated_argument():
    head = Head()
    bad = head.task(name="explode")
    after = head.task(object_id(bad), object_id(bad), name="after")
    assert nodes_of(export_graph(head.state, None, None))[h(after)][2] == "WAITING_FOR_ARGS"
    head.done(bad, status="error")
    g = export_graph(head.state, None, None)
    states = {n["label"]: n["state"] for n in g["nodes"]}
    assert states == {"explode": "FAILED", "after": "FAILED"}
    assert g["edges"] == [(h(bad), h(after), "data")]  # once, though used twice


def test_actor_with_three_calls_and_two_callers():
    head = Head()
    ctor_arg = head.put()
    aid = head.actor(ctor_arg, name="counter")
    assert nodes_of(export_graph(head.state, None, None))[h(aid)][2] in ("PENDING",)
    head.ready(aid)
    p3 = head.put()
    c1 = head.call(aid, "incr")
    c2 = head.call(aid, "incr", p3)
    c3 = head.call(aid, "read")
    other = head.call(aid, "read", client=C2)
    user = head.task(object_id(c3), name="report")
    head.done(c1)
    g = export_graph(head.state, None, None)
    assert nodes_of(g) == {
        h(ctor_arg): ("object", "put\n3 B", "READY", "put"),
        h(aid): ("actor", "Counter\n'counter'", "ALIVE", "Counter"),
        h(p3): ("object", "put\n3 B", "READY", "put"),
        h(c1): ("actor_call", "Counter.incr", "FINISHED", "Counter.incr"),
        h(c2): ("actor_call", "Counter.incr", "RUNNING", "Counter.incr"),
        h(c3): ("actor_call", "Counter.read", "RUNNING", "Counter.read"),
        h(other): ("actor_call", "Counter.read", "RUNNING", "Counter.read"),
        h(user): ("task", "report", "WAITING_FOR_ARGS", FID_A.hex()),
    }
    assert edges_of(g) == {
        (h(ctor_arg), h(aid), "data"),
        (h(aid), h(c1), "order"), (h(c1), h(c2), "order"), (h(c2), h(c3), "order"),
        (h(aid), h(other), "order"),  # the second caller's own chain
        (h(p3), h(c2), "data"), (h(c3), h(user), "data"),
    }
    check_drawable(g)

    # a dead actor is drawn DEAD; its creation task never shows as a task
    head.state.handle(NODE, {"op": "actor_died", "aid": aid, "how": "exited"})
    g = export_graph(head.state, None, None)
    assert nodes_of(g)[h(aid)][2] == "DEAD"
    assert [n for n in g["nodes"] if n["label"].endswith("__init__")] == []


def test_roots_select_ancestors_only():
    head = Head()
    p1 = head.put()
    a = head.task(p1, name="a")
    b = head.task(object_id(a), name="b")
    unrelated = head.task(name="unrelated")
    aid = head.actor()
    head.ready(aid)
    c1 = head.call(aid, "step")
    c2 = head.call(aid, "step")
    g = export_graph(head.state, [object_id(b)], None)
    assert set(nodes_of(g)) == {h(p1), h(a), h(b)}
    assert edges_of(g) == {(h(p1), h(a), "data"), (h(a), h(b), "data")}
    g = export_graph(head.state, [object_id(c2)], None)
    assert set(nodes_of(g)) == {h(aid), h(c1), h(c2)}
    g = export_graph(head.state, [object_id(a), object_id(unrelated)], None)
    assert set(nodes_of(g)) == {h(p1), h(a), h(unrelated)}
    # a put ref is its own root; unknown and malformed ids are ignored
    g = export_graph(head.state, [p1, b"\x00" * 20, b"short"], None)
    assert set(nodes_of(g)) == {h(p1)}
    assert export_graph(head.state, [], None) == {"nodes": [], "edges": [], "omitted": 0}


def test_owner_selects_what_a_client_submitted_and_its_ancestors():
    head = Head()
    mine = head.put(client=C)
    a = head.task(mine, name="a", client=C)
    head.task(object_id(a), name="b", client=C)
    theirs = head.task(object_id(a), name="c", client=C2)
    their_put = head.put(client=C2)
    g = export_graph(head.state, None, C2)
    assert set(nodes_of(g)) == {h(theirs), h(their_put), h(a), h(mine)}
    assert {n["label"] for n in export_graph(head.state, None, C)["nodes"]} == \
        {"put\n3 B", "a", "b"}


def test_pruned_tasks_are_absent():
    head = Head()
    a = head.task(name="a")
    b = head.task(object_id(a), name="b")
    head.done(a)
    head.drop(object_id(a))  # b still holds a's result until it is done
    assert h(a) in nodes_of(export_graph(head.state, None, None))
    head.done(b)
    # b's lineage keeps a (and its result) while b's result is referenced
    g = export_graph(head.state, None, None)
    assert set(nodes_of(g)) == {h(a), h(b)}
    head.drop(object_id(b))
    assert export_graph(head.state, None, None)["nodes"] == []


def test_stored_arguments_are_an_args_object():
    head = Head()
    blob = head.put(size=300_000)
    t = head.task(blob, name="big", args=None, args_dep=0)
    g = export_graph(head.state, None, None)
    assert nodes_of(g)[h(blob)] == ("object", "args\n293.0 KiB", "READY", "args")
    assert edges_of(g) == {(h(blob), h(t), "data")}


def test_siblings_share_a_group_and_limit_keeps_the_oldest():
    head = Head()
    leaves = [head.task(name="leaf") for _ in range(30)]
    total = head.task(*[object_id(x) for x in leaves], name="total", fid=FID_B)
    g = export_graph(head.state, None, None)
    groups = {n["group"] for n in g["nodes"] if n["label"] == "leaf"}
    assert groups == {FID_A.hex()}
    assert len(g["edges"]) == 30
    dot = to_digraph(g["nodes"], g["edges"]).source
    assert "leaf ×30" in dot  # the drawing collapses the siblings
    small = export_graph(head.state, None, None, limit=10)
    assert [n["id"] for n in small["nodes"]] == [h(x) for x in leaves[:10]]
    assert small["omitted"] == 21 and small["edges"] == []
    assert h(total) not in nodes_of(small)
    with pytest.raises(ValueError, match="limit"):
        export_graph(head.state, None, None, limit=-1)
