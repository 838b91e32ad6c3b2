"""Tests of the node object store (real /dev/shm, real files) and client mappings."""
from __future__ import annotations

import errno
import gc
import glob
import os
import subprocess
import sys
import threading
import uuid
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from flowcore.exceptions import ObjectStoreFullError
from flowcore.objects.mapping import StoreMapping
from flowcore.objects.serialization import deserialize, serialize
from flowcore.objects.store import Location, ObjectStore, sweep_stale_segments

KB = 1024
MB = 1024 * KB


def oid(n: int) -> bytes:
    return n.to_bytes(20, "big")


@pytest.fixture(autouse=True)
def no_leaked_files(tmp_path: Any) -> Any:
    mine = f"/dev/shm/flowcore-*-{os.getpid()}-arena"
    before = set(glob.glob(mine))
    yield
    gc.collect()
    assert set(glob.glob(mine)) == before, "test left an arena in /dev/shm"
    left = [p for p in glob.glob(str(tmp_path / "**" / "obj-*"), recursive=True)]
    assert left == [], f"test left spill/fallback files: {left}"


@pytest.fixture
def make_store(tmp_path: Any) -> Any:
    stores: list[ObjectStore] = []

    def make(capacity: int = 64 * KB) -> ObjectStore:
        s = ObjectStore(f"t{uuid.uuid4().hex[:10]}", "node-1", capacity,
                        str(tmp_path / f"spill{len(stores)}"))
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def mapping() -> Any:
    m = StoreMapping()
    yield m
    m.close()


def put(store: ObjectStore, mapping: StoreMapping, n: int, data: bytes,
        client: str = "w1") -> Location:
    loc = store.create(oid(n), len(data), client)
    view = mapping.writable(loc)
    view[:] = data
    view.release()
    store.seal(oid(n))
    return loc


def read(mapping: StoreMapping, loc: Location) -> bytes:
    return bytes(mapping.readable(loc, lambda: None))


# -- basics -----------------------------------------------------------------------
def test_arena_file_is_sparse_shared_memory_and_closed(make_store: Any) -> None:
    store = make_store(64 * 1024 * KB)
    assert store.path.startswith("/dev/shm/flowcore-") and store.path.endswith(
        f"-{os.getpid()}-arena")
    st = os.stat(store.path)
    assert st.st_size == 64 * 1024 * KB
    assert st.st_blocks * 512 < 1024 * KB  # not pre-touched
    store.close()
    assert not os.path.exists(store.path)
    store.close()  # idempotent


def test_create_seal_pin_read_delete(make_store: Any, mapping: StoreMapping) -> None:
    store = make_store()
    loc = put(store, mapping, 1, b"hello world")
    assert loc.path == store.path and loc.size == 11 and loc.offset % 64 == 0
    assert store.contains(oid(1)) and store.is_sealed(oid(1))
    assert store.size_of(oid(1)) == 11
    assert store.pin(oid(1), "w2") == loc
    assert read(mapping, loc) == b"hello world"
    st = store.stats()
    assert st["num_objects"] == 1 and st["pinned_bytes"] == 11 and st["used"] == 64
    store.unpin(oid(1), "w2")
    assert store.delete(oid(1))
    assert not store.contains(oid(1))
    assert store.stats()["used"] == 0
    assert not store.delete(oid(1))  # unknown: no-op


def test_state_errors(make_store: Any) -> None:
    store = make_store()
    store.create(oid(1), 10, "w1")
    with pytest.raises(ValueError, match="already exists"):
        store.create(oid(1), 10, "w1")
    with pytest.raises(ValueError, match="not sealed"):
        store.pin(oid(1), "w1")
    with pytest.raises(KeyError):
        store.pin(oid(2), "w1")
    with pytest.raises(KeyError):
        store.unpin(oid(1), "w9")
    store.seal(oid(1))
    with pytest.raises(ValueError, match="already sealed"):
        store.seal(oid(1))
    with pytest.raises(ValueError, match="sealed"):
        store.abort(oid(1))
    assert store.abort(oid(3)) is False


def test_abort_drops_unsealed_creation(make_store: Any) -> None:
    store = make_store()
    store.create(oid(1), 1000, "w1")
    assert store.stats()["used"] == 1024
    assert store.abort(oid(1))
    assert not store.contains(oid(1)) and store.stats()["used"] == 0


def test_freed_range_is_reused(make_store: Any) -> None:
    store = make_store()
    first = store.create(oid(1), 5000, "w1")
    store.seal(oid(1))
    store.delete(oid(1))
    again = store.create(oid(2), 5000, "w1")
    assert again.offset == first.offset


def test_a_large_create_knows_when_it_would_take_fresh_memory(make_store: Any) -> None:
    from flowcore.objects.store import EXPECT_FREE_MIN
    size = EXPECT_FREE_MIN
    store = make_store(4 * size)
    assert store.touched_end == 0 and store.fresh_memory(size)
    first = store.create(oid(1), size, "drv")
    store.seal(oid(1))
    store.pin(oid(1), "drv", cached=True)  # the writer's held pin (a put)
    assert store.touched_end == first.offset + size
    assert store.fresh_memory(size)  # the only memory used before is taken
    assert not store.free_expected(size)
    # another client's pin given back: no free expected
    store.pin(oid(1), "w1")
    store.unpin(oid(1), "w1")
    assert not store.free_expected(size)
    # its creator gives its last pin back (it dropped it): the head's
    # delete is expected, for objects of up to that size only
    store.unpin(oid(1), "drv")
    assert store.free_expected(size) and not store.free_expected(size + 1)
    assert not store.free_expected(size, within=-1.0)  # expectations age out (forgotten)
    assert not store.free_expected(size)
    store.pin(oid(1), "drv", cached=True)
    store.unpin(oid(1), "drv")
    assert store.free_expected(size)
    store.delete(oid(1))
    assert not store.free_expected(size) and not store.fresh_memory(size)
    again = store.create(oid(2), size, "drv")
    assert again.offset == first.offset and store.touched_end == first.offset + size
    # a small object: never expected
    store.create(oid(3), 1000, "drv")
    store.seal(oid(3))
    store.pin(oid(3), "drv", cached=True)
    store.unpin(oid(3), "drv")
    assert not store.free_expected(1)
    store.forget_expected()
    store.delete(oid(2))
    store.delete(oid(3))


def test_location_wire_roundtrip() -> None:
    loc = Location("/dev/shm/x", 128, 99)
    assert Location.from_wire(msgpack.unpackb(msgpack.packb(loc.to_wire()))) == loc
    for bad in (None, ["p", 1], ["p", -1, 3], [1, 2, 3]):
        with pytest.raises(ValueError):
            Location.from_wire(bad)


def test_capacity_beyond_shm_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="object_store_memory"):
        ObjectStore(f"t{uuid.uuid4().hex[:10]}", "n", 1 << 60, str(tmp_path / "s"))


# -- pins, delete, release -----------------------------------------------------------
def test_delete_while_pinned_frees_on_last_unpin(make_store: Any, mapping: Any) -> None:
    store = make_store()
    put(store, mapping, 1, b"x" * 100)
    store.pin(oid(1), "a")
    store.pin(oid(1), "a")
    store.pin(oid(1), "b")
    assert store.pin_count(oid(1)) == 3
    store.delete(oid(1))
    assert not store.contains(oid(1))
    with pytest.raises(KeyError):
        store.pin(oid(1), "c")  # doomed objects take no new pins
    store.unpin(oid(1), "a")
    store.unpin(oid(1), "b")
    assert store.stats()["used"] == 128
    store.unpin(oid(1), "a")
    assert store.stats()["used"] == 0
    assert store.stats()["num_objects"] == 0


def test_release_client_drops_pins_and_aborts_creations(make_store: Any, mapping: Any) -> None:
    store = make_store()
    put(store, mapping, 1, b"a" * 10, client="w1")
    store.pin(oid(1), "w2")
    store.pin(oid(1), "w2")
    store.create(oid(2), 10, "w2")  # never sealed: w2 dies mid-write
    store.delete(oid(1))
    store.release_client("w2")
    assert not store.contains(oid(2))
    assert store.stats()["num_objects"] == 0 and store.stats()["used"] == 0
    store.release_client("nobody")


def test_delete_of_unsealed_object_frees_at_seal(make_store: Any) -> None:
    store = make_store()
    store.create(oid(1), 10, "w1")
    store.delete(oid(1))
    store.seal(oid(1))
    assert store.stats()["num_objects"] == 0


# -- spilling and disk fallback ------------------------------------------------------
def test_lru_spill_and_restore(make_store: Any, mapping: StoreMapping) -> None:
    store = make_store(4 * KB)
    blobs = {i: bytes([i]) * KB for i in range(1, 5)}
    for i, data in blobs.items():
        put(store, mapping, i, data)
    store.pin(oid(1), "r")  # touch 1: now 2 is least recently used
    store.unpin(oid(1), "r")
    put(store, mapping, 5, b"\x05" * KB)
    spill = os.path.join(store.spill_dir, f"obj-{oid(2).hex()}")
    with open(spill, "rb") as f:
        assert f.read() == blobs[2]
    st = store.stats()
    assert st["num_spilled"] == 1 and st["spilled_bytes"] == KB
    # pinning the spilled object restores it (spilling the next LRU, 3)
    loc = store.pin(oid(2), "r")
    assert loc.path == store.path
    assert read(mapping, loc) == blobs[2]
    assert not os.path.exists(spill)
    assert os.path.exists(os.path.join(store.spill_dir, f"obj-{oid(3).hex()}"))
    store.unpin(oid(2), "r")
    store.delete(oid(3))  # deleting a spilled object removes its file
    assert not os.path.exists(os.path.join(store.spill_dir, f"obj-{oid(3).hex()}"))
    assert store.stats()["num_spilled"] == 0


def test_pinned_memory_forces_disk_fallback(make_store: Any, mapping: StoreMapping) -> None:
    store = make_store(4 * KB)
    for i in range(1, 5):
        put(store, mapping, i, bytes([i]) * KB)
        store.pin(oid(i), "r")
    loc = put(store, mapping, 5, b"\x05" * 3000)
    assert loc.path == os.path.join(store.spill_dir, f"obj-{oid(5).hex()}")
    assert loc.offset == 0 and os.path.getsize(loc.path) == 3000
    assert store.stats()["fallback_bytes"] == 3000
    assert store.stats()["num_spilled"] == 0  # pinned objects were not spilled
    got = store.pin(oid(5), "r")  # the arena is still pinned full: stays on disk
    assert got == loc and read(mapping, got) == b"\x05" * 3000
    store.unpin(oid(5), "r")
    store.delete(oid(5))
    assert not os.path.exists(loc.path)


def test_objects_larger_than_capacity_go_to_disk(make_store: Any, mapping: Any) -> None:
    store = make_store(4 * KB)
    put(store, mapping, 1, b"keep" * 10)
    loc = put(store, mapping, 2, b"z" * (10 * KB))
    assert loc.path != store.path
    assert store.stats()["num_spilled"] == 0  # nothing was spilled in vain
    assert store.read_chunk(oid(2), 5, 3) == b"zzz"


def test_spilled_object_pinned_while_arena_is_pinned_is_served_from_disk(
        make_store: Any, mapping: StoreMapping) -> None:
    store = make_store(2 * KB)
    put(store, mapping, 1, b"1" * KB)
    put(store, mapping, 2, b"2" * KB)
    put(store, mapping, 3, b"3" * KB)  # spills 1
    store.pin(oid(2), "r")
    store.pin(oid(3), "r")
    loc = store.pin(oid(1), "r")
    assert loc.path.endswith(f"obj-{oid(1).hex()}") and loc.offset == 0
    assert read(mapping, loc) == b"1" * KB


def test_disk_full_raises_store_full_error(make_store: Any, monkeypatch: Any) -> None:
    store = make_store(4 * KB)
    store.create(oid(1), 3 * KB, "w")  # unsealed: cannot be spilled

    def full(fd: int, off: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ObjectStoreFullError) as info:
        store.create(oid(2), 2 * KB, "w")
    msg = str(info.value)
    for part in (f"capacity {4 * KB}", f"used {3 * KB}", "pinned 0",
                 "object_store_memory", "free disk"):
        assert part in msg
    assert not store.contains(oid(2))
    assert os.listdir(store.spill_dir) == []


def test_chunk_io_for_transfers(make_store: Any) -> None:
    store = make_store(4 * KB)
    store.create(oid(1), 6, "peer")
    store.write_chunk(oid(1), 0, b"abc")
    store.write_chunk(oid(1), 3, b"def")
    with pytest.raises(ValueError):
        store.write_chunk(oid(1), 5, b"xy")
    store.seal(oid(1))
    assert store.read_chunk(oid(1)) == b"abcdef"
    with pytest.raises(ValueError):
        store.write_chunk(oid(1), 0, b"x")


def test_sweep_removes_only_dead_owners(tmp_path: Any) -> None:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    stale = tmp_path / f"flowcore-s-x-{dead}-arena"
    live = tmp_path / f"flowcore-s-x-{os.getpid()}-arena"
    other = tmp_path / "unrelated"
    for p in (stale, live, other):
        p.write_bytes(b"")
    assert sweep_stale_segments(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


# -- end to end with mappings ---------------------------------------------------------
def _store_array(store: ObjectStore, mapping: StoreMapping, n: int, arr: Any) -> Location:
    s = serialize(arr)
    loc = store.create(oid(n), s.total_size, "driver")
    view = mapping.writable(loc)
    s.write_to(view)
    view.release()
    store.seal(oid(n))
    return store.pin(oid(n), "reader")


def test_zero_copy_read_and_release_after_last_view(make_store: Any,
                                                     mapping: StoreMapping) -> None:
    store = make_store(4 * 1024 * KB)
    arr = np.random.default_rng(3).random(100_000)
    loc = _store_array(store, mapping, 1, arr)
    released: list[int] = []
    buf = mapping.readable(loc, lambda: (released.append(1), store.unpin(oid(1), "reader")))
    out = deserialize(buf)
    assert buf.readonly and buf.nbytes == loc.size
    address = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert address <= out.ctypes.data < address + buf.nbytes
    assert out.flags.writeable is False and np.array_equal(out, arr)
    view2 = buf[10:110]
    del buf
    gc.collect()
    assert released == []  # the array and a slice still use the memory
    del view2
    gc.collect()
    assert released == [] and mapping.live_readers() == 1
    del out
    gc.collect()
    assert released == [1] and mapping.live_readers() == 0
    assert store.pin_count(oid(1)) == 0


def test_release_may_happen_on_another_thread(make_store: Any, mapping: Any) -> None:
    store = make_store()
    loc = _store_array(store, mapping, 1, np.arange(1000))
    calls: list[str] = []
    box = [deserialize(mapping.readable(loc, lambda: calls.append(
        threading.current_thread().name)))]
    t = threading.Thread(target=box.clear, name="dropper")
    t.start()
    t.join(10)
    gc.collect()
    assert calls == ["dropper"]


def test_fallback_file_is_unmapped_after_last_reader(make_store: Any,
                                                      mapping: StoreMapping) -> None:
    store = make_store(4 * KB)
    arr = np.arange(2000, dtype=np.int64)  # 16 KB > capacity: disk fallback
    loc = _store_array(store, mapping, 1, arr)
    assert loc.path.startswith(store.spill_dir)
    released: list[int] = []
    out = deserialize(mapping.readable(loc, lambda: released.append(1)))
    assert loc.path in mapping.mapped_paths()
    assert np.array_equal(out, arr)
    del out
    gc.collect()
    assert released == [1]
    assert loc.path not in mapping.mapped_paths()


def test_mapping_close_keeps_memory_in_use_valid(make_store: Any) -> None:
    store = make_store()
    m = StoreMapping()
    loc = _store_array(store, m, 1, np.arange(500.0))
    out = deserialize(m.readable(loc, lambda: None))
    held = m.writable(store.create(oid(2), 100, "w"))
    m.close()  # the arena has a live reader and an exported view: left mapped
    assert out.sum() == np.arange(500.0).sum()
    held[:3] = b"abc"
    held.release()
    del out


def test_bad_location_is_rejected(make_store: Any, mapping: StoreMapping) -> None:
    store = make_store(4 * KB)
    with pytest.raises(ValueError, match="outside"):
        mapping.writable(Location(store.path, 4 * KB - 10, 100))
    released: list[int] = []
    empty = mapping.readable(Location(store.path, 0, 0), lambda: released.append(1))
    assert empty.nbytes == 0 and empty.readonly
    del empty
    assert released == [1]


@pytest.mark.timeout(30)
def test_repeated_put_cycle_keeps_one_arena(make_store: Any,
                                            mapping: StoreMapping) -> None:
    store = make_store(8 * 1024 * KB)
    arr = np.ones(500_000)
    offsets = set()
    for i in range(20):
        loc = _store_array(store, mapping, i, arr)
        offsets.add(loc.offset)
        assert deserialize(mapping.readable(loc, lambda: None)).sum() == arr.sum()
        gc.collect()
        store.unpin(oid(i), "reader")
        store.delete(oid(i))
    assert offsets == {0}
    assert store.stats()["used"] == 0


# -- random operation sequences -------------------------------------------------------
_ops = st.lists(st.tuples(
    st.sampled_from(["put"] * 4 + ["pin"] * 2 + ["unpin", "delete", "release"]),
    st.integers(0, 1500), st.sampled_from("ab")), min_size=10, max_size=50)


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_random_operations_keep_data_and_accounting(tmp_path: Any, ops: list) -> None:
    store = ObjectStore(f"t{uuid.uuid4().hex[:10]}", "n", 3 * KB, str(tmp_path / "rnd"))
    mapping = StoreMapping()
    data: dict[bytes, bytes] = {}
    pins: dict[tuple[bytes, str], int] = {}
    try:
        for n, (op, arg, client) in enumerate(ops):
            keys = sorted(data)
            if op == "put":
                blob = os.urandom(arg)
                put(store, mapping, n, blob, client)
                data[oid(n)] = blob
            elif keys and op == "pin":
                k = keys[arg % len(keys)]
                loc = store.pin(k, client)
                pins[k, client] = pins.get((k, client), 0) + 1
                assert read(mapping, loc) == data[k]
            elif pins and op == "unpin":
                k, c = sorted(pins)[arg % len(pins)]
                store.unpin(k, c)
                pins[k, c] -= 1
                if not pins[k, c]:
                    del pins[k, c]
            elif keys and op == "delete":
                k = keys[arg % len(keys)]
                store.delete(k)
                del data[k]
            elif op == "release" and arg % 4 == 0:
                store.release_client(client)
                pins = {kc: v for kc, v in pins.items() if kc[1] != client}
            for k, blob in data.items():
                assert store.read_chunk(k) == blob
            pinned = {k for k, _ in pins}
            st_ = store.stats()
            assert st_["num_objects"] == len(data | dict.fromkeys(pinned, b""))
            assert 0 <= st_["used"] <= store.capacity
            for k in pinned:  # pinned objects never move
                assert store.pin_count(k) == sum(v for (kk, _), v in pins.items() if kk == k)
        for (k, c), v in list(pins.items()):
            for _ in range(v):
                store.unpin(k, c)
        for k in list(data):
            store.delete(k)
        assert store.stats()["used"] == 0 and store.stats()["num_objects"] == 0
        assert os.listdir(store.spill_dir) == []
    finally:
        mapping.close()
        store.close()
    assert not os.path.exists(store.path) and not os.path.exists(store.spill_dir)


def test_second_store_with_same_session_in_one_process_is_refused(make_store: Any,
                                                                   tmp_path: Any) -> None:
    first = make_store()
    with pytest.raises(FileExistsError):
        ObjectStore(first.session_id, "node-2", 4 * KB, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()
    assert os.path.exists(first.path)


def test_reader_exporters_cover_the_object_inside_the_mapping() -> None:
    from flowcore.objects.mapping import _exporter_span
    lengths = set()
    for map_size in (4096, 10_000, 1 << 20):
        for offset, size in ((0, 1), (0, map_size), (64, 100), (map_size - 100, 100),
                             (map_size // 2, map_size // 2), (3, map_size - 3), (7, 0)):
            start, length = _exporter_span(offset, size, map_size)
            assert 0 <= start <= offset and offset + size <= start + length <= map_size
            lengths.add(length)
    # power-of-two lengths (or a whole mapping): ctypes keeps one array type
    # per length for the life of the process, so the set must stay small
    assert all(n & (n - 1) == 0 or n in (4096, 10_000, 1 << 20) for n in lengths)


def test_reader_view_has_exactly_the_object(make_store: Any, mapping: StoreMapping) -> None:
    store = make_store(64 * KB)
    store.create(oid(1), 1000, "w")
    mapping.writable(store.location(oid(1)))[:] = bytes(range(256)) * 3 + bytes(232)
    store.seal(oid(1))
    loc = store.pin(oid(1), "reader")
    view = mapping.readable(loc, lambda: None)
    assert view.readonly and view.format == "B" and view.nbytes == 1000
    assert bytes(view[:256]) == bytes(range(256))
    with pytest.raises(TypeError):
        view[0] = 1



def test_a_put_deleted_before_its_seal_keeps_the_writers_pin(make_store: Any) -> None:
    """The head's delete of a put whose references all went can reach the
    node before the writer's seal (another connection).  A seal that pins
    for its writer pins before the delete can free it: the writer reads the
    bytes already, so no new object may take them until it unpins."""
    s = make_store(4 * MB)
    oid = b"p" * 20
    loc = s.create(oid, 2 * MB, "writer")
    s.write_chunk(oid, 0, b"x" * (2 * MB))
    assert s.delete(oid)          # the head's delete first: doomed, not freed
    s.seal(oid, pin_for="writer")  # then the seal that pins for its writer
    assert s.pin_count(oid, "writer") == 1
    assert s.read_chunk(oid, 0, 4) == b"xxxx"
    # new objects cannot take the pinned bytes: one fits beside them, the next not
    beside = s.create(b"q" * 20, 2 * MB, "b")
    assert beside.path == loc.path and beside.offset != loc.offset
    assert s.create(b"r" * 20, 2 * MB, "b").path != loc.path  # (the disk fallback)
    s.unpin(oid, "writer")        # the writer's last view went: freed now
    with pytest.raises(KeyError):
        s.pin_count(oid)
    assert s.create(b"s" * 20, 2 * MB, "b") == loc  # its bytes are free again
