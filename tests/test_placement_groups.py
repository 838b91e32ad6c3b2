"""Placement groups through the public API on a real LocalCluster of 2-3
nodes (the head's logic is unit-tested in test_placement_group_machine.py)."""
from __future__ import annotations

import pickle
import time

import pytest

import flowcore
from flowcore.exceptions import PlacementGroupError, TaskCancelledError
from flowcore.scheduling import PlacementGroupSchedulingStrategy as In

pytestmark = pytest.mark.timeout(180)


@flowcore.remote
def where() -> str:
    return flowcore.get_runtime_context().get_node_id()


@flowcore.remote
class Where:
    def node(self) -> str:
        return flowcore.get_runtime_context().get_node_id()

    def group(self):
        pg = flowcore.get_current_placement_group()
        return pg.id if pg is not None else None


def bundle_nodes(pg) -> list[str]:
    row = [r for r in flowcore.state.list_placement_groups()
           if r["placement_group_id"] == pg.id.hex()][0]
    return [row["bundles_to_node_id"][i] for i in range(len(row["bundles"]))]


def until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for the cluster"
        time.sleep(0.05)


def test_pack_and_strict_pack_use_one_node(private_cluster):
    cluster = private_cluster(2, cpus_per_node=2)
    pg = flowcore.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert flowcore.get(pg.ready(), timeout=60) == pg
    assert len(set(bundle_nodes(pg))) == 1
    strict = flowcore.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")
    assert strict.wait(60)
    assert len(set(bundle_nodes(strict))) == 1
    assert set(bundle_nodes(pg)) != set(bundle_nodes(strict))
    assert flowcore.available_resources().get("CPU", 0) == 0
    # tasks in the bundles run on the bundles' node
    for g in (pg, strict):
        node = bundle_nodes(g)[0]
        got = flowcore.get([where.options(scheduling_strategy=In(g, i)).remote()
                            for i in (0, 1, -1)], timeout=60)
        assert got == [node] * 3
    assert sorted(set(bundle_nodes(pg)) | set(bundle_nodes(strict))) == sorted(cluster.node_ids())


def test_spread_and_strict_spread_use_distinct_nodes(private_cluster):
    private_cluster(3, cpus_per_node=1)
    spread = flowcore.placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="SPREAD")
    assert spread.wait(60)
    assert len(set(bundle_nodes(spread))) == 2
    strict = flowcore.placement_group([{"CPU": 0.5}] * 3, strategy="STRICT_SPREAD")
    assert strict.wait(60)
    nodes = bundle_nodes(strict)
    assert len(set(nodes)) == 3
    got = flowcore.get([where.options(scheduling_strategy=In(strict, i, False),
                                      num_cpus=0.5).remote() for i in range(3)], timeout=60)
    assert got == nodes


def test_strict_spread_stays_pending_until_a_node_joins(private_cluster):
    cluster = private_cluster(2, cpus_per_node=1)
    with pytest.warns(RuntimeWarning, match="infeasible"):
        pg = flowcore.placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        # the warning comes in the reply's batch, before this query's answer
        row = flowcore.state.list_placement_groups()[0]
    ready, _ = flowcore.wait([pg.ready()], timeout=0.5)
    assert row["state"] == "PENDING" and row["feasible"] is False
    assert "infeasible" in row["cause"]
    assert ready == []
    why = flowcore.explain(pg.ready())
    assert why["state"] == "PENDING" and "infeasible" in why["text"]
    assert flowcore.available_resources()["CPU"] == 2  # nothing was taken
    assert pg.wait(0) is False
    new = cluster.add_node(num_cpus=1)
    assert flowcore.get(pg.ready(), timeout=60) == pg
    assert new in bundle_nodes(pg) and len(set(bundle_nodes(pg))) == 3
    assert flowcore.state.list_placement_groups(state="CREATED")[0]["feasible"] is True


def test_reservation_is_atomic(private_cluster):
    private_cluster(2, cpus_per_node=2)
    first = flowcore.placement_group([{"CPU": 2}], strategy="STRICT_PACK")
    assert first.wait(60)
    # fits only if 2 CPUs are free on each node: one node is full, so none is taken
    second = flowcore.placement_group([{"CPU": 2}, {"CPU": 2}], strategy="STRICT_SPREAD")
    assert second.wait(0.5) is False
    assert flowcore.available_resources()["CPU"] == 2
    row = [r for r in flowcore.state.list_placement_groups()
           if r["placement_group_id"] == second.id.hex()][0]
    assert row["state"] == "PENDING" and row["feasible"] is True
    assert set(row["bundles_to_node_id"].values()) == {None}
    flowcore.remove_placement_group(first)  # resources free up: second is placed
    assert second.wait(60)
    assert flowcore.available_resources().get("CPU", 0) == 0


def test_actors_in_bundles_and_removal_kills_them(private_cluster):
    private_cluster(2, cpus_per_node=2)
    pg = flowcore.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    assert pg.wait(60)
    nodes = bundle_nodes(pg)
    actors = [Where.options(num_cpus=1, scheduling_strategy=In(pg, i)).remote()
              for i in (0, 1)]
    assert flowcore.get([a.node.remote() for a in actors], timeout=60) == nodes
    # every call, whether through the head or straight to the actor's process
    for _ in range(5):
        assert flowcore.get(actors[0].group.remote(), timeout=60) == pg.id
    assert flowcore.available_resources().get("CPU", 0) == 2  # the bundles' spare halves
    flowcore.remove_placement_group(pg)
    with pytest.raises(flowcore.exceptions.ActorDiedError, match="placement group was removed"):
        flowcore.get(actors[0].node.remote(), timeout=60)
    until(lambda: flowcore.available_resources().get("CPU", 0) == 4)
    assert flowcore.state.list_placement_groups()[0]["state"] == "REMOVED"
    with pytest.raises(PlacementGroupError, match="removed"):
        flowcore.get(where.options(scheduling_strategy=In(pg)).remote(), timeout=60)


def test_removal_cancels_running_tasks_and_frees_resources(private_cluster):
    from flowcore.testing import Signal
    private_cluster(2, cpus_per_node=1)
    pg = flowcore.placement_group([{"CPU": 1}], strategy="PACK")
    assert pg.wait(60)
    release = Signal()

    @flowcore.remote
    def hold(release):
        release.wait(120)
        return "done"
    ref = hold.options(scheduling_strategy=In(pg, 0)).remote(release)
    release.wait_for_waiters(1, timeout=60)  # it runs, in its bundle
    assert flowcore.available_resources()["CPU"] == 1
    flowcore.remove_placement_group(pg)
    with pytest.raises(TaskCancelledError):
        flowcore.get(ref, timeout=60)
    until(lambda: flowcore.available_resources().get("CPU", 0) == 2)
    release.set()
    release.close()
    # the nodes take ordinary work again
    assert len(flowcore.get([where.remote() for _ in range(4)], timeout=60)) == 4


def test_bundle_tasks_queue_within_their_bundle(private_cluster):
    private_cluster(1, cpus_per_node=2)
    pg = flowcore.placement_group([{"CPU": 1}])
    assert pg.wait(60)

    @flowcore.remote
    def who():
        import os
        return os.getpid()
    pids = flowcore.get([who.options(scheduling_strategy=In(pg, 0)).remote()
                         for _ in range(6)], timeout=60)
    assert len(pids) == 6
    # the node's free CPU was never used by the bundle's tasks
    assert flowcore.available_resources()["CPU"] == 1


def test_capture_child_tasks(private_cluster):
    private_cluster(2, cpus_per_node=2)
    pg = flowcore.placement_group([{"CPU": 2}], strategy="STRICT_PACK")
    assert pg.wait(60)
    node = bundle_nodes(pg)[0]

    @flowcore.remote
    def parent():
        return flowcore.get([where.remote() for _ in range(4)], timeout=60)
    got = flowcore.get(parent.options(num_cpus=1, scheduling_strategy=In(
        pg, 0, placement_group_capture_child_tasks=True)).remote(), timeout=60)
    assert got == [node] * 4


def test_named_groups_and_serialisation(private_cluster):
    private_cluster(1, cpus_per_node=2)
    pg = flowcore.placement_group([{"CPU": 1}], name="trainers", lifetime="detached")
    assert pg.wait(60)
    same = flowcore.get_placement_group("trainers")
    assert same == pg and same.bundle_specs == [{"CPU": 1.0}]
    assert pickle.loads(pickle.dumps(pg)) == pg

    @flowcore.remote
    def inside(g):
        return flowcore.get(where.options(scheduling_strategy=In(g, 0)).remote()), \
            flowcore.get(g.ready()).id
    node, gid = flowcore.get(inside.options(num_cpus=0.5).remote(pg), timeout=60)
    assert gid == pg.id and node == bundle_nodes(pg)[0]
    with pytest.raises(ValueError, match="already exists"):
        flowcore.placement_group([{"CPU": 1}], name="trainers")
    flowcore.remove_placement_group(pg)
    with pytest.raises(ValueError, match="no placement group named"):
        flowcore.get_placement_group("trainers")


def test_bad_input_is_refused_with_clear_errors(private_cluster):
    private_cluster(1, cpus_per_node=2)
    with pytest.raises(ValueError, match="non-empty list"):
        flowcore.placement_group([])
    with pytest.raises(ValueError, match="STRICT_SPREAD"):
        flowcore.placement_group([{"CPU": 1}], strategy="BALANCED")
    with pytest.raises(ValueError, match=">= 0"):
        flowcore.placement_group([{"CPU": -1}])
    with pytest.raises(ValueError, match="non-empty dict"):
        flowcore.placement_group([{}])
    with pytest.raises(ValueError, match="lifetime"):
        flowcore.placement_group([{"CPU": 1}], lifetime="forever")
    pg = flowcore.placement_group([{"CPU": 1}, {"CPU": 1}])
    with pytest.raises(ValueError, match="out of range"):
        In(pg, 2)
    with pytest.raises(TypeError, match="PlacementGroup"):
        In("not a group")
    with pytest.raises(ValueError, match="more than bundle 0"):
        where.options(num_cpus=2, scheduling_strategy=In(pg, 0)).remote()
    with pytest.raises(ValueError, match="more than any bundle"):
        Where.options(num_cpus=2, scheduling_strategy=In(pg)).remote()
    with pytest.raises(TypeError, match="PlacementGroup"):
        flowcore.remove_placement_group("x")
    assert pg.wait(60)


def test_bundles_of_a_dead_node_are_placed_again(private_cluster):
    cluster = private_cluster(2, cpus_per_node=1)
    pg = flowcore.placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    assert pg.wait(60)
    lost = bundle_nodes(pg)[1]
    with pytest.warns(RuntimeWarning, match="infeasible"):  # one node cannot hold both
        cluster.kill_node(lost)
        until(lambda: flowcore.state.list_placement_groups()[0]["state"] == "RESCHEDULING")
    new = cluster.add_node(num_cpus=1)
    until(lambda: flowcore.state.list_placement_groups()[0]["state"] == "CREATED")
    assert bundle_nodes(pg)[1] == new
    assert flowcore.get(where.options(scheduling_strategy=In(pg, 1)).remote(),
                        timeout=60) == new
    flowcore.remove_placement_group(pg)
    until(lambda: flowcore.available_resources().get("CPU", 0) == 2)
