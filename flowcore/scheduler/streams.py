"""Generator tasks in the head's state machine (a mixin of ``SchedulerState``).

A task (or actor call) run with ``num_returns="streaming"`` or ``"dynamic"``
reports each value it yields with ``task_yield`` while it runs: the value is
an object at once, with id ``object_id(tid, i)`` for the i-th value (i >= 1;
index 0 is the task's end object, made when it returns).  For a streaming
task the caller is told right away (its ``ObjectRefGenerator`` waits on
these ids).  Until the task ends the stream holds each yielded object; then
the end object does, as it lists them as nested refs, so yielded values live
while the caller's generator (or a ref to one of them) does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .states import TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .records import TaskRecord

S = TaskState


class StreamsMixin:
    def _init_streams(self) -> None:
        self._stream_held: dict[bytes, list[bytes]] = {}  # task id -> yielded objects

    def handle_task_yield(self, source: str, msg: dict) -> None:
        t = self.tasks.get(msg["tid"])  # type: ignore[attr-defined]
        r = msg["result"]
        if t is None or t.state != S.RUNNING or r["oid"] in self.objects:  # type: ignore
            return  # late, cancelled, or yielded again by a retry
        obj = self._obj(r["oid"], t.owner)  # type: ignore[attr-defined]
        obj.holds += 1  # the stream's hold, until the end object takes over
        self._stream_held.setdefault(t.tid, []).append(obj.oid)
        nested = r.get("nested") or []
        obj.nested = nested
        self._hold(nested)  # type: ignore[attr-defined]
        self._seal(obj, r, notify_owner=False)  # type: ignore[attr-defined]
        if msg.get("push"):
            self._send(t.owner, self._ready(obj))  # type: ignore[attr-defined]

    def _stream_done(self, t: "TaskRecord") -> None:
        """The task ended: drop the stream's holds (its end object holds what
        it yielded; after a failure without one, unread values are freed)."""
        held = self._stream_held.pop(t.tid, None)
        if held:
            self._release(held)  # type: ignore[attr-defined]
