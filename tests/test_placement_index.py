"""The head's placement index (``flowcore/scheduler/placement.py``) always
chooses what a full scan of the nodes chooses: a hypothesis state machine
joins, re-registers and kills nodes, takes and gives resources on them
(also past zero, as tasks sent ahead do), starts and ends tasks in their
running sets, and after every step compares the index's answers with the
scan's for requests of several shapes (CPU only, GPU, a custom resource,
no CPU, fractions, requests nothing fits).  Plus checks through the head's
state machine: locality, SPREAD, node affinity and infeasible detection."""
from __future__ import annotations

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flowcore.ids import object_id
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.placement import PlacementIndex
from flowcore.scheduler.records import NodeRecord, TaskState

REQUESTS = [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0},
            {"GPU": 0.5}, {"CPU": 1.0, "X": 1.0}, {"X": 2.0}, {}, {"CPU": 0.0},
            {"CPU": 64.0}, {"CPU": 1.0, "GPU": 1.0, "X": 1.0}, {"memory": 1.0}]
TOTALS = st.fixed_dictionaries(
    {"CPU": st.sampled_from([0.0, 1.0, 2.0, 4.0, 8.0])},
    optional={"GPU": st.sampled_from([1.0, 2.0]), "X": st.sampled_from([1.0, 3.0])})
NAMES = [f"n{i}" for i in range(8)]


class IndexMachine(RuleBasedStateMachine):

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, NodeRecord] = {}
        self.index = PlacementIndex(self.nodes)
        self.tid = 0
        self.held: dict[str, list[dict]] = {}  # node -> what was taken there
        self.turns: dict[str, int] = {}  # node -> when SPREAD last chose it
        self.clock = 0

    def live(self) -> list[str]:
        return sorted(self.nodes)

    @rule(name=st.sampled_from(NAMES), total=TOTALS)
    def join(self, name: str, total: dict) -> None:
        """A node joins, or re-registers (a new record, same place in the order)."""
        node = NodeRecord(name, f"tcp://{name}:1", total, name, "h", 1)
        for res in self.held.get(name, ()):  # what still runs there is taken again
            node.take(res)
        self.nodes[name] = node
        self.index.add(node)

    @precondition(lambda self: self.nodes)
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.live()))
        self.nodes[name].alive = False
        self.index.remove(name)
        del self.nodes[name]
        self.held.pop(name, None)

    @precondition(lambda self: self.nodes)
    @rule(data=st.data(), res=st.sampled_from(REQUESTS))
    def take(self, data: st.DataObject, res: dict) -> None:
        """Taken past what is free (an actor, a bundle, a task sent ahead)."""
        name = data.draw(st.sampled_from(self.live()))
        self.nodes[name].take(res)
        self.held.setdefault(name, []).append(res)

    @precondition(lambda self: any(self.held.get(n) for n in self.nodes))
    @rule(data=st.data())
    def give(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([n for n in self.live() if self.held.get(n)]))
        self.nodes[name].give(self.held[name].pop())

    @precondition(lambda self: self.nodes)
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        """A task starts where the index says (or ahead, on the least loaded)."""
        res = data.draw(st.sampled_from(REQUESTS))
        node = self.index.most_free(res) or self.index.least_loaded(res, 1.0)
        if node is None:
            return
        self.tid += 1
        node.take(res)
        self.held.setdefault(node.node_id, []).append(res)
        node.running.add(self.tid.to_bytes(4, "big"))
        self.index.touch(node)

    @precondition(lambda self: self.nodes)
    @rule(res=st.sampled_from(REQUESTS))
    def spread_start(self, res: dict) -> None:
        """A SPREAD task starts where the index says: of the nodes it fits,
        the least loaded, ties to the one SPREAD chose longest ago, then to
        the one that joined first (the rule, computed here by a scan)."""
        order = self.index.order
        fitting = [self.nodes[n] for n in order if self.nodes[n].fits(res)]
        want = min(fitting, key=lambda n: (
            len(n.running) / max(n.total.get("CPU", 0.0), 1.0),
            self.turns.get(n.node_id, 0), order[n.node_id])) if fitting else None
        node = self.index.spread(res)
        assert node is want
        if node is None:
            return
        self.clock += 1
        self.turns[node.node_id] = self.clock
        self.tid += 1
        node.take(res)
        self.held.setdefault(node.node_id, []).append(res)
        node.running.add(self.tid.to_bytes(4, "big"))
        self.index.touch(node)

    @precondition(lambda self: any(n.running for n in self.nodes.values()))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        node = self.nodes[data.draw(st.sampled_from(
            [n for n in self.live() if self.nodes[n].running]))]
        node.running.pop()
        self.index.touch(node)

    @invariant()
    def agrees_with_a_scan(self) -> None:
        problems = self.index.check(REQUESTS, 1.0)
        assert not problems, problems
        assert len(self.index) == len(self.nodes)


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------ through the head
def _head(nodes: dict[str, dict]) -> SchedulerState:
    s = SchedulerState(validate=True, event_log_size=1000)
    s.handle("d", {"op": "register_client", "kind": "driver"})
    for nid, res in nodes.items():
        s.handle(nid, {"op": "register_node", "node_id": nid, "name": nid,
                       "address": f"tcp://{nid}:1", "resources": res})
    return s


def _spec(n: int, **kw: object) -> dict:
    spec = {"tid": b"placement-t" + n.to_bytes(5, "big"), "fid": b"f", "name": "f",
            "args": b"", "deps": [], "nested": [], "nret": 1, "res": {"CPU": 1.0},
            "retries": 0}
    spec.update(kw)
    return spec


def _placed(out: list) -> dict[bytes, str]:
    return {m["tid"]: dest for dest, m in out if m["op"] == "run_task"}


def test_default_placement_is_the_node_with_most_free_cpu() -> None:
    s = _head({"a": {"CPU": 2.0}, "b": {"CPU": 4.0}, "c": {"CPU": 4.0, "GPU": 1.0}})
    placed = _placed(s.handle("d", {"op": "submit", "tasks": [_spec(i) for i in range(4)]}))
    # b and c tie at 4 free CPUs: b joined first; then c (4) beats b (3); ...
    assert [placed[_spec(i)["tid"]] for i in range(4)] == ["b", "c", "b", "c"]
    gpu = _placed(s.handle("d", {"op": "submit", "tasks": [
        _spec(10, res={"CPU": 1.0, "GPU": 1.0})]}))
    assert list(gpu.values()) == ["c"]


def test_locality_beats_free_cpu_and_affinity_and_spread_still_apply() -> None:
    s = _head({"a": {"CPU": 2.0}, "b": {"CPU": 8.0}})
    big = b"placement-obj-big-00"
    s.handle("d", {"op": "put", "oid": big, "size": 4 << 20, "node": "a"})
    out = _placed(s.handle("d", {"op": "submit", "tasks": [_spec(1, deps=[big])]}))
    assert list(out.values()) == ["a"]  # holds the 4 MiB argument
    hard = _placed(s.handle("d", {"op": "submit", "tasks": [
        _spec(2, strategy=["node", "a", False])]}))
    assert list(hard.values()) == ["a"]
    # a is full now: a hard affinity task waits, a soft one goes elsewhere
    waits = _placed(s.handle("d", {"op": "submit", "tasks": [
        _spec(3, strategy=["node", "a", False])]}))
    assert waits == {} and s.tasks[_spec(3)["tid"]].state == TaskState.QUEUED
    soft = _placed(s.handle("d", {"op": "submit", "tasks": [
        _spec(4, strategy=["node", "a", True])]}))
    assert list(soft.values()) == ["b"]
    spread = _placed(s.handle("d", {"op": "submit", "tasks": [
        _spec(10 + i, strategy="SPREAD") for i in range(2)]}))
    assert sorted(spread.values()) == ["b", "b"]  # only b has room


def test_infeasible_until_a_node_that_fits_joins_and_dead_nodes_are_skipped() -> None:
    s = _head({"a": {"CPU": 2.0}})
    out = s.handle("d", {"op": "submit", "tasks": [_spec(1, res={"CPU": 1.0, "GPU": 1.0})]})
    assert s.tasks[_spec(1)["tid"]].state == TaskState.INFEASIBLE
    assert any(m["op"] == "warning" for _, m in out)
    out = s.handle("g", {"op": "register_node", "node_id": "g", "name": "g",
                         "address": "tcp://g:1", "resources": {"CPU": 1.0, "GPU": 1.0}})
    assert _placed(out) == {_spec(1)["tid"]: "g"}
    s.handle("g", {"op": "task_done", "tid": _spec(1)["tid"], "status": "ok",
                   "results": [{"oid": object_id(_spec(1)["tid"], 0), "size": 1,
                                "inline": b"v", "error": False}]})
    s.node_died("a", "test")
    out = s.handle("d", {"op": "submit", "tasks": [_spec(2)]})
    assert _placed(out) == {_spec(2)["tid"]: "g"}
    assert len(s.placement) == 1


def test_spread_takes_turns_among_the_least_loaded_nodes() -> None:
    s = _head({"a": {"CPU": 4.0}, "b": {"CPU": 4.0}, "c": {"CPU": 2.0}})
    out = s.handle("d", {"op": "submit", "tasks": [
        _spec(20 + i, strategy="SPREAD") for i in range(7)]})
    placed = _placed(out)
    # loads (running per CPU) a, b 1/4 and c 1/2 after the first three; then
    # a and b tie and take turns, and c (chosen before both) wins the tie at 1/2
    assert [placed[_spec(20 + i)["tid"]] for i in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert placed[_spec(26)["tid"]] == "a"  # a, b at 1/2 again; a's turn came first
    # c is full (2 CPUs): a SPREAD task skips it though its load ties
    done = {"op": "task_done", "tid": _spec(20)["tid"], "status": "ok",
            "results": [{"oid": object_id(_spec(20)["tid"], 0), "size": 1, "inline": b"v",
                         "error": False}]}
    s.handle("a", done)
    out = s.handle("d", {"op": "submit", "tasks": [_spec(30, strategy="SPREAD")]})
    assert list(_placed(out).values()) == ["b"]  # a 2/4 (after one ended), b 2/4: b's turn


def test_spread_does_not_scan_every_node(monkeypatch) -> None:
    """A SPREAD placement among 400 nodes looks at a few of them, not all."""
    nodes: dict[str, NodeRecord] = {}
    index = PlacementIndex(nodes)
    for i in range(400):
        node = NodeRecord(f"n{i}", "", {"CPU": 4.0}, f"n{i}", "h", 1)
        nodes[node.node_id] = node
        index.add(node)
    looked = []
    fits = NodeRecord.fits
    monkeypatch.setattr(NodeRecord, "fits", lambda self, res: looked.append(1) or fits(self, res))
    seen = set()
    for i in range(800):
        node = index.spread({"CPU": 1.0})
        assert node is not None
        seen.add(node.node_id)
        node.take({"CPU": 1.0})
        node.running.add(i.to_bytes(4, "big"))
        index.touch(node)
    assert len(seen) == 400  # every node got its turn
    assert len(looked) < 800 * 5, f"{len(looked)} fit checks for 800 SPREAD placements"
    monkeypatch.undo()
    assert index.check([{"CPU": 1.0}, {"CPU": 4.0}]) == []


def test_tasks_sent_ahead_fill_every_node_below_the_limit_then_wait() -> None:
    """Sending ahead (pipelining) goes on while any node is below its limit,
    and a queue marked stuck is only skipped while no node can take its
    first task (validate mode checks each skip with a scan)."""
    s = SchedulerState(validate=True, event_log_size=1000, pipeline_depth=1.0)
    s.handle("d", {"op": "register_client", "kind": "driver"})
    for nid in ("a", "b", "c"):
        s.handle(nid, {"op": "register_node", "node_id": nid, "name": nid,
                       "address": f"tcp://{nid}:1", "resources": {"CPU": 1.0}})
    out = _placed(s.handle("d", {"op": "submit", "tasks": [_spec(40 + i) for i in range(8)]}))
    # one running and one ahead on each node (load 2 per CPU: the limit)
    assert sorted(out.values()) == ["a", "a", "b", "b", "c", "c"]
    assert _placed(s.handle("d", {"op": "submit", "tasks": [_spec(50)]})) == {}  # skipped
    first = next(tid for tid, nid in out.items() if nid == "b")
    out = _placed(s.handle("b", {"op": "task_done", "tid": first, "status": "ok", "results": [
        {"oid": object_id(first, 0), "size": 1, "inline": b"v", "error": False}]}))
    assert list(out.values()) == ["b"]  # b ran one: one more goes ahead there
    assert s.tasks[_spec(46)["tid"]].state == TaskState.RUNNING
