"""Local-first dispatch: the head's side (IO-free) and the public behaviour."""
from __future__ import annotations

import pytest

import flowcore
from flowcore.ids import object_id
from flowcore.scheduler.states import TaskState
from flowcore.testing import Signal
from test_machine import C, Cluster, ops, run_task_tids

S = TaskState


def _local(c: Cluster, node: str = "n1", **kw) -> tuple[bytes, list]:
    spec = c.spec(**kw)
    spec["local"] = node
    return spec["tid"], c.submit(spec)


def _verdict(c: Cluster, tid: bytes, started: bool, node: str = "n1") -> list:
    return c.state.handle(node, {"op": "local_verdict", "tid": tid, "started": started})


@pytest.mark.timeout(10)
def test_started_locally_is_recorded_not_dispatched() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    tid, out = _local(c)
    assert run_task_tids(out) == [] and c.st(tid) == S.QUEUED
    assert "offered to node n1" in c.state.tasks[tid].cause
    out = _verdict(c, tid, True)
    assert run_task_tids(out) == [] and c.st(tid) == S.RUNNING
    assert c.avail("n1") == 1.0 and c.state.tasks[tid].node == "n1"
    assert "local-first" in c.state.tasks[tid].cause
    out = c.finish(tid)
    assert c.avail("n1") == 2.0
    assert [m["oid"] for m in ops(out, "object_ready")] == [object_id(tid)]


@pytest.mark.timeout(10)
def test_declined_is_placed_by_the_head() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    tid, _ = _local(c)
    out = _verdict(c, tid, False)
    assert run_task_tids(out) == [tid] and c.st(tid) == S.RUNNING
    assert "local_declined" in c.transitions(tid)


@pytest.mark.timeout(10)
def test_declined_and_fitting_nowhere_is_infeasible() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = _local(c, res={"CPU": 8.0})
    out = _verdict(c, tid, False)
    assert c.st(tid) == S.INFEASIBLE and ops(out, "warning")


@pytest.mark.timeout(10)
def test_verdict_and_result_may_come_before_the_submission() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    spec = c.spec()
    spec["local"] = "n1"
    tid = spec["tid"]
    assert _verdict(c, tid, True) == []
    done = {"op": "task_done", "tid": tid, "status": "ok", "local": True,
            "results": [{"oid": object_id(tid), "size": 3, "inline": b"val", "error": False,
                         "nested": []}]}
    assert c.state.handle("w1", done) == []
    out = c.submit(spec)
    assert c.st(tid) == S.FINISHED and c.avail("n1") == 1.0
    assert [m["oid"] for m in ops(out, "object_ready")] == [object_id(tid)]


@pytest.mark.timeout(10)
def test_blocked_in_get_before_the_head_heard_of_the_local_start() -> None:
    """The worker's task_blocked travels on its own connection and may beat
    the node's verdict (or the submission itself): the CPU the blocked task
    gave back must still be free in the head's books once the start is
    recorded, or the head would never place its children."""
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = _local(c)
    assert c.state.handle("w1", {"op": "task_blocked", "tid": tid}) == []
    _verdict(c, tid, True)
    assert c.st(tid) == S.RUNNING and c.state.tasks[tid].blocked
    assert c.avail("n1") == 1.0  # its CPU is lent to its children
    child, out = _local(c)
    assert c.st(child) == S.QUEUED
    c.state.handle("w1", {"op": "task_unblocked", "tid": tid})
    assert c.avail("n1") == 0.0
    c.finish(tid)
    assert c.avail("n1") == 1.0
    # before the submission, blocked then unblocked: the start takes it all
    spec = c.spec()
    spec["local"] = "n1"
    early = spec["tid"]
    c.state.handle("w2", {"op": "task_blocked", "tid": early})
    c.state.handle("w2", {"op": "task_unblocked", "tid": early})
    _verdict(c, early, True)
    c.submit(spec)
    assert c.st(early) == S.RUNNING and not c.state.tasks[early].blocked


@pytest.mark.timeout(10)
def test_offer_to_a_node_that_dies_is_placed_elsewhere() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    c.node("n2", CPU=1)
    tid, _ = _local(c)
    out = c.state.node_died("n1", "killed")
    assert run_task_tids(out, "n2") == [tid]
    assert _verdict(c, tid, True) == [] and c.state.tasks[tid].node == "n2"  # too late


@pytest.mark.timeout(10)
def test_started_before_the_head_saw_its_arguments_ready() -> None:
    c = Cluster()
    c.node("n1", CPU=2)
    a, _ = c.task()
    c.state.handle("n1", {"op": "local_verdict", "tid": a, "started": False})  # unrelated
    tid, _ = _local(c, deps=(object_id(a),))
    assert c.st(tid) == S.WAITING_FOR_ARGS
    out = _verdict(c, tid, True)  # the node had the argument already
    assert c.st(tid) == S.RUNNING and "started_locally" in c.transitions(tid)
    out = c.finish(a)  # the argument's readiness arrives late: no second dispatch
    assert tid not in run_task_tids(out)


@pytest.mark.timeout(10)
def test_cancelled_offer_ignores_a_late_start() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = _local(c)
    c.cancel(tid)
    assert c.st(tid) == S.CANCELLED
    _verdict(c, tid, True)
    assert c.st(tid) == S.CANCELLED and c.avail("n1") == 1.0


@pytest.mark.timeout(10)
def test_a_node_registering_again_is_asked_about_open_offers() -> None:
    c = Cluster()
    c.node("n1", CPU=1)
    tid, _ = _local(c)
    out = c.node("n1", CPU=1)  # its connection to the head broke and came back
    assert [m["tids"] for m in ops(out, "local_query", "n1")] == [[tid]]
    _verdict(c, tid, False)
    assert c.st(tid) == S.RUNNING and run_task_tids(c.node("n1", CPU=1)) == []


@pytest.mark.timeout(10)
def test_offer_to_an_unknown_node_is_placed_by_the_head() -> None:
    c = Cluster()
    c.node("n2", CPU=1)
    tid, out = _local(c, node="gone")
    assert run_task_tids(out, "n2") == [tid]


# ---------------------------------------------------------------- public API
@flowcore.remote
def where_am_i():
    return flowcore.get_runtime_context().get_node_id()


@flowcore.remote
def parent():
    me = flowcore.get_runtime_context().get_node_id()
    return me, [flowcore.get(where_am_i.remote()) for _ in range(3)]


def _causes(ref) -> list[str]:
    return [e["cause"] for e in flowcore.state.task_events(5000)
            if e["task_id"] == ref.task_id]


@pytest.mark.timeout(120)
def test_nested_and_driver_tasks_start_on_their_node(private_cluster, monkeypatch):
    import flowcore.client.leases as leases
    monkeypatch.setattr(leases, "ENABLED", False)  # (tests/test_leases.py: the leased path)
    cluster = private_cluster(2, cpus_per_node=2)
    from flowcore.context import current_client
    mine = current_client().node_id
    ref = where_am_i.remote()
    assert flowcore.get(ref, timeout=60) == mine
    assert any("local-first" in c for c in _causes(ref))
    p = parent.remote()
    node, children = flowcore.get(p, timeout=60)
    # each child fits on the parent's node (one CPU is free) and starts there
    assert set(children) == {node}


@pytest.mark.timeout(120)
def test_what_does_not_fit_locally_goes_elsewhere(private_cluster):
    cluster = private_cluster(2, cpus_per_node=1)
    from flowcore.context import current_client
    mine = current_client().node_id
    sig = Signal()

    @flowcore.remote
    def hold(s):
        s.wait()
        return flowcore.get_runtime_context().get_node_id()
    first = hold.remote(sig)
    sig.wait_for_waiters(1)
    second = hold.remote(sig)  # this node is full: declined, placed by the head
    sig.wait_for_waiters(2)
    sig.set()
    assert flowcore.get([first, second], timeout=60) == [mine, next(
        n for n in cluster.node_ids() if n != mine)]
    assert any("placed by the head" in c for c in _causes(second))
