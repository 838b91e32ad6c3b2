"""Refs to the values a generator task yields (Ray's names).

``num_returns="streaming"``: ``.remote()`` returns an ``ObjectRefGenerator``
at once.  Each value the task yields becomes an object as soon as it is
yielded; iterating the generator gives their refs in order, waiting for the
next one (on a notification from the head, not by polling).  If the task
fails, the ref after the last value yielded holds the error (``get`` raises
it), then iteration stops.

``num_returns="dynamic"``: ``.remote()`` returns one ref; its value, once the
task has finished, is a ``DynamicObjectRefGenerator`` over the refs of every
value yielded.

The i-th value yielded (from 1) is the object ``object_id(task, i)``; the
task's own return object (index 0) ends the stream: it holds the number of
values (or the error), and keeps the values alive while it lives.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Iterator

from .. import ids
from ..context import require_client
from ..exceptions import GetTimeoutError
from . import serialization
from .ref import ObjectRef, current_client

if TYPE_CHECKING:
    from ..client.core import CoreClient


class ObjectRefGenerator:
    """The refs of a streaming generator task's values, in order.

    ``for ref in gen`` / ``next(gen)`` (blocking), ``async for ref in gen``,
    ``gen.completed()`` (the ref that is ready when the task has ended)."""

    def __init__(self, end: ObjectRef, client: CoreClient | None = None):
        self._end = end
        c = client or end._client or current_client()
        if c is None:
            raise RuntimeError("flowcore is not initialized: call flowcore.init() first")
        self._client: CoreClient = c
        self._tid = ids.task_of(end._id)
        self._next_index = 1
        self._finished = False
        self._client.streams.add(self._tid)

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._tid.hex()}, next={self._next_index})"

    def __iter__(self) -> Iterator[ObjectRef]:
        return self

    def __next__(self) -> ObjectRef:
        return self._next(None)

    def __aiter__(self) -> "ObjectRefGenerator":
        return self

    async def __anext__(self) -> ObjectRef:
        ref = await asyncio.get_running_loop().run_in_executor(None, self._next_or_none)
        if ref is None:
            raise StopAsyncIteration
        return ref

    def _next_or_none(self) -> ObjectRef | None:
        try:  # (StopIteration cannot cross a future)
            return self._next(None)
        except StopIteration:
            return None

    def completed(self) -> ObjectRef:
        """A ref that is ready once the task has ended (its value: the number
        of values yielded; ``get`` raises the task's error if it failed)."""
        return self._end

    def is_finished(self) -> bool:
        """True once every value has been handed out (or the error was)."""
        return self._finished

    def next_ready(self) -> bool:
        """True if ``next()`` would not wait."""
        if self._finished:
            return True
        c = self._client
        item = ids.object_id(self._tid, self._next_index)
        return item in c.ready or self._end._id in c.ready

    def _next(self, timeout: float | None) -> ObjectRef:
        if self._finished:
            raise StopIteration
        c = self._client
        item = ids.object_id(self._tid, self._next_index)
        end = self._end._id
        with c._lock:
            # the head tells this client of each value as it is yielded: never
            # ask it about one not yielded yet (it would answer "unknown")
            c.subscribed.add(item)
        ready = c.objects.wait_ready([item, end], 1, timeout)
        if item not in ready and end not in ready:
            raise GetTimeoutError(f"no value from the generator within {timeout} s")
        if item not in ready:
            with c._lock:
                c.subscribed.discard(item)
            try:
                count = require_client().objects.get_values([self._end], None)[0]
            except Exception:  # noqa: BLE001 - the task failed: its error is the next ref
                self._close()
                return self._end
            if self._next_index <= count:  # yielded but not heard of yet: it is coming
                c.objects.wait_ready([item], 1, None)
            else:
                self._close()
                raise StopIteration
        self._next_index += 1
        ref: ObjectRef = ObjectRef(item, c)
        with c._lock:
            c.subscribed.discard(item)
        return ref

    def __reduce__(self) -> Any:
        raise TypeError("an ObjectRefGenerator cannot be passed to tasks or stored: iterate it "
                        "here and pass the refs (or a list of them)")

    def _close(self) -> None:
        self._finished = True
        self._client.streams.discard(self._tid)

    def __del__(self) -> None:
        c = self.__dict__.get("_client")
        if c is None:
            return
        c.streams.discard(self._tid)
        # values that arrived but were never handed out: forget them here (the
        # head frees them with the task's end object)
        i = self._next_index
        while True:
            oid = ids.object_id(self._tid, i)
            if c.refcounts.get(oid) or c.ready.pop(oid, None) is None:
                break
            i += 1


class DynamicObjectRefGenerator:
    """The value of a ``num_returns="dynamic"`` task: the refs of the values
    it yielded, in order (iterable, ``len()``)."""

    def __init__(self, refs: list[ObjectRef]):
        self._refs = list(refs)

    def __iter__(self) -> Iterator[ObjectRef]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"DynamicObjectRefGenerator({len(self._refs)} refs)"

    def __reduce__(self) -> Any:
        return (DynamicObjectRefGenerator, (self._refs,))


class YieldedRefs:
    """In the worker: the end value of a dynamic generator task, naming the
    yielded objects by id (no ObjectRef is made, so nothing is counted
    twice); it unpickles as a ``DynamicObjectRefGenerator``."""

    def __init__(self, oids: list[bytes]):
        self.oids = list(oids)

    def __reduce__(self) -> Any:
        for oid in self.oids:
            serialization.note_contained_ref(oid)
        return (_rebuild_dynamic, (self.oids,))


def _rebuild_dynamic(oids: list[bytes]) -> DynamicObjectRefGenerator:
    return DynamicObjectRefGenerator([ObjectRef(oid) for oid in oids])
