"""Local-first dispatch: a component of the head's state machine (``LocalFirst``).

A client attached to node N (a driver on N's machine, or a worker of N)
whose task has every argument ready and on N (or inline) sends the task two
ways at once: to the head as a normal submission marked ``local=N``, and to
N itself.  N starts it at once when it fits there and nothing is queued
ahead of it, or declines; either way N tells the head (``local_verdict``).

The head records the task on arrival (the DAG, reference counts and lineage
are the same as for any task) but does not place it: it stays QUEUED,
"offered to node N", until the verdict comes.  Started: the task is RUNNING
on N and N's resources are taken, as if the head had placed it there.
Declined, or N died first: the head places it as usual.

The three messages travel on different connections (submitter -> head,
N -> head, and the worker's ``task_done``), so they may arrive in any
order: a verdict or a ``task_done`` that comes before its submission waits
in a small bounded table until it does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from ..protocol import messages as wire
from .records import TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState
EARLY_LIMIT = 10_000  # verdicts / results held for submissions not yet seen


def _remember(table: OrderedDict, key: bytes, value: object) -> None:
    table[key] = value
    while len(table) > EARLY_LIMIT:
        table.popitem(last=False)


class LocalFirst:
    """Owns the open offers and the verdicts / results that came early."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.offers: dict[bytes, str] = {}            # tid -> node id
        self.early_verdicts: OrderedDict[bytes, tuple[str, bool]] = OrderedDict()
        self.early_done: OrderedDict[bytes, tuple[str, dict]] = OrderedDict()
        #: blocked in get (True) or not, said by the task's worker before the
        #: head recorded the task as started (a local start, or a task sent to
        #: a leased worker: ``leases.Leases.start`` takes it too)
        self.early_block: OrderedDict[bytes, bool] = OrderedDict()
        state.on("node_joined", self.node_joined)
        state.on("node_died", self.node_died)
        state.on("recovery_done", self.settle)

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"local_verdict": self.handle_local_verdict}

    def note_offer(self, t: TaskRecord, node_id: str) -> None:
        """``t`` was also sent to its submitter's node ``node_id``."""
        self.offers[t.tid] = node_id

    def offered(self, t: TaskRecord, cause: str) -> bool:
        """Called when ``t`` is ready to be placed: if its node may be
        starting it, wait for the verdict instead (True)."""
        node_id = self.offers.get(t.tid)
        if node_id is None:
            return False
        s = self.s
        node = s.nodes.get(node_id)
        if node is None and s.recovery is None:
            # a node the head does not know is gone (a restarted head waits
            # for its nodes to come back instead): place it
            del self.offers[t.tid]
            return False
        name = node.name if node is not None else node_id
        s.tx.queue_offered(t, f"{cause}; offered to node {name} to start locally")
        early = self.early_verdicts.pop(t.tid, None)
        if early is not None:
            self.apply_verdict(t, *early)
        return True

    def withdraw(self, t: TaskRecord, force: bool) -> None:
        """``t`` is cancelled while its node may be starting it: the node
        stops it if it did start it (and refuses it if it has not seen it
        yet), and the head does not wait for the verdict."""
        node_id = self.offers.pop(t.tid, None)
        self.early_verdicts.pop(t.tid, None)
        dropped = self.early_done.pop(t.tid, None)
        if dropped is not None:
            self.s._release_early(dropped[1])
        if node_id is not None:
            self.s._send(node_id, wire.cancel_task(t.tid, force, local=True))

    def handle_local_verdict(self, source: str, msg: dict) -> None:
        t = self.s.tasks.get(msg["tid"])
        if t is None:
            _remember(self.early_verdicts, msg["tid"], (source, bool(msg["started"])))
            return
        self.apply_verdict(t, source, bool(msg["started"]))

    def apply_verdict(self, t: TaskRecord, node_id: str, started: bool) -> None:
        if self.offers.get(t.tid) != node_id:
            return
        del self.offers[t.tid]
        if t.state not in (S.QUEUED, S.WAITING_FOR_ARGS):
            return  # failed or cancelled meanwhile
        s = self.s
        node = s.nodes.get(node_id)
        if node is None or not node.alive:
            started = False
        if not started:
            if t.state == S.QUEUED:
                why = (f"node {node.name} had no room to start it at once" if node is not None
                       and node.alive else f"node {node_id} died before starting it")
                s._enqueue(t, f"{why}; placed by the head")
            return  # still waiting for arguments: placed when they are ready
        # the node found every argument in its store, even if the head has
        # not heard of one being ready yet
        assert node is not None  # started only on a live node (above)
        t.missing.clear()
        s.counts["local_first"] = s.counts.get("local_first", 0) + 1
        # its worker may already be blocked in get (said on its own connection)
        t.blocked = self.early_block.pop(t.tid, False)
        s.tx.start(t, node, f"started locally on node {node.name} (local-first)", acct=node)
        done = self.early_done.pop(t.tid, None)
        if done is not None:
            s.handle_task_done(*done)
            s._release_early(done[1])

    def early_blocked(self, tid: bytes, t: TaskRecord | None, blocked: bool) -> None:
        """``task_blocked``/``task_unblocked`` for a task not running in the
        head's books: kept when it may be a local start not heard of yet (not
        submitted yet, or offered to a node), so its CPU is given back when
        the start is recorded."""
        if t is None or t.tid in self.offers:
            _remember(self.early_block, tid, blocked)

    def early_task_done(self, source: str, msg: dict) -> bool:
        """A ``task_done`` of a locally started task that the head has not
        recorded as running yet: keep it for when it has."""
        if not msg.get("local"):
            return False
        t = self.s.tasks.get(msg["tid"])
        if t is None or t.tid in self.offers:
            self.s._hold_early(msg)
            self.early_done[msg["tid"]] = (source, msg)
            while len(self.early_done) > EARLY_LIMIT:
                self.s._release_early(self.early_done.popitem(last=False)[1][1])
            return True
        return False

    def node_joined(self, node_id: str) -> None:
        """A node (re-)registered: a verdict it sent to a head that was away
        is lost, so ask it again about the offers still open (it answers
        for each, and refuses a late start of any it has not seen yet)."""
        tids = [tid for tid, nid in self.offers.items() if nid == node_id]
        if tids:
            self.s._send(node_id, wire.local_query(tids))

    def settle(self) -> None:
        """End of a restart's recovery: offers to nodes that did not come back."""
        for tid, nid in list(self.offers.items()):
            if nid not in self.s.nodes:
                t = self.s.tasks.get(tid)
                if t is not None:
                    self.apply_verdict(t, nid, False)
                else:
                    del self.offers[tid]

    def node_died(self, node_id: str) -> None:
        """Offers to a dead node are placed by the head."""
        for tid, nid in list(self.offers.items()):
            if nid == node_id:
                t = self.s.tasks.get(tid)
                if t is not None:
                    self.apply_verdict(t, node_id, False)
