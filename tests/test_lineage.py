"""The lineage memory bound through the public API: what no longer fits is
evicted oldest first, and losing its output then says so."""
from __future__ import annotations

import numpy as np
import pytest

import flowcore
from flowcore.exceptions import ObjectLostError

pytestmark = pytest.mark.timeout(120)


@flowcore.remote
def make(pad, value):
    return np.full(1 << 18, float(value))  # 2 MiB: kept in the node's store


def test_evicted_lineage_is_named_when_its_output_is_lost(private_cluster, monkeypatch):
    # each task below keeps ~5 kB of lineage (its inline argument); the head
    # may keep 8 kB, so only the newest task's lineage survives
    monkeypatch.setenv("FLOWCORE_LINEAGE_MEMORY", "8000")
    cluster = private_cluster(2)
    a, b = cluster.node_ids()
    on_b = make.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(b, soft=True))
    pad = b"p" * 5000
    old = on_b.remote(pad, 1)
    assert flowcore.wait([old], timeout=60, fetch_local=False)[1] == []  # kept first
    new = on_b.remote(pad, 2)
    assert flowcore.wait([new], timeout=60, fetch_local=False)[1] == []
    cluster.kill_node(b)
    # the newest lineage was kept: its output is rebuilt on the surviving node
    assert float(flowcore.get(new, timeout=60)[0]) == 2.0
    with pytest.raises(ObjectLostError) as ei:
        flowcore.get(old, timeout=60)
    assert ei.value.reason == "lineage_evicted"
    assert "FLOWCORE_LINEAGE_MEMORY" in str(ei.value) and "8000 bytes" in str(ei.value)
