"""Why is this ref not ready?  Answered from the head's tables and its
event log, in plain words and as data (``flowcore.explain``)."""
from __future__ import annotations

import time
from typing import Any

from .. import ids
from .states import TaskState
from .records import ObjectState

S = TaskState


def _fmt_res(res: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items())) or "nothing"


def explain(state: Any, oid: bytes, depth: int = 1) -> dict:
    """A dict with ``state``, ``text`` (one paragraph), ``task`` details and the
    newest ``events`` of the producing task."""
    obj = state.objects.get(oid)
    out: dict[str, Any] = {"object_id": oid.hex()}
    if obj is None:
        out.update(state="UNKNOWN", text=(
            f"object {oid.hex()} is unknown to the head: every reference to it was dropped "
            f"(so it was freed) or it never existed"))
        return out
    if obj.state == ObjectState.READY:
        where = "inline" if obj.inline is not None else f"on node(s) {sorted(obj.nodes)}"
        out.update(state="READY", text=(
            f"ready ({'holds an error' if obj.error else 'a value'}, {obj.size} bytes, {where})"))
        return out
    if obj.state == ObjectState.LOST:
        out.update(state="LOST", text="lost: every copy was on nodes that died")
        return out
    t = state.tasks.get(ids.task_of(oid))
    pg = getattr(state, "pgs", {}).get(ids.task_of(oid))
    if t is None and pg is not None:  # the ready() ref of a placement group
        out.update(state="PENDING", placement_group=pg.as_dict(), text=(
            f"placement group {pg.name or pg.pgid.hex()} ({pg.strategy}, bundles "
            f"{[b.total for b in pg.bundles]}) is {pg.state}: {pg.cause}"))
        return out
    if t is None:
        out.update(state="PENDING", text="pending, but the task that makes it is not known")
        return out
    now = time.time()
    task = {"task_id": t.tid.hex(), "name": t.name, "state": str(t.state), "kind": t.kind,
            "attempt": t.attempt, "node_id": t.node, "owner": t.owner,
            "resources": dict(t.res), "cause": t.cause}
    out["task"] = task
    out["events"] = state.log.for_task(t.tid)[-8:]
    owner_gone = t.owner not in state.clients
    lines = []
    if t.state == S.WAITING_FOR_ARGS:
        parts = []
        for dep in sorted(t.missing):
            sub: dict[str, Any] = explain(state, dep, depth - 1) if depth > 0 \
                else {"state": "PENDING"}
            producer = state.tasks.get(ids.task_of(dep))
            pname = producer.name if producer is not None else "?"
            sub_state = sub.get("task", {}).get("state", sub["state"])
            parts.append(f"{dep.hex()[:12]} (from task {pname}, {sub_state})")
        out["waiting_for"] = [d.hex() for d in sorted(t.missing)]
        lines.append(f"task {t.name} is waiting for {len(t.missing)} argument(s): "
                     + "; ".join(parts))
    elif t.state == S.QUEUED and t.kind == "call":
        actor = state.actors.get(t.actor)
        astate = actor.state if actor is not None else "unknown"
        lines.append(f"actor call {t.name} is queued: the actor is {astate}"
                     + ("" if astate != "ALIVE" else " and earlier calls from the same caller "
                        "come first") + _actor_waits_for(state, actor))
    elif t.state == S.QUEUED:
        alive = [n for n in state.nodes.values() if n.alive]
        could = [n.name for n in alive if n.could_ever_fit(t.res)]
        free = [n.name for n in alive if n.fits(t.res)]
        owner_node = _at_owner(state, t)
        if owner_node is not None:
            node = state.nodes.get(owner_node)
            where = (f"; it waits in its owner's queue ({t.owner}) for a worker the owner "
                     f"leases from node {node.name if node else owner_node}, and goes to the "
                     f"first of them that is free (when an earlier task of that owner ends)")
            out["queued_at_owner"] = owner_node
        else:
            where = "" if free else "; it runs when running tasks finish"
        lines.append(f"task {t.name} is queued for resources ({_fmt_res(t.res)}): "
                     f"{len(could)} of {len(alive)} node(s) could ever run it, "
                     f"{len(free)} have them free right now" + where)
        out["nodes_that_fit"] = could
    elif t.state == S.INFEASIBLE:
        lines.append(f"task {t.name} is infeasible: {t.cause}. The cluster has "
                     f"{_fmt_res(state.cluster_resources())}; it will run when a node that "
                     f"fits joins")
    elif t.state == S.RUNNING and t.ahead and not t.worker:
        node = state.nodes.get(t.node or "")
        lines.append(f"task {t.name} was sent ahead to node {node.name if node else t.node}, "
                     f"queued there until a running task frees its resources "
                     f"({_fmt_res(t.res)}); it may have started since")
    elif t.state == S.RUNNING:
        node = state.nodes.get(t.node or "")
        since = now - t.started if t.started else 0.0
        where = node.name if node else t.node
        leased = getattr(state, "leases", None)
        if leased is not None and leased.on_lease(t) is not None:
            where = f"{where} (on a worker leased by its submitter)"
        lines.append(f"task {t.name} is running on node {where} for {since:.1f} s "
                     f"(attempt {t.attempt}"
                     + (f", pid {t.worker['pid']}" if t.worker else "") + ")"
                     + (" — blocked in get() inside the task" if t.blocked else ""))
    elif t.state == S.LOST:
        lines.append(f"task {t.name}'s result was lost and is being rebuilt")
    else:
        lines.append(f"task {t.name} is {t.state}")
    if owner_gone:
        lines.append("the driver or task that submitted it has disconnected")
    out.update(state=str(t.state), text="; ".join(lines))
    return out


def _at_owner(state: Any, t: Any) -> str | None:
    """The node whose leased workers ``t`` waits for in its owner's queue."""
    leases = getattr(state, "leases", None)
    return leases.at_owner(t) if leases is not None else None


def _actor_waits_for(state: Any, actor: Any) -> str:
    """What a PENDING or RESTARTING actor waits for (its creation's placement)."""
    if actor is None or actor.state not in ("PENDING", "RESTARTING"):
        return ""
    why = f" ({actor.cause})" if actor.state == "RESTARTING" and actor.cause else ""
    create = state.tasks.get(actor.create_tid)
    if create is None or create.state is None:
        return why
    res = _fmt_res(create.res)
    if create.state == S.INFEASIBLE:
        return (f"{why}; it waits for a node that can hold {res} to join (no node in the "
                f"cluster could)")
    if create.state == S.QUEUED:
        return f"{why}; it waits for a node with {res} free"
    if create.state == S.WAITING_FOR_ARGS:
        return f"{why}; its constructor waits for {len(create.missing)} argument(s)"
    if create.state == S.RUNNING:
        node = state.nodes.get(create.node or "")
        return f"{why}; it is starting on node {node.name if node else create.node}"
    return why
