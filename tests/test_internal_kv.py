"""flowcore.experimental.internal_kv through a real cluster (the head's
table), from the driver and from a worker; the table without IO."""
from __future__ import annotations

import pytest

import flowcore
from flowcore.experimental import internal_kv as kv
from flowcore.scheduler.kv import KVTable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster():
    flowcore.shutdown()
    flowcore.init(num_cpus=1)
    yield
    flowcore.shutdown()


def test_put_get_exists_del_list(cluster):
    assert kv._internal_kv_initialized()
    assert kv._internal_kv_get("t1/a") is None
    assert kv._internal_kv_exists("t1/a") is False
    assert kv._internal_kv_put("t1/a", "one") is False  # did not exist
    assert kv._internal_kv_put(b"t1/a", b"uno") is True  # existed, overwritten
    assert kv._internal_kv_get("t1/a") == b"uno"
    assert kv._internal_kv_put("t1/a", "third", overwrite=False) is True
    assert kv._internal_kv_get("t1/a") == b"uno"  # not overwritten
    kv._internal_kv_put("t1/b", b"\x00\xff")
    kv._internal_kv_put("t2/c", "x")
    assert kv._internal_kv_exists("t1/b")
    assert kv._internal_kv_list("t1/") == [b"t1/a", b"t1/b"]
    assert kv._internal_kv_del("t1/a") == 1
    assert kv._internal_kv_del("t1/a") == 0
    assert kv._internal_kv_get("t1/a") is None
    assert kv._internal_kv_del("t", del_by_prefix=True) == 2
    assert kv._internal_kv_list("t") == []


def test_namespaces_are_separate(cluster):
    kv._internal_kv_put("k", "default")
    kv._internal_kv_put("k", "in a", namespace="a")
    kv._internal_kv_put("k", "in b", namespace=b"b")
    assert kv._internal_kv_get("k") == b"default"
    assert kv._internal_kv_get("k", namespace="a") == b"in a"
    assert kv._internal_kv_get("k", namespace="b") == b"in b"
    assert kv._internal_kv_list("", namespace="a") == [b"k"]
    assert kv._internal_kv_del("k", namespace="a") == 1
    assert not kv._internal_kv_exists("k", namespace="a")
    assert kv._internal_kv_get("k", namespace="b") == b"in b"
    kv._internal_kv_del("k")
    kv._internal_kv_del("k", namespace="b")


@flowcore.remote
def kv_from_worker(key):
    from flowcore.experimental import internal_kv
    before = internal_kv._internal_kv_get(key, namespace="w")
    internal_kv._internal_kv_put(key, b"from the worker", namespace="w")
    return before


def test_workers_see_the_same_table(cluster):
    kv._internal_kv_put("shared", "from the driver", namespace="w")
    assert flowcore.get(kv_from_worker.remote("shared"), timeout=60) == b"from the driver"
    assert kv._internal_kv_get("shared", namespace="w") == b"from the worker"
    kv._internal_kv_del("shared", namespace="w")


def test_limits_and_bad_input_are_clear_errors(cluster):
    with pytest.raises(ValueError, match="over the limit of 1048576 bytes"):
        kv._internal_kv_put("big", b"x" * ((1 << 20) + 1))
    assert not kv._internal_kv_exists("big")
    assert kv._internal_kv_put("big", b"x" * (1 << 20)) is False  # exactly the limit fits
    assert kv._internal_kv_del("big") == 1
    with pytest.raises(TypeError, match="key must be bytes or str"):
        kv._internal_kv_put(3, "x")
    with pytest.raises(TypeError, match="value must be bytes or str"):
        kv._internal_kv_put("k", {"a": 1})
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        kv._internal_kv_put("k", "v", "no")


def test_table_total_cap_and_accounting():
    t = KVTable(max_value=100, max_total=250)
    assert t.put(b"", b"a", b"x" * 100) is False
    assert t.put(b"n", b"b", b"y" * 100) is False
    assert t.total == 202
    with pytest.raises(ValueError, match="internal_kv is full"):
        t.put(b"", b"c", b"z" * 50)
    assert t.put(b"", b"a", b"x" * 10) is True  # shrinking always fits
    assert t.total == 112
    assert t.put(b"", b"c", b"z" * 50) is False
    assert t.delete(b"", b"", by_prefix=True) == 2
    assert t.total == 101 and t.data == {b"n": {b"b": b"y" * 100}}
    # persisted rows leave out the dashboard's namespace
    t.put(b"dashboard", b"serve", b"{}")
    assert t.dump() == [[b"n", b"b", b"y" * 100]]
    u = KVTable()
    u.restore(t.dump())
    assert u.get(b"n", b"b") == b"y" * 100 and u.total == t.total - len(b"serve{}")


@pytest.mark.timeout(180)
def test_keys_survive_a_head_restart_but_dashboard_views_do_not(private_cluster, monkeypatch):
    import os
    import time
    monkeypatch.setenv("FLOWCORE_HEAD_RECOVERY", "20")
    monkeypatch.setenv("FLOWCORE_HEAD_GRACE", "60")
    flowcore.shutdown()
    cluster = private_cluster(1)
    kv._internal_kv_put("config", b"v1", namespace="app")
    kv._internal_kv_put("serve", b"{}", namespace="dashboard")
    state_file = os.path.join(cluster.session_dir,
                              f"head-{cluster.address.rsplit(':', 1)[1]}", "tables.msgpack")
    deadline = time.monotonic() + 30
    while not (os.path.exists(state_file) and b"config" in open(state_file, "rb").read()):
        assert time.monotonic() < deadline, "the key never reached the persisted tables"
        time.sleep(0.05)  # the tables are flushed every 0.2 s
    assert os.stat(state_file).st_mode & 0o077 == 0
    cluster.kill_head()
    cluster.restart_head()
    deadline = time.monotonic() + 60
    while True:
        try:
            value = kv._internal_kv_get("config", namespace="app")
            break
        except Exception:  # noqa: BLE001 - the head is coming back
            assert time.monotonic() < deadline, "the head did not come back"
            time.sleep(0.1)
    assert value == b"v1"
    assert kv._internal_kv_get("serve", namespace="dashboard") is None
