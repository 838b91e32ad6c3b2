"""The Comm parser: batches split at any byte boundary, large batches
received into their own buffer, malformed large batches rejected."""
from __future__ import annotations

import asyncio

from hypothesis import given, settings, strategies as st

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
@given(sizes=st.lists(st.sampled_from([0, 10, 5000, cm.BIG_BODY - 100, cm.BIG_BODY + 7,
                                       3 * cm.BIG_BODY]), min_size=1, max_size=5),
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
    assert not c.closed and c._big is None and len(c._buf) == 0


def test_malformed_large_batch_closes_the_connection():
    seen: list = []
    c = _open_comm(seen)

    class T:
        def close(self):
            pass
    c.transport = T()  # type: ignore[assignment]
    good = _batch("ok", b"x" * 10)
    body_len = 2 * cm.BIG_BODY
    bad = frames.PREFIX.pack(body_len) + b"\xff" * body_len  # frame table is garbage
    c.data_received(good + bad[: cm.BIG_BODY])
    assert [op for op, _ in seen] == ["ok"] and not c.closed
    c.data_received(bad[cm.BIG_BODY:])
    assert c.closed
