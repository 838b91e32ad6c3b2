"""Every state change goes through the transition layer, and every edge of
the table is taken.

* Scenarios fed as messages to ``validate``-mode state machines (the books
  are checked after each message) take every edge of ``TRANSITIONS`` at
  least once: the table lists no edge that nothing takes.
* docs/architecture.md's transition table is the table.
* No code outside ``scheduler/tasks.py`` writes a task's state:
  ``TaskRecord.state`` has no setter, and ``_state`` (its one slot) is
  named nowhere else that can reach a task record.
* Every op the head takes (the schema's head table) is answered either by
  the head's server itself or by a handler of the state machine.
"""
from __future__ import annotations

import ast
import pathlib
import re
from typing import Any

import flowcore
from flowcore.ids import IdSource, object_id
from flowcore.objects.serialization import serialize
from flowcore.protocol import messages
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.records import TaskRecord, TaskState
from flowcore.scheduler.server import HeadServer
from flowcore.scheduler.states import TRANSITIONS

S = TaskState
C = "driver-1"
ROOT = pathlib.Path(flowcore.__file__).parent
DOCS = ROOT.parent / "docs" / "architecture.md"


class Head:
    """A validate-mode state machine with a driver and nodes."""

    def __init__(self, nodes: dict[str, dict[str, float]], **kw: Any):
        self.s = SchedulerState(validate=True,
                                error_payload=lambda e: serialize(e).to_bytes(), **kw)
        self.ids = IdSource()
        self.h(C, {"op": "register_client", "kind": "driver", "pid": 1})
        for nid, res in nodes.items():
            self.node(nid, res)

    def h(self, src: str, msg: dict) -> list:
        return self.s.handle(src, msg)

    def node(self, nid: str, res: dict[str, float]) -> None:
        self.h(nid, {"op": "register_node", "node_id": nid, "name": nid,
                     "address": f"tcp://{nid}:1", "resources": res})

    def submit(self, src: str = C, **kw: Any) -> bytes:
        spec = {"tid": self.ids.task_id(), "fid": b"f", "name": "f", "args": b"a",
                "deps": [], "nested": [], "nret": 1, "res": {"CPU": 1.0}, "retries": 0}
        spec.update(kw)
        self.h(src, {"op": "submit", "tasks": [spec]})
        return spec["tid"]

    def done(self, tid: bytes, status: str = "ok", stored: bool = False, **kw: Any) -> None:
        t = self.s.tasks[tid]
        r: dict[str, Any] = {"oid": object_id(tid, 0), "size": 1, "error": status == "error"}
        if stored:
            r["node"] = t.node
        else:
            r["inline"] = b"v"
        msg = {"op": "task_done", "tid": tid, "status": status, "results": [r]}
        msg.update(kw)
        self.h(t.node or "n1", msg)

    def state(self, tid: bytes) -> TaskState | None:
        return self.s.tasks[tid].state

    def taken(self) -> set[str]:
        return {e[4] for e in self.s.log}


def _basics() -> set[str]:
    """submit_ready, dispatch, finish, submit_waiting, args_ready, fail,
    dependency_failed, submit_failed_dependency, retry, cancel_waiting,
    cancel_queued, cancel_running."""
    c = Head({"n1": {"CPU": 2.0, "GPU": 1.0}})
    a = c.submit()
    b = c.submit(deps=[object_id(a, 0)])
    assert c.state(b) == S.WAITING_FOR_ARGS
    c.done(a)
    assert c.state(b) == S.RUNNING
    c.done(b)
    # raised: fail; its dependents fail without running, now and later
    x = c.submit()
    y = c.submit(deps=[object_id(x, 0)])
    c.done(x, status="error", retryable=False)
    assert c.state(x) == S.FAILED and c.state(y) == S.FAILED
    z = c.submit(deps=[object_id(x, 0)])
    assert c.state(z) == S.FAILED
    # the worker died, with a retry left
    r = c.submit(retries=1)
    c.h("n1", {"op": "worker_died", "tid": r, "pid": 9, "how": "killed"})
    assert c.state(r) == S.RUNNING and c.s.tasks[r].attempt == 2
    c.done(r)
    # cancels: waiting, queued (the GPU is taken), running
    g = c.submit(res={"GPU": 1.0})
    g2 = c.submit(res={"GPU": 1.0})
    w = c.submit(deps=[object_id(g, 0)])
    assert c.state(g2) == S.QUEUED and c.state(w) == S.WAITING_FOR_ARGS
    for tid in (g2, w):
        c.h(C, {"op": "cancel", "oid": object_id(tid, 0), "force": False})
    c.h(C, {"op": "cancel", "oid": object_id(g, 0), "force": False})
    c.done(g, status="cancelled")
    assert (c.state(g), c.state(g2), c.state(w)) == (S.CANCELLED,) * 3
    return c.taken()


def _infeasible() -> set[str]:
    """mark_infeasible, became_feasible, cancel_infeasible."""
    c = Head({"n1": {"CPU": 2.0}})
    big = c.submit(res={"CPU": 8.0})
    odd = c.submit(res={"TPU": 1.0})
    assert c.state(big) == c.state(odd) == S.INFEASIBLE
    c.node("n2", {"CPU": 8.0})
    assert c.state(big) == S.RUNNING
    c.h(C, {"op": "cancel", "oid": object_id(odd, 0), "force": False})
    assert c.state(odd) == S.CANCELLED
    return c.taken()


def _node_death() -> set[str]:
    """node_lost, resubmit_lost, lost_unrecoverable; and lineage:
    reconstruct, reconstruct_waiting."""
    c = Head({"n1": {"CPU": 2.0}, "n2": {"CPU": 2.0}})
    on_n1 = ["node", "n1", True]  # soft affinity: placed on n1 while it lives
    a = c.submit(strategy=on_n1, retries=2)
    b = c.submit(strategy=on_n1, retries=2, deps=[object_id(a, 0)])
    c.done(a, stored=True)
    c.done(b, stored=True)  # a's output is held by b's lineage, b's by the driver
    again = c.submit(strategy=on_n1, retries=1)
    once = c.submit(strategy=on_n1, retries=0)
    assert c.s.tasks[again].node == c.s.tasks[once].node == "n1"
    c.s.node_died("n1", "test")
    assert c.state(again) == S.RUNNING and c.state(once) == S.FAILED
    # b is rebuilt after a, which is rebuilt first
    assert c.state(a) == S.RUNNING and c.state(b) == S.WAITING_FOR_ARGS
    c.done(a, stored=True)
    c.done(b, stored=True)
    c.done(again)
    return c.taken()


def _local_first() -> set[str]:
    """local_declined, started_locally."""
    c = Head({"n1": {"CPU": 2.0}})
    c.h("w1", {"op": "register_client", "kind": "worker", "pid": 2, "node_id": "n1"})
    declined = c.submit("w1", local="n1")
    assert c.state(declined) == S.QUEUED
    c.h("n1", {"op": "local_verdict", "tid": declined, "started": False})
    assert c.state(declined) == S.RUNNING
    c.done(declined)
    first = c.submit()
    c.done(first, stored=True)  # stored on n1, but the head hears of it late below
    arg = c.submit()
    early = c.submit("w1", local="n1", deps=[object_id(arg, 0)])
    assert c.state(early) == S.WAITING_FOR_ARGS
    c.h("n1", {"op": "local_verdict", "tid": early, "started": True})
    assert c.state(early) == S.RUNNING
    c.done(arg)
    c.done(early, local=True)
    return c.taken()


def _actors() -> set[str]:
    """direct_call; fail_queued (a call queued for an actor killed before it started)."""
    c = Head({"n1": {"CPU": 2.0}})
    aid = c.ids.task_id()
    spec = {"tid": aid, "aid": aid, "fid": b"cls", "name": "A.__init__", "class_name": "A",
            "methods": {"f": 1}, "args": b"a", "deps": [], "nested": [], "hold": {},
            "place": {"CPU": 1.0}, "max_restarts": 0, "max_task_retries": 0}
    c.h(C, {"op": "create_actor", "spec": spec, "rid": 1})
    c.h("w-actor", {"op": "register_client", "kind": "worker", "pid": 5})
    c.h("w-actor", {"op": "actor_ready", "aid": aid, "pid": 5, "direct_port": 4242})
    call = c.submit(actor=aid, method="f", res={}, direct_epoch=0)
    assert c.state(call) == S.RUNNING
    c.h("w-actor", {"op": "task_done", "tid": call, "status": "ok", "answered_direct": True,
                    "results": [{"oid": object_id(call, 0), "size": 1, "inline": b"v",
                                 "sent": True}]})
    bid = c.ids.task_id()
    c.h(C, {"op": "create_actor", "rid": 2, "spec": dict(
        spec, tid=bid, aid=bid, place={"CPU": 64.0})})  # cannot be placed: it stays PENDING
    queued = c.submit(actor=bid, method="f", res={})
    assert c.state(queued) == S.QUEUED
    c.h(C, {"op": "kill_actor", "aid": bid, "no_restart": True})
    assert c.state(queued) == S.FAILED
    return c.taken()


def test_every_edge_of_the_transition_table_is_taken() -> None:
    taken = _basics() | _infeasible() | _node_death() | _local_first() | _actors()
    edges = set(TRANSITIONS.values())
    assert edges - taken == set(), f"edges no scenario takes: {sorted(edges - taken)}"
    # and nothing outside the table (besides the event log's own notes)
    assert taken - edges <= {"lineage_evicted"}


def test_the_docs_transition_table_is_the_table() -> None:
    text = DOCS.read_text()
    rows = re.findall(r"^\| (NEW|[A-Z_]+) \| ([A-Z_]+) \| `(\w+)` \|", text, re.M)
    documented = {(None if a == "NEW" else S(a), S(b)): name for a, b, name in rows}
    assert documented == TRANSITIONS


def _reaches_task_records(path: pathlib.Path, tree: ast.Module) -> bool:
    """Whether the module imports from flowcore.scheduler (absolutely or
    relatively)."""
    package = list(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module == "flowcore.scheduler" or module.startswith("flowcore.scheduler."):
            return True
    return False


def test_no_code_outside_the_transition_layer_writes_a_task_state() -> None:
    # the public attribute cannot be written at all
    prop = TaskRecord.__dict__["state"]
    assert isinstance(prop, property) and prop.fset is None
    # its slot is written in tasks.py only (records.py sets it to None once)
    allowed = {ROOT / "scheduler" / "tasks.py", ROOT / "scheduler" / "records.py"}
    offenders = []
    checked = 0
    for path in sorted(ROOT.rglob("*.py")):
        if path in allowed:
            continue
        tree = ast.parse(path.read_text(), str(path))
        if not (path.parent == ROOT / "scheduler" or _reaches_task_records(path, tree)):
            continue
        checked += 1
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "_state":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.Constant) and node.value == "_state":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} (by name)")
    assert checked > 10
    assert offenders == []
    records = ast.parse((ROOT / "scheduler" / "records.py").read_text())
    writes = [n for n in ast.walk(records) if isinstance(n, ast.Attribute)
              and n.attr == "_state" and isinstance(n.ctx, ast.Store)]
    assert len(writes) == 1  # TaskRecord.__init__: no state yet (NEW)


def test_every_head_op_is_answered_by_the_server_or_the_state_machine() -> None:
    head_ops = {op.name for (to, _), op in messages.SCHEMA.items() if to == messages.HEAD}
    server_ops = set(HeadServer._op_table(object.__new__(HeadServer)))
    state_ops = set(SchedulerState().ops)
    assert head_ops == server_ops | state_ops
    # register_function is recorded by the state machine after the server's part
    assert server_ops & state_ops == {"register_function"}
