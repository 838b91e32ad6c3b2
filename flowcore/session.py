"""The session: ``init()`` starts or joins a cluster and makes this process's
client, ``shutdown()`` ends it, and ``client_or_init()`` starts the embedded
cluster the first time the API is used without ``init()``.

Every user-facing module reaches the client through here, the same way:
``require_client()`` (raises when not connected), ``client_or_init()``
(auto-init), ``current_client()`` (None when not connected).  The client
itself is held by ``flowcore.context``, below this module.
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from .context import current_client, new_job, require_client, set_client, set_worker_paths
from .exceptions import FlowcoreError

if TYPE_CHECKING:
    from .client.core import CoreClient
    from .cluster import LocalCluster

__all__ = ["init", "shutdown", "is_initialized", "session_info", "session_token",
           "client_or_init",
           "require_client", "current_client"]

# (the "flowcore" logger: ``logging`` loads after init() launched the cluster)

# What ``init`` started (the embedded cluster) and what it reports.
_state_lock = threading.RLock()
_cluster: LocalCluster | None = None
_info: dict[str, Any] = {}
_initialized = False  # init() made this process's client (a driver), not a worker's start


def client_or_init() -> CoreClient:
    """This process's client, starting the embedded cluster (``init()``) the
    first time the API is used without one."""
    c = current_client()
    if c is not None:
        return c
    with _state_lock:
        if current_client() is None:
            init()
        return require_client()


def is_initialized() -> bool:
    """True in a driver after init(), and inside tasks (which are always connected)."""
    return current_client() is not None


def _check_number(name: str, v: Any, *, integer: bool = False) -> None:
    if v is None:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v)
    if integer:
        ok = ok and float(v).is_integer()
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"init({name}={v!r}): expected {kind} >= 0")


def init(address: str | None = None, *, num_cpus: float | None = None,
         num_gpus: int | None = None, resources: dict[str, float] | None = None,
         object_store_memory: int | None = None, token: str | None = None,
         session_dir: str | None = None, max_workers: int | None = None,
         log_to_driver: bool = True, worker_memory_limit: int | None = None,
         ignore_reinit_error: bool = False, tls: Any = None,
         runtime_env: dict[str, Any] | None = None,
         namespace: str | None = None) -> dict[str, Any]:
    """Start a private local cluster (no ``address``) or connect to one.

    ``tls={"cert": ..., "key": ..., "ca": ...}`` (PEM paths) connects over
    mutual TLS; by default the settings come from ``FLOWCORE_TLS_CERT``,
    ``FLOWCORE_TLS_KEY`` and ``FLOWCORE_TLS_CA`` when they are set
    (``tls=False``: never).  Without an address, the local cluster started
    uses them too.

    ``runtime_env`` (keys ``working_dir``, ``py_modules``, ``env_vars``) is
    the environment every task and actor of this job runs with; see
    docs/user-guide.md, "Runtime environments".

    ``namespace`` is where this job's named actors are created and looked up
    by default (``"default"`` when not given); tasks and actors of the job
    inherit it.

    Returns a dict with the head ``address``, ``session_dir``, ``node_id`` and
    ``dashboard_url`` (the head's web dashboard, or None; log in with the token).
    """
    global _cluster, _info, _initialized
    with _state_lock:
        if not _initialized and current_client() is not None:
            if ignore_reinit_error:
                return {}
            raise RuntimeError("flowcore.init() inside a task: tasks are already connected "
                               "to their cluster; use the API directly")
        if _initialized:
            if ignore_reinit_error:
                return dict(_info)
            raise RuntimeError("flowcore.init() was already called in this process; call "
                               "flowcore.shutdown() first, or pass ignore_reinit_error=True")
        _check_number("num_cpus", num_cpus)
        _check_number("num_gpus", num_gpus, integer=True)
        _check_number("object_store_memory", object_store_memory, integer=True)
        _check_number("max_workers", max_workers, integer=True)
        _check_number("worker_memory_limit", worker_memory_limit, integer=True)
        if runtime_env is not None:
            from .runtime_env import check as check_runtime_env
            try:
                check_runtime_env(runtime_env)
            except (TypeError, ValueError) as e:
                raise type(e)(f"init(runtime_env=...): {e}") from None
        if namespace is not None and (not isinstance(namespace, str) or not namespace):
            raise TypeError(f"init(namespace={namespace!r}): expected a non-empty string")
        if max_workers == 0:
            raise ValueError("init(max_workers=0): a node needs at least one worker")
        if resources is not None:
            if not isinstance(resources, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and v >= 0 and math.isfinite(v) for k, v in resources.items()):
                raise ValueError(f"init(resources={resources!r}): expected a dict of name -> "
                                 f"finite number >= 0")
            if "CPU" in resources or "GPU" in resources:
                raise ValueError("init(resources=...): use num_cpus/num_gpus for CPU and GPU")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"init(address=...) must be a string like 'tcp://host:port', got "
                            f"{type(address).__name__}")
        if object_store_memory is not None and object_store_memory < (16 << 20):
            raise ValueError(f"init(object_store_memory={object_store_memory}): at least 16 MiB "
                             f"is needed")
        from .cluster import LocalCluster

        address = address or os.environ.get("FLOWCORE_ADDRESS") or None
        if address == "auto":
            address, token = _local_head(token)
        if address is None:
            set_worker_paths(list(sys.path))
            cluster = LocalCluster(session_dir=session_dir, token=token, tls=tls)
            try:
                node = cluster.start(
                    num_cpus=num_cpus if num_cpus is not None else float(os.cpu_count() or 1),
                    num_gpus=None if num_gpus is None else int(num_gpus), resources=resources,
                    object_store_memory=object_store_memory, max_workers=max_workers,
                    worker_memory_limit=worker_memory_limit,
                    while_starting=_preload_client)
                from .client.core import CoreClient
                client = CoreClient(cluster.head_address, cluster.token.encode(), node.address,
                                    tls=cluster.tls)
                # nothing restarts an embedded head: no grace to wait for it
                client.head_grace = 0.0
                client.embedded_head_pid = cluster.head.pid if cluster.head else None
                client.start()
            except BaseException:
                cluster.close()
                raise
            _cluster = cluster
            _info = {"address": cluster.head_address, "session_dir": cluster.session_dir,
                     "node_id": node.node_id, "dashboard_url": cluster.dashboard_url}
        else:
            set_worker_paths(None)
            token = token or os.environ.get("FLOWCORE_TOKEN")
            if not token:
                raise ValueError("connecting to a cluster needs its token: pass "
                                 "init(address, token=...) or set FLOWCORE_TOKEN")
            from .protocol.tls import resolve as resolve_tls
            client = _connect_existing(address, token, resolve_tls(tls))
            _info = {"address": address, "session_dir": client.session_dir,
                     "node_id": client.node_id,
                     "dashboard_url": getattr(client, "dashboard_url", None)}
        client.log_to_driver = bool(log_to_driver)
        client.job = new_job(namespace)
        if runtime_env is None and address is not None and \
                os.environ.get("FLOWCORE_JOB_RUNTIME_ENV"):
            # a submitted job's driver: its tasks get the job's runtime_env
            import json
            runtime_env = json.loads(os.environ["FLOWCORE_JOB_RUNTIME_ENV"])
        if runtime_env is not None:
            from .runtime_env import init_job
            try:
                init_job(client, runtime_env)
            except BaseException:
                client.close()
                if _cluster is not None:  # init started it (no address)
                    _cluster.close()
                    _cluster = None
                _info = {}
                raise
        set_client(client)
        _initialized = True
        import logging
        logging.getLogger("flowcore").info("flowcore started: head %s, session %s",
                                           _info["address"], _info["session_dir"])
        if _cluster is not None and not os.environ.get("FLOWCORE_QUIET"):
            dash = (f", dashboard {_cluster.dashboard_login_url}"
                    if _cluster.dashboard_login_url else "")
            from .cluster import describe_retention
            kept = (describe_retention() if _cluster.own_session_dir
                    else "kept: session_dir= is never pruned")
            print(f"flowcore: started a local cluster (head {_info['address']}{dash}); logs in "
                  f"{_info['session_dir']}/logs, {kept}", file=sys.stderr)
        return dict(_info)


def _local_head(token: str | None) -> tuple[str, str | None]:
    """The head recorded by ``flowcore-scheduler`` in the state directory
    (``FLOWCORE_STATE_DIR`` or ``~/.flowcore``), and its token if it wrote one."""
    state_dir = os.environ.get("FLOWCORE_STATE_DIR") or os.path.expanduser("~/.flowcore")
    try:
        with open(os.path.join(state_dir, "address")) as f:
            address = f.read().strip()
    except OSError:
        raise ConnectionError(f"init(address='auto'): no running head recorded in {state_dir}; "
                              f"start one with flowcore-scheduler, or pass its address") from None
    if token is None and not os.environ.get("FLOWCORE_TOKEN"):
        try:
            with open(os.path.join(state_dir, "token")) as f:
                token = f.read().strip() or None
        except OSError:
            pass
    return address, token


def _preload_client() -> None:
    """Import the client side, and what the first ``.remote()`` and ``get``
    need, while the head and node processes boot (``init`` launches them
    before it imports anything it can do without)."""
    from .client import core  # noqa: F401
    from .objects import generator, ref, serialization  # noqa: F401
    from . import options, scheduling  # noqa: F401


def _connect_existing(address: str, token: str, tls: Any = None) -> Any:
    import socket

    from .client.core import CoreClient
    probe = CoreClient(address, token.encode(), None, tls=tls)
    probe.start()
    try:
        nodes = probe.query("list_nodes")
    finally:
        probe.close()
    host = socket.gethostname()
    alive = [n for n in nodes if n.get("alive")]
    wire = os.environ.get("FLOWCORE_CLIENT_MODE", "") not in ("", "0")
    local = [] if wire else [n for n in alive if n.get("hostname") == host]
    # a process started by a worker (e.g. a submitted job's entrypoint run on a
    # chosen node) attaches to that worker's node, not just any node of this host
    mine = os.environ.get("FLOWCORE_NODE_ID")
    local.sort(key=lambda n: n.get("node_id") != mine)
    if local:  # attach to this host's store: objects shared without copies
        node_address, remote = local[0]["address"], False
    elif alive:  # client mode: objects travel over the connection to a node
        gateway = max(alive, key=lambda n: n.get("resources_available", {}).get("CPU", 0.0))
        node_address, remote = gateway["address"], True
    else:
        node_address, remote = None, False
    client = CoreClient(address, token.encode(), node_address, remote_store=remote,
                        tls=tls)
    client.start()
    return client


def shutdown() -> None:
    """Disconnect, and stop the local cluster if ``init`` started one."""
    global _cluster, _info, _initialized
    with _state_lock:
        # a worker's client is not ours to close (but it is let go of, as before)
        client = current_client() if _initialized else None
        cluster = _cluster
        set_client(None)
        _cluster = None
        _info = {}
        _initialized = False
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


atexit.register(shutdown)



def session_token() -> str | None:
    """The token of the cluster ``init()`` started or joined (None before)."""
    if not _initialized:
        return None
    if _cluster is not None:
        return _cluster.token
    client = current_client()
    return client.token.decode() if client is not None else None


def session_info() -> dict[str, Any]:
    """What ``init()`` returned (head address, session dir, node id, dashboard)."""
    if not _initialized:
        raise FlowcoreError("flowcore is not initialized")
    return dict(_info)

