"""A hypothesis model of the head's components: actors (creation, calls
through the head and direct calls, restarts, kills), placement groups
(creation, tasks in bundles, removal), local-first offers (verdicts either
way) and node churn, on a ``validate``-mode state machine, so the books
(resources per node, running sets, refcounts, holders) are checked after
every message.  At the end every task can finish and every resource comes
back once actors are killed and groups removed."""
from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flowcore.ids import object_id
from flowcore.scheduler.actors import ALIVE, DEAD
from flowcore.scheduler.books import check_books
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.records import TaskState

S = TaskState
C = "driver"
NODES = {"n1": {"CPU": 2.0, "X": 1.0}, "n2": {"CPU": 2.0}}


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def task_id(self) -> bytes:
        self.n += 1
        return b"components" + self.n.to_bytes(6, "big")


class ComponentsMachine(RuleBasedStateMachine):

    @initialize()
    def setup(self) -> None:
        self.s = SchedulerState(validate=True, event_log_size=500)
        self.ids = Ids()
        self.next = 0
        self.s.handle(C, {"op": "register_client", "kind": "driver"})
        for nid in NODES:
            self.join(nid)

    def join(self, nid: str) -> None:
        self.s.handle(nid, {"op": "register_node", "node_id": nid, "name": nid,
                            "address": f"tcp://{nid}:1",
                            "resources": dict(NODES[nid.split("-")[0]])})

    # ------------------------------------------------------------ helpers
    def tasks_in(self, *states: TaskState, kind: str | None = None) -> list[bytes]:
        return sorted(t.tid for t in self.s.tasks.values() if t.state in states
                      and (kind is None or t.kind == kind))

    def actors_in(self, *states: str) -> list[bytes]:
        return sorted(a.aid for a in self.s.actors.values() if a.state in states)

    def alive_nodes(self) -> list[str]:
        return sorted(n for n, rec in self.s.nodes.items() if rec.alive)

    def done_msg(self, tid: bytes, status: str = "ok", **kw: Any) -> dict:
        t = self.s.tasks[tid]
        return {"op": "task_done", "tid": tid, "status": status,
                "results": [{"oid": object_id(tid, i), "size": 1, "inline": b"v",
                             "error": status == "error"} for i in range(t.nret)], **kw}

    def spec(self, **kw: Any) -> dict:
        spec = {"tid": self.ids.task_id(), "fid": b"f", "name": "f", "args": b"", "deps": [],
                "nested": [], "nret": 1, "res": {"CPU": 1.0}, "retries": 1}
        spec.update(kw)
        return spec

    # ------------------------------------------------------------ tasks, local-first
    @rule(cpu=st.sampled_from([0.0, 0.5, 1.0]), offer=st.booleans())
    def submit(self, cpu: float, offer: bool) -> None:
        extra: dict[str, Any] = {}
        nodes = self.alive_nodes()
        if offer and nodes:
            extra["local"] = nodes[0]
        self.s.handle(C, {"op": "submit", "tasks": [self.spec(res={"CPU": cpu}, **extra)]})

    @precondition(lambda self: bool(self.s.local_first.offers))
    @rule(data=st.data(), started=st.booleans())
    def local_verdict(self, data: st.DataObject, started: bool) -> None:
        tid = data.draw(st.sampled_from(sorted(self.s.local_first.offers)))
        nid = self.s.local_first.offers[tid]
        self.s.handle(nid, {"op": "local_verdict", "tid": tid, "started": started})

    @precondition(lambda self: bool(self.tasks_in(S.RUNNING, kind="task")
                                    + self.tasks_in(S.RUNNING, kind="call")))
    @rule(data=st.data(), status=st.sampled_from(["ok", "error", "cancelled"]))
    def finish(self, data: st.DataObject, status: str) -> None:
        tid = data.draw(st.sampled_from(self.tasks_in(S.RUNNING, kind="task")
                                        + self.tasks_in(S.RUNNING, kind="call")))
        t = self.s.tasks[tid]
        if t.kind == "call":
            actor = self.s.actors[t.actor]
            src = actor.client or actor.node or "n1"
        else:
            src = t.node
        self.s.handle(src, self.done_msg(tid, status, direct=bool(
            t.kind == "call" and tid in self.s.actors[t.actor].direct.get(C, ()))))

    @precondition(lambda self: bool(self.tasks_in(S.QUEUED, S.WAITING_FOR_ARGS, S.RUNNING,
                                                  S.INFEASIBLE, kind="task")))
    @rule(data=st.data(), force=st.booleans())
    def cancel(self, data: st.DataObject, force: bool) -> None:
        tid = data.draw(st.sampled_from(self.tasks_in(S.QUEUED, S.WAITING_FOR_ARGS,
                                                      S.RUNNING, S.INFEASIBLE, kind="task")))
        self.s.handle(C, {"op": "cancel", "oid": object_id(tid), "force": force})

    # ------------------------------------------------------------ actors
    @rule(hold=st.sampled_from([{}, {"X": 1.0}]), place=st.sampled_from([None, {}]),
          restarts=st.integers(0, 1), retries=st.integers(0, 1))
    def create_actor(self, hold: dict, place: dict | None, restarts: int, retries: int) -> None:
        aid = self.ids.task_id()
        spec = {"tid": aid, "aid": aid, "fid": b"cls", "name": "A.__init__",
                "class_name": "A", "methods": {"f": 1}, "args": b"", "deps": [],
                "nested": [], "hold": hold, "max_restarts": restarts,
                "max_task_retries": retries, "max_concurrency": 1}
        if place is not None:
            spec["place"] = place
        self.s.handle(C, {"op": "create_actor", "spec": spec, "rid": 1})

    @precondition(lambda self: any(
        a.state != DEAD and (t := self.s.tasks.get(a.create_tid)) is not None
        and t.state == S.RUNNING for a in self.s.actors.values()))
    @rule(data=st.data(), ok=st.booleans())
    def actor_started(self, data: st.DataObject, ok: bool) -> None:
        aids = sorted(a.aid for a in self.s.actors.values() if a.state != DEAD
                      and (t := self.s.tasks.get(a.create_tid)) is not None
                      and t.state == S.RUNNING)
        aid = data.draw(st.sampled_from(aids))
        self.next += 1
        worker = f"w-{self.next}"
        self.s.handle(worker, {"op": "register_client", "kind": "worker", "pid": self.next})
        if ok:
            self.s.handle(worker, {"op": "actor_ready", "aid": aid, "pid": self.next,
                                   "direct_port": 4000 + self.next})
        else:
            self.s.handle(self.s.actors[aid].node or "n1",
                          {"op": "actor_failed", "aid": aid, "error": "boom"})

    @precondition(lambda self: bool(self.actors_in(ALIVE, "PENDING", "RESTARTING")))
    @rule(data=st.data(), direct=st.booleans())
    def call(self, data: st.DataObject, direct: bool) -> None:
        aid = data.draw(st.sampled_from(self.actors_in(ALIVE, "PENDING", "RESTARTING")))
        extra: dict[str, Any] = {}
        if direct:
            reply = self.s.handle(C, {"op": "actor_direct", "aid": aid, "rid": 2})
            address = [m for _, m in reply if m.get("rid") == 2][0]
            if address.get("address") and not any(
                    self.s.actors[aid].queues.get(C, ())):
                extra["direct"] = address["epoch"]
        self.s.handle(C, {"op": "submit", "tasks": [self.spec(
            actor=aid, method="f", res={}, retries=None, **extra)]})

    @precondition(lambda self: bool(self.actors_in(ALIVE)))
    @rule(data=st.data())
    def actor_dies(self, data: st.DataObject) -> None:
        aid = data.draw(st.sampled_from(self.actors_in(ALIVE)))
        a = self.s.actors[aid]
        self.s.handle(a.node or "n1", {"op": "actor_died", "aid": aid, "pid": a.pid,
                                       "how": "was killed"})

    @precondition(lambda self: bool(self.actors_in(ALIVE, "PENDING", "RESTARTING")))
    @rule(data=st.data())
    def kill_actor(self, data: st.DataObject) -> None:
        aid = data.draw(st.sampled_from(self.actors_in(ALIVE, "PENDING", "RESTARTING")))
        self.s.handle(C, {"op": "kill_actor", "aid": aid, "no_restart": True})
        a = self.s.actors[aid]
        if a.state != DEAD and a.killing:
            self.s.handle(a.node or "n1", {"op": "actor_died", "aid": aid, "pid": a.pid,
                                           "how": "was killed"})

    # ------------------------------------------------------------ placement groups
    @rule(bundles=st.sampled_from([[{"CPU": 1.0}], [{"CPU": 1.0}, {"CPU": 1.0}],
                                   [{"X": 1.0}]]),
          strategy=st.sampled_from(["PACK", "SPREAD", "STRICT_SPREAD"]))
    def create_group(self, bundles: list, strategy: str) -> None:
        self.s.handle(C, {"op": "create_placement_group", "pgid": self.ids.task_id(),
                          "bundles": bundles, "strategy": strategy, "name": "",
                          "lifetime": None, "rid": 3})

    @precondition(lambda self: any(pg.state == "CREATED" for pg in self.s.pgs.values()))
    @rule(data=st.data())
    def submit_in_group(self, data: st.DataObject) -> None:
        pgid = data.draw(st.sampled_from(sorted(p for p, pg in self.s.pgs.items()
                                                if pg.state == "CREATED")))
        res = dict(self.s.pgs[pgid].bundles[0].total)
        self.s.handle(C, {"op": "submit", "tasks": [self.spec(
            res=res, strategy=["pg", pgid, 0, False])]})

    @precondition(lambda self: any(pg.state != "REMOVED" for pg in self.s.pgs.values()))
    @rule(data=st.data())
    def remove_group(self, data: st.DataObject) -> None:
        pgid = data.draw(st.sampled_from(sorted(p for p, pg in self.s.pgs.items()
                                                if pg.state != "REMOVED")))
        self.s.handle(C, {"op": "remove_placement_group", "pgid": pgid, "rid": 4})

    # ------------------------------------------------------------ nodes
    @precondition(lambda self: len(self.alive_nodes()) > 1)
    @rule(data=st.data())
    def node_dies(self, data: st.DataObject) -> None:
        self.s.node_died(data.draw(st.sampled_from(self.alive_nodes())), "killed")

    @rule(base=st.sampled_from(sorted(NODES)))
    def node_joins(self, base: str) -> None:
        self.next += 1
        self.join(f"{base}-{self.next}")

    # ------------------------------------------------------------ invariants
    @invariant()
    def components_agree(self) -> None:
        s = self.s
        assert check_books(s) == []
        for tid, nid in s.local_first.offers.items():
            t = s.tasks.get(tid)
            assert t is None or t.state in (S.QUEUED, S.WAITING_FOR_ARGS), t and t.state
        for a in s.actors.values():
            for tid in a.inflight:
                t = s.tasks.get(tid)
                assert t is not None and t.state == S.RUNNING and t.kind == "call"
            for mine in a.direct.values():
                assert mine <= a.inflight
            if a.state == DEAD:
                assert not a.inflight and not any(a.queues.values()) and not a.holding

    def teardown(self) -> None:
        s = getattr(self, "s", None)
        if s is None:
            return
        s.handle("big", {"op": "register_node", "node_id": "big", "name": "big",
                         "address": "tcp://big:1", "resources": {"CPU": 8.0, "X": 2.0}})
        for tid in sorted(s.local_first.offers):
            s.handle(s.local_first.offers[tid], {"op": "local_verdict", "tid": tid,
                                                 "started": False})
        for aid in self.actors_in(ALIVE, "PENDING", "RESTARTING"):
            s.handle(C, {"op": "kill_actor", "aid": aid, "no_restart": True})
            a = s.actors[aid]
            if a.state != DEAD:
                s.handle(a.node or "big", {"op": "actor_died", "aid": aid, "pid": a.pid,
                                           "how": "killed"})
        for pgid, pg in list(s.pgs.items()):
            if pg.state != "REMOVED":
                s.handle(C, {"op": "remove_placement_group", "pgid": pgid, "rid": 5})
        for _ in range(200):
            run = self.tasks_in(S.RUNNING, kind="task")
            if not run:
                break
            for tid in run:
                if s.tasks.get(tid) is not None and s.tasks[tid].state == S.RUNNING:
                    s.handle(s.tasks[tid].node, self.done_msg(tid))
        assert self.tasks_in(S.QUEUED, S.WAITING_FOR_ARGS, S.RUNNING, S.INFEASIBLE) == []
        for n in s.nodes.values():
            assert not n.running
            for k, v in n.total.items():
                assert abs(n.available.get(k, 0.0) - v) < 1e-6, (n.node_id, k)


TestComponentsMachine = ComponentsMachine.TestCase
TestComponentsMachine.settings = settings(max_examples=60, stateful_step_count=30,
                                          deadline=None, derandomize=True,
                                          suppress_health_check=[HealthCheck.too_slow])
