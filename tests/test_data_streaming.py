"""A dataset four times the object store streams through map_batches and
iter_batches while the store stays under its cap."""
from __future__ import annotations

import numpy as np
import pytest

import flowcore
import flowcore.data as fd

STORE = 32 << 20


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    flowcore.shutdown()
    flowcore.init(num_cpus=2, object_store_memory=STORE,
                  session_dir=str(tmp_path_factory.mktemp("session")))
    yield
    flowcore.shutdown()


def _store_used() -> int:
    """Bytes of the objects in the store now (the head's live table), or
    the nodes' last reported use, whichever is larger."""
    live = sum(o["size"] for o in flowcore.state.list_objects()
               if not o["inline"] and o["state"] == "READY")
    reported = sum(n["store"]["used"] for n in flowcore.nodes() if n.get("alive"))
    return max(live, reported)


@pytest.mark.timeout(180)
def test_dataset_bigger_than_store_streams_under_cap(small_store):
    rows = 4 * STORE // 8 + 1000           # int64 ids: > 4x the store
    ds = fd.range(rows).map_batches(lambda b: {"id": b["id"] * 2})
    peak = 0
    seen = 0
    total = 0
    for i, batch in enumerate(ds.iter_batches(batch_size=65536)):
        seen += len(batch["id"])
        total += int(batch["id"][-1])
        if i % 4 == 0:
            peak = max(peak, _store_used())
    assert seen == rows
    assert total > 0
    assert 0 < peak < STORE, f"store use {peak} reached the cap {STORE}"
    stats = ds.stats()
    held = int(stats.rsplit("peak bytes held by the executor: ", 1)[1])
    assert held <= STORE, stats
    assert int(np.ceil(rows * 8 / STORE)) >= 4
