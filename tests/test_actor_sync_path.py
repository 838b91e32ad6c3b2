"""Calls to an actor one after another (``get(a.f.remote())`` in a loop):
the caller's thread reads its answer itself without the general wait's
bookkeeping, and the actor's process holds its side reports for the head
while it runs the next call (a flusher thread sends them on time).  A real
local cluster."""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import flowcore
from flowcore import ids
from flowcore.context import require_client
from flowcore.exceptions import ActorDiedError, GetTimeoutError
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(120)


@flowcore.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n

    def held(self) -> int:
        """How many side reports of earlier calls this process holds now."""
        from flowcore.context import current_client
        return len(current_client()._held_head)

    def threads(self) -> list[str]:
        return [t.name for t in threading.enumerate()]

    def fail(self) -> None:
        raise KeyError("no such thing in the actor")

    def wait(self, sig: Any) -> bool:
        return sig.wait(60)

    def crash(self) -> None:
        os._exit(3)


def _direct_count() -> int:
    return require_client().query("counts").get("direct_calls", 0)


def _called_directly(ref: Any) -> bool:
    return any("called directly" in e["cause"] for e in flowcore.state.task_events(100_000)
               if e["task_id"] == ref.task_id)


def _until_direct(a: Any) -> None:
    for _ in range(2000):
        before = _direct_count()
        flowcore.get(a.next.remote())
        if _direct_count() > before:
            return
    raise AssertionError("no call went directly to the actor")


def _head_state(tid: bytes, deadline: float) -> str:
    state = "?"
    while time.monotonic() < deadline:
        rows = {t["task_id"]: t for t in flowcore.state.list_tasks()}
        state = rows.get(tid.hex(), {}).get("state", "?")
        if state == "FINISHED":
            break
    return state


def test_gets_in_a_row_read_the_answer_without_the_general_wait(cluster, monkeypatch):
    a = Counter.remote()
    _until_direct(a)
    client = require_client()
    waits: list[int] = []
    general = client._wait_reading
    monkeypatch.setattr(client, "_wait_reading",
                        lambda *args: waits.append(1) or general(*args))
    reads = client._reads
    start = flowcore.get(a.next.remote())
    got = [flowcore.get(a.next.remote()) for _ in range(100)]
    assert got == list(range(start + 1, start + 101))  # in order, each once
    assert client._reads - reads >= 100  # this thread read the answers
    assert waits == []  # ... on the short path, not the general wait
    with client._lock:  # and left no waiter behind
        assert not [o for o in client.waiters if ids.task_of(o) in
                    {lk for link in client.direct.links.values() for lk in link.inflight}]


def test_an_error_comes_back_with_the_actors_traceback(cluster):
    a = Counter.remote()
    _until_direct(a)
    before = _direct_count()
    with pytest.raises(KeyError) as info:
        flowcore.get(a.fail.remote())
    assert _direct_count() == before + 1  # it went directly
    text = str(info.value)
    assert "no such thing in the actor" in text and "in fail" in text  # the actor's frame
    assert flowcore.get(a.next.remote()) > 0  # and the actor goes on


def test_a_timeout_then_the_answer_on_the_short_path(cluster):
    a = Counter.remote()
    _until_direct(a)
    sig = Signal()
    try:
        ref = a.wait.remote(sig)
        with pytest.raises(GetTimeoutError):
            flowcore.get(ref, timeout=0.2)
        sig.set()
        assert flowcore.get(ref, timeout=60) is True
    finally:
        sig.set()
        sig.close()


def test_actor_killed_mid_call_fails_the_get(cluster):
    a = Counter.remote()
    _until_direct(a)
    ref = a.crash.remote()
    with pytest.raises(ActorDiedError):
        flowcore.get(ref, timeout=60)
    # the call went straight to the actor (its side report may reach the
    # head after the error reached this driver: the head's view is polled)
    deadline = time.monotonic() + 30
    while not _called_directly(ref):
        assert time.monotonic() < deadline, "the crashing call did not go to the actor directly"
        time.sleep(0.02)  # polling the head's view with a deadline
    with pytest.raises(ActorDiedError):
        flowcore.get(a.next.remote(), timeout=60)


def test_another_thread_reading_leaves_this_get_to_the_general_wait(cluster):
    a = Counter.remote()
    b = Counter.remote()
    _until_direct(a)
    _until_direct(b)
    sig = Signal()
    try:
        blocked = a.wait.remote(sig)
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(flowcore.get(blocked, timeout=60)))
        t.start()  # that thread reads the connections while it waits
        got = [flowcore.get(b.next.remote(), timeout=60) for _ in range(20)]
        assert got == sorted(got) and len(set(got)) == 20
        sig.set()
        t.join(60)
        assert out == [True]
    finally:
        sig.set()
        sig.close()


@pytest.mark.timeout(90)
def test_side_reports_are_held_while_calls_run_and_sent_during_a_long_one(
        fresh_cluster, monkeypatch):
    # a long batching window, so calls in a row surely fall within it
    monkeypatch.setenv("FLOWCORE_SIDE_FLUSH_MS", "300")
    fresh_cluster(num_cpus=2)
    a = Counter.remote()
    _until_direct(a)
    # calls in a row: the reports of the earlier ones are still held while
    # the next one runs (they used to be written to the head before it)
    assert max(flowcore.get(a.held.remote()) for _ in range(30)) > 0
    assert "flowcore-side-reports" in flowcore.get(a.threads.remote())
    refs = [a.next.remote() for _ in range(10)]
    flowcore.get(refs)
    sig = Signal()
    try:
        blocked = a.wait.remote(sig)
        sig.wait_for_waiters(1)
        # the actor runs a call that does not end: the flusher thread sends
        # the held reports, so the head learns that the earlier calls ended
        deadline = time.monotonic() + 30
        assert {_head_state(ids.task_of(r._id), deadline) for r in refs} == {"FINISHED"}
        sig.set()
        assert flowcore.get(blocked, timeout=60) is True
    finally:
        sig.set()
        sig.close()


def test_answer_now_writes_at_once_unless_something_is_queued_ahead():
    """``InlineClient.answer_now`` on a real TCP pair: written at once by the
    calling thread; queued behind a message already queued (order kept)."""
    import socket

    from flowcore.client.inline import InlineClient
    from flowcore.protocol import frames
    from flowcore.protocol.blocking import BlockingConn

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    peer = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    client = InlineClient("127.0.0.1:1", b"t", "127.0.0.1:1", wid="w-test")
    try:
        client.conns["caller:1"] = BlockingConn.accepted(accepted, "peer", False)
        reader = frames.FrameReader()
        peer.settimeout(30)

        def received() -> list[dict]:
            reader.feed(peer.recv(65536))
            out = []
            while (batch := reader.next_batch()) is not None:
                out.extend(batch[0])
            return out
        client.answer_now("caller:1", {"op": "call_result", "tid": b"1", "results": []})
        assert [m["tid"] for m in received()] == [b"1"]  # written, no pump ran
        client.send("caller:1", {"op": "call_result", "tid": b"2", "results": []})
        client.answer_now("caller:1", {"op": "call_result", "tid": b"3", "results": []})
        assert len(client._outbox) == 2  # behind the queued one: queued too
        client._flush()
        assert [m["tid"] for m in received()] == [b"2", b"3"]
    finally:
        client.close()
        client.loop.close()
        peer.close()
        server.close()


@flowcore.remote
class Plain:
    def next(self) -> int:  # (for _until_direct)
        return 0

    def nothing(self) -> None:
        return None

    def default(self, x: Any = 5) -> Any:
        return x

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return args, kwargs


def test_the_premade_bytes_of_none_and_of_no_arguments_read_back():
    from flowcore.objects.serialization import NO_ARGUMENTS_BYTES, NONE_BYTES, deserialize
    assert deserialize(NONE_BYTES) is None
    assert deserialize(NO_ARGUMENTS_BYTES) == ((), {})


def test_calls_without_arguments_and_answers_of_none_on_the_direct_path(cluster):
    a = Plain.remote()
    _until_direct(a)
    before = _direct_count()
    for _ in range(20):
        assert flowcore.get(a.nothing.remote()) is None
        assert flowcore.get(a.default.remote()) == 5       # the default applies
        assert flowcore.get(a.echo.remote()) == ((), {})
        # values close to None / to no arguments are not taken for them
        for v in (0, False, "", b"", [], (None,), "None"):
            assert flowcore.get(a.default.remote(v)) == v
        assert flowcore.get(a.echo.remote((), {})) == (((), {}), {})
        assert flowcore.get(a.echo.remote(x=None)) == ((), {"x": None})
    assert _direct_count() - before >= 100  # (these went directly)
    # and the same through a put: the store path reads None too
    assert flowcore.get(flowcore.put(None)) is None
