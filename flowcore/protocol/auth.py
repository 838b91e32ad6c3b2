"""Mutual token authentication by HMAC challenge-response.

Both sides prove they know the token before a single message is decoded:

1. server -> client: ``MAGIC`` (8 bytes) + version (1) + server nonce (32)
2. client -> server: client nonce (32) + HMAC(token, "c" + snonce + cnonce)
3. server -> client: status byte (1 ok / 0 refused) + HMAC(token, "s" + cnonce + snonce)
   (on refusal, 32 zero bytes follow and the server closes)
4. the client checks the server's proof, so a process squatting on a port
   cannot feed messages to clients either.

Everything is fixed-size raw bytes; comparisons are constant-time.
"""
from __future__ import annotations

import hashlib
import hmac
import os

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
