"""Placing queued tasks: a component of the head's state machine
(``Dispatcher``), no IO.

After every message the head runs one placement round (``schedule``): for
the task at the front of each queue (one FIFO queue per resource shape) it
picks a node where the task fits now (``choose_node``: locality, then the
most free CPU; SPREAD; node affinity; a placement group's bundle) and sends
it ``run_task`` (``dispatch``).  A CPU-only task that fits nowhere now may
go ahead of time to the least loaded node, at most ``pipeline_depth`` per
CPU beyond what runs there (``pipeline_target``).  A queue whose first
task found no node is *stuck* and not tried again until some node frees
resources or runs fewer tasks, or nodes join or leave (the placement
index's ``freed`` count): this component owns that table, and the cache of
which task shapes ask for CPU only.  The queues themselves, like the nodes
and their placement index, are the core's tables (``Transitions`` fills
the queues).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import messages as wire
from .books import stuck_problem
from .records import NodeRecord, TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

_QUEUED = TaskState.QUEUED
#: task shapes remembered as CPU-only or not (the table is cleared beyond)
CPU_ONLY_MAX = 4096


class Dispatcher:
    """Owns the stuck queues (shape -> (placement.freed, first task) when
    that task found no node) and the CPU-only shapes."""

    def __init__(self, state: "SchedulerState"):
        self.s = state
        self.stuck: dict[tuple, tuple[int, bytes]] = {}
        self.cpu_only: dict[tuple, bool] = {}  # task shape -> it asks for CPU only

    def schedule(self) -> None:
        """One placement round: the queued tasks that fit go to nodes (or
        ahead of time), in each queue's order."""
        s = self.s
        if s.groups.pg_waiting:
            s.groups.place_pending()
        if not s.queues or not s.placement.order:
            if s.leases.queued or s.leases.sent:
                s.leases.scheduled()
            return
        tasks = s.tasks
        # a queue whose first task found no node stays stuck until some node
        # frees resources or runs fewer tasks, or nodes join or leave
        # (``placement.freed`` counts those): until then it is not tried again
        freed = s.placement.freed
        stuck = self.stuck
        for shape, q in list(s.queues.items()):
            # no node fits this shape now: dispatching only takes resources,
            # so no later task of the shape fits either (only the tasks sent
            # ahead of time are placed, by load)
            full = False
            while q:
                tid = q[0]
                t = tasks.get(tid)
                if t is None or t.state is not _QUEUED:
                    q.popleft()
                    continue
                if stuck.get(shape) == (freed, tid):
                    problem = stuck_problem(s, t) if s.validate else None
                    if problem:
                        raise AssertionError(problem)
                    break
                best = None if full else self.choose_node(t)
                if best is None and t.strategy is None:
                    full = True
                    best = self.pipeline_target(t)
                if best is None:
                    if shape[1] is None or shape[1] == "SPREAD":
                        stuck[shape] = (freed, tid)
                    break
                q.popleft()
                self.dispatch(t, best)
                if full and q and s.placement.ahead_alone and len(best.running) \
                        / best.total["CPU"] >= 1.0 + s.pipeline_depth:
                    # sent ahead to the only node below the limit, now at it:
                    # nothing else can go ahead until something is freed
                    stuck[shape] = (freed, q[0])
                    break
            if not q:
                del s.queues[shape]
                stuck.pop(shape, None)
        if s.leases.queued or s.leases.sent:
            s.leases.scheduled()  # owner queues, and room the leases hold

    def arg_bytes(self, t: TaskRecord) -> dict[str, int]:
        """Bytes of ``t``'s store-held arguments per node."""
        s = self.s
        out: dict[str, int] = {}
        for oid in t.deps:
            obj = s.objects.get(oid)
            if obj is not None and obj.inline is None:
                for n in obj.nodes:
                    out[n] = out.get(n, 0) + obj.size
        return out

    def choose_node(self, t: TaskRecord) -> NodeRecord | None:
        """Where ``t`` runs now, or None to wait.

        Default: among the nodes that fit, the one holding the most bytes of
        the task's arguments (when that is at least ``locality_min_bytes``),
        then the one with the most free CPU.  "SPREAD": the least loaded node
        that fits, rotating among equals.  ``("node", id, soft)``: that node;
        if it does not fit, wait (hard) or fall back to the default (soft).
        """
        s = self.s
        strategy = t.strategy
        if strategy is None and not t.deps:
            return s.placement.most_free(t.res, t.shape)
        if isinstance(strategy, tuple) and strategy and strategy[0] == "pg":
            return s.groups.choose_node(t)
        if isinstance(strategy, tuple) and strategy and strategy[0] == "node":
            target = s.nodes.get(strategy[1])
            if target is not None and target.alive and target.fits(t.res):
                return target
            if not strategy[2]:
                return None
            strategy = None
        if strategy == "SPREAD":
            # the least loaded node that fits, taking turns among equals
            return s.placement.spread(t.res)
        if t.deps:
            # locality first: the nodes holding at least locality_min_bytes
            # of the arguments beat every other node that fits
            floor = s.locality_min_bytes
            best, best_key = None, None
            order = s.placement.order
            for nid, held in self.arg_bytes(t).items():
                n = s.nodes.get(nid)
                if held < floor or n is None or not n.alive or not n.fits(t.res):
                    continue
                key = (held, n.available.get("CPU", 0.0), -order[nid])
                if best_key is None or key > best_key:
                    best, best_key = n, key
            if best is not None:
                return best
        return s.placement.most_free(t.res)

    def pipeline_target(self, t: TaskRecord) -> NodeRecord | None:
        """A node to send ``t`` to ahead of time, though it does not fit now.

        Only CPU-only tasks are pipelined, at most ``pipeline_depth`` per CPU
        beyond what runs: the node starts them when its own workers free up,
        without a round trip through the head."""
        s = self.s
        if s.pipeline_depth <= 0:
            return None
        cpu_only = self.cpu_only.get(t.shape)
        if cpu_only is None:
            cpu_only = self.cpu_only[t.shape] = all(k == "CPU" for k in t.res)
            if len(self.cpu_only) > CPU_ONLY_MAX:
                self.cpu_only.clear()
        if not cpu_only:
            return None
        if t.kind == "create":  # an actor holds its CPUs for its lifetime: never ahead
            return None
        return s.placement.least_loaded(t.res, s.pipeline_depth)

    def dispatch(self, t: TaskRecord, node: NodeRecord) -> None:
        """``t`` runs on ``node`` now: ``run_task`` to it (an actor's
        creation goes through ``ActorManager``)."""
        s = self.s
        s.tx.start(t, node, f"placed on node {node.name}")
        if t.kind == "create":
            s.actor_manager.dispatch_create(t, node)
            return
        objects = s.objects
        deps = [s._ready(objects[oid]) for oid in t.deps]
        s._send(node.node_id, wire.head_run_task(
            t.tid, t.fid, t.name, t.args, t.args_dep, deps, t.nret, t.res, t.retry_exc, t.owner,
            t.attempt, renv=t.renv, job=t.job, xopts=t.xopts,
            **(s.groups.bundle_fields(t) if t.bundle else {})))
