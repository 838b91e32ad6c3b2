"""SPREAD tasks on workers leased from several nodes (the submitter's side).

A ready SPREAD task (every argument inline: a worker on another node has
none of this node's store) goes to a leased worker the way a ready default
task does (``client/leases.py``), but its shape's leases are held on every
node it spreads over, not only on this process's node:

* ``SpreadPlan`` (no IO) keeps the head's view of the live nodes, picks the
  node the shape's next lease request goes to (the one holding fewest of
  its leases, a node that declined lately skipped for a back-off), and the
  lease that takes the next task (round-robin over the nodes: the idle lease
  whose node took a task longest ago);
* ``NodeLinks`` (IO, on the client's IO thread) opens one authenticated
  connection per other node (TLS, then the token challenge, as the
  connection to this process's own node; nothing is decoded before it),
  asks the lease there, reads that node's ``lease_revoke`` and gives
  leases back on it.  A lease ends with that connection, as with its own
  node.

A node that cannot fit the shape now answers with the node the head's view
says can (``try``, spillback, when the request allows it; ``node/leases.py``):
the request goes there once, marked not to be sent on again (no ping-pong).

The head records every task as for any leased task (``lease=[node,
worker]`` or ``lease_q`` then ``lease_start``): explain, cancel, retries
and a node's death work as for leases on the own node.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..protocol.comm import Comm, connect

if TYPE_CHECKING:  # pragma: no cover
    from .leases import ClientLease

logger = logging.getLogger("flowcore.client")

#: the third element of a SPREAD shape's lease key
SPREAD = "SPREAD"
#: seconds the head's view of the nodes is used before it is asked again
NODES_TTL = 1.0
#: seconds before a node that declined a lease of a shape is asked again
DECLINED_BACKOFF = 0.2
#: seconds a node with room but no idle worker yet (it starts one) is waited
#: for before it counts as declining
START_WAIT = 2.0


def spread_key(res_items: tuple, env: Any) -> tuple:
    """The lease key of SPREAD tasks of resources ``res_items`` and runtime_env ``env``."""
    return res_items, env, SPREAD


def is_spread(key: tuple) -> bool:
    return len(key) > 2 and key[2] == SPREAD


def spread_ready(spec: dict, ready: dict) -> bool:
    """Whether SPREAD task ``spec`` may go to a worker on any node: every
    argument ready and inline (no store read, no failed or nested ref)."""
    for oid in spec.get("deps") or ():
        info = ready.get(oid)
        if info is None or info.get("error") or info.get("nested") or info.get("inline") is None:
            return False
    return True


class SpreadPlan:
    """Where SPREAD leases are asked and which one takes the next task (no IO)."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}     # live node id -> address (the head's view)
        self.totals: dict[str, dict] = {}   # live node id -> its resources (when known)
        self.seen = -1.0                    # when that view was taken (-1: never)
        self.declined: dict[tuple, float] = {}  # (key, node) -> not asked again before
        self.clock = 0
        self.last: dict[str, int] = {}      # node -> clock of the last task sent there
        self.taken: dict[str, int] = {}     # node -> SPREAD tasks sent there
        self.starting: dict[tuple, float] = {}  # (key, node) -> waited for until

    def stale(self, now: float) -> bool:
        return self.seen < 0 or now - self.seen > NODES_TTL

    def set_nodes(self, rows: Iterable[dict], now: float) -> None:
        """The head's ``list_nodes`` rows: the live nodes and their addresses."""
        rows = [r for r in rows if r.get("alive", True) and r.get("address") and r.get("node_id")]
        self.nodes = {r["node_id"]: r["address"] for r in rows}
        self.totals = {r["node_id"]: r["resources_total"] for r in rows
                       if r.get("resources_total") is not None}
        self.seen = now
        low = min(self.taken.values(), default=0)
        for n in self.nodes:  # (a node new here starts level with the others)
            self.taken.setdefault(n, low)

    def _spreads_over(self, key: tuple) -> list[str]:
        """The live nodes SPREAD shape ``key`` could ever run on."""
        res = key[0]
        totals = self.totals
        return [n for n in self.nodes
                if n not in totals or all(totals[n].get(k, 0.0) + 1e-9 >= v
                                          for k, v in res if v > 0)]

    def target(self, key: tuple, held: Iterable["ClientLease"], now: float,
               here: str) -> str | None:
        """The node the next lease of SPREAD shape ``key`` is asked of: the
        live node holding fewest of its (usable) leases, not in a back-off
        after declining one; ties go to this process's node (``here``), then
        the node order.  None when every node is backing off."""
        count = {n: 0 for n in self._spreads_over(key)}
        for ls in held:
            if not ls.revoked and not ls.gone and ls.node in count:
                count[ls.node] += 1
        best = None
        for n in count:
            if now < self.declined.get((key, n), 0.0):
                continue
            rank = (count[n], n != here)
            if best is None or rank < best[0]:
                best = (rank, n)
        return None if best is None else best[1]

    def covered(self, key: tuple, held: Iterable["ClientLease"], now: float) -> bool:
        """Whether SPREAD shape ``key`` holds a usable lease on every live
        node not backing off after a decline: until it does, its tasks go
        through the head (which spreads them) while leases are asked for,
        so a burst never crowds onto the node whose lease came first."""
        if not self.nodes:
            return False
        have = {ls.node for ls in held if not ls.revoked and not ls.gone}
        return all(n in have or now < self.declined.get((key, n), 0.0)
                   for n in self._spreads_over(key))

    def may_take(self, key: tuple, node: str, now: float) -> bool:
        """(while ``key`` is not covered) Whether a lease on ``node`` may take
        a task now: only while ``node`` has taken no more SPREAD tasks than
        the live nodes still to be leased from (a node backing off after a
        decline is not waited for), so a burst does not crowd onto the node
        whose lease came first."""
        live = [n for n in self._spreads_over(key) if now >= self.declined.get((key, n), 0.0)]
        if not live:
            return True
        return self.taken.get(node, 0) <= min(self.taken.get(n, 0) for n in live)

    def wait_start(self, key: tuple, node: str, now: float) -> bool:
        """``node`` declined a lease of ``key`` only for want of an idle
        worker (it has room and starts one): True while it is still waited
        for (asked again soon, not skipped); after ``START_WAIT`` it counts
        as declining, and is not waited for again for a while (a worker
        that never comes never holds a burst back for long)."""
        until = self.starting.get((key, node))
        if until is None or now > until + 5 * START_WAIT:
            until = self.starting[(key, node)] = now + START_WAIT
            if len(self.starting) > 1024:
                self.starting = {k: v for k, v in self.starting.items()
                                 if now <= v + 5 * START_WAIT}
        return now < until

    def granted(self, key: tuple, node: str) -> None:
        self.starting.pop((key, node), None)

    def declined_by(self, key: tuple, node: str, now: float) -> None:
        """``node`` declined a lease of ``key``: ask the others first for a while."""
        self.declined[(key, node)] = now + DECLINED_BACKOFF
        if len(self.declined) > 1024:
            self.declined = {k: v for k, v in self.declined.items() if v > now}

    def follow(self, reply: dict, asked: str) -> str | None:
        """The node a declined request's spillback (``try``) points to, when
        it is worth following: a known live node other than the one asked."""
        to = reply.get("try")
        if not to or to[0] == asked:
            return None
        node = str(to[0])
        if node not in self.nodes and to[1]:
            self.nodes[node] = str(to[1])
        return node if node in self.nodes else None

    def pick(self, candidates: Iterable["ClientLease"]) -> "ClientLease | None":
        """Of the leases with room (``candidates``, idle ones first by the
        caller's rule), the one whose node took a SPREAD task longest ago."""
        best = None
        for ls in candidates:
            rank = self.last.get(ls.node, -1)
            if best is None or rank < best[0]:
                best = (rank, ls)
        return None if best is None else best[1]

    def took(self, node: str) -> None:
        self.clock += 1
        self.last[node] = self.clock
        self.taken[node] = self.taken.get(node, 0) + 1

    def forget(self, node: str) -> None:
        """``node`` is gone (its connection closed)."""
        self.nodes.pop(node, None)
        self.totals.pop(node, None)
        self.last.pop(node, None)
        self.taken.pop(node, None)


class NodeLinks:
    """Connections to other nodes for SPREAD leases (IO thread only)."""

    def __init__(self, client: Any, plan: SpreadPlan, on_revoke: Callable[[dict], None],
                 on_lost: Callable[[str], None]) -> None:
        self.client = client
        self.comms: dict[str, Comm] = {}
        self.opening: dict[str, asyncio.Future] = {}
        self.on_revoke = on_revoke
        self.on_lost = on_lost
        self.plan = plan
        self.followed = 0  # spillbacks followed (for tests and views)

    async def request(self, key: tuple, res: dict, held: list["ClientLease"]) -> dict:
        """Ask a lease of SPREAD shape ``key`` of the node ``SpreadPlan``
        picks; a decline that points to another node (spillback) is
        followed once, asking that node not to send it on again."""
        await self.refresh()
        plan, now = self.plan, time.monotonic()
        node = plan.target(key, held, now, self.client.node_id)
        if node is None:
            return {"lease": None}
        ask = {"op": "lease_request", "res": res, "env": key[1]}
        try:
            r = await (await self.comm(node)).request(dict(ask, spill=True))
        except Exception:
            plan.declined_by(key, node, time.monotonic())  # (not waited for meanwhile)
            raise
        if r.get("lease"):
            plan.granted(key, node)
            return r
        if r.get("starting") and plan.wait_start(key, node, time.monotonic()):
            return r  # (its worker is starting: asked again after the short back-off)
        plan.declined_by(key, node, time.monotonic())
        to = plan.follow(r, node)
        if to is None:
            return r
        self.followed += 1
        try:
            r = await (await self.comm(to)).request(ask)  # (no spill: not sent on again)
        except Exception:
            plan.declined_by(key, to, time.monotonic())
            raise
        if r.get("lease"):
            plan.granted(key, to)
        else:
            plan.declined_by(key, to, time.monotonic())
        return r

    async def refresh(self) -> None:
        """Take the head's view of the nodes when the one held is stale."""
        c = self.client
        if not self.plan.stale(time.monotonic()) or c.head is None:
            return
        r = await c.head.request({"op": "list_nodes"})
        rows = r.get("result") or []
        self.plan.set_nodes(rows, time.monotonic())
        if c.node_id and c.node_id not in self.plan.nodes and c.node is not None:
            self.plan.nodes[c.node_id] = c.node_address or ""

    async def comm(self, node: str) -> Comm:
        """The connection to ``node`` (this process's own node connection
        for its node); opened and registered on first use."""
        c = self.client
        if node == c.node_id:
            if c.node is None or c.node.closed:
                raise ConnectionError("no connection to the node")
            return c.node
        comm = self.comms.get(node)
        if comm is not None and not comm.closed:
            return comm
        fut = self.opening.get(node)
        if fut is not None:
            return await asyncio.shield(fut)
        address = self.plan.nodes.get(node)
        if not address:
            raise ConnectionError(f"node {node} is not known alive")
        fut = self.opening[node] = asyncio.get_event_loop().create_future()
        try:
            comm = await connect(address, c.token, tls=c.tls)
            asyncio.ensure_future(self._read(node, comm))
            await comm.request({"op": "register_client", "pid": __import__("os").getpid()})
            if c.closed:
                comm.close()
                raise ConnectionError("closing")
            self.comms[node] = comm
            fut.set_result(comm)
            return comm
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # (retrieved: nobody else may wait)
            raise
        finally:
            self.opening.pop(node, None)

    async def _read(self, node: str, comm: Comm) -> None:
        def on_msg(_comm: Comm, msg: dict, frames: list) -> None:
            if msg.get("op") == "lease_revoke":
                self.on_revoke(msg)
            elif msg.get("op") != "release_cached":
                logger.debug("node %s sent %s to a lease holder", node, msg.get("op"))
        await comm.run(on_msg)
        if self.comms.get(node) is comm:
            del self.comms[node]
        self.plan.forget(node)
        self.on_lost(node)

    def send(self, node: str, msg: dict) -> None:
        comm = self.comms.get(node)
        if comm is not None and not comm.closed:
            comm.send(msg)

    def close(self) -> None:
        for comm in list(self.comms.values()):
            comm.close()
        self.comms.clear()


__all__ = ["SpreadPlan", "NodeLinks", "spread_key", "is_spread", "spread_ready", "SPREAD"]
