"""``flowcore.Executor``: the ``concurrent.futures.Executor`` interface over tasks."""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable

from .remote_function import RemoteFunction
from . import options as opts


class Executor(concurrent.futures.Executor):
    """Run callables as flowcore tasks; ``submit`` returns a standard Future.

    Task options (``num_cpus``, ``max_retries``, ...) given here apply to
    every call.
    """

    def __init__(self, **task_options: Any):
        self._options = opts.validate(opts.TASK, dict(task_options), "Executor()")
        self._remote: dict[Any, RemoteFunction] = {}
        self._futures: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if self._shutdown:
            raise RuntimeError("cannot submit to an Executor after shutdown()")
        if not callable(fn):
            raise TypeError(f"Executor.submit() needs a callable, got {type(fn).__name__}")
        with self._lock:
            rf = self._remote.get(fn)
            if rf is None:
                rf = self._remote[fn] = RemoteFunction(fn, self._options)
        fut = rf.remote(*args, **kwargs).future()
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._futures.discard(fut)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        with self._lock:
            pending = list(self._futures)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            concurrent.futures.wait(pending)
