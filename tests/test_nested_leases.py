"""Leased workers for tasks submitted from inside a task: a task's burst
waits in its own client's queue and goes to workers that client leases from
its node (client/worker_leases.py); the head records every such task, so
cancel, retries, ownership and the views keep working."""
from __future__ import annotations

import os
import time
from collections import deque

import pytest

import flowcore
from flowcore.exceptions import TaskCancelledError
from flowcore.ids import object_id
from flowcore.node.leases import WorkerLease
from flowcore.scheduler.states import TaskState
from flowcore.testing import Signal, wait_recorded
from test_machine import C, Cluster, run_task_tids

LEASED = "leased worker"
AT_OWNER = "queued at its owner"


# ---------------------------------------------------------------- IO-free
@pytest.mark.timeout(10)
def test_a_blocked_parent_lends_its_cpu_only_to_children_the_head_queued():
    """Children a worker queues at itself (``lease_q``) are sent by it: the
    children-first lend of a blocked parent must not also place them."""
    c = Cluster(validate=True, pipeline_depth=0)  # (nothing sent ahead: work waits here)
    c.node("n1", CPU=2)
    parent, _ = c.task()
    assert c.state.tasks[parent].state == TaskState.RUNNING
    kids = []
    for _ in range(3):
        spec = dict(c.spec(), parent=parent, lease_q="n1")
        kids.append(spec["tid"])
        out = c.submit(spec)
        assert run_task_tids(out) == []
    c.task()  # the node's other CPU
    head_kid = dict(c.spec(), parent=parent)  # queued at the head (no room)
    assert run_task_tids(c.submit(head_kid)) == []
    out = c.state.handle("client-1", {"op": "task_blocked", "tid": parent})
    # the parent's CPU goes to its child the head queued, never to those its owner sends
    assert run_task_tids(out) == [head_kid["tid"]]
    assert not {tid for q in c.state.queues.values() for tid in q} & set(kids)
    assert all(c.state.tasks[k].state == TaskState.QUEUED for k in kids)
    assert all(AT_OWNER in c.state.tasks[k].cause for k in kids)


@pytest.mark.timeout(10)
def test_tasks_queued_at_a_worker_whose_process_ended_are_placed_by_the_head():
    c = Cluster(validate=True)
    c.node("n1", CPU=2)
    w = "worker-1"
    c.state.handle(w, {"op": "register_client", "kind": "worker"})
    spec = dict(c.spec(), lease_q="n1")
    assert run_task_tids(c.submit(spec, client=w)) == []
    c.state.handle(C, {"op": "incref", "oids": [object_id(spec["tid"])]})  # (a ref escaped)
    out = c.state.client_disconnected(w)
    assert run_task_tids(out) == [spec["tid"]]
    assert c.state.tasks[spec["tid"]].state == TaskState.RUNNING


class _Client:
    def __init__(self):
        self.sent = []

    def send(self, dest, msg, lazy=False):
        self.sent.append((dest, msg))


class _Worker:
    def __init__(self):
        self.tasks = deque()
        self.client = _Client()


@pytest.mark.timeout(10)
def test_a_lease_ended_by_its_holder_and_by_its_node_ends_once():
    """The holder's task ended (``lease_end`` on its connection) and the node
    ends the lease too (its holder left): the worker gives itself back to its
    node once, after the tasks sent before."""
    w = _Worker()
    lease = WorkerLease(w)
    lease.lease = b"L1"
    w.tasks.append({"op": "run_task", "tid": b"t1", "lease": b"L1"})
    lease.end({"op": "lease_end", "lease": b"L1"})   # in band, after t1
    lease.end({"op": "lease_end", "lease": b"L1"})   # the node's, later
    assert [t["op"] for t in w.tasks] == ["run_task", "lease_end"]
    assert not lease.accepts({"lease": b"L1"})
    lease.ended(w.tasks[-1])
    assert [m["op"] for _, m in w.client.sent] == ["worker_idle"]


class _Comm:
    def __init__(self, cid: str):
        self.info = {"id": cid}
        self.closed = False
        self.sent: list = []

    def send(self, msg):
        self.sent.append(msg)

    def reply(self, req, **kw):
        self.sent.append(dict(kw, op="reply", rid=req.get("rid")))


class _NodeServer:
    """What NodeLeases uses of its node server."""

    def __init__(self, pool):
        self.pool = pool
        self.worker_comms: dict = {}
        self.clients: dict = {}
        self.head = _Comm("head")
        self._stopping = False
        self.address = "tcp://127.0.0.1:1"
        self.node_id = "n1"
        self.acted: list = []

    def _act(self, actions):
        self.acted.extend(actions)

    def pool_idle(self, wid, retire=False):
        self._act(self.pool.worker_idle(wid, retire=retire))


@pytest.mark.timeout(10)
def test_a_lease_given_back_idle_frees_its_worker_at_once():
    """A worker's task ends and gives back an idle lease: the node's pool
    has the worker and its CPU back before that worker has read the lease's
    end; the worker's later worker_idle for the lease changes nothing, even
    once the worker serves someone else."""
    from flowcore.node.leases import NodeLeases
    from flowcore.node.pool import BUSY, IDLE, WorkerPool
    pool = WorkerPool({"CPU": 2.0})
    for i, a in enumerate(pool.startup()):
        pool.worker_ready(a[1], 100 + i)
    srv = _NodeServer(pool)
    leases = NodeLeases(srv)
    holder = _Comm("l1")
    for wid in pool.workers:
        srv.worker_comms[wid] = _Comm(wid)
    leases.request(holder, {"op": "lease_request", "rid": 1, "res": {"CPU": 1.0}}, [])
    (wid,) = [w for w, c in srv.worker_comms.items() if c.sent]
    wcomm = srv.worker_comms[wid]
    wcomm.info["wid"] = wid
    leases.listening(wcomm, {"op": "lease_listening", "port": 5}, [])
    lease = holder.sent[-1]["lease"]
    assert lease and pool.available["CPU"] == 1.0 and pool.workers[wid].state == BUSY
    leases.give_back(holder, {"op": "lease_return", "lease": lease, "idle": True}, [])
    assert pool.available["CPU"] == 2.0 and pool.workers[wid].state == IDLE
    assert wcomm.sent[-1] == {"op": "lease_end", "lease": lease}  # the worker is told
    assert leases.snapshot()["leases"] == 0
    # granted again (to another holder) before its worker_idle for the old lease came
    assert pool.grant_lease(b"L9", {"CPU": 2.0}, None) is not None
    assert leases.stale_idle(wid, lease)  # that worker_idle is ignored (once)
    assert not leases.stale_idle(wid, lease)
    assert pool.available["CPU"] == 0.0


# ---------------------------------------------------------------- end to end
@flowcore.remote
def child(i):
    return i


@flowcore.remote
def burst(n):
    """Submit ``n`` children, get them; how many went to leased workers."""
    cl = flowcore.context.current_client()
    before = cl.leases.sent
    refs = [child.remote(i) for i in range(n)]
    total = sum(flowcore.get(refs))
    return total, cl.leases.sent - before, refs[-5:]


def _causes(ref) -> list[str]:
    return [e["cause"] for e in flowcore.state.task_events(100_000)
            if e["task_id"] == ref.task_id]


def _until(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _nested_leased(n: int = 300, tries: int = 5):
    """Run a nested burst until its tasks took leased workers (a request can
    be declined while the node's CPUs are busy: the burst then goes to the
    head, correctly but without leases)."""
    for _ in range(tries):
        total, leased, last = flowcore.get(burst.remote(n), timeout=60)
        assert total == n * (n - 1) // 2
        if leased:
            return leased, last
    raise AssertionError(f"no nested task took a leased worker in {tries} bursts")


@pytest.mark.timeout(120)
def test_a_nested_burst_goes_to_leased_workers_and_the_head_records_it(fresh_cluster):
    fresh_cluster(num_cpus=2)
    leased, last = _nested_leased()
    assert leased >= 100, leased
    wait_recorded(last)
    causes = [c for r in last for c in _causes(r)]
    assert any(LEASED in c for c in causes), causes
    assert any(AT_OWNER in c for c in causes), causes
    stats = flowcore.context.current_client().request("node", {"op": "stats"})
    assert stats["pool"]["leases_granted"] >= 1


@flowcore.remote
def hold(sig, i):
    sig.wait()
    return i


@pytest.fixture
def patient(monkeypatch):
    """A burst whose lease request is declined (a worker still starting on
    a loaded machine) waits at its owner for one rather than going to the
    head after 100 ms (the workers read this when the node starts)."""
    monkeypatch.setenv("FLOWCORE_WORKER_LEASE_WAIT_MS", "5000")


@pytest.mark.timeout(120)
def test_cancel_of_a_queued_and_of_a_running_nested_leased_task(fresh_cluster, patient):
    # the parent and the burst's first two tasks (through the head) hold three
    # CPUs, held on the signal: the fourth goes to a lease
    fresh_cluster(num_cpus=4)
    _nested_leased(100)
    sig = Signal()
    out, running, queued = flowcore.get(cancel_inside.remote(sig, 40), timeout=90)
    sig.set()
    assert out["queued"] == "cancelled" and out["running"] == "cancelled", out
    assert any(LEASED in c for c in _causes(running)), _causes(running)
    assert any(AT_OWNER in c for c in _causes(queued)), _causes(queued)


@flowcore.remote
def cancel_inside(sig, n):
    """Submit a burst held on ``sig``; cancel one task still queued here and
    one running on a leased worker; what each get raised."""
    cl = flowcore.context.current_client()
    refs = [hold.remote(sig, i) for i in range(n)]
    deadline = time.monotonic() + 30
    running = queued = None
    while running is None or queued is None:
        assert time.monotonic() < deadline, "no leased task running"
        flowcore.wait(refs, num_returns=1, timeout=0.05)  # (pumps the leases)
        queued_tids = {s["tid"] for q in cl.leases.queues.values() for s, _ in q}
        running = next((i for i, r in enumerate(refs) if _tid(r) in cl.leases.by_tid), None)
        queued = next((i for i in range(n - 1, -1, -1) if _tid(refs[i]) in queued_tids), None)
    out = {}
    flowcore.cancel(refs[queued])
    try:
        flowcore.get(refs[queued], timeout=30)
        out["queued"] = "ran"
    except TaskCancelledError:
        out["queued"] = "cancelled"
    flowcore.cancel(refs[running])
    try:
        flowcore.get(refs[running], timeout=30)
        out["running"] = "ran"
    except TaskCancelledError:
        out["running"] = "cancelled"
    for r in refs:  # (the signal is released by the driver only)
        flowcore.cancel(r)
    return out, refs[running], refs[queued]


def _tid(ref) -> bytes:
    from flowcore import ids
    return ids.task_of(ref._id)


@flowcore.remote(max_retries=1)
def crash_once(path, i):
    if i == 7 and not os.path.exists(path):
        open(path, "w").close()
        os._exit(1)
    return i


@flowcore.remote
def crash_burst(path, n):
    cl = flowcore.context.current_client()
    before = cl.leases.sent
    refs = [crash_once.remote(path, i) for i in range(n)]
    return sum(flowcore.get(refs)), cl.leases.sent - before, refs[7]


@pytest.mark.timeout(120)
def test_worker_crash_mid_nested_leased_task_is_retried(fresh_cluster, patient, tmp_path):
    fresh_cluster(num_cpus=2)
    _nested_leased(100)
    for attempt in range(3):  # until the task that crashes was on a leased worker
        marker = str(tmp_path / f"crashed{attempt}")
        total, leased, crashed = flowcore.get(crash_burst.remote(marker, 30), timeout=90)
        assert total == sum(range(30)) and os.path.exists(marker)
        causes = _causes(crashed)
        assert any("worker died" in c for c in causes), causes
        if any(LEASED in c for c in causes):
            break
    assert leased and any(LEASED in c for c in causes), causes


@flowcore.remote
def slow_child(sig, i):
    sig.wait()
    return i * 2


@flowcore.remote
def escape(sig, n):
    """Return the refs of a burst whose children cannot have run yet."""
    cl = flowcore.context.current_client()
    refs = [slow_child.remote(sig, i) for i in range(n)]
    return refs, sum(len(q) for q in cl.leases.queues.values())


@pytest.mark.timeout(120)
def test_a_parent_returning_refs_of_children_still_queued_at_it(fresh_cluster, patient):
    fresh_cluster(num_cpus=2)
    _nested_leased(100)
    sig = Signal()
    refs, queued_at_end = flowcore.get(escape.remote(sig, 20), timeout=60)
    assert queued_at_end > 0  # some were still queued at the parent when it returned
    sig.set()
    assert flowcore.get(refs, timeout=60) == [i * 2 for i in range(20)]
    assert any(AT_OWNER in c for r in refs for c in _causes(r))


@flowcore.remote
def fib(n):
    if n < 2:
        return n
    return sum(flowcore.get([fib.remote(n - 1), fib.remote(n - 2)]))


@flowcore.remote
def tree(depth, width):
    """Each level submits ``width`` children (a burst, more than a short
    one): a leased child that itself submits a burst."""
    if depth == 0:
        return 1, 0
    cl = flowcore.context.current_client()
    before = cl.leases.sent
    got = flowcore.get([tree.remote(depth - 1, width) for _ in range(width)])
    return sum(g[0] for g in got), cl.leases.sent - before + sum(g[1] for g in got)


@flowcore.remote(num_cpus=2)
def all_cpus():
    return "ran"


@pytest.mark.timeout(180)
def test_recursion_with_leases_and_no_cpu_held_after_the_parent_ends(fresh_cluster):
    fresh_cluster(num_cpus=2)
    assert flowcore.get(fib.remote(10), timeout=60) == 55
    leaves, _ = flowcore.get(tree.remote(3, 4), timeout=50)
    assert leaves == 64
    _nested_leased(200)
    # the parent's leases went back when it ended: a task needing every CPU runs
    assert flowcore.get(all_cpus.remote(), timeout=60) == "ran"
    _until(lambda: flowcore.available_resources().get("CPU") == 2.0,
           f"CPUs held after the bursts: {flowcore.available_resources()}")
