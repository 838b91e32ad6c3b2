"""Workers kept warm between bursts: once nothing is blocked any more, up to
``spare_workers`` extra idle workers stay for ``warm_grace`` (node/pool.py),
so the burst right after a nested one is leased workers already there; and
a lease holder whose last usable lease of a shape is asked back asks for a
new one at once (client/leases.py, ``LeaseTable``)."""
from __future__ import annotations

import time

import pytest

import flowcore
from flowcore.client.leases import ClientLease, LeaseTable

KEY = ((("CPU", 1.0),), None)


def _lease(lease: bytes) -> ClientLease:
    return ClientLease({"lease": lease, "node": "n1", "wid": "w-" + lease.hex(),
                        "address": "tcp://127.0.0.1:1"}, KEY, None)


def _saturated_table(*leases: bytes) -> tuple[LeaseTable, list[ClientLease], float]:
    """Leases held, and a request for more declined (a back-off)."""
    table = LeaseTable()
    held = [_lease(x) for x in leases]
    for ls in held:
        table.add(ls)
    now = time.monotonic()
    table.saturated.add(KEY)
    table.ask_after[KEY] = now + 60.0
    assert not table.wants(KEY, now)
    return table, held, now


# ---------------------------------------------------------------- IO-free: the client's table
def test_revoking_the_last_usable_lease_drops_the_saturated_back_off() -> None:
    table, _, now = _saturated_table(b"a", b"b")
    assert table.revoke(b"a") is not None
    assert not table.wants(KEY, now)  # b still takes tasks: the back-off holds
    assert table.revoke(b"b") is not None
    assert KEY not in table.saturated
    assert table.wants(KEY, now)  # the next task asks at once


def test_removing_the_last_lease_drops_the_saturated_back_off() -> None:
    table, held, now = _saturated_table(b"a")
    table.remove(held[0])
    assert table.wants(KEY, now)


def test_the_back_off_of_a_decline_with_no_lease_held_stays() -> None:
    """A request declined while no lease of the shape was held: its
    back-off is the node's "no room", not ours to drop."""
    table = LeaseTable()
    now = time.monotonic()
    table.ask_after[KEY] = now + 60.0
    ls = _lease(b"a")
    table.add(ls)
    table.revoke(b"a")
    table.remove(ls)
    assert not table.wants(KEY, now)


# ---------------------------------------------------------------- a real node
@flowcore.remote
def child(i: int) -> int:
    return i


@flowcore.remote
def parent(n: int) -> int:
    return sum(flowcore.get([child.remote(i) for i in range(n)]))


def _pool() -> dict:
    """The node's pool and lease counters (asked of it now, not a heartbeat's)."""
    return flowcore.context.current_client().request("node", {"op": "stats"})["pool"]


def _settles(pred, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.timeout(90)
def test_after_a_nested_burst_the_drivers_leases_take_workers_already_there(
        fresh_cluster, monkeypatch) -> None:
    monkeypatch.setenv("FLOWCORE_WORKER_WARM_GRACE", "60")  # (no timing in the test)
    fresh_cluster(num_cpus=2)
    assert flowcore.get(parent.remote(200), timeout=60) == sum(range(200))
    # nothing blocked or leased any more: the workers forked while the
    # parent was blocked stay, beside the warm pool (one per CPU), bounded
    # by the spare workers (2)
    assert _settles(lambda: (s := _pool())["blocked"] == 0 and s["busy"] == 0), _pool()
    snap = _pool()
    assert 3 <= snap["workers"] <= 4, snap
    forks, granted = snap["spawned"], snap["leases_granted"]
    assert sum(flowcore.get([child.remote(i) for i in range(300)], timeout=60)) \
        == sum(range(300))
    snap = _pool()
    assert snap["leases_granted"] > granted, snap  # the driver's burst was leased workers
    assert snap["spawned"] == forks, snap          # ... that were there: no fork
