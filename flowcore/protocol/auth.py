"""Mutual token authentication by HMAC challenge-response.

Both sides prove they know the token before a single message is decoded:

1. server -> client: ``MAGIC`` (8 bytes) + version (1) + server nonce (32)
2. client -> server: client nonce (32) + HMAC(token, "c" + snonce + cnonce)
3. server -> client: status byte (1 ok / 0 refused) + HMAC(token, "s" + cnonce + snonce)
   (on refusal, 32 zero bytes follow and the server closes)
4. the client checks the server's proof, so a process squatting on a port
   cannot feed messages to clients either.

Everything is fixed-size raw bytes; comparisons are constant-time.

``ServerChallenge`` and ``ClientChallenge`` are the two sides as steps
without IO, with every outcome's wording: the asyncio ``Comm``, the
non-blocking ``admission`` thread and the blocking ``blocking`` transport all
drive these same objects, each reading and writing in its own way.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from ..exceptions import AuthenticationError

MAGIC = b"FLOWCORE"
VERSION = 1
NONCE = 32
DIGEST = 32
SERVER_HELLO = len(MAGIC) + 1 + NONCE
CLIENT_PROOF = NONCE + DIGEST
SERVER_PROOF = 1 + DIGEST


def _mac(token: bytes, tag: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(token, tag + a + b, hashlib.sha256).digest()


def server_hello() -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE)
    return MAGIC + bytes([VERSION]) + nonce, nonce


#: what a TLS server sends, instead of a TLS handshake, to a peer that opened
#: the connection but sent no TLS handshake: most likely a client without TLS,
#: which waits for the greeting.  It reads as a greeting with this version.
TLS_REQUIRED_VERSION = 0xFE
TLS_REQUIRED = MAGIC + bytes([TLS_REQUIRED_VERSION]) + bytes(NONCE)


class TLSRequired(ValueError):
    """The server told this plain client that it only speaks TLS."""


def parse_server_hello(data: bytes) -> bytes:
    """Returns the server nonce, or raises ValueError on a peer that is not flowcore
    (``TLSRequired`` when the server only accepts TLS)."""
    if len(data) != SERVER_HELLO or data[:len(MAGIC)] != MAGIC:
        raise ValueError("peer is not a flowcore server (bad greeting)")
    if data[len(MAGIC)] == TLS_REQUIRED_VERSION:
        raise TLSRequired("the server requires TLS and this process connects without it: "
                          "pass init(tls={'cert': ..., 'key': ..., 'ca': ...}), "
                          "--tls-cert/--tls-key/--tls-ca, or set FLOWCORE_TLS_CERT, "
                          "FLOWCORE_TLS_KEY and FLOWCORE_TLS_CA")
    if data[len(MAGIC)] != VERSION:
        raise ValueError(f"peer speaks wire version {data[len(MAGIC)]}, this is {VERSION}")
    return data[len(MAGIC) + 1:]


def client_proof(token: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE)
    return nonce + _mac(token, b"c", server_nonce, nonce), nonce


def check_client_proof(token: bytes, server_nonce: bytes, data: bytes) -> bytes | None:
    """Returns the client nonce when the proof is right, else None."""
    if len(data) != CLIENT_PROOF:
        return None
    cnonce, digest = data[:NONCE], data[NONCE:]
    if hmac.compare_digest(digest, _mac(token, b"c", server_nonce, cnonce)):
        return cnonce
    return None


def server_proof(token: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return b"\x01" + _mac(token, b"s", client_nonce, server_nonce)


REFUSAL = b"\x00" + bytes(DIGEST)


def check_server_proof(token: bytes, client_nonce: bytes, server_nonce: bytes,
                       data: bytes) -> bool:
    if len(data) != SERVER_PROOF or data[0] != 1:
        return False
    return hmac.compare_digest(data[1:], _mac(token, b"s", client_nonce, server_nonce))


def looks_like_tls(data: bytes) -> bool:
    """True for the start of a TLS handshake record (a TLS client talking to a
    server without TLS)."""
    return data[:1] == b"\x16" and data[1:2] == b"\x03"


def token_bytes(token: str | bytes) -> bytes:
    if isinstance(token, bytes):
        return token
    if not isinstance(token, str) or not token:
        raise ValueError("a flowcore token must be a non-empty string")
    return token.encode()


class ServerChallenge:
    """The server's side: send ``hello``, read ``need`` bytes from the
    client, send what ``answer`` returns for them; ``accepted`` then says
    whether the client proved it knows the token (a refused client got
    ``REFUSAL`` and is to be closed)."""

    need = CLIENT_PROOF

    def __init__(self, token: bytes):
        self.token = token
        self.hello, self._snonce = server_hello()
        self.accepted = False

    def answer(self, proof: bytes) -> bytes:
        cnonce = check_client_proof(self.token, self._snonce, proof)
        if cnonce is None:
            return REFUSAL
        self.accepted = True
        return server_proof(self.token, cnonce, self._snonce)


class ClientChallenge:
    """The client's side: read ``need`` bytes from the server, pass them to
    ``receive``, send what it returns; repeat until ``done`` (the server
    accepted the token and proved it knows it too).  ``receive`` raises
    ``AuthenticationError`` naming ``peer`` and what went wrong;
    ``hung_up`` is the error for a server that closed the connection first."""

    def __init__(self, token: bytes, peer: str):
        self.token = token
        self.peer = peer
        self.need = SERVER_HELLO
        self.greeted = False      # the server's greeting arrived
        self.done = False
        self._snonce = b""
        self._cnonce = b""

    def receive(self, data: bytes) -> bytes:
        if not self.greeted:
            try:
                self._snonce = parse_server_hello(data)
            except ValueError as e:
                raise AuthenticationError(f"{self.peer}: {e}") from None
            proof, self._cnonce = client_proof(self.token, self._snonce)
            self.greeted = True
            self.need = SERVER_PROOF
            return proof
        if data[:1] == b"\x00":
            raise AuthenticationError(
                f"{self.peer} refused the token: pass the cluster's token with "
                f"init(token=...) / --token / FLOWCORE_TOKEN")
        if not check_server_proof(self.token, self._cnonce, self._snonce, data):
            raise AuthenticationError(
                f"{self.peer} failed to prove it knows the token: it is not the flowcore "
                f"process you meant to reach")
        self.done = True
        self.need = 0
        return b""

    def hung_up(self, tls: bool = False) -> AuthenticationError:
        """The error for a server that closed the connection before the
        challenge was through (``tls``: the link runs inside TLS)."""
        if self.greeted:
            return AuthenticationError(
                f"{self.peer} closed the connection during authentication (wrong token, or "
                f"not a flowcore process)")
        if tls:  # how a TLS 1.3 server refuses a client certificate
            return AuthenticationError(
                f"{self.peer} closed the TLS connection before greeting: it refused this "
                f"process's certificate, which must be signed by the CA the cluster uses "
                f"(--tls-ca / FLOWCORE_TLS_CA)")
        return AuthenticationError(
            f"{self.peer} closed the connection before greeting (it died, or it is not a "
            f"flowcore process)")
