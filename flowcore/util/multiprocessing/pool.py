"""``Pool``: ``multiprocessing.Pool``'s API with actors as the processes.

Each pool process is an actor (holding one CPU by default) that runs the
``initializer`` once and then chunks of work.  A dispatcher thread in the
caller hands the next chunk to whichever actor has room (at most two chunks
queued per actor), so slow chunks do not hold up the rest; a chunk whose
actor died is run again on a fresh one.  Results, errors, callbacks,
``chunksize``, ``maxtasksperchild`` and the ``close``/``join``/``terminate``
life cycle follow the standard library: a function's exception is raised in
the caller as itself, with the remote traceback as its ``__cause__``.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import multiprocessing.pool
import pickle
import queue
import threading
import traceback
import weakref
from multiprocessing import TimeoutError
from typing import Any, Callable, Iterable, Iterator

import cloudpickle

import flowcore
from flowcore.exceptions import ActorError

logger = logging.getLogger("flowcore.util.multiprocessing")

# the standard pool's own exception classes, so that code catching them works
# the same; typeshed does not list them
MaybeEncodingError: type[Exception] = getattr(multiprocessing.pool, "MaybeEncodingError")
RemoteTraceback: type[Exception] = getattr(multiprocessing.pool, "RemoteTraceback")

#: chunks queued on one actor at a time (one running, one ready to start)
PER_ACTOR = 2
#: times a chunk is run again after its actor died
CHUNK_RETRIES = 3
#: worker starts that may fail in a row (per process) before the pool gives up
START_FAILURES_PER_PROCESS = 3


class PoolActor:
    """One pool process: runs the initializer, then chunks of calls."""

    def __init__(self, initializer: Callable | None, initargs: tuple) -> None:
        self._funcs: dict[bytes, Callable] = {}
        if initializer is not None:
            initializer(*initargs)

    def ping(self) -> bool:
        return True

    def run_chunk(self, key: bytes, blob: bytes, star: bool, items: list) -> tuple:
        """``(True, [results])`` or ``(False, exception)`` for the first
        call that raised, like the standard library's worker."""
        fn = self._funcs.get(key)
        if fn is None:
            fn = self._funcs[key] = cloudpickle.loads(blob)
        try:
            if star:
                return True, [fn(*args) for args in items]
            return True, [fn(x) for x in items]
        except Exception as e:  # noqa: BLE001 - sent back and raised in the caller
            tb = "".join(traceback.format_exception(e))
            try:
                pickle.dumps(e)
            except Exception as pe:  # noqa: BLE001
                return False, (MaybeEncodingError(pe, e), tb)
            return False, (e, tb)


class _Job:
    """Bookkeeping for one apply/map/imap call: its chunks and where their
    results go."""

    def __init__(self, n_chunks: int, deliver: Callable[[int, bool, Any], None]):
        self.n_chunks = n_chunks
        self.deliver = deliver


class _Feeder:
    """The input of one ``imap``, read lazily, and its iterator, held weakly:
    once the caller drops the iterator (e.g. breaks out of the loop), the rest
    of the input is not read.  ``finish(n)``: the input had ``n`` chunks."""

    def __init__(self, it: "IMapIterator", chunks: Iterator[list], key: bytes, blob: bytes):
        self.ref = weakref.ref(it)
        self.chunks, self.key, self.blob = chunks, key, blob
        self.index = 0
        self.job = _Job(-1, self._deliver)

    def abandoned(self) -> bool:
        return self.ref() is None

    def _deliver(self, i: int, ok: bool, value: Any) -> None:
        it = self.ref()
        if it is not None:
            it._set_chunk(i, ok, value)

    def finish(self, n_chunks: int) -> None:
        it = self.ref()
        if it is not None:
            it._set_length(n_chunks)


def _chunked(iterable: Iterable, size: int) -> Iterator[list]:
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


class _Slot:
    """One actor of the pool and what it is running."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.ready = False
        self.inflight = 0
        self.done_chunks = 0
        self.retiring = False


class Pool:
    """A pool of worker actors with ``multiprocessing.Pool``'s API.

    ``processes`` defaults to the cluster's CPU count.  ``initializer(*initargs)``
    runs once in each worker; ``maxtasksperchild`` replaces a worker after that
    many chunks.  ``context`` is accepted for compatibility and ignored.
    ``flowcore_address`` connects (``flowcore.init``) if this process is not
    connected yet; ``flowcore_remote_args`` are the workers' actor options
    (default ``{"num_cpus": 1}``).
    """

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None,
                 context: Any = None, flowcore_address: str | None = None,
                 flowcore_remote_args: dict | None = None) -> None:
        if processes is not None and (not isinstance(processes, int)
                                      or isinstance(processes, bool) or processes < 1):
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int)
                                             or isinstance(maxtasksperchild, bool)
                                             or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if not flowcore.is_initialized():
            flowcore.init(address=flowcore_address)
        if processes is None:
            processes = max(1, int(flowcore.cluster_resources().get("CPU", 1)))
        self._processes = processes
        self._initializer = initializer
        self._initargs = tuple(initargs or ())
        self._maxtasks = maxtasksperchild
        self._actor_cls = flowcore.remote(PoolActor).options(
            **{"num_cpus": 1, **(flowcore_remote_args or {})})
        self._state = "RUN"
        self._lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._pending: collections.deque = collections.deque()  # (job, index, payload, tries)
        self._jobs_left = 0  # chunks not yet delivered
        self._feeders: collections.deque = collections.deque()  # lazy imap inputs
        self._start_failures = 0  # worker starts failed in a row
        self._failure: BaseException | None = None  # why no worker can start
        self._sent: dict[int, tuple] = {}  # chunks running on an actor, by id
        self._idle = threading.Condition(self._lock)
        self._slots = [self._new_slot() for _ in range(processes)]
        # the thread holds the pool weakly: a pool dropped without close() or
        # terminate() is collected, and its __del__ ends the workers
        self._thread = threading.Thread(target=_dispatch_loop,
                                        args=(weakref.ref(self), self._events),
                                        name="flowcore-pool", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ workers
    def _new_slot(self) -> _Slot:
        slot = _Slot(self._actor_cls.remote(self._initializer, self._initargs))
        fut = slot.handle.ping.remote().future()
        events = self._events
        fut.add_done_callback(lambda f, s=slot: events.put(("ready", s, f)))
        return slot

    def _handle(self, ev: tuple) -> None:
        """One event of the pool's thread: a worker started, or a chunk ended;
        then start chunks on workers with room."""
        kind = ev[0]
        if kind == "ready":
            _, slot, fut = ev
            err = fut.exception()
            if err is None:
                slot.ready = True
                self._start_failures = 0
            elif slot in self._slots and self._state != "TERMINATE":
                self._start_failures += 1
                if self._start_failures > START_FAILURES_PER_PROCESS * self._processes \
                        and not any(s.ready for s in self._slots):
                    self._broken(err)  # e.g. an initializer that always raises
                else:
                    self._replace(slot)  # its initializer failed or it died: try anew
        elif kind == "done":
            _, slot, item, fut = ev
            self._chunk_done(slot, item, fut)
        self._fill()

    def _broken(self, err: BaseException) -> None:
        """No worker can start: fail the queued work with the reason."""
        logger.error("no pool worker could start (%s); failing the pool's work", err)
        self._failure = err
        for slot in self._slots:
            try:
                flowcore.kill(slot.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._slots = []
        while True:
            item = self._next_chunk()
            if item is None:
                break
            job, index, _payload, _tries = item
            job.deliver(index, False, err)
            with self._lock:
                self._jobs_left -= 1
                self._idle.notify_all()

    def _fill(self) -> None:
        if self._failure is not None:
            self._broken(self._failure)
            return
        if self._state == "TERMINATE":
            return
        for slot in list(self._slots):
            while slot.ready and not slot.retiring and slot.inflight < PER_ACTOR:
                item = self._next_chunk()
                if item is None:
                    return
                job, index, (key, blob, star, items), tries = item
                slot.inflight += 1
                self._sent[id(item)] = item
                fut = slot.handle.run_chunk.remote(key, blob, star, items).future()
                events = self._events
                fut.add_done_callback(
                    lambda f, s=slot, it=item: events.put(("done", s, it, f)))
                if self._maxtasks is not None and \
                        slot.done_chunks + slot.inflight >= self._maxtasks:
                    slot.retiring = True

    def _next_chunk(self) -> tuple | None:
        """The next chunk to run: a queued one, else one read from the input
        of an ``imap`` (read only as workers have room, like the standard
        library's task feeder)."""
        if self._pending:
            return self._pending.popleft()
        while self._feeders:
            feeder = self._feeders[0]
            if feeder.abandoned():  # nobody holds its iterator: read no further
                self._feeders.popleft()
                continue
            try:
                items = next(feeder.chunks)
            except StopIteration:
                self._feeders.popleft()
                feeder.finish(feeder.index)
                continue
            except Exception as e:  # noqa: BLE001 - the input itself raised
                self._feeders.popleft()
                feeder.job.deliver(feeder.index, False, e)
                feeder.finish(feeder.index + 1)
                continue
            index = feeder.index
            feeder.index += 1
            with self._lock:
                self._jobs_left += 1
            return (feeder.job, index, (feeder.key, feeder.blob, False, items), 0)
        return None

    def _chunk_done(self, slot: _Slot, item: tuple, fut: Any) -> None:
        slot.inflight -= 1
        slot.done_chunks += 1
        self._sent.pop(id(item), None)
        job, index, payload, tries = item
        err = fut.exception()
        if err is not None and isinstance(err, ActorError) and tries < CHUNK_RETRIES \
                and self._state != "TERMINATE":
            self._pending.appendleft((job, index, payload, tries + 1))
            if slot in self._slots:
                self._replace(slot)
            return
        if err is not None:
            ok, value = False, err
        else:
            ok, value = fut.result()
            if not ok:  # the function's own exception, with the remote traceback
                value, tb = value
                value.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
        try:
            job.deliver(index, ok, value)
        finally:
            with self._lock:
                self._jobs_left -= 1
                self._idle.notify_all()
        if slot.retiring and slot.inflight == 0 and slot in self._slots:
            self._replace(slot)

    def _replace(self, slot: _Slot) -> None:
        i = self._slots.index(slot)
        try:
            flowcore.kill(slot.handle)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self._state == "TERMINATE":
            return
        self._slots[i] = self._new_slot()

    # ------------------------------------------------------------ submitting
    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def _submit(self, func: Callable, chunks: list[list], star: bool,
                deliver: Callable[[int, bool, Any], None]) -> None:
        self._check_running()
        if not callable(func):
            raise TypeError(f"func must be callable, got {type(func).__name__}")
        blob = cloudpickle.dumps(func)
        key = hashlib.blake2b(blob, digest_size=16).digest()
        job = _Job(len(chunks), deliver)
        with self._lock:
            self._jobs_left += len(chunks)
        for i, items in enumerate(chunks):
            self._pending.append((job, i, (key, blob, star, items), 0))
        self._events.put(("work",))

    def _chunks(self, iterable: Iterable, chunksize: int | None) -> tuple[list[list], int]:
        items = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or \
                (chunksize < 1 and items):
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        chunksize = max(chunksize, 1)
        return [items[i:i + chunksize] for i in range(0, len(items), chunksize)], chunksize

    # ------------------------------------------------------------ the API
    def apply(self, func: Callable, args: tuple = (), kwds: dict | None = None) -> Any:
        """``func(*args, **kwds)`` in a pool worker; blocks for the result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: tuple = (), kwds: dict | None = None,
                    callback: Callable | None = None,
                    error_callback: Callable | None = None) -> "AsyncResult":
        """Like ``apply`` but returns an ``AsyncResult`` at once."""
        result = AsyncResult(callback, error_callback)
        call = _Call(func, tuple(args), dict(kwds or {}))
        self._submit(call, [[()]], True, lambda i, ok, v: result._set(ok, v[0] if ok else v))
        return result

    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        """``[func(x) for x in iterable]`` across the pool, in order."""
        return self.map_async(func, iterable, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable | None = None,
                  error_callback: Callable | None = None) -> "AsyncResult":
        """Like ``map`` but returns an ``AsyncResult`` at once."""
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable[Iterable],
                chunksize: int | None = None) -> list:
        """``[func(*args) for args in iterable]`` across the pool, in order."""
        return self.starmap_async(func, iterable, chunksize).get()

    def starmap_async(self, func: Callable, iterable: Iterable[Iterable],
                      chunksize: int | None = None, callback: Callable | None = None,
                      error_callback: Callable | None = None) -> "AsyncResult":
        """Like ``starmap`` but returns an ``AsyncResult`` at once."""
        return self._map_async(func, [tuple(a) for a in iterable], chunksize, True,
                               callback, error_callback)

    def _map_async(self, func: Callable, iterable: Iterable, chunksize: int | None,
                   star: bool, callback: Callable | None,
                   error_callback: Callable | None) -> "AsyncResult":
        self._check_running()
        chunks, size = self._chunks(iterable, chunksize)
        result = _MapResult(len(chunks), size, callback, error_callback)
        if chunks:
            self._submit(func, chunks, star, result._set_chunk)
        return result

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1) -> Iterator:
        """Like ``map`` but yields results in order as they arrive."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(self, func: Callable, iterable: Iterable,
                       chunksize: int = 1) -> Iterator:
        """Like ``imap`` but yields results in the order they finish."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(self, func: Callable, iterable: Iterable, chunksize: int,
              ordered: bool) -> Iterator:
        self._check_running()
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        if not callable(func):
            raise TypeError(f"func must be callable, got {type(func).__name__}")
        it = IMapIterator(None, ordered, single=chunksize == 1)
        blob = cloudpickle.dumps(func)
        self._feeders.append(_Feeder(it, _chunked(iterable, chunksize),
                                     hashlib.blake2b(blob, digest_size=16).digest(), blob))
        self._events.put(("work",))
        if chunksize == 1:
            return it
        return (x for chunk in it for x in chunk)

    # ------------------------------------------------------------ life cycle
    def close(self) -> None:
        """Accept no more work; the workers stop once the queued work is done."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def terminate(self) -> None:
        """Stop the workers now; work not finished is abandoned (its results
        raise ``ValueError``)."""
        if self._state == "TERMINATE":
            return
        self._state = "TERMINATE"
        self._events.put(("stop",))
        if threading.current_thread() is not self._thread:
            self._thread.join(30)
        for slot in self._slots:
            try:
                flowcore.kill(slot.handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
        abandoned = list(self._sent.values()) + list(self._pending)
        self._sent.clear()
        self._pending.clear()
        for job, index, _payload, _tries in abandoned:
            job.deliver(index, False, ValueError("Pool was terminated"))
        while self._feeders:  # imap inputs not read to the end
            feeder = self._feeders.popleft()
            feeder.job.deliver(feeder.index, False, ValueError("Pool was terminated"))
            feeder.finish(feeder.index + 1)
        with self._lock:
            self._jobs_left = 0
            self._idle.notify_all()

    def join(self) -> None:
        """Wait for the queued work to finish and the workers to stop; call
        ``close()`` or ``terminate()`` first."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        with self._lock:
            while (self._jobs_left > 0 or self._feeders) and self._state != "TERMINATE":
                self._idle.wait(0.2)
        self.terminate()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __del__(self) -> None:
        if self.__dict__.get("_state", "TERMINATE") != "TERMINATE":
            try:
                self.terminate()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or "
                                  "pickled")

    def __repr__(self) -> str:
        return f"<flowcore.util.multiprocessing.Pool state={self._state} " \
               f"pool_size={self._processes}>"


def _dispatch_loop(pool_ref: "weakref.ref[Pool]", events: queue.Queue) -> None:
    """The pool's one thread: handles its events until it stops or is gone."""
    while True:
        ev = events.get()
        if ev[0] == "stop":
            return
        pool = pool_ref()
        if pool is None:
            return
        try:
            pool._handle(ev)
        except Exception:  # noqa: BLE001 - keep serving the pool's other work
            logger.exception("flowcore pool: handling %s failed", ev[0])
        del pool


class _Call:
    """``func(*args, **kwds)`` packed as one picklable callable for apply."""

    def __init__(self, func: Callable, args: tuple, kwds: dict):
        self.func, self.args, self.kwds = func, args, kwds

    def __call__(self) -> Any:
        return self.func(*self.args, **self.kwds)


# ------------------------------------------------------------ results
class AsyncResult:
    """The result of ``apply_async`` / ``map_async``: ``get``, ``wait``,
    ``ready``, ``successful`` as in the standard library."""

    def __init__(self, callback: Callable | None = None,
                 error_callback: Callable | None = None) -> None:
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, ok: bool, value: Any) -> None:
        self._success, self._value = ok, value
        callback = self._callback if ok else self._error_callback
        try:
            if callback is not None:
                callback(value)
        except Exception:  # noqa: BLE001 - a failing callback must not stop the pool
            logger.exception("a Pool callback raised")
        finally:
            self._event.set()


class _MapResult(AsyncResult):
    def __init__(self, n_chunks: int, chunksize: int, callback: Callable | None,
                 error_callback: Callable | None) -> None:
        super().__init__(callback, error_callback)
        self._parts: list = [None] * n_chunks
        self._left = n_chunks
        self._error: BaseException | None = None
        if n_chunks == 0:
            self._set(True, [])

    def _set_chunk(self, i: int, ok: bool, value: Any) -> None:
        self._left -= 1
        if ok:
            self._parts[i] = value
        elif self._error is None:  # the first failure wins, as in the standard library
            self._error = value
        if self._left == 0:
            if self._error is not None:
                self._set(False, self._error)
            else:
                self._set(True, list(itertools.chain.from_iterable(self._parts)))


class IMapIterator:
    """The iterator ``imap``/``imap_unordered`` return; ``next(timeout)``
    raises ``multiprocessing.TimeoutError`` when nothing arrived in time."""

    def __init__(self, n_chunks: int | None, ordered: bool, single: bool = True) -> None:
        self._single = single  # chunks of one item: yield the item, else the chunk
        self._cond = threading.Condition()
        self._ordered = ordered
        self._results: dict[int, tuple[bool, Any]] = {}
        self._arrived: collections.deque = collections.deque()
        self._next_index = 0
        self._length = n_chunks

    def __iter__(self) -> "IMapIterator":
        return self

    def _set_length(self, n_chunks: int) -> None:
        with self._cond:
            self._length = n_chunks
            self._cond.notify_all()

    def _ended(self) -> bool:
        return self._length is not None and self._next_index >= self._length

    def _set_chunk(self, i: int, ok: bool, value: Any) -> None:
        with self._cond:
            entry = (ok, value[0] if ok and self._single else value)
            if self._ordered:
                self._results[i] = entry
            else:
                self._arrived.append(entry)
            self._cond.notify_all()

    def next(self, timeout: float | None = None) -> Any:
        with self._cond:
            if self._ordered:
                ok = self._cond.wait_for(
                    lambda: self._next_index in self._results or self._ended(), timeout)
                if not ok:
                    raise TimeoutError
                if self._next_index not in self._results:
                    raise StopIteration
                success, value = self._results.pop(self._next_index)
            else:
                ok = self._cond.wait_for(lambda: bool(self._arrived) or self._ended(), timeout)
                if not ok:
                    raise TimeoutError
                if not self._arrived:
                    raise StopIteration
                success, value = self._arrived.popleft()
            self._next_index += 1
        if success:
            return value
        raise value

    __next__ = next


