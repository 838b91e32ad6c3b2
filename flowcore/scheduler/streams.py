"""Generator tasks: a component of the head's state machine (``Streams``).

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

from typing import TYPE_CHECKING, Callable

from .records import TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState


class Streams:
    """Owns the stream holds: task id -> the objects it yielded so far."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.held: dict[bytes, list[bytes]] = {}

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"task_yield": self.handle_task_yield}

    def handle_task_yield(self, source: str, msg: dict) -> None:
        s = self.s
        t = s.tasks.get(msg["tid"])
        r = msg["result"]
        if t is None or t.state != S.RUNNING or r["oid"] in s.objects:
            return  # late, cancelled, or yielded again by a retry
        obj = s._obj(r["oid"], t.owner)
        obj.holds += 1  # the stream's hold, until the end object takes over
        self.held.setdefault(t.tid, []).append(obj.oid)
        nested = r.get("nested") or []
        obj.nested = nested
        s._hold(nested)
        s._seal(obj, r, notify_owner=False)
        if msg.get("push"):
            s._send(t.owner, s._ready(obj))

    def task_ended(self, t: TaskRecord) -> None:
        """The task ended: drop the stream's holds (its end object holds what
        it yielded; after a failure without one, unread values are freed)."""
        if self.held:
            held = self.held.pop(t.tid, None)
            if held:
                self.s._release(held)
