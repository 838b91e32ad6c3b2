"""The bulk path for large objects: one raw socket per pull.

Every node listens on a second port, its bulk port.  A puller opens a
connection, both sides run the token challenge (``protocol.blocking`` and
``protocol.admission``, inside TLS when the cluster uses it), and the puller asks for a byte range of one
object with one fixed-size request.  The serving side pins the object
(without moving it) and streams the range straight from the file that holds
it: with ``socket.sendfile`` from the arena file in /dev/shm, a spill file or
a disk-backed fallback file alike, so no user-space copy is made; under TLS
it reads the file into a buffer and sends that.  The puller receives with
``recv_into`` straight into the object's place in its own store.

Both ends run in threads (blocking sockets release the GIL), so neither
node's event loop waits on the bytes; the store itself is only touched on
the event loop.  Nothing is read from a peer before it passes the challenge.

Wire, after the challenge (big-endian)::

    request:  u8 version | u16 oid length | u64 start | u64 length | oid
    answer:   u8 status (1 ok, 0 error) | u64 n
              ok: n bytes of the object follow; error: n bytes of UTF-8 text
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import mmap
import os
import socket
import ssl
import struct
import threading
from typing import TYPE_CHECKING, Any, Callable, Coroutine

from ..exceptions import ObjectLostError, ProtocolError
from ..protocol import blocking
from ..protocol.admission import Admission
from ..protocol.comm import AUTH_TIMEOUT, listening_socket, parse_address

if TYPE_CHECKING:
    from ..protocol.tls import TLSConfig

logger = logging.getLogger("flowcore.bulk")

VERSION = 1
REQUEST = struct.Struct("!BHQQ")
ANSWER = struct.Struct("!BQ")
MAX_OID = 64
MAX_ERROR = 4096
#: a transfer that makes no progress for this long is abandoned
IDLE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
#: bytes per read when the file cannot be sent with sendfile (under TLS)
TLS_BLOCK = 1 << 20


class BulkUnavailable(ConnectionError):
    """The peer's bulk port could not be reached (the object may still be
    fetched over the peer's message connection)."""


# ====================================================================== serving
class BulkServer:
    """The listening side: peers are admitted (TLS and the token challenge) by
    one ``protocol.admission`` thread, and each authenticated connection is
    served in a thread of its own.  ``hold(oid, start, length, tag)`` (a coroutine, run on the
    loop) pins the range and returns ``(path, offset)``; ``release(oid, tag)``
    (called on the loop) drops that pin."""

    def __init__(self, token: bytes, host: str,
                 hold: Callable[[bytes, int, int, str], Coroutine[Any, Any, tuple]],
                 release: Callable[[bytes, str], None], tls: "TLSConfig | None" = None):
        self.token = token
        self._hold = hold
        self._release = release
        self._ctx = tls.server_context() if tls is not None else None
        self._loop = asyncio.get_event_loop()
        self._sock = sock = listening_socket(host, 0, backlog=128)
        self.port: int = sock.getsockname()[1]
        self._seq = itertools.count(1)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.served = 0        # ranges sent in full
        self.bytes_out = 0
        self._admission = Admission(sock, token, self._admitted, "bulk",
                                    tls_context=self._ctx, on_refused=self._refused)

    @property
    def refused(self) -> int:
        """Connections that failed the challenge or its deadline."""
        return self._admission.refused

    def _refused(self, peer: str, why: str) -> None:
        logger.warning("bulk: refused connection from %s: %s", peer, why)

    def _admitted(self, conn: socket.socket, peer: str) -> None:
        with self._lock:
            self._conns.add(conn)
        threading.Thread(target=self._serve, args=(conn, peer),
                         name="flowcore-bulk-send", daemon=True).start()

    def _serve(self, raw: socket.socket, peer: str) -> None:
        """Serve one authenticated connection (TLS already wrapped in ``raw``)."""
        conn = raw
        try:
            raw.settimeout(AUTH_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            version, n, start, length = REQUEST.unpack(
                blocking.recv_exact(conn, REQUEST.size, "its request"))
            if version != VERSION or not 0 < n <= MAX_OID:
                logger.warning("bulk: closing connection from %s: bad request", peer)
                return
            oid = blocking.recv_exact(conn, n, "its request")
            conn.settimeout(IDLE_TIMEOUT)
            tag = f"bulk-{next(self._seq)}"
            try:
                path, offset = asyncio.run_coroutine_threadsafe(
                    self._hold(oid, start, length, tag), self._loop).result(timeout=IDLE_TIMEOUT)
            except (KeyError, ValueError) as e:
                text = f"{type(e).__name__}: {e}".encode()[:MAX_ERROR]
                conn.sendall(ANSWER.pack(0, len(text)) + text)
                return
            try:
                conn.sendall(ANSWER.pack(1, length))
                self._send_range(conn, path, offset, length)
            finally:
                try:
                    self._loop.call_soon_threadsafe(self._release, oid, tag)
                except RuntimeError:  # the loop is gone: so is the store
                    pass
            self.served += 1
        except (OSError, ConnectionError, ssl.SSLError, concurrent.futures.TimeoutError,
                RuntimeError) as e:
            logger.info("bulk: connection from %s ended: %s", peer, e)
        finally:
            with self._lock:
                self._conns.discard(raw)
            conn.close()

    def _send_range(self, conn: socket.socket, path: str, offset: int, length: int) -> None:
        with open(path, "rb") as f:
            if self._ctx is None:
                sent = conn.sendfile(f, offset, length)  # kernel to kernel
                if sent != length:
                    raise ConnectionError(f"{path} ended after {sent} of {length} bytes")
                self.bytes_out += sent
                return
            buf = bytearray(min(TLS_BLOCK, length) or 1)
            view = memoryview(buf)
            pos, end = offset, offset + length
            while pos < end:
                k = os.preadv(f.fileno(), [view[:min(len(buf), end - pos)]], pos)
                if not k:
                    raise ConnectionError(f"{path} ended at byte {pos}")
                conn.sendall(view[:k])
                pos += k
                self.bytes_out += k

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._admission.close()
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# ====================================================================== pulling
class Sink:
    """Where pulled bytes go: a writable view of the destination.  For an
    object in the arena that is the store's own view; for a disk-backed
    object, a mapping of its file made here and closed by ``close``."""

    def __init__(self, view: memoryview | None, path: str, size: int):
        self._mm: mmap.mmap | None = None
        if view is None and size:
            fd = os.open(path, os.O_RDWR)
            try:
                self._mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            view = memoryview(self._mm)
        self.view = view if view is not None else memoryview(bytearray(0))

    def close(self) -> None:
        self.view.release()
        if self._mm is not None:
            self._mm.close()


def receive(sock: socket.socket, address: str, port: int, token: bytes,
            tls: "TLSConfig | None", oid: bytes, start: int, dest: memoryview) -> int:
    """Blocking: fetch ``len(dest)`` bytes of ``oid`` from ``start`` off the
    bulk port of the node at ``address`` into ``dest``; return the count.

    ``sock`` is a fresh TCP socket owned by the caller, who may shut it down
    from another thread to stop the transfer.  ``BulkUnavailable`` when the
    port cannot be reached; ``AuthenticationError`` from TLS or the challenge;
    ``ObjectLostError`` when the peer does not have the object;
    ``ConnectionError`` / ``OSError`` (timeouts included) when the peer dies
    or stalls."""
    host, _ = parse_address(address)
    where = f"{host}:{port}"
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect((host, port))
    except OSError as e:
        raise BulkUnavailable(f"cannot reach the bulk port {where}: {e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = sock
    if tls is not None:
        conn = blocking.start_tls(sock, tls, host, where)
    try:
        blocking.client_handshake(conn, token, where)
        length = len(dest)
        conn.sendall(REQUEST.pack(VERSION, len(oid), start, length) + oid)
        conn.settimeout(IDLE_TIMEOUT)
        status, n = ANSWER.unpack(blocking.recv_exact(conn, ANSWER.size, "its answer"))
        if status != 1:
            text = blocking.recv_exact(conn, min(n, MAX_ERROR), "its error")
            raise ObjectLostError(f"{where}: {text.decode(errors='replace')}")
        if n != length:
            raise ProtocolError(f"{where} announced {n} bytes, {length} were asked for")
        return blocking.recv_into_exact(conn, memoryview(dest), f"object bytes ({where})")
    finally:
        if conn is not sock:
            conn.close()
