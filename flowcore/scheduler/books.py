"""The head's books, checked: the invariants ``SchedulerState`` keeps after
every message, for its ``validate`` mode (on in the tests).

* resources per node add up: what a node has in use (total - available)
  equals what its running tasks, its actors' holds and the placement-group
  bundles reserved on it take;
* every RUNNING task placed on a live node is in that node's running set,
  and a node's running set holds only RUNNING tasks;
* reference counts are never negative;
* no READY object is without a holder (inline at the head, or a node);
* the placement index agrees with a full scan of the nodes (for the
  requests queued now and a one-CPU task).

``check_books(state)`` returns the problems found (empty when the books are
right); ``stuck_problem(state, task)`` checks a queue the head skipped as
stuck.  They read the tables only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import ids
from .records import READY, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState
EPS = 1e-6


def check_books(s: "SchedulerState") -> list[str]:
    problems: list[str] = []
    used: dict[str, dict[str, float]] = {nid: {} for nid in s.nodes}

    def add(nid: str, res: dict[str, float], skip_cpu: bool = False) -> None:
        u = used[nid]
        for k, v in res.items():
            if v and not (skip_cpu and k == "CPU"):
                u[k] = u.get(k, 0.0) + v

    for nid, node in s.nodes.items():
        for tid in node.running:
            t = s.tasks.get(tid)
            if t is None or t.state != S.RUNNING:
                problems.append(f"node {nid} lists task {tid.hex()} as running, but it is "
                                f"{'unknown' if t is None else t.state}")
                continue
            if s._account(node, t.bundle) is node:
                add(nid, t.res, skip_cpu=t.blocked)
    for t in s.tasks.values():
        if t.state == S.RUNNING and t.kind != "call" and t.node in s.nodes \
                and s.nodes[t.node].alive and t.tid not in s.nodes[t.node].running:
            problems.append(f"task {t.name} ({t.tid.hex()}) is RUNNING on node {t.node} "
                            f"but not in its running set")
    for a in s.actors.values():
        if a.holding and a.node in used:
            if s._account(s.nodes[a.node], a.bundle) is s.nodes[a.node]:
                add(a.node, a.hold)
    for pg in s.pgs.values():
        if pg.state == "REMOVED":
            continue
        for b in pg.bundles:
            if b.node in used:
                add(b.node, b.total)
    for nid, node in s.nodes.items():
        if not node.alive:
            continue
        keys = set(node.total) | set(node.available) | set(used[nid])
        for k in keys:
            in_use = node.total.get(k, 0.0) - node.available.get(k, 0.0)
            if abs(in_use - used[nid].get(k, 0.0)) > EPS:
                problems.append(f"node {nid}: {in_use:g} {k} in use, but its running tasks, "
                                f"actors and bundles take {used[nid].get(k, 0.0):g}")
    for obj in s.objects.values():
        if obj.holds < 0:
            problems.append(f"object {obj.oid.hex()} has {obj.holds} holds")
        if obj.state == READY and obj.inline is None and not obj.nodes \
                and ids.index_of(obj.oid) != ids.HANDLE_INDEX:
            problems.append(f"object {obj.oid.hex()} is READY but nothing holds it")
    requests = [{"CPU": 1.0}] + [dict(shape[0]) for shape in s.queues]
    problems.extend(s.placement.check(requests, s.pipeline_depth))
    return problems


def stuck_problem(s: "SchedulerState", t: Any) -> str | None:
    """A queue skipped as stuck really has no node for its first task ``t``
    (a full scan of the live nodes): None, or what is wrong."""
    alive = list(s.placement.alive())
    fitting = [n for n in alive if n.fits(t.res)]
    ahead = []
    if t.strategy is None and s.pipeline_depth > 0 and t.kind != "create" \
            and all(k == "CPU" for k in t.res):
        ahead = [n for n in alive if n.total.get("CPU", 0.0) > 0 and n.could_ever_fit(t.res)
                 and len(n.running) / n.total["CPU"] < 1.0 + s.pipeline_depth]
    if fitting or ahead:
        return (f"the queue of task {t.name} was skipped as stuck, but nodes "
                f"{[n.node_id for n in fitting or ahead]} can take it")
    return None
