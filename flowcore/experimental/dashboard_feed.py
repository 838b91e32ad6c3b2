"""JSON views that libraries publish for the dashboard, through
``internal_kv`` (namespace ``dashboard``), so the dashboard (inside the
head) shows serve, tune and data without calling their actors.

Keys: ``serve`` (the serve controller's applications), ``tune/{id}`` (one per
experiment), ``data/{id}`` (one per dataset execution).  A ``Feed`` puts a
view at most once per ``interval`` seconds and only when it changed; a
publish that fails (no cluster, the head restarting) is dropped: the next
one carries the newest view.
"""
from __future__ import annotations

import collections
import json
import logging
import time
from typing import Callable
from ..context import current_client

logger = logging.getLogger("flowcore.dashboard_feed")

NAMESPACE = "dashboard"
SERVE_KEY = "serve"
TUNE_PREFIX = "tune/"
DATA_PREFIX = "data/"
#: finished experiments / dataset executions kept per prefix (oldest deleted first)
KEEP_FINISHED = 20


def encode(view: dict) -> bytes:
    return json.dumps(view, default=str, separators=(",", ":")).encode()


class Feed:
    """Publishes one key's view, rate-limited."""

    def __init__(self, key: str, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.interval = interval
        self.clock = clock
        self.last = -1e18
        self.last_bytes: bytes | None = None

    def due(self) -> bool:
        return self.clock() - self.last >= self.interval

    def seconds_to_next(self) -> float:
        return max(0.0, self.last + self.interval - self.clock())

    def publish(self, view: dict | Callable[[], dict], force: bool = False) -> bool:
        """Put the view if ``interval`` passed (or ``force``) and it changed;
        True if it was put.  ``view`` may be a function, called only then."""
        if not force and not self.due():
            return False
        self.last = self.clock()
        try:
            data = encode(view() if callable(view) else view)
            if data == self.last_bytes:
                return False
            if len(data) > (1 << 20):
                logger.debug("dashboard view %s is %d bytes: not published", self.key,
                             len(data))
                return False
            if not put_nowait(self.key, data):
                return False
            self.last_bytes = data
            return True
        except Exception as e:  # noqa: BLE001 - a view never breaks the library
            logger.debug("publishing dashboard view %s failed: %s", self.key, e)
            return False


def put_nowait(key: str, data: bytes) -> bool:
    """Queue a put of a view to the head without waiting for its answer (a
    view must not slow the library down); False without a cluster."""
    client = current_client()
    if client is None:
        return False
    client.send("head", {"op": "kv_put", "key": key.encode(), "value": data,
                         "ns": NAMESPACE.encode(), "overwrite": True})
    return True


_finished: dict[str, collections.deque] = {}


def retire(key: str, prefix: str, keep: int = KEEP_FINISHED) -> None:
    """``key`` (under ``prefix``) finished: keep the newest ``keep`` finished
    views this process published and delete older ones."""
    done = _finished.setdefault(prefix, collections.deque())
    done.append(key)
    while len(done) > keep:
        old = done.popleft()
        try:
            client = current_client()
            if client is not None:  # without waiting, as puts
                client.send("head", {"op": "kv_del", "key": old.encode(),
                                     "ns": NAMESPACE.encode()})
        except Exception as e:  # noqa: BLE001
            logger.debug("deleting dashboard view %s failed: %s", old, e)
