"""put/get, zero-copy reads, reference counting and spilling through the public API."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pyarrow as pa
import pytest

import flowcore
from flowcore.objects.serialization import SerializationError

pytestmark = pytest.mark.timeout(60)


def _store_stats():
    client = flowcore.context.current_client()
    return client.request("node", {"op": "stats"})["store"]


def _until(pred, what, timeout=20.0):
    """Wait for a condition that another process brings about, woken by a
    round trip to the head each time (no sleeps)."""
    import time
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        flowcore.cluster_resources()  # a round trip: lets queued messages land


def test_put_get_small_values(cluster):
    for v in [1, "text", b"bytes", {"a": [1, 2]}, None, (1, 2.5), {3, 4}]:
        assert flowcore.get(flowcore.put(v)) == v


def test_put_rejects_refs(cluster):
    with pytest.raises(TypeError, match="ObjectRef"):
        flowcore.put(flowcore.put(1))


@pytest.mark.parametrize("dtype", ["float64", "int32", "bool", "datetime64[ns]", "uint8"])
def test_numpy_roundtrip_is_zero_copy_and_read_only(cluster, dtype):
    a = (np.arange(300_000) % 7).astype(dtype)
    ref = flowcore.put(a)
    b = flowcore.get(ref)
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable is False
    c = flowcore.get(ref)
    # both views read the same shared-memory bytes: no copy was made
    assert b.__array_interface__["data"][0] == c.__array_interface__["data"][0]
    with pytest.raises(ValueError):
        b[0] = b[1]


def test_non_contiguous_array_becomes_contiguous(cluster):
    a = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)[:, ::2]
    b = flowcore.get(flowcore.put(a))
    np.testing.assert_array_equal(a, b)
    assert b.flags.c_contiguous


def test_object_dtype_and_nested_containers(cluster):
    a = np.array([{"x": 1}, "s", 3], dtype=object)
    b = flowcore.get(flowcore.put(a))
    assert list(b) == list(a)
    big = {"arr": np.ones(200_000), "meta": [1, "two"]}
    out = flowcore.get(flowcore.put(big))
    assert out["meta"] == [1, "two"] and out["arr"].sum() == 200_000


def test_arrow_table_zero_copy(cluster):
    t = pa.table({"x": np.arange(200_000), "y": np.arange(200_000) * 2.0})
    ref = flowcore.put(t)
    out = flowcore.get(ref)
    assert out.equals(t)
    arr = flowcore.get(pa_array_ref := flowcore.put(pa.array(np.arange(100_000))))
    assert arr.to_pylist()[:3] == [0, 1, 2]
    del pa_array_ref


def test_large_array_as_task_argument(cluster):
    @flowcore.remote
    def total(x):
        assert not x.flags.writeable
        return float(x.sum())
    a = np.ones(2_000_000)
    ref = flowcore.put(a)
    assert flowcore.get([total.remote(ref) for _ in range(3)]) == [2e6] * 3
    # a large value passed directly goes through the store too
    assert flowcore.get(total.remote(a)) == 2e6


def test_large_task_result(cluster):
    @flowcore.remote
    def make(n):
        return np.full(n, 3.0)
    out = flowcore.get(make.remote(1_000_000))
    assert out.shape == (1_000_000,) and out[0] == 3.0 and not out.flags.writeable


def test_unserializable_value_names_type_and_path(cluster):
    value = {"cfg": [1, {"lock": threading.Lock()}]}
    with pytest.raises(TypeError) as ei:
        flowcore.put(value)
    msg = str(ei.value)
    assert "lock" in msg and "['cfg'][1]['lock']" in msg
    assert isinstance(ei.value, SerializationError)
    assert isinstance(ei.value, flowcore.exceptions.FlowcoreError)
    with pytest.raises(TypeError, match="lock"):
        @flowcore.remote
        def f(x):
            return x
        f.remote(value)


def _store_drained():
    """Earlier tests' objects are freed asynchronously (decref, then the
    head's delete): wait until they are gone before measuring."""
    gc.collect()
    _until(lambda: _store_stats()["used"] == 0, "earlier tests' objects to be freed")
    return 0


def test_objects_are_freed_when_refs_go(cluster):
    before = _store_drained()
    ref = flowcore.put(np.ones(5_000_000))
    assert _store_stats()["used"] >= before + 40_000_000
    del ref
    gc.collect()
    _until(lambda: _store_stats()["used"] <= before, "store memory to come back")


def test_views_pin_memory_until_dropped(cluster):
    before = _store_drained()
    ref = flowcore.put(np.ones(3_000_000))
    view = flowcore.get(ref)
    del ref
    gc.collect()
    # the ref is gone but a zero-copy view still reads the memory
    flowcore.cluster_resources()
    assert _store_stats()["used"] >= before + 24_000_000
    assert view.sum() == 3_000_000
    del view
    gc.collect()
    _until(lambda: _store_stats()["used"] <= before, "pinned memory to be freed")


def test_nested_refs_keep_their_objects_alive(cluster):
    inner = flowcore.put(np.arange(1_000_000))
    outer = flowcore.put({"inner": inner})
    del inner
    gc.collect()
    got = flowcore.get(outer)["inner"]
    assert flowcore.get(got)[-1] == 999_999


def test_head_tables_shrink_after_refs_drop(cluster):
    @flowcore.remote
    def one(i):
        return i
    refs = [one.remote(i) for i in range(200)]
    assert sum(flowcore.get(refs)) == sum(range(200))
    before = flowcore.context.current_client().query("counts")
    del refs
    gc.collect()
    _until(lambda: flowcore.context.current_client().query("counts")["tasks"]
           <= before["tasks"] - 200,
           "finished tasks to be pruned from the head")
