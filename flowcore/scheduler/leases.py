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

A burst (more tasks of one shape than its submitter has leased workers
free) waits in its submitter's own queue: each task is submitted marked
``lease_q=node`` and recorded QUEUED "at its owner" (``queue_at_owner``:
the head does not place it, and it holds no resources on the head's
books); when the owner sends it to a leased worker it reports
``lease_start`` (batched, like the submissions) and the task is RUNNING
there from then on, as above.  A ``task_done`` that comes before that
report waits in this component's own table of early reports.  A cancel of
a task still queued at its owner ends it at once and tells the owner
(``lease_cancel``), which drops it unsent; if it was already on its way to
a worker, the ``lease_start`` that follows sends the node the cancel.  A
task its owner cannot run (no lease left: declined, asked back, its
worker or node gone) is handed back with ``lease_unrun`` and placed by the
head like any other; a driver that goes away takes its queued tasks with
it (cancelled as any task it owns).

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

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from ..protocol import messages as wire
from .records import TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState
#: seconds between two requests to one node to take its leases back
RECLAIM_EVERY = 0.25
#: seconds without a scan for tasks to spill after one found none
SPILL_IDLE = 0.02
PRUNE_AT = 50_000  # entries kept before finished ones are dropped
LOST_LIMIT = 10_000  # leased workers remembered as dead (a submission may come after)
EARLY_LIMIT = 10_000  # reports of owner-queued tasks held until their lease_start


class Leases:
    """Which leased worker each task running on a lease was sent to."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.sent: dict[bytes, tuple[str, str, int]] = {}  # tid -> (node, wid, attempt)
        # (node, wid) -> lease_lost of leased workers that died: a submission
        # travels on another connection and may come after its worker's death
        self.lost: OrderedDict[tuple[str, str], dict] = OrderedDict()
        # tasks queued at their owner (tid -> the node its leases are on), the
        # task_done reports that came before their lease_start, and the
        # owner-queued tasks cancelled here (tid -> force) whose lease_start
        # may still come
        self.queued: dict[bytes, str] = {}
        # those another node may take (``spill``): a SPREAD task's owner
        # leases on every node it spreads over itself (client/spread.py)
        self.spillable: dict[bytes, str] = {}
        self.early: OrderedDict[bytes, tuple[str, dict]] = OrderedDict()
        self.withdrawn: OrderedDict[bytes, bool] = OrderedDict()
        self.reclaimed: dict[str, float] = {}  # node id -> when it was asked last
        # owner-queued tasks the head asked their owner to hand back (another
        # node has room for them): no new request while one is out
        self.spilling: set[bytes] = set()
        self.spill_after = 0.0  # a scan that found nothing to move: not again before
        self.checked = 0.0
        # tasks sent (or queued at their owner) for workers leased from a
        # node that has not re-registered with this restarted head yet: its
        # worker still runs them, so they are recorded once it is back, not
        # placed again here.  node id -> {tid: (lease, busy)}; one still
        # queued at its owner has no lease (None) until its lease_start
        self.parked: dict[str, dict[bytes, tuple[list | None, int | None]]] = {}
        self.parked_tids: dict[bytes, str] = {}  # tid -> the node it waits for
        state.on("node_joined", self._node_back)
        state.on("recovery_done", self._recovery_done)

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"lease_lost": self.handle_lease_lost, "lease_unrun": self.handle_lease_unrun,
                "lease_start": self.handle_lease_start}

    def handle_lease_unrun(self, source: str, msg: dict) -> None:
        """A leased worker refused tasks of ``source`` (their lease had
        ended there), or ``source`` queued them and has no lease left to run
        them: they did not run; the head places them."""
        for tid in msg.get("tids") or ():
            t = self.s.tasks.get(tid)
            if t is None or t.owner != source:
                continue
            if self.parked_tids and self._unpark_one(t):
                if t.state == S.QUEUED:
                    self.s._enqueue(t, "its owner had no leased worker left for it, or its "
                                       "leased worker did not run it; placed by the head")
                continue
            if self._unqueue(tid):
                self._drop_early(tid)
                if t.state == S.QUEUED:
                    self.s._enqueue(t, "its owner had no leased worker left for it; placed "
                                       "by the head")
                continue
            if self.on_lease(t) is None:
                continue
            del self.sent[tid]
            self.s.tx.queue(t, "its leased worker did not run it (the lease had ended, or the "
                               "task ahead of it there blocked in get); placed by the head")

    # ------------------------------------------------------------ queued at the owner
    def queue_at_owner(self, t: TaskRecord, node_id: str) -> None:
        """``t`` (just recorded, every argument ready at its submitter) waits
        in its submitter's queue for a worker leased from ``node_id``."""
        s = self.s
        node = s.nodes.get(node_id)
        if node is None and self._awaited(node_id):
            self._park(t, node_id, None, None)
            return
        if node is None or not node.alive:
            s._enqueue(t, f"its owner's leases are on node {node_id}, which is gone; placed "
                          f"by the head")
            return
        t.missing.clear()  # its submitter had every argument; the worker reads them itself
        self.queued[t.tid] = node_id
        if t.shape[1] != "SPREAD":
            self.spillable[t.tid] = node_id
        s.tx.queue_at_owner(t, f"queued at its owner for a worker it leases from node "
                               f"{node.name} (sent there as one frees)")

    def handle_lease_start(self, source: str, msg: dict) -> None:
        """Owner ``source`` sent tasks it had queued to leased worker
        ``msg["lease"]``: they run there now."""
        lease = msg["lease"]
        busy = int(msg.get("busy") or 0)
        for tid in msg["tids"]:
            t = self.s.tasks.get(tid)
            waits = self.parked_tids.get(tid) if self.parked_tids else None
            if waits is not None and t is not None and t.owner == source:
                # queued at its owner for a node not back yet: sent there now
                self.parked[waits][tid] = (lease, busy)
                busy += 1
                continue
            if self.queued.get(tid) is None or t is None or t.owner != source:
                force = self.withdrawn.pop(tid, None)
                if force is not None:
                    # cancelled while it was on its way: the worker drops it
                    # (or stops it)
                    self.s._send(str(lease[0]), wire.cancel_task(tid, force, lease=str(lease[1])))
                self._drop_early(tid)
                continue
            self._unqueue(tid)
            self.start(t, lease, busy)
            busy += 1

    def early_task_done(self, source: str, msg: dict) -> bool:
        """A ``task_done`` of a task still queued at its owner here: its
        ``lease_start`` is on its way on the owner's connection; keep it."""
        tid = msg["tid"]
        if tid not in self.queued and tid not in self.parked_tids:
            return False
        self.s._hold_early(msg)
        self.early[tid] = (source, msg)
        while len(self.early) > EARLY_LIMIT:
            self.s._release_early(self.early.popitem(last=False)[1][1])
        return True

    def _drop_early(self, tid: bytes) -> None:
        dropped = self.early.pop(tid, None)
        if dropped is not None:
            self.s._release_early(dropped[1])

    def withdraw(self, t: TaskRecord, force: bool) -> None:
        """``t`` is cancelled (or its owner left) while queued at its owner:
        the owner drops it unsent; if it is already on its way to a worker,
        its ``lease_start`` sends the node the cancel."""
        if self.parked_tids and self._unpark_one(t):
            return  # (its worker's node is not back: the cancel cannot reach it)
        if not self._unqueue(t.tid):
            return
        self._drop_early(t.tid)
        self.withdrawn[t.tid] = force
        while len(self.withdrawn) > EARLY_LIMIT:
            self.withdrawn.popitem(last=False)
        if t.owner in self.s.clients:
            self.s._send(t.owner, {"op": "lease_cancel", "tid": t.tid})

    def owner_gone(self, cid: str) -> None:
        """Worker client ``cid`` disconnected (its process ended) with tasks
        still queued at it: nobody will send them, so the head places them
        (whoever holds their refs gets their results)."""
        tasks = self.s.tasks
        for tid in [tid for tid, node_id in self.parked_tids.items()
                    if self.parked[node_id][tid][0] is None
                    and (t := tasks.get(tid)) is not None and t.owner == cid]:
            t = tasks[tid]
            self._unpark_one(t)
            if t.state == S.QUEUED:
                self.s._enqueue(t, "its owner's process ended before it sent the task to a "
                                   "leased worker; placed by the head")
        for tid in [tid for tid in self.queued
                    if (t := tasks.get(tid)) is not None and t.owner == cid]:
            self._unqueue(tid)
            self._drop_early(tid)
            t = tasks[tid]
            if t.state == S.QUEUED:
                self.s._enqueue(t, "its owner's process ended before it sent the task to a "
                                   "leased worker; placed by the head")

    def _unqueue(self, tid: bytes) -> bool:
        """``tid`` is no longer queued at its owner: True if it was."""
        if self.queued.pop(tid, None) is None:
            return False
        self.spillable.pop(tid, None)
        if self.spilling:
            self.spilling.discard(tid)
        return True

    def spill(self) -> None:
        """Tasks wait at their owner for the workers it leases from node A
        while another node has room for them on the head's books: ask the
        owner to hand the oldest of them back (``lease_spill``, as many as
        the other nodes have room for), which the head then places there,
        so a burst never waits on one node while another is idle.  One
        request at a time.  SPREAD tasks are left to their owner, which
        holds leases on every node they spread over."""
        s = self.s
        if self.spilling or len(s.placement) < 2:
            return
        free = [n for n in s.placement.alive() if n.available.get("CPU", 0.0) > 1e-9 or
                not n.total.get("CPU")]
        if not free:
            return
        now = time.monotonic()
        if now < self.spill_after:
            return
        tasks = s.tasks
        room: dict[tuple, int] = {}   # (shape, queue node) -> tasks other nodes can take
        asks: dict[str, list[bytes]] = {}
        for n_seen, (tid, node_id) in enumerate(self.spillable.items()):
            if n_seen >= 512:
                break
            t = tasks.get(tid)
            if t is None or t.state != S.QUEUED:
                continue
            key = (t.shape, node_id)
            left = room.get(key)
            if left is None:
                left = sum(_fit_count(n.available, t.res) for n in free if n.node_id != node_id)
            if left <= 0:
                room[key] = 0
                continue
            room[key] = left - 1
            asks.setdefault(t.owner, []).append(tid)
        if not asks:
            self.spill_after = now + SPILL_IDLE
        for owner, tids in asks.items():
            self.spilling.update(tids)
            s._send(owner, {"op": "lease_spill", "tids": tids})

    def at_owner(self, t: TaskRecord) -> str | None:
        """The node whose leased workers ``t`` waits for at its owner, else None."""
        return self.queued.get(t.tid) if t.state == S.QUEUED else None

    def start(self, t: TaskRecord, lease: list, busy: int | None = None) -> None:
        """``t`` (just recorded, every argument ready at its submitter) was
        sent to leased worker ``lease[1]`` of node ``lease[0]``, behind
        ``busy`` (default ``lease[2]``, else 0) tasks sent there before it."""
        s = self.s
        node_id, wid = str(lease[0]), str(lease[1])
        node = s.nodes.get(node_id)
        if node is None and self._awaited(node_id):
            self._park(t, node_id, lease, busy)
            return
        if node is None or not node.alive:
            # the node is gone (and its worker with it): the head places it
            s._enqueue(t, f"its leased worker's node {node_id} is gone; placed by the head")
            return
        t.missing.clear()  # its submitter had every argument; the worker reads them itself
        s.counts["leased"] = s.counts.get("leased", 0) + 1
        if t.state != S.QUEUED:
            # the life cycle every task has (QUEUED, then RUNNING), with no queue push
            s.tx.queue_offered(t, f"submitted with arguments ready to a worker its owner "
                                  f"leases from node {node.name}")
        # its worker may already be blocked in get (said on its own connection)
        t.blocked = s.local_first.early_block.pop(t.tid, False)
        s.tx.start(t, node, f"sent by its owner to leased worker {wid} of node {node.name}",
                   acct=s._account(node, None))
        if busy is None:
            busy = int(lease[2]) if len(lease) > 2 else 0
        # its node granted the lease: it runs there now, or once the tasks
        # written to that worker before it have run (sent ahead)
        t.ahead = busy > 0
        self.sent[t.tid] = (node_id, wid, t.attempt)
        if len(self.sent) > PRUNE_AT:
            self.prune()
        done = s.direct_calls.early.pop(t.tid, None) or self.early.pop(t.tid, None)
        if done is not None:
            s.handle_task_done(*done)
            s._release_early(done[1])
        gone = self.lost.get((node_id, wid))
        if gone is not None and self.on_lease(t) is not None:
            del self.sent[t.tid]  # its worker died before this submission came
            s.handle_worker_died(node_id, {"tid": t.tid, "how": gone.get("how", "exited"),
                                           "pid": gone.get("pid")})

    # ------------------------------------------------------------ after a head restart
    def _awaited(self, node_id: str) -> bool:
        """Whether ``node_id`` is a node this restarted head waits for."""
        rec = self.s.recovery
        return rec is not None and node_id in rec.nodes

    def _park(self, t: TaskRecord, node_id: str, lease: list | None, busy: int | None) -> None:
        """``t`` went (or waits at its owner) for a worker leased from
        ``node_id``, which has not re-registered since the head restarted:
        recorded there once it is back (``_node_back``)."""
        self.parked.setdefault(node_id, {})[t.tid] = (lease, busy)
        self.parked_tids[t.tid] = node_id
        t.missing.clear()  # its submitter had every argument; the worker reads them itself
        if t.state != S.QUEUED:
            self.s.tx.queue_at_owner(t, f"sent by its owner to a worker leased from node "
                                        f"{node_id}, which has not re-registered since the "
                                        f"head restarted")

    def _unpark(self, node_id: str) -> list[tuple[TaskRecord, list | None, int | None]]:
        """The tasks parked for ``node_id`` that are still waiting for it,
        each with what it was parked with."""
        out: list[tuple[TaskRecord, list | None, int | None]] = []
        for tid, (lease, busy) in self.parked.pop(node_id, {}).items():
            self.parked_tids.pop(tid, None)
            t = self.s.tasks.get(tid)
            if t is not None and t.state == S.QUEUED:
                out.append((t, lease, busy))
        return out

    def _node_back(self, node_id: str) -> None:
        """(event) ``node_id`` re-registered: its parked tasks run there."""
        if not self.parked:
            return
        for t, lease, busy in self._unpark(node_id):
            if lease is None:  # still queued at its owner
                t.missing.clear()
                self.queued[t.tid] = node_id
                if t.shape[1] != "SPREAD":
                    self.spillable[t.tid] = node_id
            else:
                self.start(t, lease, busy)

    def _unpark_one(self, t: TaskRecord) -> bool:
        """Forget parked task ``t`` (True if it was parked)."""
        node_id = self.parked_tids.pop(t.tid, None)
        if node_id is None:
            return False
        waiting = self.parked.get(node_id)
        if waiting is not None:
            waiting.pop(t.tid, None)
            if not waiting:
                del self.parked[node_id]
        return True

    def _recovery_done(self) -> None:
        """(event) Recovery ended: the nodes not back by now are gone, and
        so are their workers; the tasks parked for them are placed here."""
        for node_id in list(self.parked):
            node = self.s.nodes.get(node_id)
            if node is not None and node.alive:  # (back: ended recovery by coming back)
                self._node_back(node_id)
                continue
            for t, _, _ in self._unpark(node_id):
                self.s._enqueue(t, f"its leased worker's node {node_id} did not come back "
                                   f"after the head restart; placed by the head")

    def scheduled(self) -> None:
        """(after each placement round) Tasks queued at an owner that another
        node has room for are spilled there; work waiting at the head while
        leased tasks hold room gets those nodes to ask their leases back."""
        s = self.s
        if self.spillable:
            self.spill()
        if self.sent and (s.queues or s.groups.pg_waiting):
            self.waiting_work(time.monotonic())

    def waiting_work(self, now: float) -> None:
        """Tasks wait in the head's queues while leased tasks hold nodes'
        resources on its books: ask those nodes to take their leases back
        (their holders stop sending, hand their queues to the head and
        return the leases once the tasks sent are answered), so a burst on
        leases never keeps CPUs from work the head places for long.  At most
        every ``RECLAIM_EVERY`` seconds per node."""
        if now - self.checked < RECLAIM_EVERY / 5:
            return
        self.checked = now
        s = self.s
        tasks = s.tasks
        # the shapes waiting (the first task of each queue); a placement
        # group waiting for room may want any node
        waiting = []
        for q in s.queues.values():
            for tid in q:
                t = tasks.get(tid)
                if t is not None and t.state == S.QUEUED:
                    waiting.append(t.res)
                    break
        groups = bool(s.groups.pg_waiting)
        if not waiting and not groups:
            return
        nodes = {e[0] for tid, e in self.sent.items()
                 if (t := tasks.get(tid)) is not None and t.state == S.RUNNING}
        for node_id in nodes:
            if now - self.reclaimed.get(node_id, 0.0) < RECLAIM_EVERY:
                continue
            node = s.nodes.get(node_id)
            if node is None or not node.alive or not (
                    groups or any(node.could_ever_fit(res) for res in waiting)):
                continue
            self.reclaimed[node_id] = now
            self.s._send(node_id, {"op": "lease_reclaim"})

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


def _fit_count(available: dict, res: dict) -> int:
    """How many tasks needing ``res`` fit in ``available``."""
    n = 64  # (a task needing nothing: a few at a time)
    for k, v in res.items():
        if v > 0:
            n = min(n, int(available.get(k, 0.0) / v + 1e-9))
    return max(n, 0)
