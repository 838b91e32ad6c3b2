"""Forwarding a worker's stdout and stderr to the driver.

A worker's ``sys.stdout``/``sys.stderr`` are replaced by streams that still
write to the worker's log file and also send each complete line to the head
(tagged with the running task's name and the pid), which passes them on to
the driver that owns the task; the driver prints them with a prefix like
``(train pid=4242)``.
"""
from __future__ import annotations

import io
import os
import threading
from typing import Any, TextIO


class ForwardingStream(io.TextIOBase):
    def __init__(self, original: TextIO, client: Any, stream: str, label: Any):
        self.original = original
        self.client = client
        self.stream = stream
        self.label = label          # callable -> (task name, task id) or None
        self._buf = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        n = self.original.write(text)
        with self._lock:
            self._buf += text
            if "\n" not in self._buf:
                return n if n is not None else len(text)
            *lines, self._buf = self._buf.split("\n")
        self._send(lines)
        return n if n is not None else len(text)

    def flush(self) -> None:
        self.original.flush()
        with self._lock:
            rest, self._buf = self._buf, ""
        if rest:
            self._send([rest])

    def _send(self, lines: list[str]) -> None:
        if not lines or self.client.closed:
            return
        name, tid = self.label() or ("worker", None)
        self.client.send("head", {"op": "log", "lines": lines, "stream": self.stream,
                                  "name": name, "tid": tid, "pid": os.getpid()})

    def fileno(self) -> int:
        return self.original.fileno()

    def isatty(self) -> bool:
        return False


def install(client: Any, label: Any) -> None:
    import sys
    sys.stdout = ForwardingStream(sys.stdout, client, "stdout", label)
    sys.stderr = ForwardingStream(sys.stderr, client, "stderr", label)
