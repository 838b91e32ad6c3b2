"""Several nodes on one machine through the public LocalCluster: placement,
object transfer between nodes (TCP), joining, authentication."""
from __future__ import annotations

import os
import time
import pickle
import socket

import numpy as np
import pytest

import flowcore
from flowcore.cluster import LocalCluster
from flowcore.exceptions import AuthenticationError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    flowcore.shutdown()
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_memory=256 << 20,
                           session_dir=str(tmp_path_factory.mktemp("multi")))
    flowcore.init(address=cluster.address, token=cluster.token)
    yield cluster
    flowcore.shutdown()
    cluster.shutdown()


@flowcore.remote
def where():
    return flowcore.get_runtime_context().get_node_id()


@flowcore.remote
def make(n, value):
    return np.full(n, float(value))


@flowcore.remote
def consume(a):
    return flowcore.get_runtime_context().get_node_id(), float(a.sum()), a.shape[0]


def test_nodes_join_and_are_listed(two_nodes):
    nodes = flowcore.nodes()
    assert len(nodes) == 2 and all(n["alive"] for n in nodes)
    assert {n["node_id"] for n in nodes} == set(two_nodes.node_ids())
    assert flowcore.cluster_resources()["CPU"] == 2.0
    for n in nodes:
        assert n["address"].startswith("tcp://127.0.0.1:")
        assert n["resources_total"]["CPU"] == 1.0


def test_spread_uses_every_node(two_nodes):
    spread = where.options(scheduling_strategy="SPREAD")
    seen = set(flowcore.get([spread.remote() for _ in range(8)], timeout=60))
    assert seen == set(two_nodes.node_ids())


def test_node_affinity(two_nodes):
    for nid in two_nodes.node_ids():
        pinned = where.options(
            scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(nid))
        assert set(flowcore.get([pinned.remote() for _ in range(3)], timeout=60)) == {nid}
    with pytest.raises(TypeError):
        flowcore.NodeAffinitySchedulingStrategy("")


def test_objects_move_between_nodes_intact(two_nodes):
    a, b = two_nodes.node_ids()
    on_b = make.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(b))
    ref = on_b.remote(6_250_000, 3)  # 50 MB held on node b
    # the driver is attached to node a: get pulls it over TCP
    arr = flowcore.get(ref, timeout=60)
    assert arr.shape == (6_250_000,) and float(arr.sum()) == 3 * 6_250_000
    # a task forced onto node a pulls it too
    on_a = consume.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(a))
    node, total, n = flowcore.get(on_a.remote(ref), timeout=60)
    assert node == a and total == 3 * 6_250_000 and n == 6_250_000
    # the head's object table lists both copies
    rows = [o for o in flowcore.state.list_objects() if o["object_id"] == ref.hex()]
    assert set(rows[0]["nodes"]) == {a, b}


def test_consumer_runs_where_its_big_argument_is(two_nodes):
    for nid in two_nodes.node_ids():
        produce = make.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(nid))
        big = produce.remote(6_250_000, 1)  # 50 MB
        flowcore.wait([big], timeout=60)
        node, total, _ = flowcore.get(consume.remote(big), timeout=60)
        assert node == nid and total == 6_250_000


def test_concurrent_requests_fetch_once(two_nodes):
    a, b = two_nodes.node_ids()
    on_b = make.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(b))
    ref = on_b.remote(2_000_000, 2)
    flowcore.wait([ref], timeout=60)
    on_a = consume.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(a))
    outs = flowcore.get([on_a.remote(ref) for _ in range(4)] + [ref], timeout=60)
    assert all(o[1] == 4_000_000 for o in outs[:4]) and outs[4][0] == 2.0


def test_node_added_mid_run_gets_work(two_nodes):
    nid = two_nodes.add_node(num_cpus=1, resources={"special": 1})
    assert nid in {n["node_id"] for n in flowcore.nodes()}
    assert flowcore.get(where.options(resources={"special": 1}).remote(), timeout=60) == nid
    assert flowcore.cluster_resources()["CPU"] == 3.0


def test_wrong_token_is_rejected(two_nodes):
    from flowcore.client.core import CoreClient
    bad = CoreClient(two_nodes.address, b"not-the-token", None)
    with pytest.raises(AuthenticationError):
        bad.start(timeout=10)
    bad.close()


def test_pickle_before_authentication_is_never_unpickled(two_nodes, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    payload = pickle.dumps(Evil())
    host, port = two_nodes.address[len("tcp://"):].rsplit(":", 1)
    for _ in range(2):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.settimeout(10)
            s.recv(41)  # the server's challenge
            s.sendall(payload + b"\x00" * 64)
            try:
                rest = s.recv(100)
            except ConnectionResetError:
                rest = b""
            assert rest[:1] in (b"\x00", b"")  # refused, then closed
    assert not marker.exists()
    assert flowcore.get(where.remote(), timeout=60)  # the head keeps serving


def test_lost_objects_are_rebuilt_from_lineage(private_cluster):
    cluster = private_cluster(2, object_store_memory=128 << 20)
    a, b = cluster.node_ids()
    prefer_b = flowcore.NodeAffinitySchedulingStrategy(b, soft=True)
    base = make.options(scheduling_strategy=prefer_b).remote(1_000_000, 2)   # 8 MB on b

    @flowcore.remote
    def double(x):
        return x * 2
    top = double.options(scheduling_strategy=prefer_b).remote(base)          # on b too
    assert flowcore.wait([top], timeout=60)[0] == [top]
    rows = {o["object_id"]: o for o in flowcore.state.list_objects()}
    assert rows[top.hex()]["nodes"] == [b] and rows[base.hex()]["nodes"] == [b]
    cluster.kill_node(b)
    # both were only on b: get re-runs make and double on a, in order
    out = flowcore.get(top, timeout=60)
    assert out.shape == (1_000_000,) and float(out[0]) == 4.0
    assert flowcore.explain(top)["state"] == "READY"
    events = [e["transition"] for e in flowcore.state.task_events(200)
              if e["task_id"] == top.task_id]
    assert "reconstruct_waiting" in events or "reconstruct" in events

    lost = flowcore.put(np.ones(1_000_000))  # a put cannot be re-run
    assert lost is not None


def test_put_objects_survive_the_loss_of_a_node(private_cluster):
    cluster = private_cluster(2, object_store_memory=128 << 20)
    a, b = cluster.node_ids()

    @flowcore.remote
    def put_here():
        return [flowcore.put(np.arange(1_000_000, dtype=np.float64))]  # 8 MB on b
    on_b = put_here.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(b))
    [ref] = flowcore.get(on_b.remote(), timeout=60)

    def copies():
        rows = [o for o in flowcore.state.list_objects() if o["object_id"] == ref.hex()]
        return set(rows[0]["nodes"]) if rows else set()
    deadline = time.monotonic() + 30
    while copies() != {a, b}:  # the second copy is made in the background
        assert time.monotonic() < deadline, copies()
    cluster.kill_node(b)
    arr = flowcore.get(ref, timeout=60)
    assert arr[-1] == 999_999.0


def test_actor_restarts_on_another_node_when_its_node_dies(private_cluster):
    cluster = private_cluster(2, object_store_memory=128 << 20)
    a, b = cluster.node_ids()

    @flowcore.remote(max_restarts=1)
    class Keeper:
        def __init__(self, start):
            self.n = start

        def bump(self):
            self.n += 1
            return self.n, flowcore.get_runtime_context().get_node_id()

    on_b = flowcore.NodeAffinitySchedulingStrategy(b, soft=True)
    k = Keeper.options(scheduling_strategy=on_b).remote(10)
    assert flowcore.get(k.bump.remote(), timeout=60) == (11, b)
    cluster.kill_node(b)
    # restarted on the surviving node with its original arguments
    assert flowcore.get(k.bump.remote(), timeout=60) == (11, a)
    row = [x for x in flowcore.state.list_actors() if x["actor_id"] == k.actor_id][0]
    assert row["restarts"] == 1 and row["node_id"] == a

    @flowcore.remote  # no restarts left for this one: it dies, naming the node
    class Once:
        def ping(self):
            return 1
    c = cluster.add_node(num_cpus=1)
    once = Once.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(c)).remote()
    assert flowcore.get(once.ping.remote(), timeout=60) == 1
    cluster.kill_node(c)
    with pytest.raises(flowcore.exceptions.ActorDiedError, match="node"):
        flowcore.get(once.ping.remote(), timeout=60)
