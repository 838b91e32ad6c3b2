"""Worker leases, the node's side (``NodeLeases``) and the leased worker's.

A client of this node (a driver on its machine) with ready tasks of one
resource shape asks for a lease (``lease_request``).  The pool grants an
idle worker (``WorkerPool.grant_lease``: the shape's resources are taken on
the node's books until the lease ends) or the request is declined (the
tasks go through the head as before).  The worker is told (``lease_open``),
opens its listener (the actor listener: TLS, then the token challenge,
before a byte is decoded) and answers with its port (``lease_listening``);
the holder gets the address and pushes tasks straight to it.

A lease ends when its holder returns it (``lease_return``: after an idle
grace, or when this node asked for it back with ``lease_revoke`` because
tasks placed here by the head wait for room), or when its holder's
connection to this node closes: a lease never outlives its holder.  The
worker is then told ``lease_end``; it runs what was already sent, refuses
what comes later (``lease_refused``) and reports ``worker_idle`` with the
lease id, which gives the worker and its resources back to the pool.

A leased worker that dies is reported to the head as ``lease_lost``: the
head retries (or fails) the tasks its holder sent it, the holder's
connection to it closes and the holder asks the head for their outcome.

The head's books stay right without lease messages: every leased task is
recorded by the head as running on this node, resources taken, from its
submission to its end (``scheduler/leases.py``); an idle lease holds
resources only here, and this node takes them back as soon as work the
head placed here waits.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..protocol import messages

if TYPE_CHECKING:  # pragma: no cover
    from ..protocol.comm import Comm
    from .server import NodeServer

logger = logging.getLogger("flowcore.node")

#: FLOWCORE_LEASES=0: the node grants no lease (every task goes through the head)
ENABLED = os.environ.get("FLOWCORE_LEASES", "1") not in ("0", "")
#: leases one client may hold on this node at once
MAX_PER_HOLDER = int(os.environ.get("FLOWCORE_LEASES_PER_CLIENT", "16"))
RELEASED_LIMIT = 10_000  # leases given back idle remembered until their worker_idle


class Lease:
    __slots__ = ("lease", "wid", "holder", "res", "revoked", "ending")

    def __init__(self, lease: bytes, wid: str, holder: str, res: dict):
        self.lease = lease
        self.wid = wid
        self.holder = holder          # the holder's connection id on this node
        self.res = res
        self.revoked = False          # asked back (lease_revoke sent)
        self.ending = False           # lease_end sent to the worker


class NodeLeases:
    def __init__(self, server: "NodeServer"):
        self.server = server
        self.leases: dict[bytes, Lease] = {}
        self.by_worker: dict[str, bytes] = {}
        self.ports: dict[str, int] = {}                  # wid -> its listener's port
        self.waiting: dict[str, tuple[Any, dict, Lease]] = {}  # wid -> request awaiting a port
        self.granted = 0
        # leases given back idle: lease -> worker (its worker_idle is ignored)
        self.released: OrderedDict[bytes, str] = OrderedDict()
        self.spilled = 0   # declines that named another node (spillback)

    # ------------------------------------------------------------ granting
    def request(self, comm: "Comm", msg: dict, frames: list) -> None:
        srv = self.server
        holder = comm.info["id"]
        res = {k: float(v) for k, v in (msg.get("res") or {}).items() if v}
        head = srv.head
        held = sum(1 for x in self.leases.values() if x.holder == holder)
        w = None
        if ENABLED and not srv._stopping and head is not None and not head.closed \
                and held < MAX_PER_HOLDER:
            lease = os.urandom(12)
            w = srv.pool.grant_lease(lease, res, msg.get("env"))
        if w is None:
            if ENABLED and not srv._stopping and held < MAX_PER_HOLDER:
                srv._act(srv.pool.lease_declined(res, msg.get("env")))
            if msg.get("spill") and ENABLED and head is not None and not head.closed \
                    and not srv.pool.can_fit_now(res):
                # this node cannot fit the shape now: "try node X", from the
                # head's view of the nodes (spillback; its asker follows it once)
                asyncio.ensure_future(self._spillback(comm, msg, res))
                return
            # ``starting``: the shape fits now and a plain worker is starting
            # (none was idle): worth asking again soon
            comm.reply(msg, lease=None, **({"starting": True} if ENABLED and not srv._stopping
                                           and srv.pool.starting_for(res, msg.get("env"))
                                           else {}))
            return
        wcomm = srv.worker_comms.get(w.wid)
        if wcomm is None:  # not connected (cannot happen for an idle worker)
            srv.pool_idle(w.wid)
            comm.reply(msg, lease=None)
            return
        ls = self.leases[lease] = Lease(lease, w.wid, holder, res)
        self.by_worker[w.wid] = lease
        self.granted += 1
        self.waiting[w.wid] = (comm, msg, ls)
        wcomm.send({"op": "lease_open", "lease": lease})

    async def _spillback(self, comm: "Comm", msg: dict, res: dict) -> None:
        """Decline ``msg`` naming the node the head's view says fits ``res``."""
        to = None
        head = self.server.head
        try:
            if head is None:
                raise ConnectionError("no head")
            r = await head.request({"op": "list_nodes"})
            to = spill_target(r.get("result") or (), self.server.node_id, res)
        except Exception as e:  # noqa: BLE001 - a plain decline then
            logger.debug("no spillback target: %s", e)
        if to is not None:
            self.spilled += 1
        if not comm.closed:
            comm.reply(msg, lease=None, **({"try": list(to)} if to is not None else {}))

    def listening(self, comm: "Comm", msg: dict, frames: list) -> None:
        """A leased worker listens: answer the request that leased it."""
        wid = comm.info.get("wid", "")
        if msg.get("port"):
            self.ports[wid] = msg["port"]
        waiting = self.waiting.pop(wid, None)
        if waiting is None:
            return
        holder, req, ls = waiting
        if self.leases.get(ls.lease) is not ls or ls.ending:
            if not holder.closed:
                holder.reply(req, lease=None)  # (its holder waits for an answer)
            return
        if holder.closed or not msg.get("port") or ls.revoked:  # (asked back meanwhile)
            self._end(ls)
            if not holder.closed:
                holder.reply(req, lease=None)
            return
        # the worker listens on the interface its node serves on
        host = self.server.address.split("://", 1)[-1].rsplit(":", 1)[0]
        holder.reply(req, lease=ls.lease, wid=wid, node=self.server.node_id,
                     address=f"tcp://{host}:{msg['port']}")

    # ------------------------------------------------------------ ending
    def give_back(self, comm: "Comm", msg: dict, frames: list) -> None:
        ls = self.leases.get(msg["lease"])
        if ls is None or ls.holder != comm.info["id"]:
            return
        if msg.get("idle") and not ls.ending and ls.wid not in self.waiting:
            # every task sent on it was answered: the worker and its
            # resources go back to the pool now, not once the worker has
            # read the lease's end (its worker_idle for the lease is then
            # ignored); a task's end that returns its leases and then takes
            # its own CPU back overdraws nothing
            self._end(ls)
            del self.leases[ls.lease]
            if self.by_worker.get(ls.wid) == ls.lease:
                del self.by_worker[ls.wid]
            self.released[ls.lease] = ls.wid
            while len(self.released) > RELEASED_LIMIT:
                self.released.popitem(last=False)
            self.server.pool_idle(ls.wid)
            return
        self._end(ls)

    def stale_idle(self, wid: str, tid: bytes) -> bool:
        """``worker_idle`` from ``wid`` for lease ``tid`` that its holder gave
        back idle (the pool took the worker back already): ignore it."""
        return self.released.pop(tid, None) == wid

    def _end(self, ls: Lease) -> None:
        if ls.ending:
            return
        ls.ending = True
        wcomm = self.server.worker_comms.get(ls.wid)
        if wcomm is not None:
            wcomm.send({"op": "lease_end", "lease": ls.lease})

    def worker_idle(self, wid: str, tid: bytes) -> bool:
        """``worker_idle`` from ``wid``: True when it ends its lease ``tid``
        (the pool then takes the worker back as after any task)."""
        lease = self.by_worker.get(wid)
        if lease is None or lease != tid:
            return False
        del self.by_worker[wid]
        self.leases.pop(lease, None)
        return True

    def holder_gone(self, holder: str) -> None:
        """A client's connection to this node closed: its leases end."""
        for ls in list(self.leases.values()):
            if ls.holder == holder:
                self._end(ls)

    def worker_gone(self, wid: str) -> bytes | None:
        """Worker ``wid`` exited: its lease (if any) is gone with it."""
        self.ports.pop(wid, None)
        waiting = self.waiting.pop(wid, None)
        if waiting is not None and not waiting[0].closed:
            waiting[0].reply(waiting[1], lease=None)  # (its holder waits for an answer)
        lease = self.by_worker.pop(wid, None)
        if lease is not None:
            self.leases.pop(lease, None)
        return lease

    def reclaim(self) -> None:
        """Tasks the head placed here wait for room: ask every holder to give
        its leases back (each does once its tasks on the lease are done)."""
        for ls in self.leases.values():
            if ls.revoked or ls.ending:
                continue
            if ls.wid in self.waiting:  # not granted yet: declined when its worker answers
                ls.revoked = True
                continue
            comm = self.server.clients.get(ls.holder)
            if comm is None or comm.closed:
                self._end(ls)
                continue
            ls.revoked = True
            comm.send({"op": "lease_revoke", "lease": ls.lease})

    def cancel(self, wid: str, tid: bytes, force: bool) -> None:
        """The head cancels ``tid``, sent to leased worker ``wid``."""
        srv = self.server
        if force:
            proc = srv.procs.get(wid)
            if proc is not None:
                proc.kill()
            return
        comm = srv.worker_comms.get(wid)
        if comm is None:
            return
        comm.send(messages.cancel(tid))
        comm._flush()  # on the wire before the signal that says "read it now"
        w = srv.pool.workers.get(wid)
        if w is not None and w.pid:
            try:
                os.kill(w.pid, __import__("signal").SIGUSR1)
            except ProcessLookupError:
                pass

    def snapshot(self) -> dict[str, int]:
        return {"leases": len(self.leases), "leases_granted": self.granted,
                "leases_spilled": self.spilled}


def spill_target(rows: Any, here: str, res: dict) -> tuple[str, str] | None:
    """Where a lease request ``res`` this node (``here``) cannot fit should
    go, from the head's view of the nodes (``list_nodes`` rows): the live
    node other than this one that fits it now on the head's books, the one
    with most CPUs free; as ``(node id, address)``, or None when none does."""
    best = None
    for row in rows:
        if row.get("node_id") == here or not row.get("alive", True) or not row.get("address"):
            continue
        avail = row.get("resources_available") or {}
        if any(avail.get(k, 0.0) + 1e-9 < v for k, v in res.items() if v > 0):
            continue
        cpu = avail.get("CPU", 0.0)
        if best is None or cpu > best[0]:
            best = (cpu, row["node_id"], row["address"])
    return None if best is None else (best[1], best[2])


# ---------------------------------------------------------------- the leased worker
class WorkerLease:
    """A pool worker's side: which lease it serves (None: none)."""

    def __init__(self, worker: Any):
        self.worker = worker
        self.lease: bytes | None = None

    def ops(self) -> dict[str, Any]:
        return {"lease_open": self.open, "lease_end": self.end, "lease_revoke": lambda m: None}

    def open(self, msg: dict) -> None:
        self.lease = msg["lease"]
        port = self.worker._listen_for_callers()
        self.worker.client.send("node", {"op": "lease_listening", "lease": msg["lease"],
                                         "port": port})

    def end(self, msg: dict) -> None:
        """No more tasks on this lease; once those already queued here have
        run, the node gets the worker back."""
        if self.lease != msg["lease"]:
            return  # (ended already: by its holder, on its connection, and its node)
        self.lease = None
        self.worker.tasks.append({"op": "lease_end", "tid": None, "lease": msg["lease"]})

    def ended(self, msg: dict) -> None:
        """(the run loop) Every task sent before the lease ended has run."""
        self.worker.client.send("node", messages.worker_idle(msg["lease"]))

    def accepts(self, msg: dict) -> bool:
        """Whether a task read from a caller's connection is for this lease."""
        return msg.get("lease") is not None and msg["lease"] == self.lease

    def _hand_back(self, tasks: list[dict], running: dict | None = None) -> None:
        by_conn: dict[str, list[dict]] = {}
        if running is not None:
            by_conn[running["reply_conn"]] = []
        for t in tasks:
            by_conn.setdefault(t["reply_conn"], []).append(t)
        lease = running["lease"] if running is not None else tasks[0]["lease"]
        for which, held in by_conn.items():
            self.worker.client.send(which, {"op": "lease_handback", "lease": lease,
                                            "tids": [t["tid"] for t in held]})

    def blocked(self, task: dict | None) -> None:
        """The running task blocks in get: its holder hears it (it sends
        this worker nothing more until that task is answered), and the
        leased tasks queued behind it here go back unrun (one of them may be
        what it waits for); the holder has the head place them."""
        tasks = self.worker.tasks
        held = [t for t in list(tasks) if t is not None and t.get("lease") is not None
                and t.get("reply_conn") and t.get("op") == "run_task"]
        for t in held:
            try:
                tasks.remove(t)
            except ValueError:  # (taken meanwhile)
                continue
        running = task if task is not None and task.get("lease") is not None \
            and task.get("reply_conn") else None
        if held or running is not None:
            self._hand_back(held, running)

    def holds_back(self, msg: dict) -> bool:
        """A leased task comes while the running task blocks in get: it goes
        back to its holder at once (True) instead of waiting here."""
        client = self.worker.client
        if not client._blocked_gets or self.worker.running_tid not in client._blocked_gets:
            return False
        self._hand_back([msg])
        return True
