"""Placement groups in the head's state machine (a component of ``SchedulerState``).

A placement group is a list of *bundles* (resource dicts) reserved together
on the cluster's nodes.  Reservation is atomic: a plan for every bundle is
made on a copy of the nodes' free resources and applied only when it is
complete, so a group that does not fit leaves the nodes untouched.  Until
then the group is PENDING and is tried again whenever the nodes' free
resources change (a node joins, work finishes).

Strategies: ``PACK`` (one node if possible, else as few as possible),
``SPREAD`` (distinct nodes if possible, soft), ``STRICT_PACK`` (all on one
node, or wait), ``STRICT_SPREAD`` (each bundle on its own node, or wait).

A reserved bundle is taken out of its node's available resources; tasks and
actors scheduled into it consume the *bundle's* resources instead (see
``_account``).  The node is told of each reservation (``reserve_bundle``) so
its pool accounts the same way.  Removing a group kills the actors and
cancels the tasks in it and gives the bundles back; a node's death sends its
bundles back to be placed again.
"""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from ..exceptions import PlacementGroupError
from ..objects.serialization import serialize
from ..protocol import messages as wire
from ..resources import Resources
from ..placement_group_handle import STRATEGIES, PlacementGroup, check_bundles  # noqa: F401
from .states import TaskState
from .records import ObjectState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState
PG_PENDING, PG_CREATED, PG_RESCHEDULING, PG_REMOVED = (
    "PENDING", "CREATED", "RESCHEDULING", "REMOVED")
#: backtracking steps STRICT_SPREAD may spend on one plan before giving up
_SEARCH_LIMIT = 20_000


def _size(res: Mapping[str, float]) -> tuple:
    return (res.get("GPU", 0.0), res.get("CPU", 0.0), sum(res.values()))


def plan(strategy: str, bundles: Sequence[Mapping[str, float]], fixed: dict[int, str],
         free_now: Mapping[str, Mapping[str, float]]) -> dict[int, str] | None:
    """Choose a node for every bundle not in ``fixed`` (index -> node id,
    already placed), given each candidate node's ``free`` resources; None if
    the strategy cannot be met.  Pure: ``free`` is not modified."""
    free = {n: Resources(av) for n, av in free_now.items()}
    todo = sorted((i for i in range(len(bundles)) if i not in fixed),
                  key=lambda i: _size(bundles[i]), reverse=True)
    out: dict[int, str] = {}
    if strategy in ("STRICT_PACK", "PACK"):
        placed = set(fixed.values())
        candidates = sorted(placed) if placed else sorted(
            free, key=lambda n: free[n].get("CPU", 0.0), reverse=True)
        need = Resources()
        for i in todo:
            need.give(bundles[i])
        for n in candidates:
            if n in free and free[n].fits(need):
                return {i: n for i in todo}
        if strategy == "STRICT_PACK":
            return None
        for i in todo:  # PACK: as few nodes as possible, greedily
            used = placed | set(out.values())
            order = sorted(free, key=lambda n: (n not in used, -free[n].get("CPU", 0.0)))
            pick = next((n for n in order if free[n].fits(bundles[i])), None)
            if pick is None:
                return None
            out[i] = pick
            free[pick].take(bundles[i])
        return out
    if strategy == "SPREAD":
        count: dict[str, int] = {}
        for n in fixed.values():
            count[n] = count.get(n, 0) + 1
        for i in todo:
            order = sorted(free, key=lambda n: (count.get(n, 0), -free[n].get("CPU", 0.0)))
            pick = next((n for n in order if free[n].fits(bundles[i])), None)
            if pick is None:
                return None
            out[i] = pick
            count[pick] = count.get(pick, 0) + 1
            free[pick].take(bundles[i])
        return out
    # STRICT_SPREAD: a distinct node per bundle, by backtracking (bounded)
    taken = set(fixed.values())
    steps = [0]

    def search(k: int) -> bool:
        if k == len(todo):
            return True
        i = todo[k]
        for n in sorted(free, key=lambda n: -free[n].get("CPU", 0.0)):
            steps[0] += 1
            if steps[0] > _SEARCH_LIMIT:
                return False
            if n in taken or not free[n].fits(bundles[i]):
                continue
            taken.add(n)
            out[i] = n
            if search(k + 1):
                return True
            taken.discard(n)
            del out[i]
        return False
    return out if search(0) else None


class Bundle:
    """One bundle: its resources, where it is reserved and what is free in it.
    Has the ``fits``/``take``/``give`` of a node, so tasks account against it."""
    __slots__ = ("index", "total", "available", "node")

    def __init__(self, index: int, res: dict[str, float]):
        self.index = index
        self.total = Resources({k: float(v) for k, v in res.items() if v})
        self.available = Resources(self.total)
        self.node: str | None = None

    def fits(self, res: Mapping[str, float]) -> bool:
        return self.available.fits(res)

    def take(self, res: Mapping[str, float]) -> None:
        self.available.take(res)

    def give(self, res: Mapping[str, float]) -> None:
        self.available.give(res)


class PlacementGroupRecord:
    def __init__(self, msg: dict, owner: str):
        self.pgid: bytes = msg["pgid"]
        self.name: str = msg.get("name") or ""
        self.strategy: str = msg["strategy"]
        self.detached = msg.get("lifetime") == "detached"
        self.owner = owner
        self.bundles = [Bundle(i, b) for i, b in enumerate(msg["bundles"])]
        self.state = PG_PENDING
        self.cause = "waiting for resources"
        self.feasible = True
        self.warned = False
        self.created = time.time()
        self.placed_at: float | None = None
        self.tried: Any = None  # the nodes' free resources at the last failed try

    def key(self, index: int) -> str:
        return f"{self.pgid.hex()}:{index}"

    def ready_oid(self) -> bytes:
        return self.pgid + (0).to_bytes(4, "big")

    def as_dict(self) -> dict:
        return {"placement_group_id": self.pgid.hex(), "name": self.name,
                "strategy": self.strategy, "state": self.state, "detached": self.detached,
                "owner": self.owner, "cause": self.cause, "feasible": self.feasible,
                "bundles": [dict(b.total) for b in self.bundles],
                "bundles_to_node_id": {b.index: b.node for b in self.bundles},
                "bundles_available": [dict(b.available) for b in self.bundles],
                "created": self.created, "placed": self.placed_at}

    def describe(self) -> dict:
        return {"pgid": self.pgid, "bundles": [dict(b.total) for b in self.bundles],
                "strategy": self.strategy, "name": self.name}


def ready_payload(pg: PlacementGroupRecord) -> bytes:
    """The value of ``pg.ready()``: the group itself, as the driver sees it."""
    d = pg.describe()
    return serialize(PlacementGroup(d["pgid"], d["bundles"], d["strategy"], d["name"])).to_bytes()


class PlacementGroups:

    """A component of ``SchedulerState``: owns the placement-group table,
    the names, the groups waiting to be placed and the removed ones kept for
    views; registers ``create_placement_group`` / ``remove_placement_group``."""

    keep_removed_groups = 1000

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.pgs: dict[bytes, PlacementGroupRecord] = {}
        self.pg_names: dict[str, bytes] = {}
        self._pg_removed: deque[bytes] = deque()
        self.pg_waiting: set[bytes] = set()  # PENDING or RESCHEDULING groups

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"create_placement_group": self.handle_create_placement_group,
                "remove_placement_group": self.handle_remove_placement_group}

    # ------------------------------------------------------------ creation
    def handle_create_placement_group(self, source: str, msg: dict) -> None:
        def reply(**kw: Any) -> None:
            self.s._send(source, wire.reply(msg.get("rid"), **kw))
        problem = check_bundles(msg.get("bundles"), msg.get("strategy"))
        name = msg.get("name") or ""
        if problem is None and name and name in self.pg_names:
            problem = (f"a placement group named {name!r} already exists; use "
                       f"flowcore.get_placement_group({name!r}) or remove it first")
        if problem is None and msg["pgid"] in self.pgs:
            problem = "a placement group with this id already exists"
        if problem is not None:
            reply(ok=False, error=problem)
            return
        pg = PlacementGroupRecord(msg, source)
        self.pgs[pg.pgid] = pg
        self.pg_waiting.add(pg.pgid)
        if name:
            self.pg_names[name] = pg.pgid
        ready = self.s._obj(pg.ready_oid(), source)
        ready.holds += 1  # held by the group: any number of ready() refs come and go
        reply(ok=True)
        self._try_place(pg)

    # ------------------------------------------------------------ placement
    def place_pending(self) -> None:
        for pgid in sorted(self.pg_waiting, key=lambda g: self.pgs[g].created):
            self._try_place(self.pgs[pgid])

    def _try_place(self, pg: PlacementGroupRecord) -> None:
        nodes = [n for n in self.s.nodes.values() if n.alive]
        seen = tuple((n.node_id, tuple(sorted(n.available.items()))) for n in nodes)
        if seen == pg.tried:
            return  # nothing changed since the last try
        fixed = {b.index: b.node for b in pg.bundles if b.node is not None}
        totals = [b.total for b in pg.bundles]
        chosen = plan(pg.strategy, totals, fixed, {n.node_id: n.available for n in nodes})
        if chosen is None:
            pg.tried = seen
            ever = plan(pg.strategy, totals, {}, {n.node_id: n.total for n in nodes})
            pg.feasible = ever is not None
            if pg.feasible:
                pg.cause = "waiting for resources: the free resources of the nodes do not " \
                           "fit its bundles now"
            else:
                short = sorted({k for b in totals for k, v in b.items()
                                if v and not any(n.could_ever_fit({k: v}) for n in nodes)})
                lack = f" (no node has enough {', '.join(short)})" if short else ""
                pg.cause = (f"infeasible: no set of current nodes could ever fit its bundles "
                            f"{[dict(b) for b in totals]} with strategy {pg.strategy}{lack}; it stays pending "
                            f"until nodes that fit join")
                if not pg.warned and nodes:
                    pg.warned = True
                    text = f"placement group {pg.name or pg.pgid.hex()[:12]} is {pg.cause}"
                    self.s.warnings.append(text)
                    self.s._send(pg.owner, wire.warning(text))
            return
        for i, nid in chosen.items():
            node = self.s.nodes[nid]
            b = pg.bundles[i]
            node.take(b.total)
            b.node = nid
            b.available = Resources(b.total)
            self.s._send(nid, wire.reserve_bundle(pg.key(i), dict(b.total)))
        pg.state, pg.feasible, pg.tried = PG_CREATED, True, None
        self.pg_waiting.discard(pg.pgid)
        pg.cause = "all bundles reserved"
        pg.placed_at = time.time()
        ready = self.s.objects.get(pg.ready_oid())
        if ready is not None and ready.state == ObjectState.PENDING:
            data = ready_payload(pg)
            self.s._seal(ready, {"inline": data, "size": len(data)})

    # ------------------------------------------------------------ tasks in bundles
    def _pg_of(self, t: Any) -> PlacementGroupRecord | None:
        return self.pgs.get(t.strategy[1])

    def reject(self, t: Any) -> bool:
        """Fail a task (or actor) scheduled into a group that is gone or whose
        bundles could never hold it; True if it was failed."""
        pg = self._pg_of(t)
        index = t.strategy[2]
        why = None
        if pg is None or pg.state == PG_REMOVED:
            why = f"placement group {t.strategy[1].hex()} was removed (or never existed)"
        elif index >= len(pg.bundles) or index < -1:
            why = (f"placement_group_bundle_index={index} is out of range: the group has "
                   f"{len(pg.bundles)} bundle(s) (use 0..{len(pg.bundles) - 1}, or -1 for any)")
        else:
            cands = pg.bundles if index == -1 else [pg.bundles[index]]
            if not any(b.total.fits(t.res) for b in cands):
                where = "any bundle" if index == -1 else f"bundle {index}"
                why = (f"it asks for {t.res}, more than {where} of placement group "
                       f"{pg.pgid.hex()[:12]} holds ({[b.total for b in cands]})")
        if why is None:
            return False
        err = PlacementGroupError(f"{t.name} cannot be scheduled: {why}")
        if t.kind == "create":
            actor = self.s.actors.get(t.actor)
            if actor is not None:
                self.s.actor_manager.dead(actor, f"it cannot be scheduled: {why}",
                                          payload=self.s.error_payload(err))
                return True
        self.s.failures.fail_task(t, self.s.error_payload(err), why)
        return True

    def choose_node(self, t: Any) -> Any:
        """The node of a bundle of ``t``'s group with room for it now (and
        remember the bundle in ``t.bundle``), or None to wait."""
        pg = self._pg_of(t)
        if pg is None or pg.state != PG_CREATED:
            return None
        index = t.strategy[2]
        for b in (pg.bundles if index == -1 else pg.bundles[index:index + 1]):
            node = self.s.nodes.get(b.node or "")
            if node is not None and node.alive and b.fits(t.res):
                t.bundle = pg.key(b.index)
                return node
        return None

    def bundle(self, key: str | None) -> Bundle | None:
        if not key:
            return None
        pgid, _, index = key.partition(":")
        pg = self.pgs.get(bytes.fromhex(pgid))
        if pg is None or pg.state == PG_REMOVED:
            return None
        return pg.bundles[int(index)]

    def account(self, node: Any, key: str | None) -> Any:
        """What a task's or actor's resources are counted against on ``node``:
        its bundle while the bundle is reserved there, else the node."""
        b = self.bundle(key)
        if b is not None and node is not None and b.node == node.node_id:
            return b
        return node

    def bundle_fields(self, t: Any) -> dict:
        """Extra ``run_task`` fields of a task in a bundle: the bundle, for the
        node's accounting, and the group if child tasks are captured."""
        if not t.bundle:
            return {}
        out: dict[str, Any] = {"bundle": t.bundle}
        if t.strategy[3]:
            out["pg_capture"] = t.strategy[1]
        return out

    # ------------------------------------------------------------ removal
    def handle_remove_placement_group(self, source: str, msg: dict) -> None:
        pg = self.pgs.get(msg["pgid"])
        killed: list[bytes] = []
        if pg is not None and pg.state != PG_REMOVED:
            killed = self._remove_group(pg, "its placement group was removed")
        # the caller sends its later calls to these through the head (which
        # fails them), not straight to a process the kill has not reached yet
        self.s._send(source, wire.reply(msg.get("rid"), ok=True, actors=killed))

    def _in_group(self, strategy: Any, pgid: bytes) -> bool:
        return isinstance(strategy, tuple) and len(strategy) > 1 and strategy[0] == "pg" \
            and strategy[1] == pgid

    def _remove_group(self, pg: PlacementGroupRecord, cause: str) -> list[bytes]:
        """Remove ``pg``: its actors die, its tasks are cancelled, its
        bundles freed; returns the ids of the actors it killed."""
        killed: list[bytes] = []
        # actors first (their creation tasks are in the task table too)
        for actor in list(self.s.actors.values()):
            create = self.s.tasks.get(actor.create_tid)
            in_pg = (actor.bundle or "").startswith(pg.pgid.hex()) or (
                create is not None and self._in_group(create.strategy, pg.pgid))
            if in_pg and actor.state != "DEAD":
                actor.no_restart = True
                if actor.node:
                    self.s._send(actor.node, wire.kill_actor(actor.aid))
                self.s.actor_manager.dead(actor, cause)
                killed.append(actor.aid)
        for t in list(self.s.tasks.values()):
            if t.state is None or t.state.done or t.kind != "task" \
                    or not self._in_group(t.strategy, pg.pgid):
                continue
            if t.state == S.RUNNING:
                self.s.failures.force_cancelled.add(t.tid)
                self.s._send(t.node, wire.cancel_task(t.tid, True))
            else:
                self.s.infeasible.discard(t.tid)
                self.s.failures.cancel_task(t, cause)
        self._release_bundles(pg, pg.bundles)
        pg.state = PG_REMOVED
        pg.cause = "removed"
        self.pg_waiting.discard(pg.pgid)
        if pg.name and self.pg_names.get(pg.name) == pg.pgid:
            del self.pg_names[pg.name]
        ready = self.s.objects.get(pg.ready_oid())
        if ready is not None:
            if ready.state == ObjectState.PENDING:
                err = PlacementGroupError(
                    f"placement group {pg.name or pg.pgid.hex()} was removed before all its "
                    f"bundles were reserved")
                data = self.s.error_payload(err)
                sealed = {"inline": data, "size": len(data), "error": True}
                self.s._seal(ready, sealed)
            ready.holds -= 1
            self.s._maybe_free(ready)
        self._pg_removed.append(pg.pgid)
        while len(self._pg_removed) > self.keep_removed_groups:
            self.pgs.pop(self._pg_removed.popleft(), None)
        return killed

    def _release_bundles(self, pg: PlacementGroupRecord, bundles: Iterable[Bundle]) -> None:
        """Give reserved bundles back to their nodes: what is free in them now
        (running work gives the rest back to the node when it ends)."""
        for b in bundles:
            node = self.s.nodes.get(b.node or "")
            if node is not None:
                node.give({k: max(v, 0.0) for k, v in b.available.items()})
                self.s._send(node.node_id, wire.release_bundle(pg.key(b.index)))
            b.node = None
            b.available = Resources(b.total)

    def remove_owned(self, cid: str) -> None:
        for pg in list(self.pgs.values()):
            if pg.owner == cid and not pg.detached and pg.state != PG_REMOVED:
                self._remove_group(pg, "the driver that created its placement group exited")

    def node_died(self, node_id: str) -> None:
        """Bundles on a dead node go back to be placed again (the others stay)."""
        for pg in self.pgs.values():
            lost = [b for b in pg.bundles if b.node == node_id]
            if not lost or pg.state == PG_REMOVED:
                continue
            for b in lost:
                b.node = None
                b.available = Resources(b.total)
            pg.state, pg.tried = PG_RESCHEDULING, None
            self.pg_waiting.add(pg.pgid)
            pg.cause = f"node {node_id} died; its {len(lost)} bundle(s) are placed again"

    # ------------------------------------------------------------ queries
    def list_placement_groups(self, state: str | None = None) -> list[dict]:
        return [pg.as_dict() for pg in self.pgs.values() if state is None or pg.state == state]

    def get_placement_group(self, name: str | None = None,
                            pgid: bytes | None = None) -> dict | None:
        if pgid is None:
            pgid = self.pg_names.get(name or "")
        pg = self.pgs.get(pgid) if pgid is not None else None
        if pg is None or pg.state == PG_REMOVED:
            return None
        return pg.describe()
