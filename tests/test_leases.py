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
from test_machine import Cluster, ops, run_task_tids

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
    lease on its first task and keeps it for the test's grace)."""
    for _ in range(50):
        ref = noop.remote()
        flowcore.get(ref, timeout=60)
        if _leased(ref):
            return
    raise AssertionError("no task took the leased path")


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
    fresh_cluster(num_cpus=1)
    _warm()
    sig = Signal()
    running = hold.remote(sig, 1)
    sig.wait_for_waiters(1)
    queued = hold.remote(sig, 2)
    assert _leased(running) and _leased(queued)
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
