"""Actors: a component of the head's state machine (``ActorManager``).

An actor is a graph node of its own: its creation is a task (so its
constructor arguments are ordinary dependencies and the creation shows in
the event log), and each method call is a task node that depends on its
arguments *and* on the previous call from the same caller: calls from one
caller are dispatched to the actor strictly in submission order, a call
still waiting for its arguments holding back the ones behind it.

Actor states: PENDING (being created) -> ALIVE -> RESTARTING -> ALIVE ...
-> DEAD.  An actor needs its placement resources (1 CPU by default) free on
a node to be placed and holds only the resources it asked for explicitly.
"""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from .. import ids
from ..protocol import messages as wire
from ..exceptions import ActorDiedError, ActorError
from .direct_calls import DirectCalls
from .records import NodeRecord, ObjectState, TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState
PENDING, ALIVE, RESTARTING, DEAD = "PENDING", "ALIVE", "RESTARTING", "DEAD"


class ActorRecord:
    def __init__(self, spec: dict, owner: str):
        self.aid: bytes = spec["aid"]
        self.class_name: str = spec.get("class_name", "?")
        self.fid: bytes = spec["fid"]
        self.owner = owner
        self.methods: dict = spec.get("methods") or {}
        self.name: str | None = spec.get("actor_name")
        self.namespace: str = spec.get("namespace") or "default"
        self.detached = bool(spec.get("detached"))
        self.max_restarts: int = spec.get("max_restarts", 0)
        self.max_task_retries: int = spec.get("max_task_retries", 0)
        self.max_concurrency: int | None = spec.get("max_concurrency")  # None: the default
        self.is_async = bool(spec.get("is_async"))
        self.hold: dict[str, float] = spec.get("hold") or {}
        self.renv: dict | None = spec.get("renv")  # runtime_env descriptor
        self.strategy: Any = spec.get("strategy")  # where it is placed (restarts too)
        # what it needs free to be placed ({} for num_cpus=0 and nothing else)
        place = spec.get("place")
        self.place: dict[str, float] = {"CPU": 1.0} if place is None else place
        self.job: list | None = spec.get("job")  # [job id, namespace] of its creator
        self.groups: dict = spec.get("concurrency_groups") or {}  # name -> max at once
        self.create_tid: bytes = spec["tid"]
        # the constructor's arguments, kept (and their objects held) for restarts
        self.args: bytes | None = spec.get("args")
        self.args_dep: int | None = spec.get("args_dep")
        self.deps: list[bytes] = list(spec.get("deps") or [])
        self.nested: list[bytes] = list(spec.get("nested") or [])
        self.state = PENDING
        self.node: str | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.cause = ""
        self.no_restart = False
        self.queues: dict[str, deque[bytes]] = {}
        self.inflight: set[bytes] = set()
        self.created = time.time()
        self.holding = False
        self.out_of_scope = False
        self.client: str | None = None
        self.killing = False  # kill sent, death not yet reported
        self.bundle: str | None = None  # its placement-group bundle, if any
        self.direct_port: int | None = None  # where its process takes calls directly
        self.direct: dict[str, set[bytes]] = {}  # caller -> its unfinished direct calls

    def meta(self) -> dict:
        return {"aid": self.aid, "class_name": self.class_name, "methods": self.methods,
                "is_async": self.is_async}

    def as_dict(self) -> dict:
        return {"actor_id": self.aid.hex(), "class_name": self.class_name, "name": self.name,
                "namespace": self.namespace, "state": self.state, "node_id": self.node,
                "pid": self.pid, "restarts": self.restarts, "max_restarts": self.max_restarts,
                "detached": self.detached, "death_cause": self.cause or None,
                "pending_calls": sum(len(q) for q in self.queues.values()) + len(self.inflight),
                "created": self.created}


class ActorManager:
    """Owns the actor table, the names and the newest dead actors; registers
    the actor ops (creation, readiness, failure, exit, death, kill) and is
    told by the state machine when an actor's call is submitted, ready or
    done, when a handle goes out of scope and when a node, a driver or a
    worker goes away."""

    #: dead actors kept in the table (their causes stay visible)
    keep_dead_actors = 1000

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.actors: dict[bytes, ActorRecord] = {}
        self.named: dict[tuple[str, str], bytes] = {}
        self.dead_actors: deque[bytes] = deque()

    def ops(self) -> dict[str, Callable[[str, dict], None]]:
        return {"create_actor": self.handle_create_actor,
                "actor_ready": self.handle_actor_ready,
                "actor_failed": self.handle_actor_failed,
                "actor_exit": self.handle_actor_exit,
                "actor_died": self.handle_actor_died,
                "kill_actor": self.handle_kill_actor}

    # ------------------------------------------------------------ creation
    def handle_create_actor(self, source: str, msg: dict) -> None:
        s = self.s
        spec = msg["spec"]
        key = None
        if spec.get("actor_name"):
            key = (spec.get("namespace") or "default", spec["actor_name"])
            existing = self.named.get(key)
            if existing is not None and self.actors[existing].state != DEAD:
                if spec.get("get_if_exists"):
                    s._send(source, wire.reply(msg.get("rid"), ok=True, existing=True,
                                               meta=self.actors[existing].meta()))
                    return
                s._send(source, wire.reply(
                    msg.get("rid"), ok=False,
                    error=f"an actor named {key[1]!r} already exists in namespace "
                          f"{key[0]!r}; use flowcore.get_actor({key[1]!r}) or "
                          f".options(get_if_exists=True)"))
                return
        actor = ActorRecord(spec, source)
        self.actors[actor.aid] = actor
        # the creator's handle: counted like a ref to an (always ready) object
        handle = s._obj(ids.actor_handle_id(actor.aid), source)
        handle.state = ObjectState.READY
        handle.clients.add(source)
        s.client_refs.setdefault(source, set()).add(handle.oid)
        if key is not None:
            self.named[key] = actor.aid
        s._send(source, wire.reply(msg.get("rid"), ok=True, meta=actor.meta(), existing=False))
        create = dict(spec)
        create["nret"] = 0
        create["kind"] = "create"
        create["res"] = actor.place
        create["retries"] = 0
        s._submit(source, create)
        s._hold(actor.deps + actor.nested)

    def dispatch_create(self, t: TaskRecord, node: NodeRecord) -> None:
        """The creation task was placed: ask the node to start the actor."""
        actor = self.actors.get(t.actor or b"")
        if actor is None:
            return
        actor.node = node.node_id
        actor.bundle = t.bundle
        self.start_process(actor)

    def start_process(self, actor: ActorRecord) -> None:
        deps = [self.s._ready(self.s.objects[oid]) for oid in actor.deps]
        self.s._send(actor.node, wire.start_actor(
            actor.aid, actor.create_tid, actor.fid, actor.class_name, actor.args,
            actor.args_dep, deps, actor.hold, actor.max_concurrency, actor.is_async,
            actor.restarts, actor.bundle, actor.renv, actor.job, actor.name, actor.groups))

    def handle_actor_ready(self, source: str, msg: dict) -> None:
        s = self.s
        actor = self.actors.get(msg["aid"])
        if actor is None or actor.state == DEAD:
            return
        actor.state = ALIVE
        actor.pid = msg.get("pid")
        actor.client = source  # the actor's own process: calls go straight to it
        actor.direct_port = msg.get("direct_port")
        node = s.nodes.get(actor.node or "")
        t = s.tasks.get(actor.create_tid)
        if t is not None and t.state == S.RUNNING:
            s.tx.finish_create(t, True)
            s._done(t)
        if node is not None and actor.hold and not actor.holding:
            s._account(node, actor.bundle).take(actor.hold)
            actor.holding = True
        self.pump(actor)

    def handle_actor_failed(self, source: str, msg: dict) -> None:
        """The constructor raised: the actor is dead, with that error as cause."""
        s = self.s
        actor = self.actors.get(msg["aid"])
        if actor is None:
            return
        t = s.tasks.get(actor.create_tid)
        if t is not None and t.state == S.RUNNING:
            s.tx.finish_create(t, False)
            s._done(t)
        self.dead(actor, f"its constructor raised: {msg.get('error', '?')}",
                  payload=msg.get("payload"))
        if actor.node:
            s._send(actor.node, wire.kill_actor(actor.aid))

    # ------------------------------------------------------------ calls
    def call_submitted(self, t: TaskRecord) -> bool:
        """Register a call in its caller's queue; False if the actor is gone."""
        actor = self.actors.get(t.actor or b"")
        if actor is None or actor.state == DEAD:
            return False
        actor.queues.setdefault(t.owner, deque()).append(t.tid)
        if t.retries_left is None:  # the method did not set its own max_task_retries
            t.retries_left = 10**9 if actor.max_task_retries == -1 else actor.max_task_retries
        return True

    def retry_call(self, t: TaskRecord) -> bool:
        """A call raised an exception its ``retry_exceptions`` names, with
        retries left: run it again, before its caller's later calls."""
        actor = self.actors.get(t.actor or b"")
        if actor is None or actor.state == DEAD:
            return False
        self.s.tx.retry_call(t, actor, "application error, retrying (retry_exceptions)")
        self.pump(actor)
        return True

    def call_ready(self, t: TaskRecord, cause: str) -> None:
        actor = self.actors.get(t.actor or b"")
        self.s.tx.queue_call(t, actor, cause)
        if actor is not None:
            self.pump(actor)

    def pump(self, actor: ActorRecord) -> None:
        """Send the actor the calls at the head of its callers' queues."""
        if actor.state != ALIVE or actor.killing:
            return  # a kill is on its way: later calls wait for its outcome
        tasks = self.s.tasks
        for caller, q in actor.queues.items():
            if caller in actor.direct:
                continue  # its direct calls finish first (they were sent before)
            while q:
                t = tasks.get(q[0])
                if t is None or (t.state is not None and t.state.done):
                    q.popleft()
                    continue
                if t.state != S.QUEUED:
                    break  # waiting for its arguments: later calls wait too
                q.popleft()
                self._dispatch_call(actor, t)

    def _dispatch_call(self, actor: ActorRecord, t: TaskRecord) -> None:
        s = self.s
        s.tx.start_call(t, actor, f"sent to actor {actor.class_name}")
        deps = [s._ready(s.objects[oid]) for oid in t.deps]
        s._send(actor.client or actor.node, wire.actor_call(
            t.tid, actor.aid, t.method, t.name, t.args, t.args_dep, deps, t.nret, t.owner,
            t.attempt, actor.bundle, t.retry_exc, t.cgroup, t.xopts))

    def call_done(self, t: TaskRecord) -> None:
        actor = self.actors.get(t.actor or b"")
        if actor is not None:
            actor.inflight.discard(t.tid)
            if DirectCalls.call_done(actor, t):
                self.pump(actor)
            if actor.out_of_scope:
                self._maybe_retire(actor)

    def out_of_scope(self, aid: bytes) -> None:
        """The last handle is gone (called when its handle object is freed)."""
        actor = self.actors.get(aid)
        if actor is None or actor.state == DEAD or actor.detached:
            return
        actor.out_of_scope = True
        self._maybe_retire(actor)

    def _maybe_retire(self, actor: ActorRecord) -> None:
        if actor.state == DEAD or actor.inflight or any(actor.queues.values()):
            return  # calls submitted before the last handle went still run
        actor.no_restart = True
        if actor.node:
            self.s._send(actor.node, wire.kill_actor(actor.aid))
        self.dead(actor, "no handle to it remains (it went out of scope: lost reference "
                         "to the actor); keep a handle, or name the actor, while "
                         "calling it")

    # ------------------------------------------------------------ death
    def handle_actor_exit(self, source: str, msg: dict) -> None:
        """The actor's own process ends it on purpose (``exit_actor()``,
        ``sys.exit()``, ``__ray_terminate__``): dead for good, no restart; its
        pending calls fail naming why.  The process exits right after."""
        actor = self.actors.get(msg["aid"])
        if actor is None or actor.state == DEAD or source != actor.client:
            return
        actor.no_restart = True
        self.dead(actor, f"{msg.get('cause') or 'it exited'} (an intended exit: it is "
                         f"not restarted)")

    def handle_actor_died(self, source: str, msg: dict) -> None:
        actor = self.actors.get(msg["aid"])
        if actor is None or actor.state == DEAD:
            return
        node = self.s.nodes.get(source)
        where = node.name if node else source
        how = msg.get("how", "exited")
        cause = (f"the actor's process (pid {msg.get('pid') or actor.pid}) on node {where} "
                 f"{how}")
        if actor.no_restart:
            self.dead(actor, "it was killed with flowcore.kill()")
            return
        if actor.max_restarts == -1 or actor.restarts < actor.max_restarts:
            self.restart(actor, cause)
        else:
            extra = "" if actor.max_restarts == 0 else \
                f" after {actor.restarts} restart(s) (max_restarts={actor.max_restarts})"
            self.dead(actor, cause + extra)

    def restart(self, actor: ActorRecord, cause: str, move: bool = False) -> None:
        """Start the actor again: in place, or (``move``, or its node is gone)
        placed again like a new one."""
        s = self.s
        actor.killing = False
        actor.restarts += 1
        actor.state = RESTARTING
        actor.cause = cause
        self._release_hold(actor)

        def started(tid: bytes) -> float:
            t = s.tasks.get(tid)
            return t.started if t is not None else 0
        for tid in sorted(actor.inflight, key=started, reverse=True):
            t = s.tasks.get(tid)
            if t is None or t.state != S.RUNNING:
                continue
            if t.retries_left > 0:
                s.tx.retry_call(t, actor, f"actor restarting ({cause}); call retried",
                                count=False)
            else:
                s.failures.fail_task(t, s.error_payload(ActorError(
                    f"actor {actor.class_name} died while running {t.name}: {cause}; it is "
                    f"restarting ({actor.restarts}/{actor.max_restarts}). Set "
                    f"max_task_retries to retry such calls")), f"actor died: {cause}")
        actor.inflight.clear()
        actor.direct.clear()
        actor.direct_port = None
        node = s.nodes.get(actor.node or "")
        if move or node is None or not node.alive:
            self._replace(actor, cause)
            return
        self.start_process(actor)

    def _replace(self, actor: ActorRecord, cause: str) -> None:
        """Its node is gone: the actor is placed again like a new one (its
        creation task queued for a node where its resources fit, in its
        placement-group bundle if it had one; node affinity no longer binds
        it), and stays RESTARTING, with
        its calls waiting, until a node can take it."""
        s = self.s
        st = actor.strategy
        strategy = tuple(st) if isinstance(st, list) else st
        if isinstance(strategy, tuple) and strategy and strategy[0] == "node":
            strategy = None  # its node is gone: it moves anywhere it fits
        actor.node = None
        actor.pid = None
        actor.client = None
        actor.bundle = None
        t = s.tasks.get(actor.create_tid)
        if t is not None and t.state == S.RUNNING:
            # still constructing when its node died: the same creation again
            t.strategy = strategy
            s.tx.queue(t, f"actor restarting: {cause}")
            return
        if t is not None and t.state is not None and not t.state.done:
            return  # already waiting to be placed
        if t is not None:
            del s.tasks[t.tid]
        s._submit(actor.owner, {
            "tid": actor.create_tid, "aid": actor.aid, "fid": actor.fid,
            "name": f"{actor.class_name}.__init__", "args": actor.args,
            "args_dep": actor.args_dep, "deps": list(actor.deps),
            "nested": list(actor.nested), "nret": 0, "kind": "create", "res": actor.place,
            "retries": 0, "strategy": list(strategy) if isinstance(strategy, tuple) else strategy,
            "renv": actor.renv})

    def _release_hold(self, actor: ActorRecord) -> None:
        if actor.holding:
            node = self.s.nodes.get(actor.node or "")
            if node is not None:
                self.s._account(node, actor.bundle).give(actor.hold)
            actor.holding = False

    def dead(self, actor: ActorRecord, cause: str, payload: bytes | None = None) -> None:
        """The actor is dead for good: its pending calls (and its creation,
        if it has not finished) fail with ``ActorDiedError`` naming ``cause``
        (or with ``payload``)."""
        if actor.state == DEAD:
            return
        s = self.s
        actor.state = DEAD
        actor.cause = cause
        # the table keeps the newest dead actors only (their causes stay visible)
        self.dead_actors.append(actor.aid)
        while len(self.dead_actors) > self.keep_dead_actors:
            old = self.dead_actors.popleft()
            gone = self.actors.get(old)
            if gone is not None and gone.state == DEAD:
                del self.actors[old]
        s._release(actor.deps + actor.nested)
        self._release_hold(actor)
        if actor.name and self.named.get((actor.namespace, actor.name)) == actor.aid:
            del self.named[(actor.namespace, actor.name)]
        err = payload or s.error_payload(ActorDiedError(
            f"actor {actor.class_name} ({actor.aid.hex()[:12]}) is dead: {cause}"))
        pending = list(actor.inflight)
        for q in actor.queues.values():
            pending.extend(q)
        actor.inflight.clear()
        actor.queues.clear()
        actor.direct.clear()
        actor.direct_port = None
        for tid in pending:
            t = s.tasks.get(tid)
            if t is not None and not (t.state and t.state.done):
                s.failures.fail_task(t, err, f"actor dead: {cause}")
        t = s.tasks.get(actor.create_tid)
        if t is not None and t.state in (S.WAITING_FOR_ARGS, S.QUEUED, S.RUNNING):
            s.failures.fail_task(t, err, f"actor dead: {cause}")
        elif t is not None and t.state == S.INFEASIBLE:
            s.infeasible.discard(t.tid)
            s.failures.cancel_task(t, f"actor dead: {cause}")

    def kill(self, actor: ActorRecord, cause: str) -> None:
        """Kill ``actor`` for good now (its process is told to exit)."""
        actor.no_restart = True
        if actor.node:
            self.s._send(actor.node, wire.kill_actor(actor.aid))
        self.dead(actor, cause)

    def handle_kill_actor(self, source: str, msg: dict) -> None:
        actor = self.actors.get(msg["aid"])
        if actor is None or actor.state == DEAD:
            return
        actor.no_restart = bool(msg.get("no_restart", True))
        if (actor.node and actor.state != PENDING) or actor.pid:
            actor.killing = True
            self.s._send(actor.node, wire.kill_actor(actor.aid))
        elif actor.state == RESTARTING:
            self.dead(actor, "it was killed with flowcore.kill() while waiting to restart")
        else:
            self.dead(actor, "it was killed with flowcore.kill() before it started")

    def kill_owned(self, cid: str,
                   cause: str = "its owner (the driver that created it) exited") -> None:
        """Fate sharing: the non-detached actors ``cid`` created die with it."""
        for actor in list(self.actors.values()):
            if actor.owner == cid and not actor.detached and actor.state != DEAD:
                self.kill(actor, cause)

    def owner_process_ended(self, cid: str) -> None:
        """Client ``cid`` disconnected: if it was an actor's process, the
        actors it created die with it (a pool worker that exits after its
        tasks hands what it created on through the handles it returned)."""
        owner = next((a for a in self.actors.values() if a.client == cid), None)
        if owner is None:
            return
        why = owner.cause if owner.state in (DEAD, RESTARTING) and owner.cause else \
            "its process exited"
        self.kill_owned(cid, f"its owner, actor {owner.class_name} "
                             f"({owner.aid.hex()[:12]}), died: {why}")

    def worker_crashed(self, pid: int | None, cause: str) -> None:
        """A worker died while running a task: actors that task created die."""
        if not pid:
            return
        for cid in self.s.membership.worker_clients(pid):
            self.kill_owned(cid, f"its owner died: {cause}")

    def node_died(self, node_id: str, cause: str) -> None:
        """The actors on a dead node restart elsewhere, or die."""
        dead = self.s.nodes.get(node_id)
        name = dead.name if dead is not None else node_id
        for actor in list(self.actors.values()):
            if actor.node == node_id and actor.state != DEAD:
                actor.holding = False  # its node's resources are gone with it
                why = f"its node {name} died ({cause})"
                if actor.max_restarts == -1 or actor.restarts < actor.max_restarts:
                    self.restart(actor, why, move=True)
                else:
                    self.dead(actor, why)

    # ------------------------------------------------------------ queries
    def get_actor(self, name: str, namespace: str | None) -> dict | None:
        aid = self.named.get((namespace or "default", name))
        if aid is None:
            return None
        actor = self.actors[aid]
        return actor.meta() if actor.state != DEAD else None

    def list_actors(self, state: str | None = None) -> list[dict]:
        return [a.as_dict() for a in self.actors.values() if state is None or a.state == state]
