"""A small key-value table on the head, as ``ray.experimental.internal_kv``.

Keys, values and namespaces are bytes (``str`` is accepted and encoded as
UTF-8).  Every driver and worker of the cluster sees the same table; a key
lives until it is deleted or the cluster stops (keys outside the
``dashboard`` namespace survive a head restart with a state directory).
Values are limited to 1 MiB each and the table to 64 MiB in all: store large
data with ``flowcore.put`` and keep a small reference here.

Libraries publish JSON views here for the dashboard (see
``flowcore.experimental.dashboard_feed``).
"""
from __future__ import annotations

from typing import Any, List, Optional, Union
from ..context import current_client

__all__ = ["_internal_kv_initialized", "_internal_kv_get", "_internal_kv_exists",
           "_internal_kv_put", "_internal_kv_del", "_internal_kv_list"]


def _as_bytes(name: str, value: Any, allow_none: bool = False) -> Optional[bytes]:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"internal_kv: {name} must be bytes or str, got {type(value).__name__}")


def _request(op: str, **fields: Any) -> Any:
    client = current_client()
    if client is None:
        raise RuntimeError("internal_kv needs a connected cluster: call flowcore.init() first")
    reply = client.request("head", dict(op=op, **fields))
    if "error" in reply:
        raise ValueError(reply["error"])
    return reply.get("result")


def _internal_kv_initialized() -> bool:
    """Whether this process is connected to a cluster (so the table is usable)."""
    return current_client() is not None


def _internal_kv_get(key: Union[str, bytes], *,
                     namespace: Optional[Union[str, bytes]] = None) -> Optional[bytes]:
    """The value of ``key``, or None when it is not set."""
    return _request("kv_get", key=_as_bytes("key", key),
                    ns=_as_bytes("namespace", namespace, True))


def _internal_kv_exists(key: Union[str, bytes], *,
                        namespace: Optional[Union[str, bytes]] = None) -> bool:
    """Whether ``key`` is set."""
    return bool(_request("kv_exists", key=_as_bytes("key", key),
                         ns=_as_bytes("namespace", namespace, True)))


def _internal_kv_put(key: Union[str, bytes], value: Union[str, bytes], overwrite: bool = True,
                     *, namespace: Optional[Union[str, bytes]] = None) -> bool:
    """Set ``key`` to ``value`` (only if unset when ``overwrite`` is False).

    Returns whether the key already existed.  Raises ValueError when the
    value is over 1 MiB or the table is full."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"internal_kv: overwrite must be a bool, got {overwrite!r}")
    return bool(_request("kv_put", key=_as_bytes("key", key), value=_as_bytes("value", value),
                         overwrite=overwrite, ns=_as_bytes("namespace", namespace, True)))


def _internal_kv_del(key: Union[str, bytes], *, del_by_prefix: bool = False,
                     namespace: Optional[Union[str, bytes]] = None) -> int:
    """Delete ``key`` (every key starting with it when ``del_by_prefix``);
    the number of keys deleted."""
    return int(_request("kv_del", key=_as_bytes("key", key), by_prefix=bool(del_by_prefix),
                        ns=_as_bytes("namespace", namespace, True)))


def _internal_kv_list(prefix: Union[str, bytes], *,
                      namespace: Optional[Union[str, bytes]] = None) -> List[bytes]:
    """The keys starting with ``prefix``, sorted."""
    return list(_request("kv_list", key=_as_bytes("prefix", prefix),
                         ns=_as_bytes("namespace", namespace, True)))
