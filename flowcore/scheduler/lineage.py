"""Lineage: a component of the head's state machine (``Lineage``).

A finished task whose outputs are still referenced keeps its spec and holds
its arguments, so a lost output can be rebuilt by running the task again,
rebuilding lost arguments first.  What is kept is bounded: every kept spec
is charged its size (its inline arguments plus a little per dependency) and
when the total passes ``lineage_memory`` bytes the oldest kept lineage is
evicted: its arguments are released and a later loss of its outputs is
reported as ``lineage_evicted`` instead of being rebuilt.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import ids
from ..exceptions import ObjectLostError
from .records import LOST, PENDING, READY, ObjectRecord, TaskRecord, TaskState

if TYPE_CHECKING:  # pragma: no cover
    from .machine import SchedulerState

S = TaskState

# what a kept spec costs besides its inline arguments (record, ids, options)
SPEC_OVERHEAD = 256
PER_DEPENDENCY = 48


def lineage_cost(t: "TaskRecord") -> int:
    return SPEC_OVERHEAD + len(t.args or b"") + PER_DEPENDENCY * (len(t.deps) + len(t.nested))


class Lineage:

    """Owns the kept lineages (tid -> cost, oldest first) and their bound;
    rebuilds lost objects."""

    def __init__(self, state: "SchedulerState", memory: int):
        self.s = state
        self.memory = memory
        self.bytes = 0
        self.kept: dict[bytes, int] = {}  # (insertion order: oldest first)

    def keep(self, t: TaskRecord) -> None:
        """``t`` finished: keep its spec and arguments for re-execution,
        evicting the oldest kept lineage when over the bound."""
        t.lineage_held = True
        if t.tid in self.kept:  # finished again after a rebuild: the newest now
            self.kept[t.tid] = self.kept.pop(t.tid)
            return
        cost = lineage_cost(t)
        self.kept[t.tid] = cost
        self.bytes += cost
        while self.bytes > self.memory and len(self.kept) > 1:
            old_tid, _ = next(iter(self.kept.items()))
            if old_tid == t.tid:
                break
            old = self.s.tasks.get(old_tid)
            if old is None or not old.lineage_held or old.state != S.FINISHED:
                self.forget(old_tid)
                continue
            self.evict(old)

    def forget(self, tid: bytes) -> None:
        self.bytes -= self.kept.pop(tid, 0)

    def evict(self, t: TaskRecord) -> None:
        """Drop the kept lineage of ``t`` (a FINISHED task)."""
        self.forget(t.tid)
        t.lineage_held = False
        t.lineage_evicted = True
        t.args = None
        self.s.counts["lineage_evicted"] = self.s.counts.get("lineage_evicted", 0) + 1
        self.s.log.record(t.tid, t.state, S.FINISHED, "lineage_evicted",
                          f"lineage evicted: kept lineage passed {self.memory} bytes "
                          "(FLOWCORE_LINEAGE_MEMORY)")
        # released through the iterative free loop (long lineage chains)
        self.s._pending_release.extend(t.deps)
        self.s._pending_release.extend(t.nested)
        self.s._drain_release()

    # ------------------------------------------------------------ rebuilding
    def object_lost(self, obj: ObjectRecord, why: str) -> None:
        """Every copy of ``obj`` is gone: re-run the task that made it (and,
        recursively, the makers of its lost arguments), or say why not."""
        if obj.state != READY or obj.inline is not None or obj.nodes:
            return
        t = self.s.tasks.get(ids.task_of(obj.oid))
        reason = code = None
        if t is None:
            if obj.owner is not None and ids.index_of(obj.oid) == 0:
                reason, code = "it was created with put(), which cannot be re-run", "put"
            else:
                reason, code = "the task that made it is no longer known", "unknown_producer"
        elif t.kind != "task":
            reason, code = "it was made by an actor call, which is not re-run", "actor_call"
        elif t.lineage_evicted:
            reason = (f"its lineage was evicted to keep the head's lineage under "
                      f"{self.memory} bytes; raise FLOWCORE_LINEAGE_MEMORY (in the head's "
                      f"environment) to keep more")
            code = "lineage_evicted"
        elif not t.lineage_held:
            reason, code = "its lineage (the task's arguments) was not kept", "lineage_evicted"
        elif t.retries_left <= 0:
            reason = f"rebuilding it ran out of retries (max_retries of task {t.name})"
            code = "retries_exhausted"
        if reason is not None:
            obj.state = LOST
            obj.error = True
            obj.inline = self.s.error_payload(ObjectLostError(
                f"object {obj.oid.hex()} (from {t.name if t else 'put'}) was lost: {why}; "
                f"it cannot be rebuilt: {reason}", reason=code or "",
                object_id=obj.oid.hex(), creator=t.name if t else "put"))
            self.s._notify_ready(obj)
            return
        if t is not None and t.state == S.FINISHED:  # (t is None: a reason above)
            self.reconstruct(t, why)
        obj.state = PENDING

    def reconstruct(self, t: TaskRecord, why: str) -> None:
        t.retries_left -= 1
        self.s.counts["reconstructed"] = self.s.counts.get("reconstructed", 0) + 1
        for oid in t.returns():
            r = self.s.objects.get(oid)
            if r is not None and r.inline is None and not r.nodes:
                r.state = PENDING
        t.missing = set()
        for oid in t.deps:
            dep = self.s.objects.get(oid)
            if dep is None:
                continue
            if dep.state == READY and dep.inline is None and not dep.nodes:
                self.object_lost(dep, why)  # rebuild the argument first
            if dep.state != READY:
                t.missing.add(oid)
                dep.add_dependent(t.tid)
        if t.missing:
            self.s.tx.reconstruct(t, f"re-running to rebuild a lost result ({why}); waiting "
                                     f"for {len(t.missing)} lost argument(s)")
        else:
            self.s.tx.reconstruct(t, f"re-running to rebuild a lost result ({why})")
