"""``LocalCluster``: a head and nodes as real processes on 127.0.0.1.

This is what ``flowcore.init()`` with no address starts, and what tests use
for multi-node runs.  It launches the same ``flowcore-scheduler`` and
``flowcore-worker`` entry points as a real cluster, on free ports, with a
fresh token and a private session directory.  Every child holds the read end
of a lifeline pipe: when this process dies, however it dies, the pipe closes
and the children stop themselves.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from . import daemon
from .exceptions import FlowcoreError
from .private_files import make_private_dir
from .protocol.tls import resolve as resolve_tls
from .protocol.tls import strip_env


class ClusterStartError(FlowcoreError, RuntimeError):
    """A head or node process of a local cluster failed to start; the
    message carries the end of its log."""


class NodeProcess:
    """A node process of a ``LocalCluster``: its ``Popen``, address, id, log
    file and the resource arguments it was started with.  (A plain class: a
    dataclass would make ``init()`` import ``inspect`` and ``ast`` before it
    launches the head and node.)"""

    def __init__(self, proc: subprocess.Popen, address: str, node_id: str, log_file: str,
                 args: dict | None = None):
        self.proc = proc
        self.address = address
        self.node_id = node_id
        self.log_file = log_file
        self.args = args if args is not None else {}

    def __repr__(self) -> str:
        return (f"NodeProcess(pid={self.proc.pid}, address={self.address!r}, "
                f"node_id={self.node_id!r}, log_file={self.log_file!r})")


SESSION_PREFIX = "flowcore-session-"
#: embedded session directories (logs) of programs that ended are kept this
#: long (seconds; env FLOWCORE_SESSION_MAX_AGE) ...
MAX_SESSION_AGE = 86400.0
#: ... and at most this many of them (env FLOWCORE_SESSION_KEEP)
KEEP_SESSIONS = 100


def session_retention() -> tuple[float, int]:
    """(max age in seconds, count) kept of ended embedded sessions, from
    ``FLOWCORE_SESSION_MAX_AGE`` and ``FLOWCORE_SESSION_KEEP``."""
    import math
    age, keep = MAX_SESSION_AGE, KEEP_SESSIONS
    raw = os.environ.get("FLOWCORE_SESSION_MAX_AGE")
    if raw:
        try:
            age = float(raw)
        except ValueError:
            age = -1.0
        if not math.isfinite(age) or age < 0:
            raise ValueError(f"FLOWCORE_SESSION_MAX_AGE={raw!r}: expected seconds >= 0 "
                             f"(86400 = a day)")
    raw = os.environ.get("FLOWCORE_SESSION_KEEP")
    if raw:
        try:
            keep = int(raw)
        except ValueError:
            keep = -1
        if keep < 0:
            raise ValueError(f"FLOWCORE_SESSION_KEEP={raw!r}: expected a count >= 0")
    return age, keep


def describe_retention() -> str:
    """How long ended embedded sessions are kept, for the start message."""
    age, keep = session_retention()
    if age % 86400 == 0 and age:
        span = f"{age / 86400:g} day" + ("s" if age != 86400 else "")
    elif age % 3600 == 0 and age:
        span = f"{age / 3600:g} h"
    else:
        span = f"{age:g} s"
    return (f"kept {span} after the program ends (the newest {keep} at most; "
            f"FLOWCORE_SESSION_MAX_AGE / FLOWCORE_SESSION_KEEP)")


def prune_old_sessions(keep: int | None = None, max_age: float | None = None) -> None:
    """Remove this user's embedded session directories in the temp dir that
    are older than ``max_age`` seconds or beyond the newest ``keep`` (by
    default :func:`session_retention`), never one whose driver still runs."""
    if keep is None or max_age is None:
        age, count = session_retention()
        keep = count if keep is None else keep
        max_age = age if max_age is None else max_age
    base = tempfile.gettempdir()
    try:
        paths = [os.path.join(base, e) for e in os.listdir(base) if e.startswith(SESSION_PREFIX)]
        entries = [(os.path.getmtime(e), e) for e in paths
                   if os.path.isdir(e) and os.stat(e).st_uid == os.getuid()]
    except OSError:
        return
    entries.sort(reverse=True)
    now = time.time()
    for i, (mtime, old) in enumerate(entries):
        if (i < keep and now - mtime <= max_age) or _session_in_use(old):
            continue
        import shutil
        shutil.rmtree(old, ignore_errors=True)


def _session_in_use(path: str) -> bool:
    """A session whose driver (pid recorded at start) is still running."""
    try:
        with open(os.path.join(path, "driver.pid")) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _python() -> str:
    return sys.executable


class LocalCluster:
    """A head and ``nodes`` nodes as real processes on 127.0.0.1.

    ``LocalCluster(nodes=3, cpus_per_node=1)`` starts them at once; connect a
    driver with ``flowcore.init(address=cluster.address, token=cluster.token)``.
    ``add_node()`` joins one more and returns its node id, ``kill_node(id)``
    SIGKILLs a node and its workers, ``kill_head()`` and ``restart_head()``
    SIGKILL the head and start it again at the same port with the same state
    directory, ``shutdown()`` stops everything.

    ``tls={"cert": ..., "key": ..., "ca": ...}`` runs every link under mutual
    TLS (the head and every node present that certificate); connect with
    ``flowcore.init(address=..., token=..., tls=cluster.tls)``.  ``tls=None``
    takes the settings from ``FLOWCORE_TLS_*`` if set, ``tls=False`` never
    uses TLS.
    """

    def __init__(self, nodes: int = 0, cpus_per_node: float | None = None, *,
                 session_dir: str | None = None, token: str | None = None,
                 start_timeout: float = 60.0, tls: Any = None, **node_options: Any):
        self.tls = resolve_tls(tls, "LocalCluster(tls=...)")
        self.own_session_dir = session_dir is None
        # old embedded sessions are pruned once the head is launched (while it boots)
        self._prune_pending = self.own_session_dir
        self.session_dir = make_private_dir(session_dir or tempfile.mkdtemp(prefix=SESSION_PREFIX))
        make_private_dir(os.path.join(self.session_dir, "logs"))
        self.token = token or daemon.new_token()
        self.token_file = os.path.join(self.session_dir, "token")
        daemon.write_private(os.path.join(self.session_dir, "driver.pid"), str(os.getpid()))
        daemon.write_private(self.token_file, self.token)
        self.start_timeout = start_timeout
        self._life_r, self._life_w = os.pipe()
        self.head: subprocess.Popen | None = None
        self.head_address = ""
        self.dashboard_url: str | None = None  # the head's dashboard (without the token)
        self.nodes: list[NodeProcess] = []
        self.closed = False
        if not isinstance(nodes, int) or nodes < 0:
            raise ValueError(f"LocalCluster(nodes={nodes!r}): expected an int >= 0")
        if nodes:
            if cpus_per_node is not None:
                node_options["num_cpus"] = cpus_per_node
            try:
                self.start(**node_options)
                for _ in range(nodes - 1):
                    self._add_node(**node_options)
            except BaseException:
                self.close()
                raise

    @property
    def address(self) -> str:
        return self.head_address

    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes if n.proc.poll() is None]

    def shutdown(self) -> None:
        """Stop every node and the head (same as ``close``)."""
        self.close()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ launching
    def _launch(self, module: str, args: list[str], log_file: str, env: dict | None = None,
                stdin: int = subprocess.DEVNULL) -> tuple[subprocess.Popen, int]:
        """Start ``python -m module``; returns the process and the read end of
        its ready pipe (the child writes one line there once it serves)."""
        ready_r, ready_w = os.pipe()
        cmd = [_python(), "-m", module, *args, "--ready-fd", str(ready_w),
               "--lifeline-fd", str(self._life_r), "--log-file", log_file]
        full_env = strip_env(dict(os.environ))  # TLS comes as flags, exactly as chosen
        full_env.update(env or {})
        try:
            proc = subprocess.Popen(cmd, pass_fds=(ready_w, self._life_r), env=full_env,
                                    stdin=stdin, start_new_session=True)
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        return proc, ready_r

    def _await_ready(self, proc: subprocess.Popen, ready_r: int, log_file: str) -> str:
        try:
            return self._read_ready(ready_r, proc, log_file)
        finally:
            os.close(ready_r)

    def _read_ready(self, fd: int, proc: subprocess.Popen, log_file: str) -> str:
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise ClusterStartError(f"process did not start within {self.start_timeout}s; "
                                        f"see {log_file}")
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                code = proc.wait(5)
                args = proc.args if isinstance(proc.args, (list, tuple)) else [proc.args]
                raise ClusterStartError(
                    f"{' '.join(map(str, args[1:4]))} exited with code {code} during start.\n"
                    f"Log ({log_file}):\n{_tail(log_file)}")
            buf += chunk
        return buf.decode().strip()

    def _head_args(self, port: int = 0) -> tuple[str, list[str], str]:
        log = os.path.join(self.session_dir, "logs", "head.log")
        return ("flowcore.scheduler.cli",
                ["--host", "127.0.0.1", "--port", str(port), "--token-file", self.token_file,
                 "--state-dir", self.session_dir, "--dashboard-port", "0",
                 *(self.tls.cli_args() if self.tls is not None else [])], log)

    def kill_head(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) to the head and wait for it to
        exit.  Nodes and drivers keep trying to reconnect for
        ``FLOWCORE_HEAD_GRACE`` seconds; see ``restart_head``."""
        if self.head is None:
            raise ValueError("this cluster has no head to kill")
        try:
            os.kill(self.head.pid, sig)
        except ProcessLookupError:
            pass
        self.head.wait(10)

    def restart_head(self) -> str:
        """Start the head again at the same address with the same token and
        state directory (after ``kill_head``): it loads its persisted tables
        and takes back the nodes and drivers that reconnect."""
        if self.head is not None and self.head.poll() is None:
            raise ValueError("the head is still running: kill_head() first")
        if not self.head_address:
            raise ValueError("this cluster's head never started: use start() instead")
        from .protocol.comm import parse_address
        port = parse_address(self.head_address)[1]
        module, args, log = self._head_args(port)
        proc, ready = self._launch(module, args, log)
        self.head = proc
        self._head_ready(self._await_ready(proc, ready, log))
        return self.head_address

    def _prune_once(self) -> None:
        if self._prune_pending:
            self._prune_pending = False
            prune_old_sessions()

    def start_head(self) -> str:
        module, args, log = self._head_args()
        proc, ready = self._launch(module, args, log)
        self.head = proc
        self._prune_once()
        self._head_ready(self._await_ready(proc, ready, log))
        return self.head_address

    def _head_ready(self, line: str) -> None:
        """The head's ready line: its address, then its dashboard's URL if any."""
        parts = line.split()
        self.head_address = parts[0]
        self.dashboard_url = parts[1] if len(parts) > 1 else None

    @property
    def dashboard_login_url(self) -> str | None:
        """The dashboard's URL with the token: opening it logs a browser in."""
        if not self.dashboard_url:
            return None
        from urllib.parse import quote
        return f"{self.dashboard_url}/?token={quote(self.token, safe='')}"

    def start(self, while_starting: Callable[[], None] | None = None,
              **node_options: Any) -> NodeProcess:
        """Start the head and a first node at the same time (the node learns
        the head's address on its stdin once the head serves).
        ``while_starting`` runs in this process while they boot."""
        module, args, log = self._head_args()
        head, head_ready = self._launch(module, args, log)
        self.head = head
        try:
            node_launch = self._launch_node("-", stdin=subprocess.PIPE, **node_options)
        except BaseException:
            os.close(head_ready)
            raise
        proc, node_ready, node_log, meta = node_launch
        try:
            self._prune_once()
            if while_starting is not None:
                while_starting()
            self._head_ready(self._await_ready(head, head_ready, log))
            assert proc.stdin is not None
            try:
                proc.stdin.write((self.head_address + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the node already exited: its ready pipe says how, below
        except BaseException:
            os.close(node_ready)
            proc.kill()
            raise
        return self._finish_node(proc, node_ready, node_log, meta)

    def add_node(self, **node_options: Any) -> str:
        """Start one more node (``num_cpus=``, ``num_gpus=``, ``resources=``,
        ``object_store_memory=``, ``name=``), wait until it has joined, and
        return its node id."""
        return self._add_node(**node_options).node_id

    def _add_node(self, **node_options: Any) -> NodeProcess:
        proc, ready, log, meta = self._launch_node(self.head_address, **node_options)
        return self._finish_node(proc, ready, log, meta)

    def _launch_node(self, head_address: str, *, num_cpus: float | None = None,
                     num_gpus: int | None = None, resources: dict | None = None,
                     object_store_memory: int | None = None, name: str | None = None,
                     max_workers: int | None = None, worker_sys_path: list[str] | None = None,
                     worker_memory_limit: int | None = None, memory: int | None = None,
                     stdin: int = subprocess.DEVNULL) -> tuple:
        n = len(self.nodes)
        log = os.path.join(self.session_dir, "logs", f"node-{n}.log")
        args = [head_address, "--token-file", self.token_file,
                "--state-dir", self.session_dir, "--name", name or f"node-{n}"]
        if self.tls is not None:
            args += self.tls.cli_args()
        if num_cpus is not None:
            args += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:  # None: the node detects its GPUs (nvidia-smi)
            args += ["--num-gpus", str(int(num_gpus))]
        if resources:
            import json
            args += ["--resources", json.dumps(resources)]
        if object_store_memory:
            args += ["--object-store-memory", str(int(object_store_memory))]
        if max_workers:
            args += ["--max-workers", str(max_workers)]
        if memory is not None:
            args += ["--memory", str(int(memory))]
        if worker_memory_limit:
            args += ["--worker-memory-limit", str(int(worker_memory_limit))]
        paths = worker_sys_path if worker_sys_path is not None else sys.path
        env = {"FLOWCORE_WORKER_SYS_PATH": os.pathsep.join(p or os.getcwd() for p in paths)}
        proc, ready = self._launch("flowcore.node.cli", args, log, env, stdin=stdin)
        return proc, ready, log, dict(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources)

    def _finish_node(self, proc: subprocess.Popen, ready: int, log: str, meta: dict
                     ) -> NodeProcess:
        try:
            line = self._await_ready(proc, ready, log)
        except BaseException:
            proc.kill()
            raise
        address, node_id = line.split()
        node = NodeProcess(proc, address, node_id, log, meta)
        self.nodes.append(node)
        return node

    def kill_node(self, node: "NodeProcess | str", sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default) to a node, given by id, and to every
        worker process it started."""
        import psutil
        if isinstance(node, str):
            found = [n for n in self.nodes if n.node_id == node]
            if not found:
                raise ValueError(f"no node {node!r} in this cluster; its nodes are "
                                 f"{[n.node_id for n in self.nodes]}")
            node = found[0]
        try:
            victims = psutil.Process(node.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            victims = []
        for p in [node.proc, *victims]:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
        node.proc.wait(10)
        psutil.wait_procs(victims, timeout=10)
        _sweep()  # a killed node cannot remove its own shared memory

    # ------------------------------------------------------------ stopping
    def close(self, timeout: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
        self._prune_once()
        for node in self.nodes:
            _terminate(node.proc)
        for node in self.nodes:
            _wait_or_kill(node.proc, timeout)
        if self.head is not None:
            _terminate(self.head)
            _wait_or_kill(self.head, timeout)
        for fd in (self._life_w, self._life_r):
            try:
                os.close(fd)
            except OSError:
                pass
        _sweep()
        for entry in os.listdir(self.session_dir):
            if entry.startswith("spill-"):
                import shutil
                shutil.rmtree(os.path.join(self.session_dir, entry), ignore_errors=True)

    def remove_session_dir(self) -> None:
        import shutil
        shutil.rmtree(self.session_dir, ignore_errors=True)


def _sweep() -> None:
    """Remove shared-memory arenas whose node process is gone."""
    try:
        from .objects.store import sweep_stale_segments
        sweep_stale_segments()
    except OSError:
        pass


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"
