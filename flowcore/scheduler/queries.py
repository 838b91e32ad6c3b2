"""Read-only views of the head's tables (``SchedulerState.list_tasks``
and friends, as the server's views and ``flowcore.state`` read them)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .history import history_rows

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState


def cluster_resources(s: "SchedulerState") -> dict[str, float]:
    tot: dict[str, float] = {}
    for n in s.nodes.values():
        if n.alive:
            for k, v in n.total.items():
                tot[k] = tot.get(k, 0.0) + v
    return tot


def available_resources(s: "SchedulerState") -> dict[str, float]:
    av: dict[str, float] = {}
    for n in s.nodes.values():
        if n.alive:
            for k, v in n.available.items():
                av[k] = av.get(k, 0.0) + max(v, 0.0)
    return av


def list_tasks(s: "SchedulerState", state: str | None = None, limit: int = 10_000) -> list[dict]:
    """Task rows: the tasks the head still tracks, then finished tasks
    already pruned (their refs dropped), newest first, from the bounded
    history, in the same columns."""
    out = []
    for t in s.tasks.values():
        if state is None or str(t.state) == state:
            out.append(t.as_dict())
            if len(out) >= limit:
                return out
    seen = {row["task_id"] for row in out}
    return out + history_rows(s.history, s.tasks, state, limit - len(out), seen)


def list_objects(s: "SchedulerState", limit: int = 10_000) -> list[dict]:
    return [o.as_dict() for _, o in zip(range(limit), s.objects.values())]


def list_nodes(s: "SchedulerState") -> list[dict]:
    return [n.as_dict() for n in s.nodes.values()] + list(s.membership.dead_nodes.values())


def task_info(s: "SchedulerState", tid: bytes) -> dict | None:
    t = s.tasks.get(tid)
    if t is None:
        return None
    d = t.as_dict()
    d["events"] = s.log.for_task(tid)
    return d
