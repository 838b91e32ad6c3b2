"""The head's key-value table (``flowcore.experimental.internal_kv``), free of IO.

Keys and values are bytes, grouped by namespace (bytes; ``b""`` when none is
given).  The table is bounded: one value at most ``MAX_VALUE_BYTES``, all
keys and values together at most ``MAX_TOTAL_BYTES``; a put over either
limit is refused with an error naming the limit.  Libraries publish small
JSON snapshots here for the dashboard (namespace ``dashboard``).

``handle(msg)`` answers the ``kv_*`` ops the server routes here; ``dump``
and ``restore`` carry the table through the head's persisted tables.
"""
from __future__ import annotations

from typing import Any

#: the largest value one put may store
MAX_VALUE_BYTES = 1 << 20
#: the most bytes (keys + values) the whole table holds
MAX_TOTAL_BYTES = 64 << 20
#: the longest key
MAX_KEY_BYTES = 4096

#: namespaces not persisted with the head's tables
TRANSIENT = frozenset((b"dashboard",))

OPS = frozenset(("kv_put", "kv_get", "kv_exists", "kv_del", "kv_list"))


class KVTable:
    def __init__(self, max_value: int = MAX_VALUE_BYTES, max_total: int = MAX_TOTAL_BYTES):
        self.data: dict[bytes, dict[bytes, bytes]] = {}
        self.total = 0
        self.max_value = max_value
        self.max_total = max_total
        self.version = 0  # bumped on every change (the server persists on change)

    # ------------------------------------------------------------ operations
    def put(self, ns: bytes, key: bytes, value: bytes, overwrite: bool = True) -> bool:
        """Store ``value``; True if the key already existed.  Raises
        ValueError when a limit would be exceeded."""
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"internal_kv key of {len(key)} bytes is over the limit of "
                             f"{MAX_KEY_BYTES} bytes; use a shorter key")
        if len(value) > self.max_value:
            raise ValueError(f"internal_kv value of {len(value)} bytes for key {key[:80]!r} "
                             f"is over the limit of {self.max_value} bytes; store large data "
                             f"with flowcore.put() and keep only a small reference here")
        table = self.data.setdefault(ns, {})
        old = table.get(key)
        if old is not None and not overwrite:
            return True
        grow = len(value) - (len(old) if old is not None else -len(key))
        if grow > 0 and self.total + grow > self.max_total:
            if not table:
                del self.data[ns]
            raise ValueError(f"internal_kv is full: {self.total} of {self.max_total} bytes "
                             f"used, and key {key[:80]!r} needs {grow} more; delete keys "
                             f"that are no longer needed")
        table[key] = bytes(value)
        self.total += grow
        self.version += 1
        return old is not None

    def get(self, ns: bytes, key: bytes) -> bytes | None:
        return self.data.get(ns, {}).get(key)

    def exists(self, ns: bytes, key: bytes) -> bool:
        return key in self.data.get(ns, {})

    def delete(self, ns: bytes, key: bytes, by_prefix: bool = False) -> int:
        """Delete ``key`` (or every key starting with it); how many were deleted."""
        table = self.data.get(ns)
        if not table:
            return 0
        keys = [k for k in table if k.startswith(key)] if by_prefix else \
            ([key] if key in table else [])
        for k in keys:
            self.total -= len(k) + len(table.pop(k))
        if not table:
            del self.data[ns]
        if keys:
            self.version += 1
        return len(keys)

    def keys(self, ns: bytes, prefix: bytes) -> list[bytes]:
        return sorted(k for k in self.data.get(ns, {}) if k.startswith(prefix))

    def items(self, ns: bytes, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """(key, value) pairs of a namespace, for views on the head."""
        table = self.data.get(ns, {})
        return [(k, table[k]) for k in sorted(table) if k.startswith(prefix)]

    # ------------------------------------------------------------ wire
    def handle(self, msg: dict) -> dict[str, Any]:
        """The reply fields of one ``kv_*`` request (``error`` on bad input)."""
        op = msg["op"]
        ns = msg.get("ns") or b""
        key = msg.get("key", b"")
        if not isinstance(ns, bytes) or not isinstance(key, bytes):
            return {"error": "internal_kv keys and namespaces are bytes"}
        try:
            if op == "kv_put":
                value = msg.get("value")
                if not isinstance(value, bytes):
                    return {"error": "internal_kv values are bytes"}
                return {"result": self.put(ns, key, value, bool(msg.get("overwrite", True)))}
            if op == "kv_get":
                return {"result": self.get(ns, key)}
            if op == "kv_exists":
                return {"result": self.exists(ns, key)}
            if op == "kv_del":
                return {"result": self.delete(ns, key, bool(msg.get("by_prefix")))}
            if op == "kv_list":
                return {"result": self.keys(ns, key)}
        except ValueError as e:
            return {"error": str(e)}
        return {"error": f"unknown internal_kv op {op!r}"}

    # ------------------------------------------------------------ persistence
    def dump(self) -> list[list[bytes]]:
        """The rows to persist: every namespace but ``dashboard`` (views that
        libraries publish again every second)."""
        return [[ns, k, v] for ns, table in self.data.items() if ns not in TRANSIENT
                for k, v in table.items()]

    def restore(self, rows: list | None) -> None:
        for ns, k, v in rows or ():
            try:
                self.put(bytes(ns), bytes(k), bytes(v))
            except ValueError:  # limits lowered since: drop what no longer fits
                pass
