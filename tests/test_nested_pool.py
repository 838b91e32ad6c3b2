"""Tasks blocked in get on tasks they submitted (a recursive ``fib``): the
node keeps spare workers forked ahead while a parent is blocked, the head
runs a blocked parent's children first, and the extra workers are retired
again once idle (no process outlives the work)."""
from __future__ import annotations

import os
import time

import psutil
import pytest

import flowcore
from flowcore.testing import Signal


@flowcore.remote
def fib_pids(n: int) -> tuple[int, list[int]]:
    """fib(n), and the worker processes the subtree ran in."""
    if n < 2:
        return n, [os.getpid()]
    (a, pa), (b, pb) = flowcore.get([fib_pids.remote(n - 1), fib_pids.remote(n - 2)])
    return a + b, sorted({os.getpid(), *pa, *pb})


def _pool() -> dict:
    (node,) = flowcore.state.list_nodes()
    return node["pool"]


def _worker_processes() -> int:
    """The node's worker processes (its children), counted by the OS."""
    (node,) = flowcore.state.list_nodes()
    return len(psutil.Process(node["pid"]).children())


def _settles(pred, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.timeout(90)
def test_recursive_fib_runs_depth_first_in_few_processes_and_they_are_reaped(
        fresh_cluster, monkeypatch) -> None:
    monkeypatch.setenv("FLOWCORE_WORKER_IDLE_GRACE", "0.3")
    fresh_cluster(num_cpus=2)
    value, pids = flowcore.get(fib_pids.remote(9), timeout=60)
    assert value == 34
    # 109 tasks, 54 of them parents blocked in get: run breadth first, nearly
    # every parent held a process of its own at once (52-53 here); depth
    # first (the children of a blocked parent first, idle workers kept for
    # the next child) far fewer are ever needed (18-25)
    assert len(pids) <= 36, len(pids)
    # nothing is blocked any more: back to the warm pool (one per CPU), and
    # the retired processes are gone
    assert _settles(lambda: _pool()["workers"] == 2 and _worker_processes() == 2), \
        (_pool(), _worker_processes())


@pytest.mark.timeout(90)
def test_a_blocked_parent_has_spare_workers_ready_bounded_and_reaped(
        fresh_cluster, monkeypatch) -> None:
    monkeypatch.setenv("FLOWCORE_WORKER_IDLE_GRACE", "3")
    fresh_cluster(num_cpus=1)
    sig = Signal()
    child = sig.wait_task

    @flowcore.remote
    def parent() -> bool:
        return flowcore.get(child.remote(), timeout=60)

    ref = parent.remote()
    sig.wait_for_waiters(1)
    # the parent is blocked in get, its child runs: besides those two
    # processes, spare ones (2 by default) are forked and ready, no more
    assert _settles(lambda: _pool()["blocked"] == 1 and _pool()["idle"] >= 1), _pool()
    snap = _pool()
    assert snap["idle"] + snap["starting"] <= 2 and snap["workers"] <= 4, snap
    # idle past the grace, they are retired though the parent is still
    # blocked (it and its running child are all the pool keeps)
    assert _settles(lambda: _pool()["workers"] == 2 and _worker_processes() == 2), \
        (_pool(), _worker_processes())
    assert _pool()["blocked"] == 1
    sig.set()
    assert flowcore.get(ref, timeout=60) is True
    assert _settles(lambda: _pool()["workers"] == 1 and _worker_processes() == 1), \
        (_pool(), _worker_processes())
    sig.close()


@pytest.mark.timeout(60)
def test_many_children_of_one_blocked_parent_all_run(fresh_cluster) -> None:
    fresh_cluster(num_cpus=2)

    @flowcore.remote
    def child(i: int) -> int:
        return i

    @flowcore.remote
    def parent(n: int) -> int:
        return sum(flowcore.get([child.remote(i) for i in range(n)]))

    assert flowcore.get(parent.remote(300), timeout=60) == 300 * 299 // 2
    assert flowcore.get([parent.remote(20) for _ in range(4)], timeout=60) == [190] * 4


@flowcore.remote
def own_id(n: int) -> list:
    """The id this task's own RemoteFunction has when the task starts, here
    and in its descendants (a worker loads the function by that id)."""
    mine = own_id._fid
    return [mine] + (flowcore.get(own_id.remote(n - 1)) if n else [])


@pytest.mark.timeout(60)
def test_a_recursive_remote_function_keeps_the_id_it_was_loaded_by(fresh_cluster) -> None:
    fresh_cluster(num_cpus=1)
    fids = flowcore.get(own_id.remote(3), timeout=60)
    assert fids == [own_id._fid] * 4
