"""Serialisation of values into flowcore's object layout.

One contiguous region, identical inline or in shared memory::

    [magic "FLWC" u16 version u16 flags][u32 header length]
    [msgpack header {"p": pickle_len, "b": [buffer lengths], "a": alignment}]
    [pickle bytes][pad][buffer 0 at a multiple of a][pad][buffer 1] ...

Offsets are relative to the region start.  Values are pickled with protocol 5
through a cloudpickle pickler; NumPy and Arrow payloads travel as out-of-band
buffers, and :func:`deserialize` hands slices of the input back to pickle, so
arrays come back as read-only views of the input without a copy.
"""
from __future__ import annotations

import io
import itertools
import os
import pickle
import struct
import sys
import threading
import types
from typing import Any, Callable, Iterator, NamedTuple

import cloudpickle
import msgpack

MAGIC = b"FLWC"
VERSION = 1
ALIGNMENT = 64
_PREFIX = struct.Struct("<4sHHI")  # magic, version, flags, header length
PREFIX_SIZE = _PREFIX.size  # 12
_PLAIN_PREFIX = struct.pack("<HH", VERSION, 0)  # version, flags
_NUMPY_COPY_THRESHOLD = 1 << 16
_MAX_FIND_DEPTH = 12
_MAX_FIND_CHILDREN = 10_000

__all__ = [
    "Serialized", "SerializationError", "Layout", "serialize", "serialize_with_refs",
    "explain_callable_failure", "rebuilding_class",
    "deserialize", "read_layout", "note_contained_ref", "ALIGNMENT",
]


from ..exceptions import SerializationError  # noqa: E402  (re-exported here)


# -- contained ObjectRef collection -----------------------------------------
_local = threading.local()


def note_contained_ref(oid: bytes) -> None:
    """Called by ``ObjectRef.__reduce__``: record ``oid`` for the running
    :func:`serialize` on this thread; a no-op outside serialize."""
    refs = getattr(_local, "refs", None)
    if refs is not None:
        refs.append(oid)


# -- pickling ----------------------------------------------------------------
def _rebuild_ndarray(buf: Any, dtype: Any, shape: tuple, order: Any) -> Any:
    import numpy as np
    if not dtype.itemsize:  # zero-itemsize dtypes (e.g. "V0") hold no data
        return np.empty(shape, dtype=dtype, order=order)
    return np.frombuffer(buf, dtype=np.uint8).view(dtype).reshape(shape, order=order)


def _reduce_ndarray(np: Any, arr: Any) -> Any:
    """Reduce a plain ndarray with its data as one out-of-band buffer.

    Unlike NumPy's own reduction this also covers datetime/timedelta dtypes
    and makes non-contiguous arrays contiguous instead of pickling in-band.
    """
    if arr.flags.c_contiguous:
        order, data = "C", arr
    elif arr.flags.f_contiguous:
        order, data = "F", arr.T
    else:
        order, data = "C", np.ascontiguousarray(arr)
    if data.dtype.itemsize:
        raw = data.reshape(-1).view(np.uint8)
    else:
        raw = np.empty(0, dtype=np.uint8)
    return (_rebuild_ndarray, (pickle.PickleBuffer(raw), arr.dtype, arr.shape, order))


_ARROW_COMPACT_MIN = 1 << 16


def _rebuild_arrow(kind: str, buf: Any) -> Any:
    import pyarrow as pa
    table = pa.ipc.open_stream(pa.py_buffer(buf)).read_all()  # zero-copy views
    if kind == "table":
        return table
    if kind == "batch":
        batches = table.combine_chunks().to_batches()
        return batches[0] if batches else pa.RecordBatch.from_pylist([], table.schema)
    col = table.column(0)
    if kind == "chunked":
        return col
    return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)


def _reduce_arrow(pa: Any, obj: Any) -> Any:
    """Reduce *sliced* Arrow data through the IPC stream format.

    pyarrow's own pickling already puts buffers out of band, but sends the
    whole parent buffers of a slice; IPC writes only the sliced ranges.
    """
    if isinstance(obj, pa.Table):
        kind = "table"
    elif isinstance(obj, pa.RecordBatch):
        kind = "batch"
    elif isinstance(obj, pa.ChunkedArray):
        kind = "chunked"
    elif isinstance(obj, pa.Array):
        kind = "array"
    else:
        return NotImplemented
    try:
        total, used = obj.get_total_buffer_size(), obj.nbytes
    except Exception:
        return NotImplemented
    if total - used < _ARROW_COMPACT_MIN or total < 2 * used:
        return NotImplemented  # not (much) sliced: pyarrow's reduce is fine
    if kind == "array":
        obj = pa.RecordBatch.from_arrays([obj], ["_"])
    elif kind == "chunked":
        obj = pa.table({"_": obj})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, obj.schema) as writer:
        writer.write(obj)
    return (_rebuild_arrow, (kind, pickle.PickleBuffer(sink.getvalue())))


class _Pickler(cloudpickle.CloudPickler):
    def reducer_override(self, obj: Any) -> Any:
        np = sys.modules.get("numpy")
        if np is not None and type(obj) is np.ndarray and not obj.dtype.hasobject:
            return _reduce_ndarray(np, obj)
        if type(obj).__module__ == "pyarrow.lib":
            r = _reduce_arrow(sys.modules["pyarrow"], obj)
            if r is not NotImplemented:
                return r
        return super().reducer_override(obj)


def _dumps(value: Any, buffers: list | None) -> bytes:
    f = io.BytesIO()
    cb = buffers.append if buffers is not None else _discard
    _Pickler(f, protocol=5, buffer_callback=cb).dump(value)
    return f.getvalue()


def _discard(buf: Any) -> None:
    return None  # falsy: keep out of band, i.e. do not copy it into the stream


# -- the serialized form -------------------------------------------------------
_PARALLEL_COPY_THRESHOLD = 16 << 20
#: the piece a copying thread takes at a time: threads take the next piece
#: as they finish one, so a thread the machine runs late (a busy machine)
#: leaves its share to the others instead of holding the copy up
_COPY_PIECE = 4 << 20


def _copy(dst: Any, src: Any, threads: int | None) -> None:
    """np.copyto, split over threads for large buffers (bandwidth scales)."""
    n = src.nbytes
    if threads is None:
        threads = min(4, os.cpu_count() or 1)
    parts = max(1, min(threads, n // (_PARALLEL_COPY_THRESHOLD // 2)))
    np_copyto = sys.modules["numpy"].copyto
    if parts == 1:
        np_copyto(dst, src)
        return
    pieces = -(-n // _COPY_PIECE)
    taken = itertools.count()  # (next() of a count is atomic: each piece goes once)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                i = next(taken)
                if i >= pieces:
                    return
                a = i * _COPY_PIECE
                b = min(a + _COPY_PIECE, n)
                np_copyto(dst[a:b], src[a:b])
        except BaseException as exc:  # pragma: no cover - re-raised below
            errors.append(exc)

    helpers = [threading.Thread(target=work, daemon=True) for _ in range(parts - 1)]
    for t in helpers:
        t.start()
    work()
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


#: the layout heads of values without out-of-band buffers, by pickle length
#: (small ones: they recur), and for reading, the pickle length by header
_HEADS: dict[int, bytes] = {}
_PLAIN_HEADERS: dict[bytes, int] = {}
_HEADS_MAX = 4096


def _head(plen: int, blens: list[int]) -> bytes:
    if not blens and plen < _HEADS_MAX:
        head = _HEADS.get(plen)
        if head is None:
            header = msgpack.packb({"p": plen, "b": [], "a": ALIGNMENT})
            head = _PREFIX.pack(MAGIC, VERSION, 0, len(header)) + header
            _PLAIN_HEADERS[header] = plen
            _HEADS[plen] = head
        return head
    header = msgpack.packb({"p": plen, "b": blens, "a": ALIGNMENT})
    return _PREFIX.pack(MAGIC, VERSION, 0, len(header)) + header


class Serialized:
    """A pickled value ready to be written into the object layout."""

    __slots__ = ("pickle", "buffers", "contained_refs", "total_size", "_head",
                 "_offsets")

    def __init__(self, pickled: bytes, buffers: list[memoryview],
                 contained_refs: list[bytes]) -> None:
        self.pickle = pickled
        self.buffers = buffers  # raw C-contiguous byte views
        self.contained_refs = contained_refs
        self._head = _head(len(pickled), [b.nbytes for b in buffers])
        pos = len(self._head) + len(pickled)
        offsets = []
        for b in buffers:
            pos = _align(pos, ALIGNMENT)
            offsets.append(pos)
            pos += b.nbytes
        self._offsets = offsets
        self.total_size = pos

    def __repr__(self) -> str:
        return (f"Serialized(total_size={self.total_size}, "
                f"buffers={len(self.buffers)}, refs={len(self.contained_refs)})")

    def write_to(self, dest: memoryview, threads: int | None = None) -> None:
        """Write the full layout into ``dest`` (writable, >= total_size bytes).

        Buffers of 16 MiB and more are copied by up to ``threads`` threads
        (default: up to 4, bounded by the CPU count); NumPy releases the GIL.
        """
        dest = memoryview(dest)
        if dest.readonly:
            raise ValueError("destination buffer is read-only")
        if dest.ndim != 1 or dest.format != "B" or not dest.c_contiguous:
            dest = dest.cast("B")
        if dest.nbytes < self.total_size:
            raise ValueError(f"destination has {dest.nbytes} bytes, "
                             f"need {self.total_size}")
        pos = len(self._head)
        dest[:pos] = self._head
        end = pos + len(self.pickle)
        dest[pos:end] = self.pickle
        pos = end
        dst_np = None
        for off, buf in zip(self._offsets, self.buffers):
            if off > pos:
                dest[pos:off] = bytes(off - pos)
            n = buf.nbytes
            if n >= _NUMPY_COPY_THRESHOLD:
                import numpy as np
                if dst_np is None:
                    dst_np = np.frombuffer(dest, dtype=np.uint8)
                _copy(dst_np[off:off + n], np.frombuffer(buf, dtype=np.uint8), threads)
            elif n:
                dest[off:off + n] = buf
            pos = off + n

    def to_bytes(self) -> bytes:
        """The full layout as one bytes object."""
        if not self.buffers:
            return self._head + self.pickle
        parts: list[Any] = [self._head, self.pickle]
        pos = len(self._head) + len(self.pickle)
        for off, buf in zip(self._offsets, self.buffers):
            parts.append(bytes(off - pos))
            parts.append(buf)
            pos = off + buf.nbytes
        return b"".join(parts)


def serialize(value: Any) -> Serialized:
    """Pickle ``value`` (protocol 5, buffers out of band).

    ObjectRefs found inside are listed in ``contained_refs`` (first-seen
    order, no duplicates).  Raises :class:`SerializationError` naming the
    unpicklable part and where it sits.
    """
    if _plain(value, 0):  # builtins only: the C pickler writes the same, faster
        return Serialized(pickle.dumps(value, protocol=5), [], [])
    prev = getattr(_local, "refs", None)
    refs: list[bytes] = []
    _local.refs = refs
    buffers: list[pickle.PickleBuffer] = []
    try:
        pickled = _dumps(value, buffers)
    except Exception as exc:
        raise _explain_failure(value, exc) from exc
    finally:
        _local.refs = prev
    raws = [b.raw() for b in buffers]
    return Serialized(pickled, raws, list(dict.fromkeys(refs)))


_PLAIN_TYPES = frozenset((type(None), bool, int, float, complex, str, bytes))
_PLAIN_MAX_ITEMS = 32
_PLAIN_MAX_DEPTH = 3


def _plain(value: Any, depth: int) -> bool:
    """Whether ``value`` holds only builtin scalars (in tuples, lists and
    dicts of a few items, a few levels deep): nothing cloudpickle would
    pickle differently from ``pickle``, no buffer, no ref."""
    t = type(value)
    if t in _PLAIN_TYPES:
        return True
    if depth >= _PLAIN_MAX_DEPTH or not (t is tuple or t is list or t is dict):
        return False
    if not value:
        return True
    if len(value) > _PLAIN_MAX_ITEMS:
        return False
    if t is dict:
        return all(
            type(k) in _PLAIN_TYPES and _plain(v, depth + 1) for k, v in value.items())
    return all(_plain(v, depth + 1) for v in value)


def serialize_with_refs(value: Any) -> tuple[Serialized, list[bytes]]:
    """``serialize`` and also return the contained ObjectRef ids."""
    s = serialize(value)
    return s, s.contained_refs


# -- finding what failed -----------------------------------------------------
def _short_repr(x: Any, limit: int = 40) -> str:
    try:
        r = repr(x)
    except Exception:
        r = f"<{type(x).__name__}>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _children(obj: Any, path: str) -> Iterator[tuple[Any, str]]:
    """Direct parts of ``obj`` that pickle would visit, with their paths."""
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield x, f"{path}[{i}]"
    elif isinstance(obj, dict):
        for i, (k, v) in enumerate(obj.items()):
            yield k, f"{path}<dict key #{i}>"
            yield v, f"{path}[{_short_repr(k)}]"
    elif isinstance(obj, (set, frozenset)):
        for i, x in enumerate(obj):
            yield x, f"{path}<set element #{i}>"
    elif isinstance(obj, types.FunctionType):
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or ()):
            try:
                yield cell.cell_contents, f"{path}<closure variable {name!r}>"
            except ValueError:  # empty cell
                pass
        g = obj.__globals__
        for name in code.co_names:
            if name in g and not isinstance(g[name], types.ModuleType):
                yield g[name], f"{path}<global {name!r}>"
    elif isinstance(obj, (types.ModuleType, type)):
        return
    else:
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            for k, v in d.items():
                yield v, f"{path}.{k}"
        for cls in type(obj).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            if isinstance(slots, str):
                slots = (slots,)
            for name in slots:
                if name in ("__dict__", "__weakref__"):
                    continue
                try:
                    yield getattr(obj, name), f"{path}.{name}"
                except AttributeError:
                    pass


def _pickles(x: Any) -> bool:
    try:
        _dumps(x, None)
        return True
    except Exception:
        return False


def _find_culprit(value: Any, root: str = "value") -> tuple[Any, str]:
    obj, path = value, root
    for _ in range(_MAX_FIND_DEPTH):
        for n, (child, cpath) in enumerate(_children(obj, path)):
            if n >= _MAX_FIND_CHILDREN:
                return obj, path
            if not _pickles(child):
                obj, path = child, cpath
                break
        else:
            return obj, path
    return obj, path


def _explain_failure(value: Any, exc: BaseException) -> SerializationError:
    try:
        culprit, path = _find_culprit(value)
    except Exception:  # never let the diagnosis hide the real error
        culprit, path = value, "value"
    t = type(culprit)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return SerializationError(
        f"cannot serialize object of type {name} at {path}: "
        f"{type(exc).__name__}: {exc}. Hint: create it inside the task instead "
        f"of passing it, or make it picklable (e.g. define __reduce__ or "
        f"__getstate__/__setstate__)")


def explain_callable_failure(fn: Any, exc: BaseException) -> SerializationError:
    """The error for a remote function or actor class that cannot be pickled:
    its name, and the path through closures and globals to the culprit."""
    what = "class" if isinstance(fn, type) else "function"
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    try:
        culprit, path = _find_culprit(fn, name)
    except Exception:  # never let the diagnosis hide the real error
        culprit, path = fn, name
    t = type(culprit)
    tname = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    where = (f"it holds an object of type {tname} at {path}" if culprit is not fn
             else "no part of it could be singled out")
    return SerializationError(
        f"cannot serialize the remote {what} {name}: {where}: {type(exc).__name__}: {exc}. "
        f"Hint: create that object inside the {what} (or pass it as an argument made "
        f"picklable) instead of capturing it")


def rebuilding_class(buf: Any) -> str:
    """``module.name`` of the last class or function that unpickling ``buf``
    looked up before it failed (for error messages; '' if none)."""
    seen: list[str] = []

    class Tracking(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.append(f"{module}.{name}")
            return super().find_class(module, name)
    try:
        layout = read_layout(buf)
        mv = memoryview(buf)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        buffers = [mv[off:off + size] for off, size in layout.buffers]
        import io
        data = bytes(mv[layout.pickle_offset:layout.pickle_offset + layout.pickle_size])
        Tracking(io.BytesIO(data), buffers=buffers).load()
    except Exception:  # noqa: BLE001 - the failure is what we are after
        pass
    return seen[-1] if seen else ""


# -- reading the layout ----------------------------------------------------------
class Layout(NamedTuple):
    """Where the parts of a serialized object are (relative offsets)."""

    pickle_offset: int
    pickle_size: int
    buffers: list[tuple[int, int]]  # (offset, size)
    total_size: int


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_layout(buf: Any) -> Layout:
    """Parse and validate the layout header of ``buf``; ValueError if malformed."""
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    n = mv.nbytes
    if n < PREFIX_SIZE:
        raise ValueError(f"malformed object: {n} bytes is shorter than the "
                         f"{PREFIX_SIZE}-byte prefix")
    magic, version, _flags, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError(f"malformed object: bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise ValueError(f"unsupported object layout version {version}")
    if hlen > n - PREFIX_SIZE:
        raise ValueError(f"malformed object: header length {hlen} runs past the "
                         f"end ({n} bytes)")
    try:
        header = msgpack.unpackb(mv[PREFIX_SIZE:PREFIX_SIZE + hlen], raw=False)
    except Exception as exc:
        raise ValueError(f"malformed object header: {exc}") from None
    if not isinstance(header, dict) or not {"p", "b", "a"} <= header.keys():
        raise ValueError("malformed object header: expected keys p, b, a")
    plen, blens, align = header["p"], header["b"], header["a"]
    if not _is_uint(plen) or not isinstance(blens, list) or not all(map(_is_uint, blens)):
        raise ValueError("malformed object header: lengths must be non-negative ints")
    if not _is_uint(align) or not 1 <= align <= 4096 or align & (align - 1):
        raise ValueError(f"malformed object header: bad alignment {align!r}")
    pos = PREFIX_SIZE + hlen
    poff = pos
    pos += plen
    if pos > n:
        raise ValueError(f"malformed object: pickle of {plen} bytes runs past the end")
    offsets = []
    for i, blen in enumerate(blens):
        pos = _align(pos, align)
        if pos + blen > n:
            raise ValueError(f"malformed object: buffer {i} of {blen} bytes runs "
                             f"past the end ({n} bytes)")
        offsets.append((pos, blen))
        pos += blen
    return Layout(poff, plen, offsets, pos)


def _is_arrow_buffer(buf: Any) -> bool:
    pa = sys.modules.get("pyarrow")  # no pyarrow imported: no pyarrow buffer
    return pa is not None and isinstance(buf, pa.Buffer)


def deserialize(buf: Any, layout: Layout | None = None) -> Any:
    """Rebuild a value from its layout without copying its buffers.

    ``buf`` is bytes, a memoryview or a ``pyarrow.Buffer``.  Out-of-band
    buffers are passed to pickle as slices of ``buf`` (pyarrow slices for a
    pyarrow Buffer), so arrays come back read-only and keep ``buf`` alive.
    ``layout``: ``read_layout(buf)`` of these very bytes, read before (a
    store object is immutable: its reader parses the header once).
    """
    if layout is not None:
        return _rebuild(buf, layout)
    if type(buf) is bytes and len(buf) > PREFIX_SIZE:
        # a value without out-of-band buffers whose header was seen before
        hlen = _PREFIX.unpack_from(buf, 0)[3] if buf[:4] == MAGIC else 0
        plen = _PLAIN_HEADERS.get(buf[PREFIX_SIZE:PREFIX_SIZE + hlen]) if hlen else None
        if plen is not None and buf[4:8] == _PLAIN_PREFIX and \
                PREFIX_SIZE + hlen + plen == len(buf):
            return pickle.loads(memoryview(buf)[PREFIX_SIZE + hlen:])
    layout = read_layout(buf)
    if type(buf) is bytes and not layout.buffers and layout.pickle_size < _HEADS_MAX \
            and len(_PLAIN_HEADERS) < _HEADS_MAX:
        # (checked by read_layout: the next value with this header skips it)
        _PLAIN_HEADERS[buf[PREFIX_SIZE:layout.pickle_offset]] = layout.pickle_size
    return _rebuild(buf, layout)


def _rebuild(buf: Any, layout: Layout) -> Any:
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    slicer: Callable[[int, int], Any]
    if _is_arrow_buffer(buf):
        if buf.is_mutable:  # keep results read-only
            import pyarrow as pa
            buf = pa.foreign_buffer(buf.address, buf.size, base=buf)
        slicer = buf.slice
    else:
        ro = mv.toreadonly()
        slicer = lambda off, size: ro[off:off + size]  # noqa: E731
    buffers = [slicer(off, size) for off, size in layout.buffers]
    data = mv[layout.pickle_offset:layout.pickle_offset + layout.pickle_size]
    return pickle.loads(data, buffers=buffers)


#: the bytes of ``None`` (what most actor methods and tasks return) and of an
#: empty argument list ``((), {})`` (a call without arguments): made once, and
#: recognised by whoever reads them, so the commonest call pays no pickling
NONE_BYTES: bytes = serialize(None).to_bytes()
NO_ARGUMENTS_BYTES: bytes = serialize(((), {})).to_bytes()
