"""Who reads a leased worker's answer: the thread waiting for it in ``get``
(no hand-off through the client's IO thread), else the IO thread (futures,
nobody waiting).  A real local cluster.  (A leased worker dying while the
waiting thread reads its connection: test_leases.py's
test_worker_crash_mid_task_is_retried.)"""
from __future__ import annotations

import threading
import time

import pytest

import flowcore
from flowcore.context import require_client
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(120)

LEASED = "leased worker"


@flowcore.remote
def echo(x=None):
    return x


@flowcore.remote
def hold(sig, value):
    sig.wait()
    return value


def _leased(ref) -> bool:
    return any(LEASED in e["cause"] for e in flowcore.state.task_events(100_000)
               if e["task_id"] == ref.task_id)


def _warm() -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ref = echo.remote()
        flowcore.get(ref, timeout=60)
        if _leased(ref):
            return
        time.sleep(0.02)
    raise AssertionError("no task took the leased path in 30 s")


def test_the_waiting_thread_reads_leased_answers_itself(fresh_cluster):
    fresh_cluster(num_cpus=2)
    _warm()
    client = require_client()
    reads = client._reads
    refs = []
    for i in range(40):
        ref = echo.remote(i)
        assert flowcore.get(ref, timeout=60) == i
        refs.append(ref)
    # the answers were read by this thread (reads by waiting threads), and
    # the tasks did go to the leased worker
    assert client._reads > reads
    assert sum(_leased(r) for r in refs) >= 30
    # nobody waits in get: the IO thread reads the answer (it watches the
    # connection again once no thread reads it)
    _warm()
    assert echo.remote("fut").future().result(timeout=60) == "fut"
    # an error comes back through the lease and the reading thread
    @flowcore.remote(max_retries=0)
    def boom():
        raise ValueError("boom")
    _warm()
    with pytest.raises(ValueError, match="boom"):
        flowcore.get(boom.remote(), timeout=60)
    # a timeout on the short path, then the answer
    _warm()
    sig = Signal()
    try:
        ref = hold.remote(sig, "late")
        with pytest.raises(flowcore.exceptions.GetTimeoutError) as info:
            flowcore.get(ref, timeout=0.2)
        # the error says where the task is: on which leased worker, since when
        assert "timed out after 0.2s" in str(info.value)
        assert "to leased worker" in str(info.value) and "its answer has not come" in str(info.value)
        sig.wait_for_waiters(1, timeout=60)
        # after a wait of a second or more, the head's explanation too
        with pytest.raises(flowcore.exceptions.GetTimeoutError,
                           match="the head says: .*running on node"):
            flowcore.get(ref, timeout=1.0)
        sig.set()
        assert flowcore.get(ref, timeout=60) == "late"
    finally:
        sig.set()
        sig.close()


def test_two_threads_waiting_on_leased_tasks_are_both_answered(fresh_cluster):
    fresh_cluster(num_cpus=2)
    _warm()
    out: dict[int, list] = {}
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            out[k] = [flowcore.get(echo.remote((k, i)), timeout=60) for i in range(40)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert out == {k: [(k, i) for i in range(40)] for k in range(2)}
