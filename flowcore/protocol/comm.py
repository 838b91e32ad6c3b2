"""Tornado connections carrying batched msgpack messages.

``Comm`` wraps an authenticated ``IOStream``.  ``send`` queues a message and
the queue is flushed once per IOLoop iteration, so bursts of messages travel
as one batch.  ``request`` sends a message with a request id and returns a
future resolved by the peer's ``{"op": "reply", "rid": ...}``.

``serve`` and ``connect`` run the mutual token challenge (see ``auth``) before
the first byte of any message is decoded.  A peer that fails it, or later
sends a malformed batch, is logged once and disconnected; the server goes on.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Any, Awaitable, Callable

from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpclient import TCPClient
from tornado.tcpserver import TCPServer

from ..exceptions import AuthenticationError, ProtocolError
from . import auth, frames

logger = logging.getLogger("flowcore.comm")

AUTH_TIMEOUT = 10.0


class Comm:
    """One authenticated, batched, bidirectional message connection."""

    def __init__(self, stream: IOStream, peer: str, limits: frames.Limits = frames.DEFAULT_LIMITS):
        self.stream = stream
        self.peer = peer
        self.limits = limits
        self._out: list[dict] = []
        self._out_frames: list = []
        self._flush_scheduled = False
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.closed = False
        self.info: dict[str, Any] = {}  # free for the owner (role, ids)
        self._loop = asyncio.get_event_loop()
        try:
            stream.set_nodelay(True)
        except Exception:
            pass

    # ------------------------------------------------------------ sending
    def send(self, msg: dict) -> None:
        if self.closed:
            return
        self._out.append(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_with_frames(self, msg: dict, bufs: list) -> None:
        """Attach out-of-band buffers; the message gets ``_frames`` indexes."""
        base = len(self._out_frames)
        msg["_frames"] = list(range(base, base + len(bufs)))
        self._out_frames.extend(bufs)
        self.send(msg)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._out:
            return
        out, self._out = self._out, []
        fr, self._out_frames = self._out_frames, []
        try:
            for buf in frames.encode(out, fr):
                self.stream.write(buf)
        except StreamClosedError:
            self._on_closed()

    def request(self, msg: dict) -> "asyncio.Future[dict]":
        rid = next(self._rids)
        msg["rid"] = rid
        fut = self._loop.create_future()
        self._pending[rid] = fut
        self.send(msg)
        return fut

    def reply(self, msg: dict, **fields: Any) -> None:
        out = {"op": "reply", "rid": msg.get("rid")}
        out.update(fields)
        self.send(out)

    # ------------------------------------------------------------ receiving
    async def run(self, handle: Callable[["Comm", dict, list], Any]) -> None:
        """Read batches until the connection closes; ``reply`` messages
        resolve pending requests, everything else goes to ``handle``.

        Reads take whatever the socket has (one await per recv, not per
        message) and every complete batch in the buffer is handled at once.
        """
        buf = bytearray()
        prefix = frames.PREFIX.size
        pending = self._pending
        try:
            while True:
                chunk = await self.stream.read_bytes(1 << 20, partial=True)
                if buf:
                    buf += chunk
                    data = memoryview(buf)
                else:
                    data = memoryview(chunk)
                pos = 0
                end = len(data)
                while end - pos >= prefix:
                    (n,) = frames.PREFIX.unpack_from(data, pos)
                    frames.check_body_length(n, self.limits)
                    if end - pos - prefix < n:
                        break
                    msgs, bufs = frames.decode_body(data[pos + prefix:pos + prefix + n],
                                                    self.limits)
                    pos += prefix + n
                    for msg in msgs:
                        if msg["op"] == "reply":
                            fut = pending.pop(msg.get("rid"), None)
                            if fut is not None and not fut.done():
                                fut.set_result(msg)
                            continue
                        r = handle(self, msg, bufs)
                        if r is not None and asyncio.iscoroutine(r):
                            asyncio.ensure_future(r)
                rest = bytes(data[pos:]) if pos < end else b""
                buf = bytearray(rest)
        except StreamClosedError:
            pass
        except ProtocolError as e:
            logger.warning("closing connection from %s: %s", self.peer, e)
        finally:
            self._on_closed()

    def _on_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to {self.peer} closed"))
        self._pending.clear()
        self.stream.close()

    def close(self) -> None:
        if not self.closed:
            self._flush()
        self._on_closed()


async def _server_handshake(stream: IOStream, token: bytes) -> bool:
    hello, snonce = auth.server_hello()
    await stream.write(hello)
    data = await stream.read_bytes(auth.CLIENT_PROOF)
    cnonce = auth.check_client_proof(token, snonce, data)
    if cnonce is None:
        await stream.write(auth.REFUSAL)
        return False
    await stream.write(auth.server_proof(token, cnonce, snonce))
    return True


async def _client_handshake(stream: IOStream, token: bytes, address: str) -> None:
    try:
        hello = await stream.read_bytes(auth.SERVER_HELLO)
        snonce = auth.parse_server_hello(hello)
    except ValueError as e:
        raise AuthenticationError(f"{address}: {e}") from None
    proof, cnonce = auth.client_proof(token, snonce)
    await stream.write(proof)
    answer = await stream.read_bytes(auth.SERVER_PROOF)
    if answer[:1] == b"\x00":
        raise AuthenticationError(
            f"{address} refused the token: pass the cluster's token with "
            f"init(token=...) / --token / FLOWCORE_TOKEN")
    if not auth.check_server_proof(token, cnonce, snonce, answer):
        raise AuthenticationError(
            f"{address} failed to prove it knows the token: it is not the flowcore "
            f"process you meant to reach")


class _Server(TCPServer):
    def __init__(self, token: bytes, on_comm: Callable[[Comm], Awaitable[None] | None],
                 name: str, limits: frames.Limits):
        super().__init__()
        self.token = token
        self.on_comm = on_comm
        self.name = name
        self.limits = limits

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        try:
            ok = await asyncio.wait_for(_server_handshake(stream, self.token), AUTH_TIMEOUT)
        except (StreamClosedError, asyncio.TimeoutError, OSError):
            stream.close()
            return
        if not ok:
            logger.warning("%s: refused connection from %s: wrong or missing token",
                           self.name, peer)
            stream.close()
            return
        comm = Comm(stream, peer, self.limits)
        r = self.on_comm(comm)
        if asyncio.iscoroutine(r):
            await r


def serve(token: bytes, on_comm: Callable[[Comm], Any], host: str = "127.0.0.1",
          port: int = 0, name: str = "server",
          limits: frames.Limits = frames.DEFAULT_LIMITS) -> tuple[TCPServer, int]:
    """Listen on host:port (0 = a free port); returns (server, bound port)."""
    socks = bind_sockets(port, address=host, family=socket.AF_INET)
    server = _Server(token, on_comm, name, limits)
    server.add_sockets(socks)
    return server, socks[0].getsockname()[1]


async def connect(address: str, token: bytes, timeout: float = 10.0,
                  limits: frames.Limits = frames.DEFAULT_LIMITS) -> Comm:
    """Connect to ``tcp://host:port`` (or ``host:port``) and authenticate."""
    host, port = parse_address(address)
    try:
        stream = await asyncio.wait_for(TCPClient().connect(host, port), timeout)
    except (OSError, StreamClosedError, asyncio.TimeoutError) as e:
        raise ConnectionError(f"cannot reach a flowcore process at {address}: {e}") from None
    try:
        await asyncio.wait_for(_client_handshake(stream, token, address), timeout)
    except StreamClosedError:
        stream.close()
        raise AuthenticationError(
            f"{address} closed the connection during authentication (wrong token, "
            f"or not a flowcore process)") from None
    except asyncio.TimeoutError:
        stream.close()
        raise AuthenticationError(f"{address} did not complete authentication in {timeout}s") \
            from None
    except BaseException:
        stream.close()
        raise
    return Comm(stream, address, limits)


def parse_address(address: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise TypeError(f"address must be a string like 'tcp://127.0.0.1:8786', got "
                        f"{type(address).__name__}")
    a = address[len("tcp://"):] if address.startswith("tcp://") else address
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected 'tcp://HOST:PORT'")
    return host, int(port)
