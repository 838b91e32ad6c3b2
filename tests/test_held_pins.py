"""Held pins (objects/held.py): a driver keeps the pin of a store object it
put or got while it holds a reference, so a repeat get is local; the pin
goes with the last reference (after the last view), and the node asks for
held pins back before it spills or falls back to disk."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import flowcore
from flowcore.context import current_client
from flowcore.objects.held import HeldObjects
from flowcore.objects.store import Location, ObjectStore

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


def _stats():
    return current_client().request("node", {"op": "stats"})["store"]


def _until(pred, what, timeout=20.0):
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {_stats()}")
        flowcore.cluster_resources()  # a round trip: lets queued messages land


def _no_pin_requests(client, monkeypatch):
    """Make any pin request from the driver fail the test."""
    real = client.request

    def request(dest, msg, timeout=60.0):
        assert msg.get("op") != "pin", "a held object's get asked the node for a pin"
        return real(dest, msg, timeout)
    monkeypatch.setattr(client, "request", request)


# ------------------------------------------------------------ bookkeeping, no cluster
def test_held_table_gives_the_pin_back_only_after_the_last_view():
    held = HeldObjects()
    loc = Location("/dev/shm/flowcore-x-1-arena", 0, 10)
    h = held.add(b"a", loc, "n1")
    assert h is not None and held.add(b"a", loc, "n1") is None  # one held pin per object
    assert held.lookup(b"a", "n2") is None  # another node's copy: not this pin
    found = held.lookup(b"a", "n1")
    assert found is not None
    woken = []
    release = held.on_release(h, found[1], lambda: woken.append(1))
    assert held.drop(b"a") is False  # a view is alive: the pin stays
    assert held.lookup(b"a", "n1") is None  # but no new view is made from it
    assert held.collect() == []
    release()
    assert woken == [1]
    assert held.collect() == [b"a"] and b"a" not in held
    assert held.drop(b"a") is False  # given back once only


def test_store_asks_for_held_pins_back_only_when_the_room_is_under_them(tmp_path):
    with ObjectStore("heldtest", "n", 4 * MiB, str(tmp_path / "spill")) as store:
        for i in (1, 2, 3):
            oid = bytes([i]) * 20
            store.create(oid, MiB, "c1")
            store.seal(oid)
            store.pin(oid, "c1", cached=True)
        assert store.cached_holders(MiB // 2) == {}  # fits in the free MiB
        plain = b"\x04" * 20
        store.create(plain, MiB // 2, "c2")
        store.seal(plain)
        store.pin(plain, "c2")  # a reader's pin: never asked for
        asked = store.cached_holders(MiB)
        assert asked == {"c1": [b"\x01" * 20]}  # least recently used first, just enough
        assert store.cached_holders(MiB) == {"c1": [b"\x02" * 20]}  # each asked once
        assert store.cached_holders(64 * MiB) == {}  # never fits: nothing to ask
        store.unpin(b"\x01" * 20, "c1")
        assert store.cached_by(b"\x03" * 20) == ["c1"]
        store.unpin(b"\x03" * 20, "c1")
        assert store.cached_by(b"\x03" * 20) == []


# ------------------------------------------------------------ through the API
def test_repeat_get_is_local_and_the_pin_goes_with_the_ref(fresh_cluster, monkeypatch):
    fresh_cluster()
    client = current_client()
    ref = flowcore.put(np.arange(MiB, dtype=np.int64))  # 8 MiB
    assert ref.binary() in client.objects.held
    _no_pin_requests(client, monkeypatch)
    for _ in range(3):
        v = flowcore.get(ref)
        assert v[-1] == MiB - 1 and not v.flags.writeable
    st = _stats()
    assert st["pinned_bytes"] >= 8 * MiB and st["used"] >= 8 * MiB
    del ref
    gc.collect()
    flowcore.cluster_resources()
    # the last view still reads the bytes: pinned and counted
    assert _stats()["used"] >= 8 * MiB and v.sum() == MiB * (MiB - 1) // 2
    del v
    gc.collect()
    _until(lambda: _stats()["used"] == 0 and _stats()["pinned_bytes"] == 0,
           "the held pin to go with the last reference and view")
    assert len(client.objects.held) == 0


def test_a_task_result_is_held_after_the_first_get(fresh_cluster):
    fresh_cluster()
    client = current_client()

    @flowcore.remote
    def make(n):
        return np.full(n, 7, dtype=np.int64)
    ref = make.remote(MiB)
    assert flowcore.get(ref)[0] == 7
    assert ref.binary() in client.objects.held  # the first get pinned it for good
    gc.collect()
    assert flowcore.get(ref)[-1] == 7
    del ref
    gc.collect()
    _until(lambda: _stats()["used"] == 0, "the result to be freed")


def test_the_node_takes_held_pins_back_to_spill_not_under_live_views(fresh_cluster):
    fresh_cluster(object_store_memory=64 << 20)
    client = current_client()
    refs = [flowcore.put(np.full(2 * MiB, i, dtype=np.int64)) for i in range(3)]  # 3 x 16 MiB
    view = flowcore.get(refs[1])  # a live view: its bytes must stay put
    more = [flowcore.put(np.full(2 * MiB, 10 + i, dtype=np.int64)) for i in range(3)]
    st = _stats()
    # room was made by spilling the held, unviewed objects: nothing went to disk files
    assert st["num_spilled"] >= 1 and st["fallback_bytes"] == 0, st
    assert refs[0].binary() not in client.objects.held  # given back when asked
    assert view[0] == 1 and view[-1] == 1 and int(view.sum()) == 2 * MiB
    for i, r in enumerate(refs + more):  # spilled ones come back on their next get
        a = flowcore.get(r)
        assert a[0] == a[-1] == (i if i < 3 else 10 + i - 3)
        del a
    del view, refs, more, r
    gc.collect()
    _until(lambda: _stats()["used"] == 0 and _stats()["num_objects"] == 0,
           "every object to be freed")


def test_pinned_by_live_views_still_falls_back_to_disk(fresh_cluster):
    fresh_cluster(object_store_memory=32 << 20)
    views = [flowcore.get(flowcore.put(np.full(MiB, i, dtype=np.int64)))
             for i in range(6)]  # 48 MiB, every one read by a live view
    assert _stats()["fallback_bytes"] > 0
    assert [int(v[0]) for v in views] == list(range(6))
    del views
    gc.collect()
    _until(lambda: _stats()["used"] == 0 and _stats()["num_objects"] == 0,
           "every object to be freed")


# ------------------------------------------------------------ workers
@flowcore.remote
def _first(x):
    return int(x[0])


@flowcore.remote
def _make(i):
    return np.full(MiB, i, dtype=np.int64)  # 8 MiB, stored


@pytest.fixture
def head_path(monkeypatch):
    """Tasks go through the head and the node (which pins their stored
    arguments for the worker it sends them to), not to leased workers."""
    from flowcore.client import leases
    monkeypatch.setattr(leases, "ENABLED", False)


def test_a_worker_holds_its_last_reads_within_its_bound_and_frees_with_the_refs(
        fresh_cluster, head_path):
    fresh_cluster(num_cpus=1)  # one worker reads them all
    made = [_make.remote(i) for i in range(7)]
    flowcore.wait(made, num_returns=7)
    # the driver never reads them: the pins are the worker's
    assert flowcore.get([_first.remote(r) for r in made]) == list(range(7))
    assert flowcore.get(_first.remote(made[6])) == 6  # a repeat: read from its held pin
    st = _stats()
    assert 8 * MiB <= st["pinned_bytes"] <= 4 * (8 * MiB + 4096), st  # FLOWCORE_WORKER_HELD
    del made
    gc.collect()
    # freed objects' held pins are asked back from the (idle) worker
    _until(lambda: _stats()["used"] == 0 and _stats()["num_objects"] == 0,
           "the worker's held pins to go with the objects")


def test_the_node_takes_a_workers_held_pins_back_to_spill(fresh_cluster, head_path):
    fresh_cluster(num_cpus=1, object_store_memory=64 << 20)
    made = [_make.remote(i) for i in range(2)]  # 2 x 8 MiB
    assert flowcore.get([_first.remote(r) for r in made]) == [0, 1]  # held by the worker
    more = [flowcore.put(np.full(2 * MiB, 10 + i, dtype=np.int64)) for i in range(3)]  # 48 MiB
    st = _stats()
    assert st["num_spilled"] >= 1 and st["fallback_bytes"] == 0, st
    assert flowcore.get([_first.remote(r) for r in made + more]) == [0, 1, 10, 11, 12]
    del made, more
    gc.collect()
    _until(lambda: _stats()["used"] == 0 and _stats()["num_objects"] == 0,
           "every object to be freed")
