"""Client mode: a driver that cannot map any node's shared memory (on a host
without a node, or forced with FLOWCORE_CLIENT_MODE=1) keeps its objects in a
node's store over the connection: puts upload, gets download, in chunks."""
from __future__ import annotations

import numpy as np
import pytest

import flowcore
from flowcore.context import current_client

pytestmark = pytest.mark.timeout(120)


@flowcore.remote
def total(x):
    return float(x.sum()), flowcore.get_runtime_context().get_node_id()


@flowcore.remote
def make(n):
    return np.arange(n, dtype=np.float64)


def test_puts_and_gets_travel_over_the_wire(private_cluster, monkeypatch):
    monkeypatch.setenv("FLOWCORE_CLIENT_MODE", "1")
    cluster = private_cluster(2)
    client = current_client()
    assert client.remote_store and client.node is not None
    # 20 MB: bigger than one chunk, so the upload and download are pipelined
    x = np.random.default_rng(1).random(2_500_000)
    ref = flowcore.put(x)
    row = {o["object_id"]: o for o in flowcore.state.list_objects()}[ref.hex()]
    assert row["nodes"] and row["nodes"][0] in cluster.node_ids() and not row["inline"]
    # a task on either node reads it (pulled node to node when needed)
    sums = flowcore.get([total.options(scheduling_strategy="SPREAD").remote(ref)
                         for _ in range(4)], timeout=60)
    assert all(abs(s - float(x.sum())) < 1e-6 for s, _ in sums)
    assert {n for _, n in sums} == set(cluster.node_ids())
    # the driver reads its own put and task results back intact
    assert np.array_equal(flowcore.get(ref, timeout=60), x)
    for node in cluster.node_ids():
        pinned = make.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(3_000_000)
        assert np.array_equal(flowcore.get(pinned, timeout=60), np.arange(3_000_000.0))
    assert client.objects.mapping is None  # nothing was ever mapped from /dev/shm
    # a large argument is passed by reference (uploaded once, not inline)
    s, _ = flowcore.get(total.remote(x), timeout=60)
    assert abs(s - float(x.sum())) < 1e-6
