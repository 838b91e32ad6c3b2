"""Frame encoding.

A *batch* on the wire is::

    u64 body_length | u32 nframes | u64 frame_length * nframes | frame 0 | frame 1 ...

Frame 0 is a msgpack array of messages (each a map with an ``"op"`` key);
further frames are raw out-of-band buffers that messages refer to by index
under the key ``"_frames"``.  Nothing here unpickles anything: the decoder
only splits bytes and runs msgpack, and every length is checked against the
limits before memory is allocated.

``FrameReader`` is the one parser of a byte stream into batches: the asyncio
``Comm`` and the blocking ``protocol.blocking.BlockingConn`` both feed it.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import msgpack

from ..exceptions import ProtocolError

PREFIX = struct.Struct("<Q")
#: batches at least this large are received into a buffer of their own size
BIG_BODY = 1 << 20
NFRAMES = struct.Struct("<I")
FRAME_LEN = struct.Struct("<Q")
#: the prefix and frame table of a batch with no out-of-band frame
SINGLE = struct.Struct("<QIQ")
#: a header larger than this is packed by a packer of its own (a thread's
#: reused packer keeps its buffer at the largest size it ever packed)
REUSE_MAX = 1 << 20

_local = threading.local()


def pack(obj: object) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)`` with this thread's reused
    packer (making a packer allocates its buffer: most of a small pack's
    cost)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    data = packer.pack(obj)  # (a failed pack resets the packer's buffer)
    if len(data) > REUSE_MAX:
        _local.packer = None  # let its grown buffer go
    return data


def _max_message_bytes() -> int:
    """The batch size cap (``FLOWCORE_MAX_MESSAGE_BYTES``, default 256 MiB).

    Objects travel through the stores, in 4 MiB chunks or over the bulk
    port, so a batch of control messages stays far below it; the largest
    single message is a runtime_env package (100 MiB by default)."""
    import os
    raw = os.environ.get("FLOWCORE_MAX_MESSAGE_BYTES")
    try:
        value = int(raw) if raw else 256 << 20
    except ValueError:
        raise ValueError(f"FLOWCORE_MAX_MESSAGE_BYTES={raw!r}: expected a number of bytes "
                         f"(e.g. {256 << 20} for 256 MiB)") from None
    if value < (1 << 20):
        raise ValueError(f"FLOWCORE_MAX_MESSAGE_BYTES={raw!r}: at least 1 MiB ({1 << 20})")
    return value


@dataclass(frozen=True)
class Limits:
    max_body: int = _max_message_bytes()   # bytes per batch (the sender splits bigger ones)
    max_frames: int = 4096
    max_header: int = 256 << 20      # 256 MiB of msgpack per batch


DEFAULT_LIMITS = Limits()


def encode(messages: list[dict], frames: list[bytes | memoryview] | None = None) -> list:
    """Encode a batch; returns a list of buffers to write in order."""
    header = pack(messages)
    if not frames:
        n = len(header)
        return [SINGLE.pack(NFRAMES.size + FRAME_LEN.size + n, 1, n) + header]
    lens = [len(header)] + [memoryview(f).nbytes for f in frames]
    meta = NFRAMES.pack(len(lens)) + b"".join(FRAME_LEN.pack(n) for n in lens)
    body_len = len(meta) + sum(lens)
    out: list = [PREFIX.pack(body_len) + meta + header]
    out.extend(frames)
    return out


def encode_batches(messages: list[dict], frames: list | None = None,
                   max_body: int = DEFAULT_LIMITS.max_body) -> list[list]:
    """``encode`` split into as many batches as needed for each to stay within
    ``max_body`` (a message keeps its out-of-band frames with it).  A single
    message larger than that raises ``ProtocolError``."""
    out = encode(messages, frames)
    (n,) = PREFIX.unpack_from(memoryview(out[0]), 0)
    if n <= max_body:
        return [out]
    if len(messages) == 1:
        raise ProtocolError(f"a {messages[0].get('op')!r} message of {n} bytes exceeds the "
                            f"message size limit of {max_body} bytes "
                            f"(FLOWCORE_MAX_MESSAGE_BYTES)")
    half = len(messages) // 2
    batches = []
    for part in (messages[:half], messages[half:]):
        part_frames: list = []
        for m in part:
            idx = m.get("_frames")
            if idx:
                m["_frames"] = list(range(len(part_frames), len(part_frames) + len(idx)))
                part_frames.extend(frames[i] for i in idx)  # type: ignore[index]
        batches.extend(encode_batches(part, part_frames, max_body))
    return batches


def check_body_length(n: int, limits: Limits = DEFAULT_LIMITS) -> None:
    if n < NFRAMES.size + FRAME_LEN.size:
        raise ProtocolError(f"batch body of {n} bytes is too short to hold a frame table")
    if n > limits.max_body:
        raise ProtocolError(f"batch body of {n} bytes exceeds the limit of {limits.max_body}")


def decode_body(body: bytes | memoryview, limits: Limits = DEFAULT_LIMITS
                ) -> tuple[list[dict], list[memoryview]]:
    """Decode one batch body (everything after the u64 prefix)."""
    view = memoryview(body)
    check_body_length(view.nbytes, limits)
    (nframes,) = NFRAMES.unpack_from(view, 0)
    if nframes < 1 or nframes > limits.max_frames:
        raise ProtocolError(f"batch declares {nframes} frames (allowed 1..{limits.max_frames})")
    pos = NFRAMES.size
    table_end = pos + nframes * FRAME_LEN.size
    if table_end > view.nbytes:
        raise ProtocolError("frame table runs past the end of the batch")
    lens = [FRAME_LEN.unpack_from(view, pos + i * FRAME_LEN.size)[0] for i in range(nframes)]
    if sum(lens) != view.nbytes - table_end:
        raise ProtocolError(
            f"frame lengths add up to {sum(lens)} bytes but the batch holds "
            f"{view.nbytes - table_end}")
    if lens[0] > limits.max_header:
        raise ProtocolError(f"message header of {lens[0]} bytes exceeds {limits.max_header}")
    frames = []
    pos = table_end
    for n in lens:
        frames.append(view[pos:pos + n])
        pos += n
    return _unpack(frames[0]), frames[1:]


def _unpack(header: bytes | memoryview) -> list[dict]:
    try:
        messages = msgpack.unpackb(header, raw=False, use_list=True, strict_map_key=False)
    except Exception as e:  # msgpack raises many types on garbage
        raise ProtocolError(f"undecodable message header: {type(e).__name__}: {e}") from None
    if type(messages) is not list:
        raise ProtocolError("message header must be a list of maps each with a string 'op'")
    for m in messages:
        if type(m) is not dict or type(m.get("op")) is not str:
            raise ProtocolError("message header must be a list of maps each with a string "
                                "'op'")
    return messages


def _decode_single(buf: bytearray, start: int, n: int, limits: Limits) -> list[dict] | None:
    """The messages of a batch with no out-of-band frame, read in place from
    ``buf`` (no copy of the body, no view of it left behind); None when the
    batch has other frames."""
    if n < NFRAMES.size + FRAME_LEN.size:
        return None  # too short: decode_body says so
    (nframes,) = NFRAMES.unpack_from(buf, start)
    if nframes != 1:
        return None
    (hlen,) = FRAME_LEN.unpack_from(buf, start + NFRAMES.size)
    if hlen != n - NFRAMES.size - FRAME_LEN.size:
        return None  # decode_body says what is wrong
    if hlen > limits.max_header:
        raise ProtocolError(f"message header of {hlen} bytes exceeds {limits.max_header}")
    first = start + NFRAMES.size + FRAME_LEN.size
    view = memoryview(buf)
    try:
        header = view[first:first + hlen]
        try:
            return _unpack(header)
        finally:
            header.release()
    finally:
        view.release()


def decode(data: bytes | memoryview, limits: Limits = DEFAULT_LIMITS
           ) -> tuple[list[dict], list[memoryview]]:
    """Decode a whole batch including its length prefix (used by tests)."""
    view = memoryview(data)
    if view.nbytes < PREFIX.size:
        raise ProtocolError("batch shorter than its length prefix")
    (n,) = PREFIX.unpack_from(view, 0)
    check_body_length(n, limits)
    if view.nbytes != PREFIX.size + n:
        raise ProtocolError(f"batch prefix says {n} bytes but {view.nbytes - PREFIX.size} follow")
    return decode_body(view[PREFIX.size:], limits)


class FrameReader:
    """Splits a byte stream into batches, whatever reads the socket.

    ``feed`` bytes as they arrive, then take the complete batches with
    ``next_batch`` until it returns None (a caller may stop early, say when
    it closes the connection on a bad batch: each good batch is handed out
    before a later one is looked at).  A length prefix is checked against the
    limits as soon as it is seen, before its body is waited for.  A body of
    ``BIG_BODY`` bytes or more is gathered in a buffer of its own as its bytes
    arrive, so memory follows what the peer actually sent, not what its
    prefix claims, and nothing is rescanned meanwhile.  After a
    ``ProtocolError`` the reader is unusable: close the connection."""

    __slots__ = ("limits", "_buf", "_pos", "_big", "_big_need")

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.limits = limits
        self._buf = bytearray()
        self._pos = 0                       # where the next batch starts in _buf
        self._big: bytearray | None = None  # a large body being gathered
        self._big_need = 0

    @property
    def idle(self) -> bool:
        """True when no byte of an unfinished batch is held."""
        return self._big is None and len(self._buf) == self._pos

    def clear(self) -> None:
        """Drop whatever is held (the peer is gone)."""
        self._buf = bytearray()
        self._pos = 0
        self._big = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        big = self._big
        if big is not None:
            want = self._big_need - len(big)
            if want > 0:
                if len(data) <= want:
                    big += data
                    return
                view = memoryview(data)
                big += view[:want]
                data = view[want:]
        self._buf += data

    def next_batch(self) -> tuple[list[dict], list[memoryview]] | None:
        """The next complete batch, or None until more bytes are fed;
        ``ProtocolError`` for a batch that breaks the format or the limits."""
        big = self._big
        if big is not None:
            if len(big) < self._big_need:
                return None
            self._big = None
            return decode_body(memoryview(big), self.limits)
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if end - pos >= PREFIX.size:
            (n,) = PREFIX.unpack_from(buf, pos)
            check_body_length(n, self.limits)
            start = pos + PREFIX.size
            if end - start >= n:
                self._pos = start + n
                msgs = _decode_single(buf, start, n, self.limits)
                if msgs is not None:
                    return msgs, []
                return decode_body(bytes(buf[start:start + n]), self.limits)
            if n >= BIG_BODY:
                self._big = bytearray(buf[start:end])
                self._big_need = n
                self._pos = end
        if self._pos:  # everything before _pos is handed out: drop it
            del buf[:self._pos]
            self._pos = 0
        return None
