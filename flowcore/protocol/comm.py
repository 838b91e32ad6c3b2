"""Message connections: authenticated, batched, bidirectional.

A ``Comm`` is an asyncio ``Protocol`` running on the process's Tornado
IOLoop (which is an asyncio loop).  The wire deliberately uses asyncio
transports rather than Tornado's ``IOStream``: measured here, a message
round trip between two processes costs ~140 µs this way against ~350 µs
through ``IOStream`` futures, and every task crosses several such hops.

``send`` queues a message; the queue is flushed once per loop iteration, so
bursts of messages travel as one batch.  ``request`` sends a message with a
request id and returns a future resolved by the peer's
``{"op": "reply", "rid": ...}``.

Both sides run the mutual token challenge (see ``auth``) on raw fixed-size
bytes before the first byte of any message is decoded.  A peer that fails
it, or later sends a malformed batch, is logged once and disconnected; the
server goes on serving others.

With a ``TLSConfig`` (see ``tls``), ``serve`` and ``connect`` run the same
``Comm`` over asyncio's TLS transport: the TLS handshake (mutual, against the
cluster's CA) comes first, then the token challenge inside the channel.
Without one, nothing about the plain path changes.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
from typing import Any, Callable, Iterator, cast

from ..exceptions import AuthenticationError, ProtocolError
from . import auth, frames
from .tls import TLSConfig, describe_failure

logger = logging.getLogger("flowcore.comm")

AUTH_TIMEOUT = 10.0
#: a TLS server tells a peer that sent no TLS handshake for this long that it
#: requires TLS (a client without TLS waits for the server to speak first)
PLAIN_PEER_AFTER = 3.0
#: a server silent this long after connecting is asked whether it speaks HTTP
SILENT_PEER_PROBE = 1.0
Handler = Callable[["Comm", dict, list], Any]

_AUTH, _OPEN, _CLOSED = range(3)


class Comm(asyncio.Protocol):
    """One connection.  Created by ``serve`` (server side) or ``connect``."""

    def __init__(self, token: bytes, *, server: bool, name: str = "",
                 on_open: Callable[["Comm"], Any] | None = None,
                 limits: frames.Limits = frames.DEFAULT_LIMITS):
        self.token = token
        self.is_server = server
        self.name = name
        self.on_open = on_open
        self.limits = limits
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_event_loop()
        self._state = _AUTH
        self._buf = bytearray()              # challenge bytes, before the link is open
        self._reader = frames.FrameReader(limits)
        # the token challenge: this side of it
        self._server_ch = auth.ServerChallenge(token) if server else None
        self._client_ch = None if server else auth.ClientChallenge(token, name)
        self._out: list[dict] = []
        self._out_frames: list = []
        self._flush_scheduled = False
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._handler: Handler | None = None
        self._early: list[tuple[list[dict], list]] = []
        self.opened: asyncio.Future = self._loop.create_future()
        self.done: asyncio.Future = self._loop.create_future()
        self.closed = False
        self.info: dict[str, Any] = {}  # free for the owner (role, ids)
        self._auth_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._auth_timer = self._loop.call_later(AUTH_TIMEOUT, self._auth_timeout)
        if self._server_ch is not None:
            tr.write(self._server_ch.hello)

    def _auth_timeout(self) -> None:
        if self._state != _OPEN:
            self._fail_open(AuthenticationError(
                f"{self.peer} did not complete authentication in {AUTH_TIMEOUT}s"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._reader.clear()  # a half-received batch is dropped with the peer
        self._buf = bytearray()
        if isinstance(exc, ssl.SSLError) and self._state != _OPEN:
            self._on_closed(AuthenticationError(describe_failure(exc, self.peer)))
            return
        self._on_closed(ConnectionError(f"connection to {self.peer} lost"))

    def data_received(self, data: bytes) -> None:
        try:
            if self._state != _OPEN:
                self._buf += data
                if not self._handshake():
                    return
                data, self._buf = bytes(self._buf), bytearray()
            reader = self._reader
            reader.feed(data)
            while not self.closed:
                # each good batch is handled before a later bad one is looked at
                batch = reader.next_batch()
                if batch is None:
                    break
                self._dispatch(*batch)
        except ProtocolError as e:
            logger.warning("%s: closing connection from %s: %s", self.name or "comm",
                           self.peer, e)
            self.close()

    # ------------------------------------------------------------ handshake
    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    @property
    def greeted(self) -> bool:
        """(client side) The server's greeting arrived."""
        return self._client_ch is not None and self._client_ch.greeted

    def _handshake(self) -> bool:
        """Advance the challenge; True once the connection is open."""
        assert self.transport is not None
        server = self._server_ch
        if server is not None:
            data = self._take(server.need)
            if data is None:
                return False
            answer = server.answer(data)
            self.transport.write(answer)
            if server.accepted:
                return self._open()
            if auth.looks_like_tls(data):
                logger.warning("%s: refused connection from %s: it starts a TLS "
                               "handshake, and this server runs without TLS (start it "
                               "with --tls-cert/--tls-key/--tls-ca)",
                               self.name or "server", self.peer)
            else:
                logger.warning("%s: refused connection from %s: wrong or missing token",
                               self.name or "server", self.peer)
            self._fail_open(AuthenticationError("wrong token"))
            return False
        client = self._client_ch
        assert client is not None
        client.peer = self.peer
        while not client.done:
            data = self._take(client.need)
            if data is None:
                return False
            try:
                out = client.receive(data)
            except AuthenticationError as e:
                self._fail_open(e)
                return False
            if out:
                self.transport.write(out)
        return self._open()

    def _open(self) -> bool:
        self._state = _OPEN
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if not self.opened.done():
            self.opened.set_result(self)
        if self.on_open is not None:
            r = self.on_open(self)
            if asyncio.iscoroutine(r):
                asyncio.ensure_future(r)
        return True

    def _fail_open(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
            self.opened.exception()  # mark retrieved
        self.close()

    # ------------------------------------------------------------ receiving
    def _dispatch(self, msgs: list[dict], bufs: list) -> None:
        handler = self._handler
        pending = self._pending
        for i, msg in enumerate(msgs):
            if msg["op"] == "reply":
                fut = pending.pop(msg.get("rid", -1), None)
                if fut is not None and not fut.done():
                    if "_frames" in msg:
                        msg["_data"] = [bufs[j] for j in msg["_frames"]]
                    fut.set_result(msg)
                continue
            if handler is None:
                self._early.append((msgs[i:], bufs))
                return
            try:
                r = handler(self, msg, bufs)
            except Exception:
                logger.exception("%s: error handling %r from %s", self.name or "comm",
                                 msg.get("op"), self.peer)
                continue
            if r is not None and asyncio.iscoroutine(r):
                asyncio.ensure_future(r)
            if self.closed:
                return

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler
        early, self._early = self._early, []
        for msgs, bufs in early:
            self._dispatch(msgs, bufs)

    async def run(self, handler: Handler) -> None:
        """Handle messages with ``handler`` until the connection closes."""
        self.set_handler(handler)
        await asyncio.shield(self.done)

    # ------------------------------------------------------------ sending
    #: while a guarded handler runs (``guarded``): the connections it queued
    #: messages on, with how much each had queued before
    journal: "dict[Comm, tuple[int, int]] | None" = None

    def _note(self) -> None:
        j = Comm.journal
        if j is not None and self not in j:
            j[self] = (len(self._out), len(self._out_frames))

    def send(self, msg: dict) -> None:
        if self.closed:
            return
        if Comm.journal is not None:
            self._note()
        self._out.append(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_with_frames(self, msg: dict, bufs: list) -> None:
        """Attach out-of-band buffers; the message gets ``_frames`` indexes."""
        if Comm.journal is not None:
            self._note()
        base = len(self._out_frames)
        msg["_frames"] = list(range(base, base + len(bufs)))
        self._out_frames.extend(bufs)
        self.send(msg)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._out or self.transport is None:
            return
        out, self._out = self._out, []
        fr, self._out_frames = self._out_frames, []
        try:
            batches = frames.encode_batches(out, fr, self.limits.max_body)
        except ProtocolError as e:  # one message over the cap: the peer would refuse it
            logger.error("%s: not sending to %s: %s", self.name or "comm", self.peer, e)
            for m in out:
                fut = self._pending.pop(m["rid"], None) if "rid" in m else None
                if fut is not None and not fut.done():
                    fut.set_exception(ProtocolError(str(e)))
            return
        for batch in batches:
            if fr:  # large out-of-band frames: no join, each written as it is
                for b in batch:
                    self.transport.write(b)
            else:
                self.transport.writelines(batch)

    def request(self, msg: dict, bufs: list | None = None) -> "asyncio.Future[dict]":
        """Send ``msg`` (with binary ``bufs`` attached, sent without a copy
        here) and return a future for its reply."""
        rid = next(self._rids)
        msg["rid"] = rid
        fut = self._loop.create_future()
        if self.closed:
            fut.set_exception(ConnectionError(f"connection to {self.peer} closed"))
            return fut
        self._pending[rid] = fut
        if bufs:
            self.send_with_frames(msg, bufs)
        else:
            self.send(msg)
        return fut

    def _rollback(self, mark: tuple[int, int]) -> int:
        """Drop what was queued since ``mark``; how many messages that was."""
        n = max(0, len(self._out) - mark[0])
        del self._out[mark[0]:]
        del self._out_frames[mark[1]:]
        return n

    def reply(self, msg: dict, **fields: Any) -> None:
        out = {"op": "reply", "rid": msg.get("rid")}
        out.update(fields)
        self.send(out)

    # ------------------------------------------------------------ closing
    def _on_closed(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        self._state = _CLOSED
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(exc)
            self.opened.exception()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to {self.peer} closed"))
        self._pending.clear()
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if not self.closed and self._state == _OPEN:
            self._flush()
        if self.transport is not None:
            self.transport.close()
        self._on_closed(ConnectionError(f"connection to {self.peer} closed"))


async def serve(token: bytes, on_comm: Callable[[Comm], Any], host: str = "127.0.0.1",
                port: int = 0, name: str = "server",
                limits: frames.Limits = frames.DEFAULT_LIMITS,
                tls: TLSConfig | None = None) -> tuple[Any, int]:
    """Listen on host:port (0 = a free port); ``on_comm`` gets each
    authenticated connection.  Returns (server, bound port); the server has
    ``close()``.  With ``tls``, every connection must complete a mutual TLS
    handshake first."""
    loop = asyncio.get_event_loop()

    def factory() -> Comm:
        return Comm(token, server=True, name=name, on_open=on_comm, limits=limits)
    if tls is None:
        server = await loop.create_server(factory, host, port, family=socket.AF_INET,
                                          reuse_address=True)
        return server, server.sockets[0].getsockname()[1]
    listener = TLSListener(factory, tls.server_context(), host, port, name)
    return listener, listener.port


def listening_socket(host: str, port: int, backlog: int = 100) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` (0: a free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def accept_ready(sock: socket.socket, name: str, limit: int = 64
                 ) -> Iterator[tuple[socket.socket, str]]:
    """The connections waiting on the listening ``sock`` (at most ``limit``
    per wake-up), each with its peer as "host:port"."""
    for _ in range(limit):
        try:
            conn, addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of descriptors, say: try again on the next wake-up
            logger.warning("%s: accept failed: %s", name, e)
            return
        yield conn, f"{addr[0]}:{addr[1]}"


class TLSListener:
    """Accepts connections for a TLS server.

    A TLS client speaks first (its handshake); a client without TLS waits for
    the server's greeting.  So each accepted socket is watched until its first
    bytes arrive, and only then handed to asyncio's TLS transport.  A peer
    that sends nothing for ``PLAIN_PEER_AFTER`` seconds is sent
    ``auth.TLS_REQUIRED`` (a greeting a plain flowcore client reads as "this
    server requires TLS") and closed: a mismatch fails in seconds, with words,
    on both sides."""

    def __init__(self, factory: Callable[[], Comm], ctx: ssl.SSLContext, host: str,
                 port: int, name: str):
        self._loop = asyncio.get_event_loop()
        self._factory = factory
        self._ctx = ctx
        self.name = name
        self._sock = sock = listening_socket(host, port)
        self.sockets = [sock]
        self.port: int = sock.getsockname()[1]
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Future] = set()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for conn, peer in accept_ready(self._sock, self.name):
            conn.setblocking(False)
            self._waiting[conn] = self._loop.call_later(PLAIN_PEER_AFTER, self._silent, conn,
                                                        peer)
            self._loop.add_reader(conn.fileno(), self._first_bytes, conn, peer)

    def _forget(self, conn: socket.socket) -> None:
        timer = self._waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()
            self._loop.remove_reader(conn.fileno())

    def _first_bytes(self, conn: socket.socket, peer: str) -> None:
        self._forget(conn)
        task = asyncio.ensure_future(self._handshake(conn, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ctx,
                                                     ssl_handshake_timeout=AUTH_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - one bad peer never stops the server
            if isinstance(e, ssl.SSLCertVerificationError):
                why = (f"its certificate is not signed by this cluster's CA "
                       f"({e.verify_message or e.reason})")
            elif isinstance(e, ssl.SSLError):
                why = f"TLS handshake failed ({e.reason or e})"
            elif isinstance(e, (ConnectionError, EOFError)):
                why = ("it hung up during the TLS handshake (does it trust this cluster's "
                       "CA?)")
            else:
                why = f"TLS handshake failed ({str(e) or type(e).__name__})"
            logger.warning("%s: refused a connection from %s: %s", self.name, peer, why)
            conn.close()

    def _silent(self, conn: socket.socket, peer: str) -> None:
        self._forget(conn)
        logger.warning("%s: %s sent no TLS handshake within %.0f s: a client without TLS? "
                       "Told it that this server requires TLS", self.name, peer,
                       PLAIN_PEER_AFTER)
        try:
            conn.send(auth.TLS_REQUIRED)
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for conn in list(self._waiting):
            self._forget(conn)
            conn.close()

    async def wait_closed(self) -> None:
        return None


async def connect(address: str, token: bytes, timeout: float = 10.0,
                  limits: frames.Limits = frames.DEFAULT_LIMITS,
                  tls: TLSConfig | None = None) -> Comm:
    """Connect to ``tcp://host:port`` (or ``host:port``) and authenticate
    (over TLS first when ``tls`` is given)."""
    host, port = parse_address(address)
    loop = asyncio.get_event_loop()
    kw: dict[str, Any] = {}
    if tls is not None:
        kw = {"ssl": tls.client_context(), "ssl_handshake_timeout": timeout}
    try:
        _, comm = await asyncio.wait_for(
            loop.create_connection(lambda: Comm(token, server=False, limits=limits),
                                   host, port, **kw), timeout)
    except ssl.SSLError as e:
        raise AuthenticationError(describe_failure(e, address)) from None
    except (ConnectionResetError, ConnectionAbortedError) as e:
        if tls is None:
            raise ConnectionError(f"cannot reach a flowcore process at {address}: {e}") \
                from None
        raise AuthenticationError(
            f"{address} closed the connection during the TLS handshake: it may run without "
            f"TLS, or refused this process's certificate ({e})") from None
    except (OSError, asyncio.TimeoutError) as e:
        raise ConnectionError(f"cannot reach a flowcore process at {address}: {e}") from None
    comm.peer = address
    http = None
    try:
        if tls is None and timeout > SILENT_PEER_PROBE:
            # a flowcore server greets at once; a silent one may be an HTTP server
            # (the dashboard's port given by mistake): ask it on a second connection
            done, _ = await asyncio.wait([comm.opened],  # wait() cancels nothing
                                         timeout=SILENT_PEER_PROBE)
            if not done and not comm.greeted:
                http = await _probe_http(host, port)
            timeout -= SILENT_PEER_PROBE
        if http is None:
            await asyncio.wait_for(asyncio.shield(comm.opened), timeout)
    except asyncio.TimeoutError:
        comm.close()
        raise AuthenticationError(f"{address} did not complete authentication in {timeout}s") \
            from None
    except ConnectionError:
        assert comm._client_ch is not None
        comm._client_ch.peer = address
        raise comm._client_ch.hung_up(tls is not None) from None
    if http is not None:
        comm.close()
        raise ConnectionError(_http_message(address, http))
    return comm


async def _probe_http(host: str, port: int) -> dict[str, str] | None:
    """The response headers if ``host:port`` answers an HTTP request, else None
    (a flowcore server greets with its magic instead; anything else: None)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(b"HEAD / HTTP/1.0\r\nHost: flowcore\r\n\r\n")
        data = b""
        while len(data) < 8192 and b"\r\n\r\n" not in data:
            chunk = await asyncio.wait_for(reader.read(8192), 2.0)
            if not chunk:
                break
            data += chunk
            if data.startswith(auth.MAGIC[:len(data)]) and not data.startswith(b"HTTP/"):
                if len(data) >= len(auth.MAGIC):
                    return None  # a slow flowcore server
    except (OSError, asyncio.TimeoutError):
        return None if not data.startswith(b"HTTP/") else {}
    finally:
        writer.close()
    if not data.startswith(b"HTTP/"):
        return None
    headers = {}
    for line in data.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


def _http_message(address: str, headers: dict[str, str]) -> str:
    head = headers.get("x-flowcore-head")
    if head:
        return (f"{address} speaks HTTP: it is the web dashboard of the flowcore head at "
                f"{head}, not the head itself; connect to {head}")
    return (f"{address} speaks HTTP, not the flowcore protocol: it is not a flowcore head "
            f"(pass the head's tcp://HOST:PORT, which flowcore-scheduler prints as "
            f"'listening at')")


def parse_address(address: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise TypeError(f"address must be a string like 'tcp://127.0.0.1:8786', got "
                        f"{type(address).__name__}")
    a = address[len("tcp://"):] if address.startswith("tcp://") else address
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected 'tcp://HOST:PORT'")
    return host, int(port)


def guarded(where: str, handler: Handler, comm: Comm, msg: dict, frames: list) -> Any:
    """Run ``handler`` on one message; if it raises, the messages it queued on
    any connection are dropped (not sent with the next message's output) and
    the error is logged with the op."""
    if Comm.journal is not None:  # inside another guarded handler: that one covers
        return handler(comm, msg, frames)
    journal: dict[Comm, tuple[int, int]] = {}
    Comm.journal = journal
    try:
        return handler(comm, msg, frames)
    except Exception:
        Comm.journal = None
        dropped = sum(c._rollback(mark) for c, mark in journal.items())
        logger.exception("%s: error handling %r from %s (dropped %d message(s) it queued)",
                         where, msg.get("op"), comm.peer, dropped)
        return None
    finally:
        Comm.journal = None
