"""Plumbing shared by the long-running processes (head, node, worker):
logging to the session directory, the lifeline pipe that ends a child when
its parent dies, the ready pipe that reports a bound address, signals."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from .private_files import make_private_dir, open_private
from .private_files import write_private as write

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def setup_logging(log_file: str | None, level: str = "INFO") -> None:
    import logging  # not at the top: init() imports this module before it launches
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if log_file:
        make_private_dir(os.path.dirname(os.path.abspath(log_file)))
        os.close(open_private(log_file, os.O_WRONLY | os.O_APPEND))  # 0600 before logging opens it
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def watch_lifeline(fd: int | None, on_death: Callable[[], None]) -> None:
    """When the read end ``fd`` reaches EOF (the parent holding the write end
    died or closed it), call ``on_death`` on the running loop.  No polling:
    the event loop wakes on the pipe."""
    if fd is None or fd < 0:
        return
    import asyncio
    loop = asyncio.get_event_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 1)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            on_death()

    loop.add_reader(fd, readable)


def report_ready(fd: int | None, line: str) -> None:
    if fd is None or fd < 0:
        return
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def install_stop_signals(stop: Callable[[], None]) -> None:
    import asyncio
    loop = asyncio.get_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop)
        except (ValueError, RuntimeError):
            pass


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    if token:
        return token
    if token_file:
        with open(token_file) as f:
            t = f.read().strip()
        if not t:
            raise SystemExit(f"token file {token_file} is empty")
        return t
    return os.environ.get("FLOWCORE_TOKEN") or None


def new_token() -> str:
    """32 random bytes from the OS, as hex (what ``secrets.token_hex(32)``
    returns, without importing ``secrets``, whose ``hmac`` loads OpenSSL
    before ``init()`` can launch the head and node)."""
    return os.urandom(32).hex()


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600)."""
    write(path, text)
