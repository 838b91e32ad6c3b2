"""The head's decision logic, free of IO.

``SchedulerState.handle(source, msg)`` takes one message from a client
(driver or worker) or a node and returns the messages to send, as
``(destination id, message)`` pairs.  The Tornado server only feeds it and
carries its answers out, so everything here is tested without sockets.

Tables: nodes, functions, tasks (the futures DAG: each task node knows the
objects it depends on), objects (state, inline value or the nodes holding a
copy, who references it) and a bounded event log of every task transition.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

from .. import ids
from ..protocol import messages as wire
from ..exceptions import ActorDiedError, ObjectLostError
from .actors import ActorManager
from .direct_calls import DirectCalls
from .dispatch import Dispatcher
from .failures import Failures
from .books import check_books
from . import queries
from .history import History
from .lineage import Lineage
from .leases import Leases
from .local_first import LocalFirst
from .membership import Membership
from .placement import PlacementIndex
from .placement_groups import PlacementGroups
from .recovery import Recovery, RecoveryManager
from .streams import Streams
from .records import PENDING, READY, NodeRecord, ObjectRecord, TaskRecord, TaskState
from .states import EventLog
from .tasks import Transitions

S = TaskState
_RUNNING, _FINISHED = S.RUNNING, S.FINISHED
_now = time.time
_ENDED = frozenset({S.FINISHED, S.FAILED, S.CANCELLED})  # TaskState.done
logger = logging.getLogger("flowcore.scheduler")

Out = list[tuple[str, dict]]

#: the cyclic garbage collector's thresholds in the head's process.  The
#: head's tables hold many small long-lived records (tasks, objects, events)
#: that form no cycles; with the default (700, 10, 10) the collector ran
#: every few tasks and re-walked them, 20-40% of the head's time per task.
GC_THRESHOLDS = (50_000, 20, 10)
#: a task blocked in get: how many of its latest children go to the front
LEND_CHILDREN = 64
#: children kept for parents not recorded yet (the oldest dropped beyond)
EARLY_CHILDREN_MAX = 10_000


def tune_collector() -> None:
    """Set the head process's collector thresholds (``GC_THRESHOLDS``) and
    move what start-up allocated out of its sight (``gc.freeze``)."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def default_error_payload(exc: BaseException) -> bytes:
    from ..objects.serialization import serialize
    return serialize(exc).to_bytes()


def _cause_id(msg: dict) -> str:
    """The id a message is about (task, object, actor, group, node), for logs."""
    for key in ("tid", "oid", "aid", "pgid", "node_id"):
        v = msg.get(key)
        if v:
            return v.hex() if isinstance(v, bytes) else str(v)
    return "-"


class SchedulerState:
    """The control tables and the futures DAG."""

    #: ``validate`` when the constructor is not told (the tests turn it on)
    validate_default = os.environ.get("FLOWCORE_VALIDATE") == "1"

    def __init__(self, *, event_log_size: int = 100_000, pipeline_depth: float = 1.0,
                 history_size: int = 10_000, locality_min_bytes: int = 1 << 20,
                 lineage: bool = True, replicate_puts: bool = True,
                 lineage_memory: int = 512 << 20,
                 error_payload: Callable[[BaseException], bytes] = default_error_payload,
                 validate: bool | None = None):
        # ---- the core tables
        self.nodes: dict[str, NodeRecord] = {}
        #: the live nodes ordered for placement (``placement.py``)
        self.placement = PlacementIndex(self.nodes)
        self.functions: dict[bytes, dict] = {}
        self.tasks: dict[bytes, TaskRecord] = {}  # the futures DAG, with objects
        # children recorded before their parent: a leased task's record comes
        # from its owner in a batch, its children's from its worker at once
        self.early_children: OrderedDict[bytes, list[bytes]] = OrderedDict()
        self.objects: dict[bytes, ObjectRecord] = {}
        self.client_refs: dict[str, set[bytes]] = {}
        self.queues: dict[tuple, deque[bytes]] = {}  # per resource shape, to be placed
        self.infeasible: set[bytes] = set()
        self.log = EventLog(event_log_size)
        self.tx = Transitions(self)  # the only code that changes a task's state
        # ---- settings
        self.error_payload = error_payload
        self.pipeline_depth = pipeline_depth
        self.locality_min_bytes = locality_min_bytes
        self.lineage = lineage
        self.replicate_puts = replicate_puts
        #: check the books after every message (on in the tests)
        self.validate = self.validate_default if validate is None else validate
        # ---- what views read: counts, warnings, latencies, finished tasks
        self.counts = {"submitted": 0, "finished": 0, "failed": 0, "cancelled": 0, "retried": 0}
        self.warnings: deque[str] = deque(maxlen=1000)  # the newest, for views
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.latency_count = 0  # entries ever appended to latencies (for /metrics)
        self.history = History(history_size)
        # ---- working state
        self.out: Out = []  # the messages the current one produced
        # frees and failures run as loops over these, not by recursion, so a
        # long chain of containers or of dependent tasks cannot overflow the stack
        self._pending_release: deque[bytes] = deque()
        self._releasing = False
        self._to_fail: deque[tuple[bytes, bytes, str]] = deque()
        self._failing = False
        self._hooks: dict[str, list[Callable[..., None]]] = {}
        # ---- components: each owns its tables and registers its ops and hooks
        self.dispatcher = Dispatcher(self)  # placing queued tasks on nodes
        self.membership = Membership(self)  # nodes and clients joining and leaving
        self.clients = self.membership.clients  # client id -> kind, pid, node
        self.failures = Failures(self)  # failing, retrying and cancelling tasks
        self.local_first = LocalFirst(self)
        self.direct_calls = DirectCalls(self)
        self.leases = Leases(self)
        self.lineages = Lineage(self, lineage_memory)
        self.streams = Streams(self)
        self.groups = PlacementGroups(self)
        self.actor_manager = ActorManager(self)
        self.recovery_manager = RecoveryManager(self)
        # their tables and queries, as the server, views and tests read them
        self.pgs = self.groups.pgs
        self._account = self.groups.account  # what a task's resources count against
        self.list_placement_groups = self.groups.list_placement_groups
        self.get_placement_group = self.groups.get_placement_group
        self.actors = self.actor_manager.actors
        self.get_actor = self.actor_manager.get_actor
        self.list_actors = self.actor_manager.list_actors
        self.persistent_tables = self.recovery_manager.persistent_tables
        self.restore_tables = self.recovery_manager.restore_tables
        self.finish_recovery = self.recovery_manager.finish_recovery
        self.handle_worker_died = self.failures.handle_worker_died  # (leases.py calls it)
        # the server's entry points for what is not a message
        self.check_heartbeats = self.membership.check_heartbeats
        self.node_died = self.membership.node_died
        self.client_disconnected = self.membership.client_disconnected
        # ---- op -> handler, for every message the state machine takes
        self.ops: dict[str, Callable[[str, dict], None]] = {
            "register_function": self.handle_register_function,
            "incref": self.handle_incref,
            "decref": self.handle_decref,
            "put": self.handle_put,
            "subscribe": self.handle_subscribe,
            "object_location": self.handle_object_location,
            "submit": self.handle_submit,
            "task_done": self.handle_task_done,
            "task_blocked": self.handle_task_blocked,
            "task_unblocked": self.handle_task_unblocked,
        }
        for component in (self.membership, self.failures, self.local_first, self.direct_calls,
                          self.leases, self.streams, self.groups, self.actor_manager):
            self.ops.update(component.ops())

    @property
    def recovery(self) -> Recovery | None:
        """What a restarted head still waits for (None when not recovering)."""
        return self.recovery_manager.recovery

    # ------------------------------------------------------------ plumbing
    def on(self, event: str, hook: Callable[..., None]) -> None:
        """Call ``hook`` on ``event``: "node_joined" / "node_died" (node id),
        "recovery_done" (a restarted head's recovery ended)."""
        self._hooks.setdefault(event, []).append(hook)

    def emit(self, event: str, *args: Any) -> None:
        for hook in self._hooks.get(event, ()):
            hook(*args)

    def handle(self, source: str, msg: dict) -> Out:
        op = msg["op"]
        handler = self.ops.get(op)
        if handler is None:
            raise KeyError(f"unknown op {op!r}")
        try:
            handler(source, msg)
            self.dispatcher.schedule()
        except Exception:
            # no half decision goes out: what the handler queued before it
            # raised is dropped with it
            self.out = []
            logger.error("handling %s from %s failed (cause %s)", op, source,
                         _cause_id(msg), exc_info=True)
            raise
        out, self.out = self.out, []
        if self.validate:
            self._check_books(op, msg)
        return out

    def _check_books(self, op: str, msg: dict) -> None:
        problems = check_books(self)
        if problems:
            text = (f"the head's books are wrong after {op} (cause {_cause_id(msg)}): "
                    + "; ".join(problems[:5]))
            logger.error(text)
            raise AssertionError(text)

    def _ready(self, obj: ObjectRecord) -> dict:
        """The readiness message of ``obj``, with the addresses of the nodes
        holding a copy (a consumer's node pulls from them)."""
        if obj.inline is not None:
            return wire.object_ready(obj.oid, obj.size, obj.error, inline=obj.inline)
        nodes = sorted(obj.nodes)
        return wire.object_ready(obj.oid, obj.size, obj.error, nodes=nodes,
                                 addrs=[self.nodes[n].address if n in self.nodes else ""
                                        for n in nodes])

    def _send(self, dest: str | None, msg: dict) -> None:
        if dest is not None:
            self.out.append((dest, msg))

    # ------------------------------------------------------------ functions
    def handle_register_function(self, source: str, msg: dict) -> None:
        self.functions.setdefault(msg["fid"], {"blob": msg["blob"], "name": msg.get("name", "")})

    def function_blob(self, fid: bytes) -> bytes | None:
        f = self.functions.get(fid)
        return f["blob"] if f else None

    # ------------------------------------------------------------ references
    def _obj(self, oid: bytes, owner: str | None) -> ObjectRecord:
        obj = self.objects.get(oid)
        if obj is None:
            obj = self.objects[oid] = ObjectRecord(oid, owner)
        return obj

    def handle_incref(self, source: str, msg: dict) -> None:
        refs = self.client_refs.setdefault(source, set())
        for oid in msg["oids"]:
            obj = self.objects.get(oid)
            if obj is None:
                logger.debug("incref of unknown object %s from %s", ids.short(oid), source)
                continue
            obj.clients.add(source)
            refs.add(oid)

    def handle_decref(self, source: str, msg: dict) -> None:
        refs = self.client_refs.get(source, set())
        objects = self.objects
        maybe_free = self._maybe_free
        for oid in msg["oids"]:
            refs.discard(oid)
            obj = objects.get(oid)
            if obj is not None:
                clients = obj.clients
                clients.discard(source)
                if obj.waiters:
                    obj.waiters.discard(source)
                if not clients and obj.holds <= 0:
                    maybe_free(obj)

    def _hold(self, oids: Iterable[bytes]) -> None:
        for oid in oids:
            obj = self.objects.get(oid)
            if obj is not None:
                obj.holds += 1

    def _release(self, oids: Iterable[bytes]) -> None:
        for oid in oids:
            obj = self.objects.get(oid)
            if obj is not None:
                obj.holds -= 1
                self._maybe_free(obj)

    def _hold_early(self, msg: dict) -> None:
        """A ``task_done`` is kept until its task's submission (or local
        start) is seen: the refs nested in its results are held meanwhile, so
        the worker's own decrefs that follow it cannot free them first."""
        if not msg.get("held_early"):
            msg["held_early"] = True
            self._hold([oid for r in msg.get("results") or () for oid in r.get("nested") or ()])

    def _release_early(self, msg: dict) -> None:
        """The kept ``task_done`` was applied (its results now hold their
        nested refs) or dropped: let go of the hold taken when it came."""
        if msg.pop("held_early", False):
            self._release([oid for r in msg.get("results") or ()
                           for oid in r.get("nested") or ()])

    def _maybe_free(self, obj: ObjectRecord) -> None:
        # iterative, not recursive: a long chain of containers (each holding
        # a ref to the next) must not overflow the stack when it is freed
        stack = [obj]
        while stack:
            obj = stack.pop()
            if obj.clients or obj.holds > 0 or obj.state == PENDING:
                continue
            if self.objects.get(obj.oid) is not obj:
                continue  # already freed (e.g. listed twice in a container)
            del self.objects[obj.oid]
            for nid in obj.nodes:
                self._send(nid, wire.delete_objects([obj.oid]))
            for oid in obj.nested:
                inner = self.objects.get(oid)
                if inner is not None:
                    inner.holds -= 1
                    stack.append(inner)
            index = ids.index_of(obj.oid)
            if index == ids.HANDLE_INDEX:
                self.actor_manager.out_of_scope(ids.task_of(obj.oid))
                continue
            t = self.tasks.get(ids.task_of(obj.oid))
            if t is not None and index < t.nret:  # (not a yielded value)
                t.returns_alive -= 1
                if t.returns_alive <= 0:
                    self._maybe_prune(t)

    def _maybe_prune(self, t: TaskRecord) -> None:
        if t.returns_alive <= 0 and t.state in _ENDED and self.tasks.get(t.tid) is t:
            del self.tasks[t.tid]
            if t.lineage_held:
                t.lineage_held = False
                self.lineages.forget(t.tid)
                if t.deps or t.nested:
                    # released through the iterative free loop (long lineage chains)
                    self._pending_release.extend(t.deps)
                    self._pending_release.extend(t.nested)
                    self._drain_release()

    def _drain_release(self) -> None:
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._pending_release:
                self._release([self._pending_release.popleft()])
        finally:
            self._releasing = False

    # ------------------------------------------------------------ objects
    def handle_put(self, source: str, msg: dict) -> None:
        obj = self._obj(msg["oid"], source)
        obj.clients.add(source)
        self.client_refs.setdefault(source, set()).add(obj.oid)
        nested = msg.get("nested") or []
        obj.nested = nested
        self._hold(nested)
        self._seal(obj, msg)
        if msg.get("node") and self.replicate_puts:
            self._replicate(obj, msg["node"])

    def _replicate(self, obj: ObjectRecord, holder: str) -> None:
        """A put object cannot be rebuilt, so a second node pulls a copy of it
        (in the background): losing one node then loses no put object."""
        src = self.nodes.get(holder)
        others = [n for n in self.nodes.values() if n.alive and n.node_id != holder]
        if src is None or not others:
            return
        target = min(others, key=lambda n: (len(n.running), n.node_id))
        self._send(target.node_id, wire.prefetch([[obj.oid, obj.size, [[holder, src.address]]]]))

    def _seal(self, obj: ObjectRecord, info: dict, notify_owner: bool = True) -> None:
        get = info.get
        obj.size = get("size", 0)
        obj.error = bool(get("error", False))
        inline = get("inline")
        if inline is not None:
            obj.inline = inline
        else:
            node = get("node")
            if node:
                obj.nodes.add(node)
        obj.state = READY
        self._notify_ready(obj, notify_owner)

    def _notify_ready(self, obj: ObjectRecord, notify_owner: bool = True) -> None:
        """``notify_owner`` False: the owner already has the value (a direct
        actor call answered it)."""
        msg = self._ready(obj)
        waiters = obj.waiters
        out = self.out
        if waiters:
            dests = set(waiters)
            waiters.clear()
            if notify_owner and obj.owner in obj.clients:
                dests.add(obj.owner)
            for d in dests:
                if d is not None:
                    out.append((d, msg))
        elif notify_owner and obj.owner is not None and obj.owner in obj.clients:
            out.append((obj.owner, msg))
        if not obj.dependents:
            return
        deps, obj.dependents = obj.dependents, None
        for tid in deps:
            t = self.tasks.get(tid)
            if t is None or t.state != S.WAITING_FOR_ARGS:
                continue
            if obj.error:
                self._to_fail.append((tid, obj.inline or b"",
                                      f"argument {ids.short(obj.oid)} failed"))
                continue
            t.missing.discard(obj.oid)
            if not t.missing:
                self._enqueue(t, "arguments ready")
        self._fail_dependents()

    def _fail_dependents(self) -> None:
        if self._failing:
            return  # an outer call is draining the queue
        self._failing = True
        try:
            while self._to_fail:
                tid, payload, cause = self._to_fail.popleft()
                t = self.tasks.get(tid)
                if t is not None and t.state == S.WAITING_FOR_ARGS:
                    self.failures.fail_task(t, payload, cause)
        finally:
            self._failing = False

    def handle_subscribe(self, source: str, msg: dict) -> None:
        """``source`` wants to hear when each of ``oids`` is ready; with
        ``ack``, it also hears, after the ones ready now, how many are still
        pending (a get inside a task gives its CPU back only then)."""
        pending = 0
        for oid in msg["oids"]:
            obj = self.objects.get(oid)
            if obj is None:
                payload = self.error_payload(ObjectLostError(
                    f"object {oid.hex()} is unknown to the head: it was freed (no reference "
                    f"remained) or never existed", reason="freed", object_id=oid.hex()))
                self._send(source, wire.object_error(oid, payload))
            elif obj.state == PENDING:
                obj.add_waiter(source)
                pending += 1
            else:
                self._send(source, self._ready(obj))
        if msg.get("ack") is not None:
            self._send(source, wire.subscribed(msg["ack"], pending))

    def handle_object_location(self, source: str, msg: dict) -> None:
        """A node gained (``add``) or dropped a copy."""
        obj = self.objects.get(msg["oid"])
        if obj is None:
            return
        if msg.get("add", True):
            obj.nodes.add(msg["node"])
        else:
            obj.nodes.discard(msg["node"])

    # ------------------------------------------------------------ tasks
    def handle_submit(self, source: str, msg: dict) -> None:
        for spec in msg["tasks"]:
            self._submit(source, spec)

    def _submit(self, owner: str, spec: dict) -> None:
        t = TaskRecord(spec, owner)
        self.tasks[t.tid] = t
        if self.early_children:
            early = self.early_children.pop(t.tid, None)
            if early is not None:
                t.children = early
        parent_tid = spec.get("parent")
        if parent_tid:
            parent = self.tasks.get(parent_tid)
            if parent is not None:
                if parent.children is None:
                    parent.children = []
                parent.children.append(t.tid)
            else:  # its record is on its way
                self.early_children.setdefault(parent_tid, []).append(t.tid)
                if len(self.early_children) > EARLY_CHILDREN_MAX:
                    self.early_children.popitem(last=False)
        self.counts["submitted"] += 1
        refs = self.client_refs.get(owner)
        if refs is None:
            refs = self.client_refs[owner] = set()
        objects = self.objects
        for oid in t.returns():
            obj = objects.get(oid)
            if obj is None:
                obj = objects[oid] = ObjectRecord(oid, owner, t.submitted)
            obj.clients.add(owner)
            refs.add(oid)
        if t.deps:
            self._hold(t.deps)
        if t.nested:
            self._hold(t.nested)
        kind = t.kind
        if kind == "call":
            if not self.actor_manager.call_submitted(t):
                actor = self.actors.get(t.actor or b"")
                why = actor.cause if actor is not None else "unknown actor"
                self.failures.fail_task(t, self.error_payload(ActorDiedError(
                    f"cannot call {t.name}: the actor is dead ({why})")), "actor is dead")
                return
            if spec.get("direct_epoch") is not None:
                self.direct_calls.start(t, spec["direct_epoch"])
                return
        elif kind == "task":
            if spec.get("local"):
                self.local_first.note_offer(t, spec["local"])
            if spec.get("lease") is not None:
                self.leases.start(t, spec["lease"])
                return
            if spec.get("lease_q") is not None:
                self.leases.queue_at_owner(t, spec["lease_q"])
                return
        failed: ObjectRecord | None = None
        for oid in t.deps:
            dep = objects.get(oid)
            if dep is None:
                failed = ObjectRecord(oid, None)
                failed.error = True
                failed.inline = self.error_payload(ObjectLostError(
                    f"argument {oid.hex()} of task {t.name} is unknown to the head: it was "
                    f"freed or never existed"))
                break
            if dep.state != PENDING and dep.error:  # failed, or LOST (never becomes ready)
                failed = dep
                break
            if dep.state != READY:
                if oid not in t.missing:
                    t.missing.add(oid)
                    dep.add_dependent(t.tid)
        if failed is not None:
            self.failures.fail_task(t, failed.inline or b"",
                                    f"argument {ids.short(failed.oid)} failed")
        elif t.missing:
            self.tx.wait_for_args(t, f"waiting for {len(t.missing)} argument(s)")
        else:
            self._enqueue(t, "submitted with arguments ready")

    def _could_run_somewhere(self, t: TaskRecord) -> bool:
        s = t.strategy
        if isinstance(s, tuple) and s and s[0] == "pg":
            return True  # checked against its bundles by groups.reject
        if isinstance(s, tuple) and s and s[0] == "node" and not s[2]:
            n = self.nodes.get(s[1])
            return n is not None and n.alive and n.could_ever_fit(t.res)
        return self.placement.could_ever_fit(t.res)

    def _enqueue(self, t: TaskRecord, cause: str) -> None:
        if t.kind == "call":
            self.actor_manager.call_ready(t, cause)
            return
        strategy = t.strategy
        if isinstance(strategy, tuple) and strategy[0] == "pg" and self.groups.reject(t):
            return
        if self.local_first.offers and self.local_first.offered(t, cause):
            return
        could = self.placement.could_ever_fit(t.res, t.shape) if strategy is None \
            else self._could_run_somewhere(t)
        if not could and self.nodes:
            s = t.strategy
            if isinstance(s, tuple) and s and s[0] == "node" and not s[2]:
                why = f"node {s[1]} (hard node affinity) is not in the cluster or cannot fit " \
                      f"{dict(t.res)}"
            else:
                why = f"no node has {dict(t.res)}"
            self.tx.mark_infeasible(t, why, cause)
            what = f"actor {t.name.removesuffix('.__init__')}" if t.kind == "create" \
                else f"task {t.name}"
            w = (f"{what} cannot be placed: {why}; it stays pending until a node that "
                 f"fits joins")
            self.warnings.append(w)
            self._send(t.owner, wire.warning(w))
            return
        self.tx.queue(t, cause)

    def _done(self, t: TaskRecord) -> None:
        t.ended = _now()
        # finished-task history (bounded): what the timeline and dashboard show
        # after the task record itself is pruned
        self.history.add(t)
        force_cancelled = self.failures.force_cancelled
        if force_cancelled:
            force_cancelled.discard(t.tid)
        if self.streams.held:
            self.streams.task_ended(t)
        if self.leases.sent:
            self.leases.sent.pop(t.tid, None)  # (a leased task: no longer on its lease)
        # (a task whose outputs were all freed as they were sealed, its owner
        # having dropped them first, is pruned already: no lineage to keep)
        if t.kind == "task" and t.state is _FINISHED and self.lineage \
                and self.tasks.get(t.tid) is t:
            # actor handles among the arguments are let go now: lineage does
            # not keep an actor alive (as in Ray, an actor whose last handle
            # went to a task exits when that task ends)
            handles = [oid for oid in t.nested if ids.index_of(oid) == ids.HANDLE_INDEX] \
                if t.nested else None
            if handles:
                t.nested = [oid for oid in t.nested if ids.index_of(oid) != ids.HANDLE_INDEX]
                self._release(handles)
            # lineage: the arguments stay held while any output of the task is
            # referenced, so a lost output can be rebuilt by running it again
            self.lineages.keep(t)
        else:
            if t.deps:
                self._release(t.deps)
            if t.nested:
                self._release(t.nested)
        if t.returns_alive <= 0:
            self._maybe_prune(t)

    def handle_task_done(self, source: str, msg: dict) -> None:
        t = self.tasks.get(msg["tid"])
        if t is None or t.state is not _RUNNING:
            if not self.local_first.early_task_done(source, msg) \
                    and not self.leases.early_task_done(source, msg):
                self.direct_calls.early_done(source, msg)
            return
        get = msg.get
        status = get("status", "ok")
        if "pid" in msg:
            t.worker = {"pid": msg["pid"], "wid": get("wid")}
        started = get("started")
        if started:  # when the worker really began (not when it was sent)
            t.started = started
        self.tx.release(t)
        if t.kind == "call":
            self.actor_manager.call_done(t)
        if status != "ok":
            if status == "error":
                t.error_text = get("error_text")
            if status == "cancelled":
                self.failures.cancel_task(t, "interrupted by cancel()")
                return
            if status == "error" and get("retryable") and t.retries_left > 0 \
                    and t.kind == "task":
                self.tx.retry(t, "application error, retrying (retry_exceptions)")
                return
            if status == "error" and get("retryable") and t.retries_left > 0 \
                    and t.kind == "call" and self.actor_manager.retry_call(t):
                return
        self.tx.finish(t, status == "ok", released=True)
        objects = self.objects
        for r in msg["results"]:
            obj = objects.get(r["oid"])
            if obj is None:
                continue
            nested = r.get("nested")
            if nested:
                obj.nested = nested
                self._hold(nested)
            elif obj.nested:
                obj.nested = []
            self._seal(obj, r, notify_owner=not r.get("sent"))
            if not obj.clients and obj.holds <= 0:
                self._maybe_free(obj)
        self._done(t)

    def handle_task_blocked(self, source: str, msg: dict) -> None:
        t = self.tasks.get(msg["tid"])
        if t is None or t.state != S.RUNNING:
            # a task started locally whose start the head has not heard of
            # (its node's verdict comes on another connection): kept for then
            self.local_first.early_blocked(msg["tid"], t, True)
            return
        if t.blocked:
            return
        t.blocked = True
        node = self.nodes.get(t.node or "")
        if node is not None and "CPU" in t.res:
            self._account(node, t.bundle).give({"CPU": t.res["CPU"]})
        if t.children:
            self.lend(t)

    def lend(self, t: TaskRecord) -> None:
        """``t`` blocked in get and gave its CPU back: its queued children
        (the latest LEND_CHILDREN) go to the front of their queues, as do
        children queued while it stays blocked (``Transitions.queue``).  A
        recursive task tree then runs depth first, the children of a
        blocked parent on the CPU it freed, instead of starting every
        queued task (each blocking a worker process of its own) first.
        Entries left behind are skipped when reached (no longer QUEUED)."""
        tasks, offers, at_owner = self.tasks, self.local_first.offers, self.leases.queued
        for cid in reversed(t.children[-LEND_CHILDREN:]):  # type: ignore[index]
            c = tasks.get(cid)
            if c is not None and c.state is S.QUEUED and c.kind == "task" \
                    and cid not in offers and cid not in at_owner:  # (its owner sends those)
                self.queues.setdefault(c.shape, deque()).appendleft(cid)

    def handle_task_unblocked(self, source: str, msg: dict) -> None:
        t = self.tasks.get(msg["tid"])
        if t is None or t.state != S.RUNNING:
            self.local_first.early_blocked(msg["tid"], t, False)
            return
        if not t.blocked:
            return
        t.blocked = False
        node = self.nodes.get(t.node or "")
        if node is not None and "CPU" in t.res:
            self._account(node, t.bundle).take({"CPU": t.res["CPU"]})

    # ------------------------------------------------------------ queries
    # (read-only views of the tables: ``queries.py``)
    cluster_resources = queries.cluster_resources
    available_resources = queries.available_resources
    list_tasks = queries.list_tasks
    list_objects = queries.list_objects
    list_nodes = queries.list_nodes
    task_info = queries.task_info
