"""The HTTP data path between the proxy and a replica: one TCP connection
per (proxy, replica), authenticated both ways by HMAC challenges on a secret
the controller made for this serve instance (neither end unpickles a byte
from a peer that has not proved it knows the secret), carrying length-prefixed pickled
(request id, scope, body) frames one way and (request id, answer) frames
the other, many requests in flight at once. Replicas stay flowcore actors
(their lifecycle, handle calls and streams use actor calls); this only
takes the HTTP request/response bytes off the per-call scheduling path."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import pickle
import struct
from typing import Any, Awaitable, Callable

_LEN = struct.Struct("!I")
#: the largest frame either end accepts (a request body is capped well below
#: this by the proxy's max_body_size); more closes the channel
MAX_FRAME = int(os.environ.get("FLOWCORE_MAX_MESSAGE_BYTES", 256 * 2**20))


def _proof(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


class ChannelClosed(ConnectionError):
    """The replica's end of the channel went away (the replica died or
    closed the connection)."""


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ChannelClosed(f"a channel frame of {n} bytes is over the {MAX_FRAME}-byte cap")
    return pickle.loads(await reader.readexactly(n))


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=5)
    return _LEN.pack(len(data)) + data


async def serve(handler: Callable[[dict, bytes], Awaitable[tuple]], host: str,
                secret: bytes) -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    """Listen on ``host`` (port 0) and answer each request with
    ``await handler(scope, body)``."""

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
            # the proxy checks this end too before it reads any answer
            writer.write(b"\x01" + _proof(secret, b"replica", their_nonce))
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            writer.close()
            return

        async def one(rid: int, scope: dict, body: bytes) -> None:
            try:
                answer = await handler(scope, body)
            except Exception as e:  # noqa: BLE001 - reported as a 500 by the proxy
                answer = ("error", f"{type(e).__name__}: {e}")
            if not writer.is_closing():
                writer.write(_frame((rid, answer)))

        try:
            while True:
                rid, scope, body = await _read_frame(reader)
                asyncio.ensure_future(one(rid, scope, body))
        except (asyncio.IncompleteReadError, OSError, ChannelClosed):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(conn, host, 0, backlog=256)
    addr = server.sockets[0].getsockname()[:2]
    return server, (addr[0], addr[1])


class Channel:
    """The proxy's end of one replica's channel (used on one event loop)."""

    def __init__(self, addr: tuple[str, int], secret: bytes) -> None:
        self.addr = addr
        self.secret = secret
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
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
                rid, answer = await _read_frame(reader)
                fut = self.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        except (asyncio.IncompleteReadError, OSError, EOFError, ChannelClosed):
            pass
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.writer is not None:
            self.writer.close()
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"replica channel {self.addr} closed"))

    async def call(self, scope: dict, body: bytes) -> tuple:
        if self.closed:
            raise ChannelClosed(f"replica channel {self.addr} closed")
        if self.writer is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            try:
                await asyncio.shield(self._connecting)
            except OSError as e:
                self.closed = True
                raise ChannelClosed(f"cannot reach replica channel {self.addr}: {e}") from None
        assert self.writer is not None
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        self.writer.write(_frame((rid, scope, body)))
        return await fut
