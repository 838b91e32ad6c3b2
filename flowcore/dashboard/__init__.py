"""The head's web dashboard and Prometheus ``/metrics`` (Tornado, on the
head's event loop; token-protected).  See docs/observability.md.

``listen`` binds the port and names the URL cheaply, so the head can report
it before the heavier web stack (``Dashboard``, imported lazily) loads.
"""
from __future__ import annotations

import socket
from typing import Any

__all__ = ["Dashboard", "listen"]


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


def __getattr__(name: str) -> Any:
    if name == "Dashboard":
        from .app import Dashboard
        return Dashboard
    raise AttributeError(name)
