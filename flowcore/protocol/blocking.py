"""The blocking transport: connections read and written by threads that
block on their sockets, without an event loop.

Used by worker processes (their ``InlineClient`` reads its connections
itself), by the threaded client for direct actor calls, by an actor's
listener for the callers it admits, and by the bulk object path of nodes.
It speaks the same wire as the asyncio ``comm.Comm``:

- ``start_tls`` wraps a connected socket in TLS (verified against the
  cluster's CA) when the cluster uses it, turning every failure into an
  ``AuthenticationError`` in plain words;
- ``client_handshake`` / ``server_handshake`` run the token challenge of
  ``auth`` (the same ``ClientChallenge`` / ``ServerChallenge`` steps the
  ``Comm`` and the ``admission`` thread drive) on fixed-size raw bytes,
  before anything else is read from the peer;
- ``BlockingConn`` carries message batches, split by the same
  ``frames.FrameReader`` as the ``Comm`` (the cap
  ``FLOWCORE_MAX_MESSAGE_BYTES`` checked at each length prefix, large
  bodies gathered as their bytes arrive).
"""
from __future__ import annotations

import logging
import socket
import ssl

from ..exceptions import AuthenticationError
from . import auth, frames
from .comm import parse_address
from .tls import TLSConfig, describe_failure

logger = logging.getLogger("flowcore.client")

#: bytes asked of the socket per read (into a buffer each connection keeps)
READ_SIZE = 256 << 10


def recv_into_exact(sock: socket.socket, view: memoryview, what: str = "data") -> int:
    """Fill ``view`` from ``sock``; ``ConnectionError`` if the peer hangs up
    first (saying after how many of the bytes)."""
    n = len(view)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"peer closed the connection while sending {what} "
                                  f"after {got} of {n} bytes")
        got += k
    return got


def recv_exact(sock: socket.socket, n: int, what: str = "data") -> bytes:
    """Read exactly ``n`` bytes; ``ConnectionError`` if the peer hangs up first."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf), what)
    return bytes(buf)


def start_tls(sock: socket.socket, tls: TLSConfig, host: str, address: str) -> ssl.SSLSocket:
    """Run the client side of the TLS handshake on the connected ``sock``
    and return the TLS socket (which owns the connection from now on);
    ``AuthenticationError`` saying why when it fails."""
    try:
        return tls.client_context().wrap_socket(sock, server_hostname=host)
    except ssl.SSLError as e:
        raise AuthenticationError(describe_failure(e, address)) from None
    except socket.timeout:
        raise AuthenticationError(f"{address} did not complete the TLS handshake in "
                                  f"time") from None
    except OSError as e:
        raise AuthenticationError(
            f"{address} closed the connection during the TLS handshake: it may run "
            f"without TLS, or refused this process's certificate ({e})") from None


def client_handshake(sock: socket.socket, token: bytes, address: str) -> None:
    """Run the client side of the token challenge on ``sock`` (inside TLS
    when it is a TLS socket); ``AuthenticationError`` unless the server both
    accepted ``token`` and proved it knows it too."""
    challenge = auth.ClientChallenge(token, address)
    while not challenge.done:
        try:
            data = recv_exact(sock, challenge.need, "its part of the challenge")
        except ssl.SSLError as e:
            raise AuthenticationError(describe_failure(e, address)) from None
        except ConnectionError:
            raise challenge.hung_up(isinstance(sock, ssl.SSLSocket)) from None
        out = challenge.receive(data)
        if out:
            sock.sendall(out)


def server_handshake(sock: socket.socket, token: bytes) -> bool:
    """Run the server side; True when the client proved it knows ``token``.
    A client that fails gets the refusal and nothing else."""
    challenge = auth.ServerChallenge(token)
    sock.sendall(challenge.hello)
    answer = challenge.answer(recv_exact(sock, challenge.need, "its token proof"))
    try:
        sock.sendall(answer)
    except OSError:
        if challenge.accepted:
            raise
    return challenge.accepted


class BlockingConn:
    """An authenticated message connection on a blocking socket.

    ``BlockingConn(address, token, timeout, tls)`` connects (TLS first when
    ``tls`` is given, then the token challenge); ``accepted`` wraps a socket
    that an ``admission.Admission`` thread already authenticated.  ``write``
    sends a batch; ``read_available``, called when the socket is readable,
    returns the complete batches.  A TLS socket hands out one record per
    ``recv`` and may hold decrypted bytes the kernel no longer reports as
    readable, so ``read_available`` drains it before returning."""

    def __init__(self, address: str, token: bytes, timeout: float = 10.0,
                 tls: TLSConfig | None = None,
                 limits: frames.Limits = frames.DEFAULT_LIMITS):
        host, port = parse_address(address)
        sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = start_tls(sock, tls, host, address)
            client_handshake(sock, token, address)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._setup(sock, address, tls is not None, limits)

    @classmethod
    def accepted(cls, sock: socket.socket, address: str, tls: bool,
                 limits: frames.Limits = frames.DEFAULT_LIMITS) -> "BlockingConn":
        """A connection this process accepted and authenticated (a caller of
        the actor it hosts): made blocking, without delay on small writes."""
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls.__new__(cls)
        conn._setup(sock, address, tls, limits)
        return conn

    def _setup(self, sock: socket.socket, address: str, tls: bool,
               limits: frames.Limits) -> None:
        self.sock = sock
        self.address = address
        self.tls = tls
        self.closed = False
        self.reader = frames.FrameReader(limits)
        # reads land here: a fresh bytes object of READ_SIZE per recv would cost an
        # mmap/munmap pair each time (the reader copies what it keeps)
        self._rbuf = memoryview(bytearray(READ_SIZE))

    def fileno(self) -> int:
        return self.sock.fileno()

    def write(self, msgs: list[dict]) -> None:
        if msgs and not self.closed:
            try:
                self.sock.sendall(b"".join(bytes(b) for b in frames.encode(msgs)))
            except OSError as e:  # the peer is gone: whoever reads notices
                logger.info("write to %s failed: %s", self.address, e)
                self.closed = True

    def read_available(self) -> list[tuple[list[dict], list]]:
        """Read what the socket has (it was reported readable); return the
        complete batches (none when a non-blocking socket turns out to have
        nothing after all).  An empty read means the peer closed;
        ``ProtocolError`` for a batch that breaks the format or the cap."""
        buf = self._rbuf
        try:
            n = self.sock.recv_into(buf)
        except BlockingIOError:  # a non-blocking socket another thread read first
            return []
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return []  # a non-blocking TLS socket: only part of a record came yet
        if not n:
            self.closed = True
            return []
        reader = self.reader
        reader.feed(buf[:n])
        if self.tls:
            while self.sock.pending():  # type: ignore[attr-defined]
                n = self.sock.recv_into(buf)
                reader.feed(buf[:n])
        out: list[tuple[list[dict], list]] = []
        while True:
            batch = reader.next_batch()
            if batch is None:
                return out
            out.append(batch)

    def close(self) -> None:
        self.closed = True
        self.reader.clear()
        try:
            self.sock.close()
        except OSError:
            pass
