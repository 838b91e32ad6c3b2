"""The dashboard's request handler bases: ``Base`` (security headers, login
by cookie or bearer token, JSON answers) and ``Api`` (a JSON endpoint over
the head's snapshot).  The dashboard's pages and the Jobs API build on them.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from tornado.web import HTTPError, RequestHandler

from .auth import COOKIE, COOKIE_DAYS, COOKIE_VALUE, bearer, token_matches
from .snapshot import encode

if TYPE_CHECKING:
    from .app import Dashboard

logger = logging.getLogger("flowcore.dashboard")

#: the response header naming the head's address (see protocol.comm.connect)
HEAD_HEADER = "X-Flowcore-Head"

CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class Base(RequestHandler):
    """Security headers and the token check every handler shares."""

    #: API handlers answer 401; page handlers redirect to the login form
    api = False
    auth_required = True

    def initialize(self, dash: "Dashboard", **kw: Any) -> None:
        self.dash = dash
        self._head_header()

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("Cache-Control", "no-store")
        self._head_header()

    def _head_header(self) -> None:
        # so a flowcore client pointed at this HTTP port by mistake can name the head
        dash = getattr(self, "dash", None)  # set_default_headers runs before initialize
        if dash is not None and dash.head_info.get("address"):
            self.set_header(HEAD_HEADER, dash.head_info["address"])

    def get_current_user(self) -> str | None:
        given = bearer(self.request.headers.get("Authorization"))
        if given is not None:
            return "bearer" if token_matches(given, self.dash.token) else None
        cookie = self.get_signed_cookie(COOKIE, max_age_days=COOKIE_DAYS)
        if cookie is not None and cookie.decode() == COOKIE_VALUE:
            return "cookie"
        return None

    def log_in(self) -> None:
        self.set_signed_cookie(COOKIE, COOKIE_VALUE, expires_days=COOKIE_DAYS, httponly=True,
                               samesite="Lax", secure=self.request.protocol == "https")

    def prepare(self) -> None:
        token = self.get_query_argument("token", None)
        if token is not None:
            if token_matches(token, self.dash.token):
                self.log_in()
                self._current_user = "query"
                if not self.api and self.request.method in ("GET", "HEAD"):
                    # drop the token from the address bar (and from history)
                    rest = {k: v[-1].decode() for k, v in self.request.query_arguments.items()
                            if k != "token"}
                    self.redirect(self.request.path + ("?" + urlencode(rest) if rest else ""))
                    return
            else:
                logger.warning("dashboard: wrong token in a URL from %s", self.request.remote_ip)
                self._current_user = None
                if not self.api:
                    self.redirect("/login?" + urlencode({"next": self.request.path, "bad": "1"}))
                    return
        if self.auth_required and not self.current_user:
            if self.api:
                self.set_status(401)
                self.set_header("WWW-Authenticate", 'Bearer realm="flowcore"')
                self.set_header("Content-Type", "application/json")
                self.finish(encode({"error": "the cluster token is required: log in at /login "
                                             "or send 'Authorization: Bearer TOKEN'"}))
            else:
                target = self.request.path
                if self.request.query:
                    target += "?" + self.request.query
                self.redirect("/login?" + urlencode({"next": target}))

    def _request_summary(self) -> str:
        # used when tornado logs an error: the path only (a ?token= stays out of logs)
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    def write_json(self, data: bytes | Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(data if isinstance(data, bytes) else encode(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = self._reason
        if "exc_info" in kwargs and isinstance(kwargs["exc_info"][1], HTTPError):
            err = kwargs["exc_info"][1]
            if err.log_message:
                reason = err.log_message % err.args if err.args else err.log_message
                if status_code == 403 and " is not in root static directory" in reason:
                    reason = "that file is not in the static directory"
        if self.api:
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(encode({"error": reason}))
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"{status_code}: {reason}\n")


class Api(Base):
    api = True

    @property
    def snap(self) -> Any:
        return self.dash.cache.get()
