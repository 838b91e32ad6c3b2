"""Frame encoding: round trips, and every malformed input raises ProtocolError."""
from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from flowcore.exceptions import FlowcoreError, ProtocolError
from flowcore.protocol import frames
from flowcore.protocol.frames import (DEFAULT_LIMITS, FRAME_LEN, NFRAMES, PREFIX, Limits,
                                      check_body_length, decode, decode_body, encode)


def join(buffers: list) -> bytes:
    return b"".join(bytes(memoryview(b)) for b in buffers)


def raw_batch(header: bytes, *extra: bytes, nframes: int | None = None,
              lens: list[int] | None = None, body_len: int | None = None) -> bytes:
    """Build a batch by hand so any field can be wrong."""
    parts = [header, *extra]
    lens = [len(p) for p in parts] if lens is None else lens
    n = len(lens) if nframes is None else nframes
    meta = NFRAMES.pack(n) + b"".join(FRAME_LEN.pack(x) for x in lens)
    body = meta + b"".join(parts)
    return PREFIX.pack(len(body) if body_len is None else body_len) + body


# ---------------------------------------------------------------- round trips
def test_round_trip_messages_only() -> None:
    msgs = [{"op": "submit", "tasks": [{"tid": b"\x00" * 16, "res": {"CPU": 1.0}}]},
            {"op": "decref", "oids": [b"a" * 20, b"b" * 20]},
            {"op": "x", "nested": {"a": [1, 2.5, None, True, "s"]}, 3: "int key"}]
    got, bufs = decode(join(encode(msgs)))
    assert got == msgs and bufs == []


def test_round_trip_with_out_of_band_frames() -> None:
    big = bytes(range(256)) * 1000
    mv = memoryview(bytearray(b"xyz" * 10))
    empty = b""
    msgs = [{"op": "put", "_frames": [0, 1, 2]}]
    out = encode(msgs, [big, mv, empty])
    # buffers are passed through, not copied into the header
    assert out[1] is big and out[2] is mv and len(out) == 4
    assert len(out[0]) < 200
    got, bufs = decode(join(out))
    assert got == msgs
    assert [bytes(b) for b in bufs] == [big, bytes(mv), b""]
    assert all(isinstance(b, memoryview) for b in bufs)


def test_round_trip_of_non_byte_buffer() -> None:
    import array
    arr = array.array("d", [1.0, 2.0, 3.0])
    got, bufs = decode(join(encode([{"op": "a"}], [arr])))
    assert bytes(bufs[0]) == arr.tobytes()


def test_decode_body_is_decode_without_prefix() -> None:
    data = join(encode([{"op": "ping"}], [b"frame"]))
    (n,) = PREFIX.unpack_from(data)
    assert n == len(data) - PREFIX.size
    msgs, bufs = decode_body(memoryview(data)[PREFIX.size:])
    assert msgs == [{"op": "ping"}] and bytes(bufs[0]) == b"frame"


def test_empty_message_list_round_trips() -> None:
    assert decode(join(encode([]))) == ([], [])


def test_frames_are_views_into_the_input() -> None:
    data = bytearray(join(encode([{"op": "a"}], [b"hello"])))
    _, (buf,) = decode(data)
    data[-5:] = b"HELLO"
    assert bytes(buf) == b"HELLO"  # zero copy


def test_encode_rejects_unpackable_values() -> None:
    with pytest.raises(TypeError):
        encode([{"op": "x", "v": object()}])


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.fixed_dictionaries(
    {"op": st.text(max_size=10)},
    optional={"v": st.recursive(
        st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
        | st.binary(max_size=20) | st.text(max_size=20),
        lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=5), ch,
                                                              max_size=4),
        max_leaves=10)}), max_size=5),
    st.lists(st.binary(max_size=64), max_size=5))
def test_round_trip_property(msgs: list, bufs: list) -> None:
    got, frames_out = decode(join(encode(msgs, bufs)))
    assert got == msgs
    assert [bytes(f) for f in frames_out] == bufs


# ---------------------------------------------------------------- malformed input
GOOD_HEADER = msgpack.packb([{"op": "ok"}])


def test_hand_built_batch_is_valid() -> None:
    assert decode(raw_batch(GOOD_HEADER, b"abc")) == ([{"op": "ok"}], [memoryview(b"abc")])


MALFORMED = {
    "empty": b"",
    "shorter than prefix": b"\x01\x00\x00",
    "prefix only": PREFIX.pack(0),
    "body too short for a frame table": PREFIX.pack(4) + b"\x01\x00\x00\x00",
    "prefix longer than data": raw_batch(GOOD_HEADER, body_len=1000),
    "prefix shorter than data": raw_batch(
        GOOD_HEADER, body_len=len(raw_batch(GOOD_HEADER)) - PREFIX.size - 1),
    "data after the batch": raw_batch(GOOD_HEADER) + b"extra",
    "truncated": raw_batch(GOOD_HEADER, b"payload")[:-3],
    "zero frames": raw_batch(GOOD_HEADER, nframes=0, lens=[]),
    "too many frames": PREFIX.pack(12) + NFRAMES.pack(DEFAULT_LIMITS.max_frames + 1)
    + FRAME_LEN.pack(0),
    "frame table runs past end": PREFIX.pack(12) + NFRAMES.pack(5) + FRAME_LEN.pack(0),
    "frame lengths too long": raw_batch(GOOD_HEADER, lens=[len(GOOD_HEADER) + 1]),
    "frame lengths too short": raw_batch(GOOD_HEADER, b"abc", lens=[len(GOOD_HEADER), 1]),
    "frame length overflows": raw_batch(GOOD_HEADER, b"abc",
                                        lens=[len(GOOD_HEADER), 2**64 - 1]),
    "huge body length": PREFIX.pack(2**64 - 1) + b"\x00" * 20,
    "header not a list": raw_batch(msgpack.packb({"op": "x"})),
    "header is a scalar": raw_batch(msgpack.packb(42)),
    "message not a map": raw_batch(msgpack.packb(["op"])),
    "message without op": raw_batch(msgpack.packb([{"opp": "x"}])),
    "op not a string": raw_batch(msgpack.packb([{"op": 7}])),
    "op is bytes": raw_batch(msgpack.packb([{"op": b"raw"}], use_bin_type=True)),
    "one good one bad": raw_batch(msgpack.packb([{"op": "ok"}, {"op": None}])),
    "garbage msgpack": raw_batch(b"\xc1\xc1\xc1"),
    "truncated msgpack": raw_batch(GOOD_HEADER[:-2]),
    "trailing data after msgpack": raw_batch(GOOD_HEADER + b"\x01"),
    "empty header frame": raw_batch(b""),
    "map with list key": raw_batch(b"\x91\x81\x91\x01\xa1x"),  # [{[1]: "x"}]
    "msgpack claims huge array": raw_batch(b"\xdd\xff\xff\xff\xff"),
    "deeply nested msgpack": raw_batch(b"\x91" * 100_000),
    "invalid utf-8 in str": raw_batch(b"\x91\x81\xa2op\xa2\xff\xfe"),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_batch_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


PREFIX_ONLY = {"prefix longer than data", "prefix shorter than data", "huge body length"}
BODY_CASES = {k: d for k, d in MALFORMED.items()
              if len(d) >= PREFIX.size and k not in PREFIX_ONLY}


@pytest.mark.parametrize("data", list(BODY_CASES.values()), ids=list(BODY_CASES))
def test_malformed_body_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_body(data[PREFIX.size:])


def test_protocol_error_is_a_flowcore_error() -> None:
    assert issubclass(ProtocolError, FlowcoreError)


def test_limits_are_enforced() -> None:
    header = msgpack.packb([{"op": "x", "pad": "a" * 100}])
    data = raw_batch(header, b"f" * 50, b"g")
    assert decode(data)[0][0]["op"] == "x"
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(data, Limits(max_body=len(data) - PREFIX.size - 1))
    decode(data, Limits(max_body=len(data) - PREFIX.size))
    with pytest.raises(ProtocolError, match="header"):
        decode(data, Limits(max_header=len(header) - 1))
    decode(data, Limits(max_header=len(header)))
    with pytest.raises(ProtocolError, match="frames"):
        decode(data, Limits(max_frames=2))
    decode(data, Limits(max_frames=3))


def test_check_body_length() -> None:
    check_body_length(NFRAMES.size + FRAME_LEN.size)
    with pytest.raises(ProtocolError):
        check_body_length(NFRAMES.size + FRAME_LEN.size - 1)
    with pytest.raises(ProtocolError):
        check_body_length(DEFAULT_LIMITS.max_body + 1)
    with pytest.raises(ProtocolError):
        check_body_length(100, Limits(max_body=99))


def test_oversize_body_is_refused_before_reading_it() -> None:
    # only the 8-byte prefix is present: the declared size alone is refused
    data = PREFIX.pack(DEFAULT_LIMITS.max_body + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(data)


# ---------------------------------------------------------------- fuzzing
SMALL = Limits(max_body=1 << 16, max_frames=16, max_header=1 << 12)


def _mutations() -> st.SearchStrategy[bytes]:
    """Valid batches with a few bytes flipped, cut or appended: reaches past
    the first checks far more often than random bytes do."""
    base = st.builds(lambda m, f: join(encode(m, f)),
                     st.lists(st.fixed_dictionaries({"op": st.text(max_size=4)},
                                                    optional={"x": st.integers(-2**63, 2**63 - 1)}),
                              max_size=3),
                     st.lists(st.binary(max_size=8), max_size=3))

    def mutate(data: bytes, edits: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
        b = bytearray(data)
        for pos, val in edits:
            b[pos % len(b)] = val
        return bytes(b[:max(0, len(b) - cut)]) + tail

    return st.builds(mutate, base, st.lists(st.tuples(st.integers(0, 10_000),
                                                      st.integers(0, 255)), max_size=4),
                     st.integers(0, 4), st.binary(max_size=4))


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512) | _mutations())
@example(b"")
@example(PREFIX.pack(12) + NFRAMES.pack(1) + FRAME_LEN.pack(0))
def test_fuzz_decode_raises_only_protocol_error(data: bytes) -> None:
    for limits in (DEFAULT_LIMITS, SMALL):
        try:
            msgs, bufs = decode(data, limits)
        except ProtocolError:
            continue
        assert isinstance(msgs, list)
        assert all(isinstance(m, dict) and isinstance(m["op"], str) for m in msgs)
        assert all(isinstance(b, memoryview) for b in bufs)


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512) | _mutations().map(lambda d: d[PREFIX.size:]))
def test_fuzz_decode_body_raises_only_protocol_error(data: bytes) -> None:
    for limits in (DEFAULT_LIMITS, SMALL):
        try:
            msgs, bufs = decode_body(data, limits)
        except ProtocolError:
            continue
        assert isinstance(msgs, list)
        assert all(isinstance(m, dict) and isinstance(m["op"], str) for m in msgs)
        total = NFRAMES.size + FRAME_LEN.size * (len(bufs) + 1)
        assert total + sum(b.nbytes for b in bufs) <= len(data)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(min_size=1, max_size=64))
def test_fuzz_header_frame_contents(header: bytes) -> None:
    """Arbitrary bytes as the msgpack frame of an otherwise well-formed batch."""
    try:
        msgs, _ = decode(raw_batch(header))
    except ProtocolError:
        return
    assert all(isinstance(m["op"], str) for m in msgs)


def test_struct_sizes() -> None:
    assert (PREFIX.size, NFRAMES.size, FRAME_LEN.size) == (8, 4, 8)
    assert struct.calcsize("<Q") == PREFIX.size
