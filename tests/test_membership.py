"""Unit tests of ``Membership`` (scheduler/membership.py), no IO: nodes
found silent by ``check_heartbeats`` and declared dead, the dead nodes'
rows, worker output routed to drivers, and departed worker clients.

The clock the component and the node records read is a fake one, moved by
the test, so no test sleeps or depends on the machine's speed.
"""
from __future__ import annotations

from typing import Any

import pytest

from flowcore.ids import IdSource
from flowcore.scheduler import membership, records
from flowcore.scheduler.machine import SchedulerState

DRIVER = "driver-1"


class Clock:
    """Stands in for the ``time`` module of the modules under test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock(1000.0)
    monkeypatch.setattr(membership, "time", c)
    monkeypatch.setattr(records, "time", c)
    return c


def new_state() -> SchedulerState:
    s = SchedulerState(validate=True)
    assert s.handle(DRIVER, {"op": "register_client", "kind": "driver"}) == []
    return s


def register(s: SchedulerState, nid: str, cpus: float = 1.0) -> list:
    return s.handle(nid, {"op": "register_node", "node_id": nid, "name": nid,
                          "address": f"tcp://{nid}:1", "resources": {"CPU": cpus}})


def spec(ids: IdSource, **kw: Any) -> dict:
    return dict({"tid": ids.task_id(), "fid": b"fid-1", "name": "f", "args": b"args",
                 "deps": [], "nested": [], "nret": 1, "res": {"CPU": 1.0}, "retries": 0,
                 "retry_exc": False}, **kw)


def run_tasks(out: list) -> list[tuple[str, bytes]]:
    return [(d, m["tid"]) for d, m in out if m["op"] == "run_task"]


def test_a_silent_node_is_found_declared_dead_and_its_task_retried_elsewhere(
        clock: Clock) -> None:
    s = new_state()
    register(s, "n1")
    register(s, "n2")
    ids = IdSource()
    first = spec(ids, retries=1)
    out = s.handle(DRIVER, {"op": "submit", "tasks": [first]})
    (where, tid), = run_tasks(out)
    other = "n2" if where == "n1" else "n1"
    clock.now = 1004.0
    assert s.handle(other, {"op": "heartbeat", "stats": {"load": 0.5}}) == []
    assert s.nodes[other].info["load"] == 0.5
    # silent for 6 s against a 5 s timeout: only the node that ran the task
    assert s.check_heartbeats(1006.0, 5.0) == [where]
    assert s.check_heartbeats(1003.0, 5.0) == []
    assert sorted(s.check_heartbeats(1010.0, 5.0)) == ["n1", "n2"]
    clock.now = 1006.0
    out = s.node_died(where, "no heartbeat for 6 s")
    assert run_tasks(out) == [(other, tid)]  # retried on the node still alive
    assert s.tasks[tid].attempt == 2
    assert s.check_heartbeats(1006.0, 5.0) == []  # listed once, not again
    assert s.node_died(where, "again") == []
    (dead,) = [row for row in s.list_nodes() if not row["alive"]]
    assert dead["node_id"] == where and dead["death_cause"] == "no heartbeat for 6 s"
    assert dead["died"] == 1006.0
    # a late heartbeat of the dead node brings nothing back
    assert s.handle(where, {"op": "heartbeat", "stats": {}}) == []
    assert where not in s.nodes


def test_a_dead_node_that_registers_again_is_listed_once_alive(clock: Clock) -> None:
    s = new_state()
    register(s, "n1")
    s.node_died("n1", "connection lost")
    assert [(r["node_id"], r["alive"]) for r in s.list_nodes()] == [("n1", False)]
    clock.now = 1100.0
    register(s, "n1")
    assert [(r["node_id"], r["alive"]) for r in s.list_nodes()] == [("n1", True)]
    # its silence counts from when it joined again
    assert s.check_heartbeats(1104.0, 5.0) == []
    assert s.check_heartbeats(1106.0, 5.0) == ["n1"]


def test_dead_node_rows_keep_the_newest(monkeypatch: pytest.MonkeyPatch,
                                        clock: Clock) -> None:
    monkeypatch.setattr(membership, "DEAD_NODES_MAX", 2)
    s = new_state()
    for nid in ("a", "b", "c"):
        register(s, nid)
    for nid in ("a", "b", "c"):
        s.node_died(nid, f"{nid} stopped")
    assert [r["node_id"] for r in s.list_nodes()] == ["b", "c"]


def test_worker_output_goes_to_the_driver_owning_the_task() -> None:
    s = new_state()
    s.handle("driver-2", {"op": "register_client", "kind": "driver"})
    s.handle("w1", {"op": "register_client", "kind": "worker", "pid": 11})
    register(s, "n1", cpus=4)
    ids = IdSource()
    mine = spec(ids)
    s.handle(DRIVER, {"op": "submit", "tasks": [mine]})
    nested = spec(ids)  # submitted by a task: its owner is a worker
    s.handle("w1", {"op": "submit", "tasks": [nested]})

    def log_to(tid: bytes | None) -> list[str]:
        msg = {"op": "log", "lines": ["hi"], "stream": "stdout", "name": "f", "pid": 11,
               "tid": tid.hex() if tid else ""}
        out = s.handle("n1", msg)
        assert all(m is msg for _, m in out)
        return sorted(d for d, _ in out)

    assert log_to(mine["tid"]) == [DRIVER]
    assert log_to(nested["tid"]) == [DRIVER, "driver-2"]  # every driver
    assert log_to(None) == [DRIVER, "driver-2"]
    assert log_to(IdSource().task_id()) == [DRIVER, "driver-2"]  # unknown task


def test_a_departed_worker_is_still_known_by_its_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membership, "GONE_WORKERS_MAX", 2)
    s = new_state()
    for n, cid in enumerate(("w1", "w2", "w3"), start=1):
        s.handle(cid, {"op": "register_client", "kind": "worker", "pid": 100 + n})
    s.handle(DRIVER + "-b", {"op": "register_client", "kind": "driver", "pid": 101})
    assert s.membership.worker_clients(101) == {"w1"}  # drivers are not workers
    for cid in ("w1", "w2", "w3"):
        assert s.client_disconnected(cid) == []
        assert cid not in s.clients
    # a crash report may come after the disconnect: the newest two are kept
    assert s.membership.worker_clients(101) == set()
    assert s.membership.worker_clients(102) == {"w2"}
    assert s.membership.worker_clients(103) == {"w3"}
