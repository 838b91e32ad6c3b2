"""``ActorPool``: spread work over a fixed set of actors (Ray's
``ray.util.ActorPool``), on the public API only.

Each actor runs one submitted call at a time; work submitted while every
actor is busy waits in the pool (in the driver, not in the actors' queues)
and goes to the first actor that comes back.  Results come back in
submission order (``get_next``, ``map``) or as they finish
(``get_next_unordered``, ``map_unordered``).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator

from ..api import get, wait
from ..exceptions import GetTimeoutError
from ..objects.ref import ObjectRef

Submit = Callable[[Any, Any], Any]  # fn(actor, value) -> ObjectRef (or a list of them)


def _key(result: Any) -> Any:
    """A hashable key for what ``fn`` returned (a ref, or a list of refs)."""
    return tuple(result) if isinstance(result, list) else result


def _first_ref(result: Any) -> ObjectRef:
    return result[0] if isinstance(result, (list, tuple)) else result


class ActorPool:
    """A pool of actors that calls are handed to as actors become free.

    ``fn(actor, value)`` passed to ``submit``/``map`` must call one method of
    ``actor`` and return its ``ObjectRef``::

        pool = ActorPool([Worker.remote() for _ in range(2)])
        list(pool.map(lambda a, v: a.double.remote(v), [1, 2, 3]))  # [2, 4, 6]
    """

    def __init__(self, actors: list):
        actors = list(actors)
        self._idle: list = actors
        self._busy: dict[Any, tuple[int, Any]] = {}   # key -> (index, actor)
        self._by_index: dict[int, Any] = {}           # index -> what fn returned
        self._next_index = 0          # index of the next submission
        self._next_return = 0         # index get_next returns next
        self._waiting: deque[tuple[Submit, Any]] = deque()

    # ------------------------------------------------------------ submitting
    def submit(self, fn: Submit, value: Any) -> None:
        """Run ``fn(actor, value)`` on an idle actor, or queue it until one
        is free.  Get the result with ``get_next`` or ``get_next_unordered``."""
        if not self._idle:
            self._waiting.append((fn, value))
            return
        actor = self._idle.pop()
        result = fn(actor, value)
        if not isinstance(_first_ref(result), ObjectRef):
            self._idle.append(actor)
            raise TypeError(f"ActorPool: fn(actor, value) must return the ObjectRef of an actor "
                            f"call (e.g. lambda a, v: a.method.remote(v)), got "
                            f"{type(result).__name__}")
        self._busy[_key(result)] = (self._next_index, actor)
        self._by_index[self._next_index] = result
        self._next_index += 1

    def map(self, fn: Submit, values: Iterable[Any]) -> Iterator[Any]:
        """Apply ``fn`` to every value; yields the results in the order of
        ``values``.  Results not yet fetched from earlier submissions are
        dropped first."""
        self._drop_unfetched()
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next()

    def map_unordered(self, fn: Submit, values: Iterable[Any]) -> Iterator[Any]:
        """Like ``map``, yielding each result as soon as it is ready."""
        self._drop_unfetched()
        for v in values:
            self.submit(fn, v)
        while self.has_next():
            yield self.get_next_unordered()

    def _drop_unfetched(self) -> None:
        """Forget earlier submissions' results; their actors take new work at
        once (calls still running finish first, in the actor's own queue)."""
        for index in sorted(self._by_index):
            result = self._by_index.pop(index)
            _, actor = self._busy.pop(_key(result))
            self._idle.append(actor)
        self._next_return = self._next_index

    # ------------------------------------------------------------ results
    def has_next(self) -> bool:
        """True while some submitted call's result has not been fetched."""
        return bool(self._busy)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The result of the oldest submission not yet returned (in order).

        With ``timeout`` (seconds) it raises ``TimeoutError`` if that result
        is not ready in time; the submission stays next unless
        ``ignore_if_timedout=True``, which skips it (and frees its actor)."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._next_return >= self._next_index or self._next_return not in self._by_index:
            raise ValueError("get_next() cannot be mixed with get_next_unordered() since the "
                             "last submit: fetch the rest with get_next_unordered()")
        result = self._by_index[self._next_return]
        timed_out = False
        if timeout is not None:
            ready, _ = wait([_first_ref(result)], timeout=timeout)
            if not ready:
                if not ignore_if_timedout:
                    raise GetTimeoutError(f"ActorPool.get_next(): no result within {timeout} s")
                timed_out = True
        del self._by_index[self._next_return]
        self._next_return += 1
        _, actor = self._busy.pop(_key(result))
        self._give_back(actor)
        if timed_out:
            raise GetTimeoutError(f"ActorPool.get_next(): no result within {timeout} s; the "
                                  f"submission was skipped")
        return get(result)

    def get_next_unordered(self, timeout: float | None = None,
                           ignore_if_timedout: bool = False) -> Any:
        """The result of whichever submission finishes first.

        Raises ``TimeoutError`` if none finishes within ``timeout`` seconds;
        with ``ignore_if_timedout=True`` the oldest submission is skipped
        then (and its actor freed)."""
        if not self.has_next():
            raise StopIteration("No more results to get")
        firsts = {_first_ref(k): k for k in self._busy}
        ready, _ = wait(list(firsts), num_returns=1, timeout=timeout)
        if not ready:
            msg = f"ActorPool.get_next_unordered(): no result within {timeout} s"
            if ignore_if_timedout:
                oldest = min(self._by_index)
                _, actor = self._busy.pop(_key(self._by_index.pop(oldest)))
                self._next_return = max(self._next_return, oldest + 1)
                self._give_back(actor)
                msg += "; the oldest submission was skipped"
            raise GetTimeoutError(msg)
        key = firsts[ready[0]]
        index, actor = self._busy.pop(key)
        result = self._by_index.pop(index)
        self._next_return = max(self._next_return, index + 1)
        self._give_back(actor)
        return get(result)

    # ------------------------------------------------------------ actors
    def _give_back(self, actor: Any) -> None:
        self._idle.append(actor)
        if self._waiting:
            fn, value = self._waiting.popleft()
            self.submit(fn, value)

    def has_free(self) -> bool:
        """True if an actor is idle and no submission is waiting for one."""
        return bool(self._idle) and not self._waiting

    def pop_idle(self) -> Any:
        """Take an idle actor out of the pool (None if none is free)."""
        return self._idle.pop() if self.has_free() else None

    def push(self, actor: Any) -> None:
        """Add an actor to the pool (it takes a waiting submission at once)."""
        if actor in self._idle or any(a == actor for _, a in self._busy.values()):
            raise ValueError("Actor already belongs to current ActorPool")
        self._give_back(actor)
