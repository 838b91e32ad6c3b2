"""The socket on which an actor's process takes calls directly from callers.

It listens on its node's interface; the port goes to the head in
``actor_ready`` and from there to callers (``actor_direct``).  Each accepted
connection is authenticated on a thread of its own (TLS first when the
cluster uses it, then the token challenge of ``protocol.auth``) before a
single byte of it is decoded; a peer that fails is sent the refusal and
closed.  An authenticated connection is handed to the client, whose pump
reads calls from it like any other connection.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from ..protocol import auth

if TYPE_CHECKING:  # pragma: no cover
    from ..protocol.tls import TLSConfig

logger = logging.getLogger("flowcore.worker")

AUTH_TIMEOUT = 10.0  # seconds a peer has to authenticate


class ActorListener:
    def __init__(self, client: Any, host: str, token: bytes, tls: "TLSConfig | None"):
        self.client = client
        self.token = token
        self.tls = tls
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept_loop, name="flowcore-actor-listener",
                         daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._admit, args=(conn, f"{peer[0]}:{peer[1]}"),
                             name="flowcore-actor-auth", daemon=True).start()

    def _admit(self, conn: socket.socket, peer: str) -> None:
        from ..client.inline import BlockingConn
        try:
            conn.settimeout(AUTH_TIMEOUT)
            if self.tls is not None:
                conn = self.tls.server_context().wrap_socket(conn, server_side=True)
            hello, snonce = auth.server_hello()
            conn.sendall(hello)
            cnonce = auth.check_client_proof(self.token, snonce,
                                             _recv_exact(conn, auth.CLIENT_PROOF))
            if cnonce is None:
                logger.warning("refused a direct connection from %s: bad token", peer)
                conn.sendall(auth.REFUSAL)
                conn.close()
                return
            conn.sendall(auth.server_proof(self.token, cnonce, snonce))
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ValueError) as e:
            logger.info("direct connection from %s dropped during authentication: %s", peer, e)
            try:
                conn.close()
            except OSError:
                pass
            return
        self.client.add_caller(BlockingConn.accepted(conn, peer, self.tls is not None))

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection during authentication")
        data += chunk
    return data
