"""Ray semantics that programs written for Ray rely on (core: scheduler,
node and client).  Each behaviour is checked on the state machines where
the decision lives, and through the public API on a real local cluster."""
from __future__ import annotations

import time

import pytest

import flowcore
from flowcore.client.direct import ActorLink, DirectCalls
from flowcore.ids import IdSource, actor_handle_id, object_id
from flowcore.objects.serialization import deserialize
from flowcore.scheduler.machine import SchedulerState

pytestmark = pytest.mark.timeout(90)

C = "client-1"


# ============================================== refs nested in call arguments
def _open_link() -> ActorLink:
    link = ActorLink(b"a" * 16)
    link.open, link.epoch, link.node = True, 0, "n1"
    return link


def test_a_call_with_refs_nested_in_its_arguments_goes_through_the_head() -> None:
    calls, src = DirectCalls(), IdSource()
    link = _open_link()
    spec = {"tid": src.task_id(), "actor": link.aid, "method": "h", "args": b"x",
            "deps": [], "nret": 1}
    assert calls.route(link, spec, {}, set(), C) is not None
    inner = object_id(src.task_id())
    assert calls.route(link, dict(spec, nested=[inner]), {}, set(), C) is None
    # a ready argument whose value holds refs (an own put, a direct answer)
    dep = object_id(src.task_id())
    container = {dep: {"oid": dep, "inline": b"v", "size": 1, "nested": True}}
    assert calls.route(link, dict(spec, deps=[dep]), container, set(), C) is None
    plain = {dep: {"oid": dep, "inline": b"v", "size": 1}}
    assert calls.route(link, dict(spec, deps=[dep]), plain, set(), C) is not None


@pytest.fixture(scope="module")
def _module_end():
    yield
    flowcore.shutdown()


@pytest.fixture
def cluster2(_module_end, tmp_path_factory):
    """A 2-CPU cluster shared by the tests of this module that use it (started
    again after a test that used a cluster of its own, which shuts it down)."""
    if not flowcore.is_initialized():
        flowcore.init(num_cpus=2, object_store_memory=128 << 20,
                      session_dir=str(tmp_path_factory.mktemp("semcore")))


@flowcore.remote
def _plus_one(x):
    return x + 1


@flowcore.remote
class _Getter:
    def get_all(self, refs):
        return flowcore.get(refs)


def test_refs_nested_in_an_actor_calls_argument_live_until_it_ran(cluster2):
    a = _Getter.remote()
    flowcore.get(a.get_all.remote([]))  # the actor is up and calls may go directly
    for _ in range(40):
        # the caller keeps no ref to the inner objects: only the call does
        out = a.get_all.remote([_plus_one.remote(j) for j in range(4)])
        assert flowcore.get(out, timeout=60) == [1, 2, 3, 4]
    for _ in range(10):
        # a put whose value holds refs, passed as a top-level argument
        box = flowcore.put([_plus_one.remote(j) for j in range(3)])
        assert flowcore.get(a.get_all.remote(box), timeout=60) == [1, 2, 3]
        del box


# ============================================== async actors and max_concurrency
@flowcore.remote
class _AsyncRecorder:
    def __init__(self):
        import asyncio
        self.history = []
        self.gate = asyncio.Event()

    async def step(self):
        import asyncio
        self.history.append("S")
        await asyncio.sleep(0)
        self.history.append("E")

    async def wait_gate(self):
        await self.gate.wait()
        return "through"

    async def open_gate(self):
        self.gate.set()
        return "opened"

    def seen(self):
        return "".join(self.history)


def test_async_actor_with_max_concurrency_1_runs_one_call_at_a_time(cluster2):
    a = _AsyncRecorder.options(max_concurrency=1, num_cpus=0).remote()
    flowcore.get([a.step.remote() for _ in range(8)])
    assert flowcore.get(a.seen.remote()) == "SE" * 8


def test_async_actor_overlaps_calls_by_default(cluster2):
    a = _AsyncRecorder.options(num_cpus=0).remote()
    # the first call waits for the second: only overlapping calls finish
    waiting = a.wait_gate.remote()
    assert flowcore.get(a.open_gate.remote(), timeout=30) == "opened"
    assert flowcore.get(waiting, timeout=30) == "through"


# ============================================== get of a list fails fast
@flowcore.remote
def _boom():
    raise ValueError("boom")


@flowcore.remote
def _wait_for(sig):
    sig.wait()
    return 1


def test_get_of_a_list_raises_a_failure_without_waiting_for_the_others(cluster2):
    from flowcore.testing import Signal
    sig = Signal()
    try:
        pending = _wait_for.remote(sig)
        # the pending ref is released only after the failure is handled
        with pytest.raises(ValueError, match="boom"):
            flowcore.get([pending, _boom.remote()], timeout=60)
        sig.set()
        assert flowcore.get(pending, timeout=60) == 1
    finally:
        sig.set()
        sig.close()


# ============================================== actors die with their owner


def _actor_spec(src: IdSource, name: str, deps: tuple = (), **kw) -> dict:
    aid = src.task_id()
    return {"tid": aid, "aid": aid, "fid": b"cls", "name": f"{name}.__init__",
            "class_name": name, "methods": {"f": 1}, "args": b"a", "deps": list(deps),
            "nested": [], "hold": {}, "place": {"CPU": 1.0}, **kw}


def _head(cpus: float = 4, *clients: str) -> SchedulerState:
    st = SchedulerState()
    for cid in (C,) + clients:
        st.handle(cid, {"op": "register_client", "kind": "driver"})
    st.handle("n1", {"op": "register_node", "node_id": "n1", "name": "n1",
                     "address": "tcp://127.0.0.1:1", "resources": {"CPU": cpus}})
    return st


def _call(st: SchedulerState, src: IdSource, aid: bytes, client: str = C) -> bytes:
    tid = src.task_id()
    st.handle(client, {"op": "submit", "tasks": [{
        "tid": tid, "fid": b"", "actor": aid, "method": "f", "name": "X.f", "args": b"x",
        "deps": [], "nested": [], "nret": 1, "res": {}, "retries": 0}]})
    return object_id(tid)


def _error_of(st: SchedulerState, oid: bytes) -> BaseException:
    obj = st.objects[oid]
    assert obj.state == "READY" and obj.error
    return deserialize(obj.inline)


def test_an_actor_dies_with_the_actor_that_created_it() -> None:
    from flowcore.exceptions import ActorDiedError
    src = IdSource()
    st = _head(4)
    st.handle("w-owner", {"op": "register_client", "kind": "worker", "pid": 11})
    owner = _actor_spec(src, "Owner")
    st.handle(C, {"op": "create_actor", "spec": owner, "rid": 1})
    st.handle("w-owner", {"op": "actor_ready", "aid": owner["aid"], "pid": 11})
    # the owner creates a child whose constructor waits for an argument
    never = object_id(src.task_id())
    st.handle("w-owner", {"op": "submit", "tasks": [{
        "tid": never[:16], "fid": b"f", "name": "never", "args": b"", "deps": [],
        "nret": 1, "res": {"CPU": 99.0}}]})
    child = _actor_spec(src, "Child", deps=(never,))
    st.handle("w-owner", {"op": "create_actor", "spec": child, "rid": 2})
    detached = _actor_spec(src, "Kept", detached=True)
    st.handle("w-owner", {"op": "create_actor", "spec": detached, "rid": 3})
    st.client_disconnected("w-owner")  # the owner's process ended
    assert st.actors[child["aid"]].state == "DEAD"
    assert "its owner, actor Owner" in st.actors[child["aid"]].cause
    assert st.actors[detached["aid"]].state != "DEAD"  # detached actors outlive it
    err = _error_of(st, _call(st, src, child["aid"]))
    assert isinstance(err, ActorDiedError) and "owner" in str(err)


def test_an_actor_dies_with_the_task_that_created_it_when_its_worker_crashes() -> None:
    src = IdSource()
    st = _head(4)
    st.handle("w-task", {"op": "register_client", "kind": "worker", "pid": 22})
    tid = src.task_id()
    st.handle(C, {"op": "submit", "tasks": [{"tid": tid, "fid": b"f", "name": "maker",
                                             "args": b"", "deps": [], "nret": 1,
                                             "res": {"CPU": 1.0}, "retries": 0}]})
    child = _actor_spec(src, "Child")
    st.handle("w-task", {"op": "create_actor", "spec": child, "rid": 1})
    # the task handed the handle to the driver
    st.handle(C, {"op": "incref", "oids": [actor_handle_id(child["aid"])]})
    st.client_disconnected("w-task")  # the crash is reported after the disconnect
    assert st.actors[child["aid"]].state != "DEAD"  # a pool worker may simply exit
    st.handle("n1", {"op": "worker_died", "tid": tid, "pid": 22, "how": "killed by SIGKILL"})
    assert st.actors[child["aid"]].state == "DEAD"
    assert "maker" in st.actors[child["aid"]].cause


@flowcore.remote(num_cpus=0)
class _Child:
    def f(self):
        return 1


@flowcore.remote(num_cpus=0)
class _Owner:
    def make(self):
        self.child = _Child.remote()
        flowcore.get(self.child.f.remote())
        return [self.child]


def test_calls_on_an_actor_whose_owner_actor_died_fail_with_actor_died_error(cluster2):
    from flowcore.exceptions import ActorDiedError
    owner = _Owner.remote()
    [child] = flowcore.get(owner.make.remote(), timeout=60)
    assert flowcore.get(child.f.remote(), timeout=60) == 1
    flowcore.kill(owner)
    deadline = time.monotonic() + 60
    with pytest.raises(ActorDiedError, match="owner"):
        while time.monotonic() < deadline:  # calls made before the head saw it may still run
            flowcore.get(child.f.remote(), timeout=60)


# ============================================== cancel of a task offered to its node
def _task(src: IdSource, **kw) -> dict:
    return {"tid": src.task_id(), "fid": b"f", "name": "spin", "args": b"", "deps": [],
            "nret": 1, "res": {"CPU": 1.0}, **kw}


def test_cancelling_a_task_offered_to_its_node_stops_it_there() -> None:
    src = IdSource()
    st = _head(1)
    spec = _task(src, local="n1")
    st.handle(C, {"op": "submit", "tasks": [spec]})
    out = st.handle(C, {"op": "cancel", "oid": object_id(spec["tid"]), "force": True})
    assert str(st.tasks[spec["tid"]].state) == "CANCELLED"
    # the node, which may have started it, is told to stop (or refuse) it
    assert ("n1", {"op": "cancel_task", "tid": spec["tid"], "force": True,
                   "local": True}) in out
    # its late "started" verdict takes nothing: the next task still gets the CPU
    st.handle("n1", {"op": "local_verdict", "tid": spec["tid"], "started": True})
    assert st.nodes["n1"].available["CPU"] == 1.0
    nxt = _task(src)
    st.handle(C, {"op": "submit", "tasks": [nxt]})
    assert str(st.tasks[nxt["tid"]].state) == "RUNNING"


@flowcore.remote
def _spin_or_return(spin):
    import time
    while spin:
        time.sleep(0.05)
    return "done"


def test_force_cancels_right_after_submission_leave_no_task_stuck(fresh_cluster):
    fresh_cluster(num_cpus=1)
    for _ in range(6):
        spinning = _spin_or_return.remote(True)
        flowcore.cancel(spinning, force=True)
        with pytest.raises(flowcore.exceptions.TaskCancelledError):
            flowcore.get(spinning, timeout=60)
        assert flowcore.get(_spin_or_return.remote(False), timeout=60) == "done"


# ============================================== memory as a resource
def test_memory_is_a_scheduling_quantity_and_too_much_is_infeasible() -> None:
    from flowcore.options import resource_request, validate, TASK
    assert resource_request({"memory": 300}) == {"CPU": 1.0, "memory": 300.0}
    with pytest.raises(ValueError, match="memory= option"):
        validate(TASK, {"resources": {"memory": 1}}, "f")
    src = IdSource()
    st = _head(4)
    st.handle("n1", {"op": "register_node", "node_id": "n1", "name": "n1",
                     "address": "tcp://127.0.0.1:1",
                     "resources": {"CPU": 4, "memory": 1000.0}})
    a, b = _task(src, res={"CPU": 1.0, "memory": 600.0}), _task(src, res={"memory": 600.0})
    st.handle(C, {"op": "submit", "tasks": [a, b]})
    assert str(st.tasks[a["tid"]].state) == "RUNNING"
    assert str(st.tasks[b["tid"]].state) == "QUEUED"  # waits for the first one's memory
    big = _task(src, res={"memory": 5000.0})
    st.handle(C, {"op": "submit", "tasks": [big]})
    assert str(st.tasks[big["tid"]].state) == "INFEASIBLE"
    st.handle(C, {"op": "create_placement_group", "pgid": src.task_id(), "rid": 1,
                  "bundles": [{"CPU": 1, "memory": 4000}], "strategy": "PACK"})
    [pg] = st.pgs.values()
    assert pg.state == "PENDING" and "infeasible" in pg.cause and "memory" in pg.cause


@flowcore.remote
class _Holder:
    def ping(self):
        return "up"


def test_memory_reserved_by_actors_and_bundles(private_cluster):
    private_cluster(nodes=1, cpus_per_node=2, memory=100 << 20)
    assert flowcore.cluster_resources()["memory"] == 100 << 20
    first = _Holder.options(memory=60 << 20, num_cpus=0).remote()
    assert flowcore.get(first.ping.remote(), timeout=60) == "up"
    second = _Holder.options(memory=60 << 20, num_cpus=0).remote()
    ping = second.ping.remote()
    assert not flowcore.wait([ping], timeout=0.5)[0]  # 40 MiB left: it waits
    flowcore.kill(first)
    assert flowcore.get(ping, timeout=60) == "up"
    pg = flowcore.placement_group([{"CPU": 1, "memory": 30 << 20}], strategy="STRICT_PACK")
    assert pg.wait(timeout_seconds=60)


# ============================================== get of ready objects keeps the CPU
def test_the_head_acknowledges_a_subscription_with_what_is_pending() -> None:
    src = IdSource()
    st = _head(1)
    ready_one = object_id(src.task_id())
    st.handle(C, {"op": "put", "oid": ready_one, "inline": b"v", "size": 1})
    waiting = _task(src, res={"CPU": 9.0})  # never runs: its result stays pending
    st.handle(C, {"op": "submit", "tasks": [waiting]})
    out = st.handle("w", {"op": "subscribe", "oids": [ready_one], "ack": 7})
    assert [m["op"] for _, m in out] == ["object_ready", "subscribed"]
    assert out[-1][1] == {"op": "subscribed", "ack": 7, "pending": 0}
    out = st.handle("w", {"op": "subscribe", "oids": [object_id(waiting["tid"])], "ack": 8})
    assert out == [("w", {"op": "subscribed", "ack": 8, "pending": 1})]


@flowcore.remote
def _total(refs):
    import os
    values = flowcore.get(refs)
    return sum(len(v) if isinstance(v, bytearray) else v for v in values), os.getpid()


def test_get_of_ready_objects_inside_a_task_keeps_the_cpu(fresh_cluster):
    fresh_cluster(num_cpus=1)
    refs = [flowcore.put(bytearray(200 << 10)) for _ in range(3)]  # in the store
    refs += [flowcore.put(i) for i in range(4)]  # inline
    out = flowcore.get([_total.remote(refs) for _ in range(15)], timeout=60)
    assert {total for total, _ in out} == {3 * (200 << 10) + 6}
    # a task that gave its CPU back would have made the node start another worker
    assert len({pid for _, pid in out}) == 1


# ============================================== actor restarts wait for a node
def test_an_actor_whose_node_died_waits_restarting_until_a_node_fits() -> None:
    from flowcore.scheduler.explain import explain
    src = IdSource()
    st = _head(1)
    spec = _actor_spec(src, "A", max_restarts=-1, place={"CPU": 1.0, "spot": 1.0},
                       hold={"spot": 1.0})
    st.handle("n2", {"op": "register_node", "node_id": "n2", "name": "n2",
                     "address": "tcp://127.0.0.1:2", "resources": {"CPU": 1, "spot": 1}})
    st.handle(C, {"op": "create_actor", "spec": spec, "rid": 1})
    st.handle("w-a", {"op": "actor_ready", "aid": spec["aid"], "pid": 5})
    assert st.actors[spec["aid"]].node == "n2"
    st.node_died("n2", "its connection was lost")
    actor = st.actors[spec["aid"]]
    assert actor.state == "RESTARTING"  # not dead: no node has "spot" right now
    call = _call(st, src, spec["aid"])
    why = explain(st, call)["text"]
    assert "RESTARTING" in why and "its node n2 died" in why
    assert "waits for a node that can hold" in why and "spot=1" in why
    out = st.handle("n3", {"op": "register_node", "node_id": "n3", "name": "n3",
                           "address": "tcp://127.0.0.1:3", "resources": {"CPU": 1, "spot": 1}})
    starts = [m for dest, m in out if dest == "n3" and m["op"] == "start_actor"]
    assert len(starts) == 1 and starts[0]["restart"] == 1
    out = st.handle("w-a2", {"op": "actor_ready", "aid": spec["aid"], "pid": 6})
    assert actor.state == "ALIVE" and actor.node == "n3"
    assert any(m["op"] == "run_task" and m["tid"] == call[:16] for _, m in out)
    assert st.nodes["n3"].available == {"CPU": 1.0, "spot": 0.0}  # holds what it asked


@flowcore.remote(max_restarts=1, max_task_retries=-1, num_cpus=0, resources={"spot": 1})
class _Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n


@pytest.mark.filterwarnings("ignore:actor _Counter cannot be placed:RuntimeWarning")
def test_actor_restarts_on_a_node_that_joins_after_its_node_died(private_cluster):
    cluster = private_cluster(nodes=1, cpus_per_node=1)
    spot = cluster.add_node(num_cpus=1, resources={"spot": 1})
    counter = _Counter.remote()
    assert flowcore.get(counter.incr.remote(), timeout=60) == 1
    cluster.kill_node(spot)
    call = counter.incr.remote()
    # it waits, RESTARTING, for a node with "spot" (none is left)
    deadline = time.monotonic() + 60
    while "waits for a node" not in flowcore.explain(call)["text"]:
        assert time.monotonic() < deadline, flowcore.explain(call)["text"]
        assert not flowcore.wait([call], timeout=0.1)[0]
    [row] = [a for a in flowcore.state.list_actors() if a["class_name"].endswith("_Counter")]
    assert row["state"] == "RESTARTING"
    cluster.add_node(num_cpus=1, resources={"spot": 1})
    assert flowcore.get(call, timeout=60) == 1  # the state started over


# ============================================== num_cpus=0 actors in CPU-less bundles
def test_a_num_cpus_0_actor_fits_a_bundle_without_cpu(cluster2):
    from flowcore import PlacementGroupSchedulingStrategy
    pg = flowcore.placement_group([{"memory": 1 << 20}])
    assert pg.wait(timeout_seconds=60)
    try:
        a = _Holder.options(num_cpus=0,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote()
        assert flowcore.get(a.ping.remote(), timeout=60) == "up"
        # the default placement CPU still applies when nothing is asked for
        with pytest.raises(ValueError, match="more than any bundle"):
            _Holder.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote()
    finally:
        flowcore.remove_placement_group(pg)


def test_killing_an_actor_that_waits_to_restart_ends_it_and_its_calls() -> None:
    from flowcore.exceptions import ActorDiedError
    src = IdSource()
    st = _head(1)
    spec = _actor_spec(src, "A", max_restarts=1, place={"spot": 1.0}, hold={"spot": 1.0})
    st.handle("n2", {"op": "register_node", "node_id": "n2", "name": "n2",
                     "address": "tcp://127.0.0.1:2", "resources": {"CPU": 1, "spot": 1}})
    st.handle(C, {"op": "create_actor", "spec": spec, "rid": 1})
    st.handle("w-a", {"op": "actor_ready", "aid": spec["aid"], "pid": 5})
    st.node_died("n2", "it stopped")
    call = _call(st, src, spec["aid"])
    st.handle(C, {"op": "kill_actor", "aid": spec["aid"]})
    assert st.actors[spec["aid"]].state == "DEAD"
    assert isinstance(_error_of(st, call), ActorDiedError)
    assert not st.infeasible  # its creation no longer waits for a node
