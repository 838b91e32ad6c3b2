"""Store objects a client keeps pinned and mapped between its gets.

Without this, every ``get`` of an object in the node's store is a ``pin``
round trip to the node (a few hundred microseconds of process wake-ups),
however often the process read it before.  A client instead keeps the pin
of an object it put or already got for as long as it holds a reference to
it; a repeat get maps the known location again (no message, no copy), so it
costs the same at 1 MiB and at 1 GiB.

The node counts a held pin like any other (the bytes stay where they are:
neither spilled nor reused), and marks it *cached*: when it needs the room
for a new object, it asks the client to give such pins back
(``release_cached``) before it spills anything else or falls back to disk.
A held pin goes (an ``unpin``) once the client has been asked, or has
dropped its last reference, and no view made from it is alive any more:
the bytes under a live view are never released.

The table is guarded by the client's lock; the view finalisers (which may
run in any thread, inside locked sections during garbage collection) take no
lock: they only discard a key from a set and append to a deque.
"""
from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable

from .store import Location

__all__ = ["HeldObjects", "Held"]

_keys = itertools.count()


class Held:
    """One held pin: where the object is, on which node, and its live views."""

    __slots__ = ("oid", "loc", "node", "live", "dropped", "layout")

    def __init__(self, oid: bytes, loc: Location, node: str) -> None:
        self.oid = oid
        self.loc = loc
        self.node = node
        self.layout: Any = None  # serialization.Layout, once read (immutable bytes)
        self.live: set[int] = set()  # keys of views not yet released
        self.dropped = False  # the pin goes once ``live`` is empty


class HeldObjects:
    """A client's held pins (see the module docstring).

    Methods other than the finaliser's are called with the client's lock held.
    """

    def __init__(self) -> None:
        self._table: dict[bytes, Held] = {}
        # views of dropped pins released since the last collect()
        self._released: deque[Held] = deque()

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._table

    def add(self, oid: bytes, loc: Location, node: str) -> Held | None:
        """Keep the pin the client just took; None if one is already held
        (the new pin then stays a plain one, released with its view)."""
        if oid in self._table:
            return None
        h = self._table[oid] = Held(oid, loc, node)
        return h

    def lookup(self, oid: bytes, node: str) -> tuple[Held, int] | None:
        """A held pin of ``oid`` on ``node`` and the key of a new view of it
        (registered live now, so the pin cannot go before the view does)."""
        table = self._table
        h = table.get(oid)
        if h is None or h.dropped or h.node != node:
            return None
        key = next(_keys)
        h.live.add(key)
        if len(table) > 1:
            table[oid] = table.pop(oid)  # the most recently used last
        return h, key

    def trim(self, keep: int) -> list[bytes]:
        """Give back the least recently used pins beyond ``keep`` that no
        view uses now (a worker's bound: it holds no references to tell it
        when to stop); the oids to unpin."""
        out: list[bytes] = []
        excess = len(self._table) - keep
        if excess <= 0:
            return out
        for oid, h in list(self._table.items()):
            if not h.live and not h.dropped:
                h.dropped = True
                del self._table[oid]
                out.append(oid)
                excess -= 1
                if not excess:
                    break
        return out

    def new_key(self, h: Held) -> int:
        key = next(_keys)
        h.live.add(key)
        return key

    def on_release(self, h: Held, key: int, wake: Callable[[], None]) -> Callable[[], None]:
        """The finaliser of one view made from ``h`` (no locks: see module)."""
        def release() -> None:
            h.live.discard(key)
            if h.dropped and not h.live:
                self._released.append(h)
                wake()
        return release

    def drop(self, oid: bytes) -> bool:
        """The client stops holding ``oid`` (no reference left, or the node
        asks for the pin back).  True when the pin is to be given back now;
        else it goes when the last live view does (see :meth:`collect`)."""
        h = self._table.get(oid)
        if h is None or h.dropped:
            return False
        h.dropped = True  # before reading live: a concurrent release sees it
        if h.live:
            return False
        del self._table[oid]
        return True

    def collect(self) -> list[bytes]:
        """Dropped pins whose last view was released since: to unpin now."""
        out = []
        released = self._released
        while released:
            h = released.popleft()
            if self._table.get(h.oid) is h and not h.live:
                del self._table[h.oid]
                out.append(h.oid)
        return out

    def pending(self) -> bool:
        return bool(self._released)

    def forget(self) -> None:
        """The node went away with every pin: nothing to give back."""
        self._table.clear()
        self._released.clear()
