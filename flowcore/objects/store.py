"""The node's object store: one sparse shared-memory arena file plus disk.

Objects live at offsets in ``{shm_dir}/flowcore-{session}-{pid}-arena``,
placed by :class:`~flowcore.objects.arena.Allocator`; freed ranges are reused,
so their pages are already faulted in.  When the arena is full, unpinned
sealed objects are spilled to ``spill_dir`` least-recently-used first; if
pinned memory still blocks a creation, the object goes to a disk-backed file
``{spill_dir}/obj-{oid hex}`` instead.  Clients map a :class:`Location`
(path, offset, size) themselves (see :mod:`flowcore.objects.mapping`).

The store does file IO only: no sockets, no threads, not thread-safe.
"""
from __future__ import annotations

import errno
import glob
import mmap
import os
import time
import weakref
from collections import OrderedDict
from typing import Any, NamedTuple

from flowcore.exceptions import ObjectStoreFullError
from flowcore.objects.arena import Allocator
from flowcore.private_files import make_private_dir, open_private

__all__ = ["Location", "ObjectStore", "sweep_stale_segments", "arena_path",
           "is_arena_path"]

#: bytes: an object at least this large whose creator drops it is expected
#: to be freed soon (a create of that size may wait for it: see
#: ``fresh_memory`` and the node's create)
EXPECT_FREE_MIN = 8 << 20
ARENA_PREFIX = "flowcore-"
ARENA_SUFFIX = "-arena"


class Location(NamedTuple):
    """Where an object's bytes are: a file to map, an offset and a size."""

    path: str
    offset: int
    size: int

    def to_wire(self) -> list:
        return [self.path, self.offset, self.size]

    @classmethod
    def from_wire(cls, wire: Any) -> "Location":
        try:
            path, offset, size = wire
        except (TypeError, ValueError):
            raise ValueError(f"bad location {wire!r}") from None
        if (not isinstance(path, str) or not isinstance(offset, int)
                or not isinstance(size, int) or offset < 0 or size < 0):
            raise ValueError(f"bad location {wire!r}")
        return cls(path, offset, size)


def arena_path(shm_dir: str, session_id: str, pid: int) -> str:
    return os.path.join(shm_dir, f"{ARENA_PREFIX}{session_id}-{pid}{ARENA_SUFFIX}")


def is_arena_path(path: str) -> bool:
    """True for a store arena file (mapped once per process by clients)."""
    name = os.path.basename(path)
    return name.startswith(ARENA_PREFIX) and name.endswith(ARENA_SUFFIX)


def _arena_pid(path: str) -> int | None:
    stem = os.path.basename(path)[len(ARENA_PREFIX):-len(ARENA_SUFFIX)]
    pid = stem.rsplit("-", 1)[-1]
    return int(pid) if pid.isdigit() else None


def sweep_stale_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Remove arena files whose creating process is gone; return their paths."""
    import psutil

    removed = []
    for path in glob.glob(os.path.join(glob.escape(shm_dir),
                                       f"{ARENA_PREFIX}*{ARENA_SUFFIX}")):
        pid = _arena_pid(path)
        if pid is None or pid == os.getpid() or psutil.pid_exists(pid):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


# where an object's bytes are
ARENA, SPILLED, FALLBACK = "arena", "spilled", "fallback"


class _Entry:
    __slots__ = ("size", "sealed", "where", "offset", "path", "creator", "pins",
                 "doomed", "cached")

    def __init__(self, size: int, creator: str) -> None:
        self.size = size
        self.sealed = False
        self.where = ARENA
        self.offset = 0
        self.path = ""
        self.creator = creator
        self.pins: dict[str, int] = {}
        self.doomed = False
        # clients whose pin is a held one (kept between their gets): they
        # give it back when asked (see cached_holders)
        self.cached: set[str] | None = None


def _cleanup(mm: mmap.mmap, files: set[str], dirs: list[str]) -> None:
    try:
        mm.close()
    except BufferError:  # someone still holds a view; the mapping dies with it
        pass
    for path in list(files):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        files.discard(path)
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass


class ObjectStore:
    """One node's object store.  See the module docstring."""

    def __init__(self, session_id: str, node_id: str, capacity: int, spill_dir: str,
                 shm_dir: str = "/dev/shm") -> None:
        if capacity <= 0:
            raise ValueError(f"object store capacity must be > 0, got {capacity}")
        if "/" in session_id or not session_id:
            raise ValueError(f"bad session id {session_id!r}")
        st = os.statvfs(shm_dir)
        shm_free = st.f_bavail * st.f_frsize
        if capacity > shm_free:
            raise ValueError(
                f"object store capacity {capacity} bytes exceeds the free space "
                f"in {shm_dir} ({shm_free} bytes); lower object_store_memory or "
                f"enlarge {shm_dir} (e.g. docker --shm-size)")
        self.session_id = session_id
        self.node_id = node_id
        self.spill_dir = spill_dir
        self._files: set[str] = set()
        made_dirs: list[str] = []
        if not os.path.isdir(spill_dir):
            make_private_dir(spill_dir)
            made_dirs.append(spill_dir)
        self.path = arena_path(shm_dir, session_id, os.getpid())
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            for d in made_dirs:
                os.rmdir(d)
            raise
        self._files.add(self.path)
        try:
            os.ftruncate(fd, capacity)  # sparse: pages appear on first touch
            self._mm = mmap.mmap(fd, capacity)
        except BaseException:
            os.unlink(self.path)
            for d in made_dirs:
                os.rmdir(d)
            raise
        finally:
            os.close(fd)
        self._view = memoryview(self._mm)
        self._alloc = Allocator(capacity)
        self._entries: dict[bytes, _Entry] = {}
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # arena residents
        self._client_pins: dict[str, set[bytes]] = {}
        self._client_creates: dict[str, set[bytes]] = {}
        # the end of the arena memory ever handed out: pages past it were
        # never touched (their first write costs a page fault each)
        self._touched_end = 0
        # large objects whose creator gave its last pin back (it dropped
        # them): their delete is likely on its way (oid -> when, size)
        self._expected: OrderedDict[bytes, tuple[float, int]] = OrderedDict()
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, self._mm, self._files,
                                           made_dirs)

    # -- queries -----------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    def contains(self, oid: bytes) -> bool:
        e = self._entries.get(oid)
        return e is not None and not e.doomed

    def is_sealed(self, oid: bytes) -> bool:
        return self._entry(oid).sealed

    def owner_of(self, oid: bytes) -> str:
        """The client that created ``oid``."""
        return self._entry(oid).creator

    def sealed_objects(self) -> list[list]:
        """``[oid, size]`` of every sealed object (what a node reports to a
        restarted head)."""
        return [[oid, e.size] for oid, e in self._entries.items() if e.sealed and not e.doomed]

    def size_of(self, oid: bytes) -> int:
        return self._entry(oid).size

    def pin_count(self, oid: bytes, client: str | None = None) -> int:
        e = self._entry(oid)
        return e.pins.get(client, 0) if client is not None else sum(e.pins.values())

    def location(self, oid: bytes) -> Location:
        """Current location (only stable while the object is pinned)."""
        return self._location(self._entry(oid))

    def stats(self) -> dict:
        pinned = spilled = fallback = nspilled = unsealed = 0
        for e in self._entries.values():
            if e.pins:
                pinned += e.size
            if not e.sealed:
                unsealed += 1
            if e.where == SPILLED:
                spilled += e.size
                nspilled += 1
            elif e.where == FALLBACK:
                fallback += e.size
        return {"capacity": self.capacity, "used": self._alloc.used,
                "pinned_bytes": pinned, "num_objects": len(self._entries),
                "num_spilled": nspilled, "spilled_bytes": spilled,
                "fallback_bytes": fallback, "num_unsealed": unsealed,
                "largest_free": self._alloc.largest_free()}

    # -- lifecycle of an object -------------------------------------------
    def create(self, oid: bytes, size: int, client: str) -> Location:
        """Reserve ``size`` bytes for a new object that ``client`` will write."""
        self._check_open()
        if size < 0:
            raise ValueError(f"object size must be >= 0, got {size}")
        if oid in self._entries:
            raise ValueError(f"object {oid.hex()} already exists in the store")
        e = _Entry(size, client)
        offset = self._allocate(size, exclude=None)
        if offset is not None:
            e.offset = offset
        else:
            e.where = FALLBACK
            e.path = self._make_disk_file(oid, size)
        self._entries[oid] = e
        self._client_creates.setdefault(client, set()).add(oid)
        if e.where == ARENA:
            self._lru[oid] = None
        return self._location(e)

    def seal(self, oid: bytes, pin_for: str | None = None) -> None:
        """Mark an object complete and immutable.  ``pin_for``: its writer
        keeps a cached pin from the seal on (a put; see :meth:`pin`), taken
        before anything can free it: the writer reads it already, and the
        delete of an object whose references all went can come (from the
        head, on another connection) before its writer's seal."""
        e = self._entry(oid)
        if e.sealed:
            raise ValueError(f"object {oid.hex()} is already sealed")
        e.sealed = True
        self._forget_create(oid, e.creator)
        if pin_for is not None:
            self._add_pin(oid, e, pin_for, cached=True)
        if e.doomed and not e.pins:
            self._free(oid, e)
        else:
            self._touch(oid)

    def abort(self, oid: bytes) -> bool:
        """Drop an unsealed creation; False if unknown.  Error if sealed."""
        e = self._entries.get(oid)
        if e is None:
            return False
        if e.sealed:
            raise ValueError(f"object {oid.hex()} is sealed; use delete()")
        self._forget_create(oid, e.creator)
        for client in list(e.pins):
            self._drop_client_pin(client, oid)
        self._free(oid, e)
        return True

    def pin(self, oid: bytes, client: str, restore: bool = True,
            cached: bool = False) -> Location:
        """Pin a sealed object for ``client`` and return where to read it.

        A spilled object is restored into the arena when it fits (spilling
        others if needed), else served from its disk file.  With
        ``restore=False`` it stays where it is (a reader of the file, such as
        a transfer to another node, gains nothing from the restore).
        ``cached``: the client keeps this pin between its gets while it holds
        a reference, and gives it back when asked (:meth:`cached_holders`).
        """
        self._check_open()
        e = self._entries.get(oid)
        if e is None or e.doomed:
            raise KeyError(f"object {oid.hex()} is not in the store")
        if not e.sealed:
            raise ValueError(f"object {oid.hex()} is not sealed yet")
        if restore and e.where != ARENA and not e.pins:
            self._restore(oid, e)
        self._add_pin(oid, e, client, cached)
        self._touch(oid)
        return self._location(e)

    def _add_pin(self, oid: bytes, e: _Entry, client: str, cached: bool) -> None:
        e.pins[client] = e.pins.get(client, 0) + 1
        if cached:
            if e.cached is None:
                e.cached = set()
            e.cached.add(client)
        self._client_pins.setdefault(client, set()).add(oid)

    def cached_by(self, oid: bytes) -> list[str]:
        """The clients holding a cached pin of ``oid`` (none if unknown)."""
        e = self._entries.get(oid)
        return sorted(e.cached) if e is not None and e.cached else []

    def cached_holders(self, size: int) -> dict[str, list[bytes]]:
        """What to ask back before creating an object of ``size`` bytes.

        Empty when it fits in the arena now, or once unpinned objects are
        spilled (spilled here, least recently used first, as creating it
        would), or would not fit even with every cached pin given back.
        Else the clients to ask, each with objects pinned only by cached
        pins (least recently used first), until their bytes would cover
        what is missing; those pins are no longer counted as cached (each is
        asked for once: ask again after the answers, a free range must be
        contiguous)."""
        alloc = self._alloc
        need = alloc.rounded(size)
        if alloc.largest_free() >= need or need > alloc.capacity:
            return {}
        unpinned = self._spillable(None)
        held = []
        for oid in self._lru:
            e = self._entries[oid]
            if e.sealed and e.pins and e.cached and e.cached.issuperset(e.pins):
                held.append(oid)
        if not held:
            return {}  # nothing to ask: creating it spills or falls back as ever
        reclaim = sum(alloc.rounded(self._entries[o].size) for o in unpinned + held)
        if need > alloc.free_bytes + reclaim:
            return {}  # would not fit even then
        for oid in unpinned:
            if alloc.largest_free() >= need or not self._spill(oid):
                break
        if alloc.largest_free() >= need:
            return {}
        out: dict[str, list[bytes]] = {}
        free = alloc.free_bytes
        for oid in held:
            e = self._entries[oid]
            assert e.cached is not None
            for client in e.cached:
                out.setdefault(client, []).append(oid)
            e.cached = None
            free += alloc.rounded(e.size)
            if free >= need:
                break
        return out

    def unpin(self, oid: bytes, client: str) -> None:
        e = self._entries.get(oid)
        n = e.pins.get(client, 0) if e is not None else 0
        if not n or e is None:
            raise KeyError(f"object {oid.hex()} is not pinned by {client!r}")
        if n > 1:
            e.pins[client] = n - 1
            return
        self._drop_client_pin(client, oid)
        if e.doomed and not e.pins:
            self._free(oid, e)
        elif client == e.creator and not e.pins and e.sealed and e.where == ARENA \
                and e.size >= EXPECT_FREE_MIN:
            self._expected[oid] = (time.monotonic(), e.size)
            if len(self._expected) > 64:
                self._expected.popitem(last=False)

    def release_client(self, client: str) -> None:
        """Drop every pin of ``client`` and abort its unsealed creations."""
        for oid in list(self._client_pins.get(client, ())):
            e = self._entries[oid]
            self._drop_client_pin(client, oid)
            if e.doomed and not e.pins:
                self._free(oid, e)
        for oid in list(self._client_creates.get(client, ())):
            self.abort(oid)
        self._client_pins.pop(client, None)
        self._client_creates.pop(client, None)

    def delete(self, oid: bytes) -> bool:
        """Free an object now, or when its last pin goes; False if unknown."""
        e = self._entries.get(oid)
        if e is None:
            return False
        if e.pins or not e.sealed:
            e.doomed = True
        else:
            self._free(oid, e)
        return True

    # -- bytes access in the store's process (peer transfers) -------------------
    def read_chunk(self, oid: bytes, start: int = 0, length: int | None = None) -> bytes:
        """Copy ``length`` bytes of a sealed object from ``start``."""
        e = self._entry(oid)
        if not e.sealed:
            raise ValueError(f"object {oid.hex()} is not sealed yet")
        start, end = self._span(e, start, length)
        if e.where == ARENA:
            return bytes(self._view[e.offset + start:e.offset + end])
        with open(e.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def chunk_view(self, oid: bytes, start: int = 0, length: int | None = None) -> memoryview:
        """Like ``read_chunk`` but without a copy when the object is in the
        arena (a read-only view, valid until the object is freed: write it out
        before yielding to anything that could free it)."""
        e = self._entry(oid)
        if not e.sealed:
            raise ValueError(f"object {oid.hex()} is not sealed yet")
        if e.where != ARENA:
            return memoryview(self.read_chunk(oid, start, length))
        start, end = self._span(e, start, length)
        return self._view[e.offset + start:e.offset + end].toreadonly()

    def write_view(self, oid: bytes) -> memoryview | None:
        """A writable view of an unsealed object in the arena, or None when it
        is a disk file (write that through its ``location``).  Valid until the
        object is aborted or the store closes."""
        e = self._entry(oid)
        if e.sealed:
            raise ValueError(f"object {oid.hex()} is sealed (immutable)")
        if e.where != ARENA:
            return None
        return self._view[e.offset:e.offset + e.size]

    def write_chunk(self, oid: bytes, start: int, data: Any) -> None:
        """Write ``data`` into an unsealed object at ``start``."""
        e = self._entry(oid)
        if e.sealed:
            raise ValueError(f"object {oid.hex()} is sealed (immutable)")
        data = memoryview(data).cast("B")
        start, end = self._span(e, start, data.nbytes)
        if e.where == ARENA:
            self._view[e.offset + start:e.offset + end] = data
        else:
            with open(e.path, "r+b") as f:
                f.seek(start)
                f.write(data)

    def close(self) -> None:
        """Unmap and remove the arena and every file this store made."""
        if self._closed:
            return
        self._closed = True
        self._view.release()
        self._entries.clear()
        self._lru.clear()
        self._finalizer()

    def __enter__(self) -> "ObjectStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ---------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("object store is closed")

    def _entry(self, oid: bytes) -> _Entry:
        e = self._entries.get(oid)
        if e is None:
            raise KeyError(f"object {oid.hex()} is not in the store")
        return e

    def _span(self, e: _Entry, start: int, length: int | None) -> tuple[int, int]:
        end = e.size if length is None else start + length
        if start < 0 or end < start or end > e.size:
            raise ValueError(f"range [{start}, {end}) is outside the object "
                             f"({e.size} bytes)")
        return start, end

    def _location(self, e: _Entry) -> Location:
        if e.where == ARENA:
            return Location(self.path, e.offset, e.size)
        return Location(e.path, 0, e.size)

    def _touch(self, oid: bytes) -> None:
        if oid in self._lru:
            self._lru.move_to_end(oid)

    def _forget_create(self, oid: bytes, client: str) -> None:
        s = self._client_creates.get(client)
        if s is not None:
            s.discard(oid)
            if not s:
                del self._client_creates[client]

    def _drop_client_pin(self, client: str, oid: bytes) -> None:
        e = self._entries[oid]
        e.pins.pop(client, None)
        if e.cached:
            e.cached.discard(client)
        s = self._client_pins.get(client)
        if s is not None:
            s.discard(oid)
            if not s:
                del self._client_pins[client]

    def _spillable(self, exclude: bytes | None) -> list[bytes]:
        out = []
        for oid in self._lru:
            e = self._entries[oid]
            if e.sealed and not e.pins and oid != exclude:
                out.append(oid)
        return out

    def _allocate(self, size: int, exclude: bytes | None) -> int | None:
        """Allocate in the arena, spilling LRU objects if that makes it fit."""
        offset = self._alloc_touched(size)
        if offset is not None:
            return offset
        need = self._alloc.rounded(size)
        victims = self._spillable(exclude)
        reclaimable = sum(self._alloc.rounded(self._entries[v].size) for v in victims)
        if need > self._alloc.free_bytes + reclaimable:
            return None  # spilling everything would not be enough
        for oid in victims:
            if not self._spill(oid):
                return None
            if self._alloc.largest_free() >= need:
                return self._alloc_touched(size)
        return None

    def _alloc_touched(self, size: int) -> int | None:
        offset = self._alloc.allocate(size)
        if offset is not None:
            self._touched_end = max(self._touched_end, offset + self._alloc.rounded(size))
        return offset

    # -- large creates and the frees they may wait for --------------------------
    @property
    def touched_end(self) -> int:
        """The end of the arena memory ever handed out."""
        return self._touched_end

    def fresh_memory(self, size: int) -> bool:
        """Whether an object of ``size`` created now would take arena memory
        never used before (whose pages fault on their first write)."""
        offset = self._alloc.best_fit(size)
        return offset is not None and offset + self._alloc.rounded(size) > self._touched_end

    def free_expected(self, size: int, within: float = 1.0) -> bool:
        """Whether an object of at least ``size`` bytes in the arena had its
        creator give its last pin back within ``within`` seconds (its delete
        is likely on its way): see ``unpin``."""
        now = time.monotonic()
        exp = self._expected
        while exp and now - next(iter(exp.values()))[0] > within:
            exp.popitem(last=False)
        return any(n >= size for _, n in exp.values())

    def forget_expected(self) -> None:
        """The frees expected did not come (the objects are held elsewhere)."""
        self._expected.clear()

    def _spill(self, oid: bytes) -> bool:
        e = self._entries[oid]
        path = self._disk_path(oid)
        try:
            with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "wb") as f:
                self._files.add(path)
                f.write(self._view[e.offset:e.offset + e.size])
        except OSError:
            self._unlink(path)
            return False
        self._alloc.free(e.offset)
        del self._lru[oid]
        e.where, e.path, e.offset = SPILLED, path, 0
        return True

    def _restore(self, oid: bytes, e: _Entry) -> None:
        offset = self._allocate(e.size, exclude=oid)
        if offset is None:
            return  # serve it from its disk file
        try:
            with open(e.path, "rb") as f:
                dest = self._view[offset:offset + e.size]
                got = 0
                while got < e.size:
                    n = f.readinto(dest[got:])
                    if not n:
                        raise OSError(f"short read from {e.path}")
                    got += n
        except OSError:
            self._alloc.free(offset)
            return
        self._unlink(e.path)
        e.where, e.path, e.offset = ARENA, "", offset
        self._lru[oid] = None

    def _disk_path(self, oid: bytes) -> str:
        return os.path.join(self.spill_dir, f"obj-{oid.hex()}")

    def _make_disk_file(self, oid: bytes, size: int) -> str:
        path = self._disk_path(oid)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._files.add(path)
            try:
                os.ftruncate(fd, size)
                if size:
                    try:  # reserve blocks now: a full disk must fail here,
                        os.posix_fallocate(fd, 0, size)  # not as SIGBUS later
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
            finally:
                os.close(fd)
        except OSError as exc:
            self._unlink(path)
            raise self._full_error(oid, size, exc) from exc
        return path

    def _full_error(self, oid: bytes, size: int, exc: OSError) -> ObjectStoreFullError:
        st = self.stats()
        return ObjectStoreFullError(
            f"object store full: cannot store object {oid.hex()} of {size} bytes. "
            f"Shared memory capacity {st['capacity']} bytes, used {st['used']}, "
            f"pinned {st['pinned_bytes']}; the disk fallback in {self.spill_dir} "
            f"failed ({exc}). Fix: raise object_store_memory, drop references "
            f"to objects you no longer need (and results still pinned by "
            f"running tasks), or free disk space in {self.spill_dir}.")

    def _free(self, oid: bytes, e: _Entry) -> None:
        self._expected.pop(oid, None)
        if e.where == ARENA:
            self._alloc.free(e.offset)
            self._lru.pop(oid, None)
        else:
            self._unlink(e.path)
        del self._entries[oid]

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._files.discard(path)
