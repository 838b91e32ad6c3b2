"""Completing ``ObjectRef.future()`` futures off the client's IO thread.

Reading a value may need a blocking store request, and a future's
done-callbacks run user code, so neither may run on the IO thread.  A few
daemon threads (at most ``MAX_THREADS``, started on demand, ending after
``IDLE_SECONDS`` without work) take the resolutions in turn, instead of one
new thread per result.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

MAX_THREADS = 4
IDLE_SECONDS = 5.0


class Resolver:
    """A small on-demand pool of daemon threads running resolutions in order."""

    def __init__(self, max_threads: int = MAX_THREADS, idle: float = IDLE_SECONDS):
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0   # alive
        self._idle = 0      # alive and waiting for work
        self._max = max_threads
        self._idle_seconds = idle

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)
        with self._lock:
            if self._idle > 0 or self._threads >= self._max:
                return  # a waiting thread, or one finishing its work, takes it
            self._threads += 1
        threading.Thread(target=self._run, name="flowcore-future", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                fn = self._queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queue.empty():
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            try:
                fn()
            except BaseException:  # noqa: BLE001 - each resolution reports its own errors
                pass
            del fn  # (an idle thread keeps no future, nor the value it holds, alive)
