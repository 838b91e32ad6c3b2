"""Unit tests of the head's IO-free state machine (``SchedulerState``).

Every test feeds messages to ``state.handle(source, msg)`` and looks at the
``(destination, message)`` pairs it returns and at the tables; nothing here
opens a socket or starts a process.
"""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from flowcore.exceptions import (NodeDiedError, ObjectLostError, TaskCancelledError,
                                 WorkerCrashedError)
from flowcore.ids import IdSource, object_id, task_of
from flowcore.objects.serialization import deserialize, serialize
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.records import LOST, PENDING, READY
from flowcore.scheduler.states import (TRANSITIONS, EventLog, InvalidTransition, TaskState,
                                       transition_name)

S = TaskState
C = "client-1"
EPS = 1e-9


def payload(exc: BaseException) -> bytes:
    return serialize(exc).to_bytes()


def ops(out: list, op: str, dest: str | None = None) -> list[dict]:
    return [m for d, m in out if m["op"] == op and (dest is None or d == dest)]


def dests(out: list, op: str) -> list[str]:
    return [d for d, m in out if m["op"] == op]


class Cluster:
    """A thin driver around ``SchedulerState`` that makes well-formed messages."""

    def __init__(self, **kw: Any) -> None:
        self.state = SchedulerState(**kw)
        self.ids = IdSource()
        assert self.state.handle(C, {"op": "register_client", "kind": "driver"}) == []

    # ----------------------------------------------------------- membership
    def node(self, nid: str, **res: float) -> list:
        return self.state.handle(nid, {"op": "register_node", "node_id": nid, "name": nid,
                                       "address": f"tcp://{nid}:1", "resources": res})

    # ----------------------------------------------------------- tasks
    def spec(self, *, deps: tuple = (), res: dict | None = None, nret: int = 1,
             retries: int = 0, nested: tuple = (), name: str = "f",
             retry_exc: bool = False) -> dict:
        return {"tid": self.ids.task_id(), "fid": b"fid-1", "name": name, "args": b"args",
                "deps": list(deps), "nested": list(nested), "nret": nret,
                "res": {"CPU": 1.0} if res is None else res, "retries": retries,
                "retry_exc": retry_exc}

    def submit(self, *specs: dict, client: str = C) -> list:
        return self.state.handle(client, {"op": "submit", "tasks": list(specs)})

    def task(self, **kw: Any) -> tuple[bytes, list]:
        spec = self.spec(**kw)
        return spec["tid"], self.submit(spec)

    def finish(self, tid: bytes, *, status: str = "ok", value: bytes = b"val",
               where: str | None = None, retryable: bool = False,
               nested: list | None = None, source: str | None = None) -> list:
        t = self.state.tasks[tid]
        results = []
        for i in range(t.nret):
            r: dict[str, Any] = {"oid": object_id(tid, i), "size": len(value),
                                 "error": status == "error", "nested": nested or []}
            if where is None:
                r["inline"] = value
            else:
                r["node"] = where
            results.append(r)
        return self.state.handle(source or t.node, {
            "op": "task_done", "tid": tid, "status": status, "results": results,
            "retryable": retryable})

    def died(self, tid: bytes, how: str = "killed by signal 9 (SIGKILL)",
             source: str | None = None) -> list:
        t = self.state.tasks[tid]
        return self.state.handle(source or t.node, {"op": "worker_died", "tid": tid,
                                                    "pid": 4242, "how": how})

    def put(self, value: bytes = b"v", *, where: str | None = None, nested: tuple = (),
            client: str = C) -> tuple[bytes, list]:
        oid = object_id(self.ids.task_id(), 0)
        msg: dict[str, Any] = {"op": "put", "oid": oid, "size": len(value),
                               "nested": list(nested)}
        if where is None:
            msg["inline"] = value
        else:
            msg["node"] = where
        return oid, self.state.handle(client, msg)

    def decref(self, *oids: bytes, client: str = C) -> list:
        return self.state.handle(client, {"op": "decref", "oids": list(oids)})

    def incref(self, *oids: bytes, client: str = C) -> list:
        return self.state.handle(client, {"op": "incref", "oids": list(oids)})

    def cancel(self, tid: bytes, force: bool = False) -> list:
        return self.state.handle(C, {"op": "cancel", "oid": object_id(tid), "force": force})

    def st(self, tid: bytes) -> TaskState | None:
        return self.state.tasks[tid].state

    def avail(self, nid: str, key: str = "CPU") -> float:
        return self.state.nodes[nid].available.get(key, 0.0)

    def transitions(self, tid: bytes) -> list[str]:
        return [e["transition"] for e in self.state.log.for_task(tid)]


def run_task_tids(out: list, dest: str | None = None) -> list[bytes]:
    return [m["tid"] for m in ops(out, "run_task", dest)]


# ====================================================================== dispatch
def test_ready_task_is_dispatched_and_running() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    tid, out = c.task(name="square")
    (dest, msg), = out
    assert dest == "n1"
    assert msg["op"] == "run_task" and msg["tid"] == tid and msg["fid"] == b"fid-1"
    assert msg["args"] == b"args" and msg["deps"] == [] and msg["nret"] == 1
    assert msg["owner"] == C and msg["attempt"] == 1 and msg["name"] == "square"
    t = c.state.tasks[tid]
    assert t.state == S.RUNNING and t.node == "n1"
    assert tid in c.state.nodes["n1"].running
    assert c.avail("n1") == pytest.approx(1.0)
    assert c.transitions(tid) == ["submit_ready", "dispatch"]


def test_task_submitted_before_any_node_runs_when_a_node_registers() -> None:
    c = Cluster()
    tid, out = c.task()
    assert out == [] and c.st(tid) == S.QUEUED
    out = c.node("n1", CPU=1)
    assert run_task_tids(out, "n1") == [tid]
    assert c.st(tid) == S.RUNNING


def test_cpu_task_goes_to_node_with_most_free_cpu() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=2)
    c.node("n2", CPU=2)
    a, out_a = c.task()
    b, out_b = c.task()
    assert dests(out_a, "run_task") == ["n1"]
    assert dests(out_b, "run_task") == ["n2"]


def test_pending_argument_waits_then_runs_with_the_value() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=2)
    a, _ = c.task()
    ra = object_id(a)
    b, out = c.task(deps=(ra,))
    assert out == []
    assert c.st(b) == S.WAITING_FOR_ARGS
    assert c.state.tasks[b].missing == {ra}
    out = c.finish(a, value=b"A-value")
    # the owner hears of the result, with the inline value
    ready = ops(out, "object_ready", C)
    assert [m["oid"] for m in ready] == [ra]
    assert ready[0]["inline"] == b"A-value" and ready[0]["error"] is False
    # and the dependent starts, carrying the argument's location
    (run,) = ops(out, "run_task", "n1")
    assert run["tid"] == b
    assert run["deps"] == [{"op": "object_ready", "oid": ra, "size": 7, "error": False,
                            "inline": b"A-value"}]
    assert c.st(b) == S.RUNNING
    assert c.transitions(b) == ["submit_waiting", "args_ready", "dispatch"]
    assert c.st(a) == S.FINISHED


def test_waiting_task_queues_when_argument_ready_but_no_room() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    a, _ = c.task()
    b, _ = c.task(deps=(object_id(a),), res={"CPU": 1.0})
    blocker, _ = c.task()  # queued behind a
    assert c.st(blocker) == S.QUEUED
    out = c.finish(a)
    # a's CPU went to the queued blocker (FIFO among CPU:1 tasks); b waits its turn
    assert run_task_tids(out) == [blocker]
    assert c.st(b) == S.QUEUED
    out = c.finish(blocker)
    assert run_task_tids(out) == [b]


def test_object_in_a_node_store_is_announced_with_its_location() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    a, _ = c.task()
    out = c.finish(a, where="n1", value=b"x" * 100)
    (m,) = ops(out, "object_ready", C)
    assert m["nodes"] == ["n1"] and "inline" not in m and m["size"] == 100


def test_multiple_returns_each_reported() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    a, _ = c.task(nret=3)
    out = c.finish(a)
    assert sorted(m["oid"] for m in ops(out, "object_ready", C)) == \
        sorted(object_id(a, i) for i in range(3))


# ====================================================================== errors
def test_error_propagates_to_dependents_without_running_them() -> None:
    c = Cluster()
    c.node("n1", CPU=4)
    a, _ = c.task()
    ra = object_id(a)
    b, _ = c.task(deps=(ra,))
    cc, _ = c.task(deps=(object_id(b),))
    err = payload(ValueError("boom in a"))
    out = c.finish(a, status="error", value=err)
    assert run_task_tids(out) == []
    assert c.st(a) == S.FAILED and c.st(b) == S.FAILED and c.st(cc) == S.FAILED
    for tid in (a, b, cc):
        obj = c.state.objects[object_id(tid)]
        assert obj.error and obj.inline == err
    # the owner hears about every failed ref, all with the same payload
    ready = {m["oid"]: m for m in ops(out, "object_ready", C)}
    assert set(ready) == {ra, object_id(b), object_id(cc)}
    assert all(m["error"] and m["inline"] == err for m in ready.values())
    assert "dependency_failed" in c.transitions(b)
    assert "dispatch" not in c.transitions(b)
    # a task submitted later on a failed ref fails at once, same payload
    d, out = c.task(deps=(ra,))
    assert c.st(d) == S.FAILED and run_task_tids(out) == []
    assert c.transitions(d) == ["submit_failed_dependency"]
    assert ops(out, "object_ready", C)[0]["inline"] == err
    assert isinstance(deserialize(err), ValueError)


def test_long_chain_of_dependents_fails_without_recursion_error() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    first = c.spec()
    specs = [first]
    for _ in range(3000):
        specs.append(c.spec(deps=(object_id(specs[-1]["tid"]),)))
    c.submit(*specs)
    err = payload(RuntimeError("root"))
    c.finish(first["tid"], status="error", value=err)
    assert all(c.st(s["tid"]) == S.FAILED for s in specs)
    assert c.state.objects[object_id(specs[-1]["tid"])].inline == err
    c.decref(*[object_id(s["tid"]) for s in specs])
    assert len(c.state.tasks) == 0 and len(c.state.objects) == 0


def test_argument_unknown_to_the_head_fails_the_task_with_object_lost() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    ghost = object_id(c.ids.task_id())
    b, out = c.task(deps=(ghost,))
    assert c.st(b) == S.FAILED and run_task_tids(out) == []
    exc = deserialize(c.state.objects[object_id(b)].inline)
    assert isinstance(exc, ObjectLostError) and ghost.hex() in str(exc)


# ====================================================================== infeasible
def test_infeasible_task_warns_once_and_runs_when_a_fitting_node_joins() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    tid, out = c.task(res={"CPU": 1.0, "GPU": 1.0}, name="train")
    assert c.st(tid) == S.INFEASIBLE
    assert c.transitions(tid) == ["submit_ready", "mark_infeasible"]
    warnings = ops(out, "warning", C)
    assert len(warnings) == 1 and "train" in warnings[0]["text"] and "GPU" in warnings[0]["text"]
    assert run_task_tids(out) == []
    # later events do not repeat the warning nor dispatch it
    other, out = c.task()
    assert ops(out, "warning") == [] and run_task_tids(out) == [other]
    out = c.finish(other)
    assert ops(out, "warning") == [] and run_task_tids(out) == []
    # a node that still does not fit changes nothing
    out = c.node("n2", CPU=8)
    assert c.st(tid) == S.INFEASIBLE and run_task_tids(out) == []
    out = c.node("gpu1", CPU=1, GPU=1)
    assert run_task_tids(out, "gpu1") == [tid]
    assert c.st(tid) == S.RUNNING
    assert c.transitions(tid)[-2:] == ["became_feasible", "dispatch"]
    assert len(c.state.warnings) == 1


def test_task_larger_than_any_node_is_infeasible() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    c.node("n2", CPU=2)
    tid, out = c.task(res={"CPU": 3.0})
    assert c.st(tid) == S.INFEASIBLE and len(ops(out, "warning")) == 1


def test_waiting_task_that_becomes_infeasible_when_its_args_are_ready() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    a, _ = c.task()
    b, _ = c.task(deps=(object_id(a),), res={"TPU": 1.0})
    assert c.st(b) == S.WAITING_FOR_ARGS
    out = c.finish(a)
    assert c.st(b) == S.INFEASIBLE and len(ops(out, "warning", C)) == 1


# ====================================================================== resources
def test_tasks_wait_for_resources_and_go_when_they_free_up() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=2)
    tids = []
    for _ in range(5):
        tid, _ = c.task()
        tids.append(tid)
    assert [c.st(t) for t in tids] == [S.RUNNING] * 2 + [S.QUEUED] * 3
    assert c.avail("n1") == pytest.approx(0.0)
    out = c.finish(tids[0])
    assert run_task_tids(out) == [tids[2]]
    out = c.finish(tids[1])
    assert run_task_tids(out) == [tids[3]]
    for t in tids[2:4]:
        c.finish(t)
    assert c.st(tids[4]) == S.RUNNING
    c.finish(tids[4])
    assert c.avail("n1") == pytest.approx(2.0)


def test_resources_are_accounted_per_node_custom_and_gpu() -> None:
    c = Cluster()
    c.node("cpu", CPU=4)
    c.node("acc", CPU=4, GPU=2, fpga=1)
    fpga = [c.task(res={"CPU": 1.0, "fpga": 1.0})[0] for _ in range(2)]
    gpu = [c.task(res={"CPU": 1.0, "GPU": 1.0})[0] for _ in range(3)]
    assert [c.st(t) for t in fpga] == [S.RUNNING, S.QUEUED]
    assert [c.st(t) for t in gpu] == [S.RUNNING, S.RUNNING, S.QUEUED]
    assert all(c.state.tasks[t].node == "acc" for t in fpga + gpu if c.st(t) == S.RUNNING)
    assert c.avail("acc", "GPU") == pytest.approx(0.0)
    assert c.avail("acc", "fpga") == pytest.approx(0.0)
    assert c.avail("cpu") == pytest.approx(4.0)
    # a CPU-only task still runs (on the CPU node, which has the most free CPU)
    plain, out = c.task()
    assert dests(out, "run_task") == ["cpu"]
    out = c.finish(gpu[0])
    assert run_task_tids(out, "acc") == [gpu[2]]
    out = c.finish(fpga[0])
    assert run_task_tids(out, "acc") == [fpga[1]]
    for t in (gpu[1], gpu[2], fpga[1], plain):
        c.finish(t)
    assert c.state.nodes["acc"].available == pytest.approx({"CPU": 4, "GPU": 2, "fpga": 1})
    assert c.state.nodes["cpu"].available == pytest.approx({"CPU": 4})
    assert c.state.available_resources() == pytest.approx({"CPU": 8, "GPU": 2, "fpga": 1})
    assert c.state.cluster_resources() == pytest.approx({"CPU": 8, "GPU": 2, "fpga": 1})


def test_fractional_resources() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    tids = [c.task(res={"CPU": 0.25})[0] for _ in range(5)]
    assert [c.st(t) for t in tids] == [S.RUNNING] * 4 + [S.QUEUED]
    out = c.finish(tids[0])
    assert run_task_tids(out) == [tids[4]]


def test_zero_cpu_tasks_run_without_limit() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    tids = [c.task(res={})[0] for _ in range(10)]
    assert all(c.st(t) == S.RUNNING for t in tids)
    assert c.avail("n1") == pytest.approx(1.0)


# ====================================================================== pipelining
@pytest.mark.parametrize("depth,cpus,expected", [
    (0.0, 2, 2),   # no pipelining: only what fits
    (1.0, 2, 4),   # one extra task per CPU
    (0.5, 2, 3),   # half an extra task per CPU
    (2.0, 1, 3),
])
def test_pipelining_sends_cpu_tasks_ahead_up_to_depth_per_cpu(depth: float, cpus: int,
                                                              expected: int) -> None:
    c = Cluster(pipeline_depth=depth)
    c.node("n1", CPU=cpus)
    tids = [c.task()[0] for _ in range(8)]
    running = [t for t in tids if c.st(t) == S.RUNNING]
    assert running == tids[:expected]
    assert all(c.st(t) == S.QUEUED for t in tids[expected:])
    # one finishing makes room for exactly one more
    out = c.finish(tids[0])
    assert run_task_tids(out) == [tids[expected]]
    # drain; resources come back exactly
    while any(t in c.state.tasks and c.st(t) == S.RUNNING for t in tids):
        for t in tids:
            if t in c.state.tasks and c.st(t) == S.RUNNING:
                c.finish(t)
    assert all(c.st(t) == S.FINISHED for t in tids)
    assert c.avail("n1") == pytest.approx(float(cpus))


def test_pipelining_only_for_cpu_only_tasks() -> None:
    c = Cluster(pipeline_depth=1.0)
    c.node("n1", CPU=2, GPU=1, disk=1)
    gpu = [c.task(res={"CPU": 1.0, "GPU": 1.0})[0] for _ in range(3)]
    disk = [c.task(res={"disk": 1.0})[0] for _ in range(2)]
    assert [c.st(t) for t in gpu] == [S.RUNNING, S.QUEUED, S.QUEUED]
    assert [c.st(t) for t in disk] == [S.RUNNING, S.QUEUED]
    assert c.avail("n1", "GPU") == pytest.approx(0.0)
    assert c.avail("n1", "disk") == pytest.approx(0.0)


def test_pipelining_prefers_the_least_loaded_node() -> None:
    c = Cluster(pipeline_depth=1.0)
    c.node("n1", CPU=1)
    c.node("n2", CPU=2)
    tids = [c.task()[0] for _ in range(6)]
    on = {n: [t for t in tids if c.state.tasks[t].node == n] for n in ("n1", "n2")}
    # 3 fit; then pipelined by load (running / CPU): n2 0.5 < n1 1.0, ... up to 2 per CPU
    assert len(on["n1"]) == 2 and len(on["n2"]) == 4


# ====================================================================== retries
def test_worker_died_retries_then_fails_with_worker_crashed_error() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(retries=2, name="fragile")
    for attempt in (2, 3):
        out = c.died(tid, how="killed by signal 9 (SIGKILL)")
        (run,) = ops(out, "run_task", "n1")
        assert run["tid"] == tid and run["attempt"] == attempt
        assert c.st(tid) == S.RUNNING
    out = c.died(tid, how="killed by signal 9 (SIGKILL)")
    assert c.st(tid) == S.FAILED and run_task_tids(out) == []
    (m,) = ops(out, "object_ready", C)
    exc = deserialize(m["inline"])
    assert isinstance(exc, WorkerCrashedError)
    assert "killed by signal 9 (SIGKILL)" in str(exc) and "fragile" in str(exc)
    assert "3 time(s)" in str(exc)
    assert c.transitions(tid).count("retry") == 2 and c.transitions(tid)[-1] == "fail"
    assert c.state.counts["retried"] == 2
    assert c.avail("n1") == pytest.approx(1.0)


def test_worker_died_from_another_node_or_for_finished_task_is_ignored() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    tid, _ = c.task(retries=1)
    node = c.state.tasks[tid].node
    other = "n2" if node == "n1" else "n1"
    assert c.died(tid, source=other) == []
    assert c.st(tid) == S.RUNNING and c.state.tasks[tid].attempt == 1
    c.finish(tid)
    assert c.state.handle(node, {"op": "worker_died", "tid": tid, "how": "x"}) == []
    assert c.st(tid) == S.FINISHED


def test_retryable_application_error_retries() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(retries=1, retry_exc=True)
    err = payload(ValueError("flaky"))
    out = c.finish(tid, status="error", value=err, retryable=True)
    assert run_task_tids(out) == [tid] and c.st(tid) == S.RUNNING
    assert ops(out, "object_ready") == []
    assert "application error" in c.state.log.for_task(tid)[-2]["cause"]
    out = c.finish(tid, status="error", value=err, retryable=True)
    assert c.st(tid) == S.FAILED
    (m,) = ops(out, "object_ready", C)
    assert m["inline"] == err and m["error"]


def test_non_retryable_error_fails_at_once() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(retries=5)
    c.finish(tid, status="error", value=payload(KeyError("k")), retryable=False)
    assert c.st(tid) == S.FAILED and c.state.tasks[tid].attempt == 1


def test_stale_task_done_is_ignored() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(retries=1)
    c.died(tid)  # retried at once (attempt 2)
    c.finish(tid, value=b"second")
    assert c.st(tid) == S.FINISHED
    assert c.state.handle("n1", {"op": "task_done", "tid": tid, "status": "ok",
                                 "results": []}) == []
    assert c.state.objects[object_id(tid)].inline == b"second"


# ====================================================================== cancel
def test_cancel_queued_task() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    a, _ = c.task()
    b, _ = c.task(name="victim")
    assert c.st(b) == S.QUEUED
    out = c.cancel(b)
    assert c.st(b) == S.CANCELLED
    assert c.transitions(b)[-1] == "cancel_queued"
    (m,) = ops(out, "object_ready", C)
    exc = deserialize(m["inline"])
    assert m["error"] and isinstance(exc, TaskCancelledError) and "victim" in str(exc)
    out = c.finish(a)
    assert run_task_tids(out) == []
    assert c.avail("n1") == pytest.approx(1.0)


def test_cancel_waiting_and_infeasible_tasks() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    a, _ = c.task()
    w, _ = c.task(deps=(object_id(a),))
    inf, _ = c.task(res={"GPU": 1.0})
    c.cancel(w)
    c.cancel(inf)
    assert c.st(w) == S.CANCELLED and c.st(inf) == S.CANCELLED
    assert inf not in c.state.infeasible
    out = c.finish(a)
    assert run_task_tids(out) == []
    assert c.node("gpu", CPU=1, GPU=1) == []


def test_cancel_running_task_asks_its_node() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task()
    out = c.cancel(tid)
    assert out == [("n1", {"op": "cancel_task", "tid": tid, "force": False})]
    assert c.st(tid) == S.RUNNING
    out = c.state.handle("n1", {"op": "task_done", "tid": tid, "status": "cancelled",
                                "results": []})
    assert c.st(tid) == S.CANCELLED
    assert isinstance(deserialize(ops(out, "object_ready", C)[0]["inline"]),
                      TaskCancelledError)
    assert c.avail("n1") == pytest.approx(1.0)


def test_force_cancel_turns_worker_death_into_cancellation() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(retries=3)
    out = c.cancel(tid, force=True)
    assert ops(out, "cancel_task", "n1")[0]["force"] is True
    out = c.died(tid, how="killed by cancel")
    assert c.st(tid) == S.CANCELLED and run_task_tids(out) == []
    assert not c.state.failures.force_cancelled


def test_force_cancel_of_task_that_finished_anyway_leaves_nothing_behind() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task()
    c.cancel(tid, force=True)
    c.finish(tid)
    assert c.st(tid) == S.FINISHED
    assert not c.state.failures.force_cancelled
    c.decref(object_id(tid))
    assert not c.state.tasks


def test_cancel_of_finished_or_unknown_task_does_nothing() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task()
    c.finish(tid)
    assert c.cancel(tid) == []
    assert c.st(tid) == S.FINISHED
    assert c.cancel(c.ids.task_id()) == []


def test_cancel_propagates_to_dependents() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    a, _ = c.task()
    b, _ = c.task()
    d, _ = c.task(deps=(object_id(b),))
    c.cancel(b)
    assert c.st(d) == S.FAILED
    assert isinstance(deserialize(c.state.objects[object_id(d)].inline), TaskCancelledError)


# ====================================================================== blocking
def test_blocked_task_gives_its_cpu_back_and_takes_it_again() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    a, _ = c.task()
    b, _ = c.task()
    assert c.st(b) == S.QUEUED
    out = c.state.handle("n1", {"op": "task_blocked", "tid": a})
    assert run_task_tids(out, "n1") == [b]
    assert c.avail("n1") == pytest.approx(0.0)
    # blocking twice is a no-op
    assert c.state.handle("n1", {"op": "task_blocked", "tid": a}) == []
    assert c.avail("n1") == pytest.approx(0.0)
    c.state.handle("n1", {"op": "task_unblocked", "tid": a})
    assert c.avail("n1") == pytest.approx(-1.0)  # oversubscribed until one ends
    cc, _ = c.task()
    assert c.st(cc) == S.QUEUED
    out = c.finish(b)
    assert run_task_tids(out) == []  # a holds the CPU again
    out = c.finish(a)
    assert run_task_tids(out) == [cc]
    c.finish(cc)
    assert c.avail("n1") == pytest.approx(1.0)


def test_task_finishing_while_blocked_returns_only_what_it_holds() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=2, GPU=1)
    a, _ = c.task(res={"CPU": 1.0, "GPU": 1.0})
    c.state.handle("n1", {"op": "task_blocked", "tid": a})
    assert c.avail("n1") == pytest.approx(2.0)
    assert c.avail("n1", "GPU") == pytest.approx(0.0)  # only the CPU is given back
    c.finish(a)
    assert c.state.nodes["n1"].available == pytest.approx({"CPU": 2.0, "GPU": 1.0})


# ====================================================================== references
def test_object_freed_only_when_client_task_and_container_refs_are_gone() -> None:
    c = Cluster(lineage=False)  # lineage keeps arguments longer: see the lineage tests
    c.node("n1", CPU=4)
    a, _ = c.task()
    ra = object_id(a)
    c.finish(a, where="n1")
    # a pending task holds ra as an argument (it also waits on a running task)
    slow, _ = c.task()
    user, _ = c.task(deps=(ra, object_id(slow)))
    # a container object holds ra too
    box, _ = c.put(b"box", nested=(ra,))
    out = c.decref(ra)
    assert ops(out, "delete_objects") == [] and ra in c.state.objects
    c.finish(slow)
    out = c.finish(user)
    assert ops(out, "delete_objects") == [] and ra in c.state.objects  # box still holds it
    out = c.decref(box)
    assert [(d, m) for d, m in out if m["op"] == "delete_objects"] == \
        [("n1", {"op": "delete_objects", "oids": [ra]})]
    assert ra not in c.state.objects and box not in c.state.objects
    assert a not in c.state.tasks  # its only return is gone: record pruned


def test_delete_goes_to_every_node_with_a_copy_and_inline_needs_none() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    oid, _ = c.put(b"x", where="n1")
    c.state.handle("n2", {"op": "object_location", "oid": oid, "node": "n2", "add": True})
    out = c.decref(oid)
    assert sorted(d for d, m in out if m["op"] == "delete_objects") == ["n1", "n2"]
    small, _ = c.put(b"small")
    out = c.decref(small)
    assert out == [] and small not in c.state.objects


def test_object_location_removed_copy_is_not_deleted_again() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    oid, _ = c.put(b"x", where="n1")
    c.state.handle("n2", {"op": "object_location", "oid": oid, "node": "n2"})
    c.state.handle("n1", {"op": "object_location", "oid": oid, "node": "n1", "add": False})
    assert dests(c.decref(oid), "delete_objects") == ["n2"]


def test_nested_refs_in_task_results_keep_inner_objects_alive() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    inner, _ = c.put(b"inner", where="n1")
    outer, _ = c.task()
    c.finish(outer, nested=[inner])
    c.decref(inner)
    assert inner in c.state.objects and c.state.objects[inner].holds == 1
    out = c.decref(object_id(outer))
    assert dests(out, "delete_objects") == ["n1"]
    assert not c.state.objects and not c.state.tasks


def test_nested_refs_of_a_pending_task_are_held() -> None:
    c = Cluster(lineage=False)
    c.node("n1", CPU=1)
    inner, _ = c.put(b"i", where="n1")
    tid, _ = c.task(nested=(inner,))
    assert c.decref(inner) == [] and inner in c.state.objects
    out = c.finish(tid)
    assert dests(out, "delete_objects") == ["n1"] and inner not in c.state.objects


def test_long_chain_of_containers_is_freed_without_recursion_error() -> None:
    c = Cluster()
    prev = None
    for _ in range(3000):
        oid, _ = c.put(b"link", nested=(prev,) if prev else ())
        if prev is not None:
            c.decref(prev)
        prev = oid
    assert len(c.state.objects) == 3000
    c.decref(prev)
    assert len(c.state.objects) == 0


def test_container_listing_the_same_ref_twice() -> None:
    c = Cluster()
    inner, _ = c.put(b"i", where="n9")
    box, _ = c.put(b"b", nested=(inner, inner))
    c.decref(inner)
    assert c.state.objects[inner].holds == 2
    out = c.decref(box)
    assert [(d, m["oids"]) for d, m in out] == [("n9", [inner])]
    assert not c.state.objects


def test_other_client_ref_keeps_object_until_it_disconnects() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.state.handle("worker-7", {"op": "register_client", "kind": "worker"})
    oid, _ = c.put(b"x", where="n1")
    c.incref(oid, client="worker-7")
    assert c.decref(oid) == [] and oid in c.state.objects
    out = c.state.client_disconnected("worker-7")
    assert dests(out, "delete_objects") == ["n1"] and oid not in c.state.objects
    assert "worker-7" not in c.state.clients


def test_incref_of_unknown_object_is_harmless() -> None:
    c = Cluster()
    ghost = object_id(c.ids.task_id())
    assert c.incref(ghost) == []
    assert ghost not in c.state.objects


def test_dropping_ref_to_pending_result_frees_it_when_done() -> None:
    # fire and forget: the ref goes before the task ends
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(nret=2)
    c.decref(object_id(tid, 0), object_id(tid, 1))
    assert len(c.state.objects) == 2  # pending objects stay until sealed
    out = c.finish(tid, where="n1")
    assert ops(out, "object_ready", C) == []  # nobody wants it any more
    assert sorted(m["oids"][0] for m in ops(out, "delete_objects", "n1")) == \
        sorted([object_id(tid, 0), object_id(tid, 1)])
    assert not c.state.tasks and not c.state.objects


@pytest.mark.parametrize("end", ["ok", "error", "cancel_queued", "worker_died"])
def test_fire_and_forget_for_every_way_a_task_ends(end: str) -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    first, _ = c.task()
    tid, _ = c.task(retries=0)
    c.decref(object_id(tid))
    if end == "cancel_queued":
        c.cancel(tid)
        c.finish(first)
    else:
        c.finish(first)
        if end == "worker_died":
            c.died(tid)
        else:
            c.finish(tid, status=end)
    c.decref(object_id(first))
    assert not c.state.tasks and not c.state.objects


def test_tables_return_to_empty_after_a_workload() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    c.node("n2", CPU=2, GPU=1)
    refs: list[bytes] = []
    tids = []
    put_oid, _ = c.put(b"data", where="n1")
    refs.append(put_oid)
    for i in range(40):
        deps = tuple(refs[-2:]) if i % 3 else ()
        res = {"CPU": 1.0, "GPU": 1.0} if i % 7 == 0 else {"CPU": 1.0}
        tid, _ = c.task(deps=deps, nret=1 + i % 2, res=res, retries=1)
        tids.append(tid)
        refs.extend(object_id(tid, k) for k in range(1 + i % 2))
    for _ in range(200):
        running = [t for t in tids if t in c.state.tasks and c.st(t) == S.RUNNING]
        if not running:
            break
        for j, t in enumerate(running):
            if j % 5 == 1 and c.state.tasks[t].attempt == 1:
                c.died(t)
            elif j % 4 == 0:
                c.finish(t, where=c.state.tasks[t].node, nested=[put_oid])
            else:
                c.finish(t)
    assert all(c.st(t).done for t in tids)
    assert len(c.state.tasks) == len(tids)
    out = c.decref(*refs)
    assert len(c.state.tasks) == 0
    assert len(c.state.objects) == 0
    assert [(d, m["oids"]) for d, m in out if m["op"] == "delete_objects"].count(
        ("n1", [put_oid])) == 1
    for n in c.state.nodes.values():
        assert n.available == pytest.approx(n.total)
        assert not n.running
    assert not c.state.queues and not c.state.infeasible
    assert C in c.state.client_refs and not c.state.client_refs[C]


def test_client_disconnect_frees_everything_it_held() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tids = [c.task()[0] for _ in range(3)]
    for t in tids:
        if c.st(t) == S.RUNNING:
            c.finish(t)
    for t in tids:
        if c.st(t) == S.RUNNING:
            c.finish(t)
    c.state.client_disconnected(C)
    assert not c.state.objects and not c.state.tasks


# ====================================================================== subscribe
def test_subscribe_unknown_object_gives_object_lost_error() -> None:
    c = Cluster()
    ghost = object_id(c.ids.task_id())
    out = c.state.handle("worker-3", {"op": "subscribe", "oids": [ghost]})
    ((dest, m),) = out
    assert dest == "worker-3" and m["op"] == "object_ready" and m["oid"] == ghost
    assert m["error"] is True
    exc = deserialize(m["inline"])
    assert isinstance(exc, ObjectLostError) and ghost.hex() in str(exc)


def test_subscribe_pending_then_ready() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task()
    oid = object_id(tid)
    assert c.state.handle("w", {"op": "subscribe", "oids": [oid]}) == []
    out = c.finish(tid, value=b"42")
    assert sorted(d for d, m in out if m["op"] == "object_ready") == sorted([C, "w"])
    out = c.state.handle("w", {"op": "subscribe", "oids": [oid]})
    assert out == [("w", {"op": "object_ready", "oid": oid, "size": 2, "error": False,
                          "inline": b"42"})]


# ====================================================================== node death
def test_node_died_retries_running_tasks_elsewhere_and_loses_sole_copies() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    a, _ = c.task(retries=1)
    b, _ = c.task(retries=0, name="unlucky")
    on_n1 = a if c.state.tasks[a].node == "n1" else b
    assert on_n1 == a  # first goes to n1
    # objects: one only on n1, one on both nodes, one inline
    only, _ = c.put(b"x", where="n1")
    both, _ = c.put(b"y", where="n1")
    c.state.handle("n2", {"op": "object_location", "oid": both, "node": "n2"})
    inline, _ = c.put(b"z")
    c.finish(b)  # n2 free for the retry
    out = c.state.node_died("n1", "heartbeat timeout")
    assert "n1" not in c.state.nodes
    assert run_task_tids(out, "n2") == [a]
    assert c.state.tasks[a].attempt == 2 and c.st(a) == S.RUNNING
    assert c.transitions(a)[-3:] == ["node_lost", "resubmit_lost", "dispatch"]
    lost = c.state.objects[only]
    assert lost.state == LOST and lost.error
    exc = deserialize(lost.inline)
    assert isinstance(exc, ObjectLostError) and "heartbeat timeout" in str(exc)
    assert [m["oid"] for m in ops(out, "object_ready", C)] == [only]
    assert c.state.objects[both].state == READY and c.state.objects[both].nodes == {"n2"}
    assert c.state.objects[inline].state == READY and not c.state.objects[inline].error
    assert c.state.node_died("n1", "again") == []
    # lost objects are still freed normally
    c.decref(only, both, inline)
    assert only not in c.state.objects


def test_node_died_without_retries_fails_with_node_died_error() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(retries=0)
    out = c.state.node_died("n1", "connection lost")
    assert c.st(tid) == S.FAILED
    exc = deserialize(ops(out, "object_ready", C)[0]["inline"])
    assert isinstance(exc, NodeDiedError) and "connection lost" in str(exc)


def test_task_submitted_on_a_lost_object_fails_instead_of_waiting_forever() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    only, _ = c.put(b"x", where="n1")
    c.state.node_died("n1", "power cut")
    lost_payload = c.state.objects[only].inline
    tid, out = c.task(deps=(only,))
    assert c.st(tid) == S.FAILED and run_task_tids(out) == []
    assert c.state.objects[object_id(tid)].inline == lost_payload
    assert isinstance(deserialize(lost_payload), ObjectLostError)


def test_task_retried_after_node_death_waits_for_a_node() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task(retries=1)
    assert run_task_tids(c.state.node_died("n1", "gone")) == []
    assert c.st(tid) == S.QUEUED
    assert run_task_tids(c.node("n3", CPU=1)) == [tid]


# ====================================================================== event log
def test_every_transition_is_logged_with_a_cause() -> None:
    c = Cluster(pipeline_depth=0)
    c.node("n1", CPU=1)
    a, _ = c.task(retries=1)
    b, _ = c.task(deps=(object_id(a),))
    c.died(a)
    c.finish(a)
    c.finish(b)
    assert c.transitions(a) == ["submit_ready", "dispatch", "retry", "dispatch", "finish"]
    assert c.transitions(b) == ["submit_waiting", "args_ready", "dispatch", "finish"]
    for tid in (a, b):
        events = c.state.log.for_task(tid)
        assert all(e["cause"] for e in events)
        # each event leaves from the state the previous one entered
        assert events[0]["from"] is None
        for prev, nxt in zip(events, events[1:]):
            assert nxt["from"] == prev["to"]
        assert events[-1]["to"] == "FINISHED"
        for e in events:
            old = TaskState(e["from"]) if e["from"] else None
            assert transition_name(old, TaskState(e["to"])) == e["transition"]
    assert "worker died" in c.state.log.for_task(a)[2]["cause"]
    info = c.state.task_info(a)
    assert info is not None and [e["transition"] for e in info["events"]] == c.transitions(a)


def test_event_log_is_bounded() -> None:
    c = Cluster(event_log_size=10)
    c.node("n1", CPU=1)
    for _ in range(20):
        tid, _ = c.task()
        c.finish(tid)
    assert len(c.state.log) == 10
    assert len(c.state.log.tail(100)) == 10
    assert c.state.log.tail(3)[-1]["transition"] == "finish"


def test_event_log_unit() -> None:
    log = EventLog(3)
    for i in range(5):
        log.record(bytes([i]) * 16, None, S.QUEUED, "submit_ready", f"cause {i}")
    assert len(log) == 3
    assert [r["cause"] for r in log.tail()] == ["cause 2", "cause 3", "cause 4"]
    assert log.for_task(bytes([0]) * 16) == []
    assert log.for_task(bytes([4]) * 16)[0]["to"] == "QUEUED"


# ====================================================================== transition table
@pytest.mark.parametrize("old,new", [
    (S.FINISHED, S.RUNNING), (None, S.FINISHED), (S.CANCELLED, S.QUEUED),
    (S.FAILED, S.QUEUED), (S.QUEUED, S.FINISHED), (S.WAITING_FOR_ARGS, S.FINISHED),
    (S.INFEASIBLE, S.RUNNING), (None, S.LOST),
])
def test_invalid_transition_raises(old: TaskState | None, new: TaskState) -> None:
    with pytest.raises(InvalidTransition, match=str(new)):
        transition_name(old, new)


def test_machine_refuses_an_invalid_transition_and_keeps_the_state() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = c.task()
    c.finish(tid)
    t = c.state.tasks[tid]
    n = len(c.state.log)
    with pytest.raises(InvalidTransition):
        c.state.tx.check(t, S.RUNNING, "bogus")
    assert t.state == S.FINISHED and len(c.state.log) == n


def test_transition_table_mentions_only_valid_states() -> None:
    names = list(TRANSITIONS.values())
    assert len(names) == len(set(names)), "transition names must be unique"
    targets = set()
    for (old, new), name in TRANSITIONS.items():
        assert old is None or isinstance(old, TaskState)
        assert isinstance(new, TaskState)
        assert isinstance(name, str) and name
        targets.add(new)
        if old is not None:
            assert old in targets or any(o == old for (_, o) in TRANSITIONS)
    assert targets == set(TaskState)
    # done states only lead back through reconstruction
    for (old, new), name in TRANSITIONS.items():
        if old in (S.FAILED, S.CANCELLED):
            pytest.fail(f"{old} is final but has transition {name}")
    assert {s for s in TaskState if s.done} == {S.FINISHED, S.FAILED, S.CANCELLED}


def test_node_warning_reaches_drivers_only() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.state.handle("worker-1", {"op": "register_client", "kind": "worker"})
    out = c.state.handle("n1", {"op": "node_warning", "text": "worker cap reached"})
    assert out == [(C, {"op": "warning", "text": "node n1: worker cap reached"})]
    assert c.state.warnings[-1] == "node n1: worker cap reached"


def test_unknown_op_raises_key_error() -> None:
    c = Cluster()
    with pytest.raises(KeyError, match="no_such_op"):
        c.state.handle(C, {"op": "no_such_op"})


def test_queries() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    tid, _ = c.task(res={"CPU": 1.0}, name="q")
    (row,) = c.state.list_tasks("RUNNING")
    assert row["task_id"] == tid.hex() and row["name"] == "q" and row["node_id"] == "n1"
    assert c.state.list_tasks("FINISHED") == []
    (node,) = c.state.list_nodes()
    assert node["resources_available"] == {"CPU": 1.0} and node["running_tasks"] == 1
    assert [o["object_id"] for o in c.state.list_objects()] == [object_id(tid).hex()]
    assert c.state.task_info(c.ids.task_id()) is None
    assert task_of(object_id(tid, 3)) == tid


# ====================================================================== random sequences
NODES = {"n1": {"CPU": 2.0}, "n2": {"CPU": 1.0, "GPU": 1.0, "X": 2.0}}
SHAPES = [{"CPU": 1.0}, {"CPU": 0.5}, {}, {"CPU": 1.0, "GPU": 1.0}, {"X": 1.0},
          {"CPU": 2.0}, {"Y": 1.0}]
CLIENTS = ["c-a", "c-b"]


class CountingIds:
    """Deterministic task ids (hypothesis replays must see the same ids)."""

    def __init__(self) -> None:
        self.n = 0

    def task_id(self) -> bytes:
        self.n += 1
        return b"hypothesis" + self.n.to_bytes(6, "big")


class SchedulerMachine(RuleBasedStateMachine):
    """Random submit / finish / fail / retry / cancel / block / decref / node
    churn sequences.  Checked after every step: the bookkeeping is consistent;
    at the end: everything can be finished, resources come back exactly, and
    dropping every ref empties the tables."""

    @initialize(depth=st.sampled_from([0.0, 0.5, 1.0]))
    def setup(self, depth: float) -> None:
        # reference bookkeeping is checked without lineage: with it, a result that
        # nests a ref to a later task's output can form a cycle that plain
        # reference counting never frees (the lineage tests cover lineage)
        self.s = SchedulerState(pipeline_depth=depth, event_log_size=500, lineage=False)
        self.ids = CountingIds()
        self.held: dict[str, set[bytes]] = {cl: set() for cl in CLIENTS}
        self.freed: list[bytes] = []
        self.next_node = 0
        for cl in CLIENTS:
            self.s.handle(cl, {"op": "register_client"})
        for nid in NODES:
            self.add_node_named(nid)

    def add_node_named(self, nid: str) -> None:
        base = nid.split("-")[0]
        self.s.handle(nid, {"op": "register_node", "node_id": nid,
                            "resources": dict(NODES[base])})

    # --------------------------------------------------------- helpers
    def all_held(self) -> list[bytes]:
        return sorted(set().union(*self.held.values()))

    def running(self) -> list[bytes]:
        return sorted(t.tid for t in self.s.tasks.values() if t.state == S.RUNNING)

    def pending(self) -> list[bytes]:
        return sorted(t.tid for t in self.s.tasks.values() if t.state is not None
                      and not t.state.done)

    def handle(self, src: str, msg: dict) -> list:
        out = self.s.handle(src, msg)
        self.check_out(out)
        return out

    def check_out(self, out: list) -> None:
        for dest, m in out:
            if m["op"] == "run_task":
                assert dest in self.s.nodes and self.s.nodes[dest].alive
                t = self.s.tasks[m["tid"]]
                assert t.state == S.RUNNING and t.node == dest
            if m["op"] == "delete_objects":
                for oid in m["oids"]:
                    assert oid not in self.s.objects
                    self.freed.append(oid)

    def _done_msg(self, tid: bytes, status: str, where: str | None, nested: list,
                  retryable: bool = False) -> dict:
        t = self.s.tasks[tid]
        results = []
        for i in range(t.nret):
            r: dict[str, Any] = {"oid": object_id(tid, i), "size": 1,
                                 "error": status == "error", "nested": nested}
            if where:
                r["node"] = where
            else:
                r["inline"] = b"e" if status == "error" else b"v"
            results.append(r)
        return {"op": "task_done", "tid": tid, "status": status, "results": results,
                "retryable": retryable}

    # --------------------------------------------------------- rules
    @rule(client=st.sampled_from(CLIENTS), data=st.data(), shape=st.sampled_from(SHAPES),
          nret=st.integers(0, 2), retries=st.integers(0, 2), ghost=st.booleans())
    def submit(self, client: str, data: st.DataObject, shape: dict, nret: int,
               retries: int, ghost: bool) -> None:
        held = sorted(self.held[client])
        deps = data.draw(st.lists(st.sampled_from(held), max_size=3)) if held else []
        nested = data.draw(st.lists(st.sampled_from(held), max_size=2)) if held else []
        if ghost and self.freed:
            deps.append(data.draw(st.sampled_from(self.freed)))
        tid = self.ids.task_id()
        self.handle(client, {"op": "submit", "tasks": [{
            "tid": tid, "fid": b"f", "name": "t", "args": b"", "deps": deps,
            "nested": nested, "nret": nret, "res": dict(shape), "retries": retries,
            "retry_exc": True}]})
        self.held[client].update(object_id(tid, i) for i in range(nret))

    @rule(client=st.sampled_from(CLIENTS), data=st.data(), in_store=st.booleans())
    def put(self, client: str, data: st.DataObject, in_store: bool) -> None:
        held = sorted(self.held[client])
        nested = data.draw(st.lists(st.sampled_from(held), max_size=2)) if held else []
        oid = object_id(self.ids.task_id())
        msg: dict[str, Any] = {"op": "put", "oid": oid, "size": 1, "nested": nested}
        alive = sorted(n for n, rec in self.s.nodes.items() if rec.alive)
        if in_store and alive:
            msg["node"] = data.draw(st.sampled_from(alive))
        else:
            msg["inline"] = b"p"
        self.handle(client, msg)
        self.held[client].add(oid)

    @precondition(lambda self: bool(self.running()))
    @rule(data=st.data(), status=st.sampled_from(["ok", "ok", "error", "cancelled"]),
          in_store=st.booleans(), retryable=st.booleans())
    def finish(self, data: st.DataObject, status: str, in_store: bool,
               retryable: bool) -> None:
        tid = data.draw(st.sampled_from(self.running()))
        node = self.s.tasks[tid].node
        # a result can only hold refs that existed before its task was
        # submitted (ids count up), so containers never form a cycle
        held = [o for o in self.all_held() if task_of(o) < tid]
        nested = data.draw(st.lists(st.sampled_from(held), max_size=2)) if held else []
        self.handle(node, self._done_msg(tid, status, node if in_store else None, nested,
                                         retryable))

    @precondition(lambda self: bool(self.running()))
    @rule(data=st.data())
    def worker_died(self, data: st.DataObject) -> None:
        tid = data.draw(st.sampled_from(self.running()))
        self.handle(self.s.tasks[tid].node, {"op": "worker_died", "tid": tid,
                                             "how": "exit code 1"})

    @precondition(lambda self: bool(self.running()))
    @rule(data=st.data(), blocked=st.booleans())
    def block(self, data: st.DataObject, blocked: bool) -> None:
        tid = data.draw(st.sampled_from(self.running()))
        op = "task_blocked" if blocked else "task_unblocked"
        self.handle(self.s.tasks[tid].node, {"op": op, "tid": tid})

    @precondition(lambda self: bool(self.pending()))
    @rule(data=st.data(), force=st.booleans())
    def cancel(self, data: st.DataObject, force: bool) -> None:
        tid = data.draw(st.sampled_from(self.pending()))
        self.handle(CLIENTS[0], {"op": "cancel", "oid": object_id(tid), "force": force})

    @rule(client=st.sampled_from(CLIENTS), data=st.data())
    def decref(self, client: str, data: st.DataObject) -> None:
        held = sorted(self.held[client])
        if not held:
            return
        oids = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=3,
                                  unique=True))
        self.held[client].difference_update(oids)
        self.handle(client, {"op": "decref", "oids": oids})

    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        """c-b gains a ref c-a holds (as when a ref is passed to another process)."""
        held = sorted(self.held["c-a"])
        if held:
            oid = data.draw(st.sampled_from(held))
            self.handle("c-b", {"op": "incref", "oids": [oid]})
            self.held["c-b"].add(oid)

    @rule(client=st.sampled_from(CLIENTS))
    def disconnect(self, client: str) -> None:
        self.check_out(self.s.client_disconnected(client))
        self.held[client].clear()
        self.s.handle(client, {"op": "register_client"})

    @rule(data=st.data())
    def subscribe(self, data: st.DataObject) -> None:
        known = self.all_held() + self.freed[-3:]
        if known:
            self.handle("c-b", {"op": "subscribe", "oids": [data.draw(st.sampled_from(known))]})

    @precondition(lambda self: len([n for n in self.s.nodes.values() if n.alive]) > 0)
    @rule(data=st.data())
    def node_dies(self, data: st.DataObject) -> None:
        nid = data.draw(st.sampled_from(sorted(self.s.nodes)))
        self.check_out(self.s.node_died(nid, "killed"))
        assert nid not in self.s.nodes

    @rule(base=st.sampled_from(sorted(NODES)))
    def node_joins(self, base: str) -> None:
        self.next_node += 1
        self.add_node_named(f"{base}-{self.next_node}")

    # --------------------------------------------------------- invariants
    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        s = self.s
        # resources per node: what is free plus what running tasks hold is the total
        for n in s.nodes.values():
            expected = dict(n.total)
            for tid in n.running:
                t = s.tasks[tid]
                assert t.state == S.RUNNING and t.node == n.node_id
                for k, v in t.res.items():
                    if v and not (t.blocked and k == "CPU"):
                        expected[k] = expected.get(k, 0.0) - v
            for k in set(expected) | set(n.available):
                assert abs(n.available.get(k, 0.0) - expected.get(k, 0.0)) < 1e-6, (k, n.node_id)
                assert n.available.get(k, 0.0) <= n.total.get(k, 0.0) + EPS
        # every running task is on a live node's running set
        for t in s.tasks.values():
            if t.state == S.RUNNING:
                assert t.node in s.nodes and t.tid in s.nodes[t.node].running
            if t.state == S.INFEASIBLE:
                assert t.tid in s.infeasible
        # holds count exactly the pending tasks' args and the containers' contents
        holds: dict[bytes, int] = {}
        for t in s.tasks.values():
            if (t.state is not None and not t.state.done) or t.lineage_held:
                for oid in list(t.deps) + list(t.nested):
                    holds[oid] = holds.get(oid, 0) + 1
        for o in s.objects.values():
            if o.state != PENDING:
                for oid in o.nested:
                    holds[oid] = holds.get(oid, 0) + 1
        for o in s.objects.values():
            assert o.holds == holds.get(o.oid, 0), o.oid.hex()
            # nothing freeable is left behind
            assert o.clients or o.holds > 0 or o.state == PENDING
        # client ref sets agree with the model and with the objects
        for cl in CLIENTS:
            assert s.client_refs.get(cl, set()) == {o for o in self.held[cl]
                                                    if o in s.objects} | \
                (s.client_refs.get(cl, set()) - set(s.objects))
            for oid in self.held[cl]:
                if oid in s.objects:
                    assert cl in s.objects[oid].clients
        # task records are pruned exactly when done and no return is alive
        for t in s.tasks.values():
            alive = sum(1 for oid in t.returns() if oid in s.objects)
            assert t.returns_alive == alive
            assert not (t.state is not None and t.state.done and alive == 0)
        assert len(s.log) <= 500

    def teardown(self) -> None:
        s = getattr(self, "s", None)
        if s is None:
            return
        # make sure work can finish: a node with every resource kind joins
        self.s.handle("big", {"op": "register_node", "node_id": "big",
                              "resources": {"CPU": 4.0, "GPU": 1.0, "X": 2.0, "Y": 1.0}})
        for _ in range(1000):
            run = self.running()
            if not run:
                break
            for tid in run:
                if tid in s.tasks and s.tasks[tid].state == S.RUNNING:
                    self.handle(s.tasks[tid].node, self._done_msg(tid, "ok", None, []))
        assert self.pending() == [], [str(s.tasks[t].state) for t in self.pending()]
        for n in s.nodes.values():
            assert not n.running
            for k, v in n.total.items():
                assert abs(n.available.get(k, 0.0) - v) < 1e-6
        for cl in CLIENTS:
            self.check_out(s.client_disconnected(cl))
        assert s.tasks == {}
        assert s.objects == {}
        assert not s.queues or all(not q for q in s.queues.values())
        assert not s.infeasible and not s.failures.force_cancelled


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None, derandomize=True,
                                         suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- lineage
def test_lineage_keeps_arguments_while_outputs_live() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    a, _ = c.task()
    c.finish(a, where="n1")
    ra = object_id(a)
    b, _ = c.task(deps=(ra,), retries=2)
    c.finish(b, where="n1")
    out = c.decref(ra)
    assert ops(out, "delete_objects") == [] and ra in c.state.objects  # b's lineage
    out = c.decref(object_id(b))
    assert {o for m in ops(out, "delete_objects") for o in m["oids"]} >= {ra, object_id(b)}
    assert c.state.tasks == {} and c.state.objects == {}


def test_lost_result_is_rebuilt_by_running_its_task_again() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    a, _ = c.task(retries=1)
    c.finish(a, where="n2")
    ra = object_id(a)
    b, _ = c.task(deps=(ra,), retries=1)
    c.finish(b, where="n2")
    rb = object_id(b)
    c.decref(ra)  # only b's lineage holds ra now
    out = c.state.node_died("n2", "killed")
    # b's result was lost with n2, and so was its argument: a re-runs first
    assert c.state.tasks[a].state == TaskState.RUNNING
    assert c.state.tasks[b].state == TaskState.WAITING_FOR_ARGS
    assert [m["tid"] for m in ops(out, "run_task")] == [a]
    out = c.finish(a, where="n1")
    assert [m["tid"] for m in ops(out, "run_task")] == [b]
    out = c.finish(b, where="n1", value=b"again")
    ready = [m for m in ops(out, "object_ready") if m["oid"] == rb]
    assert ready and ready[0]["nodes"] == ["n1"] and not ready[0]["error"]
    events = [e["transition"] for e in c.state.log.for_task(b)]
    assert "reconstruct_waiting" in events


def test_lost_put_object_reports_why_it_cannot_be_rebuilt() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    oid, _ = c.put(b"x" * 10, where="n1")
    out = c.state.node_died("n1", "killed")
    obj = c.state.objects[oid]
    assert obj.state == "LOST"
    err = deserialize(obj.inline)
    assert "put()" in str(err) and "cannot be rebuilt" in str(err)
    assert err.reason == "put" and err.object_id == oid.hex() and err.creator == "put"


def test_lineage_over_its_memory_bound_evicts_the_oldest() -> None:
    from flowcore.scheduler.lineage import PER_DEPENDENCY, SPEC_OVERHEAD
    cost = SPEC_OVERHEAD + len(b"args") + PER_DEPENDENCY  # a task with one argument
    c = Cluster(lineage_memory=2 * cost)  # room for two kept lineages
    c.node("n1", CPU=2)
    arg, _ = c.put(b"x" * 10, where="n1")  # puts have no lineage
    tids = []
    for _ in range(3):
        t, _ = c.task(deps=(arg,), retries=2)
        c.finish(t, where="n1")
        tids.append(t)
    # the first kept lineage went: its argument hold was released
    first, second, third = (c.state.tasks[t] for t in tids)
    assert first.lineage_evicted and not first.lineage_held and first.args is None
    assert second.lineage_held and third.lineage_held
    assert c.state.lineages.bytes == 2 * cost and c.state.counts["lineage_evicted"] == 1
    assert "lineage_evicted" in [e["transition"] for e in c.state.log.for_task(tids[0])]
    # losing the evicted task's output is reported, not rebuilt
    c.state.node_died("n1", "killed")
    obj = c.state.objects[object_id(tids[0])]
    err = deserialize(obj.inline)
    assert obj.state == "LOST" and err.reason == "lineage_evicted"
    assert "FLOWCORE_LINEAGE_MEMORY" in str(err)
    # the kept ones are being rebuilt (queued: no node left)
    assert c.state.tasks[tids[2]].state in (TaskState.QUEUED, TaskState.WAITING_FOR_ARGS,
                                            TaskState.INFEASIBLE)


def test_pruned_lineage_gives_its_bytes_back() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    a, _ = c.task()
    c.finish(a, where="n1")
    assert c.state.lineages.bytes > 0
    c.decref(object_id(a))
    assert c.state.tasks == {} and c.state.lineages.bytes == 0 and not c.state.lineages.kept


def test_recursive_cancel_reaches_children_and_grandchildren() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    parent, _ = c.task()
    assert c.st(parent) == TaskState.RUNNING
    child = c.spec()
    child["parent"] = parent
    grandchild = c.spec()
    grandchild["parent"] = child["tid"]
    other = c.spec()  # not submitted by the parent
    c.submit(child, grandchild, other, client="w1")
    out = c.state.handle(C, {"op": "cancel", "oid": object_id(parent), "recursive": True})
    # running (or sent ahead to the node): asked to stop; queued: cancelled now
    assert {m["tid"] for m in ops(out, "cancel_task", "n1")} == {parent, child["tid"]}
    assert c.st(grandchild["tid"]) == TaskState.CANCELLED
    assert "its parent task" in c.state.log.for_task(grandchild["tid"])[-1]["cause"]
    assert c.st(other["tid"]) == TaskState.QUEUED
    out = c.state.handle(C, {"op": "cancel", "oid": object_id(other["tid"]),
                             "recursive": False})
    assert c.st(other["tid"]) == TaskState.CANCELLED


def test_children_recorded_before_their_parent_are_still_its_children() -> None:
    """A leased parent's record comes from its owner in a batch, its
    children's from its worker at once: children the head hears of first
    still belong to it (recursive cancel reaches them)."""
    c = Cluster()
    c.node("n1", CPU=1)
    parent = c.spec()
    child = c.spec()
    child["parent"] = parent["tid"]
    grandchild = c.spec()
    grandchild["parent"] = child["tid"]
    c.submit(grandchild, client="w2")  # heard of first
    c.submit(child, client="w1")
    c.submit(parent)
    assert c.state.tasks[parent["tid"]].children == [child["tid"]]
    assert c.state.tasks[child["tid"]].children == [grandchild["tid"]]
    assert not c.state.early_children
    out = c.state.handle(C, {"op": "cancel", "oid": object_id(parent["tid"]),
                             "recursive": True})
    stopping = {m["tid"] for m in ops(out, "cancel_task", "n1")}  # running: asked to stop
    for t in (parent, child, grandchild):
        assert t["tid"] in stopping or c.st(t["tid"]) == TaskState.CANCELLED


# ---------------------------------------------------------------- actors
def test_calls_after_a_kill_wait_for_the_death_and_then_fail() -> None:
    from flowcore.exceptions import ActorDiedError
    c = Cluster()
    c.node("n1", CPU=1)
    aid = c.ids.task_id()
    spec = {"tid": aid, "aid": aid, "fid": b"cls", "name": "A.__init__", "class_name": "A",
            "methods": {"f": 1}, "args": b"a", "deps": [], "nested": [], "hold": {},
            "place": {"CPU": 1.0}, "max_restarts": 0, "max_task_retries": 0,
            "max_concurrency": 1}
    out = c.state.handle(C, {"op": "create_actor", "spec": spec, "rid": 1})
    assert [d for d, m in out if m["op"] == "start_actor"] == ["n1"]
    c.state.handle("w-actor", {"op": "register_client", "kind": "worker"})
    c.state.handle("w-actor", {"op": "actor_ready", "aid": aid, "pid": 5})

    def call() -> dict:
        return {"tid": c.ids.task_id(), "fid": b"", "actor": aid, "method": "f",
                "name": "A.f", "args": b"x", "deps": [], "nested": [], "nret": 1, "res": {},
                "retries": 0}
    first = call()
    out = c.state.handle(C, {"op": "submit", "tasks": [first]})
    assert [d for d, m in out if m["op"] == "run_task"] == ["w-actor"]  # straight to it
    c.state.handle(C, {"op": "kill_actor", "aid": aid})
    later = call()
    out = c.state.handle(C, {"op": "submit", "tasks": [later]})
    assert ops(out, "run_task") == []  # held back: the kill is on its way
    out = c.state.handle("n1", {"op": "actor_died", "aid": aid, "how": "killed by signal 9"})
    ready = {m["oid"]: m for m in ops(out, "object_ready")}
    for spec_ in (first, later):
        msg = ready[object_id(spec_["tid"])]
        assert msg["error"]
        err = deserialize(msg["inline"])
        assert isinstance(err, ActorDiedError) and "kill" in str(err)


# ====================================================================== nested: children first
def test_children_of_a_task_blocked_in_get_run_before_older_queued_tasks() -> None:
    """A parent blocked in get lends its CPU to its own children: queued
    ones move ahead of tasks queued before them, and ones queued while it
    stays blocked go first too (a recursive tree runs depth first instead
    of blocking a worker process per queued parent); other tasks keep
    their order."""
    c = Cluster(pipeline_depth=0, validate=True)  # (the books are checked after each message)
    c.node("n1", CPU=1)
    parent, out = c.task()
    assert run_task_tids(out) == [parent]
    x1, _ = c.task()
    x2, _ = c.task()

    def child() -> tuple[bytes, list]:
        spec = c.spec()
        spec["parent"] = parent
        return spec["tid"], c.submit(spec, client="w-parent")

    a, _ = child()
    b, _ = child()
    assert c.st(a) == S.QUEUED and c.st(b) == S.QUEUED
    out = c.state.handle("w-parent", {"op": "task_blocked", "tid": parent})
    assert run_task_tids(out) == [a]
    assert run_task_tids(c.finish(a)) == [b]
    late, _ = child()  # submitted (by another thread of the parent) while it is blocked
    assert run_task_tids(c.finish(b)) == [late]
    c.state.handle("w-parent", {"op": "task_unblocked", "tid": parent})
    assert run_task_tids(c.finish(late)) == []  # the parent holds the CPU again
    assert run_task_tids(c.finish(parent)) == [x1]
    assert run_task_tids(c.finish(x1)) == [x2]
