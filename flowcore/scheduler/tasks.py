"""The transition layer: the only code that moves a task between states.

Each edge of the task life cycle is one method of ``Transitions`` that does
that edge's bookkeeping (resources taken or given back, the queue push, the
node's running set, the counts, the event-log entry with its cause), the
way distributed's ``_transition_*`` functions do.  ``TaskRecord.state`` is
read-only; ``_move`` is the one writer and checks the pair against
``TRANSITIONS`` first, so a state cannot be entered from anywhere else.

The edges (from -> to: method):

* NEW / WAITING_FOR_ARGS / INFEASIBLE / LOST / FINISHED -> QUEUED:
  ``queue`` (pushed on its shape's queue, for the head to place);
  ``queue_offered`` (QUEUED, waiting for the verdict of the node it was
  offered to, no push); ``queue_at_owner`` (QUEUED in its submitter's own
  queue of tasks for the workers it leases, no push); ``queue_call`` (an actor call: its place is in the
  caller's queue of the actor, pushed to the front when it is a retry);
* -> WAITING_FOR_ARGS: ``wait_for_args``;
* -> INFEASIBLE: ``mark_infeasible``;
* -> RUNNING: ``start`` (placed on a node: its resources taken there, in
  the node's running set), ``start_call`` (sent to an actor);
* RUNNING -> QUEUED: ``retry`` / ``retry_call``; RUNNING -> LOST: ``lose``
  (its node died), then ``retry`` or ``fail`` from LOST;
* -> FINISHED / FAILED / CANCELLED: ``finish``, ``fail``, ``cancel``;
  leaving RUNNING gives the task's resources back (``_release``).
"""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .records import NodeRecord, TaskRecord, TaskState
from .states import TRANSITIONS as _NAMES, InvalidTransition, transition_name

if TYPE_CHECKING:  # pragma: no cover
    from .actors import ActorRecord
    from .machine import SchedulerState

S = TaskState
_RUNNING = S.RUNNING
_now = time.time


class Transitions:
    """The edges of the task life cycle over ``state``'s tables."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self._log = state.log.events.append

    # ------------------------------------------------------------ the one writer
    def _move(self, t: TaskRecord, new: TaskState, cause: str, now: float = 0.0) -> None:
        old = t._state
        name = _NAMES.get((old, new))
        if name is None:
            name = transition_name(old, new)  # raises InvalidTransition: nothing changes
        t._state = new
        t.cause = cause
        self._log((now or _now(), t.tid, old, new, name, cause))  # EventLog.record, inlined

    def check(self, t: TaskRecord, new: TaskState, cause: str) -> None:
        """Move ``t`` to ``new`` with no bookkeeping: for the tests of the
        table (an invalid pair raises and leaves ``t`` as it was)."""
        self._move(t, new, cause)

    def _release(self, t: TaskRecord) -> None:
        """Leaving RUNNING: give back what the task holds on its node."""
        s = self.s
        node = s.nodes.get(t.node) if t.node else None
        if node is not None and t.tid in node.running:
            node.running.discard(t.tid)
            if not t.bundle and not t.blocked:
                # (the common case: the node's own account, one word to the index)
                node.available.give(t.res)
                s.placement.released(node)
            else:
                s.placement.ran_less(node)
                acct = s._account(node, t.bundle) if t.bundle else node
                if not t.blocked:
                    acct.give(t.res)
                else:
                    acct.give({k: v for k, v in t.res.items() if k != "CPU"})
        t.blocked = False

    release = _release  # an actor's creation hands its resources to the actor first

    # ------------------------------------------------------------ waiting and queued
    def wait_for_args(self, t: TaskRecord, cause: str) -> None:
        self._move(t, S.WAITING_FOR_ARGS, cause)

    def queue(self, t: TaskRecord, cause: str) -> None:
        """Ready to be placed by the head: on its shape's queue."""
        if t._state is _RUNNING:
            self._release(t)
        self._move(t, S.QUEUED, cause)
        queues = self.s.queues
        q = queues.get(t.shape)
        if q is None:
            q = queues[t.shape] = deque()
        parent = self.s.tasks.get(t.parent) if t.parent is not None else None
        if parent is not None and parent.blocked:
            q.appendleft(t.tid)  # its parent waits for it in get: first (SchedulerState.lend)
        else:
            q.append(t.tid)

    def queue_offered(self, t: TaskRecord, cause: str) -> None:
        """Ready, but offered to its submitter's node: the head waits for
        that node's verdict (no queue push)."""
        self._move(t, S.QUEUED, cause)

    def queue_at_owner(self, t: TaskRecord, cause: str) -> None:
        """Ready, and queued by its submitter for a worker it leases: the
        owner sends it (``lease_start``), or hands it back (no queue push)."""
        self._move(t, S.QUEUED, cause)

    def queue_call(self, t: TaskRecord, actor: "ActorRecord | None", cause: str,
                   front: bool = False) -> None:
        """An actor call is ready: it already has its place in its caller's
        queue of the actor (a retry goes back to the front of it)."""
        if t._state is _RUNNING:
            self._release(t)
        self._move(t, S.QUEUED, cause)
        if front and actor is not None:
            actor.queues.setdefault(t.owner, deque()).appendleft(t.tid)

    def mark_infeasible(self, t: TaskRecord, why: str, cause: str) -> None:
        """No node can ever fit it (as the cluster is now)."""
        if t._state is not S.QUEUED:
            self._move(t, S.QUEUED, cause)
        self._move(t, S.INFEASIBLE, why)
        self.s.infeasible.add(t.tid)

    def feasible(self, t: TaskRecord, cause: str) -> None:
        """INFEASIBLE -> QUEUED: a node that fits it joined."""
        self.s.infeasible.discard(t.tid)
        self.queue(t, cause)

    # ------------------------------------------------------------ running
    def start(self, t: TaskRecord, node: NodeRecord, cause: str, acct: Any = None) -> None:
        """Placed on ``node``: its resources are taken there (in its bundle's
        account when it has one), and it is in the node's running set."""
        if acct is None:
            acct = self.s._account(node, t.bundle) if t.bundle else node
        res = t.res
        if acct is node:  # (the node's own account, without the call around it)
            acct = node.available
        t.ahead = not acct.fits(res)
        if t.blocked:  # (a local start whose worker is already blocked in get)
            acct.take({k: v for k, v in res.items() if k != "CPU"})
        else:
            acct.take(res)
        node.running.add(t.tid)
        self.s.placement.touch(node)
        t.node = node.node_id
        t.attempt += 1
        now = t.started = _now()
        self._move(t, _RUNNING, cause, now)

    def start_call(self, t: TaskRecord, actor: "ActorRecord", cause: str) -> None:
        """An actor call runs on its actor (which holds the resources)."""
        t.node = actor.node
        t.attempt += 1
        t.started = time.time()
        actor.inflight.add(t.tid)
        self._move(t, _RUNNING, cause)

    # ------------------------------------------------------------ leaving RUNNING
    def retry(self, t: TaskRecord, cause: str) -> None:
        """RUNNING (or LOST) -> QUEUED, one retry spent."""
        t.retries_left -= 1
        self.s.counts["retried"] += 1
        self.queue(t, cause)

    def retry_call(self, t: TaskRecord, actor: "ActorRecord", cause: str,
                   count: bool = True) -> None:
        """An actor call runs again, before its caller's later calls."""
        t.retries_left -= 1
        if count:
            self.s.counts["retried"] += 1
        self.queue_call(t, actor, cause, front=True)

    def lose(self, t: TaskRecord, cause: str) -> None:
        """RUNNING -> LOST: its node died under it (then ``retry`` or ``fail``)."""
        self._release(t)
        self._move(t, S.LOST, cause)

    def finish(self, t: TaskRecord, ok: bool, released: bool = False) -> None:
        """RUNNING -> FINISHED (returned) or FAILED (raised); ``released``:
        ``release`` already gave its resources back."""
        if t._state is _RUNNING and not released:
            self._release(t)
        s = self.s
        if ok:
            self._move(t, S.FINISHED, "returned")
            s.counts["finished"] += 1
        else:
            self._move(t, S.FAILED, "raised an exception")
            s.counts["failed"] += 1
        s.latencies.append(time.time() - t.submitted)
        s.latency_count += 1

    def finish_create(self, t: TaskRecord, ok: bool) -> None:
        """An actor's creation task ends (the actor holds its own resources)."""
        self._release(t)
        self._move(t, S.FINISHED if ok else S.FAILED,
                   "actor constructed" if ok else "constructor raised")

    def fail(self, t: TaskRecord, cause: str) -> None:
        if t._state is _RUNNING:
            self._release(t)
        self.s.infeasible.discard(t.tid)
        self._move(t, S.FAILED, cause)
        self.s.counts["failed"] += 1

    def cancel(self, t: TaskRecord, cause: str) -> None:
        if t._state is _RUNNING:
            self._release(t)
        self.s.infeasible.discard(t.tid)
        self._move(t, S.CANCELLED, cause)
        self.s.counts["cancelled"] += 1

    # ------------------------------------------------------------ rebuilding
    def reconstruct(self, t: TaskRecord, cause: str) -> None:
        """FINISHED -> QUEUED or WAITING_FOR_ARGS: run again to rebuild a
        lost result."""
        t.node = None
        if t.missing:
            self.wait_for_args(t, cause)
        else:
            self.queue(t, cause)


__all__ = ["Transitions", "InvalidTransition"]
