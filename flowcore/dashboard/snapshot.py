"""Read-only snapshots of the head's tables for the dashboard and /metrics.

The dashboard must never slow the scheduler: a snapshot is built from
``SchedulerState`` on the head's loop at most once per ``interval`` (and
less often when building one is expensive: at most ``budget`` of the loop's
time goes to snapshots), only when someone asks, and every list in it is
bounded.  Requests are answered from the cached copy; its JSON encodings are
cached too, so several open pages cost one build and one encoding per
interval.

Everything here is plain data in, plain data out: tested without a server.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any, Callable

from .. import ids
from ..scheduler.states import TaskState

#: task states in lifecycle order (the order the pages and metrics use)
TASK_STATES = tuple(s.value for s in TaskState)
#: state -> its name (an enum's ``.value`` is slow in a loop over every task)
_NAME: dict[Any, str] = {s: s.value for s in TaskState}
ACTOR_STATES = ("PENDING", "ALIVE", "RESTARTING", "RECOVERING", "DEAD")
#: how far back the timeline reaches, seconds
TIMELINE_SPAN = 600.0
#: the longest error text kept per task row (the end of a traceback matters most)
MAX_ERROR_CHARS = 8000
#: dead nodes remembered for the node list
MAX_DEAD_NODES = 50


class Snapshot:
    """One consistent, bounded copy of what the pages show."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self._json: dict[str, bytes] = {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def tasks(self, state: str | None = None, limit: int | None = None) -> list[dict]:
        rows = self.data["tasks"]["all" if state is None else state]
        return rows if limit is None else rows[:limit]

    def json(self, key: str, make: Callable[[], Any]) -> bytes:
        """The JSON encoding of ``make()``, computed once per snapshot and key."""
        out = self._json.get(key)
        if out is None:
            out = self._json[key] = encode(make())
        return out


def encode(value: Any) -> bytes:
    """Compact JSON; bytes as hex, sets and tuples as lists, NaN/inf as null."""
    return json.dumps(_finite(value), separators=(",", ":"), default=_jsonable,
                      allow_nan=False).encode()


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)


def _finite(v: Any) -> Any:
    """``v`` with non-finite floats (which JSON cannot carry) made None."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


class SnapshotCache:
    """Builds a :class:`Snapshot` of ``state`` on demand, at most once per
    ``interval`` seconds, and at most ``budget`` of the time overall (a build
    that takes 100 ms with ``budget=0.05`` is not repeated for 2 s)."""

    def __init__(self, state: Any, *, head: dict[str, Any] | None = None,
                 interval: float = 1.0, budget: float = 0.05, max_tasks: int = 1000,
                 max_objects: int = 1000, max_actors: int = 1000,
                 max_timeline: int = 2000, clock: Callable[[], float] = time.monotonic):
        self.state = state
        self.head = head or {}
        self.interval = interval
        self.budget = budget
        self.max_tasks = max_tasks
        self.max_objects = max_objects
        self.max_actors = max_actors
        self.max_timeline = max_timeline
        self.clock = clock
        self.builds = 0
        self.last_build_seconds = 0.0
        self._snap: Snapshot | None = None
        self._next = -math.inf
        self._dead_nodes: dict[str, dict] = {}
        self._seen_nodes: dict[str, dict] = {}

    def get(self) -> Snapshot:
        now = self.clock()
        if self._snap is None or now >= self._next:
            t0 = self.clock()
            self._snap = Snapshot(self.build())
            cost = self.clock() - t0
            self.builds += 1
            self.last_build_seconds = cost
            self._next = t0 + max(self.interval, cost / self.budget if self.budget else 0.0)
        return self._snap

    # ------------------------------------------------------------ building
    def build(self) -> dict[str, Any]:
        s = self.state
        wall = time.time()
        nodes = self._nodes(wall)
        names = {n["node_id"]: n["name"] for n in nodes}
        tasks, task_counts, running = self._tasks(names)
        actors, actor_counts = self._actors(names)
        objects, object_summary = self._objects(names)
        timeline = self._timeline(running, names, wall)
        total = s.cluster_resources()
        avail = s.available_resources()
        resources = {k: {"total": v, "used": max(v - avail.get(k, 0.0), 0.0)}
                     for k, v in sorted(total.items(), key=lambda kv: _resource_order(kv[0]))}
        store_used = sum(n.get("store", {}).get("used", 0) for n in nodes if n["alive"])
        store_cap = sum(n.get("store", {}).get("capacity", 0) for n in nodes if n["alive"])
        summary = {
            "time": wall,
            "version": self.head.get("version"),
            "address": self.head.get("address"),
            "started": self.head.get("started"),
            "nodes": {"alive": sum(1 for n in nodes if n["alive"]), "total": len(nodes)},
            "resources": resources,
            "tasks": {"by_state": task_counts, "totals": dict(s.counts),
                      "in_table": len(s.tasks), "history": len(s.history)},
            "actors": {"by_state": actor_counts, "total": len(s.actors)},
            "objects": object_summary,
            "store": {"used": store_used, "capacity": store_cap},
            "warnings": list(s.warnings)[-10:],
            "limits": {"tasks": self.max_tasks, "objects": self.max_objects,
                       "actors": self.max_actors, "timeline": self.max_timeline},
        }
        return {"time": wall, "summary": summary, "nodes": nodes, "tasks": tasks,
                "actors": actors, "objects": objects, "timeline": timeline}

    def _nodes(self, wall: float) -> list[dict]:
        s = self.state
        alive: list[dict] = []
        for n in s.nodes.values():
            d = n.as_dict()
            used = {k: max(v - d["resources_available"].get(k, 0.0), 0.0)
                    for k, v in d["resources_total"].items()}
            d["resources_used"] = used
            hb = d.get("last_heartbeat")
            d["heartbeat_age"] = (wall - hb) if hb else None
            d["joined"] = n.joined
            alive.append(d)
        current = {d["node_id"] for d in alive}
        # the head forgets a node when it dies; the dashboard keeps its last
        # view, marked dead, so "alive 1 of 2" means something
        for nid in list(self._seen_nodes):
            if nid not in current:
                gone = dict(self._seen_nodes.pop(nid), alive=False, running_tasks=0,
                            died=wall)
                self._dead_nodes[nid] = gone
                while len(self._dead_nodes) > MAX_DEAD_NODES:
                    self._dead_nodes.pop(next(iter(self._dead_nodes)))
        for d in alive:
            self._seen_nodes[d["node_id"]] = d
            self._dead_nodes.pop(d["node_id"], None)
        return alive + list(self._dead_nodes.values())

    def _pid(self, worker: dict | None, kind: str | None, actor: bytes | str | None) -> Any:
        """The worker process of a task; for an actor's creation (which
        reports no worker), the actor's process."""
        if worker and worker.get("pid"):
            return worker["pid"]
        if kind == "create" and actor:
            a = self.state.actors.get(bytes.fromhex(actor) if isinstance(actor, str) else actor)
            return a.pid if a is not None else None
        return None

    def task_row(self, t: Any, names: dict[str, str]) -> dict:
        state = _NAME.get(t.state, "NEW")
        return {"task_id": t.tid.hex(), "name": t.name, "kind": t.kind, "state": state,
                "node_id": t.node, "node": names.get(t.node or "", t.node),
                "pid": self._pid(t.worker, t.kind, t.actor), "attempt": t.attempt,
                "submitted": t.submitted, "started": t.started or None,
                "ended": t.ended or None, "cause": t.cause,
                "error": _clip(t.error_text),
                "actor_id": t.actor.hex() if t.actor else None,
                "waiting_for": len(t.missing)}

    def history_row(self, h: dict, names: dict[str, str]) -> dict:
        return {"task_id": h["task_id"], "name": h.get("name"), "kind": h.get("kind"),
                "state": h.get("state"), "node_id": h.get("node_id"),
                "node": names.get(h.get("node_id") or "", h.get("node_id")),
                "pid": self._pid(h.get("worker"), h.get("kind"), h.get("actor_id")),
                "attempt": h.get("attempt"),
                "submitted": h.get("submitted"), "started": h.get("started"),
                "ended": h.get("ended"), "cause": h.get("cause", ""),
                "error": _clip(h.get("error")), "actor_id": h.get("actor_id"),
                "waiting_for": 0}

    def _tasks(self, names: dict[str, str]) -> tuple[dict[str, list], dict[str, int], list]:
        """Newest ``max_tasks`` tasks overall and per state (live table first,
        then the history of pruned ones), the count per state of the live
        table, and the newest running tasks (for the timeline).

        The one pass over the whole table is kept lean (it is the cost of a
        snapshot when the table is large); rows are made only for kept tasks."""
        s = self.state
        limit = self.max_tasks
        counts: dict[Any, int] = {}
        kept: dict[Any, list] = {st: [] for st in TaskState}
        count = counts.get
        bucket_of = kept.get
        for t in reversed(s.tasks.values()):  # newest submitted first
            st = t.state
            counts[st] = count(st, 0) + 1
            bucket = bucket_of(st)
            if bucket is not None and len(bucket) < limit:
                bucket.append(t)
        per_state: dict[str, list] = {
            _NAME[st]: [self.task_row(t, names) for t in rows] for st, rows in kept.items()}
        tasks = s.tasks
        for h in reversed(s.history):  # newest finished first
            bucket = per_state.get(h.get("state") or "")
            if bucket is None or len(bucket) >= limit:
                continue
            if bytes.fromhex(h["task_id"]) in tasks:
                continue  # the live record is newer
            bucket.append(self.history_row(h, names))
        for rows in per_state.values():
            rows.sort(key=_submitted, reverse=True)
        everything = [r for rows in per_state.values() for r in rows]
        everything.sort(key=_submitted, reverse=True)
        per_state["all"] = everything[:limit]
        by_state = {_NAME[st]: counts.get(st, 0) for st in TaskState}
        return per_state, by_state, kept[TaskState.RUNNING]

    def _actors(self, names: dict[str, str]) -> tuple[list[dict], dict[str, int]]:
        s = self.state
        counts = Counter(a.state for a in s.actors.values())
        rows: list[dict[str, Any]] = []
        for a in reversed(s.actors.values()):
            if len(rows) >= self.max_actors:
                break
            d = a.as_dict()
            d["node"] = names.get(a.node or "", a.node)
            rows.append(d)
        return rows, {st: counts.get(st, 0) for st in ACTOR_STATES}

    def _objects(self, names: dict[str, str]) -> tuple[list[dict], dict]:
        s = self.state
        count = len(s.objects)
        total = inline = errors = 0
        by_state: dict[str, int] = {}
        seen = by_state.get
        for o in s.objects.values():  # lean: one pass over every object
            size = o.size
            total += size
            st = o.state
            by_state[st] = seen(st, 0) + 1
            if o.inline is not None:
                inline += size
            if o.error:
                errors += 1
        rows: list[dict[str, Any]] = []
        for o in reversed(s.objects.values()):
            if len(rows) >= self.max_objects:
                break
            tid = ids.task_of(o.oid)
            producer = s.tasks.get(tid)
            handle = ids.index_of(o.oid) == ids.HANDLE_INDEX
            rows.append({
                "object_id": o.oid.hex(), "state": o.state, "size": o.size,
                "inline": o.inline is not None, "error": o.error,
                "kind": "actor handle" if handle else "value",
                "nodes": [names.get(n, n) for n in sorted(o.nodes)],
                "references": len(o.clients) + o.holds, "clients": len(o.clients),
                "holds": o.holds, "owner": o.owner, "created": o.created,
                "task": producer.name if producer is not None else None})
        summary = {"count": count, "bytes": total, "inline_bytes": inline,
                   "store_bytes": total - inline, "errors": errors,
                   "by_state": dict(by_state)}
        return rows, summary

    def _timeline(self, running: list, names: dict[str, str], wall: float) -> dict:
        """Bars for the task timeline: finished tasks from the history (newest
        first, within ``TIMELINE_SPAN``) plus the running tasks."""
        bars = []
        since = wall - TIMELINE_SPAN
        for t in running[: self.max_timeline // 2]:
            bars.append({"task_id": t.tid.hex(), "name": t.name, "state": "RUNNING",
                         "node_id": t.node, "node": names.get(t.node or "", t.node),
                         "pid": self._pid(t.worker, t.kind, t.actor),
                         "start": t.started or t.submitted,
                         "end": None, "kind": t.kind})
        for h in reversed(self.state.history):
            if len(bars) >= self.max_timeline:
                break
            end = h.get("ended") or 0.0
            if end < since:
                break  # the history is in completion order
            start = h.get("started")
            if not start:
                continue  # never ran (cancelled or failed before dispatch)
            bars.append({"task_id": h["task_id"], "name": h.get("name"),
                         "state": h.get("state"), "node_id": h.get("node_id"),
                         "node": names.get(h.get("node_id") or "", h.get("node_id")),
                         "pid": self._pid(h.get("worker"), h.get("kind"), h.get("actor_id")),
                         "start": start, "end": end,
                         "kind": h.get("kind")})
        return {"now": wall, "span": TIMELINE_SPAN, "tasks": bars}


def _submitted(row: dict) -> float:
    return row["submitted"] or 0.0


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_ERROR_CHARS:
        return text
    return "…" + text[-MAX_ERROR_CHARS:]


def _resource_order(name: str) -> tuple:
    return ({"CPU": 0, "GPU": 1}.get(name, 2), name)
