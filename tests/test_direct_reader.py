"""Who reads a direct actor call's answer: the thread waiting for it in
``get``, else the client's IO thread (futures, other threads), and the side
reports that reach the head in batches.  A real local cluster."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import flowcore
from flowcore import ids
from flowcore.context import require_client
from flowcore.objects.serialization import _PLAIN_HEADERS, deserialize, serialize
from flowcore.protocol import frames

pytestmark = pytest.mark.timeout(120)


@flowcore.remote
class Echo:
    def echo(self, x: Any) -> Any:
        return x

    def none(self) -> None:
        return None


def _until_direct(a: Any) -> None:
    client = require_client()
    for _ in range(2000):
        before = client.query("counts").get("direct_calls", 0)
        flowcore.get(a.none.remote())
        if client.query("counts").get("direct_calls", 0) > before:
            return
    raise AssertionError("no call went directly to the actor")


def _head_state(tid: bytes, deadline: float) -> str:
    """The head's state of a task, once it is FINISHED or at the deadline
    (the actor's report of a direct call is a side report: it may come a
    moment after the caller has the value)."""
    state = "?"
    while time.monotonic() < deadline:
        rows = {t["task_id"]: t for t in flowcore.state.list_tasks()}
        state = rows.get(tid.hex(), {}).get("state", "?")
        if state == "FINISHED":
            break
    return state


def test_gets_in_a_row_then_a_future_and_another_thread(cluster):
    a = Echo.remote()
    _until_direct(a)
    client = require_client()
    # calls one after another: this thread reads the answers itself
    reads = client._reads
    assert [flowcore.get(a.echo.remote(i)) for i in range(50)] == list(range(50))
    assert client._reads > reads
    # nobody waits in get: the IO thread reads the answer (it watches the
    # connection again once no thread reads it)
    assert a.echo.remote("fut").future().result(timeout=60) == "fut"
    # two threads wait at once: one reads, the other is answered too
    out: dict[int, list] = {}

    def caller(k: int) -> None:
        out[k] = [flowcore.get(a.echo.remote((k, i))) for i in range(30)]
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {k: [(k, i) for i in range(30)] for k in range(2)}


def test_the_head_records_direct_calls_it_learns_of_on_the_side(cluster):
    a = Echo.remote()
    _until_direct(a)
    refs = [a.echo.remote(i) for i in range(20)]
    assert flowcore.get(refs) == list(range(20))
    tids = [ids.task_of(r._id) for r in refs]
    deadline = time.monotonic() + 30
    assert {_head_state(t, deadline) for t in tids} == {"FINISHED"}


def test_errors_and_non_builtin_values_come_back_directly(cluster):
    a = Echo.remote()
    _until_direct(a)

    class Box:
        def __init__(self, v: Any) -> None:
            self.v = v
    assert flowcore.get(a.echo.remote(Box(3))).v == 3
    assert flowcore.get(a.echo.remote({"k": [1, 2.5, "s", b"b", None]})) == \
        {"k": [1, 2.5, "s", b"b", None]}
    with pytest.raises(TypeError, match="missing"):  # the no-argument shortcut checks too
        a.echo.remote()


def test_builtin_values_round_trip_and_headers_are_remembered():
    for v in [None, 0, -1, 2**70, 1.5, "é", b"\0", (), {}, [1, (2, {"a": None})],
              {1: 2}, True, complex(1, 2)]:
        data = serialize(v).to_bytes()
        _PLAIN_HEADERS.clear()
        assert deserialize(data) == v  # parsed, then remembered
        assert deserialize(data) == v  # from the remembered header
        assert deserialize(memoryview(data)) == v
    nested = [[[[1]]]]  # deeper than the builtin fast path goes: cloudpickle
    assert deserialize(serialize(nested).to_bytes()) == nested


def test_frame_reader_decodes_single_frame_batches_in_place_and_keeps_going():
    reader = frames.FrameReader()
    data = b"".join(b"".join(bytes(x) for x in frames.encode([{"op": "m", "i": i}]))
                    for i in range(5))
    reader.feed(data[:7])
    assert reader.next_batch() is None
    reader.feed(data[7:])
    got = []
    while True:
        batch = reader.next_batch()
        if batch is None:
            break
        got.append(batch[0][0]["i"])
        assert batch[1] == []
    assert got == list(range(5))
    assert reader.idle
    # a batch with an out-of-band frame still takes the general path
    reader.feed(b"".join(bytes(x) for x in frames.encode([{"op": "m", "_frames": [0]}],
                                                         [b"xyz"])))
    msgs, bufs = reader.next_batch()
    assert msgs[0]["op"] == "m" and bytes(bufs[0]) == b"xyz"


@flowcore.remote
class Waiter:
    def f(self) -> int:
        return 1

    def wait(self, sig: Any) -> bool:
        return sig.wait(60)


def test_an_actor_reports_its_calls_before_running_a_long_one(cluster):
    from flowcore.testing import Signal
    a = Waiter.remote()
    for _ in range(2000):  # until calls go directly
        client = require_client()
        before = client.query("counts").get("direct_calls", 0)
        flowcore.get(a.f.remote())
        if client.query("counts").get("direct_calls", 0) > before:
            break
    sig = Signal()
    try:
        refs = []
        for _ in range(20):  # calls in a row: their reports are held a moment
            refs.append(a.f.remote())
            assert flowcore.get(refs[-1]) == 1
        blocked = a.wait.remote(sig)
        sig.wait_for_waiters(1)
        # the actor now runs a call that does not end: the head still learns
        # that the earlier ones finished
        deadline = time.monotonic() + 30
        assert {_head_state(ids.task_of(r._id), deadline) for r in refs} == {"FINISHED"}
        sig.set()
        assert flowcore.get(blocked, timeout=60) is True
    finally:
        sig.set()
        sig.close()
