"""Head restart: a component of the head's state machine (``RecoveryManager``; no IO).

The head keeps its *small tables* — registered functions, named and
detached actors with their creation spec, jobs (the drivers) and the node
table — in its state directory (``persist.py`` does the file IO).  After a
restart with the same state directory it loads them (``restore_tables``)
and enters *recovery*:

* restored actors are ``RECOVERING``: a node that re-registers reports the
  actors alive in its processes, and those are adopted as they are (same
  process, same state); the actor's process reconnects as a client and calls
  go to it again;
* a node that re-registers reports the sealed objects in its store; they
  become READY objects held by the recovery until it ends;
* a client (driver or worker) that reconnects names its previous client id
  and reports the refs it holds, the small values it already received, and
  its own tasks that had not finished.  Those tasks are not re-run: their
  results fail with an ``ObjectLostError`` (reason ``"head_restart"``).

Recovery ends when every node and driver of the persisted tables is back,
or when the server's recovery window passes (``finish_recovery``): objects
still not found fail with ``ObjectLostError``, restored actors no node
reported are restarted from their spec when ``max_restarts`` allows (dead
otherwise), non-detached actors whose driver did not come back are killed,
and recovered objects nobody claimed are freed.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import ids
from ..exceptions import ObjectLostError
from ..protocol import messages as wire
from .actors import ALIVE, DEAD, ActorRecord
from .records import NodeRecord, ObjectRecord, ObjectState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

RECOVERING = "RECOVERING"
logger = logging.getLogger("flowcore.scheduler")

#: the creation-spec fields of an actor kept across a head restart
_SPEC_FIELDS = ("aid", "class_name", "fid", "methods", "actor_name", "namespace", "detached",
                "max_restarts", "max_task_retries", "max_concurrency", "is_async", "hold",
                "tid", "args", "args_dep", "deps", "nested", "place", "renv")


def actor_spec(a: ActorRecord) -> dict:
    """What is persisted of an actor: its creation spec and where it ran."""
    return {"aid": a.aid, "class_name": a.class_name, "fid": a.fid, "methods": a.methods,
            "actor_name": a.name, "namespace": a.namespace, "detached": a.detached,
            "max_restarts": a.max_restarts, "max_task_retries": a.max_task_retries,
            "max_concurrency": a.max_concurrency, "is_async": a.is_async, "hold": a.hold,
            "tid": a.create_tid, "args": a.args, "args_dep": a.args_dep, "deps": a.deps,
            "nested": a.nested, "place": a.place, "renv": a.renv,
            "owner": a.owner, "restarts": a.restarts, "node": a.node,
            "pid": a.pid, "created": a.created}


class Recovery:
    """What a restarted head still waits for."""

    def __init__(self, nodes: dict[str, dict], drivers: dict[str, dict]):
        self.nodes = nodes        # node id -> persisted record, until it re-registers
        self.drivers = drivers    # old client id -> persisted job, until it reconnects
        self.awaited: set[bytes] = set()  # objects someone needs that no node reported yet
        self.held: set[bytes] = set()     # reported objects, held until recovery ends
        self.actors: set[bytes] = set()   # adopted actors whose process has not reconnected

    def complete(self) -> bool:
        # adopted actors' processes count too: refs they hold must not be freed
        return not self.nodes and not self.drivers and not self.actors


class RecoveryManager:
    """Owns what a restarted head still waits for (``recovery``, None when
    not recovering): persists the small tables, restores them, re-adopts
    what nodes and clients report, and settles the rest when recovery ends."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.recovery: Recovery | None = None

    # ------------------------------------------------------------ persisting
    def persistent_tables(self) -> dict[str, Any]:
        """The small tables as plain data (msgpack-able): nodes, actors (named
        or detached, not dead), jobs.  Functions are persisted one by one."""
        rec = self.recovery
        nodes = {n.node_id: {"node_id": n.node_id, "name": n.name, "address": n.address,
                             "hostname": n.hostname, "pid": n.pid}
                 for n in self.s.nodes.values() if n.alive}
        jobs = {cid: {"client_id": cid, "pid": info.get("pid"), "started": info.get("started")}
                for cid, info in self.s.clients.items()
                if info.get("kind", "driver") == "driver"}
        if rec is not None:  # a second crash during recovery forgets nobody
            for nid, n in rec.nodes.items():
                nodes.setdefault(nid, n)
            for cid, j in rec.drivers.items():
                jobs.setdefault(cid, j)
        actors = [actor_spec(a) for a in self.s.actors.values()
                  if (a.name or a.detached) and a.state != DEAD]
        return {"nodes": sorted(nodes.values(), key=lambda n: n["node_id"]),
                "actors": actors,
                "jobs": sorted(jobs.values(), key=lambda j: j["client_id"])}

    def restore_tables(self, tables: dict[str, Any], functions: dict[bytes, dict]) -> None:
        """Load what a previous head persisted and start recovery."""
        self.s.functions.update(functions)
        self.recovery = Recovery({n["node_id"]: n for n in tables.get("nodes") or []},
                                 {j["client_id"]: j for j in tables.get("jobs") or []})
        for spec in tables.get("actors") or []:
            a = ActorRecord({k: spec.get(k) for k in _SPEC_FIELDS if spec.get(k) is not None},
                            spec.get("owner") or "")
            a.restarts = spec.get("restarts") or 0
            a.node = spec.get("node")
            a.pid = spec.get("pid")
            a.created = spec.get("created") or a.created
            a.state = RECOVERING
            a.client = None  # its process reconnects with a new client id
            a.cause = "the head restarted; waiting for its node to report it"
            self.s.actors[a.aid] = a
            if a.name:
                self.s.actor_manager.named[(a.namespace, a.name)] = a.aid
            handle = self.s._obj(ids.actor_handle_id(a.aid), None)
            handle.state = ObjectState.READY
            for oid in a.deps + a.nested:
                self._await_object(oid)
            self.s._hold(a.deps + a.nested)
        logger.info("restored %d actor(s), %d function(s), %d node(s) and %d job(s) to wait for",
                    len(tables.get("actors") or []), len(functions), len(self.recovery.nodes),
                    len(self.recovery.drivers))

    def _await_object(self, oid: bytes) -> ObjectRecord | None:
        """The record of ``oid``; during recovery, an unknown object gets a
        PENDING record that a node may still report.  None if unknown and
        not recovering."""
        obj = self.s.objects.get(oid)
        if obj is not None:
            return obj
        handle = ids.index_of(oid) == ids.HANDLE_INDEX \
            and ids.task_of(oid) in self.s.actors
        if self.recovery is None and not handle:
            return None
        obj = self.s._obj(oid, None)
        if handle:
            obj.state = ObjectState.READY  # an actor handle: always ready
        elif self.recovery is not None:
            self.recovery.awaited.add(oid)
        return obj

    # ------------------------------------------------------------ re-registration
    def node_rejoined(self, node: NodeRecord, msg: dict) -> None:
        """``node`` registered, reporting its stored objects and live actors."""
        rec = self.recovery
        nid = node.node_id
        unknown = []
        for oid, size in msg.get("objects") or []:
            obj = self.s.objects.get(oid)
            if obj is None:
                if rec is None:
                    unknown.append(oid)
                    continue
                obj = self.s._obj(oid, None)
                obj.holds += 1
                rec.held.add(oid)
            if obj.state == ObjectState.PENDING and rec is not None \
                    and (oid in rec.awaited or oid in rec.held):
                rec.awaited.discard(oid)
                self.s._seal(obj, {"node": nid, "size": size})
            elif obj.state == ObjectState.READY and obj.inline is None:
                obj.nodes.add(nid)
        if unknown:  # nothing references them any more
            self.s._send(nid, wire.delete_objects(unknown))
        for aid, pid in msg.get("actors") or []:
            a = self.s.actors.get(aid)
            if a is None or a.state == DEAD or (a.state != RECOVERING and a.node != nid):
                self.s._send(nid, wire.kill_actor(aid))
                continue
            if a.state == RECOVERING:
                a.state = ALIVE
                a.node = nid
                a.pid = pid
                a.cause = ""
                if a.hold and not a.holding:
                    node.take(a.hold)
                    a.holding = True
                if rec is not None and a.client is None:
                    rec.actors.add(aid)
                self.s.actor_manager.pump(a)
        if rec is not None:
            rec.nodes.pop(nid, None)
            if rec.complete():
                self.settle("every node, driver and actor is back")

    def client_rejoined(self, cid: str, msg: dict) -> None:
        """A client reconnected after a head restart (``previous_id``): take
        over its refs, values and actors; fail its unfinished tasks."""
        old = msg.get("previous_id")
        actor = msg.get("actor")
        if actor:
            a = self.s.actors.get(actor)
            if a is not None and a.state != DEAD:
                a.client = cid  # calls go to the actor's process again
        rec = self.recovery
        if rec is not None and actor:
            rec.actors.discard(actor)
        if not old:
            if rec is not None and rec.complete():
                self.settle("every node, driver and actor is back")
            return
        for a in self.s.actors.values():
            if a.owner == old:
                a.owner = cid
        refs = self.s.client_refs.setdefault(cid, set())
        for oid in msg.get("refs") or []:
            obj = self._await_object(oid)
            if obj is None:
                continue  # a later get() learns that it is unknown
            obj.clients.add(cid)
            refs.add(oid)
        for oid, data, error in msg.get("values") or []:
            obj = self.s.objects.get(oid)
            if obj is not None and obj.state == ObjectState.PENDING:
                if rec is not None:
                    rec.awaited.discard(oid)
                value = {"inline": data, "size": len(data), "error": error}
                self.s._seal(obj, value)
        why = ("the task that makes it was pending or running when the head restarted; "
               "tasks are not re-run across a head restart: submit it again")
        for oid in msg.get("unfinished") or []:
            obj = self.s.objects.get(oid)
            if obj is None:  # not held any more: the client still waits for it
                payload = self._lost_payload(oid, why)
                self.s._send(cid, wire.object_error(oid, payload))
                continue
            if obj.state != ObjectState.PENDING or ids.task_of(oid) in self.s.tasks:
                continue
            if rec is not None:
                rec.awaited.discard(oid)
            obj.owner = cid
            obj.clients.add(cid)
            refs.add(oid)
            self._lost_in_restart(obj, why)
        for oid in msg.get("subscribed") or []:
            obj = self.s.objects.get(oid)
            if obj is not None and obj.state == ObjectState.PENDING:
                obj.add_waiter(cid)
            elif obj is not None:
                self.s._send(cid, self.s._ready(obj))
        if rec is not None:
            rec.drivers.pop(old, None)
            if rec.complete():
                self.settle("every node, driver and actor is back")

    def _lost_payload(self, oid: bytes, why: str) -> bytes:
        return self.s.error_payload(ObjectLostError(
            f"object {oid.hex()} was lost in a head restart: {why}",
            reason="head_restart", object_id=oid.hex()))

    def _lost_in_restart(self, obj: ObjectRecord, why: str) -> None:
        payload = self._lost_payload(obj.oid, why)
        value = {"inline": payload, "size": len(payload), "error": True}
        self.s._seal(obj, value)
        self.s._maybe_free(obj)

    # ------------------------------------------------------------ the end of recovery
    def finish_recovery(self, why: str) -> list[tuple[str, dict]]:
        """End recovery now (the server's recovery window passed); returns
        the messages to send."""
        self.settle(why)
        self.s.dispatcher.schedule()
        out, self.s.out = self.s.out, []
        return out

    def settle(self, why: str) -> None:
        """End recovery: settle what did not come back."""
        rec = self.recovery
        if rec is None:
            return
        self.recovery = None
        self.s.emit("recovery_done")
        for oid in list(rec.awaited):
            obj = self.s.objects.get(oid)
            if obj is not None and obj.state == ObjectState.PENDING \
                    and ids.task_of(oid) not in self.s.tasks:
                self._lost_in_restart(obj, "no node reported a copy after the restart")
        for a in list(self.s.actors.values()):
            if a.state == RECOVERING:
                node = self.s.nodes.get(a.node or "")
                cause = (f"its process was not found after the head restarted (its node "
                         f"{'is back' if node is not None else 'did not come back'})")
                if a.max_restarts == -1 or a.restarts < a.max_restarts:
                    self.s.actor_manager.restart(a, cause, move=node is None)
                else:
                    self.s.actor_manager.dead(a, cause)
        for a in list(self.s.actors.values()):
            if a.owner in rec.drivers and not a.detached and a.state != DEAD:
                self.s.actor_manager.kill(
                    a, "its driver did not reconnect after the head restarted")
        for oid in rec.held:
            obj = self.s.objects.get(oid)
            if obj is not None:
                obj.holds -= 1
                self.s._maybe_free(obj)
        logger.info("recovery after the head restart ended: %s", why)
