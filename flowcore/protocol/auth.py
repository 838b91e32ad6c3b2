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


def parse_server_hello(data: bytes) -> bytes:
    """Returns the server nonce, or raises ValueError on a peer that is not flowcore."""
    if len(data) != SERVER_HELLO or data[:len(MAGIC)] != MAGIC:
        raise ValueError("peer is not a flowcore server (bad greeting)")
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


def token_bytes(token: str | bytes) -> bytes:
    if isinstance(token, bytes):
        return token
    if not isinstance(token, str) or not token:
        raise ValueError("a flowcore token must be a non-empty string")
    return token.encode()
