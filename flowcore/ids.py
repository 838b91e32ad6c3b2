"""Identifiers for tasks, objects, nodes, clients and actors.

A task id is 16 bytes: an 8-byte random prefix owned by the creating client
and an 8-byte counter, so ids are unique without coordination and cheap to
make.  An object id is its producing task's id plus a 4-byte return index
(puts use a fresh "put task" id with index 0), so the producer of any object
is known from the id alone, which is what lineage needs.
"""
from __future__ import annotations

import itertools
import os
import struct
import threading

TASK_ID_SIZE = 16
OBJECT_ID_SIZE = 20

_index = struct.Struct(">I")


class IdSource:
    """Makes unique task ids for one client (thread-safe)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def task_id(self) -> bytes:
        with self._lock:
            n = next(self._counter)
        return self.prefix + n.to_bytes(8, "big")


def object_id(task_id: bytes, index: int = 0) -> bytes:
    return task_id + _index.pack(index)


def task_of(oid: bytes) -> bytes:
    return oid[:TASK_ID_SIZE]


def index_of(oid: bytes) -> int:
    return _index.unpack(oid[TASK_ID_SIZE:])[0]


def random_id(n: int = 16) -> bytes:
    return os.urandom(n)


def short(i: bytes) -> str:
    """A short hex form for logs."""
    return i.hex()[:12]


#: return index reserved for the "handle" object of an actor: handles are
#: reference-counted like ObjectRefs, through this id
HANDLE_INDEX = 0xFFFFFFFF


def actor_handle_id(aid: bytes) -> bytes:
    return object_id(aid, HANDLE_INDEX)
