"""Head restart without processes: the persisted tables (``persist.py``) and
the recovery decisions of the state machine (``recovery.py``)."""
from __future__ import annotations

import os

from flowcore.exceptions import ObjectLostError
from flowcore.ids import IdSource, actor_handle_id, object_id
from flowcore.objects.serialization import deserialize
from flowcore.scheduler.machine import SchedulerState
from flowcore.scheduler.persist import TableFiles, state_path
from flowcore.scheduler.recovery import RECOVERING

OLD = "c1-100"   # the driver's client id under the old head
NEW = "c1-200"   # ... and under the new one


def ops(out: list, op: str) -> list[tuple[str, dict]]:
    return [(d, m) for d, m in out if m["op"] == op]


def node_msg(nid: str, objects: list | None = None, actors: list | None = None) -> dict:
    return {"op": "register_node", "node_id": nid, "name": nid, "address": f"tcp://{nid}:1",
            "resources": {"CPU": 2.0}, "objects": objects or [], "actors": actors or []}


def actor_spec(aid: bytes, name: str | None, *, detached: bool = True,
               max_restarts: int = 0) -> dict:
    return {"tid": aid, "aid": aid, "fid": b"cls-fid", "name": "A.__init__", "class_name": "A",
            "methods": {"f": 1}, "args": b"ctor-args", "deps": [], "nested": [], "hold": {},
            "place": {"CPU": 1.0}, "max_restarts": max_restarts, "max_task_retries": 0,
            "max_concurrency": 1, "actor_name": name, "detached": detached}


def old_head(tmp_path, *, max_restarts: int = 0) -> tuple[TableFiles, bytes, bytes]:
    """A head with a node n1, a driver, a function and a detached named actor
    on n1 that persisted its tables and then died."""
    ids = IdSource()
    s = SchedulerState()
    s.handle(OLD, {"op": "register_client", "kind": "driver", "pid": 1})
    s.handle("n1", node_msg("n1"))
    s.handle(OLD, {"op": "register_function", "fid": b"f" * 16, "blob": b"pickled", "name": "g"})
    s.handle(OLD, {"op": "register_function", "fid": b"cls-fid", "blob": b"cls", "name": "A"})
    aid = ids.task_id()
    s.handle(OLD, {"op": "create_actor", "rid": 1,
                   "spec": actor_spec(aid, "keeper", max_restarts=max_restarts)})
    s.handle("w-a", {"op": "register_client", "kind": "worker"})
    s.handle("w-a", {"op": "actor_ready", "aid": aid, "pid": 4242})
    files = TableFiles(state_path(str(tmp_path), 8786))
    assert files.save(s.persistent_tables(), s.functions)
    assert not files.save(s.persistent_tables(), s.functions)  # nothing changed: no write
    return files, aid, ids.task_id()


def restarted(files: TableFiles) -> SchedulerState:
    loaded = TableFiles(files.path).load()
    assert loaded is not None
    s = SchedulerState()
    s.restore_tables(*loaded)
    return s


def test_tables_round_trip_and_restore(tmp_path) -> None:
    files, aid, _ = old_head(tmp_path)
    assert oct(os.stat(os.path.join(files.path, "tables.msgpack")).st_mode & 0o777) == "0o600"
    s = restarted(files)
    assert s.function_blob(b"f" * 16) == b"pickled"
    assert s.actors[aid].state == RECOVERING
    assert s.get_actor("keeper", None)["aid"] == aid  # found before its node is back
    assert s.recovery is not None and set(s.recovery.nodes) == {"n1"}
    assert set(s.recovery.drivers) == {OLD}


def test_node_report_adopts_the_actor_and_rebuilds_objects(tmp_path) -> None:
    files, aid, tid = old_head(tmp_path)
    s = restarted(files)
    kept, unclaimed = object_id(tid, 0), object_id(tid, 1)
    stray = IdSource().task_id()
    out = s.handle("n1", node_msg("n1", objects=[[kept, 5000], [unclaimed, 7000]],
                                  actors=[[aid, 4242], [stray, 99]]))
    assert ops(out, "start_actor") == []  # adopted, not restarted
    assert [(d, m["aid"]) for d, m in ops(out, "kill_actor")] == [("n1", stray)]
    a = s.actors[aid]
    assert (a.state, a.node, a.pid, a.restarts) == ("ALIVE", "n1", 4242, 0)
    assert s.objects[kept].state == "READY" and s.objects[kept].nodes == {"n1"}
    # the driver reconnects holding one of them; the actor's process reconnects
    s.handle(NEW, {"op": "register_client", "kind": "driver", "previous_id": OLD,
                   "refs": [kept, actor_handle_id(aid)]})
    assert s.recovery is not None  # still waiting for the actor's process
    out = s.handle("w-a2", {"op": "register_client", "kind": "worker", "previous_id": "w-old",
                            "actor": aid})
    assert s.recovery is None  # everyone is back
    assert s.actors[aid].client == "w-a2"
    assert [m["oids"] for d, m in ops(out, "delete_objects")] == [[unclaimed]]
    assert kept in s.objects and unclaimed not in s.objects
    # calls go straight to the actor's process again
    call = {"tid": IdSource().task_id(), "fid": b"", "actor": aid, "method": "f", "name": "A.f",
            "args": b"x", "deps": [], "nested": [], "nret": 1, "res": {}, "retries": 0}
    out = s.handle(NEW, {"op": "submit", "tasks": [call]})
    assert [d for d, m in ops(out, "run_task")] == ["w-a2"]


def test_actor_whose_node_is_gone_restarts_from_its_spec(tmp_path) -> None:
    files, aid, _ = old_head(tmp_path, max_restarts=1)
    s = restarted(files)
    s.handle("n2", node_msg("n2"))  # a different node; n1 never comes back
    out = s.finish_recovery("the recovery window passed")
    starts = ops(out, "start_actor")
    assert [d for d, m in starts] == ["n2"]
    assert starts[0][1]["args"] == b"ctor-args" and starts[0][1]["fid"] == b"cls-fid"
    assert s.actors[aid].restarts == 1


def test_actor_without_restarts_left_is_dead_after_recovery(tmp_path) -> None:
    files, aid, _ = old_head(tmp_path, max_restarts=0)
    s = restarted(files)
    s.handle("n2", node_msg("n2"))
    s.finish_recovery("the recovery window passed")
    assert s.actors[aid].state == "DEAD"
    assert "head restarted" in s.actors[aid].cause
    assert s.get_actor("keeper", None) is None


def test_unfinished_tasks_and_unreported_objects_fail_naming_the_restart(tmp_path) -> None:
    files, _, tid = old_head(tmp_path)
    s = restarted(files)
    pending, missing = object_id(tid, 0), object_id(IdSource().task_id(), 0)
    out = s.handle(NEW, {"op": "register_client", "kind": "driver", "previous_id": OLD,
                         "refs": [pending, missing], "unfinished": [pending],
                         "subscribed": [missing]})
    err = deserialize(dict((m["oid"], m) for _, m in ops(out, "object_ready"))[pending]["inline"])
    assert isinstance(err, ObjectLostError) and err.reason == "head_restart"
    assert "submit it again" in str(err)
    out = s.finish_recovery("the recovery window passed")  # n1 never came back
    ready = [m for d, m in ops(out, "object_ready") if d == NEW]
    assert [m["oid"] for m in ready] == [missing]
    err = deserialize(ready[0]["inline"])
    assert err.reason == "head_restart" and "no node reported" in str(err)


def test_values_the_driver_kept_are_ready_again(tmp_path) -> None:
    files, _, tid = old_head(tmp_path)
    s = restarted(files)
    oid = object_id(tid, 0)
    s.handle(NEW, {"op": "register_client", "kind": "driver", "previous_id": OLD,
                   "refs": [oid], "values": [[oid, b"small", False]]})
    obj = s.objects[oid]
    assert (obj.state, obj.inline) == ("READY", b"small")


def test_a_node_rejoining_a_head_that_did_not_restart_drops_unknown_objects() -> None:
    s = SchedulerState()
    stray = object_id(IdSource().task_id(), 0)
    out = s.handle("n1", node_msg("n1", objects=[[stray, 10]]))
    assert [m["oids"] for d, m in ops(out, "delete_objects")] == [[stray]]
    assert stray not in s.objects


def test_clear_and_unreadable_tables(tmp_path) -> None:
    files, _, _ = old_head(tmp_path)
    with open(os.path.join(files.path, "tables.msgpack"), "wb") as f:
        f.write(b"\xc1not msgpack")
    assert TableFiles(files.path).load() is None  # a warning, and a fresh start
    files.clear()
    assert not os.path.exists(files.path)
    assert TableFiles(files.path).load() is None


def test_rejoin_message_leaves_out_tasks_not_sent_yet() -> None:
    from flowcore.client.core import CoreClient
    c = CoreClient("tcp://127.0.0.1:1", b"token", None)
    try:
        ids = IdSource()
        sent, unsent, put = ids.task_id(), ids.task_id(), ids.task_id()
        c.client_id = OLD
        for tid in (sent, unsent):
            c.refcounts[object_id(tid, 0)] = 1
            c.expected.add(object_id(tid, 0))
        c.refcounts[object_id(put, 0)] = 1
        c.ready[object_id(put, 0)] = {"oid": object_id(put, 0), "inline": b"v", "error": False}
        msg = c.rejoin_message([{"op": "submit", "tasks": [{"tid": unsent}]}])
        assert msg["previous_id"] == OLD
        assert set(msg["refs"]) == {object_id(sent, 0), object_id(put, 0)}
        assert msg["unfinished"] == [object_id(sent, 0)]
        assert msg["values"] == [[object_id(put, 0), b"v", False]]
    finally:
        c.loop.close()


def _leased_task(ids: IdSource, **kw) -> dict:
    return dict({"tid": ids.task_id(), "fid": b"f" * 16, "name": "g", "args": b"args",
                 "deps": [], "nested": [], "nret": 1, "res": {"CPU": 1.0}, "retries": 0,
                 "retry_exc": False}, **kw)


def test_leased_tasks_of_a_node_not_back_yet_wait_for_it_not_placed_twice(tmp_path) -> None:
    """After a head restart, a driver sends tasks to the worker it leases
    from n1 before n1 has re-registered: that worker runs them, so the head
    records them there once n1 is back, instead of placing them again (they
    would run twice).  Tasks queued at the owner for n1 likewise."""
    from flowcore.scheduler.states import TaskState
    files, _, _ = old_head(tmp_path)
    s = restarted(files)
    s.validate = True
    s.handle(NEW, {"op": "register_client", "kind": "driver", "previous_id": OLD})
    ids = IdSource()
    sent, queued, handed_back, done_early = (_leased_task(ids) for _ in range(4))
    sent["lease"] = ["n1", "w1"]
    done_early["lease"] = ["n1", "w1", 1]
    queued["lease_q"] = "n1"
    handed_back["lease_q"] = "n1"
    out = s.handle(NEW, {"op": "submit", "tasks": [sent, done_early, queued, handed_back]})
    assert not ops(out, "run_task") and not s.queues
    tasks = {k: s.tasks[spec["tid"]] for k, spec in
             (("sent", sent), ("queued", queued), ("back", handed_back), ("early", done_early))}
    assert all(t.state == TaskState.QUEUED for t in tasks.values())
    assert "has not re-registered since the head restarted" in tasks["sent"].cause
    # the owner sends a queued one to its leased worker; hands another back
    s.handle(NEW, {"op": "lease_start", "lease": ["n1", "w1"], "tids": [queued["tid"]],
                   "busy": 2})
    out = s.handle(NEW, {"op": "lease_unrun", "tids": [handed_back["tid"]]})
    assert tasks["back"].state == TaskState.QUEUED and handed_back["tid"] in \
        [tid for q in s.queues.values() for tid in q]  # the head places that one
    # the worker (reconnected before its node) reports one done
    s.handle("w-new", {"op": "task_done", "tid": done_early["tid"], "status": "ok",
                       "answered_direct": True, "retryable": False,
                       "results": [{"oid": object_id(done_early["tid"]), "size": 1,
                                    "inline": b"v", "error": False, "nested": [],
                                    "sent": True}]})
    assert tasks["early"].state == TaskState.QUEUED
    # n1 re-registers: they run there, on the lease, none dispatched again
    out = s.handle("n1", node_msg("n1"))
    assert [m["tid"] for _, m in ops(out, "run_task")] == [handed_back["tid"]]
    assert tasks["sent"].state == tasks["queued"].state == TaskState.RUNNING
    assert tasks["sent"].node == tasks["queued"].node == "n1"
    assert tasks["early"].state == TaskState.FINISHED
    assert not s.leases.parked and not s.leases.parked_tids


def test_leased_tasks_of_a_node_that_never_comes_back_are_placed_when_recovery_ends(
        tmp_path) -> None:
    from flowcore.scheduler.states import TaskState
    files, _, _ = old_head(tmp_path)
    s = restarted(files)
    s.handle(NEW, {"op": "register_client", "kind": "driver", "previous_id": OLD})
    ids = IdSource()
    spec = _leased_task(ids, lease=["n1", "w1"])
    s.handle(NEW, {"op": "submit", "tasks": [spec]})
    t = s.tasks[spec["tid"]]
    assert t.state == TaskState.QUEUED and not s.queues
    s.handle("n2", node_msg("n2"))  # another node joins; n1 never does
    out = s.finish_recovery("the recovery window passed")
    assert [m["tid"] for d, m in ops(out, "run_task") if d == "n2"] == [spec["tid"]]
    assert "did not come back after the head restart" in \
        [e["cause"] for e in s.log.for_task(spec["tid"])][-2]
