"""Test helpers for timing across processes without sleeps.

``Signal`` is a named event that lives in the process that made it (a small
loopback server on a thread).  It pickles to its address, so tasks can
``wait()`` on it while the test decides when to ``set()`` it, and the test
can ``wait_for_waiters(n)`` to know that n tasks have reached the wait.

``wait_recorded(refs)`` waits until the head has recorded the ends of the
tasks behind ``refs``: their answers reach the caller first, their workers'
reports reach the head on the side, batched, so the head's views
(``flowcore.state``, ``visualize``, the timeline, the dashboard) may lag a
``get`` by a few milliseconds.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from typing import Any, Iterable

import flowcore
import flowcore.state


def wait_recorded(refs: Iterable[Any], timeout: float = 30.0) -> None:
    """Return once the head's task table shows every task behind ``refs``
    ended (FINISHED or FAILED); ``TimeoutError`` after ``timeout`` s."""
    want = {r.task_id for r in refs}
    deadline = time.monotonic() + timeout
    while {t["task_id"] for t in flowcore.state.list_tasks()
           if t["task_id"] in want and t["state"] in ("FINISHED", "FAILED")} != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the head did not record the ends of {len(want)} task(s) "
                               f"within {timeout} s")
        time.sleep(0.01)  # a poll of the head's table, bounded by the deadline


class Signal:
    def __init__(self) -> None:
        self._key = secrets.token_hex(16)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.address = self._sock.getsockname()
        self._cv = threading.Condition()
        self._set = False
        self._waiting: list[socket.socket] = []
        self._arrived = 0
        self._closed = False
        self._owner_pid = os.getpid()
        self._thread = threading.Thread(target=self._serve, name="flowcore-signal",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ owner side
    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(10)
                key = conn.recv(32)
                conn.settimeout(None)
            except OSError:
                conn.close()
                continue
            if key == self._key.upper().encode():  # a poll: answer at once
                with self._cv:
                    is_set = self._set
                try:
                    conn.sendall(b"1" if is_set else b"0")
                except OSError:
                    pass
                conn.close()
                continue
            if key != self._key.encode():
                conn.close()
                continue
            with self._cv:
                self._arrived += 1
                if self._set:
                    self._release(conn)
                else:
                    self._waiting.append(conn)
                self._cv.notify_all()

    @staticmethod
    def _release(conn: socket.socket) -> None:
        try:
            conn.sendall(b"1")
        except OSError:
            pass
        conn.close()

    def set(self) -> None:
        """Release every current and future waiter."""
        with self._cv:
            self._set = True
            waiting, self._waiting = self._waiting, []
        for c in waiting:
            self._release(c)

    def clear(self) -> None:
        with self._cv:
            self._set = False

    def wait_for_waiters(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` waits have arrived in total (raise TimeoutError otherwise)."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._arrived >= n, timeout):
                raise TimeoutError(f"only {self._arrived} of {n} waiters arrived in {timeout}s")

    @property
    def arrived(self) -> int:
        return self._arrived

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.set()
        self._sock.close()

    def __del__(self) -> None:
        if getattr(self, "_owner_pid", None) == os.getpid():
            try:
                self.close()
            except Exception:
                pass

    # ------------------------------------------------------------ any process
    def __reduce__(self) -> Any:
        return (_SignalClient, (self.address, self._key))

    def wait(self, timeout: float | None = None) -> bool:
        return _SignalClient(self.address, self._key).wait(timeout)

    @property
    def wait_task(self) -> Any:
        """A remote function that waits on this signal and returns True."""
        sig = _SignalClient(self.address, self._key)

        def wait_for_signal() -> bool:
            return sig.wait()
        return flowcore.remote(wait_for_signal)


class _SignalClient:
    """What a Signal becomes in another process: it can only wait."""

    def __init__(self, address: tuple, key: str):
        self.address = tuple(address)
        self._key = key

    def __reduce__(self) -> Any:
        return (_SignalClient, (self.address, self._key))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the owner sets the signal; False on timeout
        (``timeout`` 0 or less: whether it is set now, without waiting)."""
        if timeout is not None and timeout <= 0:
            with socket.create_connection(self.address, timeout=10) as s:
                s.sendall(self._key.upper().encode())  # the owner answers at once
                return s.recv(1) == b"1"
        with socket.create_connection(self.address, timeout=10) as s:
            s.sendall(self._key.encode())
            s.settimeout(timeout)
            try:
                return s.recv(1) == b"1"
            except socket.timeout:
                return False
