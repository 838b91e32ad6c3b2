"""Unit tests of placement groups in the head's IO-free state machine (the
``PlacementGroupsMixin`` of ``SchedulerState``) and of the node pool's
bundle accounting.  No sockets, no processes."""
from __future__ import annotations

from typing import Any

import pytest

from flowcore.exceptions import PlacementGroupError
from flowcore.ids import IdSource, object_id
from flowcore.node.pool import WorkerPool
from flowcore.objects.serialization import deserialize, serialize
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.placement_groups import check_bundles, plan
from flowcore.scheduler.states import TaskState

S = TaskState
C = "client-1"


def ops(out: list, op: str, dest: str | None = None) -> list[dict]:
    return [m for d, m in out if m["op"] == op and (dest is None or d == dest)]


def value(data: bytes) -> Any:
    return deserialize(memoryview(data))


class Head:
    def __init__(self) -> None:
        self.state = SchedulerState(error_payload=lambda e: serialize(e).to_bytes())
        self.ids = IdSource()
        self.state.handle(C, {"op": "register_client", "kind": "driver"})

    def node(self, nid: str, **res: float) -> list:
        return self.state.handle(nid, {"op": "register_node", "node_id": nid, "name": nid,
                                       "address": f"tcp://{nid}:1", "resources": res})

    def group(self, bundles: list, strategy: str = "PACK", name: str = "",
              client: str = C, lifetime: str | None = None) -> tuple[bytes, list]:
        pgid = self.ids.task_id()
        out = self.state.handle(client, {"op": "create_placement_group", "pgid": pgid,
                                         "bundles": bundles, "strategy": strategy,
                                         "name": name, "lifetime": lifetime, "rid": 1})
        return pgid, out

    def where(self, pgid: bytes) -> list[str | None]:
        return [b.node for b in self.state.pgs[pgid].bundles]

    def pg_state(self, pgid: bytes) -> str:
        return self.state.pgs[pgid].state

    def task(self, pgid: bytes | None, index: int = -1, res: dict | None = None,
             capture: bool = False) -> tuple[bytes, list]:
        spec: dict[str, Any] = {"tid": self.ids.task_id(), "fid": b"f", "name": "f",
                                "args": b"", "deps": [], "nret": 1,
                                "res": {"CPU": 1.0} if res is None else res, "retries": 0}
        if pgid is not None:
            spec["strategy"] = ["pg", pgid, index, capture]
        return spec["tid"], self.state.handle(C, {"op": "submit", "tasks": [spec]})

    def finish(self, tid: bytes) -> list:
        t = self.state.tasks[tid]
        return self.state.handle(t.node, {"op": "task_done", "tid": tid, "status": "ok",
                                          "results": [{"oid": object_id(tid, 0),
                                                       "inline": b"x", "size": 1}]})

    def avail(self, nid: str, key: str = "CPU") -> float:
        return self.state.nodes[nid].available.get(key, 0.0)

    def ready_obj(self, pgid: bytes) -> Any:
        return self.state.objects.get(object_id(pgid, 0))


# ====================================================================== the plan
def test_plan_strategies() -> None:
    free = {"a": {"CPU": 4.0}, "b": {"CPU": 2.0}, "c": {"CPU": 2.0}}
    two = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert set(plan("PACK", two, {}, free).values()) == {"a"}
    assert set(plan("STRICT_PACK", two, {}, free).values()) == {"a"}
    spread = plan("SPREAD", two, {}, free)
    assert len(set(spread.values())) == 2
    strict = plan("STRICT_SPREAD", [{"CPU": 2.0}] * 3, {}, free)
    assert sorted(strict.values()) == ["a", "b", "c"]
    assert plan("STRICT_SPREAD", [{"CPU": 1.0}] * 4, {}, free) is None
    assert plan("STRICT_PACK", [{"CPU": 3.0}, {"CPU": 2.0}], {}, free) is None
    # PACK falls back to as few nodes as it can
    packed = plan("PACK", [{"CPU": 3.0}, {"CPU": 1.0}, {"CPU": 2.0}], {}, free)
    assert packed is not None and len(set(packed.values())) == 2
    # SPREAD is soft: more bundles than nodes still fit
    assert plan("SPREAD", [{"CPU": 1.0}] * 5, {}, free) is not None
    assert free == {"a": {"CPU": 4.0}, "b": {"CPU": 2.0}, "c": {"CPU": 2.0}}  # untouched


def test_plan_strict_spread_backtracks_and_respects_placed_bundles() -> None:
    # the big bundle must take the only big node even if listed last
    free = {"big": {"CPU": 4.0}, "small": {"CPU": 1.0}}
    out = plan("STRICT_SPREAD", [{"CPU": 1.0}, {"CPU": 3.0}], {}, free)
    assert out == {0: "small", 1: "big"}
    # bundle 0 already on "big": bundle 1 must go elsewhere
    assert plan("STRICT_SPREAD", [{"CPU": 1.0}, {"CPU": 1.0}], {0: "big"}, free) == {1: "small"}
    # STRICT_PACK: the rest must join bundle 0's node ("free" is what is left there)
    assert plan("STRICT_PACK", [{"CPU": 1.0}, {"CPU": 1.0}], {0: "small"}, free) == {1: "small"}
    free["small"] = {"CPU": 0.5}
    assert plan("STRICT_PACK", [{"CPU": 1.0}, {"CPU": 1.0}], {0: "small"}, free) is None


@pytest.mark.parametrize("bundles, strategy, words", [
    ([], "PACK", "non-empty list"),
    ([{}], "PACK", "non-empty dict"),
    ([{"CPU": -1}], "PACK", ">= 0"),
    ([{"CPU": 0}], "PACK", "amount > 0"),
    ([{"CPU": 1}], "BALANCED", "STRICT_SPREAD"),
    ([{1: 1}], "PACK", "strings"),
])
def test_check_bundles(bundles: list, strategy: str, words: str) -> None:
    assert words in check_bundles(bundles, strategy)


# ====================================================================== reservation
def test_group_reserves_atomically_and_ready_object_is_sealed() -> None:
    h = Head()
    h.node("n1", CPU=2)
    h.node("n2", CPU=2)
    pgid, out = h.group([{"CPU": 2}, {"CPU": 2}], "STRICT_SPREAD")
    assert ops(out, "reply")[0]["ok"]
    assert h.pg_state(pgid) == "CREATED"
    assert sorted(h.where(pgid)) == ["n1", "n2"]
    assert h.avail("n1") == 0 and h.avail("n2") == 0
    assert {d for d, m in out if m["op"] == "reserve_bundle"} == {"n1", "n2"}
    ready = h.ready_obj(pgid)
    assert ready.state == "READY" and not ready.error
    assert value(ready.inline).id == pgid


def test_group_that_does_not_fit_takes_nothing_and_waits() -> None:
    h = Head()
    h.node("n1", CPU=2)
    h.node("n2", CPU=2)
    t1, _ = h.task(None, res={"CPU": 1.0})
    busy = h.state.tasks[t1].node
    pgid, out = h.group([{"CPU": 2}, {"CPU": 2}], "STRICT_SPREAD")
    assert h.pg_state(pgid) == "PENDING" and h.state.pgs[pgid].feasible
    assert not ops(out, "reserve_bundle")
    assert h.avail(busy) == 1 and sum(h.avail(n) for n in ("n1", "n2")) == 3
    assert h.ready_obj(pgid).state == "PENDING"
    out = h.finish(t1)  # resources free up: the group is placed
    assert h.pg_state(pgid) == "CREATED"
    assert len(ops(out, "reserve_bundle")) == 2


def test_strict_spread_waits_for_a_node_to_join_and_infeasible_is_visible() -> None:
    h = Head()
    h.node("n1", CPU=1)
    pgid, out = h.group([{"CPU": 1}, {"CPU": 1}], "STRICT_SPREAD")
    row = h.state.list_placement_groups()[0]
    assert row["state"] == "PENDING" and row["feasible"] is False
    assert "infeasible" in row["cause"]
    assert any("infeasible" in m["text"] for m in ops(out, "warning", C))
    assert h.avail("n1") == 1
    out = h.node("n2", CPU=1)
    assert h.pg_state(pgid) == "CREATED" and sorted(h.where(pgid)) == ["n1", "n2"]
    assert h.ready_obj(pgid).state == "READY"


def test_duplicate_name_and_bad_bundles_are_refused() -> None:
    h = Head()
    h.node("n1", CPU=2)
    _, out = h.group([{"CPU": 1}], name="g")
    assert ops(out, "reply")[0]["ok"]
    _, out = h.group([{"CPU": 1}], name="g")
    assert "already exists" in ops(out, "reply")[0]["error"]
    _, out = h.group([{"CPU": -1}])
    assert ">= 0" in ops(out, "reply")[0]["error"]
    assert h.state.get_placement_group("g")["bundles"] == [{"CPU": 1.0}]


# ====================================================================== tasks in bundles
def test_tasks_use_bundle_resources_not_the_nodes_free_pool() -> None:
    h = Head()
    h.node("n1", CPU=4)
    pgid, _ = h.group([{"CPU": 2}])
    assert h.avail("n1") == 2
    a, out = h.task(pgid, 0)
    (m,) = ops(out, "run_task", "n1")
    assert m["bundle"] == f"{pgid.hex()}:0"
    b, _ = h.task(pgid, 0)
    c, out = h.task(pgid, 0)  # the bundle is full: waits although the node has 2 free
    assert h.state.tasks[c].state == S.QUEUED and not ops(out, "run_task")
    assert h.avail("n1") == 2
    free, _ = h.task(None)  # an ordinary task uses the node's free pool
    assert h.state.tasks[free].state == S.RUNNING and h.avail("n1") == 1
    out = h.finish(a)
    assert ops(out, "run_task", "n1")[0]["tid"] == c
    assert h.avail("n1") == 1
    bundle = h.state.pgs[pgid].bundles[0]
    assert bundle.available["CPU"] == 0


def test_bundle_index_picks_the_bundle_node_and_too_big_requests_fail() -> None:
    h = Head()
    h.node("n1", CPU=1)
    h.node("n2", CPU=1)
    pgid, _ = h.group([{"CPU": 1}, {"CPU": 1}], "STRICT_SPREAD")
    nodes = h.where(pgid)
    for i in (0, 1):
        tid, out = h.task(pgid, i)
        assert ops(out, "run_task")[0]["bundle"].endswith(f":{i}")
        assert h.state.tasks[tid].node == nodes[i]
    big, out = h.task(pgid, 0, res={"CPU": 2.0})
    t = h.state.tasks[big]
    assert t.state == S.FAILED and "more than bundle 0" in t.cause
    err = value(h.state.objects[object_id(big, 0)].inline)
    assert isinstance(err, PlacementGroupError)
    bad, _ = h.task(pgid, 5)
    assert h.state.tasks[bad].state == S.FAILED and "out of range" in h.state.tasks[bad].cause


def test_remove_cancels_tasks_kills_actors_and_frees_resources() -> None:
    h = Head()
    h.node("n1", CPU=4)
    pgid, _ = h.group([{"CPU": 2}, {"CPU": 1}])
    assert h.avail("n1") == 1
    running, _ = h.task(pgid, 0)
    queued, _ = h.task(pgid, 1, res={"CPU": 1.0})
    queued2, _ = h.task(pgid, 1, res={"CPU": 1.0})
    assert h.state.tasks[queued2].state == S.QUEUED
    aid = h.ids.task_id()
    spec = {"tid": aid, "aid": aid, "fid": b"A", "name": "A.__init__", "class_name": "A",
            "args": b"", "deps": [], "hold": {"CPU": 1.0}, "place": {"CPU": 1.0},
            "strategy": ["pg", pgid, 0, False]}
    h.state.handle(C, {"op": "create_actor", "spec": spec, "rid": 2})
    h.state.handle("n1", {"op": "actor_ready", "aid": aid, "pid": 1})
    assert h.state.actors[aid].bundle == f"{pgid.hex()}:0"
    assert h.state.pgs[pgid].bundles[0].available["CPU"] == 0
    out = h.state.handle(C, {"op": "remove_placement_group", "pgid": pgid, "rid": 3})
    assert ops(out, "reply")[0]["ok"]
    assert h.pg_state(pgid) == "REMOVED"
    assert h.state.actors[aid].state == "DEAD"
    assert [m["aid"] for m in ops(out, "kill_actor", "n1")] == [aid]
    assert [m["tid"] for m in ops(out, "cancel_task", "n1")] == [running, queued]
    assert h.state.tasks[queued2].state == S.CANCELLED
    assert ops(out, "release_bundle", "n1")
    # the bundles' free parts are back; the running tasks give theirs when they end
    assert h.avail("n1") == 2
    for tid in (running, queued):
        h.state.handle("n1", {"op": "worker_died", "tid": tid, "how": "killed"})
    assert h.avail("n1") == 4
    assert h.state.tasks[running].state == S.CANCELLED
    later, _ = h.task(pgid, 0)
    assert h.state.tasks[later].state == S.FAILED and "removed" in h.state.tasks[later].cause
    assert h.ready_obj(pgid) is None  # no ref: freed with the group


def test_removing_a_pending_group_fails_its_ready_ref() -> None:
    h = Head()
    h.node("n1", CPU=1)
    pgid, _ = h.group([{"CPU": 8}])
    h.state.handle(C, {"op": "incref", "oids": [object_id(pgid, 0)]})
    out = h.state.handle(C, {"op": "subscribe", "oids": [object_id(pgid, 0)]})
    assert not ops(out, "object_ready")
    out = h.state.handle(C, {"op": "remove_placement_group", "pgid": pgid, "rid": 1})
    (m,) = ops(out, "object_ready", C)
    assert m["error"] and isinstance(value(m["inline"]), PlacementGroupError)
    assert h.avail("n1") == 1


def test_node_death_reschedules_its_bundles_without_corrupting_accounts() -> None:
    h = Head()
    h.node("n1", CPU=2)
    h.node("n2", CPU=2)
    pgid, _ = h.group([{"CPU": 2}, {"CPU": 2}], "SPREAD")
    tids = [h.task(pgid, i)[0] for i in (0, 1)]
    lost = h.where(pgid)[0]
    other = h.where(pgid)[1]
    h.state.node_died(lost, "killed")
    assert h.pg_state(pgid) == "RESCHEDULING"
    assert h.where(pgid)[0] is None and h.where(pgid)[1] == other
    h.node("n3", CPU=2)
    assert h.pg_state(pgid) == "CREATED" and h.where(pgid)[0] == "n3"
    assert h.avail("n3") == 0
    t0 = h.state.tasks[tids[0]]
    assert t0.state == S.FAILED or t0.node == "n3"
    h.finish(tids[1])
    assert h.state.pgs[pgid].bundles[1].available["CPU"] == 2
    h.state.handle(C, {"op": "remove_placement_group", "pgid": pgid, "rid": 1})
    assert h.avail("n3") == 2 and h.avail(other) == 2


def test_driver_exit_removes_its_groups_but_not_detached_ones() -> None:
    h = Head()
    h.node("n1", CPU=4)
    mine, _ = h.group([{"CPU": 1}])
    kept, _ = h.group([{"CPU": 1}], lifetime="detached")
    h.state.client_disconnected(C)
    assert h.pg_state(mine) == "REMOVED" and h.pg_state(kept) == "CREATED"
    assert h.avail("n1") == 3


def test_capture_child_tasks_is_passed_to_the_node() -> None:
    h = Head()
    h.node("n1", CPU=2)
    pgid, _ = h.group([{"CPU": 1}])
    _, out = h.task(pgid, 0, capture=True)
    assert ops(out, "run_task")[0]["pg_capture"] == pgid


# ====================================================================== the node's pool
def test_pool_counts_bundle_tasks_against_the_bundle() -> None:
    pool = WorkerPool({"CPU": 2.0}, min_workers=2)
    for action in pool.startup():
        pool.worker_ready(action[1], 1)
    pool.reserve_bundle("g:0", {"CPU": 1.0})
    assert pool.available["CPU"] == 1.0
    acts = pool.task_arrived({"tid": b"a", "res": {"CPU": 1.0}, "bundle": "g:0"})
    assert [a[0] for a in acts] == ["run"]
    # the bundle is full: a second bundle task waits; a plain task still runs
    assert pool.task_arrived({"tid": b"b", "res": {"CPU": 1.0}, "bundle": "g:0"}) == []
    assert [a[0] for a in pool.task_arrived({"tid": b"c", "res": {"CPU": 1.0}})] == ["run"]
    assert pool.available["CPU"] == 0.0
    wid = pool.find_task(b"a")[0]
    acts = pool.worker_idle(wid)
    assert [a[2]["tid"] for a in acts if a[0] == "run"] == [b"b"]
    pool.release_bundle("g:0")  # b still runs: it gives back to the node when done
    assert pool.available["CPU"] == 0.0
    pool.worker_idle(pool.find_task(b"b")[0])
    pool.worker_idle(pool.find_task(b"c")[0])
    assert pool.available["CPU"] == 2.0 and pool.bundles == {}


def test_task_of_removed_group_whose_node_dies_before_the_kill_is_cancelled() -> None:
    """Removing a group force-cancels its running tasks; if the node dies before
    the kill arrives, the task is cancelled, not retried into the removed group
    (where it would stay QUEUED for ever)."""
    h = Head()
    h.node("n1", CPU=2.0)
    h.node("n2", CPU=2.0)
    pgid, _ = h.group([{"CPU": 1.0}])
    tid, _ = h.task(pgid, 0)
    t = h.state.tasks[tid]
    assert t.state == S.RUNNING
    node = t.node
    h.state.handle(C, {"op": "remove_placement_group", "pgid": pgid, "rid": 2})
    assert h.state.tasks[tid].state == S.RUNNING  # the kill is on its way
    h.state.node_died(node, "killed")
    assert h.state.tasks[tid].state == S.CANCELLED
    assert not any(x.state == S.QUEUED for x in h.state.tasks.values())
