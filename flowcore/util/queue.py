"""``flowcore.util.queue.Queue``: a first-in, first-out queue that lives in
an actor, so tasks, actors and the driver share it.

Same API as ``ray.util.queue``: ``put``/``get`` block (optionally with a
``timeout``) and raise ``Full``/``Empty``; ``put_nowait``/``get_nowait`` and
their ``_batch`` forms never block; ``put_async``/``get_async`` are
coroutines for asyncio code; ``shutdown()`` ends the actor.  A ``Queue``
pickles to its actor handle, so pass it to tasks and actors as an argument.
The actor holds no CPU (``num_cpus=0``): a queue never takes a slot from
the tasks that fill or drain it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import flowcore
from flowcore.exceptions import GetTimeoutError


class Empty(Exception):
    """``get`` found no item (non-blocking, or the timeout passed)."""


class Full(Exception):
    """``put`` found no room (non-blocking, or the timeout passed)."""


def _check_timeout(where: str, timeout: Any) -> None:
    if timeout is None:
        return
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise ValueError(f"{where}(timeout={timeout!r}): 'timeout' must be a non-negative "
                         f"number of seconds, or None to wait forever")


class _QueueActor:
    """The actor that owns the items: an ``asyncio.Queue`` on its event loop,
    so blocked ``put``/``get`` calls wait there without holding a thread."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    async def qsize(self) -> int:
        return self.queue.qsize()

    async def empty(self) -> bool:
        return self.queue.empty()

    async def full(self) -> bool:
        return self.queue.full()

    async def put(self, item: Any, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except asyncio.TimeoutError:
            raise Full from None

    async def get(self, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            raise Empty from None

    async def put_nowait(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Full from None

    async def put_nowait_batch(self, items: list) -> None:
        if self.maxsize > 0 and len(items) + self.queue.qsize() > self.maxsize:
            raise Full(f"Cannot add {len(items)} items to queue of size {self.queue.qsize()} "
                       f"and maxsize {self.maxsize}.")
        for item in items:
            self.queue.put_nowait(item)

    async def get_nowait(self) -> Any:
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            raise Empty from None

    async def get_nowait_batch(self, num_items: int) -> list:
        if num_items > self.queue.qsize():
            raise Empty(f"Cannot get {num_items} items from queue of size "
                        f"{self.queue.qsize()}.")
        return [self.queue.get_nowait() for _ in range(num_items)]


def _unwrap(err: BaseException) -> BaseException:
    """The ``Empty``/``Full`` the actor raised, without the task wrapper."""
    if isinstance(err, Empty):
        cause = getattr(err, "cause", None)
        return Empty(*cause.args) if cause else Empty()
    if isinstance(err, Full):
        cause = getattr(err, "cause", None)
        return Full(*cause.args) if cause else Full()
    return err


class Queue:
    """A first-in, first-out queue in an actor, shared by the driver, tasks
    and actors that hold it.

    ``maxsize`` <= 0 means unbounded.  ``actor_options`` are passed to the
    actor's ``.options()`` (e.g. ``{"name": "jobs"}`` or a scheduling
    strategy); by default the actor holds no CPU.
    """

    def __init__(self, maxsize: int = 0, actor_options: dict | None = None) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"Queue(maxsize={maxsize!r}): expected an int (0 or less: "
                            f"unbounded)")
        if actor_options is not None and not isinstance(actor_options, dict):
            raise TypeError(f"Queue(actor_options=...): expected a dict of actor options, got "
                            f"{type(actor_options).__name__}")
        options = {"num_cpus": 0, **(actor_options or {})}
        self.maxsize = maxsize
        self.actor: Any = flowcore.remote(_QueueActor).options(**options).remote(self.maxsize)

    def __len__(self) -> int:
        return self.size()

    def __reduce__(self) -> Any:
        return (_rebuild, (self.maxsize, self.actor))

    def _actor(self) -> Any:
        if self.actor is None:
            raise RuntimeError("this Queue was shut down; create a new Queue")
        return self.actor

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return flowcore.get(getattr(self._actor(), method).remote(*args))
        except (Empty, Full) as e:
            raise _unwrap(e) from None

    async def _acall(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._actor(), method).remote(*args)
        except (Empty, Full) as e:
            raise _unwrap(e) from None

    def size(self) -> int:
        """The number of items in the queue."""
        return self._call("qsize")

    def qsize(self) -> int:
        """The number of items in the queue."""
        return self.size()

    def empty(self) -> bool:
        """Whether the queue is empty."""
        return self._call("empty")

    def full(self) -> bool:
        """Whether the queue is full (never, when unbounded)."""
        return self._call("full")

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add ``item``.  With ``block`` (the default) wait for room, at most
        ``timeout`` seconds (None: forever), then raise ``Full``; without
        ``block`` raise ``Full`` at once if there is no room."""
        _check_timeout("put", timeout)
        if not block:
            self._call("put_nowait", item)
        else:
            self._call("put", item, timeout)

    async def put_async(self, item: Any, block: bool = True,
                        timeout: float | None = None) -> None:
        """``put`` for asyncio code: awaits room without blocking the loop."""
        _check_timeout("put_async", timeout)
        if not block:
            await self._acall("put_nowait", item)
        else:
            await self._acall("put", item, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the oldest item.  With ``block`` (the default)
        wait for one, at most ``timeout`` seconds (None: forever), then raise
        ``Empty``; without ``block`` raise ``Empty`` at once if there is none."""
        _check_timeout("get", timeout)
        if not block:
            return self._call("get_nowait")
        return self._call("get", timeout)

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """``get`` for asyncio code: awaits an item without blocking the loop."""
        _check_timeout("get_async", timeout)
        if not block:
            return await self._acall("get_nowait")
        return await self._acall("get", timeout)

    def put_nowait(self, item: Any) -> None:
        """``put(item, block=False)``."""
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add all of ``items`` at once, or none of them (``Full`` if they do
        not all fit)."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        self._call("put_nowait_batch", list(items))

    def get_nowait(self) -> Any:
        """``get(block=False)``."""
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list:
        """Remove and return the ``num_items`` oldest items, or none of them
        (``Empty`` if there are fewer)."""
        if not isinstance(num_items, int) or isinstance(num_items, bool):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        return self._call("get_nowait_batch", num_items)

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """End the queue's actor; its items are gone.  Without ``force``,
        calls already sent get ``grace_period_s`` seconds to finish first.
        Later calls on this ``Queue`` raise."""
        actor, self.actor = self.actor, None
        if actor is None:
            return
        if not force:
            try:  # the actor answers once the calls sent before this one started
                flowcore.get(actor.qsize.remote(), timeout=grace_period_s)
            except (GetTimeoutError, flowcore.exceptions.ActorError):
                pass
        flowcore.kill(actor, no_restart=True)


def _rebuild(maxsize: int, actor: Any) -> Queue:
    q = Queue.__new__(Queue)
    q.maxsize = maxsize
    q.actor = actor
    return q


__all__ = ["Queue", "Empty", "Full"]
