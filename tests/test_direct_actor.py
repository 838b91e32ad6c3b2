"""Direct actor calls: the caller sends a call straight to the actor's process
and records it at the head; the actor answers the caller and reports to the
head.  Head-side and caller-side decisions are tested without IO first, then
the whole path on a real local cluster."""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import pytest

import flowcore
from flowcore import ids
from flowcore.client import direct
from flowcore.client.direct import ActorLink, DirectCalls
from flowcore.exceptions import ActorDiedError, ActorError
from flowcore.ids import IdSource, object_id
from flowcore.objects.serialization import deserialize
from flowcore.protocol import auth
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.states import TaskState
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(90)

S = TaskState
C = "client-1"
OTHER = "client-2"


# ================================================================ head (no IO)
class Head:
    def __init__(self, max_task_retries: int = 0, max_restarts: int = 0) -> None:
        self.state = SchedulerState()
        self.ids = IdSource()
        for cid in (C, OTHER, "w-actor", "w-actor-2"):
            self.state.handle(cid, {"op": "register_client", "kind": "driver"})
        self.state.handle("n1", {"op": "register_node", "node_id": "n1", "name": "n1",
                                 "address": "tcp://10.0.0.5:7000", "resources": {"CPU": 2}})
        self.aid = self.ids.task_id()
        spec = {"tid": self.aid, "aid": self.aid, "fid": b"cls", "name": "A.__init__",
                "class_name": "A", "methods": {"f": 1}, "args": b"a", "deps": [],
                "nested": [], "hold": {}, "place": {"CPU": 1.0},
                "max_restarts": max_restarts, "max_task_retries": max_task_retries,
                "max_concurrency": 1}
        self.state.handle(C, {"op": "create_actor", "spec": spec, "rid": 1})
        self.state.handle("w-actor", {"op": "actor_ready", "aid": self.aid, "pid": 5,
                                      "direct_port": 4242})

    def call(self, deps: tuple = ()) -> dict:
        return {"tid": self.ids.task_id(), "fid": b"", "actor": self.aid, "method": "f",
                "name": "A.f", "args": b"x", "deps": list(deps), "nested": [], "nret": 1,
                "res": {}, "retries": 0}

    def submit(self, spec: dict, epoch: int | None = 0, client: str = C) -> list:
        if epoch is not None:
            spec = dict(spec, direct_epoch=epoch)
        return self.state.handle(client, {"op": "submit", "tasks": [spec]})

    def done(self, spec: dict, value: bytes = b"v", sent: bool = True,
             source: str = "w-actor") -> list:
        r = {"oid": object_id(spec["tid"]), "inline": value, "size": len(value)}
        if sent:
            r["sent"] = True
        return self.state.handle(source, {"op": "task_done", "tid": spec["tid"],
                                          "status": "ok", "results": [r], "answered_direct": True})

    def st(self, spec: dict) -> Any:
        t = self.state.tasks.get(spec["tid"])
        return t.state if t is not None else None


def run_tasks(out: list) -> list[bytes]:
    return [m["tid"] for _, m in out if m["op"] == "run_task"]


def test_head_gives_the_actor_address_with_its_node_host_and_epoch() -> None:
    h = Head()
    out = h.state.handle(C, {"op": "actor_direct", "aid": h.aid, "rid": 7})
    (dest, reply), = out
    assert dest == C and reply["rid"] == 7
    assert reply["address"] == "tcp://10.0.0.5:4242" and reply["epoch"] == 0
    assert reply["node"] == "n1"


def test_head_gives_no_address_to_an_actor_that_retries_calls() -> None:
    h = Head(max_task_retries=1)
    (_, reply), = h.state.handle(C, {"op": "actor_direct", "aid": h.aid, "rid": 1})
    assert reply["address"] is None
    (_, reply), = h.state.handle(C, {"op": "actor_direct", "aid": b"x" * 16, "rid": 2})
    assert reply["address"] is None


def test_direct_submission_runs_at_once_without_dispatch_and_is_logged() -> None:
    h = Head()
    spec = h.call()
    out = h.submit(spec)
    assert run_tasks(out) == []  # the caller sent it to the actor itself
    assert h.st(spec) == S.RUNNING
    events = h.state.log.for_task(spec["tid"])
    assert [e["transition"] for e in events] == ["direct_call"]
    assert "called directly by its caller" in events[0]["cause"]
    assert h.state.counts["direct_calls"] == 1
    out = h.done(spec)
    assert h.st(spec) == S.FINISHED
    # the caller already has the inline value: the head does not send it again
    assert [m for _, m in out if m["op"] == "object_ready"] == []
    assert h.state.objects[object_id(spec["tid"])].inline == b"v"


def test_a_result_not_sent_directly_is_announced_to_the_caller() -> None:
    h = Head()
    spec = h.call()
    h.submit(spec)
    out = h.done(spec, sent=False)
    assert [(d, m["oid"]) for d, m in out if m["op"] == "object_ready"] == \
        [(C, object_id(spec["tid"]))]


def test_task_done_before_the_direct_submission_waits_for_it() -> None:
    h = Head()
    spec = h.call()
    assert h.done(spec) == []
    assert spec["tid"] in h.state.direct_calls.early
    h.submit(spec)
    assert h.st(spec) == S.FINISHED
    assert spec["tid"] not in h.state.direct_calls.early


def test_a_direct_call_with_an_argument_the_head_has_not_seen_ready_runs() -> None:
    h = Head()
    first = h.call()
    h.submit(first)
    second = h.call(deps=(object_id(first["tid"]),))  # the caller had first's value
    h.submit(second)
    assert h.st(second) == S.RUNNING
    h.done(first)
    h.done(second)
    assert h.st(second) == S.FINISHED


def test_head_routed_calls_wait_for_the_callers_direct_calls() -> None:
    h = Head()
    d1 = h.call()
    h.submit(d1)
    later = h.call()
    out = h.submit(later, epoch=None)
    assert run_tasks(out) == [] and h.st(later) == S.QUEUED
    other = h.call()  # another caller is not held back
    out = h.submit(other, epoch=None, client=OTHER)
    assert run_tasks(out) == [other["tid"]]
    out = h.done(d1)
    assert run_tasks(out) == [later["tid"]]


def test_direct_call_for_an_older_process_fails_with_actor_error() -> None:
    h = Head(max_restarts=1)
    h.state.handle("n1", {"op": "actor_died", "aid": h.aid, "how": "exited"})
    spec = h.call()
    out = h.submit(spec, epoch=0)  # looked up before the restart
    assert h.st(spec) == S.FAILED
    (msg,) = [m for _, m in out if m["op"] == "object_ready"]
    assert isinstance(deserialize(msg["inline"]), ActorError)
    h.state.handle("w-actor-2", {"op": "actor_ready", "aid": h.aid, "pid": 6,
                                 "direct_port": 4343})
    (_, reply), = h.state.handle(C, {"op": "actor_direct", "aid": h.aid, "rid": 3})
    assert reply["epoch"] == 1 and reply["address"].endswith(":4343")
    again = h.call()
    h.submit(again, epoch=1)
    assert h.st(again) == S.RUNNING


def test_actor_death_fails_direct_calls_in_flight_once() -> None:
    h = Head()
    spec = h.call()
    h.submit(spec)
    out = h.state.handle("n1", {"op": "actor_died", "aid": h.aid, "how": "killed"})
    msgs = [m for _, m in out if m["op"] == "object_ready"]
    assert len(msgs) == 1 and isinstance(deserialize(msgs[0]["inline"]), ActorDiedError)
    assert h.st(spec) == S.FAILED
    assert h.done(spec) == [] and h.st(spec) == S.FAILED  # a late report changes nothing


def test_restart_fails_direct_calls_in_flight_with_actor_error() -> None:
    h = Head(max_restarts=1)
    spec = h.call()
    h.submit(spec)
    out = h.state.handle("n1", {"op": "actor_died", "aid": h.aid, "how": "exited"})
    (msg,) = [m for _, m in out if m["op"] == "object_ready"]
    assert isinstance(deserialize(msg["inline"]), ActorError)
    actor = h.state.actors[h.aid]
    assert actor.direct == {} and actor.direct_port is None


# ================================================================ caller (no IO)
def _link(**kw: Any) -> ActorLink:
    link = ActorLink(b"a" * 16)
    link.open = True
    link.node = "n1"
    for k, v in kw.items():
        setattr(link, k, v)
    return link


def _spec(tid: bytes, deps: tuple = ()) -> dict:
    return {"tid": tid, "actor": b"a" * 16, "method": "f", "args": b"x", "deps": list(deps),
            "nret": 1}


def test_route_goes_direct_only_with_an_open_link_and_ready_arguments() -> None:
    calls, src = DirectCalls(), IdSource()
    link = _link()
    tid = src.task_id()
    run = calls.route(link, _spec(tid), {}, set(), C)
    assert run is not None and run["op"] == "run_task" and run["tid"] == tid
    link.open = False
    assert calls.route(link, _spec(tid), {}, set(), C) is None
    link.open = True
    dep = object_id(src.task_id())
    assert calls.route(link, _spec(tid, (dep,)), {}, set(), C) is None  # not ready
    failed = {dep: {"oid": dep, "inline": b"e", "error": True}}
    assert calls.route(link, _spec(tid, (dep,)), failed, set(), C) is None
    elsewhere = {dep: {"oid": dep, "nodes": ["n2"], "size": 9}}
    assert calls.route(link, _spec(tid, (dep,)), elsewhere, set(), C) is None
    on_node = {dep: {"oid": dep, "nodes": ["n1"], "size": 9}}
    assert calls.route(link, _spec(tid, (dep,)), on_node, set(), C)["deps"] == [on_node[dep]]


def test_route_keeps_the_head_path_while_head_routed_calls_are_unfinished() -> None:
    calls, src = DirectCalls(), IdSource()
    link = _link()
    via_head = src.task_id()
    calls.sent_to_head(link, via_head)
    expected = {object_id(via_head)}
    assert calls.route(link, _spec(src.task_id()), {}, expected, C) is None
    expected.clear()  # its result arrived
    assert calls.route(link, _spec(src.task_id()), {}, expected, C) is not None


def test_a_dropped_unfinished_head_routed_call_keeps_the_head_path() -> None:
    calls, src = DirectCalls(), IdSource()
    link = calls.link(b"a" * 16)
    link.open = True
    via_head = src.task_id()
    calls.sent_to_head(link, via_head)
    calls.dropped(object_id(via_head))
    assert link.sticky
    assert calls.route(link, _spec(src.task_id()), {}, set(), C) is None


def test_pause_sends_calls_through_the_head_until_looked_up_again() -> None:
    calls, src = DirectCalls(), IdSource()
    link = calls.link(b"a" * 16)
    link.open = True
    calls.pause(link.aid)  # its caller is killing it
    assert calls.route(link, _spec(src.task_id()), {}, set(), C) is None
    assert not link.wants_lookup(0.0) and link.wants_lookup(link.next_lookup)


def test_a_lost_link_hands_unanswered_calls_back_to_the_head() -> None:
    calls, src = DirectCalls(), IdSource()
    link = _link()
    a, b = src.task_id(), src.task_id()
    calls.sent_direct(link, _spec(a))
    calls.sent_direct(link, dict(_spec(b), nret=2))
    calls.answered(link, a)
    assert sorted(calls.lost(link)) == sorted([object_id(b, 0), object_id(b, 1)])
    assert not link.open and link.inflight == {}


# ================================================================ real cluster
@flowcore.remote
class Log:
    def __init__(self) -> None:
        self.seen: list = []

    def add(self, x: Any, spin: int = 0) -> int:
        total = 0
        for i in range(spin):  # varying amounts of work
            total += i
        self.seen.append(x)
        return len(self.seen)

    def items(self) -> list:
        return list(self.seen)

    def pid(self) -> int:
        return os.getpid()

    def wait(self, sig: Any) -> bool:
        return sig.wait(60)

    def crash(self) -> None:
        os._exit(9)


def _client() -> Any:
    from flowcore.context import require_client
    return require_client()


def _direct_count() -> int:
    return _client().query("counts").get("direct_calls", 0)


def _until_direct(handle: Any, limit: int = 2000) -> None:
    """Call until a call goes directly (the first ones go through the head
    while the connection opens)."""
    for _ in range(limit):
        before = _direct_count()
        flowcore.get(handle.items.remote())
        if _direct_count() > before:
            return
    raise AssertionError("no call went directly to the actor")


def test_calls_go_directly_and_the_head_records_them(cluster):
    a = Log.remote()
    _until_direct(a)
    before = _direct_count()
    refs = [a.add.remote(i) for i in range(20)]
    assert flowcore.get(refs) == list(range(1, 21))
    assert _direct_count() - before == 20
    # the head's tables and event log show every call (the actor reports to
    # the head after answering: the state API catches up, as in Ray)
    tids = {ids.task_of(r._id).hex() for r in refs}
    deadline = time.monotonic() + 30
    while True:
        rows = {t["task_id"]: t for t in flowcore.state.list_tasks()}
        done = tids <= set(rows) and all(rows[t]["state"] == "FINISHED" for t in tids)
        if done or time.monotonic() > deadline:
            break
        threading.Event().wait(0.02)  # the head's tables, polled until they catch up
    assert tids <= set(rows)
    assert all(rows[t]["state"] == "FINISHED" for t in tids)
    events = [e for e in flowcore.state.task_events(2000) if e["task_id"] in tids]
    assert {e["transition"] for e in events} == {"direct_call", "finish"}
    assert all("called directly" in e["cause"] for e in events
               if e["transition"] == "direct_call")


def test_order_per_caller_with_varying_durations(cluster):
    a = Log.remote()
    _until_direct(a)
    n0 = len(flowcore.get(a.items.remote()))
    spins = [(i * 7919) % 20000 for i in range(60)]
    refs = [a.add.remote(i, spin) for i, spin in enumerate(spins)]
    assert flowcore.get(refs) == list(range(n0 + 1, n0 + 61))
    assert flowcore.get(a.items.remote())[n0:] == list(range(60))


def test_call_with_a_pending_argument_keeps_the_order(cluster):
    a = Log.remote()
    _until_direct(a)
    n0 = len(flowcore.get(a.items.remote()))
    sig = Signal()
    try:
        pending = sig.wait_task.remote()
        first = a.add.remote(pending)     # through the head: its argument is not ready
        rest = [a.add.remote(i) for i in range(5)]  # must not overtake it
        sig.set()
        flowcore.get([first] + rest)
        assert flowcore.get(a.items.remote())[n0:] == [True, 0, 1, 2, 3, 4]
    finally:
        sig.close()
    _until_direct(a)  # and direct again once they are done


def test_crash_mid_call_gives_actor_died_error_once(cluster):
    a = Log.remote()
    _until_direct(a)
    before = _direct_count()
    ref = a.crash.remote()
    with pytest.raises(ActorDiedError):
        flowcore.get(ref, timeout=60)
    assert _direct_count() == before + 1  # that call went directly
    client = _client()
    with client._lock:
        first = client.ready[ref._id]
    with pytest.raises(ActorDiedError):
        flowcore.get(ref, timeout=60)
    with client._lock:
        assert client.ready[ref._id] is first  # one outcome, kept
    with pytest.raises(ActorDiedError):
        flowcore.get(a.add.remote(1), timeout=60)


def test_restart_then_later_calls_succeed_directly(cluster):
    a = Log.options(max_restarts=1).remote()
    _until_direct(a)
    pid = flowcore.get(a.pid.remote())
    with pytest.raises(ActorError):
        flowcore.get(a.crash.remote(), timeout=60)
    assert flowcore.get(a.add.remote("x"), timeout=60) == 1  # a fresh instance
    assert flowcore.get(a.pid.remote()) != pid
    _until_direct(a)  # to the new process
    assert flowcore.get(a.add.remote("y")) == 2
    assert flowcore.get(a.items.remote()) == ["x", "y"]


def test_kill_fails_direct_calls_in_flight_and_later_ones(cluster):
    a = Log.remote()
    _until_direct(a)
    sig = Signal()
    try:
        before = _direct_count()
        blocked = a.wait.remote(sig)
        assert _until_sent_directly(before)
        flowcore.kill(a)
        with pytest.raises(ActorDiedError, match="kill"):
            flowcore.get(blocked, timeout=60)
        with pytest.raises(ActorDiedError):
            flowcore.get(a.add.remote(1), timeout=60)
    finally:
        sig.close()


def test_calls_queued_behind_unanswered_ones_leave_without_a_wait(cluster):
    import time
    a = Log.remote()
    _until_direct(a)
    n0 = len(flowcore.get(a.items.remote()))
    sig = Signal()
    try:
        blocked = a.wait.remote(sig)  # unanswered until the signal is set
        later = [a.add.remote(i) for i in range(5)]  # queued behind it, not waited for
        client = _client()
        deadline = time.monotonic() + 30
        while client._dpending:  # the IO thread sends them (with their records)
            assert time.monotonic() < deadline, "queued direct calls were never sent"
        sig.set()
        assert flowcore.get(blocked, timeout=60) is True
        assert flowcore.get(later, timeout=60) == list(range(n0 + 1, n0 + 6))
    finally:
        sig.close()


def _until_sent_directly(before: int) -> bool:
    for _ in range(10_000):
        if _direct_count() > before:
            return True
    return False


@flowcore.remote
def use_handle(a: Any, n: int) -> list:
    return flowcore.get([a.add.remote(("task", i)) for i in range(n)])


def test_a_handle_passed_to_a_task_calls_directly_from_the_worker(cluster):
    a = Log.remote()
    flowcore.get(a.items.remote())
    before = _direct_count()
    counts = flowcore.get(use_handle.remote(a, 10), timeout=60)
    assert counts == list(range(counts[0], counts[0] + 10))
    assert _direct_count() - before >= 10
    assert flowcore.get(a.items.remote())[-10:] == [("task", i) for i in range(10)]


@flowcore.remote(max_concurrency=4)
class Threaded:
    def echo(self, x: Any) -> Any:
        return x


@flowcore.remote
class Async:
    async def echo(self, x: Any) -> Any:
        return x


def test_threaded_and_async_actors_answer_directly(cluster):
    for cls in (Threaded, Async):
        h = cls.remote()
        for _ in range(2000):
            before = _direct_count()
            assert flowcore.get(h.echo.remote(1)) == 1
            if _direct_count() > before:
                break
        else:
            raise AssertionError(f"{cls} got no direct call")
        assert flowcore.get([h.echo.remote(i) for i in range(50)]) == list(range(50))


def _actor_address(a: Any) -> tuple[str, int]:
    r = _client().request("head", {"op": "actor_direct", "aid": a._aid})
    host, _, port = r["address"][len("tcp://"):].rpartition(":")
    return host, int(port)


def test_unauthenticated_socket_to_the_actor_is_dropped(cluster):
    a = Log.remote()
    assert flowcore.get(a.add.remote(0)) == 1
    address = _actor_address(a)
    # a peer with the wrong token: refused, then closed
    with socket.create_connection(address, timeout=30) as s:
        hello = _recv(s, auth.SERVER_HELLO)
        snonce = auth.parse_server_hello(hello)
        proof, _ = auth.client_proof(b"not the token", snonce)
        s.sendall(proof)
        assert _recv(s, auth.SERVER_PROOF) == auth.REFUSAL
        assert _closed(s)
    # a peer that sends messages without authenticating: taken as a (bad) proof
    from flowcore.protocol import frames
    junk = b"".join(bytes(b) for b in frames.encode([{"op": "run_task", "tid": b"x" * 16,
                                                      "actor": a._aid, "method": "crash"}]))
    with socket.create_connection(address, timeout=30) as s:
        _recv(s, auth.SERVER_HELLO)
        s.sendall(junk.ljust(auth.CLIENT_PROOF, b"\0"))
        assert _recv(s, auth.SERVER_PROOF) == auth.REFUSAL
        assert _closed(s)  # (reset: the rest of what it sent was never read)
    assert flowcore.get(a.add.remote(1)) == 2  # alive, and nothing ran


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_switch_off_sends_calls_through_the_head(cluster, monkeypatch):
    monkeypatch.setattr(direct, "ENABLED", False)
    a = Log.remote()
    before = _direct_count()
    assert flowcore.get([a.add.remote(i) for i in range(20)]) == list(range(1, 21))
    assert _direct_count() == before
