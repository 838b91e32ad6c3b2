"""The socket on which an actor's process takes calls directly from callers.

It listens on its node's interface; the port goes to the head in
``actor_ready`` and from there to callers (``actor_direct``).  Accepted
connections are authenticated by one ``protocol.admission`` thread (TLS first
when the cluster uses it, then the token challenge of ``protocol.auth``, with
an overall deadline and a cap on peers waiting) before a single byte of them
is decoded; a peer that fails is sent the refusal and closed.  An
authenticated connection is handed to the client as a
``protocol.blocking.BlockingConn``, whose pump reads calls from it like any
other connection.
"""
from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from ..protocol.admission import Admission
from ..protocol.blocking import BlockingConn

if TYPE_CHECKING:  # pragma: no cover
    from ..protocol.tls import TLSConfig

logger = logging.getLogger("flowcore.worker")


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
        self.admission = Admission(self.sock, token, self._admitted, "actor",
                                   tls_context=tls.server_context() if tls else None,
                                   on_refused=self._refused)

    @staticmethod
    def _refused(peer: str, why: str) -> None:
        logger.warning("refused a direct connection from %s: %s", peer, why)

    def _admitted(self, conn: socket.socket, peer: str) -> None:
        self.client.add_caller(BlockingConn.accepted(conn, peer, self.tls is not None))

    def close(self) -> None:
        self.closed = True
        self.admission.close()
        try:
            self.sock.close()
        except OSError:
            pass
