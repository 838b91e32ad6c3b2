"""Admitting peers on a raw-socket port: the token challenge (TLS first when
the cluster uses it) for every waiting peer on one thread.

The bulk-transfer port of a node and the direct-call port of an actor hand
authenticated connections to blocking code (a thread per transfer, a caller
pump).  Before authentication, a peer costs no thread: one ``Admission``
thread per port multiplexes all of them with ``selectors``, each bounded by
an overall deadline (``FLOWCORE_AUTH_TIMEOUT``, 10 s, from accept to the
last byte of the challenge, however slowly the peer trickles), and at most
``limit`` peers wait at once: more are closed at accept.  Nothing a peer
sends is interpreted beyond the fixed-size challenge until it passes.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import threading
import time
from typing import Callable

from . import auth

logger = logging.getLogger("flowcore.admission")

#: peers that may be mid-challenge on one port at once
MAX_PENDING = 32


def auth_timeout() -> float:
    """Seconds a peer has to complete the challenge (``FLOWCORE_AUTH_TIMEOUT``)."""
    raw = os.environ.get("FLOWCORE_AUTH_TIMEOUT")
    try:
        value = float(raw) if raw else 10.0
    except ValueError:
        value = 10.0
    return value if value > 0 else 10.0


class _Peer:
    __slots__ = ("sock", "raw", "name", "deadline", "stage", "out", "got", "challenge")

    def __init__(self, sock: socket.socket, name: str, deadline: float):
        self.sock = sock          # the socket spoken on (an SSLSocket under TLS)
        self.raw = sock
        self.name = name
        self.deadline = deadline
        self.stage = "tls"        # tls -> hello -> proof -> answer
        self.out = b""
        self.got = bytearray()
        self.challenge: auth.ServerChallenge | None = None


class Admission:
    """Accept on the listening ``sock`` and admit peers that pass the
    challenge: ``on_admit(conn, peer)`` gets each as a blocking socket (on
    this class's thread: hand it on quickly).  ``on_refused(peer, why)`` is
    told of each peer that failed."""

    def __init__(self, sock: socket.socket, token: bytes,
                 on_admit: Callable[[socket.socket, str], None], name: str,
                 tls_context: ssl.SSLContext | None = None, limit: int = MAX_PENDING,
                 on_refused: Callable[[str, str], None] | None = None):
        self.token = token
        self.name = name
        self.limit = limit
        self.timeout = auth_timeout()
        self._listen = sock
        sock.setblocking(False)
        self._ctx = tls_context
        self._on_admit = on_admit
        self._on_refused = on_refused
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._peers: dict[socket.socket, _Peer] = {}
        self._closed = False
        self.turned_away = 0      # closed at accept: too many waiting
        self.refused = 0          # failed the challenge or its deadline
        self._last_full_log = 0.0
        self._thread = threading.Thread(target=self._run, name=f"flowcore-{name}-admission",
                                        daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._peers)

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while not self._closed:
                now = time.monotonic()
                wait = min((p.deadline for p in self._peers.values()), default=now + 3600) - now
                for key, events in self._sel.select(max(0.0, wait)):
                    if key.data == "wake":
                        return
                    if key.data is None:
                        self._accept()
                    else:
                        self._step(key.data, events)
                now = time.monotonic()
                for p in [p for p in self._peers.values() if p.deadline <= now]:
                    self._drop(p, f"no complete authentication within {self.timeout:g} s")
        except Exception:  # noqa: BLE001 - keep a record; the port stops admitting
            if not self._closed:
                logger.exception("%s: admission stopped", self.name)
        finally:
            for p in list(self._peers.values()):
                self._forget(p)
                _close(p.sock)
            self._sel.close()
            _close(self._wake_r)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, addr = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if not self._closed:
                    logger.warning("%s: accept failed: %s", self.name, e)
                return
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if len(self._peers) >= self.limit:
                self.turned_away += 1
                now = time.monotonic()
                if now - self._last_full_log > 10.0:
                    self._last_full_log = now
                    logger.warning("%s: %d peers are already authenticating; closed the "
                                   "connection from %s (and any more in the next 10 s)",
                                   self.name, self.limit, peer)
                _close(conn)
                continue
            conn.setblocking(False)
            p = _Peer(conn, peer, time.monotonic() + self.timeout)
            if self._ctx is not None:
                p.sock = p.raw = self._ctx.wrap_socket(conn, server_side=True,
                                                       do_handshake_on_connect=False)
            else:
                self._start_challenge(p)
            self._peers[p.raw] = p
            self._sel.register(p.raw, self._events(p), p)
            self._step(p, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _start_challenge(self, p: _Peer) -> None:
        p.challenge = auth.ServerChallenge(self.token)
        p.out = p.challenge.hello
        p.stage = "proof"

    @staticmethod
    def _events(p: _Peer) -> int:
        return selectors.EVENT_WRITE if p.out else selectors.EVENT_READ

    def _step(self, p: _Peer, events: int) -> None:
        try:
            if p.stage == "tls":
                try:
                    p.sock.do_handshake()  # type: ignore[attr-defined]
                except ssl.SSLWantReadError:
                    self._sel.modify(p.raw, selectors.EVENT_READ, p)
                    return
                except ssl.SSLWantWriteError:
                    self._sel.modify(p.raw, selectors.EVENT_WRITE, p)
                    return
                self._start_challenge(p)
            while p.out:
                try:
                    n = p.sock.send(p.out)
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    self._sel.modify(p.raw, selectors.EVENT_WRITE, p)
                    return
                p.out = p.out[n:]
            challenge = p.challenge
            assert challenge is not None
            if p.stage == "answer":
                if challenge.accepted:
                    self._admit(p)
                else:
                    self._drop(p, "wrong or missing token")
                return
            need = challenge.need - len(p.got)
            try:
                data = p.sock.recv(need)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                self._sel.modify(p.raw, selectors.EVENT_READ, p)
                return
            if not data:
                self._drop(p, "it hung up during authentication", quiet=True)
                return
            p.got += data
            if len(p.got) < challenge.need:
                self._sel.modify(p.raw, selectors.EVENT_READ, p)
                return
            p.out = challenge.answer(bytes(p.got))
            p.stage = "answer"
            self._step(p, selectors.EVENT_WRITE)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._drop(p, f"{type(e).__name__}: {e}")

    def _forget(self, p: _Peer) -> None:
        if self._peers.pop(p.raw, None) is not None:
            try:
                self._sel.unregister(p.raw)
            except (KeyError, ValueError):
                pass

    def _admit(self, p: _Peer) -> None:
        self._forget(p)
        try:
            p.sock.setblocking(True)
            self._on_admit(p.sock, p.name)
        except Exception:  # noqa: BLE001 - one peer never stops the port
            logger.exception("%s: handing over the connection from %s failed", self.name,
                             p.name)
            _close(p.sock)

    def _drop(self, p: _Peer, why: str, quiet: bool = False) -> None:
        self._forget(p)
        _close(p.sock)
        self.refused += 1
        if self._on_refused is not None:
            self._on_refused(p.name, why)
        elif not quiet:
            logger.warning("%s: refused connection from %s: %s", self.name, p.name, why)

    def close(self) -> None:
        """Stop accepting; peers still authenticating are closed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        _close(self._wake_w)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
