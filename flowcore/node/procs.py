"""Starting and reaping worker processes.

Workers are forked from the node by default: the node has already imported
everything a worker needs, so a fork is ready in milliseconds instead of the
few hundred it takes a fresh interpreter to import Tornado, msgpack and
cloudpickle, and its pages are shared with the node until written.  The
child detaches at once (new session, its own log file, every inherited
descriptor closed) and runs the worker's ``main``.  ``spawn`` starts a fresh
interpreter instead (``FLOWCORE_WORKER_START=spawn``).

Exits are noticed through a pidfd registered with the event loop: no
polling, no SIGCHLD handler.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import traceback
from typing import Callable


def describe_exit(status: int) -> str:
    """Plain words for a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


class WorkerProcess:
    def __init__(self, pid: int, on_exit: Callable[[str], None]):
        self.pid = pid
        self.on_exit = on_exit
        self.exited = False
        self._pidfd = os.pidfd_open(pid)
        asyncio.get_event_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        loop = asyncio.get_event_loop()
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.exited = True
        self.on_exit(describe_exit(status))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if not self.exited:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def start_worker(argv: list[str], env: dict[str, str], log_file: str, cwd: str | None,
                 on_exit: Callable[[str], None], method: str = "fork") -> WorkerProcess:
    if method == "spawn":
        from ..private_files import open_private
        with os.fdopen(open_private(log_file, os.O_WRONLY | os.O_APPEND), "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "flowcore.node.worker", *argv],
                                    env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, start_new_session=True)
        # reaped through the pidfd; Popen never waits for it
        proc.returncode = 0
        return WorkerProcess(proc.pid, on_exit)
    from ..private_files import open_private
    log_fd = open_private(log_file, os.O_WRONLY | os.O_APPEND)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            # the node's event loop registered a signal wake-up descriptor; in
            # the child that descriptor number gets reused (by the node socket,
            # say), and every signal would write a byte into it
            signal.set_wakeup_fd(-1)
            os.setsid()
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.closerange(3, _max_fd())
            for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.environ.clear()
            os.environ.update(env)
            if cwd:
                os.chdir(cwd)
            from . import worker
            code = worker.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(log_fd)
    return WorkerProcess(pid, on_exit)


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 4096
