"""Moving objects between nodes.

A node that needs an object held elsewhere pulls it straight from a node
holding a copy (never through the head): over an authenticated connection,
in chunks, with several chunk requests in flight (under TLS when the cluster
uses it).  Concurrent requests for
one object share a single pull.  The new copy is sealed in the local store
and reported to the head, whose object table records every copy.  The
serving side reads chunks out of its store (arena, spill file or disk
fallback alike).
"""
from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from typing import Any

from ..exceptions import ObjectLostError
from ..protocol.comm import Comm, connect

logger = logging.getLogger("flowcore.transfer")

CHUNK = 4 << 20       # bytes per request
WINDOW = 8            # chunk requests in flight per pull


class Transfers:
    def __init__(self, node: Any):
        self.node = node
        self.peers: dict[str, Comm] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self.pulls: dict[bytes, asyncio.Future] = {}
        self.bytes_in = 0
        self.bytes_out = 0

    # ------------------------------------------------------------ serving side
    def serve_chunk(self, comm: Comm, msg: dict) -> None:
        store = self.node.store
        try:
            data = store.chunk_view(msg["oid"], msg["start"], msg["length"])
            if sys.version_info >= (3, 12):
                # newer asyncio keeps unsent buffers by reference: copy, so a
                # later free of the object cannot change bytes still queued
                data = memoryview(bytes(data))
        except (KeyError, ValueError) as e:
            comm.reply(msg, error=f"{type(e).__name__}: {e}")
            return
        self.bytes_out += data.nbytes
        comm.send_with_frames({"op": "reply", "rid": msg.get("rid")}, [data])

    # ------------------------------------------------------------ pulling side
    @staticmethod
    async def _once(table: dict, key: Any, work: Any) -> Any:
        """Run ``work()`` once per ``key`` at a time: concurrent callers with
        the same key wait for the one already running and share its result."""
        running = table.get(key)
        if running is not None:
            return await asyncio.shield(running)
        fut = asyncio.get_event_loop().create_future()
        table[key] = fut
        try:
            result = await work()
            fut.set_result(result)
            return result
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters get it, nobody else must
            raise
        finally:
            del table[key]

    async def _peer(self, address: str) -> Comm:
        comm = self.peers.get(address)
        if comm is not None and not comm.closed:
            return comm

        async def dial() -> Comm:
            new = await connect(address, self.node.token, tls=self.node.tls)
            new.info["role"] = "peer"
            asyncio.ensure_future(new.run(lambda c, m, f: None))
            self.peers[address] = new
            return new
        return await self._once(self._connecting, address, dial)

    async def ensure_local(self, oid: bytes, size: int, sources: list[tuple[str, str]]) -> None:
        """Make ``oid`` present in this node's store, pulling it if needed."""
        store = self.node.store
        if store.contains(oid) and store.is_sealed(oid):
            return
        await self._once(self.pulls, oid, lambda: self._pull(oid, size, sources))

    async def _pull(self, oid: bytes, size: int, sources: list[tuple[str, str]]) -> None:
        errors = []
        for node_id, address in sources:
            if node_id == self.node.node_id or not address:
                continue
            try:
                comm = await self._peer(address)
                await self._pull_from(comm, oid, size)
            except (ConnectionError, ObjectLostError, OSError) as e:
                errors.append(f"{node_id} ({address}): {e}")
                continue
            if self.node.head is not None:
                self.node.head.send({"op": "object_location", "oid": oid,
                                     "node": self.node.node_id, "add": True})
            return
        raise ObjectLostError(f"object {oid.hex()} could not be fetched from any node holding "
                              f"it: {'; '.join(errors) or 'no other node holds a copy'}")

    async def _pull_from(self, comm: Comm, oid: bytes, size: int) -> None:
        store = self.node.store
        store.create(oid, size, "transfer")
        try:
            pending: deque[tuple[int, asyncio.Future]] = deque()
            offset = 0
            while offset < size or pending:
                while offset < size and len(pending) < WINDOW:
                    n = min(CHUNK, size - offset)
                    pending.append((offset, comm.request(
                        {"op": "fetch_chunk", "oid": oid, "start": offset, "length": n})))
                    offset += n
                start, fut = pending.popleft()
                reply = await fut
                if "error" in reply:
                    raise ObjectLostError(reply["error"])
                data = reply["_data"][0]
                store.write_chunk(oid, start, data)
                self.bytes_in += len(data)
            store.seal(oid)
        except BaseException:
            store.abort(oid)
            for c, m in self.node.pin_waiters.pop(oid, ()):
                c.reply(m, error=f"object {oid.hex()} could not be fetched")
            raise
        self.node.sealed(oid)

    def close(self) -> None:
        for c in self.peers.values():
            c.close()
        self.peers.clear()
