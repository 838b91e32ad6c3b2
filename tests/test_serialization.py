"""Tests of the object layout, zero-copy pickling and error reporting."""
from __future__ import annotations

import gc
import glob
import mmap
import os
import pickle
import struct
import threading
import weakref
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from flowcore.objects import serialization as ser
from flowcore.objects.serialization import (
    SerializationError, deserialize, note_contained_ref, read_layout, serialize)


@pytest.fixture(autouse=True)
def no_leaked_shm() -> Any:
    mine = f"/dev/shm/flowcore-*-{os.getpid()}-*"
    before = set(glob.glob(mine))
    yield
    assert set(glob.glob(mine)) == before, "test left shared-memory files behind"


class FakeRef:
    """Stands in for ObjectRef: its __reduce__ reports the contained id."""

    def __init__(self, oid: bytes) -> None:
        self.oid = oid

    def __reduce__(self) -> Any:
        note_contained_ref(self.oid)
        return (FakeRef, (self.oid,))


class Token:
    """A weak-referenceable owner of memory, to watch lifetimes."""

    def __init__(self, data: Any) -> None:
        self.data = data


def _inside(arr_or_addr: Any, buf: pa.Buffer) -> bool:
    addr = arr_or_addr if isinstance(arr_or_addr, int) else arr_or_addr.ctypes.data
    return buf.address <= addr < buf.address + buf.size


def assert_arrow_inside(out: Any, buf: pa.Buffer) -> None:
    """Every data buffer of Arrow value ``out`` lies inside ``buf`` (zero copy)."""
    if isinstance(out, pa.Table):
        arrays = [c for col in out.columns for c in col.chunks]
    elif isinstance(out, pa.RecordBatch):
        arrays = list(out.columns)
    elif isinstance(out, pa.ChunkedArray):
        arrays = list(out.chunks)
    else:
        arrays = [out]
    addrs = [b.address for a in arrays for b in a.buffers() if b is not None and b.size]
    assert addrs and all(_inside(a, buf) for a in addrs)


def roundtrip(value: Any) -> Any:
    s = serialize(value)
    data = s.to_bytes()
    assert len(data) == s.total_size
    dest = bytearray(s.total_size + 17)
    s.write_to(memoryview(dest))
    assert bytes(dest[:s.total_size]) == data
    return deserialize(data)


@pytest.mark.parametrize("value", [
    None, 0, -5, 2 ** 100, 1.5, "text", b"bytes", [1, [2, (3,)]], {"a": {1, 2}},
    {"nested": [{"x": np.arange(3)}]}, frozenset({1, 2}),
])
def test_roundtrip_plain_values(value: Any) -> None:
    out = roundtrip(value)
    if isinstance(value, dict) and "nested" in value:
        assert np.array_equal(out["nested"][0]["x"], value["nested"][0]["x"])
    else:
        assert out == value


@pytest.mark.parametrize("arr", [
    np.arange(1000, dtype=np.float64),
    np.arange(24, dtype=np.int32).reshape(2, 3, 4),
    np.ones(100, dtype=bool),
    np.arange(100).astype("datetime64[ns]"),
    np.arange(100).astype("timedelta64[s]"),
    np.zeros(10, dtype=[("x", "f8"), ("y", "i2")]),
    np.array(["ab", "c"]),
    np.zeros((3, 0)),
    np.array(3.5),
    np.asfortranarray(np.arange(12.0).reshape(3, 4)),
])
def test_numpy_arrays_are_out_of_band(arr: np.ndarray) -> None:
    s = serialize(arr)
    assert len(s.buffers) == 1
    assert len(s.pickle) < 400  # the data is not in the pickle stream
    out = deserialize(s.to_bytes())
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert out.flags.writeable is False


@pytest.mark.parametrize("arr", [
    np.arange(64.0).reshape(8, 8)[:, ::2],
    np.arange(64.0).reshape(8, 8)[::3, 1::2].T,
    np.arange(100).astype("datetime64[ms]")[::7],
])
def test_non_contiguous_arrays_are_made_contiguous(arr: np.ndarray) -> None:
    assert not arr.flags.c_contiguous and not arr.flags.f_contiguous
    s = serialize({"k": [arr]})
    assert len(s.buffers) == 1
    out = deserialize(s.to_bytes())["k"][0]
    assert np.array_equal(out, arr) and out.flags.c_contiguous


def test_object_arrays_pickle_in_band() -> None:
    arr = np.array([1, "a", None], dtype=object)
    s = serialize(arr)
    assert s.buffers == []
    assert list(deserialize(s.to_bytes())) == [1, "a", None]


def test_numpy_zero_copy_from_pyarrow_buffer_keeps_it_alive() -> None:
    arr = np.random.default_rng(0).random(100_000)
    data = serialize(arr).to_bytes()
    owner = Token(bytearray(data))
    alive = weakref.ref(owner)
    inner = pa.py_buffer(owner.data)
    buf = pa.foreign_buffer(inner.address, inner.size, base=owner)
    out = deserialize(buf)
    assert _inside(out, buf)
    assert out.flags.writeable is False
    del owner, inner, buf
    gc.collect()
    assert alive() is not None  # the array's base chain keeps the buffer alive
    assert np.array_equal(out, arr)
    del out
    gc.collect()
    assert alive() is None


def test_numpy_zero_copy_from_memoryview_and_readonly() -> None:
    arr = np.arange(10_000, dtype=np.int64)
    raw = bytearray(serialize(arr).to_bytes())  # writable source
    out = deserialize(memoryview(raw))
    lo = np.frombuffer(raw, np.uint8).ctypes.data
    assert lo <= out.ctypes.data < lo + len(raw)
    assert out.flags.writeable is False
    with pytest.raises(ValueError):
        out[0] = 1


def test_mutable_pyarrow_buffer_still_yields_readonly_arrays() -> None:
    arr = np.arange(1000.0)
    raw = bytearray(serialize(arr).to_bytes())
    buf = pa.py_buffer(raw)
    assert buf.is_mutable
    out = deserialize(buf)
    assert out.flags.writeable is False and _inside(out, buf)


def test_buffers_are_aligned_within_layout() -> None:
    s = serialize([np.arange(3, dtype=np.int8), np.arange(5.0), b"x" * 10])
    layout = read_layout(s.to_bytes())
    assert len(layout.buffers) == 2
    for off, _ in layout.buffers:
        assert off % ser.ALIGNMENT == 0


@pytest.mark.parametrize("make", [
    lambda: pa.table({"a": np.arange(10_000), "b": np.random.default_rng(1).random(10_000),
                      "s": [str(i) for i in range(10_000)]}),
    lambda: pa.record_batch({"a": np.arange(10_000)}),
    lambda: pa.array(np.arange(10_000.0)),
    lambda: pa.chunked_array([np.arange(5_000), np.arange(5_000)]),
], ids=["table", "record_batch", "array", "chunked_array"])
def test_arrow_data_comes_back_zero_copy(make: Any) -> None:
    value = make()
    s = serialize(value)
    assert len(s.pickle) < 4096 and s.buffers  # data is out of band
    buf = pa.py_buffer(s.to_bytes())
    out = deserialize(buf)
    assert out.equals(value)
    assert_arrow_inside(out, buf)


def test_parallel_copy_takes_every_piece_once_whatever_the_threads() -> None:
    from flowcore.objects import serialization as ser
    n = 3 * ser._COPY_PIECE + 12345  # pieces of unequal size
    src = np.frombuffer(np.random.default_rng(3).bytes(n), dtype=np.uint8)
    for threads in (2, 3, 4, 9):
        dst = np.zeros(n, dtype=np.uint8)
        ser._copy(dst, src, threads)
        assert np.array_equal(dst, src), threads


def test_layout_into_real_shared_memory() -> None:
    arr = np.random.default_rng(2).random(3_000_000)  # 24 MB: parallel copy path
    s = serialize(arr)
    path = f"/dev/shm/flowcore-sertest-{os.getpid()}-x"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, s.total_size)
        mm = mmap.mmap(fd, s.total_size)
        view = memoryview(mm)
        s.write_to(view, threads=3)
        assert np.array_equal(deserialize(bytes(view)), arr)
        view.release()
        mm.close()
    finally:
        os.close(fd)
        os.unlink(path)


def test_write_to_checks_destination() -> None:
    s = serialize(np.arange(10))
    with pytest.raises(ValueError, match="need"):
        s.write_to(memoryview(bytearray(s.total_size - 1)))
    with pytest.raises(ValueError, match="read-only"):
        s.write_to(memoryview(bytes(s.total_size)))


# -- contained ObjectRefs ------------------------------------------------------
def test_contained_refs_are_collected_in_order_without_duplicates() -> None:
    a, b = FakeRef(b"a" * 20), FakeRef(b"b" * 20)
    s = serialize({"x": [a, (b, FakeRef(b"a" * 20))], "y": a})
    assert s.contained_refs == [b"a" * 20, b"b" * 20]
    out = deserialize(s.to_bytes())
    assert out["x"][1][0].oid == b"b" * 20
    assert serialize([1, 2]).contained_refs == []


def test_note_outside_serialize_is_a_noop() -> None:
    note_contained_ref(b"z" * 20)
    pickle.dumps(FakeRef(b"q" * 20))
    assert serialize(1).contained_refs == []


def test_nested_serialize_keeps_collections_apart() -> None:
    class Outer:
        def __reduce__(self) -> Any:
            inner = serialize(FakeRef(b"i" * 20))
            assert inner.contained_refs == [b"i" * 20]
            note_contained_ref(b"o" * 20)
            return (int, (0,))

    s = serialize([FakeRef(b"1" * 20), Outer(), FakeRef(b"2" * 20)])
    assert s.contained_refs == [b"1" * 20, b"o" * 20, b"2" * 20]


def test_concurrent_serialize_on_threads_does_not_mix() -> None:
    barrier = threading.Barrier(2, timeout=10)

    class Sync:
        def __reduce__(self) -> Any:
            barrier.wait()  # both threads are inside serialize now
            return (int, (0,))

    results: dict[str, list] = {}

    def run(tag: str) -> None:
        refs = [FakeRef(tag.encode() * 20), Sync(), FakeRef(tag.encode() * 19 + b"!")]
        results[tag] = serialize(refs).contained_refs

    threads = [threading.Thread(target=run, args=(t,)) for t in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {"x": [b"x" * 20, b"x" * 19 + b"!"],
                       "y": [b"y" * 20, b"y" * 19 + b"!"]}


# -- unpicklable values ----------------------------------------------------------
class Holder:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.name = "db"


class Slotted:
    __slots__ = ("handle",)

    def __init__(self, handle: Any) -> None:
        self.handle = handle


class WithLambda:
    def __init__(self) -> None:
        self.fn = lambda x: x + 1


def test_error_names_type_and_path_in_containers() -> None:
    value = [1, 2, {"cfg": {"lock": threading.Lock()}}]
    with pytest.raises(SerializationError) as info:
        serialize(value)
    msg = str(info.value)
    assert "_thread.lock" in msg
    assert "value[2]['cfg']['lock']" in msg
    assert "inside the task" in msg
    assert isinstance(info.value, TypeError)


def test_error_path_through_attributes_and_slots() -> None:
    with pytest.raises(TypeError) as info:
        serialize({"cfg": Holder(threading.Lock())})
    assert "value['cfg'].conn" in str(info.value)
    with pytest.raises(TypeError) as info:
        serialize((0, Slotted(threading.RLock())))
    assert "value[1].handle" in str(info.value) and "RLock" in str(info.value)


def test_error_path_through_closure() -> None:
    lock = threading.Lock()

    def task() -> Any:
        return lock

    with pytest.raises(SerializationError, match="closure variable 'lock'"):
        serialize({"f": task})


def test_error_in_custom_reduce_names_the_object() -> None:
    class Bad:
        def __reduce__(self) -> Any:
            raise RuntimeError("nope")

    with pytest.raises(SerializationError, match=r"Bad at value\[0\]\[1\].*nope"):
        serialize([(1, Bad())])
    assert serialize(1).contained_refs == []  # the collector was reset


def test_lambda_holding_object_is_fine_with_cloudpickle() -> None:
    out = roundtrip({"obj": WithLambda()})
    assert out["obj"].fn(1) == 2


# -- malformed layouts ------------------------------------------------------------
def _valid() -> bytes:
    return serialize({"a": np.arange(10)}).to_bytes()


def test_decoder_rejects_malformed_layouts() -> None:
    good = _valid()
    with pytest.raises(ValueError, match="magic"):
        deserialize(b"XXXX" + good[4:])
    with pytest.raises(ValueError, match="past the end"):
        deserialize(good[:-1])
    with pytest.raises(ValueError, match="shorter"):
        deserialize(good[:5])
    with pytest.raises(ValueError, match="version"):
        deserialize(good[:4] + struct.pack("<H", 99) + good[6:])
    header = msgpack.packb({"p": 10 ** 9, "b": [], "a": 64})
    with pytest.raises(ValueError, match="past the end"):
        deserialize(struct.pack("<4sHHI", b"FLWC", 1, 0, len(header)) + header)
    header = msgpack.packb({"p": 0, "b": [-1], "a": 64})
    with pytest.raises(ValueError, match="non-negative"):
        deserialize(struct.pack("<4sHHI", b"FLWC", 1, 0, len(header)) + header)
    header = msgpack.packb({"p": 0, "b": [], "a": 3})
    with pytest.raises(ValueError, match="alignment"):
        deserialize(struct.pack("<4sHHI", b"FLWC", 1, 0, len(header)) + header)


def _check_layout_or_valueerror(data: bytes) -> None:
    try:
        layout = read_layout(data)
    except ValueError:
        return
    assert layout.pickle_offset + layout.pickle_size <= len(data)
    for off, size in layout.buffers:
        assert 0 <= off and off + size <= len(data)
    assert layout.total_size <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    _check_layout_or_valueerror(data)
    _check_layout_or_valueerror(b"FLWC\x01\x00\x00\x00" + data)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner,
                                                                max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(header=st.fixed_dictionaries({"p": _msgpack_values, "b": _msgpack_values,
                                     "a": _msgpack_values}) | _msgpack_values,
       tail=st.binary(max_size=300), fudge=st.integers(-3, 3))
def test_random_headers_are_validated(header: Any, tail: bytes, fudge: int) -> None:
    packed = msgpack.packb(header)
    hlen = max(0, len(packed) + fudge)
    data = struct.pack("<4sHHI", b"FLWC", 1, 0, hlen) + packed + tail
    _check_layout_or_valueerror(data)


def test_real_object_ref_is_collected() -> None:
    from flowcore.objects.ref import ObjectRef

    ref = ObjectRef(b"r" * 20)  # no client in this process: not counted
    s = serialize({"deps": [ref]})
    assert s.contained_refs == [b"r" * 20]
    assert deserialize(s.to_bytes())["deps"][0] == ref


@pytest.mark.parametrize("make", [
    lambda t: t.slice(10, 5),
    lambda t: t.to_batches()[0].slice(1000, 20),
    lambda t: t.column("a").slice(3, 4),
    lambda t: t.column("s").chunk(0).slice(99_000, 7),
], ids=["table", "record_batch", "chunked_array", "string_array"])
def test_arrow_slices_send_only_the_slice_zero_copy(make: Any) -> None:
    table = pa.table({"a": np.arange(100_000), "s": [str(i) for i in range(100_000)]})
    value = make(table)
    s = serialize(value)
    assert s.total_size < 4096  # not the 1.3 MB of parent buffers
    buf = pa.py_buffer(s.to_bytes())
    out = deserialize(buf)
    assert type(out) is type(value) and out.equals(value)
    assert_arrow_inside(out, buf)
