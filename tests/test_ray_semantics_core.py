"""Ray semantics that programs written for Ray rely on (core: scheduler,
node and client).  Each behaviour is checked on the state machines where
the decision lives, and through the public API on a real local cluster."""
from __future__ import annotations

import pytest

import flowcore
from flowcore.client.direct import ActorLink, DirectCalls
from flowcore.ids import IdSource, object_id

pytestmark = pytest.mark.timeout(90)

C = "client-1"


# ============================================== refs nested in call arguments
def _open_link() -> ActorLink:
    link = ActorLink(b"a" * 16)
    link.open, link.epoch, link.node = True, 0, "n1"
    return link


def test_a_call_with_refs_nested_in_its_arguments_goes_through_the_head() -> None:
    calls, src = DirectCalls(), IdSource()
    link = _open_link()
    spec = {"tid": src.task_id(), "actor": link.aid, "method": "h", "args": b"x",
            "deps": [], "nret": 1}
    assert calls.route(link, spec, {}, set(), C) is not None
    inner = object_id(src.task_id())
    assert calls.route(link, dict(spec, nested=[inner]), {}, set(), C) is None
    # a ready argument whose value holds refs (an own put, a direct answer)
    dep = object_id(src.task_id())
    container = {dep: {"oid": dep, "inline": b"v", "size": 1, "nested": True}}
    assert calls.route(link, dict(spec, deps=[dep]), container, set(), C) is None
    plain = {dep: {"oid": dep, "inline": b"v", "size": 1}}
    assert calls.route(link, dict(spec, deps=[dep]), plain, set(), C) is not None


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    flowcore.shutdown()
    info = flowcore.init(num_cpus=2, object_store_memory=128 << 20,
                         session_dir=str(tmp_path_factory.mktemp("semcore")))
    yield info
    flowcore.shutdown()


@flowcore.remote
def _plus_one(x):
    return x + 1


@flowcore.remote
class _Getter:
    def get_all(self, refs):
        return flowcore.get(refs)


def test_refs_nested_in_an_actor_calls_argument_live_until_it_ran(cluster2):
    a = _Getter.remote()
    flowcore.get(a.get_all.remote([]))  # the actor is up and calls may go directly
    for _ in range(40):
        # the caller keeps no ref to the inner objects: only the call does
        out = a.get_all.remote([_plus_one.remote(j) for j in range(4)])
        assert flowcore.get(out, timeout=60) == [1, 2, 3, 4]
    for _ in range(10):
        # a put whose value holds refs, passed as a top-level argument
        box = flowcore.put([_plus_one.remote(j) for j in range(3)])
        assert flowcore.get(a.get_all.remote(box), timeout=60) == [1, 2, 3]
        del box


# ============================================== async actors and max_concurrency
@flowcore.remote
class _AsyncRecorder:
    def __init__(self):
        import asyncio
        self.history = []
        self.gate = asyncio.Event()

    async def step(self):
        import asyncio
        self.history.append("S")
        await asyncio.sleep(0)
        self.history.append("E")

    async def wait_gate(self):
        await self.gate.wait()
        return "through"

    async def open_gate(self):
        self.gate.set()
        return "opened"

    def seen(self):
        return "".join(self.history)


def test_async_actor_with_max_concurrency_1_runs_one_call_at_a_time(cluster2):
    a = _AsyncRecorder.options(max_concurrency=1, num_cpus=0).remote()
    flowcore.get([a.step.remote() for _ in range(8)])
    assert flowcore.get(a.seen.remote()) == "SE" * 8


def test_async_actor_overlaps_calls_by_default(cluster2):
    a = _AsyncRecorder.options(num_cpus=0).remote()
    # the first call waits for the second: only overlapping calls finish
    waiting = a.wait_gate.remote()
    assert flowcore.get(a.open_gate.remote(), timeout=30) == "opened"
    assert flowcore.get(waiting, timeout=30) == "through"


# ============================================== get of a list fails fast
@flowcore.remote
def _boom():
    raise ValueError("boom")


@flowcore.remote
def _wait_for(sig):
    sig.wait()
    return 1


def test_get_of_a_list_raises_a_failure_without_waiting_for_the_others(cluster2):
    from flowcore.testing import Signal
    sig = Signal()
    try:
        pending = _wait_for.remote(sig)
        # the pending ref is released only after the failure is handled
        with pytest.raises(ValueError, match="boom"):
            flowcore.get([pending, _boom.remote()], timeout=60)
        sig.set()
        assert flowcore.get(pending, timeout=60) == 1
    finally:
        sig.set()
        sig.close()
