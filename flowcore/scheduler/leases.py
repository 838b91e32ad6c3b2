"""Tasks sent to leased workers: a component of the head's state machine (``Leases``).

A client holding a lease on a worker of its node (``node/leases.py``)
pushes ready tasks straight to that worker, and submits each one to the
head too, marked ``lease=[node id, worker id]``.  The head records it like
any task (the DAG, reference counts, lineage, the event log) but does not
place it: it is RUNNING on that node at once, its resources taken on the
head's books of the node until it ends, exactly as if the head had placed
it there.  The worker answers its submitter directly and reports
``task_done`` to the head as for any task (``answered_direct``: the inline
returns already reached their owner).

The submission and the worker's ``task_done`` travel on different
connections: a ``task_done`` that comes first waits in the table of direct
actor calls' early reports (``DirectCalls.early``) until its submission
does.

Faults go the usual ways: a task that fails with a retryable error is
queued by the head again (the worker left it out of its answer); its
node's death loses it like any task on that node; the death of the leased
worker comes as ``lease_lost`` naming the worker, and every task sent to
it that is still running is retried (within ``max_retries``) or fails
with ``WorkerCrashedError``; a cancel goes to the node naming the worker
(``cancel_task`` with ``lease``), which interrupts the task there or
drops it from the worker's queue.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from .records import TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState
PRUNE_AT = 50_000  # entries kept before finished ones are dropped
LOST_LIMIT = 10_000  # leased workers remembered as dead (a submission may come after)


class Leases:
    """Which leased worker each task running on a lease was sent to."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.sent: dict[bytes, tuple[str, str, int]] = {}  # tid -> (node, wid, attempt)
        # (node, wid) -> lease_lost of leased workers that died: a submission
        # travels on another connection and may come after its worker's death
        self.lost: OrderedDict[tuple[str, str], dict] = OrderedDict()

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"lease_lost": self.handle_lease_lost, "lease_unrun": self.handle_lease_unrun}

    def handle_lease_unrun(self, source: str, msg: dict) -> None:
        """A leased worker refused tasks of ``source`` (their lease had
        ended there): they did not run; the head places them."""
        for tid in msg.get("tids") or ():
            t = self.s.tasks.get(tid)
            if t is None or t.owner != source or self.on_lease(t) is None:
                continue
            del self.sent[tid]
            self.s.tx.queue(t, "its leased worker no longer served its lease; placed by the head")

    def start(self, t: TaskRecord, lease: list) -> None:
        """``t`` (just recorded, every argument ready at its submitter) was
        sent to leased worker ``lease[1]`` of node ``lease[0]``."""
        s = self.s
        node_id, wid = str(lease[0]), str(lease[1])
        node = s.nodes.get(node_id)
        if node is None or not node.alive:
            # the node is gone (and its worker with it): the head places it
            s._enqueue(t, f"its leased worker's node {node_id} is gone; placed by the head")
            return
        t.missing.clear()  # its submitter had every argument; the worker reads them itself
        s.counts["leased"] = s.counts.get("leased", 0) + 1
        # the life cycle every task has (QUEUED, then RUNNING), with no queue push
        s.tx.queue_offered(t, f"submitted with arguments ready to a worker its owner leases "
                              f"from node {node.name}")
        # its worker may already be blocked in get (said on its own connection)
        t.blocked = s.local_first.early_block.pop(t.tid, False)
        s.tx.start(t, node, f"sent by its owner to leased worker {wid} of node {node.name}",
                   acct=s._account(node, None))
        t.ahead = False  # its node granted the lease: it runs there now
        self.sent[t.tid] = (node_id, wid, t.attempt)
        if len(self.sent) > PRUNE_AT:
            self.prune()
        done = s.direct_calls.early.pop(t.tid, None)
        if done is not None:
            s.handle_task_done(*done)
            s._release_early(done[1])
        gone = self.lost.get((node_id, wid))
        if gone is not None and self.on_lease(t) is not None:
            del self.sent[t.tid]  # its worker died before this submission came
            s.handle_worker_died(node_id, {"tid": t.tid, "how": gone.get("how", "exited"),
                                           "pid": gone.get("pid")})

    def on_lease(self, t: TaskRecord) -> tuple[str, str] | None:
        """(node, worker) of the lease ``t`` runs on now, else None."""
        entry = self.sent.get(t.tid)
        if entry is None or t.state != S.RUNNING or t.attempt != entry[2] \
                or t.node != entry[0]:
            return None
        return entry[0], entry[1]

    def cancel_fields(self, t: TaskRecord) -> dict:
        """Extra keys of ``cancel_task`` for ``t``: the leased worker it runs on."""
        where = self.on_lease(t) if self.sent else None
        return {"lease": where[1]} if where is not None else {}

    def handle_lease_lost(self, source: str, msg: dict) -> None:
        """A leased worker of node ``source`` died: what was sent to it and
        has not ended is retried or fails, as after any worker crash."""
        wid = msg.get("wid")
        self.lost[(source, str(wid))] = msg
        while len(self.lost) > LOST_LIMIT:
            self.lost.popitem(last=False)
        for tid, (node_id, w, _) in list(self.sent.items()):
            if node_id != source or w != wid:
                continue
            t = self.s.tasks.get(tid)
            if t is None or self.on_lease(t) is None:
                del self.sent[tid]
                continue
            del self.sent[tid]
            self.s.handle_worker_died(source, {"tid": tid, "how": msg.get("how", "exited"),
                                               "pid": msg.get("pid")})

    def prune(self) -> None:
        tasks = self.s.tasks
        self.sent = {tid: e for tid, e in self.sent.items()
                     if (t := tasks.get(tid)) is not None and t.state == S.RUNNING}
