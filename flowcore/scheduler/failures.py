"""Tasks that end without their result: a component of the head's state
machine (``Failures``), no IO.

A task fails (every return becomes the error, with no run), is retried
after its worker or its node died while it ran (or fails once its retries
are spent), or is cancelled: one task, its tree of children
(``recursive``), or every unfinished task of a driver that disconnected.
A cancel of a running task goes to its node; with ``force`` the worker is
killed, and until that kill is heard of the task is in ``force_cancelled``
(the table this component owns), so that the death it causes cancels the
task instead of retrying it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .. import ids
from ..exceptions import TaskCancelledError, WorkerCrashedError
from ..protocol import messages as wire
from .records import TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState


class Failures:
    """Owns the force-cancels on their way: task ids whose worker a
    ``cancel(force=True)`` (or a removed placement group) is killing."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.force_cancelled: set[bytes] = set()

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"worker_died": self.handle_worker_died, "cancel": self.handle_cancel}

    def fail_task(self, t: TaskRecord, payload: bytes, cause: str) -> None:
        """Fail ``t`` with ``payload`` as the value of every return (no run)."""
        s = self.s
        s.tx.fail(t, cause)
        for oid in t.returns():
            obj = s.objects.get(oid)
            if obj is None:
                continue
            s._seal(obj, {"inline": payload, "size": len(payload), "error": True})
            s._maybe_free(obj)
        s._done(t)

    def retry_or_fail(self, t: TaskRecord, exc: BaseException, cause: str) -> None:
        """``t`` was lost while it ran: run it again if it has retries left,
        else fail it with ``exc``."""
        s = self.s
        s.tx.release(t)
        if t.retries_left > 0:
            s.tx.retry(t, f"{cause}; retrying ({t.retries_left - 1} retries left)")
        else:
            self.fail_task(t, s.error_payload(exc), cause)

    def handle_worker_died(self, source: str, msg: dict) -> None:
        """The worker running a task on node ``source`` died."""
        s = self.s
        t = s.tasks.get(msg.get("tid") or b"")
        if t is None or t.state != S.RUNNING or t.node != source:
            return
        how = msg.get("how", "exited")
        if t.tid in self.force_cancelled:
            self.force_cancelled.discard(t.tid)
            self.cancel_task(t, "worker killed by cancel(force=True)")
            return
        node = s.nodes.get(source)
        where = node.name if node else source
        # the actors the crashed task created die with their owner
        s.actor_manager.worker_crashed(
            msg.get("pid"), f"the task {t.name} that created it died with its worker "
                            f"(pid {msg.get('pid')}): {how}")
        err = WorkerCrashedError(
            f"the worker process (pid {msg.get('pid')}) running task {t.name} on node "
            f"{where} died: {how}. The task was tried {t.attempt} time(s); raise max_retries "
            f"to retry more, or check the worker log in the session directory")
        self.retry_or_fail(t, err, f"worker died: {how}")

    def handle_cancel(self, source: str, msg: dict) -> None:
        """``flowcore.cancel`` of the task making ``oid`` (and its children)."""
        s = self.s
        t = s.tasks.get(ids.task_of(msg["oid"]))
        if t is None or t.state is None or t.state.done:
            return
        force = bool(msg.get("force"))
        if msg.get("recursive"):
            # the tasks it submitted, and the tasks they submitted, depth first
            stack, seen = list(t.children or ()), set()
            while stack:
                child = s.tasks.get(stack.pop())
                if child is None or child.tid in seen or child.kind != "task":
                    continue
                seen.add(child.tid)
                stack.extend(child.children or ())
                if child.state is not None and not child.state.done:
                    self.cancel_one(child, force, f"its parent task {t.name} was cancelled")
        self.cancel_one(t, force, "cancelled before it ran")

    def cancel_one(self, t: TaskRecord, force: bool, cause: str) -> None:
        """A running task: ask its node; any other: cancelled now."""
        s = self.s
        if t.state == S.RUNNING:
            if force:
                self.force_cancelled.add(t.tid)
            s._send(t.node, wire.cancel_task(t.tid, force, **s.leases.cancel_fields(t)))
            return
        s.infeasible.discard(t.tid)
        s.local_first.withdraw(t, force)  # offered to its node, which may have started it
        s.leases.withdraw(t, force)  # queued at its owner, which may have sent it
        self.cancel_task(t, cause)

    def cancel_task(self, t: TaskRecord, cause: str) -> None:
        """``t`` ends cancelled: every return becomes ``TaskCancelledError``."""
        s = self.s
        s.tx.cancel(t, cause)
        payload = s.error_payload(TaskCancelledError(f"task {t.name} was cancelled ({cause})"))
        for oid in t.returns():
            obj = s.objects.get(oid)
            if obj is not None:
                s._seal(obj, {"inline": payload, "size": len(payload), "error": True})
                s._maybe_free(obj)
        s._done(t)

    def cancel_owned_tasks(self, cid: str) -> None:
        """The driver ``cid`` disconnected: its unfinished tasks go with it."""
        s = self.s
        for t in list(s.tasks.values()):
            if t.owner != cid or t.state is None or t.state.done:
                continue
            if t.state == S.RUNNING:
                if t.kind == "task" and t.node:
                    s._send(t.node, wire.cancel_task(t.tid, False,
                                                     **s.leases.cancel_fields(t)))
            elif t.state in (S.WAITING_FOR_ARGS, S.QUEUED, S.INFEASIBLE):
                s.infeasible.discard(t.tid)
                s.local_first.withdraw(t, False)
                s.leases.withdraw(t, False)
                self.cancel_task(t, "its driver disconnected")
