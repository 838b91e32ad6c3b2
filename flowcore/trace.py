"""``flowcore.timeline()``: task spans as a Chrome trace (Perfetto) JSON.

Load the file in https://ui.perfetto.dev or ``chrome://tracing``: one
process row per node, one thread row per worker process, one slice per
task.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable, Mapping

from .session import require_client

__all__ = ["timeline"]

_US = 1_000_000.0


def _track_names(node_names: Mapping[str, str]) -> dict[str, str]:
    """node id -> the name shown as the trace's ``pid`` (unique per node)."""
    count: dict[str, int] = {}
    for name in node_names.values():
        count[name] = count.get(name, 0) + 1
    return {nid: name if count[name] == 1 else f"{name} ({nid})"
            for nid, name in node_names.items()}


def trace_events(history: Iterable[Mapping[str, Any]], running: Iterable[Mapping[str, Any]],
                 node_names: Mapping[str, str], actor_pids: Mapping[str, int | None],
                 now: float) -> list[dict]:
    """Complete (``"ph": "X"``) events from the head's finished-task history
    and its running tasks.

    Times are epoch microseconds.  A span runs from when the head sent the
    task to its node to when its result reached the head; a pool worker runs
    one task at a time, so a task sent while its worker was still busy
    starts when the previous task on that worker ended.  ``pid`` is the node
    name, ``tid`` the worker's process id (the actor's, for actor calls);
    running tasks, whose worker the head learns only at the end, get a row
    of their own (``"running #k"``).  Tasks that never started (cancelled
    while queued, failed because an argument failed) have no span.
    """
    pids = _track_names(node_names)
    spans: list[tuple[Any, Any, float, float, Mapping[str, Any]]] = []
    for rec in history:
        started, ended = rec.get("started"), rec.get("ended")
        if not started or not ended:
            continue
        node = rec.get("node_id")
        worker = rec.get("worker") or {}
        pid = worker.get("pid")
        if pid is None and rec.get("kind") == "create":
            pid = actor_pids.get(rec.get("actor_id") or "")
        spans.append((pids.get(node or "", node or "unplaced"),
                      pid if pid is not None else "unknown worker",
                      float(started), float(ended), rec))

    # a pool worker runs one task at a time, in the order they end: a task
    # cannot have started on it before the previous one ended
    events: list[dict] = []
    last_end: dict[tuple[Any, Any], float] = {}
    for pid, tid, started, ended, rec in sorted(spans, key=lambda s: (s[3], s[2])):
        start = started
        if rec.get("kind", "task") == "task" and isinstance(tid, int):
            start = min(max(started, last_end.get((pid, tid), started)), ended)
            last_end[(pid, tid)] = ended
        events.append(_event(rec, pid, tid, start, ended))
    events.sort(key=lambda e: (e["ts"], e["dur"]))

    per_node: dict[Any, int] = {}
    for rec in sorted(running, key=lambda r: r.get("started") or 0.0):
        started = rec.get("started")
        if not started:
            continue
        node = rec.get("node_id")
        pid = pids.get(node or "", node or "unplaced")
        per_node[pid] = per_node.get(pid, 0) + 1
        events.append(_event(rec, pid, f"running #{per_node[pid]}", float(started),
                             max(now, float(started))))
    return events


def _event(rec: Mapping[str, Any], pid: Any, tid: Any, start: float, end: float) -> dict:
    args: dict[str, Any] = {"task_id": rec.get("task_id"), "state": rec.get("state"),
                            "attempt": rec.get("attempt")}
    if rec.get("kind"):
        args["kind"] = rec["kind"]
    submitted = rec.get("submitted")
    if submitted:
        args["queued_ms"] = round(max(start - float(submitted), 0.0) * 1e3, 3)
    for key in ("actor_id", "error"):
        if rec.get(key):
            args[key] = rec[key]
    ts = round(start * _US, 3)
    return {"name": rec.get("name") or "?", "cat": rec.get("kind") or "task", "ph": "X",
            "ts": ts, "dur": max(round(end * _US, 3) - ts, 1.0), "pid": pid, "tid": tid,
            "args": args}


def timeline(filename: str | os.PathLike | None = None) -> list[dict]:
    """Task spans of the cluster as Chrome trace events, newest history.

    Reads the head's bounded history of finished tasks (the last 10,000)
    and its running tasks, and returns a list of complete events
    (``"ph": "X"``; ``ts`` and ``dur`` in microseconds; ``pid`` = node name;
    ``tid`` = worker process id; ``name`` = task name; ``args`` = task id,
    state, attempt, ...).  With ``filename``, also writes
    ``{"traceEvents": [...]}`` there, for https://ui.perfetto.dev or
    ``chrome://tracing``.
    """
    if filename is not None and not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f"timeline(filename=...) must be a path (str or os.PathLike), got "
                        f"{type(filename).__name__}")
    client = require_client()
    history = client.query("history")
    running = client.query("list_tasks", state="RUNNING")
    node_names = {n["node_id"]: n.get("name") or n["node_id"] for n in client.query("list_nodes")}
    actor_pids = {a["actor_id"]: a.get("pid") for a in client.query("list_actors")}
    events = trace_events(history, running, node_names, actor_pids, time.time())
    if filename is not None:
        with open(os.fspath(filename), "w", encoding="utf-8") as out:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, out)
    return events
