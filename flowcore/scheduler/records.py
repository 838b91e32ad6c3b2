"""The head's records and their states: one ``TaskRecord`` per task (a node
of the futures DAG), one ``ObjectRecord`` per object, one ``NodeRecord`` per
node, and the state enums they use.  Plain data: the state machine
(``machine.py``) and the transition layer (``tasks.py``) change them."""
from __future__ import annotations

import time
from enum import Enum
from operator import attrgetter
from typing import Any, Mapping

from .. import ids
from ..resources import Resources


class TaskState(str, Enum):
    WAITING_FOR_ARGS = "WAITING_FOR_ARGS"
    QUEUED = "QUEUED"
    INFEASIBLE = "INFEASIBLE"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"

    def __str__(self) -> str:  # logs and dashboards show the bare name
        return self.value

    @property
    def done(self) -> bool:
        return self in _DONE


_DONE = {TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED}


class NodeRecord:
    __slots__ = ("node_id", "address", "total", "available", "alive", "name",
                 "hostname", "pid", "running", "joined", "info", "index")

    def __init__(self, node_id: str, address: str, total: dict[str, float], name: str,
                 hostname: str, pid: int, info: dict | None = None):
        self.node_id = node_id
        self.address = address
        self.total = Resources(total)
        self.available = Resources(total)
        self.alive = True
        self.name = name
        self.hostname = hostname
        self.pid = pid
        self.running: set[bytes] = set()
        self.joined = time.time()
        self.info = info or {}
        #: the placement index listing this node (told of every change to
        #: ``available``; set by ``PlacementIndex.add``)
        self.index: Any = None

    # the node's account (``Resources``): what tasks, actors and bundles take
    def fits(self, res: Mapping[str, float]) -> bool:
        return self.available.fits(res)

    def could_ever_fit(self, res: Mapping[str, float]) -> bool:
        return self.total.fits(res)

    def take(self, res: Mapping[str, float]) -> None:
        self.available.take(res)
        if self.index is not None:
            self.index.touch(self)

    def give(self, res: Mapping[str, float]) -> None:
        self.available.give(res)
        if self.index is not None:
            self.index.gave(self)

    def as_dict(self) -> dict:
        return {"node_id": self.node_id, "name": self.name, "address": self.address,
                "hostname": self.hostname, "pid": self.pid, "alive": self.alive,
                "resources_total": dict(self.total),
                "resources_available": {k: max(v, 0.0) for k, v in self.available.items()},
                "running_tasks": len(self.running), **self.info}


_now = time.time
_INDEX0 = ids.object_id(b"", 0)  # the suffix of a task's first return's id
#: (request items, strategy) -> shape, for the requests seen lately
_SHAPES: dict[tuple, tuple] = {}


def task_shape(res: Mapping[str, float], strategy: Any) -> tuple:
    """The queue a task waits in: its non-zero resource amounts (sorted) and
    its placement strategy."""
    key = (tuple(res.items()), strategy)
    try:
        shape = _SHAPES.get(key)
    except TypeError:  # an unhashable strategy: not cached
        return (tuple(sorted((k, v) for k, v in res.items() if v)), strategy)
    if shape is None:
        if len(_SHAPES) > 4096:
            _SHAPES.clear()
        shape = _SHAPES[key] = (tuple(sorted((k, v) for k, v in res.items() if v)), strategy)
    return shape


class TaskRecord:
    __slots__ = ("tid", "fid", "name", "owner", "args", "deps", "missing", "nested",
                 "nret", "res", "retries_left", "retry_exc", "_state", "node", "cause",
                 "submitted", "started", "ended", "blocked", "attempt", "shape", "returns_alive",
                 "args_dep", "actor", "method", "kind", "worker", "error_text", "strategy",
                 "ahead", "lineage_held", "lineage_evicted", "bundle", "renv", "children", "job",
                 "cgroup", "xopts", "parent")

    def __init__(self, spec: dict, owner: str):
        get = spec.get  # (one lookup: this runs for every task submitted)
        self.tid: bytes = spec["tid"]
        self.fid: bytes = spec["fid"]
        self.name: str = get("name", "?")
        self.owner = owner
        self.renv: dict | None = get("renv")  # runtime_env descriptor
        self.job: list | None = get("job")  # [job id, namespace] of the submitter
        self.cgroup: str | None = get("cgroup")  # an actor call's concurrency group
        self.xopts: dict | None = get("xopts")  # for the worker: max_calls, generator
        self.args: bytes | None = spec["args"]
        self.args_dep: int | None = get("args_dep")
        actor = get("actor")
        kind = self.kind = get("kind") or ("call" if actor else "task")
        self.actor: bytes | None = get("aid") if kind == "create" else actor
        self.method: str | None = get("method")
        self.worker: dict | None = None      # {"pid": ..., "wid": ...} of the last run
        self.error_text: str | None = None   # the failure's message, for views
        self.ahead = False   # sent to its node before resources there were free
        self.lineage_held = False  # finished, arguments kept for re-execution
        self.lineage_evicted = False  # ... and then dropped to bound lineage memory
        self.children: list[bytes] | None = None  # tasks it submitted (recursive cancel)
        self.parent: bytes | None = spec.get("parent")  # the task that submitted it
        self.bundle: str | None = None  # "pgid-hex:index" while placed in a bundle
        self.deps: list[bytes] = get("deps") or []
        self.missing: set[bytes] = set()
        self.nested: list[bytes] = get("nested") or []
        self.nret: int = get("nret", 1)
        res = self.res = get("res") or {}
        self.retries_left: int = get("retries", 3)
        self.retry_exc = get("retry_exc", False)
        self._state: TaskState | None = None  # written by tasks.Transitions only
        self.node: str | None = None
        self.cause = ""
        self.submitted = _now()
        self.started = 0.0
        self.ended = 0.0
        self.blocked = False
        self.attempt = 0
        strategy = get("strategy")
        if isinstance(strategy, list):
            strategy = tuple(strategy)
        self.strategy: Any = strategy
        # tasks queue per (resources, strategy): a task pinned to a busy node
        # must not hold back others
        self.shape = task_shape(res, strategy)
        self.returns_alive = self.nret

    #: read-only: ``tasks.Transitions`` is the one writer (checked against
    #: the transition table); the getter is C code (read on every message)
    state = property(attrgetter("_state"), doc="The task's state (read-only).")

    def returns(self) -> list[bytes]:
        if self.nret == 1:
            return [self.tid + _INDEX0]
        return [ids.object_id(self.tid, i) for i in range(self.nret)]

    def as_dict(self) -> dict:
        return {"task_id": self.tid.hex(), "name": self.name, "state": str(self.state),
                "node_id": self.node, "owner": self.owner, "attempt": self.attempt,
                "retries_left": self.retries_left, "resources": dict(self.res),
                "submitted": self.submitted, "started": self.started or None,
                "ended": self.ended or None, "cause": self.cause,
                "waiting_for": [o.hex() for o in self.missing]}


class ObjectState(str, Enum):
    """An object the head tracks: PENDING until its value exists, READY once
    it does (inline at the head or sealed in a node's store), LOST when its
    last copy is gone and it cannot be rebuilt (its value is then the error).
    The head, the graph export and the dashboard all use these names."""
    PENDING = "PENDING"
    READY = "READY"
    LOST = "LOST"

    def __str__(self) -> str:
        return self.value


PENDING, READY, LOST = ObjectState.PENDING, ObjectState.READY, ObjectState.LOST


#: the ``nested`` of an object holding no refs (shared; replaced, never changed)
_NO_REFS: list[bytes] = []


class ObjectRecord:
    __slots__ = ("oid", "state", "inline", "nodes", "size", "error", "clients", "holds",
                 "waiters", "dependents", "nested", "owner", "created")

    def __init__(self, oid: bytes, owner: str | None, created: float | None = None):
        self.oid = oid
        self.state: ObjectState = PENDING
        self.inline: bytes | None = None
        self.nodes: set[str] = set()
        self.size = 0
        self.error = False
        self.clients: set[str] = set()
        self.holds = 0
        #: who asked to hear when it is ready / the tasks waiting for it as
        #: an argument (None until there is one: most objects have neither)
        self.waiters: set[str] | None = None
        self.dependents: list[bytes] | None = None
        self.nested: list[bytes] = _NO_REFS
        self.owner = owner
        self.created = _now() if created is None else created

    def add_waiter(self, cid: str) -> None:
        if self.waiters is None:
            self.waiters = set()
        self.waiters.add(cid)

    def add_dependent(self, tid: bytes) -> None:
        if self.dependents is None:
            self.dependents = []
        self.dependents.append(tid)

    def as_dict(self) -> dict:
        return {"object_id": self.oid.hex(), "state": self.state.value, "size": self.size,
                "inline": self.inline is not None, "nodes": sorted(self.nodes),
                "error": self.error, "references": len(self.clients) + self.holds,
                "owner": self.owner, "created": self.created}
