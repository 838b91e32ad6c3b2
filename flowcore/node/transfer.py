"""Moving objects between nodes.

A node that needs an object held elsewhere pulls it straight from a node
holding a copy (never through the head).  Objects larger than one chunk take
the bulk path (``bulk``): a raw authenticated socket per pull, sent with
``sendfile`` from the file that holds the object and received straight into
the new copy, in threads.  Smaller objects, and any object whose source's
bulk port cannot be reached, go over the message connection to that node in
chunks, several chunk requests in flight (under TLS when the cluster uses
it).  Concurrent requests for one object share a single pull.  The new copy
is sealed in the local store and reported to the head, whose object table
records every copy.  A source that fails makes the pull try the next one.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import sys
from typing import Any

from ..exceptions import AuthenticationError, ObjectLostError, ProtocolError
from ..protocol.chunks import CHUNK, WINDOW, fetch_chunks  # the chunked path's sizes
from ..protocol import messages
from ..protocol.comm import Comm, connect
from . import bulk

#: seconds a pull of an object still being written here waits for its seal
SEAL_WAIT = 20.0

logger = logging.getLogger("flowcore.transfer")

BULK_MIN = CHUNK      # objects of at least this size take the bulk path
STREAMS = 2           # bulk connections per pull
#: what makes a source fail (the pull then tries the next one)
SOURCE_ERRORS = (ConnectionError, ObjectLostError, OSError, AuthenticationError,
                 ProtocolError)


def bulk_ranges(size: int, streams: int) -> list[tuple[int, int]]:
    """Split ``[0, size)`` into at most ``streams`` contiguous ranges of whole
    chunks (each stream gets at least one chunk)."""
    n = max(1, min(streams, size // CHUNK))
    step = -(-size // n)
    step = -(-step // 4096) * 4096  # page-aligned boundaries
    out, start = [], 0
    while start < size:
        out.append((start, min(size, start + step)))
        start += step
    return out or [(0, 0)]


def pick_path(size: int, bulk_port: int | None) -> str:
    """``"bulk"`` or ``"chunks"`` for an object of ``size`` bytes from a peer
    whose bulk port is ``bulk_port`` (0 / None: it has none, or it could not
    be reached)."""
    return "bulk" if bulk_port and size >= BULK_MIN else "chunks"


class Transfers:
    def __init__(self, node: Any):
        self.node = node
        self.peers: dict[str, Comm] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self.pulls: dict[bytes, asyncio.Future] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.bulk_pulls = 0      # objects pulled over the bulk path
        self.chunk_pulls = 0     # objects pulled in chunks
        self.bulk_ports: dict[str, int] = {}   # peer address -> its bulk port (0: none)
        self.bulk_server: bulk.BulkServer | None = None
        #: pulls served while the object is still being written here: its
        #: writer's seal and the head's news that the object is ready travel
        #: on different connections, so a peer can ask first
        self._seal_waiters: dict[bytes, list[asyncio.Future]] = {}
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="flowcore-bulk-recv")

    def start(self, host: str) -> None:
        """Open this node's bulk port."""
        self.bulk_server = bulk.BulkServer(self.node.token, host, self._hold, self._release,
                                           tls=self.node.tls)

    def stats(self) -> dict:
        srv = self.bulk_server
        return {"bulk_pulls": self.bulk_pulls, "chunk_pulls": self.chunk_pulls,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out + (srv.bytes_out if srv else 0),
                "bulk_served": srv.served if srv else 0,
                "bulk_refused": srv.refused if srv else 0,
                "bulk_port": srv.port if srv else 0, "pulling": len(self.pulls)}

    # ------------------------------------------------------------ serving side
    def sealed(self, oid: bytes) -> None:
        """``oid`` was sealed here: wake the pulls waiting for it."""
        for fut in self._seal_waiters.pop(oid, ()):
            if not fut.done():
                fut.set_result(None)

    async def until_sealed(self, oid: bytes, timeout: float = SEAL_WAIT) -> None:
        """Return once ``oid`` is sealed here, is not here (any more: its
        writer aborted), or after ``timeout`` seconds."""
        store = self.node.store
        deadline = asyncio.get_running_loop().time() + timeout
        while store.contains(oid) and not store.is_sealed(oid):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            fut = asyncio.get_running_loop().create_future()
            self._seal_waiters.setdefault(oid, []).append(fut)
            try:  # woken by the seal; an abort is seen by the next look
                await asyncio.wait_for(fut, min(left, 0.5))
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._seal_waiters.get(oid)
                if waiters is not None and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._seal_waiters[oid]

    def _being_written(self, oid: bytes) -> bool:
        store = self.node.store
        return store.contains(oid) and not store.is_sealed(oid)

    def serve_chunk(self, comm: Comm, msg: dict) -> None:
        if self._being_written(msg["oid"]):
            asyncio.ensure_future(self._serve_chunk_sealed(comm, msg))
            return
        self._serve_chunk(comm, msg)

    async def _serve_chunk_sealed(self, comm: Comm, msg: dict) -> None:
        await self.until_sealed(msg["oid"])
        if not comm.closed:
            self._serve_chunk(comm, msg)

    def _serve_chunk(self, comm: Comm, msg: dict) -> None:
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

    def serve_bulk_port(self, comm: Comm, msg: dict) -> None:
        comm.reply(msg, port=self.bulk_server.port if self.bulk_server else 0)

    async def _hold(self, oid: bytes, start: int, length: int, tag: str) -> tuple[str, int]:
        """(On the loop, for the bulk server.)  Pin ``oid`` where it is, once
        sealed, and return the file and offset of its range ``[start, start + length)``."""
        if self._being_written(oid):
            await self.until_sealed(oid)
        loc = self.node.store.pin(oid, tag, restore=False)
        if start < 0 or length < 0 or start + length > loc.size:
            self.node.store.unpin(oid, tag)
            raise ValueError(f"range [{start}, {start + length}) is outside the object "
                             f"({loc.size} bytes)")
        return loc.path, loc.offset + start

    def _release(self, oid: bytes, tag: str) -> None:
        try:
            self.node.store.unpin(oid, tag)
        except (KeyError, ValueError):  # the store closed meanwhile
            pass

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
                port = await self._bulk_port(comm, address) if size >= BULK_MIN else 0
                if pick_path(size, port) == "bulk":
                    try:
                        await self._pull_bulk(address, port, oid, size)
                    except bulk.BulkUnavailable as e:
                        logger.warning("bulk port of %s unreachable (%s): pulling in chunks "
                                       "from it from now on", address, e)
                        self.bulk_ports[address] = 0
                        await self._pull_from(comm, oid, size)
                else:
                    await self._pull_from(comm, oid, size)
            except SOURCE_ERRORS as e:
                logger.warning("pull of object %s from %s failed: %s", oid.hex()[:12],
                               address, e)
                errors.append(f"{node_id} ({address}): {e}")
                continue
            if self.node.head is not None:
                self.node.head.send(messages.object_location(oid, self.node.node_id))
            return
        raise ObjectLostError(f"object {oid.hex()} could not be fetched from any node holding "
                              f"it: {'; '.join(errors) or 'no other node holds a copy'}")

    async def _bulk_port(self, comm: Comm, address: str) -> int:
        port = self.bulk_ports.get(address)
        if port is None:
            reply = await comm.request({"op": "bulk_port"})
            port = int(reply.get("port") or 0)
            self.bulk_ports[address] = port
        return port

    async def _pull_bulk(self, address: str, port: int, oid: bytes, size: int) -> None:
        store = self.node.store
        loc = store.create(oid, size, "transfer")
        try:
            sink = bulk.Sink(store.write_view(oid), loc.path, size)
            socks: list[socket.socket] = []
            handles: list[socket.socket] = []
            waiters = []
            try:
                for start, end in bulk_ranges(size, STREAMS):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(sock)
                    handles.append(sock.dup())  # the same connection, to stop the thread
                    waiters.append(asyncio.wrap_future(self._threads.submit(
                        bulk.receive, sock, address, port, self.node.token, self.node.tls,
                        oid, start, sink.view[start:end])))
                try:
                    got = sum(await asyncio.shield(asyncio.gather(*waiters)))
                except BaseException:
                    for h in handles:
                        try:
                            h.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    await asyncio.wait(waiters)  # no thread writes into the copy any more
                    raise
            finally:
                for s in handles + socks:
                    s.close()
                sink.close()
            self.bytes_in += got
            store.seal(oid)
        except bulk.BulkUnavailable:
            store.abort(oid)  # the caller pulls it in chunks instead
            raise
        except BaseException:
            self._abort(oid)
            raise
        self.bulk_pulls += 1
        self.node.sealed(oid)

    def _abort(self, oid: bytes) -> None:
        self.node.store.abort(oid)
        for c, m in self.node.pin_waiters.pop(oid, ()):
            c.reply(m, error=f"object {oid.hex()} could not be fetched")

    async def _pull_from(self, comm: Comm, oid: bytes, size: int) -> None:
        store = self.node.store
        store.create(oid, size, "transfer")
        try:
            def write(start: int, data: memoryview) -> None:
                store.write_chunk(oid, start, data)
                self.bytes_in += len(data)
            await fetch_chunks(comm, oid, size, write, CHUNK, WINDOW)
            store.seal(oid)
        except BaseException:
            self._abort(oid)
            raise
        self.chunk_pulls += 1
        self.node.sealed(oid)

    def close(self) -> None:
        if self.bulk_server is not None:
            self.bulk_server.close()
        self._threads.shutdown(wait=False)
        for c in self.peers.values():
            c.close()
        self.peers.clear()
