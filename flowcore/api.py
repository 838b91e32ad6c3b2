"""The public functions: init/shutdown, get/put/wait, cancel, cluster queries."""
from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
from typing import Any, Sequence, TypeVar, overload

from .exceptions import FlowcoreError
from .objects.ref import ObjectRef, current_client, set_client

T = TypeVar("T")
logger = logging.getLogger("flowcore")

_state_lock = threading.RLock()
_cluster: Any = None
_client: Any = None
_info: dict[str, Any] = {}


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
    global _cluster, _client, _info
    with _state_lock:
        if _client is None and current_client() is not None:
            if ignore_reinit_error:
                return {}
            raise RuntimeError("flowcore.init() inside a task: tasks are already connected "
                               "to their cluster; use the API directly")
        if _client is not None:
            if ignore_reinit_error:
                return dict(_info)
            raise RuntimeError("flowcore.init() was already called in this process; call "
                               "flowcore.shutdown() first, or pass ignore_reinit_error=True")
        _check_number("num_cpus", num_cpus)
        _check_number("num_gpus", num_gpus, integer=True)
        _check_number("object_store_memory", object_store_memory, integer=True)
        _check_number("max_workers", max_workers, integer=True)
        _check_number("worker_memory_limit", worker_memory_limit, integer=True)
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
        from .protocol.tls import resolve as resolve_tls

        from .remote_function import set_worker_paths
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
            client = _connect_existing(address, token, resolve_tls(tls))
            _info = {"address": address, "session_dir": client.session_dir,
                     "node_id": client.node_id,
                     "dashboard_url": getattr(client, "dashboard_url", None)}
        client.log_to_driver = bool(log_to_driver)
        from .runtime_context import new_job
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
                if address is None:
                    _cluster.close()
                    _cluster = None
                _info = {}
                raise
        _client = client
        set_client(client)
        logger.info("flowcore started: head %s, session %s", _info["address"],
                    _info["session_dir"])
        if address is None and not os.environ.get("FLOWCORE_QUIET"):
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
    """Import the client side while the head and node processes boot."""
    from .client import core  # noqa: F401
    from .objects import serialization  # noqa: F401


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


def _auto_init() -> Any:
    with _state_lock:
        if _client is None:
            init()
    return _client


def shutdown() -> None:
    """Disconnect, and stop the local cluster if ``init`` started one."""
    global _cluster, _client, _info
    with _state_lock:
        client, cluster = _client, _cluster
        _client = _cluster = None
        _info = {}
        set_client(None)
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


atexit.register(shutdown)


def _require_client() -> Any:
    c = current_client()
    if c is None:
        raise RuntimeError("flowcore is not initialized: call flowcore.init() first")
    return c


def _check_timeout(fn: str, timeout: Any) -> None:
    if timeout is None:
        return
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"{fn}(timeout={timeout!r}): expected None or a number of seconds, "
                        f"got {type(timeout).__name__}")
    if timeout < 0 or math.isnan(timeout):
        raise ValueError(f"{fn}(timeout={timeout!r}): expected None or a number of seconds >= 0")


@overload
def get(refs: ObjectRef[T], *, timeout: float | None = None) -> T: ...
@overload
def get(refs: Sequence[ObjectRef[T]], *, timeout: float | None = None) -> list[T]: ...


def get(refs: Any, *, timeout: float | None = None) -> Any:
    """The value of a ref, or the values of a list of refs in order.

    Raises the task's ``TaskError`` (also an instance of the original
    exception class) if it failed, ``GetTimeoutError`` after ``timeout``.
    """
    _check_timeout("get", timeout)
    if isinstance(refs, ObjectRef):
        return _require_client().get_values([refs], timeout)[0]
    if isinstance(refs, (list, tuple)):
        for i, r in enumerate(refs):
            if not isinstance(r, ObjectRef):
                raise TypeError(f"get() takes an ObjectRef or a list of ObjectRefs; item {i} is "
                                f"{type(r).__name__}")
        if not refs:
            return []
        return _require_client().get_values(list(refs), timeout)
    raise TypeError(f"get() takes an ObjectRef or a list of ObjectRefs, got "
                    f"{type(refs).__name__}; call .remote() to get refs, or flowcore.put(value)")


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the object store; returns its ref."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed: pass the ref itself, or put the "
                        "value")
    client = current_client() or _auto_init()
    return client.put(value)


def wait(refs: Sequence[ObjectRef], *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` are ready or ``timeout`` passes.

    Returns ``(ready, not_ready)``, each in the order of ``refs``.
    """
    if isinstance(refs, ObjectRef) or not isinstance(refs, (list, tuple)):
        raise TypeError(f"wait() takes a list of ObjectRefs, got {type(refs).__name__}")
    for i, r in enumerate(refs):
        if not isinstance(r, ObjectRef):
            raise TypeError(f"wait(): item {i} is {type(r).__name__}, not an ObjectRef")
    if len(set(refs)) != len(refs):
        raise ValueError("wait(): the list of refs contains duplicates")
    if not isinstance(num_returns, int) or isinstance(num_returns, bool) or num_returns < 1 \
            or num_returns > max(len(refs), 1):
        raise ValueError(f"wait(num_returns={num_returns!r}): expected an int between 1 and "
                         f"len(refs)={len(refs)}")
    _check_timeout("wait", timeout)
    if not refs:
        return [], []
    client = _require_client()
    ready = client.wait_ready([r._id for r in refs], num_returns, timeout)
    if fetch_local:  # start moving ready objects held on other nodes to this one
        client.prefetch(ready)
    done = [r for r in refs if r._id in ready][:num_returns]
    done_ids = {r._id for r in done}
    return done, [r for r in refs if r._id not in done_ids]


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes ``ref``: a queued task never runs; a
    running one gets KeyboardInterrupt (``force=True`` kills its worker)."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(ref).__name__}")
    _require_client().cancel(ref, bool(force), bool(recursive))


def explain(ref: ObjectRef) -> dict[str, Any]:
    """Why ``ref`` is not ready yet, in plain words (``["text"]``) and as data:
    the producing task's state, the arguments it waits for, the resources it
    is queued for and whether any node could ever fit it, where and since when
    it runs, and its newest state changes with their causes."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"explain() takes an ObjectRef, got {type(ref).__name__}")
    return _require_client().query("explain", oid=ref._id)


def nodes() -> list[dict[str, Any]]:
    """The nodes of the cluster with their resources."""
    return _require_client().query("list_nodes")


def cluster_resources() -> dict[str, float]:
    return _require_client().query("cluster_resources")


def available_resources() -> dict[str, float]:
    return _require_client().query("available_resources")


def get_node_ip_address(address: str = "8.8.8.8:53") -> str:
    """The IP address of the node this process runs on: its node's address
    when connected, else the local address that routes to ``address`` (no
    packet is sent), else 127.0.0.1."""
    import socket
    client = current_client()
    node_address = getattr(client, "node_address", None) if client is not None else None
    if node_address:
        from .protocol.comm import parse_address
        return parse_address(node_address)[0]
    host, _, port = address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port)))
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"


def get_runtime_context() -> Any:
    """Facts about this process, job, task and actor (``RuntimeContext``);
    starts the embedded cluster on first use, like the other API calls."""
    from .runtime_context import RuntimeContext
    return RuntimeContext(current_client() or _auto_init())


def session_info() -> dict[str, Any]:
    if _client is None:
        raise FlowcoreError("flowcore is not initialized")
    return dict(_info)
