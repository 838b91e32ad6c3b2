"""The public functions: init/shutdown, get/put/wait, cancel, cluster queries.

``init``/``shutdown`` live in ``flowcore.session`` (the process's client);
they are exported here too, where users have always found them.
"""
from __future__ import annotations

import math
import socket
from typing import TYPE_CHECKING, Any, Sequence, TypeVar, overload

from .objects.ref import ObjectRef
from .session import (client_or_init, current_client, init, is_initialized, require_client,
                      session_info, shutdown)

if TYPE_CHECKING:  # the actor and options modules load with the first use
    from .runtime_context import RuntimeContext

T = TypeVar("T")

__all__ = ["init", "shutdown", "is_initialized", "session_info", "get", "put", "wait", "cancel",
           "explain", "nodes", "cluster_resources", "available_resources",
           "get_node_ip_address", "get_runtime_context"]


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
        return require_client().objects.get_values([refs], timeout)[0]
    if isinstance(refs, (list, tuple)):
        for i, r in enumerate(refs):
            if not isinstance(r, ObjectRef):
                raise TypeError(f"get() takes an ObjectRef or a list of ObjectRefs; item {i} is "
                                f"{type(r).__name__}")
        if not refs:
            return []
        return require_client().objects.get_values(list(refs), timeout)
    raise TypeError(f"get() takes an ObjectRef or a list of ObjectRefs, got "
                    f"{type(refs).__name__}; call .remote() to get refs, or flowcore.put(value)")


def put(value: Any) -> ObjectRef:
    """Store ``value`` in the object store; returns its ref."""
    if isinstance(value, ObjectRef):
        raise TypeError("put() of an ObjectRef is not allowed: pass the ref itself, or put the "
                        "value")
    client = client_or_init()
    return client.objects.put(value)


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
    client = require_client()
    ready = client.objects.wait_ready([r._id for r in refs], num_returns, timeout)
    if fetch_local:  # start moving ready objects held on other nodes to this one
        client.objects.prefetch(ready)
    done = [r for r in refs if r._id in ready][:num_returns]
    done_ids = {r._id for r in done}
    return done, [r for r in refs if r._id not in done_ids]


def cancel(ref: ObjectRef, *, force: bool = False, recursive: bool = True) -> None:
    """Cancel the task that makes ``ref``: a queued task never runs; a
    running one gets KeyboardInterrupt (``force=True`` kills its worker)."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"cancel() takes an ObjectRef, got {type(ref).__name__}")
    require_client().cancel(ref, bool(force), bool(recursive))


def explain(ref: ObjectRef) -> dict[str, Any]:
    """Why ``ref`` is not ready yet, in plain words (``["text"]``) and as data:
    the producing task's state, the arguments it waits for, the resources it
    is queued for and whether any node could ever fit it, where and since when
    it runs, and its newest state changes with their causes."""
    if not isinstance(ref, ObjectRef):
        raise TypeError(f"explain() takes an ObjectRef, got {type(ref).__name__}")
    return require_client().query("explain", oid=ref._id)


def nodes() -> list[dict[str, Any]]:
    """The nodes of the cluster with their resources."""
    return require_client().query("list_nodes")


def cluster_resources() -> dict[str, float]:
    return require_client().query("cluster_resources")


def available_resources() -> dict[str, float]:
    return require_client().query("available_resources")


def get_node_ip_address(address: str = "8.8.8.8:53") -> str:
    """The IP address of the node this process runs on: its node's address
    when connected, else the local address that routes to ``address`` (no
    packet is sent), else 127.0.0.1."""
    client = current_client()
    node_address = getattr(client, "node_address", None) if client is not None else None
    if node_address:
        from .protocol.comm import parse_address  # tornado: the driver's client loads it
        return parse_address(node_address)[0]
    host, _, port = address.rpartition(":")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port)))
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"


def get_runtime_context() -> RuntimeContext:
    """Facts about this process, job, task and actor (``RuntimeContext``);
    starts the embedded cluster on first use, like the other API calls."""
    from .runtime_context import RuntimeContext
    return RuntimeContext(client_or_init())


