"""The token challenge of ``auth`` on a blocking socket, for both sides.

Links that carry raw bytes outside a ``Comm`` (the bulk object path, see
``flowcore.node.bulk``) authenticate exactly like every other connection:
the same four steps on fixed-size raw bytes, before anything else is read
from the peer.  Under TLS the caller wraps the socket first, so the
challenge runs inside the channel.
"""
from __future__ import annotations

import socket

from ..exceptions import AuthenticationError
from . import auth


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


def server_handshake(sock: socket.socket, token: bytes) -> bool:
    """Run the server side; True when the client proved it knows ``token``.
    A client that fails gets the refusal and nothing else."""
    hello, snonce = auth.server_hello()
    sock.sendall(hello)
    proof = recv_exact(sock, auth.CLIENT_PROOF, "its token proof")
    cnonce = auth.check_client_proof(token, snonce, proof)
    if cnonce is None:
        try:
            sock.sendall(auth.REFUSAL)
        except OSError:
            pass
        return False
    sock.sendall(auth.server_proof(token, cnonce, snonce))
    return True


def client_handshake(sock: socket.socket, token: bytes, address: str) -> None:
    """Run the client side; ``AuthenticationError`` unless the server both
    accepted ``token`` and proved it knows it too."""
    try:
        hello = recv_exact(sock, auth.SERVER_HELLO, "its greeting")
        snonce = auth.parse_server_hello(hello)
    except ValueError as e:
        raise AuthenticationError(f"{address}: {e}") from None
    except ConnectionError:
        raise AuthenticationError(f"{address} closed the connection before greeting "
                                  f"(it died, or it is not a flowcore process)") from None
    proof, cnonce = auth.client_proof(token, snonce)
    sock.sendall(proof)
    try:
        answer = recv_exact(sock, auth.SERVER_PROOF, "its token proof")
    except ConnectionError:
        raise AuthenticationError(f"{address} closed the connection during "
                                  f"authentication (wrong token?)") from None
    if answer[:1] == b"\x00":
        raise AuthenticationError(f"{address} refused the token")
    if not auth.check_server_proof(token, cnonce, snonce, answer):
        raise AuthenticationError(f"{address} failed to prove it knows the token: it is "
                                  f"not the flowcore process you meant to reach")
