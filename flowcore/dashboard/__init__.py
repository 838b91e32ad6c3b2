"""The head's web dashboard and Prometheus ``/metrics`` (Tornado, on the
head's event loop; token-protected).  See docs/observability.md.

``listen`` binds the port and names the URL cheaply, so the head can report
it before the heavier web stack (``Dashboard``, imported lazily) loads;
``OnFirstConnection`` loads that stack only when the first browser or
scraper connects, so a head nobody looks at never pays for it (not at start,
where it would compete with the node for the CPU, and not in memory).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Callable

__all__ = ["Dashboard", "OnFirstConnection", "listen"]

logger = logging.getLogger("flowcore.dashboard")


def listen(host: str, port: int) -> tuple[list[socket.socket], str]:
    """Bind the dashboard's sockets (``port`` 0: a free port); returns them and
    the dashboard's URL (without the token).  Raises ``OSError``."""
    from tornado.netutil import bind_sockets
    sockets = bind_sockets(port, host)
    port = sockets[0].getsockname()[1]
    name = host
    if host in ("0.0.0.0", "", "::"):  # every interface: name one others can use
        name = socket.gethostname()
    elif ":" in host:
        name = f"[{host}]"
    return sockets, f"http://{name}:{port}"


class OnFirstConnection:
    """Bound dashboard ``sockets`` whose server is made by ``make()`` (a
    ``Dashboard``) when the first connection arrives: the event loop watches
    the listening sockets (no polling); the waiting connection stays in the
    kernel's backlog until the server takes over the sockets and accepts it.
    Call on the running loop."""

    def __init__(self, sockets: list[socket.socket], url: str, make: Callable[[], Any]):
        self.sockets = sockets
        self.url = url
        self._make = make
        self.dashboard: Any = None
        self._watching = True
        loop = asyncio.get_event_loop()
        for s in sockets:
            loop.add_reader(s.fileno(), self._first_connection)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            loop = asyncio.get_event_loop()
            for s in self.sockets:
                loop.remove_reader(s.fileno())

    def _first_connection(self) -> None:
        self._unwatch()
        try:
            self.dashboard = self._make()
            started = asyncio.ensure_future(self.dashboard.start(self.sockets, self.url))
        except Exception:  # noqa: BLE001 - the head keeps running without its dashboard
            logger.exception("the dashboard at %s could not start; it is closed", self.url)
            self.dashboard = None
            self._close_sockets()
            return
        started.add_done_callback(self._started)

    def _started(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is None:
            return
        logger.error("the dashboard at %s could not start; it is closed", self.url,
                     exc_info=fut.exception())
        self.dashboard = None
        self._close_sockets()

    def _close_sockets(self) -> None:
        for s in self.sockets:
            s.close()

    async def stop(self) -> None:
        """Stop the dashboard, or close its sockets if it never started."""
        self._unwatch()
        if self.dashboard is not None:
            await self.dashboard.stop()
        else:
            self._close_sockets()


def __getattr__(name: str) -> Any:
    if name == "Dashboard":
        from .app import Dashboard
        return Dashboard
    raise AttributeError(name)
