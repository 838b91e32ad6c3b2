"""``@serve.batch``: calls with one item each are gathered into one call
with a list, up to ``max_batch_size`` items or ``batch_wait_timeout_s`` after
the first arrived, on async methods (an asyncio queue) and sync methods
(threads: the first caller of a batch runs it for the others).

The wait adapts to the measured gaps between arrivals: a batch stops
waiting when no item came within twice the recent mean gap (so a lone
request at low load does not sit out the whole timeout), and never waits
past ``batch_wait_timeout_s``."""
from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import time
from typing import Any, Callable

DEFAULT_MAX_BATCH_SIZE = 10
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01


def _check(max_batch_size: Any, batch_wait_timeout_s: Any,
           max_concurrent_batches: Any = 1) -> None:
    if not isinstance(max_concurrent_batches, int) or \
            isinstance(max_concurrent_batches, bool) or max_concurrent_batches < 1:
        raise ValueError(f"@serve.batch: max_concurrent_batches must be an int >= 1, got "
                         f"{max_concurrent_batches!r}")
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or \
            max_batch_size < 1:
        raise ValueError(f"@serve.batch: max_batch_size must be an int >= 1, got "
                         f"{max_batch_size!r}")
    if not isinstance(batch_wait_timeout_s, (int, float)) or \
            isinstance(batch_wait_timeout_s, bool) or batch_wait_timeout_s < 0:
        raise ValueError(f"@serve.batch: batch_wait_timeout_s must be a number >= 0, got "
                         f"{batch_wait_timeout_s!r}")


def _split(fn_name: str, results: Any, n: int) -> list:
    if not isinstance(results, (list, tuple)) or len(results) != n:
        got = f"{type(results).__name__}" + (
            f" of length {len(results)}" if hasattr(results, "__len__") else "")
        raise TypeError(f"@serve.batch method {fn_name}() got a batch of {n} and must "
                        f"return a list of {n} results, got {got}")
    return list(results)


class _Gaps:
    """Exponentially weighted mean of the time between arrivals."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.mean: float | None = None

    def arrived(self, now: float) -> None:
        if self.last is not None:
            gap = now - self.last
            self.mean = gap if self.mean is None else 0.8 * self.mean + 0.2 * gap
        self.last = now

    def patience(self, left: float) -> float:
        """How long to wait for the next item, at most ``left``."""
        if self.mean is None:
            return left
        return min(left, 2.0 * self.mean)


class _AsyncBatcher:
    """The queue of one (instance, method) on one event loop."""

    def __init__(self, fn: Callable, size: int, wait: float, concurrent: int = 1) -> None:
        self.fn, self.size, self.wait = fn, size, wait
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []
        self.gaps = _Gaps()
        self.concurrent = concurrent
        self.sem: asyncio.Semaphore | None = None

    async def submit(self, self_arg: Any, item: Any) -> Any:
        self.gaps.arrived(time.monotonic())
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run(self_arg))
        return await fut

    async def _run(self, self_arg: Any) -> None:
        loop = asyncio.get_running_loop()
        if self.sem is None:
            self.sem = asyncio.Semaphore(self.concurrent)
        while not self.queue.empty():
            await self.sem.acquire()      # at most max_concurrent_batches at once
            if self.queue.empty():
                self.sem.release()
                break
            batch = [self.queue.get_nowait()]
            deadline = loop.time() + self.wait
            while len(batch) < self.size:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(),
                                                        self.gaps.patience(left)))
                except asyncio.TimeoutError:
                    break
            self.batch_sizes.append(len(batch))
            del self.batch_sizes[:-1000]
            asyncio.ensure_future(self._execute(self_arg, batch))

    async def _execute(self, self_arg: Any, batch: list) -> None:
        items = [b[0] for b in batch]
        try:
            args = (self_arg, items) if self_arg is not None else (items,)
            results = _split(self.fn.__name__, await self.fn(*args), len(items))
            for (_, fut), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)
        except BaseException as e:  # noqa: BLE001 - every caller gets it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
        finally:
            assert self.sem is not None
            self.sem.release()


class _ThreadBatcher:
    """Batches calls made from several threads into one call."""

    def __init__(self, fn: Callable, size: int, wait: float, concurrent: int = 1) -> None:
        self.fn, self.size, self.wait = fn, size, wait
        self.running = threading.Semaphore(concurrent)
        self.cond = threading.Condition()
        self.pending: list[list] = []     # [item, done event, result, error]
        self.leader = False
        self.batch_sizes: list[int] = []
        self.gaps = _Gaps()

    def submit(self, self_arg: Any, item: Any) -> Any:
        entry = [item, threading.Event(), None, None]
        with self.cond:
            self.gaps.arrived(time.monotonic())
            self.pending.append(entry)
            self.cond.notify_all()
            lead = not self.leader
            if lead:
                self.leader = True
        if lead:
            self._lead(self_arg)
        entry[1].wait()
        if entry[3] is not None:
            raise entry[3]
        return entry[2]

    def _lead(self, self_arg: Any) -> None:
        deadline = time.monotonic() + self.wait
        with self.cond:
            while len(self.pending) < self.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                have = len(self.pending)
                self.cond.wait(self.gaps.patience(left))
                if len(self.pending) == have:
                    break             # nothing came within the expected gap
            batch, self.pending = self.pending[:self.size], self.pending[self.size:]
            self.leader = False
            if self.pending:          # leftovers: the next caller to arrive leads;
                self.leader = True    # none may come, so this thread leads again
                again = True
            else:
                again = False
        self.batch_sizes.append(len(batch))
        del self.batch_sizes[:-1000]
        try:
            args = (self_arg, [b[0] for b in batch]) if self_arg is not None \
                else ([b[0] for b in batch],)
            with self.running:            # at most max_concurrent_batches at once
                results = _split(self.fn.__name__, self.fn(*args), len(batch))
            for b, r in zip(batch, results):
                b[2] = r
        except BaseException as e:  # noqa: BLE001
            for b in batch:
                b[3] = e
        for b in batch:
            b[1].set()
        if again:
            self._lead(self_arg)


def batch(_func: Callable | None = None, /, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
          batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
          max_concurrent_batches: int = 1) -> Any:
    """``@serve.batch`` or ``@serve.batch(max_batch_size=, batch_wait_timeout_s=,
    max_concurrent_batches=)`` on a method (or function) taking one list and
    returning a list of the same length; callers pass one item and get one
    result. Up to ``max_concurrent_batches`` batches run at once."""
    _check(max_batch_size, batch_wait_timeout_s, max_concurrent_batches)

    def wrap(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters)
        is_method = bool(params) and params[0] == "self"
        attr = f"_serve_batcher_{fn.__name__}_{id(fn)}"
        free: dict[str, Any] = {}

        def batcher_for(owner: Any, kind: type) -> Any:
            holder = owner.__dict__ if owner is not None else free
            b = holder.get(attr)
            if b is None:
                b = holder.setdefault(attr, kind(fn, max_batch_size, batch_wait_timeout_s,
                                                 max_concurrent_batches))
            return b

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any) -> Any:
                owner, item = (args[0], args[1]) if is_method else (None, args[0])
                return await batcher_for(owner, _AsyncBatcher).submit(owner, item)
            wrapper: Any = async_wrapper
        else:
            @functools.wraps(fn)
            def sync_wrapper(*args: Any) -> Any:
                owner, item = (args[0], args[1]) if is_method else (None, args[0])
                return batcher_for(owner, _ThreadBatcher).submit(owner, item)
            wrapper = sync_wrapper
        wrapper._serve_max_batch_size = max_batch_size
        wrapper._serve_batch_wait_timeout_s = batch_wait_timeout_s
        return wrapper

    if _func is not None:
        return wrap(_func)
    return wrap
