"""SPREAD tasks on workers leased from every node they spread over, the
node's spillback ("try node X"), and a lease asked back before its grant is
read (client/spread.py, client/leases.py, node/leases.py).

The decision rules are tested without IO; the rest on real two-node
clusters on 127.0.0.1."""
from __future__ import annotations

import time

import pytest

import flowcore
import flowcore.state
from flowcore.client.leases import ClientLease, LeaseTable, shape_of
from flowcore.client.spread import SpreadPlan, is_spread, spread_ready
from flowcore.cluster import LocalCluster
from flowcore.exceptions import TaskCancelledError
from flowcore.node.leases import spill_target
from flowcore.testing import Signal, wait_recorded


def _lease(lease: bytes, node: str, key: tuple = ((("CPU", 1.0),), None, "SPREAD")):
    return ClientLease({"lease": lease, "node": node, "wid": "w-" + node,
                        "address": "tcp://127.0.0.1:1"}, key, conn=None)


# ---------------------------------------------------------------- no IO
@pytest.mark.timeout(10)
def test_a_lease_asked_back_before_its_grant_is_read_comes_in_revoked():
    """The node may ask a lease back (``lease_revoke``) before the client
    has read its grant and added it (the grant and the revoke come in one
    read; the connection to the worker is opened in between): the lease is
    then added revoked, so its holder returns it at once instead of keeping
    it idle for the grace while the node waits for its CPU."""
    table = LeaseTable()
    assert table.revoke(b"L1") is None          # not held yet: remembered
    ls = _lease(b"L1", "a")
    table.add(ls)
    assert ls.revoked and not table.usable(ls.key)
    assert table.pick(ls.key) is None
    other = _lease(b"L2", "a")
    table.add(other)                            # no revoke for it: usable
    assert not other.revoked and table.pick(other.key) is other
    assert table.revoke(b"L2") is other and other.revoked
    # an early revoke is used once
    again = _lease(b"L1", "a")
    table.add(again)
    assert not again.revoked


@pytest.mark.timeout(10)
def test_spread_tasks_have_their_own_lease_shape():
    spec = {"tid": b"t", "fid": b"f", "res": {"CPU": 1.0}, "strategy": "SPREAD"}
    key = shape_of(spec)
    assert key is not None and is_spread(key)
    assert shape_of(dict(spec, strategy=None)) == ((("CPU", 1.0),), None)
    assert shape_of(dict(spec, strategy=["node", "n", False])) is None
    ready = {b"o1": {"inline": b"x"}, b"o2": {"nodes": ["a"]}, b"o3": {"inline": b"x",
                                                                       "error": True}}
    assert spread_ready(dict(spec, deps=[b"o1"]), ready)
    assert not spread_ready(dict(spec, deps=[b"o2"]), ready)   # in a store: not on any node
    assert not spread_ready(dict(spec, deps=[b"o3"]), ready)   # failed
    assert not spread_ready(dict(spec, deps=[b"o4"]), ready)   # not ready


@pytest.mark.timeout(10)
def test_spread_plan_asks_the_node_with_fewest_leases_and_sends_in_turn():
    plan = SpreadPlan()
    plan.set_nodes([{"node_id": "a", "address": "tcp://a", "alive": True},
                    {"node_id": "b", "address": "tcp://b", "alive": True},
                    {"node_id": "c", "address": "tcp://c", "alive": False}], now=0.0)
    key = ((("CPU", 1.0),), None, "SPREAD")
    assert plan.target(key, [], 0.0, here="b") == "b"        # a tie: this process's node
    la = _lease(b"1", "b")
    assert plan.target(key, [la], 0.0, here="b") == "a"      # fewest leases
    plan.declined_by(key, "a", 0.0)
    assert plan.target(key, [la], 0.1, here="b") == "b"      # a backs off
    plan.declined_by(key, "b", 0.1)
    assert plan.target(key, [la], 0.15, here="b") is None    # every node backs off
    assert plan.target(key, [la], 1.0, here="b") == "a"      # back-off over
    # a node with room whose worker is still starting is waited for, a while
    assert plan.wait_start(key, "a", 2.0) and plan.wait_start(key, "a", 3.0)
    assert not plan.wait_start(key, "a", 2.0 + 10)   # over: not waited for again soon
    assert plan.wait_start(key, "a", 20.0)           # (much later: once more)
    plan.granted(key, "a")
    assert not plan.starting
    # tasks go in turn over the nodes
    lb = _lease(b"2", "a")
    order = []
    for _ in range(4):
        ls = plan.pick([la, lb])
        plan.took(ls.node)
        order.append(ls.node)
    assert order in (["b", "a", "b", "a"], ["a", "b", "a", "b"])
    # spillback: followed to a live node other than the one asked, once
    assert plan.follow({"lease": None, "try": ["a", "tcp://a"]}, asked="b") == "a"
    assert plan.follow({"lease": None, "try": ["b", "tcp://b"]}, asked="b") is None
    assert plan.follow({"lease": None}, asked="b") is None
    assert plan.follow({"lease": None, "try": ["d", "tcp://d"]}, asked="b") == "d"


@pytest.mark.timeout(10)
def test_a_lease_table_sends_spread_tasks_to_its_nodes_in_turn():
    table = LeaseTable()
    key = ((("CPU", 1.0),), None, "SPREAD")
    table.spread.set_nodes([{"node_id": "a", "address": "tcp://a"},
                            {"node_id": "b", "address": "tcp://b"}], now=time.monotonic())
    la, lb = _lease(b"1", "a"), _lease(b"2", "b")
    table.add(la)
    table.add(lb)
    got = []
    for i in range(2):
        ls = table.pick(key)
        table.take(ls, {"tid": bytes([i]), "fid": b"f"})
        got.append(ls.node)
    assert sorted(got) == ["a", "b"]
    assert table.pick(key) is None  # both busy, no node declined: no task behind another
    table.answered(bytes([0]))
    assert table.pick(key).node == got[0]


@pytest.mark.timeout(10)
def test_spillback_names_a_node_the_heads_view_says_fits():
    rows = [{"node_id": "a", "address": "tcp://a", "alive": True,
             "resources_available": {"CPU": 0.0}},
            {"node_id": "b", "address": "tcp://b", "alive": True,
             "resources_available": {"CPU": 1.0}},
            {"node_id": "c", "address": "tcp://c", "alive": True,
             "resources_available": {"CPU": 3.0}},
            {"node_id": "d", "address": "tcp://d", "alive": False,
             "resources_available": {"CPU": 8.0}}]
    assert spill_target(rows, "a", {"CPU": 1.0}) == ("c", "tcp://c")
    assert spill_target(rows, "c", {"CPU": 1.0}) == ("b", "tcp://b")
    assert spill_target(rows, "a", {"CPU": 2.0}) == ("c", "tcp://c")
    assert spill_target(rows, "a", {"CPU": 4.0}) is None
    assert spill_target(rows, "a", {"CPU": 1.0, "gadget": 1.0}) is None


@pytest.mark.timeout(10)
def test_the_head_leaves_spread_tasks_queued_at_their_owner_to_its_leases():
    """The head spills owner-queued tasks to a node with room, but not
    SPREAD ones: their owner leases on every node they spread over."""
    from test_machine import Cluster
    from flowcore.scheduler.records import TaskState
    c = Cluster(validate=True)
    c.node("n1", CPU=1)
    spread = [dict(c.spec(), lease_q="n1", strategy="SPREAD") for _ in range(3)]
    plain = dict(c.spec(), lease_q="n1")
    c.submit(*spread, plain)
    out = c.node("n2", CPU=4)  # room on another node
    spills = [m for dest, m in out if m.get("op") == "lease_spill"]
    assert [m["tids"] for m in spills] == [[plain["tid"]]]
    assert all(c.state.tasks[t["tid"]].state == TaskState.QUEUED for t in spread)
    assert all(c.state.leases.at_owner(c.state.tasks[t["tid"]]) == "n1" for t in spread)
    # they run where their owner sends them
    c.state.handle("client-1", {"op": "lease_start", "lease": ["n2", "w9"],
                                "tids": [spread[0]["tid"]]})
    assert c.state.tasks[spread[0]["tid"]].state == TaskState.RUNNING
    assert c.state.tasks[spread[0]["tid"]].node == "n2"


# ---------------------------------------------------------------- real clusters
@pytest.fixture
def two_nodes(tmp_path):
    flowcore.shutdown()
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_memory=128 << 20,
                           session_dir=str(tmp_path / "s"))
    flowcore.init(address=cluster.address, token=cluster.token)
    yield cluster
    flowcore.shutdown()
    cluster.shutdown()


def _client():
    return flowcore.context.current_client()


@flowcore.remote(scheduling_strategy="SPREAD")
def where(i):
    return i, flowcore.get_runtime_context().get_node_id()


@flowcore.remote(scheduling_strategy="SPREAD", max_retries=3)
def nap_where(i, s):
    time.sleep(s)
    return i, flowcore.get_runtime_context().get_node_id()


@flowcore.remote(scheduling_strategy="SPREAD")
def hold(sig):
    sig.wait()
    return flowcore.get_runtime_context().get_node_id()


def _leased_nodes() -> set[str]:
    return {ls.node for ls in _client().leases.all()}


def _warm_spread(nodes: set[str], timeout: float = 60.0) -> None:
    """Run SPREAD bursts until the client holds leases on every node."""
    deadline = time.monotonic() + timeout
    while _leased_nodes() != nodes:
        assert time.monotonic() < deadline, f"leases only on {_leased_nodes()}"
        flowcore.get([where.remote(i) for i in range(50)], timeout=60)


@pytest.mark.timeout(120)
def test_a_spread_burst_runs_on_workers_leased_from_both_nodes(two_nodes):
    nodes = set(two_nodes.node_ids())
    _warm_spread(nodes)
    table = _client().leases
    sent0 = table.sent
    refs = [where.remote(i) for i in range(400)]
    got = flowcore.get(refs, timeout=60)
    assert [i for i, _ in got] == list(range(400))
    assert {n for _, n in got} == nodes
    assert table.sent - sent0 > 200  # most went to leased workers
    # the head recorded every task, where it ran
    wait_recorded(refs)
    rows = {t["task_id"]: t for t in flowcore.state.list_tasks()}
    by_node = {rows[r.task_id]["node_id"] for r in refs}
    assert by_node == nodes
    assert all(rows[r.task_id]["state"] == "FINISHED" for r in refs)
    causes = [e["cause"] for e in flowcore.state.task_events(100_000)
              if e["task_id"] in {r.task_id for r in refs}]
    assert any("leased worker" in c for c in causes)


@pytest.mark.timeout(120)
def test_a_node_that_cannot_fit_points_to_one_that_can(two_nodes):
    """Spillback: this process's node has no CPU free (an actor holds it),
    the lease request is answered "try node B" and followed once."""
    here = _client().node_id
    other = next(n for n in two_nodes.node_ids() if n != here)
    blocker = flowcore.remote(num_cpus=1)(_Blocker).options(
        scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(
            here, soft=False)).remote()
    assert flowcore.get(blocker.ping.remote(), timeout=60) == here
    links = _client()._node_links
    followed0 = links.followed
    deadline = time.monotonic() + 60
    # one task at a time: each asks a lease (of this node first, the node with fewest)
    # (a fresh node may decline the followed request once: no idle worker yet)
    while links.followed == followed0 or other not in _leased_nodes():
        assert time.monotonic() < deadline, "no spillback followed"
        links.plan.declined.clear()
        assert flowcore.get(where.remote(0), timeout=60)[1] == other
    assert here not in _leased_nodes()  # its node never granted one: it had no CPU
    flowcore.kill(blocker)


class _Blocker:
    def ping(self):
        return flowcore.get_runtime_context().get_node_id()


@pytest.mark.timeout(120)
def test_a_node_dying_under_its_spread_leases_loses_no_task(two_nodes):
    here = _client().node_id
    other = next(n for n in two_nodes.node_ids() if n != here)
    _warm_spread(set(two_nodes.node_ids()))
    refs = [nap_where.remote(i, 0.02) for i in range(200)]
    # wait until tasks run on the other node's leased worker, then kill it
    deadline = time.monotonic() + 60
    while not any(ls.node == other and ls.inflight for ls in _client().leases.all()):
        assert time.monotonic() < deadline, "nothing ran on the other node's lease"
        time.sleep(0.005)
    two_nodes.kill_node(other)
    got = flowcore.get(refs, timeout=90)
    assert [i for i, _ in got] == list(range(200))
    assert here in {n for _, n in got}
    assert not any(ls.node == other for ls in _client().leases.all())


@pytest.mark.timeout(120)
def test_cancel_of_spread_tasks_running_on_leases_of_both_nodes(two_nodes):
    nodes = set(two_nodes.node_ids())
    _warm_spread(nodes)
    sig = Signal()
    try:
        refs = [hold.remote(sig) for _ in range(2)]
        sig.wait_for_waiters(2, timeout=60)
        busy = {ls.node for ls in _client().leases.all() if ls.inflight}
        assert busy == nodes  # one on each node, both through leases
        for r in refs:
            flowcore.cancel(r)
        for r in refs:
            with pytest.raises(TaskCancelledError):
                flowcore.get(r, timeout=60)
        # the leases still serve
        assert {n for _, n in flowcore.get([where.remote(i) for i in range(50)],
                                           timeout=60)} <= nodes
    finally:
        sig.set()
        sig.close()


@pytest.mark.timeout(10)
def test_spread_tasks_use_leases_only_once_every_node_has_one():
    plan = SpreadPlan()
    key = ((("CPU", 1.0),), None, "SPREAD")
    assert not plan.covered(key, [], 0.0)  # no view of the nodes yet
    plan.set_nodes([{"node_id": "a", "address": "tcp://a"},
                    {"node_id": "b", "address": "tcp://b"}], now=0.0)
    la, lb = _lease(b"1", "a"), _lease(b"2", "b")
    assert not plan.covered(key, [la], 0.0)
    plan.declined_by(key, "b", 0.0)  # b has no room now: a alone covers it for a while
    assert plan.covered(key, [la], 0.1)
    assert not plan.covered(key, [la], 5.0)
    assert plan.covered(key, [la, lb], 5.0)
    lb.revoked = True
    assert not plan.covered(key, [la, lb], 5.0)
    # a node that could never run the shape is neither asked nor waited for
    small = SpreadPlan()
    small.set_nodes([{"node_id": "a", "address": "tcp://a", "resources_total": {"CPU": 2.0}},
                     {"node_id": "z", "address": "tcp://z", "resources_total": {"CPU": 0.0}}],
                    now=0.0)
    assert small.covered(key, [la], 0.0)
    assert small.target(key, [], 0.0, here="z") == "a"
    # while b's lease is still coming, a takes no more than b has
    plan.took("a")
    assert not plan.may_take(key, "a", 5.0) and plan.may_take(key, "b", 5.0)
    plan.declined_by(key, "b", 5.0)  # b declined: a goes on alone
    assert plan.may_take(key, "a", 5.1)
    plan.took("b")
    assert plan.may_take(key, "a", 10.0)


@pytest.mark.timeout(10)
def test_a_lease_table_waits_for_a_node_still_to_lease_before_crowding_one():
    table = LeaseTable()
    key = ((("CPU", 1.0),), None, "SPREAD")
    table.spread.set_nodes([{"node_id": "a", "address": "tcp://a"},
                            {"node_id": "b", "address": "tcp://b"}], now=time.monotonic())
    la = _lease(b"1", "a")
    table.add(la)
    first = table.pick(key)
    assert first is la
    table.take(la, {"tid": b"t0", "fid": b"f"})
    table.answered(b"t0")
    assert table.pick(key) is None  # a is idle, but b's lease is still to come
    lb = _lease(b"2", "b")
    table.add(lb)
    assert table.pick(key) is lb


@pytest.mark.timeout(10)
def test_more_nodes_than_leases_of_a_shape_do_not_stall_a_spread_burst():
    """With more live nodes than leases a shape may hold, the leases held
    take tasks (nothing more would come for the nodes left out)."""
    from flowcore.client.leases import MAX_LEASES
    table = LeaseTable()
    key = ((("CPU", 1.0),), None, "SPREAD")
    names = [f"n{i}" for i in range(MAX_LEASES + 2)]
    table.spread.set_nodes([{"node_id": n, "address": "tcp://" + n} for n in names],
                           now=time.monotonic())
    held = [_lease(bytes([i]), n) for i, n in enumerate(names[:MAX_LEASES])]
    for ls in held:
        table.add(ls)
    for i in range(3 * MAX_LEASES):
        ls = table.pick(key)
        assert ls is not None
        table.take(ls, {"tid": b"t%d" % i, "fid": b"f"})
        table.answered(b"t%d" % i)


@pytest.mark.timeout(10)
def test_a_node_says_starting_only_while_a_plain_worker_is_on_its_way():
    """The pool's side of a declined lease request: ``starting`` (ask again
    soon) only when the shape fits now and a plain worker is starting; a
    shape that does not fit is one to send on (spillback)."""
    from flowcore.node.pool import WorkerPool
    pool = WorkerPool({"CPU": 2.0}, min_workers=1)
    for a in pool.startup():
        pool.worker_ready(a[1], 100)
    assert pool.grant_lease(b"L1", {"CPU": 1.0}, None) is not None
    assert not pool.starting_for({"CPU": 1.0}, None)      # nothing starting yet
    pool.lease_declined({"CPU": 1.0}, None)               # starts one
    assert pool.starting_for({"CPU": 1.0}, None)
    assert not pool.starting_for({"CPU": 1.0}, "some-env")  # none of that env comes
    assert pool.can_fit_now({"CPU": 1.0}) and not pool.can_fit_now({"CPU": 2.0})
    assert not pool.starting_for({"CPU": 2.0}, None)      # does not fit: sent on instead
