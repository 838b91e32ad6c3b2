"""The data path between a calling process (the HTTP proxy, or a process
holding a ``DeploymentHandle``) and a replica: one TCP connection per
(process, replica), authenticated both ways by HMAC challenges on a secret
the controller made for this serve instance (neither end unpickles a byte
from a peer that has not proved it knows the secret). Frames are
``(length, request id, op)`` headers followed by a pickled payload, many
requests in flight at once: HTTP requests (scope, body) and handle calls
(method, args, kwargs) one way, their answers the other. Replicas stay
flowcore actors (their lifecycle, streams and calls whose arguments hold
object references use actor calls); this only takes plain requests off
the per-call scheduling path."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import pickle
import struct
from typing import Any, Awaitable, Callable

_HEAD = struct.Struct("!IQB")          # payload length, request id, op
#: ops of the caller's frames
OP_HTTP, OP_CALL, OP_CANCEL = 0, 1, 2
#: ops of the replica's answers
ANS_HTTP, ANS_OK, ANS_ERR = 0, 1, 2
#: the largest frame either end accepts (a request body is capped well below
#: this by the proxy's max_body_size); more closes the channel
MAX_FRAME = int(os.environ.get("FLOWCORE_MAX_MESSAGE_BYTES", 256 * 2**20))

# FLOWCORE_SERVE_DIRECT_HTTP=0: HTTP requests and handle calls go to replicas
# as actor calls. So they do on a cluster running under TLS (its processes
# get FLOWCORE_TLS_*): the channel authenticates but does not encrypt, actor
# calls do both.
ENABLED = os.environ.get("FLOWCORE_SERVE_DIRECT_HTTP", "1") != "0" and \
    not os.environ.get("FLOWCORE_TLS_CERT")

#: ``handler(payload) -> (answer op, answer payload)`` for one request op
Handler = Callable[[bytes], Awaitable[tuple[int, bytes]]]


def _proof(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


class ChannelClosed(ConnectionError):
    """The replica's end of the channel went away (the replica died or
    closed the connection)."""


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    n, rid, op = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    if n > MAX_FRAME:
        raise ChannelClosed(f"a channel frame of {n} bytes is over the {MAX_FRAME}-byte cap")
    return rid, op, await reader.readexactly(n)


def _write(writer: asyncio.StreamWriter, rid: int, op: int, payload: bytes) -> None:
    if len(payload) < 16384:
        writer.write(_HEAD.pack(len(payload), rid, op) + payload)
    else:
        writer.writelines((_HEAD.pack(len(payload), rid, op), payload))


async def serve(handlers: dict[int, Handler], host: str,
                secret: bytes) -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    """Listen on ``host`` (port 0) and answer each request of op ``k`` with
    ``await handlers[k](payload)``; ``OP_CANCEL`` cancels a running one."""

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = os.urandom(16)
        try:
            writer.write(nonce)
            got = await asyncio.wait_for(reader.readexactly(32 + 16), 10)
            proof, their_nonce = got[:32], got[32:]
            if not hmac.compare_digest(proof, _proof(secret, b"proxy", nonce)):
                writer.write(b"\x00")
                writer.close()
                return
            # the caller checks this end too before it reads any answer
            writer.write(b"\x01" + _proof(secret, b"replica", their_nonce))
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        running: dict[int, asyncio.Future] = {}

        async def one(rid: int, handler: Handler, payload: bytes) -> None:
            try:
                op, answer = await handler(payload)
            except asyncio.CancelledError:
                return
            except Exception as e:  # noqa: BLE001 - reported as a 500 by the proxy
                op, answer = ANS_HTTP, pickle.dumps(("error", f"{type(e).__name__}: {e}"))
            finally:
                running.pop(rid, None)
            if not writer.is_closing():
                _write(writer, rid, op, answer)

        try:
            while True:
                rid, op, payload = await _read_frame(reader)
                if op == OP_CANCEL:
                    task = running.pop(rid, None)
                    if task is not None:
                        task.cancel()
                    continue
                handler = handlers.get(op)
                if handler is None:
                    break
                running[rid] = asyncio.ensure_future(one(rid, handler, payload))
        except (asyncio.IncompleteReadError, OSError, ChannelClosed):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(conn, host, 0, backlog=256)
    addr = server.sockets[0].getsockname()[:2]
    return server, (addr[0], addr[1])


#: ``callback(op, payload, error)``: an answer arrived (error None) or the
#: channel closed first (op and payload None)
Callback = Callable[[Any, Any, Any], None]


class Channel:
    """The caller's end of one replica's channel (used on one event loop)."""

    def __init__(self, addr: tuple[str, int], secret: bytes) -> None:
        self.addr = addr
        self.secret = secret
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, Callback] = {}
        self.ids = itertools.count()
        self.closed = False
        self._connecting: asyncio.Future | None = None

    async def _connect(self) -> None:
        reader, writer = await asyncio.open_connection(*self.addr)
        nonce = await reader.readexactly(16)
        mine = os.urandom(16)
        writer.write(_proof(self.secret, b"proxy", nonce) + mine)
        ok = await reader.readexactly(1)
        if ok != b"\x01":
            writer.close()
            raise ConnectionRefusedError(f"replica channel {self.addr} refused the secret")
        if not hmac.compare_digest(await reader.readexactly(32),
                                   _proof(self.secret, b"replica", mine)):
            writer.close()
            raise ConnectionRefusedError(
                f"the peer at {self.addr} is not the replica: it does not know the secret")
        self.writer = writer
        asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                rid, op, payload = await _read_frame(reader)
                cb = self.pending.pop(rid, None)
                if cb is not None:
                    cb(op, payload, None)
        except (asyncio.IncompleteReadError, OSError, EOFError, ChannelClosed):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.writer is not None:
            self.writer.close()
        pending, self.pending = self.pending, {}
        err = ChannelClosed(f"replica channel {self.addr} closed")
        for cb in pending.values():
            cb(None, None, err)

    async def connect(self) -> None:
        """Open and authenticate the connection (once)."""
        if self.closed:
            raise ChannelClosed(f"replica channel {self.addr} closed")
        if self.writer is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            try:
                await asyncio.shield(self._connecting)
            except (OSError, EOFError) as e:     # EOFError: closed in the handshake
                self.closed = True
                raise ChannelClosed(f"cannot reach replica channel {self.addr}: {e}") from None

    def send(self, op: int, payload: bytes, callback: Callback) -> int:
        """Send one request on the connected channel; ``callback`` gets its
        answer. Returns the request id (for ``cancel``)."""
        if self.closed or self.writer is None:
            raise ChannelClosed(f"replica channel {self.addr} closed")
        rid = next(self.ids)
        self.pending[rid] = callback
        _write(self.writer, rid, op, payload)
        return rid

    def cancel(self, rid: int) -> None:
        """Stop waiting for ``rid`` and ask the replica to cancel it."""
        if self.pending.pop(rid, None) is not None and not self.closed and \
                self.writer is not None:
            _write(self.writer, rid, OP_CANCEL, b"")

    async def call(self, scope: dict, body: bytes) -> tuple:
        """One HTTP request: the replica's answer tuple."""
        await self.connect()
        fut = asyncio.get_running_loop().create_future()

        def done(op: Any, payload: Any, err: Any) -> None:
            if fut.done():
                return
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(payload)
        self.send(OP_HTTP, pickle.dumps((scope, body), protocol=5), done)
        return pickle.loads(await fut)
