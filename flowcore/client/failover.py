"""A driver that outlives its node: when the node it is attached to goes
away, the driver moves to another node (one on its host, mapped, if any;
else the one with the most free CPUs, in client mode), and from client mode
attaches again to a node on its host once one runs.  ``NodeFailover`` is a
component of ``CoreClient`` (``client.failover``); everything runs on the
client's IO loop except ``await_switch``, which user threads call.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..protocol.comm import Comm
    from .core import CoreClient

logger = logging.getLogger("flowcore.client")

#: how long a driver whose node died looks for another node (seconds)
NODE_FAILOVER_WAIT = 30.0
#: how often a driver in client mode after losing its node looks for a node on its host
REATTACH_POLL = 1.0


def _pick_node(nodes: list[dict]) -> dict | None:
    """The node a driver moves to: one on this host if any (its store can be
    mapped), else the one with the most CPUs available."""
    import socket as _socket
    if not nodes:
        return None
    host = _socket.gethostname()
    local = [n for n in nodes if n.get("hostname") == host]
    if local and os.environ.get("FLOWCORE_CLIENT_MODE", "") in ("", "0"):
        return local[0]
    return max(nodes, key=lambda n: n.get("resources_available", {}).get("CPU", 0.0))


class NodeFailover:
    """The node switch of a driver (see the module docstring).  Owns the
    switch in progress (``switch``: set while the driver moves to another
    node) and the watch for a node on this host again (``reattaching``)."""

    def __init__(self, client: "CoreClient"):
        self.client = client
        self.switch: asyncio.Future | None = None
        self.reattaching: asyncio.Future | None = None

    async def switch_node(self, dead: "Comm") -> bool:
        """The driver's node went away: carry on through another node (one
        on this host if any, mapped; else the one with most CPUs, in client
        mode).  True once connected; False when no node answers within
        ``NODE_FAILOVER_WAIT`` s or the head is gone too."""
        c = self.client
        old_id, old_address = c.node_id, c.node_address
        logger.warning("lost the connection to this driver's node %s (%s); carrying on "
                       "through another node", old_id, old_address)
        c.node = None
        c.objects.mapping = None  # views already handed out keep their own mapping alive
        with c._lock:
            c.objects.held.forget()  # its pins went with it
        done = self.switch = c.loop.create_future()
        ok = False
        try:
            deadline = time.monotonic() + NODE_FAILOVER_WAIT
            while not c.closed and time.monotonic() < deadline:
                head = c.head
                if head is None and c._reconnecting is None:
                    break  # the head is gone as well
                try:
                    if head is None:
                        await asyncio.shield(c._reconnecting)  # type: ignore[arg-type]
                        continue
                    r = await asyncio.wait_for(head.request({"op": "list_nodes"}), 10.0)
                    nodes = [n for n in r.get("result") or () if n.get("alive")
                             and n.get("node_id") != old_id and n.get("address") != old_address]
                    pick = _pick_node(nodes)
                    if pick is not None:
                        await self._attach(pick)
                        ok = True
                        logger.warning("this driver now uses node %s (%s)%s", c.node_id,
                                       c.node_address, " in client mode: objects travel "
                                       "over the connection" if c.remote_store else "")
                        break
                except Exception as e:  # noqa: BLE001 - try again until the deadline
                    logger.debug("no node to move to yet: %s", e)
                await asyncio.sleep(0.5)
        finally:
            self.switch = None
            if not done.done():
                done.set_result(ok)
        if ok and c.remote_store and self.reattaching is None:
            self.reattaching = asyncio.ensure_future(self._reattach_when_local())
        return ok

    async def _attach(self, node: dict) -> None:
        """Connect to ``node`` (an entry of list_nodes) as this driver's node."""
        c = self.client
        import socket as _socket
        local = node.get("hostname") == _socket.gethostname() and \
            os.environ.get("FLOWCORE_CLIENT_MODE", "") in ("", "0")
        c.node_address = node["address"]
        comm, r = await c._connect_node()
        c.remote_store = not local
        c.node_id = r["node_id"]
        c.node = comm
        c._drain()

    async def _reattach_when_local(self) -> None:
        """In client mode after losing this host's node: once a node runs on
        this host again, use it (objects shared through its store again)."""
        c = self.client
        import socket as _socket
        try:
            while not c.closed and c.remote_store:
                await asyncio.sleep(REATTACH_POLL)
                host = _socket.gethostname()
                head, node = c.head, c.node
                if head is None or node is None or node._pending:
                    continue  # not while a read or write is in flight on the gateway
                try:
                    r = await asyncio.wait_for(head.request({"op": "list_nodes"}), 10.0)
                except Exception:  # noqa: BLE001
                    continue
                local = [n for n in r.get("result") or () if n.get("alive")
                         and n.get("hostname") == host]
                if not local or node._pending:
                    continue
                gateway = node
                c.node = None
                with c._lock:
                    c.objects.held.forget()  # (none in client mode: no mapping)
                done = self.switch = c.loop.create_future()
                try:
                    await self._attach(local[0])
                    gateway.close()
                    logger.warning("this driver attached to node %s on its host again",
                                   c.node_id)
                except Exception as e:  # noqa: BLE001 - stay on the gateway
                    logger.debug("attaching to %s failed: %s", local[0].get("address"), e)
                    c.node = gateway
                finally:
                    self.switch = None
                    done.set_result(c.node is not None)
        finally:
            self.reattaching = None

    def await_switch(self) -> bool:
        """From a user thread: wait for a node switch in progress; True if this
        driver has a node afterwards."""
        c = self.client
        switch = self.switch
        if switch is not None:
            async def wait() -> None:
                await asyncio.shield(switch)
            try:
                asyncio.run_coroutine_threadsafe(wait(), c.loop).result(
                    NODE_FAILOVER_WAIT + 5)
            except Exception:  # noqa: BLE001
                pass
        return c.node is not None
