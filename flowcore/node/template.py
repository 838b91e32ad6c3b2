"""The worker template: a process forked from the node as soon as it starts,
which imports what workers run (the worker and client modules, NumPy) while
the node imports its server, maps its store and joins the head, and then
forks the node's workers on request.

Without it the node does both one after the other before its first worker
can start, and on a 2-core machine starting a cluster that is the longest
chain of work.  Workers forked from the template share its pages, as they
shared the node's before.

A worker is forked through a short-lived intermediate process that exits at
once, so the worker is re-parented to the node, which is a child subreaper
(``PR_SET_CHILD_SUBREAPER``): the node reaps its workers and reads their
exit status exactly as when it forked them itself.  The template answers
each request with the worker's pid only after the intermediate has exited.

The template ends when the node closes its end of the socket (or dies).  If
the template is gone, the node forks workers itself (``procs.start_worker``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
from typing import Any, Callable

from ..private_files import open_private
from .procs import become_worker

logger = logging.getLogger("flowcore.node")

_PR_SET_CHILD_SUBREAPER = 36
_LEN = struct.Struct("!I")


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux); False where
    that is not possible."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _send(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    """One message, or None at EOF."""
    head = _recv_exactly(sock, _LEN.size)
    if head is None:
        return None
    body = _recv_exactly(sock, _LEN.unpack(head)[0])
    return None if body is None else json.loads(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class WorkerTemplate:
    """The node's handle on its template process."""

    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.sock = sock
        self.alive = True

    @classmethod
    def start(cls, preload: Callable[[], None], close_fds: tuple[int | None, ...] = ()
              ) -> WorkerTemplate | None:
        """Fork the template (call before the node makes threads, its event
        loop, sockets or store); it runs ``preload`` and then serves.  The
        descriptors in ``close_fds`` (the node's ready pipe, say) are closed
        in the template.  None where workers cannot be forked this way."""
        if not become_subreaper():
            return None
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the template: never returns
            code = 1
            try:
                ours.close()
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # it ends with its node
                for fd in close_fds:
                    if fd is not None and fd >= 0:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)  # stdin may be the node's (the head's address)
                os.close(null)
                preload()
                code = _serve(theirs)
            except BaseException:  # noqa: BLE001 - reported in the node's log
                logger.exception("the worker template failed")
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, ours)

    def spawn(self, argv: list[str], env: dict[str, str], log_file: str,
              cwd: str | None) -> int:
        """Fork a worker; returns its pid (a child of this process by then).
        Raises ``OSError`` when the template is gone or failed."""
        if not self.alive:
            raise OSError("the worker template is gone")
        try:
            _send(self.sock, {"argv": argv, "env": env, "log": log_file, "cwd": cwd})
            reply = _recv(self.sock)
        except OSError:
            reply = None
        if reply is None:
            self.close()
            raise OSError("the worker template exited")
        if "error" in reply:
            raise OSError(reply["error"])
        return int(reply["pid"])

    def close(self) -> None:
        """End the template (it exits on EOF) and reap it."""
        if not self.alive:
            return
        self.alive = False
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _serve(sock: socket.socket) -> int:
    """The template's loop: one worker per request, until EOF."""
    while True:
        req = _recv(sock)
        if req is None:
            return 0
        try:
            log_fd = open_private(req["log"], os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            _send(sock, {"error": f"cannot open the worker's log {req['log']}: {e}"})
            continue
        r, w = os.pipe()
        middle = os.fork()
        if middle == 0:  # the intermediate: fork the worker, report it, exit
            try:
                os.close(r)
                sock.close()
                worker = os.fork()
                if worker == 0:
                    os.close(w)
                    become_worker(req["argv"], req["env"], log_fd, req["cwd"])
                os.write(w, _LEN.pack(worker))
            finally:
                os._exit(0)
        os.close(w)
        os.close(log_fd)
        data = b""
        while len(data) < _LEN.size:
            chunk = os.read(r, _LEN.size - len(data))
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(middle, 0)  # now the worker is the node's child
        if len(data) < _LEN.size:
            _send(sock, {"error": "the worker could not be forked"})
        else:
            _send(sock, {"pid": _LEN.unpack(data)[0]})
