"""Client-side access to store objects (driver and worker processes).

The arena file is mapped once per process and kept; disk-backed object files
are mapped per object and unmapped when their last reader is gone.  Readers
get read-only memoryviews whose exporter is a small ctypes array laid over the
mapping: when the view and every view made from it (slices, NumPy arrays,
Arrow buffers) are garbage, the exporter's finaliser calls ``on_release``
(exactly once, from whichever thread dropped the last reference).

Nothing here imports pyarrow: importing it costs ~70-100 ms, which a worker
would otherwise pay on the first task that reads a store object.
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import weakref
from typing import Any, Callable

from flowcore.objects.store import Location, is_arena_path

__all__ = ["StoreMapping"]

_keys = itertools.count()


def _exporter_span(offset: int, size: int, map_size: int) -> tuple[int, int]:
    """``(start, length)`` of an exporter covering ``[offset, offset + size)``
    inside a mapping of ``map_size`` bytes.

    ctypes keeps every array type ``c_ubyte * n`` (one per length) for the
    life of the process, so exporters come in power-of-two lengths: a few
    dozen types, whatever the object sizes.  Only an exporter of a whole
    mapping may have another length (see :func:`_array_type`).  The reader's
    view is then sliced to the object exactly.
    """
    length = 1 << max(size - 1, 0).bit_length()
    if length >= map_size:
        return 0, map_size
    start = offset if offset + length <= map_size else map_size - length
    return start, length


def _array_type(length: int) -> Any:
    """The ctypes array type of ``length`` bytes: the cached one for a power
    of two, else a type of its own, kept by its mapping and freed with it (a
    disk-backed object's file is mapped whole, and those sizes are many)."""
    if length & (length - 1) == 0:
        return ctypes.c_ubyte * length
    return type("_StoreBytes", (ctypes.Array,), {"_type_": ctypes.c_ubyte, "_length_": length})


class _Map:
    """One mmap of a whole file and the keys of live readers over it."""

    __slots__ = ("path", "mm", "size", "live", "whole", "__weakref__")

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, self.size) if self.size else None
        finally:
            os.close(fd)
        self.path = path
        self.whole: Any = None  # the array type of the whole mapping, once needed
        self.live: set[int] = set()  # set.add/discard are atomic under the GIL

    def check(self, loc: Location) -> None:
        if loc.offset < 0 or loc.size < 0 or loc.offset + loc.size > self.size:
            raise ValueError(f"location {loc} is outside {self.path} "
                             f"({self.size} bytes)")

    def close(self) -> None:
        if self.mm is not None and not self.live:
            try:
                self.mm.close()
            except BufferError:  # writable views still exported
                pass


class _Release:
    """The finaliser of one reader's exporter: drops the reader's key (so a
    per-object file mapping can close) and reports the release."""

    __slots__ = ("_map", "_key", "_on_release")

    def __init__(self, m: _Map | None, key: int, on_release: Callable[[], None]) -> None:
        self._map = m
        self._key = key
        self._on_release: Callable[[], None] | None = on_release

    def __call__(self) -> None:
        m, cb = self._map, self._on_release
        self._map = self._on_release = None
        if m is not None:
            m.live.discard(self._key)
        if cb is not None:
            cb()


class StoreMapping:
    """Maps store locations into this process (one per process is enough)."""

    def __init__(self) -> None:
        self._arenas: dict[str, _Map] = {}
        self._files: weakref.WeakValueDictionary[str, _Map] = weakref.WeakValueDictionary()

    def _map(self, path: str) -> _Map:
        m = self._arenas.get(path)
        if m is not None:
            return m
        if is_arena_path(path):
            m = self._arenas.get(path)
            if m is None:
                m = self._arenas[path] = _Map(path)
            return m
        m = self._files.get(path)
        if m is None:
            m = _Map(path)
            self._files[path] = m
        return m

    def premap(self, path: str) -> None:
        """Map the store arena at ``path`` ahead of the first read of it
        (a worker does it as it starts); nothing if it cannot be opened."""
        if is_arena_path(path) and path not in self._arenas:
            try:
                self._map(path)
            except OSError:
                pass

    def writable(self, loc: Location) -> memoryview:
        """A writable view of exactly ``loc.size`` bytes at ``loc``."""
        if loc.size == 0:
            return memoryview(bytearray(0))
        m = self._map(loc.path)
        m.check(loc)
        assert m.mm is not None  # loc.size > 0 fits in it: it is mapped
        return memoryview(m.mm)[loc.offset:loc.offset + loc.size]

    def readable(self, loc: Location, on_release: Callable[[], None]) -> memoryview:
        """A read-only memoryview of ``loc`` (format ``B``); ``on_release()``
        runs once when it and every view derived from it are garbage.

        The cost does not depend on the size: no copy, no page is touched.
        """
        if loc.size == 0:
            exporter: Any = (ctypes.c_ubyte * 0)()
            weakref.finalize(exporter, _Release(None, 0, on_release)).atexit = False
            return memoryview(exporter).cast("B").toreadonly()
        m = self._map(loc.path)
        m.check(loc)
        start, length = _exporter_span(loc.offset, loc.size, m.size)
        # from_buffer holds an export of the mmap: it cannot be unmapped under
        # a live reader
        if length == m.size:
            if m.whole is None:
                m.whole = _array_type(length)
            array_type = m.whole
        else:
            array_type = ctypes.c_ubyte * length
        exporter = array_type.from_buffer(m.mm, start)
        key = next(_keys)
        m.live.add(key)
        fin = weakref.finalize(exporter, _Release(m, key, on_release))
        fin.atexit = False
        lo = loc.offset - start
        view = memoryview(exporter).cast("B")[lo:lo + loc.size].toreadonly()
        return view

    def live_readers(self, path: str | None = None) -> int:
        """Number of readable buffers not yet released (for tests/debug)."""
        maps: list[Any] = list(self._arenas.values()) + list(self._files.values())
        return sum(len(m.live) for m in maps if path is None or m.path == path)

    def mapped_paths(self) -> list[str]:
        return list(self._arenas) + list(self._files.keys())

    def close(self) -> None:
        """Unmap every mapping without live readers or exported views."""
        for m in list(self._arenas.values()) + list(self._files.values()):
            m.close()
        self._arenas.clear()
        self._files.clear()
