"""The task transition table and the bounded event log (the states
themselves live in ``records.py``; ``TaskState`` is re-exported here for
``flowcore.TaskState``)."""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterable

from .records import TaskState

__all__ = ["TaskState", "TRANSITIONS", "InvalidTransition", "transition_name", "EventLog"]

S = TaskState
NEW = None
_now = time.time  # the pseudo-state of a task not yet in the table

#: (from, to) -> transition name.  Any other pair is a bug and raises.
TRANSITIONS: dict[tuple[TaskState | None, TaskState], str] = {
    (NEW, S.WAITING_FOR_ARGS): "submit_waiting",
    (NEW, S.QUEUED): "submit_ready",
    (NEW, S.FAILED): "submit_failed_dependency",
    (NEW, S.RUNNING): "direct_call",  # an actor call its caller sent to the actor itself
    (S.WAITING_FOR_ARGS, S.QUEUED): "args_ready",
    (S.WAITING_FOR_ARGS, S.FAILED): "dependency_failed",
    (S.WAITING_FOR_ARGS, S.CANCELLED): "cancel_waiting",
    (S.WAITING_FOR_ARGS, S.RUNNING): "started_locally",  # its node had the arguments first
    (S.QUEUED, S.RUNNING): "dispatch",
    (S.QUEUED, S.QUEUED): "local_declined",  # offered to the submitter's node, placed by the head
    (S.QUEUED, S.INFEASIBLE): "mark_infeasible",
    (S.QUEUED, S.CANCELLED): "cancel_queued",
    (S.QUEUED, S.FAILED): "fail_queued",
    (S.INFEASIBLE, S.QUEUED): "became_feasible",
    (S.INFEASIBLE, S.CANCELLED): "cancel_infeasible",
    (S.RUNNING, S.FINISHED): "finish",
    (S.RUNNING, S.FAILED): "fail",
    (S.RUNNING, S.QUEUED): "retry",
    (S.RUNNING, S.CANCELLED): "cancel_running",
    (S.RUNNING, S.LOST): "node_lost",
    (S.LOST, S.QUEUED): "resubmit_lost",
    (S.LOST, S.FAILED): "lost_unrecoverable",
    (S.FINISHED, S.WAITING_FOR_ARGS): "reconstruct_waiting",
    (S.FINISHED, S.QUEUED): "reconstruct",
}


class InvalidTransition(RuntimeError):
    pass


def transition_name(old: TaskState | None, new: TaskState) -> str:
    try:
        return TRANSITIONS[(old, new)]
    except KeyError:
        raise InvalidTransition(f"no transition from {old} to {new}") from None


class EventLog:
    """Bounded log of (time, task id, from, to, transition, cause).  The
    states are kept as ``TaskState`` members (their names are taken when a
    row is read: recording is on every transition, reading is rare)."""

    def __init__(self, maxlen: int = 100_000):
        self.events: deque[tuple[float, bytes, TaskState | None, TaskState, str, str]] = \
            deque(maxlen=maxlen)
        self._append = self.events.append

    def record(self, task_id: bytes, old: TaskState | None, new: TaskState,
               name: str, cause: str) -> None:
        self._append((_now(), task_id, old, new, name, cause))

    def for_task(self, task_id: bytes) -> list[dict[str, Any]]:
        return [self._row(e) for e in self.events if e[1] == task_id]

    def tail(self, n: int = 100) -> list[dict[str, Any]]:
        return [self._row(e) for e in list(self.events)[-n:]]

    @staticmethod
    def _row(e: tuple) -> dict[str, Any]:
        return {"time": e[0], "task_id": e[1].hex(), "from": e[2].value if e[2] else None,
                "to": e[3].value, "transition": e[4], "cause": e[5]}

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterable:
        return iter(self.events)
