"""Every message type the head takes, fed to a ``validate``-mode state
machine: after each one the books must add up (resources per node, running
sets, refcounts, holders), or ``handle`` raises.  Also: a handler that
raises sends nothing of what it had queued."""
from __future__ import annotations

import logging
from typing import Any

import pytest

from flowcore.ids import IdSource, object_id
from flowcore.objects.serialization import serialize
from flowcore.scheduler.books import check_books
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.records import TaskState

S = TaskState
C = "driver-1"


def _spec(ids: IdSource, **kw: Any) -> dict:
    spec = {"tid": ids.task_id(), "fid": b"f", "name": "f", "args": b"a", "deps": [],
            "nested": [], "nret": 1, "res": {"CPU": 1.0}, "retries": 1}
    spec.update(kw)
    return spec


def _done(tid: bytes, **kw: Any) -> dict:
    msg = {"op": "task_done", "tid": tid, "status": "ok",
           "results": [{"oid": object_id(tid, 0), "size": 1, "inline": b"v"}]}
    msg.update(kw)
    return msg


def test_every_message_type_keeps_the_books() -> None:
    s = SchedulerState(validate=True, error_payload=lambda e: serialize(e).to_bytes())
    ids = IdSource()
    seen: set[str] = set()

    def h(src: str, msg: dict) -> list:
        seen.add(msg["op"])
        return s.handle(src, msg)

    h(C, {"op": "register_client", "kind": "driver", "pid": 1})
    h("w1", {"op": "register_client", "kind": "worker", "pid": 2, "node_id": "n1"})
    for nid in ("n1", "n2"):
        h(nid, {"op": "register_node", "node_id": nid, "name": nid,
                "address": f"tcp://{nid}:1", "resources": {"CPU": 2.0, "GPU": 1.0}})
    h("n1", {"op": "heartbeat", "stats": {"load": 0.5}})
    h("n1", {"op": "node_warning", "text": "worker cap reached"})
    h(C, {"op": "register_function", "fid": b"f", "blob": b"blob", "name": "f"})
    # objects and references
    put = object_id(ids.task_id(), 0)
    h(C, {"op": "put", "oid": put, "size": 10, "node": "n1"})
    h("n2", {"op": "object_location", "oid": put, "node": "n2", "add": True})
    h("w1", {"op": "incref", "oids": [put]})
    h("w1", {"op": "subscribe", "oids": [put], "ack": 1})
    h("w1", {"op": "decref", "oids": [put]})
    # tasks: run, block, unblock, yield, log, finish; retry after a crash; cancel
    a = _spec(ids, deps=[put])
    h(C, {"op": "submit", "tasks": [a]})
    assert s.tasks[a["tid"]].state == S.RUNNING
    h("n1", {"op": "task_blocked", "tid": a["tid"]})
    h("n1", {"op": "task_unblocked", "tid": a["tid"]})
    h(s.tasks[a["tid"]].node, {"op": "task_yield", "tid": a["tid"],
                               "result": {"oid": object_id(a["tid"], 5), "size": 1,
                                          "inline": b"y"}})
    h("n1", {"op": "log", "tid": a["tid"].hex(), "lines": ["hello"]})
    node = s.tasks[a["tid"]].node
    h(node, {"op": "worker_died", "tid": a["tid"], "pid": 9, "how": "killed"})
    assert s.tasks[a["tid"]].state == S.RUNNING and s.tasks[a["tid"]].attempt == 2
    h(s.tasks[a["tid"]].node, _done(a["tid"]))
    b = _spec(ids, res={"CPU": 64.0})  # infeasible, then cancelled
    h(C, {"op": "submit", "tasks": [b]})
    assert s.tasks[b["tid"]].state == S.INFEASIBLE
    h(C, {"op": "cancel", "oid": object_id(b["tid"], 0), "force": False})
    # local-first: offered to n1, which started it
    c = _spec(ids, local="n1")
    h("w1", {"op": "submit", "tasks": [c]})
    h("n1", {"op": "local_verdict", "tid": c["tid"], "started": True})
    assert s.tasks[c["tid"]].state == S.RUNNING
    h("n1", _done(c["tid"], local=True))
    # leased tasks: recorded running; one refused by its worker, one whose worker died
    d, e = _spec(ids, lease=["n1", "w7"]), _spec(ids, lease=["n1", "w8"])
    h(C, {"op": "submit", "tasks": [d, e]})
    assert s.tasks[d["tid"]].state == S.RUNNING and s.tasks[e["tid"]].state == S.RUNNING
    h(C, {"op": "lease_unrun", "tids": [d["tid"]]})
    h("n1", {"op": "lease_lost", "wid": "w8", "how": "killed", "pid": 8})
    for tid in (d["tid"], e["tid"]):
        h(s.tasks[tid].node, _done(tid))
    # a burst's task queued at its owner, then sent to a leased worker
    f = _spec(ids, lease_q="n1")
    h(C, {"op": "submit", "tasks": [f]})
    assert s.tasks[f["tid"]].state == S.QUEUED
    h(C, {"op": "lease_start", "lease": ["n1", "w9"], "tids": [f["tid"]], "busy": 0})
    assert s.tasks[f["tid"]].state == S.RUNNING
    h("n1", _done(f["tid"]))
    # placement groups
    pgid = ids.task_id()
    h(C, {"op": "create_placement_group", "pgid": pgid, "bundles": [{"CPU": 1.0}],
          "strategy": "PACK", "name": "", "lifetime": None, "rid": 1})
    g = _spec(ids, strategy=["pg", pgid, 0, False])
    h(C, {"op": "submit", "tasks": [g]})
    h(s.tasks[g["tid"]].node, _done(g["tid"]))
    h(C, {"op": "remove_placement_group", "pgid": pgid, "rid": 2})
    # actors: create, ready, calls (through the head and direct), death, kill
    aid = ids.task_id()
    spec = {"tid": aid, "aid": aid, "fid": b"cls", "name": "A.__init__", "class_name": "A",
            "methods": {"f": 1}, "args": b"a", "deps": [], "nested": [], "hold": {"GPU": 1.0},
            "place": {"CPU": 1.0}, "max_restarts": 1, "max_task_retries": 0,
            "max_concurrency": 1}
    h(C, {"op": "create_actor", "spec": spec, "rid": 3})
    h("w-actor", {"op": "register_client", "kind": "worker", "pid": 5})
    h("w-actor", {"op": "actor_ready", "aid": aid, "pid": 5, "direct_port": 4242})
    h(C, {"op": "actor_direct", "aid": aid, "rid": 4})
    call = _spec(ids, actor=aid, method="f", res={}, retries=0)
    h(C, {"op": "submit", "tasks": [call]})
    h("w-actor", _done(call["tid"]))
    direct = _spec(ids, actor=aid, method="f", res={}, retries=0, direct_epoch=0)
    h(C, {"op": "submit", "tasks": [direct]})
    assert s.tasks[direct["tid"]].state == S.RUNNING
    assert "direct_call" in [e["transition"] for e in s.log.for_task(direct["tid"])]
    h("w-actor", _done(direct["tid"], answered_direct=True))
    node = s.actors[aid].node
    h(node, {"op": "actor_died", "aid": aid, "pid": 5, "how": "was killed"})  # restarts
    h("w-actor2", {"op": "register_client", "kind": "worker", "pid": 6})
    h("w-actor2", {"op": "actor_ready", "aid": aid, "pid": 6})
    h(C, {"op": "kill_actor", "aid": aid, "no_restart": True})
    h(s.actors[aid].node or "n1", {"op": "actor_died", "aid": aid, "pid": 6, "how": "killed"})
    bid = ids.task_id()
    bad = dict(spec, tid=bid, aid=bid, max_restarts=0)
    h(C, {"op": "create_actor", "spec": bad, "rid": 5})
    h("n1", {"op": "actor_failed", "aid": bid, "error": "boom"})
    eid = ids.task_id()
    h(C, {"op": "create_actor", "spec": dict(spec, tid=eid, aid=eid, hold={}), "rid": 6})
    h("w-actor3", {"op": "register_client", "kind": "worker", "pid": 7})
    h("w-actor3", {"op": "actor_ready", "aid": eid, "pid": 7})
    h("w-actor3", {"op": "actor_exit", "aid": eid, "cause": "exit_actor()"})
    assert seen == set(s.ops), f"not fed: {sorted(set(s.ops) - seen)}"
    s.node_died("n2", "test")
    s.client_disconnected("w1")
    assert check_books(s) == []


def test_validate_mode_catches_wrong_books() -> None:
    s = SchedulerState(validate=True)
    s.handle(C, {"op": "register_client", "kind": "driver"})
    s.handle("n1", {"op": "register_node", "node_id": "n1", "name": "n1",
                    "address": "tcp://n1:1", "resources": {"CPU": 2.0}})
    s.nodes["n1"].available["CPU"] = 1.0  # a leak no task explains
    with pytest.raises(AssertionError, match="1 CPU in use"):
        s.handle("n1", {"op": "heartbeat", "stats": {}})


def test_a_failing_handler_sends_nothing_it_queued(caplog: pytest.LogCaptureFixture) -> None:
    s = SchedulerState(validate=True)
    s.handle(C, {"op": "register_client", "kind": "driver"})
    s.handle("n1", {"op": "register_node", "node_id": "n1", "name": "n1",
                    "address": "tcp://n1:1", "resources": {"CPU": 2.0}})
    ids = IdSource()
    good = _spec(ids, res={"CPU": 64.0})  # infeasible: a warning to its owner is queued
    broken = {"tid": ids.task_id()}  # no fid: the handler raises half-way
    with caplog.at_level(logging.ERROR, logger="flowcore.scheduler"):
        with pytest.raises(KeyError):
            s.handle(C, {"op": "submit", "tasks": [good, broken]})
    assert s.out == []
    assert any("submit" in r.getMessage() and "failed" in r.getMessage()
               for r in caplog.records)
    # the next message's answer carries nothing of the failed one
    out = s.handle("n1", {"op": "heartbeat", "stats": {}})
    assert [m for _, m in out if m.get("op") == "warning"] == []


def test_unknown_op_is_refused() -> None:
    s = SchedulerState()
    with pytest.raises(KeyError, match="unknown op"):
        s.handle(C, {"op": "no_such_op"})
    assert "submit" in s.ops and "handle" not in s.ops
