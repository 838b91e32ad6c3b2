"""Leased workers: ready local tasks go straight to a worker leased from the
driver's node, and faults and views keep working through that path."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

import flowcore
from flowcore.cluster import LocalCluster
from flowcore.exceptions import TaskCancelledError
from flowcore.testing import Signal
from flowcore.ids import object_id
from flowcore.scheduler.states import TaskState
from test_machine import Cluster, dests, ops, run_task_tids

LEASED = "leased worker"


# ---------------------------------------------------------------- the head's side (IO-free)
def _leased_spec(c, node: str = "n1", wid: str = "w1", **kw) -> dict:
    spec = c.spec(**kw)
    spec["lease"] = [node, wid]
    return spec


@pytest.mark.timeout(10)
def test_head_records_a_leased_task_running_without_placing_it():
    c = Cluster(validate=True)
    c.node("n1", CPU=2)
    spec = _leased_spec(c)
    tid = spec["tid"]
    out = c.submit(spec)
    t = c.state.tasks[tid]
    assert run_task_tids(out) == [] and t.state == TaskState.RUNNING and t.node == "n1"
    assert c.state.nodes["n1"].available["CPU"] == 1.0  # the head's books of the node
    assert LEASED in t.cause and c.state.counts["leased"] == 1
    assert ops(c.state.handle("client-1", {"op": "cancel", "oid": object_id(tid),
                                           "force": False}), "cancel_task", "n1")[0][
        "lease"] == "w1"
    out = c.state.handle("w9", {"op": "task_done", "tid": tid, "status": "ok",
                                "answered_direct": True, "retryable": False,
                                "results": [{"oid": object_id(tid), "size": 1, "inline": b"v",
                                             "error": False, "nested": [], "sent": True}]})
    assert t.state == TaskState.FINISHED and c.state.nodes["n1"].available["CPU"] == 2.0
    assert ops(out, "object_ready", "client-1") == []  # the owner had it from the worker


@pytest.mark.timeout(10)
def test_a_leased_task_whose_answer_was_dropped_before_its_end_releases_its_arguments():
    """The owner has a leased task's value from its worker, and drops its ref,
    before the worker's task_done reaches the head: the return is freed as
    it is sealed, and the task's arguments must not stay held as lineage."""
    c = Cluster(validate=True)
    c.node("n1", CPU=2)
    a, _ = c.task()
    c.finish(a, where="n1")
    ra = object_id(a)
    spec = _leased_spec(c, deps=(ra,), retries=2)
    tid = spec["tid"]
    c.submit(spec)
    c.decref(object_id(tid))  # (the value came from the worker)
    c.state.handle("w1", {"op": "task_done", "tid": tid, "status": "ok",
                          "answered_direct": True, "retryable": False,
                          "results": [{"oid": object_id(tid), "size": 1, "inline": b"v",
                                       "error": False, "nested": [], "sent": True}]})
    assert object_id(tid) not in c.state.objects and tid not in c.state.tasks
    out = c.decref(ra)
    assert ra in {o for m in ops(out, "delete_objects") for o in m["oids"]}
    assert c.state.tasks == {} and c.state.objects == {}


@pytest.mark.timeout(10)
def test_a_leased_task_blocked_in_get_before_its_submission_came_lends_its_cpu():
    """The worker's task_blocked can beat the owner's (batched) submission
    to the head: the head must still count the task's CPU as given back."""
    c = Cluster(validate=True)
    c.node("n1", CPU=1)
    spec = _leased_spec(c)
    tid = spec["tid"]
    c.state.handle("w1", {"op": "task_blocked", "tid": tid})
    c.submit(spec)
    t = c.state.tasks[tid]
    assert t.state == TaskState.RUNNING and t.blocked
    assert c.state.nodes["n1"].available["CPU"] == 1.0
    c.state.handle("w1", {"op": "task_unblocked", "tid": tid})
    assert c.state.nodes["n1"].available["CPU"] == 0.0


@pytest.mark.timeout(10)
def test_head_takes_a_leased_tasks_end_before_its_submission_and_retries_a_lost_lease():
    c = Cluster(validate=True)
    c.node("n1", CPU=2)
    early = _leased_spec(c)
    c.state.handle("w9", {"op": "task_done", "tid": early["tid"], "status": "ok",
                          "answered_direct": True, "retryable": False,
                          "results": [{"oid": object_id(early["tid"]), "size": 1,
                                       "inline": b"v", "error": False, "nested": []}]})
    c.submit(early)
    assert c.state.tasks[early["tid"]].state == TaskState.FINISHED
    a, b = _leased_spec(c, retries=1), _leased_spec(c, retries=0)
    c.submit(a, b)
    other = _leased_spec(c, wid="w2")
    c.submit(other)
    out = c.state.handle("n1", {"op": "lease_lost", "wid": "w1", "how": "exited", "pid": 7})
    assert c.state.tasks[a["tid"]].state == TaskState.RUNNING  # retried, placed by the head
    assert run_task_tids(out) == [a["tid"]]
    assert c.state.tasks[b["tid"]].state == TaskState.FAILED
    assert c.state.tasks[other["tid"]].state == TaskState.RUNNING  # another worker's
    # a lease on a node that is gone: the head places the task
    gone = _leased_spec(c, node="n7")
    assert run_task_tids(c.submit(gone)) == [gone["tid"]]


@pytest.mark.timeout(10)
def test_a_submission_that_comes_after_its_leased_worker_died_is_retried_or_fails():
    """The submission and the node's lease_lost travel on different
    connections: a task whose worker is already known dead is handled as a
    crash when its submission comes, not left RUNNING for ever."""
    c = Cluster(validate=True)
    c.node("n1", CPU=2)
    a, b = _leased_spec(c, wid="w3", retries=1), _leased_spec(c, wid="w3", retries=0)
    c.state.handle("n1", {"op": "lease_lost", "wid": "w3", "how": "exited", "pid": 7})
    out = c.submit(a, b)
    assert c.state.tasks[a["tid"]].state == TaskState.RUNNING  # retried, placed by the head
    assert run_task_tids(out) == [a["tid"]]
    assert c.state.tasks[b["tid"]].state == TaskState.FAILED
    assert c.state.nodes["n1"].available["CPU"] == 1.0  # only the retry holds a CPU


def _queued_spec(c, node: str = "n1", **kw) -> dict:
    spec = c.spec(**kw)
    spec["lease_q"] = node
    return spec


def _done(tid: bytes) -> dict:
    return {"op": "task_done", "tid": tid, "status": "ok", "answered_direct": True,
            "retryable": False, "results": [{"oid": object_id(tid), "size": 1, "inline": b"v",
                                             "error": False, "nested": [], "sent": True}]}


@pytest.mark.timeout(10)
def test_head_records_a_task_queued_at_its_owner_then_running_on_its_lease():
    from flowcore.scheduler.explain import explain
    c = Cluster(validate=True)
    c.node("n1", CPU=2)
    a, b, d = _queued_spec(c), _queued_spec(c), _queued_spec(c)
    out = c.submit(a, b, d)
    ta, tb, td = (c.state.tasks[x["tid"]] for x in (a, b, d))
    # QUEUED at the owner: not placed, no resources taken on the head's books
    assert run_task_tids(out) == [] and ta.state == TaskState.QUEUED
    assert c.state.nodes["n1"].available["CPU"] == 2.0 and not c.state.queues
    why = explain(c.state, object_id(a["tid"]))
    assert why["queued_at_owner"] == "n1" and "its owner's queue" in why["text"], why
    # the owner sent two to worker w1, the second behind the first (sent ahead)
    c.state.handle("client-1", {"op": "lease_start", "lease": ["n1", "w1"],
                                "tids": [a["tid"], b["tid"]], "busy": 0})
    assert ta.state == tb.state == TaskState.RUNNING and ta.node == "n1"
    assert not ta.ahead and tb.ahead and "leased" in ta.cause
    assert c.state.nodes["n1"].available["CPU"] == 0.0
    # a report from the worker before the owner's lease_start waits for it
    c.state.handle("w9", _done(d["tid"]))
    assert td.state == TaskState.QUEUED
    c.state.handle("client-1", {"op": "lease_start", "lease": ["n1", "w2"], "tids": [d["tid"]]})
    assert td.state == TaskState.FINISHED
    # a lease_start from someone else than the owner is not taken
    e = _queued_spec(c)
    c.submit(e)
    c.state.handle("client-2", {"op": "lease_start", "lease": ["n1", "w2"], "tids": [e["tid"]]})
    assert c.state.tasks[e["tid"]].state == TaskState.QUEUED
    # the worker of a and b dies: both are retried (or fail) like any crash
    c.state.handle("n1", {"op": "lease_lost", "wid": "w1", "how": "exited", "pid": 7})
    assert ta.state == tb.state == TaskState.FAILED  # (no retries left)


@pytest.mark.timeout(10)
def test_cancel_of_a_task_queued_at_its_owner_and_handing_tasks_back():
    c = Cluster(validate=True)
    c.node("n1", CPU=1)
    a, b, late = _queued_spec(c), _queued_spec(c), _queued_spec(c)
    c.submit(a, b, late)
    # cancelled while still queued at its owner: ends now, the owner drops it
    out = c.state.handle("client-1", {"op": "cancel", "oid": object_id(a["tid"]),
                                      "force": False})
    assert c.state.tasks[a["tid"]].state == TaskState.CANCELLED
    assert [m["tid"] for m in ops(out, "lease_cancel", "client-1")] == [a["tid"]]
    # cancelled while on its way to a worker: its lease_start sends the node the cancel
    c.state.handle("client-1", {"op": "cancel", "oid": object_id(late["tid"]), "force": True})
    out = c.state.handle("client-1", {"op": "lease_start", "lease": ["n1", "w1"],
                                      "tids": [late["tid"]]})
    cancel = ops(out, "cancel_task", "n1")
    assert cancel and cancel[0]["tid"] == late["tid"] and cancel[0]["lease"] == "w1" \
        and cancel[0]["force"]
    assert c.state.nodes["n1"].available["CPU"] == 1.0
    # the owner has no lease left for b: handed back, the head places it
    out = c.state.handle("client-1", {"op": "lease_unrun", "tids": [b["tid"]]})
    assert run_task_tids(out) == [b["tid"]] and c.state.tasks[b["tid"]].state == \
        TaskState.RUNNING
    # a leased worker hands back a task queued behind one blocked in get: placed by the head
    c.node("n2", CPU=1)
    x, y = _queued_spec(c, node="n2"), _queued_spec(c, node="n2")
    c.submit(x, y)
    c.state.handle("client-1", {"op": "lease_start", "lease": ["n2", "w5"],
                                "tids": [x["tid"], y["tid"]]})
    out = c.state.handle("client-1", {"op": "lease_unrun", "tids": [y["tid"]]})
    ty = c.state.tasks[y["tid"]]
    assert run_task_tids(out) == [y["tid"]] and c.state.leases.on_lease(ty) is None
    assert any("blocked in get" in e["cause"] for e in c.state.log.for_task(y["tid"])), ty.cause
    # a driver that goes away takes the tasks queued at it along
    z = _queued_spec(c)
    c.submit(z)
    c.state.client_disconnected("client-1")
    assert [e["cause"] for e in c.state.log.for_task(z["tid"])][-1] == \
        "its driver disconnected" and not c.state.leases.queued


@pytest.mark.timeout(10)
def test_head_asks_a_node_for_its_leases_back_when_its_own_work_waits():
    c = Cluster(validate=True, pipeline_depth=0)  # (nothing sent ahead: work waits here)
    c.node("n1", CPU=2)
    a, b = _leased_spec(c, wid="w1"), _leased_spec(c, wid="w2")
    c.submit(a, b)  # the leased tasks hold n1 on the head's books
    big = c.spec(res={"CPU": 4.0})
    c.node("n2", CPU=4)
    c.node("n3", CPU=1)
    c.submit(c.spec(res={"CPU": 4.0}))  # n2 takes it
    out = c.submit(big)  # waits for n2: n1 could never fit it, no reclaim
    assert c.state.tasks[big["tid"]].state == TaskState.QUEUED
    assert ops(out, "lease_reclaim") == []
    c.submit(c.spec(res={"CPU": 1.0}))  # n3 takes it
    c.state.leases.checked = 0.0
    out = c.submit(c.spec(res={"CPU": 1.0}))  # waits: n1's leases hold the room it needs
    assert dests(out, "lease_reclaim") == ["n1"]
    c.state.leases.checked = 0.0
    assert ops(c.submit(c.spec(res={"CPU": 1.0})), "lease_reclaim") == []  # not again at once


@pytest.mark.timeout(10)
def test_head_asks_the_owner_to_spill_queued_tasks_another_node_has_room_for():
    c = Cluster(validate=True)
    c.node("n1", CPU=1)
    a, b, d = _queued_spec(c), _queued_spec(c), _queued_spec(c)
    out = c.submit(a, b, d)
    assert ops(out, "lease_spill") == []  # one node: nowhere else to go
    c.state.handle("client-1", {"op": "lease_start", "lease": ["n1", "w1"], "tids": [a["tid"]]})
    out = c.node("n2", CPU=1)  # a node with room joins: the oldest waiting one goes there
    spill = ops(out, "lease_spill", "client-1")
    assert [m["tids"] for m in spill] == [[b["tid"]]]
    assert ops(c.submit(_queued_spec(c)), "lease_spill") == []  # one request at a time
    out = c.state.handle("client-1", {"op": "lease_unrun", "tids": [b["tid"]]})
    assert run_task_tids(out) == [b["tid"]] and c.state.tasks[b["tid"]].node == "n2"
    assert not c.state.leases.spilling
    # n2 is full now: d waits at its owner
    assert c.state.tasks[d["tid"]].state == TaskState.QUEUED
    assert ops(c.submit(_queued_spec(c)), "lease_spill") == []


@pytest.mark.timeout(10)
def test_pool_grants_an_idle_worker_and_takes_it_back():
    from flowcore.node.pool import BUSY, IDLE, WorkerPool
    pool = WorkerPool({"CPU": 2.0})
    for i, a in enumerate(pool.startup()):
        pool.worker_ready(a[1], 100 + i)
    w = pool.grant_lease(b"L1", {"CPU": 1.0}, None)
    assert w is not None and w.state == BUSY and pool.available["CPU"] == 1.0
    assert pool.grant_lease(b"L2", {"CPU": 1.0, "GPU": 1.0}, None) is None  # no GPU leases
    assert pool.grant_lease(b"L3", {"CPU": 1.0}, "some-env") is None  # no worker of that env
    w2 = pool.grant_lease(b"L4", {"CPU": 1.0}, None)
    assert w2 is not None and pool.grant_lease(b"L5", {"CPU": 1.0}, None) is None  # full
    # a task the head placed here waits: no lease until it has run
    placed = {"tid": b"t" * 16, "res": {"CPU": 1.0}}
    assert not [a for a in pool.task_arrived(placed) if a[0] == "run"]
    acts = pool.worker_idle(w.wid)  # the lease ended: its worker runs the waiting task
    assert [(a[1], a[2]["tid"]) for a in acts if a[0] == "run"] == [(w.wid, placed["tid"])]
    assert pool.grant_lease(b"L6", {"CPU": 1.0}, None) is None
    pool.worker_idle(w.wid)
    pool.worker_idle(w2.wid)
    assert pool.available["CPU"] == 2.0 and all(x.state == IDLE for x in pool.workers.values())
    # a leased worker's death is reported with its lease
    w3 = pool.grant_lease(b"L7", {"CPU": 2.0}, None)
    died = [a for a in pool.worker_died(w3.wid) if a[0] == "died"]
    assert died[0][1]["lease"] == b"L7" and pool.available["CPU"] == 2.0


@pytest.mark.timeout(10)
def test_a_declined_lease_starts_a_worker_when_only_a_worker_is_missing():
    from flowcore.node.pool import WorkerPool
    # one warm worker for two CPUs (as after a worker died or retired)
    pool = WorkerPool({"CPU": 2.0}, min_workers=1)
    (only,) = [a[1] for a in pool.startup()]
    assert pool.lease_declined({"CPU": 1.0}, None) == []  # (it is starting)
    pool.worker_ready(only, 100)
    assert pool.lease_declined({"CPU": 1.0}, None) == []  # (it is idle: leased next time)
    assert pool.grant_lease(b"L1", {"CPU": 1.0}, None) is not None
    # a CPU is free and no worker is idle or starting: a second lease is
    # declined, and a worker is started so that the holder's next request
    # (its queued tasks wait for it) finds one
    assert pool.grant_lease(b"L2", {"CPU": 1.0}, None) is None
    acts = pool.lease_declined({"CPU": 1.0}, None)
    assert [a[0] for a in acts] == ["spawn"]
    assert pool.lease_declined({"CPU": 1.0}, None) == []  # (it is starting)
    pool.worker_ready(acts[0][1], 101)
    assert pool.grant_lease(b"L2", {"CPU": 1.0}, None) is not None
    # full, a runtime_env of its own, or a GPU: nothing is started
    assert pool.lease_declined({"CPU": 1.0}, None) == []
    assert WorkerPool({"CPU": 2.0}, min_workers=1).lease_declined({"CPU": 1.0}, "env") == []
    assert WorkerPool({"CPU": 2.0, "GPU": 1.0}, min_workers=1).lease_declined(
        {"CPU": 1.0, "GPU": 1.0}, None) == []


# ---------------------------------------------------------------- the public API


@pytest.fixture(autouse=True)
def _long_grace(monkeypatch):
    # leases are kept between the steps of a test however slow the machine
    import flowcore.client.leases as leases
    monkeypatch.setattr(leases, "GRACE", 30.0)


@flowcore.remote
def noop(x=None):
    return x


@flowcore.remote
def hold(sig, value=1):
    sig.wait()
    return value


def _causes(ref) -> list[str]:
    return [e["cause"] for e in flowcore.state.task_events(100_000)
            if e["task_id"] == ref.task_id]


def _leased(ref) -> bool:
    return any(LEASED in c for c in _causes(ref))


def _warm() -> None:
    """Run tasks until one takes the leased path (the driver asks for a
    lease on its first task and keeps it for the test's grace).  A request
    can be declined (the worker just started, or its end of the last task
    has not reached its node yet), and the shape is asked again only after
    a back-off: tries are spread over time, not counted (50 quick tasks
    can all fall within two back-offs)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ref = noop.remote()
        flowcore.get(ref, timeout=60)
        if _leased(ref):
            return
        time.sleep(0.02)
    raise AssertionError("no task took the leased path in 30 s")


@pytest.mark.timeout(90)
def test_ready_local_tasks_take_the_leased_path(fresh_cluster):
    fresh_cluster(num_cpus=2)
    _warm()
    refs = []
    for i in range(20):
        ref = noop.remote(i)
        assert flowcore.get(ref, timeout=60) == i
        refs.append(ref)
    assert sum(_leased(r) for r in refs) >= 15, [_causes(r) for r in refs[:3]]
    # an argument in the store travels as a ref the worker reads itself
    big = flowcore.put(np.arange(1 << 18))
    ref = noop.remote(big)
    assert int(flowcore.get(ref, timeout=60)[-1]) == (1 << 18) - 1
    assert _leased(ref)
    # a task whose argument is not ready goes through the head
    sig = Signal()
    first = hold.remote(sig)
    later = noop.remote(first)
    sig.set()
    assert flowcore.get(later, timeout=60) == 1 and not _leased(later)
    # an application error reaches the caller through the lease
    @flowcore.remote(max_retries=0)
    def boom():
        raise ValueError("boom")
    _warm()
    with pytest.raises(ValueError, match="boom"):
        flowcore.get(boom.remote(), timeout=60)
    # the head's books of the node come back once the tasks are done (the
    # worker's report may reach the head just after its answer reached us)
    deadline = time.monotonic() + 30
    while flowcore.available_resources().get("CPU") != 2.0:
        assert time.monotonic() < deadline, flowcore.available_resources()
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_worker_crash_mid_task_is_retried(fresh_cluster, tmp_path):
    fresh_cluster(num_cpus=1)
    marker = str(tmp_path / "crashed")

    @flowcore.remote(max_retries=1)
    def crash_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return "second attempt"
    _warm()
    ref = crash_once.remote(marker)
    # the thread waiting in get reads the worker's connection as it closes
    assert flowcore.get(ref, timeout=60) == "second attempt"
    causes = _causes(ref)
    assert any(LEASED in c for c in causes) and any("worker died" in c for c in causes), causes
    # without retries left the crash is the task's error
    marker2 = str(tmp_path / "crashed2")

    @flowcore.remote(max_retries=0)
    def crash(path):
        os._exit(1)
    _warm()
    with pytest.raises(flowcore.exceptions.WorkerCrashedError):
        flowcore.get(crash.remote(marker2), timeout=60)
    _warm()
    assert flowcore.get(noop.remote(3), timeout=60) == 3


@pytest.mark.timeout(90)
def test_cancel_of_a_queued_and_of_a_running_leased_task(fresh_cluster, monkeypatch):
    import flowcore.client.leases as leases
    monkeypatch.setattr(leases, "PIPELINE", 2)  # a second task waits on the worker
    monkeypatch.setattr(leases, "SHORT", 600.0)  # (taken as short: it may wait behind)
    fresh_cluster(num_cpus=1)
    _warm()
    done = Signal()
    done.set()
    assert flowcore.get(hold.remote(done, 0), timeout=60) == 0  # seen to take little time
    sig = Signal()
    running = hold.remote(sig, 1)
    sig.wait_for_waiters(1)
    queued = hold.remote(sig, 2)
    # queued at the owner until the node declines a second lease, then
    # written behind the running task on its worker
    deadline = time.monotonic() + 30
    while not _leased(queued):
        assert time.monotonic() < deadline, _causes(queued)
        time.sleep(0.02)
    assert _leased(running)
    flowcore.cancel(queued)
    with pytest.raises(TaskCancelledError):
        flowcore.get(queued, timeout=60)
    flowcore.cancel(running)
    with pytest.raises(TaskCancelledError):
        flowcore.get(running, timeout=60)
    sig.set()
    _warm()
    assert flowcore.get(noop.remote(5), timeout=60) == 5


@pytest.mark.timeout(90)
def test_explain_of_a_task_waiting_on_a_leased_task(fresh_cluster):
    fresh_cluster(num_cpus=2)
    _warm()
    sig = Signal()
    first = hold.remote(sig)
    sig.wait_for_waiters(1)
    assert _leased(first)
    second = noop.remote(first)
    why = flowcore.explain(second)
    assert why["state"] == "WAITING_FOR_ARGS" and why["waiting_for"] == [first.hex()], why
    assert "RUNNING" in why["text"]
    assert "leased by its submitter" in flowcore.explain(first)["text"]
    sig.set()
    assert flowcore.get(second, timeout=60) == 1


@pytest.mark.timeout(120)
def test_node_death_retries_and_rebuilds_leased_tasks():
    flowcore.shutdown()
    with LocalCluster(nodes=2, cpus_per_node=2) as cluster:
        flowcore.init(address=cluster.address, token=cluster.token)
        try:
            mine = flowcore.get_runtime_context().get_node_id()

            @flowcore.remote(max_retries=3)
            def block(i):
                return np.full(1 << 18, i, dtype=np.int64)  # 2 MiB: in its node's store

            @flowcore.remote(max_retries=3)
            def where(sig):
                sig.wait()
                return flowcore.get_runtime_context().get_node_id()
            _warm()
            big = block.remote(7)
            assert flowcore.wait([big], timeout=60, fetch_local=False)[1] == []
            assert _leased(big)
            sig = Signal()
            running = where.remote(sig)
            sig.wait_for_waiters(1)
            assert _leased(running)
            cluster.kill_node(mine)
            sig.set()
            # the running task is retried, and the lost output rebuilt from
            # its lineage, on the surviving node
            assert flowcore.get(running, timeout=90) != mine
            assert int(flowcore.get(big, timeout=90)[0]) == 7
        finally:
            flowcore.shutdown()


HOLDER = """
import os, flowcore
flowcore.init(address=os.environ["FLOWCORE_ADDRESS"], token=os.environ["FLOWCORE_TOKEN"])
import flowcore.client.leases as leases
leases.GRACE = 600.0  # it would keep the lease for ten minutes
@flowcore.remote
def noop():
    return 1
for _ in range(20):
    flowcore.get(noop.remote())
print("leased", flowcore.context.current_client().leases.sent > 0, flush=True)
os._exit(0)  # dies holding its lease
"""


@pytest.mark.timeout(120)
def test_a_lease_never_outlives_its_holder(fresh_cluster):
    info = fresh_cluster(num_cpus=2)
    env = dict(os.environ, FLOWCORE_ADDRESS=info["address"],
               FLOWCORE_TOKEN=flowcore.session._cluster.token)
    out = subprocess.run([sys.executable, "-c", HOLDER], env=env, capture_output=True,
                         text=True, timeout=90)
    assert "leased True" in out.stdout, out.stderr[-2000:]
    # its node ended the lease when its connection closed (nothing asked for it)
    client = flowcore.context.current_client()
    deadline = time.monotonic() + 30
    while client.request("node", {"op": "stats"})["pool"]["leases"]:
        assert time.monotonic() < deadline, "the dead holder's lease was not ended"
        time.sleep(0.05)
    # both CPUs serve this driver's tasks again (the dead holder's lease ended)
    sig = Signal()
    refs = [hold.remote(sig, i) for i in range(2)]
    sig.wait_for_waiters(2, timeout=60)
    sig.set()
    assert flowcore.get(refs, timeout=60) == [0, 1]


# ---------------------------------------------------------------- bursts: the owner-side queue
@flowcore.remote
def touch(path):
    open(path, "w").close()
    return path


def _client():
    return flowcore.context.current_client()


@pytest.mark.timeout(90)
def test_a_burst_waits_in_the_owners_queue_for_its_leased_workers(fresh_cluster):
    fresh_cluster(num_cpus=2)
    _warm()
    before = _client().leases.queued
    refs = [noop.remote(i) for i in range(300)]
    assert flowcore.get(refs, timeout=60) == list(range(300))
    table = _client().leases
    assert table.queued - before >= 100 and not table.queues
    leased = [r for r in refs[-20:] if _leased(r)]
    assert len(leased) >= 10, [_causes(r) for r in refs[-3:]]
    assert any(any("queued at its owner" in c for c in _causes(r)) for r in refs)
    # the head's books of the node come back once every report is in
    deadline = time.monotonic() + 30
    while flowcore.available_resources().get("CPU") != 2.0:
        assert time.monotonic() < deadline, flowcore.available_resources()
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_cancel_explain_and_visualize_of_a_task_queued_at_its_owner(fresh_cluster, monkeypatch,
                                                                     tmp_path):
    import flowcore.client.leases as leases
    monkeypatch.setattr(leases, "PIPELINE", 1)  # one task per worker: the rest wait here
    fresh_cluster(num_cpus=1)
    _warm()
    sig = Signal()
    running = hold.remote(sig, 1)
    sig.wait_for_waiters(1)
    paths = [str(tmp_path / f"q{i}") for i in range(3)]
    queued = [touch.remote(p) for p in paths]
    assert _client().leases.queues, "the tasks did not wait in the owner's queue"
    why = flowcore.explain(queued[1])
    assert why["state"] == "QUEUED" and "its owner's queue" in why["text"], why
    assert "QUEUED" in flowcore.visualize(queued).source
    flowcore.cancel(queued[1])
    with pytest.raises(TaskCancelledError):
        flowcore.get(queued[1], timeout=60)
    sig.set()
    assert flowcore.get(running, timeout=60) == 1
    assert flowcore.get([queued[0], queued[2]], timeout=60) == [paths[0], paths[2]]
    assert not os.path.exists(paths[1])  # dropped at its owner: it never ran


@pytest.mark.timeout(90)
def test_worker_crash_with_tasks_queued_at_its_owner(fresh_cluster, monkeypatch, tmp_path):
    import flowcore.client.leases as leases
    monkeypatch.setattr(leases, "PIPELINE", 1)
    fresh_cluster(num_cpus=1)
    marker = str(tmp_path / "crashed")

    @flowcore.remote(max_retries=1)
    def crash_once(sig, path):
        sig.wait()
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return "second attempt"
    _warm()
    sig = Signal()
    first = crash_once.remote(sig, marker)
    sig.wait_for_waiters(1)
    queued = [noop.remote(i) for i in range(5)]
    assert _client().leases.queues
    sig.set()
    assert flowcore.get(first, timeout=60) == "second attempt"
    assert flowcore.get(queued, timeout=60) == list(range(5))
    assert _leased(first)


@flowcore.remote(num_cpus=0)
class Box:
    def __init__(self):
        self.refs = None

    def put(self, refs):
        self.refs = refs

    def take(self):
        return self.refs


@flowcore.remote
def wait_for_boxed():
    box = flowcore.get_actor("box")
    refs = None
    while refs is None:
        refs = flowcore.get(box.take.remote())
    return flowcore.get(refs[0]) + 1


@pytest.mark.timeout(90)
def test_no_task_waits_behind_a_leased_task_blocked_in_get(fresh_cluster):
    """A task written to a leased worker behind one that then waits in get
    for it is handed back (the head places it): no deadlock."""
    fresh_cluster(num_cpus=1)
    box = Box.options(name="box").remote()
    flowcore.get(box.take.remote(), timeout=60)
    _warm()
    waiter = wait_for_boxed.remote()
    child = noop.remote(41)   # written behind the waiter on the same worker
    box.put.remote([child])
    assert flowcore.get(waiter, timeout=60) == 42
    assert _leased(waiter)
    # (written behind it and handed back, or still queued at the owner and
    # handed to the head once the waiter's lease was known blocked)
    assert any("blocked in get" in c or "no leased worker left" in c
               for c in _causes(child)), _causes(child)


@flowcore.remote(num_cpus=1)
class Needy:
    def ping(self):
        return "up"


@flowcore.remote
def nap(i):
    time.sleep(0.01)
    return i


@pytest.mark.timeout(90)
def test_the_node_takes_its_leases_back_while_a_burst_runs(fresh_cluster):
    fresh_cluster(num_cpus=2)
    _warm()
    refs = [nap.remote(i) for i in range(400)]
    assert _client().leases.queues
    # an actor placed by the head needs a CPU the burst's leases hold: the
    # node asks them back, the owner hands its queue to the head
    actor = Needy.remote()
    assert flowcore.get(actor.ping.remote(), timeout=60) == "up"
    assert flowcore.get(refs, timeout=60) == list(range(400))
    assert any(any("placed by the head" in c for c in _causes(r)) for r in refs[-200:])


@pytest.mark.timeout(10)
def test_a_leased_worker_hands_back_what_waits_behind_a_task_blocked_in_get():
    """(IO-free) The worker's side of the rule: the tasks queued behind a
    leased task that blocks in get go back to their holder, and so does one
    that comes while it is blocked."""
    from collections import deque
    from types import SimpleNamespace
    from flowcore.node.leases import WorkerLease
    sent = []
    client = SimpleNamespace(_blocked_gets={}, send=lambda dest, msg: sent.append((dest, msg)))
    running = {"op": "run_task", "tid": b"r", "lease": b"L", "reply_conn": "caller:1"}
    behind = [{"op": "run_task", "tid": t, "lease": b"L", "reply_conn": "caller:1"}
              for t in (b"a", b"b")]
    worker = SimpleNamespace(client=client, running_tid=b"r",
                             tasks=deque([*behind, {"op": "lease_end", "tid": None,
                                                    "lease": b"L"}]))
    lease = WorkerLease(worker)
    lease.lease = b"L"
    assert not lease.holds_back(dict(behind[0], tid=b"c"))  # not blocked: it queues
    client._blocked_gets[b"r"] = 1
    lease.blocked(running)
    assert sent == [("caller:1", {"op": "lease_handback", "lease": b"L", "tids": [b"a", b"b"]})]
    assert [t["op"] for t in worker.tasks] == ["lease_end"]  # the lease's end stays
    assert lease.holds_back(dict(behind[0], tid=b"c"))
    assert sent[-1][1]["tids"] == [b"c"]
    # a blocked task with nothing behind it: its holder still hears of it
    sent.clear()
    lease.blocked(running)
    assert sent == [("caller:1", {"op": "lease_handback", "lease": b"L", "tids": []})]
