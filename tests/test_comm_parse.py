"""The frame parser shared by the Comm and the blocking transport: batches
split at any byte boundary, large batches received into their own buffer
(memory follows the bytes sent), malformed large batches rejected."""
from __future__ import annotations

import asyncio
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from flowcore.exceptions import ProtocolError
from flowcore.protocol import comm as cm
from flowcore.protocol import frames


def _open_comm(seen: list) -> cm.Comm:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    c = cm.Comm(b"t", server=False)
    c._state = cm._OPEN
    c.set_handler(lambda comm, m, bufs: seen.append((m["op"], [bytes(b) for b in bufs])))
    return c


def _batch(op: str, payload: bytes) -> bytes:
    return b"".join(bytes(x) for x in frames.encode([{"op": op}], [payload]))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 10, 5000, frames.BIG_BODY - 100, frames.BIG_BODY + 7,
                                       3 * frames.BIG_BODY]), min_size=1, max_size=5),
       cut=st.integers(min_value=1, max_value=400_000))
def test_any_split_gives_the_same_batches(sizes, cut):
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    stream = b"".join(_batch(f"m{i}", p) for i, p in enumerate(payloads))
    seen: list = []
    c = _open_comm(seen)
    for i in range(0, len(stream), cut):
        c.data_received(stream[i:i + cut])
    assert [op for op, _ in seen] == [f"m{i}" for i in range(len(payloads))]
    assert [b[0] if b else b"" for _, b in seen] == payloads
    assert not c.closed and c._reader.idle


def test_malformed_large_batch_closes_the_connection():
    seen: list = []
    c = _open_comm(seen)

    class T:
        def close(self):
            pass
    c.transport = T()  # type: ignore[assignment]
    good = _batch("ok", b"x" * 10)
    body_len = 2 * frames.BIG_BODY
    bad = frames.PREFIX.pack(body_len) + b"\xff" * body_len  # frame table is garbage
    c.data_received(good + bad[: frames.BIG_BODY])
    assert [op for op, _ in seen] == ["ok"] and not c.closed
    c.data_received(bad[frames.BIG_BODY:])
    assert c.closed


# ---------------------------------------------------------------- the shared reader
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 10, 5000, frames.BIG_BODY - 100, frames.BIG_BODY + 7,
                                       3 * frames.BIG_BODY]), min_size=1, max_size=5),
       cut=st.integers(min_value=1, max_value=400_000))
def test_frame_reader_any_split_gives_the_same_batches(sizes, cut):
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    stream = b"".join(_batch(f"m{i}", p) for i, p in enumerate(payloads))
    reader = frames.FrameReader()
    seen = []
    for i in range(0, len(stream), cut):
        reader.feed(stream[i:i + cut])
        while (batch := reader.next_batch()) is not None:
            msgs, bufs = batch
            seen.extend((m["op"], bytes(bufs[0])) for m in msgs)
    assert [op for op, _ in seen] == [f"m{i}" for i in range(len(payloads))]
    assert [b for _, b in seen] == payloads
    assert reader.idle


def test_frame_reader_checks_the_prefix_before_the_body_arrives():
    reader = frames.FrameReader(frames.Limits(max_body=1 << 20))
    reader.feed(frames.PREFIX.pack((1 << 20) + 1))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.next_batch()


def test_frame_reader_memory_follows_the_bytes_sent_not_the_prefix():
    reader = frames.FrameReader()
    tracemalloc.start()
    try:
        reader.feed(frames.PREFIX.pack(200 << 20) + bytes(64 << 10))
        assert reader.next_batch() is None
        for _ in range(4):
            reader.feed(bytes(64 << 10))
            assert reader.next_batch() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak >> 20} MiB held for 320 KiB received"
    assert not reader.idle
    reader.clear()
    assert reader.idle
