"""Remote functions through the public API on a real local cluster."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

import flowcore
from flowcore.exceptions import FlowcoreError, GetTimeoutError, TaskError
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(60)


@flowcore.remote
def add(a, b=10, *, c=0):
    return a + b + c


@flowcore.remote
def fail(msg):
    raise ValueError(msg)


def test_remote_returns_ref_and_value(cluster):
    ref = add.remote(1, 2)
    assert isinstance(ref, flowcore.ObjectRef)
    assert flowcore.get(ref) == 3
    assert flowcore.get(add.remote(1)) == 11
    assert flowcore.get(add.remote(1, b=1, c=5)) == 7


def test_direct_call_is_an_error(cluster):
    with pytest.raises(TypeError, match=r"\.remote\("):
        add(1, 2)


def test_closures_lambdas_and_defaults(cluster):
    k = 7
    f = flowcore.remote(lambda x: x * k)
    assert flowcore.get(f.remote(6)) == 42

    def outer(n):
        @flowcore.remote
        def inner(y=n):
            return y + 1
        return inner
    assert flowcore.get(outer(4).remote()) == 5


def test_num_returns(cluster):
    @flowcore.remote(num_returns=3)
    def three():
        return 1, "b", [3]
    refs = three.remote()
    assert isinstance(refs, list) and len(refs) == 3
    assert flowcore.get(refs) == [1, "b", [3]]


def test_num_returns_mismatch_is_a_task_error(cluster):
    @flowcore.remote(num_returns=2)
    def one():
        return 1
    a, b = one.remote()
    with pytest.raises(TaskError, match="num_returns=2"):
        flowcore.get(a)


def test_refs_as_arguments_are_resolved(cluster):
    x = add.remote(1, 1)
    y = add.remote(x, x)
    assert flowcore.get(y) == 4
    z = add.remote(flowcore.put(5), b=flowcore.put(6))
    assert flowcore.get(z) == 11


def test_nested_refs_stay_refs(cluster):
    @flowcore.remote
    def inspect(container):
        r = container["r"]
        assert isinstance(r, flowcore.ObjectRef)
        return flowcore.get(r) * 2
    inner = add.remote(2, 3)
    assert flowcore.get(inspect.remote({"r": inner})) == 10


def test_task_returning_a_ref(cluster):
    @flowcore.remote
    def make():
        return add.remote(20, 22)
    out = flowcore.get(make.remote())
    assert isinstance(out, flowcore.ObjectRef)
    assert flowcore.get(out) == 42


def test_tasks_submit_tasks_and_recursion_does_not_deadlock(cluster):
    @flowcore.remote
    def fib(n):
        if n < 2:
            return n
        return sum(flowcore.get([fib.remote(n - 1), fib.remote(n - 2)]))
    # far more parents block in get() than there are CPUs
    assert flowcore.get(fib.remote(8), timeout=50) == 21


def test_task_error_is_instance_of_original_and_names_function(cluster):
    ref = fail.remote("boom")
    with pytest.raises(ValueError) as ei:
        flowcore.get(ref)
    err = ei.value
    assert isinstance(err, TaskError) and isinstance(err, FlowcoreError)
    text = str(err)
    assert "boom" in text and "fail" in text and "Traceback" in text


def test_error_flows_to_dependents(cluster):
    bad = fail.remote("upstream broke")
    dep = add.remote(bad, 1)
    dep2 = add.remote(dep, 1)
    with pytest.raises(ValueError, match="upstream broke"):
        flowcore.get(dep2)


def test_get_timeout(cluster):
    sig = Signal()
    blocked = sig.wait_task.remote()
    with pytest.raises(GetTimeoutError) as ei:
        flowcore.get(blocked, timeout=0.2)
    assert isinstance(ei.value, TimeoutError)
    sig.set()
    assert flowcore.get(blocked, timeout=30) is True


def test_get_rejects_non_refs(cluster):
    with pytest.raises(TypeError, match="ObjectRef"):
        flowcore.get(5)
    with pytest.raises(TypeError, match="item 1"):
        flowcore.get([add.remote(1), "x"])
    with pytest.raises(ValueError, match="timeout"):
        flowcore.get(add.remote(1), timeout=-1)
    assert flowcore.get([]) == []


def test_wait_keeps_order_and_counts(cluster):
    sig = Signal()
    slow = sig.wait_task.remote()
    fast = [add.remote(i) for i in range(3)]
    refs = [fast[0], slow, fast[1], fast[2]]
    ready, not_ready = flowcore.wait(refs, num_returns=3, timeout=30)
    assert ready == [fast[0], fast[1], fast[2]]
    assert not_ready == [slow]
    ready, not_ready = flowcore.wait(refs, num_returns=4, timeout=0.1)
    assert slow in not_ready and len(ready) == 3
    ready, not_ready = flowcore.wait(refs, num_returns=1)
    assert len(ready) == 1 and len(not_ready) == 3 and ready[0] in fast
    sig.set()
    ready, not_ready = flowcore.wait(refs, num_returns=4, timeout=30)
    assert ready == refs and not_ready == []


def test_wait_validates(cluster):
    r = add.remote(1)
    with pytest.raises(TypeError):
        flowcore.wait(r)
    with pytest.raises(ValueError, match="duplicates"):
        flowcore.wait([r, r])
    with pytest.raises(ValueError, match="num_returns"):
        flowcore.wait([r], num_returns=2)


def test_objectref_hash_eq_future_and_await(cluster):
    r = add.remote(1, 1)
    assert r == r and hash(r) == hash(r) and r != add.remote(1, 1)
    assert {r: 1}[r] == 1
    fut = r.future()
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=30) == 2

    async def main():
        return await add.remote(2, 2)
    assert asyncio.run(main()) == 4
    err = fail.remote("in future").future()
    with pytest.raises(ValueError):
        err.result(timeout=30)


def test_api_inside_running_event_loop(cluster):
    async def main():
        # a blocking get inside a running loop still works (it blocks the loop)
        v = flowcore.get(add.remote(3, 4))
        refs = [add.remote(i, i) for i in range(5)]
        vals = await asyncio.gather(*refs)
        return v, vals
    v, vals = asyncio.run(main())
    assert v == 7 and vals == [0, 2, 4, 6, 8]


def test_many_threads(cluster):
    results = {}

    def work(i):
        results[i] = flowcore.get([add.remote(i, j) for j in range(20)])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert all(results[i] == [i + j for j in range(20)] for i in range(8))


def test_executor(cluster):
    with flowcore.Executor() as ex:
        futs = [ex.submit(pow, 2, i) for i in range(5)]
        assert [f.result(timeout=30) for f in futs] == [1, 2, 4, 8, 16]
        assert list(ex.map(abs, [-1, -2, 3], timeout=30)) == [1, 2, 3]
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(abs, 1)


def test_runtime_context(cluster):
    @flowcore.remote
    def ctx():
        c = flowcore.get_runtime_context()
        return c.get_node_id(), c.get_task_id()
    node_id, task_id = flowcore.get(ctx.remote())
    assert node_id == cluster["node_id"]
    assert task_id and len(task_id) == 32
    assert flowcore.get_runtime_context().get_task_id() is None


def test_init_twice_is_an_error(cluster):
    with pytest.raises(RuntimeError, match="already"):
        flowcore.init()
    assert flowcore.is_initialized()


def test_workers_inherit_cwd_and_sys_path(cluster):
    import os
    import sys

    @flowcore.remote
    def where():
        import sys as s
        return os.getcwd(), list(s.path)
    cwd, path = flowcore.get(where.remote())
    assert cwd == os.getcwd()
    assert all(p in path for p in sys.path if p and os.path.isdir(p))


def test_submission_backpressure(cluster, monkeypatch):
    import flowcore.client.core as core
    monkeypatch.setattr(core, "MAX_PENDING_TASKS", 4)
    sig = Signal()
    submitted = []

    def submitter():
        for _ in range(10):
            submitted.append(sig.wait_task.remote())
    t = threading.Thread(target=submitter)
    t.start()
    sig.wait_for_waiters(2)  # both CPUs hold a task; the rest queue
    t.join(0.3)
    assert t.is_alive() and len(submitted) == 4  # the fifth .remote() waits
    sig.set()
    t.join(30)
    assert not t.is_alive()
    assert flowcore.get(submitted, timeout=30) == [True] * 10


def test_task_raising_keyboardinterrupt_or_systemexit_fails_cleanly(cluster):
    @flowcore.remote
    def interrupt():
        raise KeyboardInterrupt("from the task")

    @flowcore.remote(max_retries=0)
    def leave():
        import sys
        sys.exit(3)
    with pytest.raises(TaskError) as ei:
        flowcore.get(interrupt.remote(), timeout=30)
    assert not isinstance(ei.value, KeyboardInterrupt)
    # as in Ray, sys.exit() in a task ends its worker process: a worker crash
    from flowcore.exceptions import WorkerCrashedError
    with pytest.raises(WorkerCrashedError, match="exited with code 3") as ei:
        flowcore.get(leave.remote(), timeout=30)
    assert not isinstance(ei.value, SystemExit)


def test_cancelling_a_future_cancels_the_task(cluster):
    sig = Signal()
    ref = sig.wait_task.remote()
    fut = ref.future()
    assert fut.cancel()
    from flowcore.exceptions import TaskCancelledError
    with pytest.raises(TaskCancelledError):
        flowcore.get(ref, timeout=30)
    sig.set()


def test_initialized_inside_tasks(cluster):
    @flowcore.remote
    def probe():
        try:
            flowcore.init()
        except RuntimeError as e:
            return flowcore.is_initialized(), str(e)
        return flowcore.is_initialized(), "init did not refuse"
    inside, msg = flowcore.get(probe.remote(), timeout=30)
    assert inside is True and "inside a task" in msg


def test_executor_checks_options_at_once(cluster):
    with pytest.raises(ValueError, match="Valid options"):
        flowcore.Executor(bogus=1)
