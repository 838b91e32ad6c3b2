"""Who may see the dashboard: holders of the cluster token.

A browser proves it once (the login form, or the tokenised URL printed at
start) and then carries a cookie signed with a secret derived from the token;
scripts send ``Authorization: Bearer TOKEN``.  Changing the token invalidates
every cookie.
"""
from __future__ import annotations

import hashlib
import hmac

COOKIE = "flowcore_dashboard"
#: what the signed cookie holds (the signature is the credential)
COOKIE_VALUE = "token-ok"
COOKIE_DAYS = 7


def cookie_secret(token: bytes) -> str:
    """The cookie-signing secret: a one-way function of the token, so the
    cookie never carries (or reveals) the token itself."""
    return hmac.new(token, b"flowcore dashboard cookie v1", hashlib.sha256).hexdigest()


def token_matches(given: str | bytes | None, token: bytes) -> bool:
    """Constant-time comparison of a presented token with the cluster token."""
    if not given:
        return False
    if isinstance(given, str):
        try:
            given = given.strip().encode("utf-8")
        except UnicodeEncodeError:
            return False
    return hmac.compare_digest(given, token)


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def safe_next(target: str | None) -> str:
    """A post-login redirect target, only ever a path on this server."""
    if not target or not target.startswith("/") or target.startswith("//") \
            or "\\" in target or any(ord(ch) < 32 for ch in target):
        return "/"
    return target
