"""Nodes and clients joining and leaving: a component of the head's state
machine (``Membership``), no IO.

A node joins with ``register_node`` (again after its connection to the
head dropped: the tasks still running there keep their place and
resources), reports its figures with ``heartbeat`` and forwards warnings
for every driver (``node_warning``); a worker's printed lines go to the
driver that owns its task (``log``).  A node that goes silent longer than
the server's timeout is found by ``check_heartbeats``; a node that died,
or whose connection closed, leaves through ``node_died``: its running
tasks are retried or fail, its actors restart or die, its bundles go, and
the objects whose only copy it held are lost (rebuilt from lineage when
they can be).  A client (driver or worker process) joins with
``register_client`` and leaves through ``client_disconnected``: a driver
takes its unfinished tasks, its actors and its placement groups with it; a
worker's process takes the actors it created, and hands the tasks queued
at it for its leases back to the head.  Either way the references it held
are dropped.

The live nodes stay in the core tables (``SchedulerState.nodes`` and its
placement index), since every decision reads them; this component owns the
client table, the dead nodes ``nodes()`` keeps listing, and the pids of
worker clients that disconnected (a crash report may come after the
disconnect).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from ..exceptions import NodeDiedError
from ..protocol import messages as wire
from .records import READY, NodeRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import Out, SchedulerState

S = TaskState
#: dead nodes ``nodes()`` keeps listing (the newest)
DEAD_NODES_MAX = 1000
#: pids of disconnected worker clients remembered (the newest)
GONE_WORKERS_MAX = 1000


class Membership:
    """Owns the client table (client id -> kind, pid, node, start time),
    the dead nodes' last rows and the pids of departed worker clients."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.clients: dict[str, dict] = {}
        self.dead_nodes: dict[str, dict] = {}  # node id -> its last row, for nodes()
        self.gone_workers: OrderedDict[int, str] = OrderedDict()  # pid -> client id

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"register_node": self.handle_register_node,
                "register_client": self.handle_register_client,
                "heartbeat": self.handle_heartbeat,
                "node_warning": self.handle_node_warning,
                "log": self.handle_log}

    # ------------------------------------------------------------ nodes
    def handle_register_node(self, source: str, msg: dict) -> None:
        s = self.s
        node = NodeRecord(msg["node_id"], msg.get("address", ""), msg.get("resources", {}),
                          msg.get("name", msg["node_id"]), msg.get("hostname", ""),
                          msg.get("pid", 0), msg.get("info"))
        old = s.nodes.get(node.node_id)
        if old is not None and old.alive:
            # the same node again (its connection to the head dropped): the
            # tasks still running there keep their place and resources
            for tid in old.running:
                t = s.tasks.get(tid)
                if t is not None and t.state == S.RUNNING:
                    s._account(node, t.bundle).take(
                        {k: v for k, v in t.res.items() if not (t.blocked and k == "CPU")})
                    node.running.add(tid)
        s.nodes[node.node_id] = node
        s.placement.add(node)
        self.dead_nodes.pop(node.node_id, None)
        s.recovery_manager.node_rejoined(node, msg)  # what its store and processes still hold
        s.emit("node_joined", node.node_id)
        for tid in list(s.infeasible):
            t = s.tasks.get(tid)
            if t is not None and s._could_run_somewhere(t):
                s.tx.feasible(t, f"node {node.name} joined")

    def handle_heartbeat(self, source: str, msg: dict) -> None:
        """A node's periodic report: load, memory, store and worker figures."""
        node = self.s.nodes.get(source)
        if node is not None:
            node.info.update(msg.get("stats") or {})
            node.info["last_heartbeat"] = time.time()

    def handle_node_warning(self, source: str, msg: dict) -> None:
        """A node has something every driver should see (e.g. its worker cap)."""
        s = self.s
        node = s.nodes.get(source)
        text = f"node {node.name if node else source}: {msg.get('text', '')}"
        s.warnings.append(text)
        for cid, info in self.clients.items():
            if info.get("kind") == "driver":
                s._send(cid, wire.warning(text))

    def check_heartbeats(self, now: float, timeout: float) -> list[str]:
        """Nodes silent for longer than ``timeout`` seconds (to be declared dead)."""
        out = []
        for n in self.s.nodes.values():
            last = n.info.get("last_heartbeat", n.joined)
            if n.alive and now - last > timeout:
                out.append(n.node_id)
        return out

    def node_died(self, node_id: str, cause: str) -> "Out":
        s = self.s
        node = s.nodes.get(node_id)
        if node is None or not node.alive:
            return []
        node.alive = False
        s.placement.remove(node_id)
        s.actor_manager.node_died(node_id, cause)
        failures = s.failures
        for tid in list(node.running):
            t = s.tasks.get(tid)
            if t is not None and t.state == S.RUNNING:
                if t.tid in failures.force_cancelled:
                    # its force-cancel (cancel(force=True), or its placement
                    # group removed) was on its way: cancelled, not retried
                    failures.force_cancelled.discard(t.tid)
                    failures.cancel_task(t, f"cancelled; its node {node.name} died "
                                            f"before the kill arrived")
                    continue
                s.tx.lose(t, f"node {node.name} died: {cause}")
                failures.retry_or_fail(t, NodeDiedError(
                    f"node {node.name} ({node.address}) died while running task "
                    f"{t.name} ({cause})"), f"node {node.name} died: {cause}")
        node.running.clear()
        s.groups.node_died(node_id)
        lost = []
        for obj in list(s.objects.values()):
            if node_id in obj.nodes:
                obj.nodes.discard(node_id)
                if not obj.nodes and obj.inline is None and obj.state == READY:
                    lost.append(obj)
        del s.nodes[node_id]
        # nodes() keeps listing it, dead, with why (the newest DEAD_NODES_MAX)
        self.dead_nodes[node_id] = dict(node.as_dict(), alive=False, running_tasks=0,
                                        death_cause=cause, died=time.time())
        while len(self.dead_nodes) > DEAD_NODES_MAX:
            self.dead_nodes.pop(next(iter(self.dead_nodes)))
        s.emit("node_died", node_id)
        for obj in lost:
            s.lineages.object_lost(obj, f"its only copy was on node {node.name}, which "
                                        f"died ({cause})")
        s.dispatcher.schedule()
        out, s.out = s.out, []
        if s.validate:
            s._check_books("node_died", {"node_id": node_id})
        return out

    # ------------------------------------------------------------ clients
    def handle_register_client(self, source: str, msg: dict) -> None:
        self.clients[source] = {"kind": msg.get("kind", "driver"), "pid": msg.get("pid"),
                                "node_id": msg.get("node_id"), "started": time.time()}
        self.s.client_refs.setdefault(source, set())
        self.s.recovery_manager.client_rejoined(source, msg)  # after a head restart

    def handle_log(self, source: str, msg: dict) -> None:
        """Lines a worker printed: to the driver that owns the task (all
        drivers when that is not known)."""
        owner = None
        tid = msg.get("tid")
        if tid:
            t = self.s.tasks.get(bytes.fromhex(tid))
            owner = t.owner if t is not None else None
        if owner is not None and self.clients.get(owner, {}).get("kind") != "driver":
            owner = None  # a nested task: its owner is a worker
        dests = [owner] if owner else [c for c, i in self.clients.items()
                                       if i.get("kind") == "driver"]
        for d in dests:
            self.s._send(d, msg)

    def worker_clients(self, pid: int) -> set[str]:
        """The worker clients of process ``pid``: connected, or gone already."""
        cids = {cid for cid, info in self.clients.items()
                if info.get("kind") == "worker" and info.get("pid") == pid}
        gone = self.gone_workers.get(pid)
        if gone is not None:
            cids.add(gone)
        return cids

    def client_disconnected(self, cid: str) -> "Out":
        s = self.s
        info = self.clients.pop(cid, None) or {}
        if info.get("kind", "driver") == "driver":
            # a driver is a job: its unfinished work goes with it (workers, which
            # come and go with the pool, hand what they own on through refs)
            s.failures.cancel_owned_tasks(cid)
            s.actor_manager.kill_owned(cid)
            s.groups.remove_owned(cid)
        else:
            # an actor's process ended: the actors it created die with it
            s.actor_manager.owner_process_ended(cid)
            if s.leases.queued or s.leases.parked_tids:
                s.leases.owner_gone(cid)  # tasks queued at it for its leases: the head places them
            if info.get("pid"):  # a crash report may come after the disconnect
                self.gone_workers[info["pid"]] = cid
                while len(self.gone_workers) > GONE_WORKERS_MAX:
                    self.gone_workers.popitem(last=False)
        for oid in s.client_refs.pop(cid, ()):
            obj = s.objects.get(oid)
            if obj is not None:
                obj.clients.discard(cid)
                if obj.waiters:
                    obj.waiters.discard(cid)
                s._maybe_free(obj)
        s.dispatcher.schedule()
        out, s.out = s.out, []
        if s.validate:
            s._check_books("client_disconnected", {"node_id": cid})
        return out
