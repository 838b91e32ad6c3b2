"""Client-side access to store objects (driver and worker processes).

The arena file is mapped once per process and kept; disk-backed object files
are mapped per object and unmapped when their last reader is gone.  Readers
get pyarrow Buffers whose base is a release token: when the buffer and every
view made from it are garbage, the token's finaliser calls ``on_release``
(exactly once, from whichever thread dropped the last reference).
"""
from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import weakref
from typing import Any, Callable

import pyarrow as pa

from flowcore.objects.store import Location, is_arena_path

__all__ = ["StoreMapping"]

_keys = itertools.count()


def _address_of(mm: mmap.mmap) -> int:
    c = ctypes.c_char.from_buffer(mm)  # a temporary export, released below
    try:
        return ctypes.addressof(c)
    finally:
        del c


class _Map:
    """One mmap of a whole file and the keys of live readers over it."""

    __slots__ = ("path", "mm", "address", "size", "live", "__weakref__")

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, self.size) if self.size else None
        finally:
            os.close(fd)
        self.path = path
        self.address = _address_of(self.mm) if self.mm is not None else 0
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


class _ReleaseToken:
    """Base object of a reader's buffer; its finaliser reports the release."""

    __slots__ = ("_map", "_key", "_on_release")

    def __init__(self, m: _Map | None, key: int, on_release: Callable[[], None]) -> None:
        self._map = m  # keeps a per-object file mapping alive while read
        self._key = key
        self._on_release = on_release

    def __del__(self) -> None:
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

    def writable(self, loc: Location) -> memoryview:
        """A writable view of exactly ``loc.size`` bytes at ``loc``."""
        if loc.size == 0:
            return memoryview(bytearray(0))
        m = self._map(loc.path)
        m.check(loc)
        return memoryview(m.mm)[loc.offset:loc.offset + loc.size]

    def readable(self, loc: Location, on_release: Callable[[], None]) -> pa.Buffer:
        """A read-only pyarrow Buffer over ``loc``; ``on_release()`` runs once
        when it and every view derived from it are garbage."""
        if loc.size == 0:
            token = _ReleaseToken(None, 0, on_release)
            return pa.foreign_buffer(0, 0, base=token)
        m = self._map(loc.path)
        m.check(loc)
        key = next(_keys)
        token = _ReleaseToken(m, key, on_release)
        m.live.add(key)
        return pa.foreign_buffer(m.address + loc.offset, loc.size, base=token)

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
