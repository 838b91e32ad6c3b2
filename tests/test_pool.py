"""Unit tests of the node's IO-free worker pool (``flowcore.node.pool.WorkerPool``)."""
from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from flowcore.node.pool import BUSY, IDLE, STARTING, WorkerPool

_tids = itertools.count(1)


def task(**res: float) -> dict:
    return {"tid": next(_tids).to_bytes(16, "big"), "res": res or {"CPU": 1.0}}


def kinds(actions: list, kind: str) -> list[tuple]:
    return [a for a in actions if a[0] == kind]


def spawned(actions: list) -> list[str]:
    return [a[1] for a in actions if a[0] == "spawn"]


def ran(actions: list) -> list[tuple[str, bytes]]:
    return [(a[1], a[2]["tid"]) for a in actions if a[0] == "run"]


def ready_pool(resources: dict, **kw: Any) -> WorkerPool:
    """A pool whose warm workers have all started."""
    pool = WorkerPool(resources, **kw)
    for i, wid in enumerate(spawned(pool.startup())):
        assert pool.worker_ready(wid, 1000 + i) == []
    return pool


def test_startup_spawns_min_workers() -> None:
    pool = WorkerPool({"CPU": 3.0})
    actions = pool.startup()
    assert len(spawned(actions)) == 3 and len(set(spawned(actions))) == 3
    assert actions == [("spawn", wid) for wid in spawned(actions)]
    assert all(w.state == STARTING for w in pool.workers.values())
    assert WorkerPool({"CPU": 0.5}).min_workers == 1
    assert WorkerPool({}).min_workers == 1
    assert len(spawned(WorkerPool({"CPU": 8.0}, min_workers=2).startup())) == 2


def test_worker_ready_records_pid_and_goes_idle() -> None:
    pool = WorkerPool({"CPU": 1.0})
    (wid,) = spawned(pool.startup())
    assert pool.worker_ready(wid, 4321) == []
    assert pool.workers[wid].state == IDLE and pool.workers[wid].pid == 4321
    assert pool.worker_ready("nope", 1) == []


def test_task_runs_on_an_idle_worker() -> None:
    pool = ready_pool({"CPU": 2.0})
    t = task(CPU=1.0)
    actions = pool.task_arrived(t)
    assert len(actions) == 1
    kind, wid, sent = actions[0]
    assert kind == "run" and sent is t and t["gpu_ids"] == []
    w = pool.workers[wid]
    assert w.state == BUSY and w.task is t and w.tasks_run == 1
    assert pool.available["CPU"] == pytest.approx(1.0)
    assert pool.find_task(t["tid"]) == (wid, t)
    assert pool.snapshot()["busy"] == 1 and pool.snapshot()["idle"] == 1


def test_task_arriving_before_workers_start_waits_for_the_starting_one() -> None:
    pool = WorkerPool({"CPU": 1.0})
    (wid,) = spawned(pool.startup())
    t = task()
    assert pool.task_arrived(t) == []  # a worker is already starting for it
    assert list(pool.queue) == [t]
    assert pool.find_task(t["tid"]) == (None, t)
    assert ran(pool.worker_ready(wid, 7)) == [(wid, t["tid"])]
    assert not pool.queue


def test_tasks_beyond_resources_wait_and_run_when_a_worker_goes_idle() -> None:
    pool = ready_pool({"CPU": 2.0})
    a, b, c = task(), task(), task()
    ra = pool.task_arrived(a)
    rb = pool.task_arrived(b)
    rc = pool.task_arrived(c)
    assert len(ran(ra)) == 1 and len(ran(rb)) == 1
    assert rc == []  # no spawn: c does not fit while a and b run
    assert list(pool.queue) == [c]
    assert pool.available["CPU"] == pytest.approx(0.0)
    wid_a = ran(ra)[0][0]
    actions = pool.worker_idle(wid_a)
    assert ran(actions) == [(wid_a, c["tid"])]
    assert not spawned(actions) and not kinds(actions, "retire")
    assert pool.available["CPU"] == pytest.approx(0.0)


def test_no_worker_is_spawned_for_tasks_that_do_not_fit() -> None:
    pool = ready_pool({"CPU": 1.0, "GPU": 1.0}, gpu_ids=[0])
    pool.task_arrived(task(CPU=1.0))
    actions: list = []
    for _ in range(5):
        actions += pool.task_arrived(task(CPU=1.0))
    actions += pool.task_arrived(task(CPU=4.0))       # never fits here
    actions += pool.task_arrived(task(CPU=0.0, TPU=1.0))  # resource the node lacks
    assert spawned(actions) == [] and ran(actions) == []
    assert len(pool.workers) == 1 and len(pool.queue) == 7


def test_queued_task_that_fits_is_not_stuck_behind_one_that_does_not() -> None:
    pool = ready_pool({"CPU": 2.0, "GPU": 1.0}, gpu_ids=[0])
    big = task(CPU=2.0)
    gpu = task(CPU=1.0, GPU=1.0)
    pool.task_arrived(gpu)
    assert pool.task_arrived(big) == []
    small = task(CPU=1.0)
    assert ran(pool.task_arrived(small))[0][1] == small["tid"]
    assert list(pool.queue) == [big]


def test_blocked_worker_gives_cpu_back_and_a_new_worker_starts() -> None:
    pool = ready_pool({"CPU": 1.0})
    a, b = task(), task()
    (wa, _), = ran(pool.task_arrived(a))
    assert pool.task_arrived(b) == []
    actions = pool.worker_blocked(wa, True)
    (wb,) = spawned(actions)
    assert pool.workers[wa].blocked and pool.counts()["blocked"] == 1
    # blocking again changes nothing
    assert pool.worker_blocked(wa, True) == []
    assert ran(pool.worker_ready(wb, 2)) == [(wb, b["tid"])]
    assert pool.available["CPU"] == pytest.approx(0.0)
    # a takes its CPU again: the node is oversubscribed until one finishes
    assert pool.worker_blocked(wa, False) == []
    assert pool.available["CPU"] == pytest.approx(-1.0)
    # the extra worker retires when it goes idle
    assert pool.worker_idle(wb) == [("retire", wb)]
    assert wb not in pool.workers
    assert pool.worker_idle(wa) == []
    assert pool.available["CPU"] == pytest.approx(1.0)
    assert len(pool.workers) == 1


def test_blocked_worker_finishing_without_unblocking_returns_the_rest() -> None:
    pool = ready_pool({"CPU": 2.0, "GPU": 1.0}, gpu_ids=[0])
    t = task(CPU=1.0, GPU=1.0)
    (wid, _), = ran(pool.task_arrived(t))
    pool.worker_blocked(wid, True)
    assert pool.available == pytest.approx({"CPU": 2.0, "GPU": 0.0})
    pool.worker_idle(wid)
    assert pool.available == pytest.approx({"CPU": 2.0, "GPU": 1.0})
    assert pool.free_gpus == [0]


def test_blocked_on_idle_or_unknown_worker_is_ignored() -> None:
    pool = ready_pool({"CPU": 1.0})
    (wid,) = list(pool.workers)
    assert pool.worker_blocked(wid, True) == []
    assert pool.worker_blocked("ghost", True) == []
    assert pool.available["CPU"] == pytest.approx(1.0)


def test_max_workers_cap_warns_once() -> None:
    pool = ready_pool({"CPU": 1.0}, max_workers=2, min_workers=1)
    tasks = [task() for _ in range(4)]
    (w1, _), = ran(pool.task_arrived(tasks[0]))
    pool.task_arrived(tasks[1])
    (w2,) = spawned(pool.worker_blocked(w1, True))
    assert ran(pool.worker_ready(w2, 2)) == [(w2, tasks[1]["tid"])]
    pool.task_arrived(tasks[2])
    actions = pool.worker_blocked(w2, True)
    assert spawned(actions) == []
    (warn,) = kinds(actions, "warn")
    assert "max_workers" in warn[1] and "2 workers" in warn[1] and "2 of them blocked" in warn[1]
    more = pool.task_arrived(tasks[3])
    more += pool.worker_blocked(w1, False)
    more += pool.worker_blocked(w1, True)
    assert kinds(more, "warn") == [] and spawned(more) == []
    assert len(pool.workers) == 2


def test_gpu_ids_are_assigned_and_returned() -> None:
    pool = ready_pool({"CPU": 4.0, "GPU": 2.0}, gpu_ids=[0, 1], min_workers=4)
    a, b, c = (task(CPU=1.0, GPU=1.0) for _ in range(3))
    (wa, _), = ran(pool.task_arrived(a))
    (wb, _), = ran(pool.task_arrived(b))
    assert pool.task_arrived(c) == []
    assert sorted(a["gpu_ids"] + b["gpu_ids"]) == [0, 1]
    assert len(a["gpu_ids"]) == 1 and pool.workers[wa].gpus == a["gpu_ids"]
    assert pool.free_gpus == []
    actions = pool.worker_idle(wa)
    assert ran(actions) == [(wa, c["tid"])]
    assert c["gpu_ids"] == a["gpu_ids"]
    pool.worker_idle(wb)
    pool.worker_idle(wa)
    assert pool.free_gpus == [0, 1]
    both = task(CPU=1.0, GPU=2.0)
    (wid, _), = ran(pool.task_arrived(both))
    assert both["gpu_ids"] == [0, 1]
    cpu_only = task(CPU=1.0)
    pool.task_arrived(cpu_only)
    assert cpu_only["gpu_ids"] == []
    pool.worker_idle(wid)
    assert pool.free_gpus == [0, 1]
    assert pool.available["GPU"] == pytest.approx(2.0)


def test_worker_died_reports_its_task_and_is_replaced() -> None:
    pool = ready_pool({"CPU": 1.0, "GPU": 1.0}, gpu_ids=[0])
    t = task(CPU=1.0, GPU=1.0)
    (wid, _), = ran(pool.task_arrived(t))
    queued = task(CPU=1.0)
    pool.task_arrived(queued)
    actions = pool.worker_died(wid)
    assert ("died", t, wid) in actions
    (new,) = spawned(actions)
    assert new != wid and wid not in pool.workers
    assert pool.available == pytest.approx({"CPU": 1.0, "GPU": 1.0})
    assert pool.free_gpus == [0]
    assert ran(pool.worker_ready(new, 9)) == [(new, queued["tid"])]
    assert pool.worker_died("ghost") == []


def test_idle_worker_death_is_replaced_without_a_died_report() -> None:
    pool = ready_pool({"CPU": 2.0})
    wid = next(iter(pool.workers))
    actions = pool.worker_died(wid)
    assert kinds(actions, "died") == [] and len(spawned(actions)) == 1
    assert len(pool.workers) == 2


def test_blocked_worker_death_restores_resources_exactly() -> None:
    pool = ready_pool({"CPU": 1.0})
    t = task()
    (wid, _), = ran(pool.task_arrived(t))
    pool.worker_blocked(wid, True)
    pool.worker_died(wid)
    assert pool.available["CPU"] == pytest.approx(1.0)


def test_repeated_startup_failures_stop_respawning_with_one_warning() -> None:
    pool = WorkerPool({"CPU": 1.0})
    (wid,) = spawned(pool.startup())
    warnings: list = []
    for i in range(1, pool.max_startup_failures + 1):
        actions = pool.worker_died(wid)
        warnings += kinds(actions, "warn")
        if i < pool.max_startup_failures:
            (wid,) = spawned(actions)
        else:
            assert spawned(actions) == []
    assert len(warnings) == 1 and "died before registering" in warnings[0][1]
    assert pool.workers == {}
    # nothing more is spawned, even for work that arrives later
    assert pool.task_arrived(task()) == []
    assert pool.workers == {}


def test_a_successful_start_resets_the_failure_count() -> None:
    pool = WorkerPool({"CPU": 1.0})
    (wid,) = spawned(pool.startup())
    for _ in range(pool.max_startup_failures - 1):
        (wid,) = spawned(pool.worker_died(wid))
    pool.worker_ready(wid, 1)
    assert pool.startup_failures == 0
    for _ in range(pool.max_startup_failures - 1):
        actions = pool.worker_died(wid)
        assert kinds(actions, "warn") == []
        (wid,) = spawned(actions)


def test_extra_workers_retire_only_down_to_min_and_not_while_work_waits() -> None:
    pool = ready_pool({"CPU": 2.0}, min_workers=1)
    a, b, c = task(), task(), task()
    (w1, _), = ran(pool.task_arrived(a))
    (w2,) = spawned(pool.task_arrived(b))  # fits, no idle worker: one more starts
    pool.worker_ready(w2, 2)
    assert pool.workers[w2].state == BUSY
    assert pool.task_arrived(c) == []
    # w1 frees: c runs on it, nobody retires
    actions = pool.worker_idle(w1)
    assert ran(actions) == [(w1, c["tid"])] and kinds(actions, "retire") == []
    assert pool.worker_idle(w2) == [("retire", w2)]
    assert pool.worker_idle(w1) == []  # the last one stays warm
    assert list(pool.workers) == [w1] and pool.workers[w1].state == IDLE


def test_workers_that_went_idle_while_work_waited_retire_once_the_queue_drains() -> None:
    pool = ready_pool({"CPU": 2.0}, min_workers=1)
    a, b, big = task(), task(), task(CPU=2.0)
    (w1, _), = ran(pool.task_arrived(a))
    (w2,) = spawned(pool.task_arrived(b))
    pool.worker_ready(w2, 2)
    assert pool.task_arrived(big) == []  # waits for both CPUs
    # w1 goes idle while big still waits: it stays (work is queued)
    assert pool.worker_idle(w1) == []
    # w2 goes idle: big runs on one of them; the queue is now empty, so the
    # other (idle since before) retires
    actions = pool.worker_idle(w2)
    ((wbig, _),) = ran(actions)
    assert kinds(actions, "retire") == [("retire", ({w1, w2} - {wbig}).pop())]
    assert list(pool.workers) == [wbig]
    # big ends: the last worker stays warm
    assert pool.worker_idle(wbig) == []
    assert list(pool.workers) == [wbig] and pool.workers[wbig].state == IDLE


def test_drop_queued() -> None:
    pool = ready_pool({"CPU": 1.0})
    pool.task_arrived(task())
    t = task()
    pool.task_arrived(t)
    assert pool.drop_queued(t["tid"]) is t
    assert pool.drop_queued(t["tid"]) is None
    assert pool.find_task(t["tid"]) == (None, None)


# ---------------------------------------------------------------- random sequences
SHAPES = [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0},
          {"CPU": 0.0}]
TOTAL = {"CPU": 2.0, "GPU": 1.0}


def check(pool: WorkerPool) -> None:
    expected = dict(pool.total)
    used_gpus: list[int] = []
    for w in pool.workers.values():
        if w.state == BUSY:
            assert w.task is not None
            for k, v in (w.task.get("res") or {}).items():
                if v and not (w.blocked and k == "CPU"):
                    expected[k] = expected.get(k, 0.0) - v
            used_gpus += w.gpus
        else:
            assert w.task is None and not w.gpus and not w.blocked
    for k in set(expected) | set(pool.available):
        assert pool.available.get(k, 0.0) == pytest.approx(expected.get(k, 0.0), abs=1e-6)
    assert sorted(used_gpus + pool.free_gpus) == [0]
    assert len(pool.workers) <= pool.max_workers


events = st.lists(st.tuples(st.sampled_from(["task", "ready", "idle", "block", "unblock",
                                             "die", "reap"]),
                            st.integers(0, 10), st.sampled_from(SHAPES)), max_size=60)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(events, st.sampled_from([(0, 0.0, 0.0), (2, 1.0, 0.0), (2, 1.0, 1.5), (1, 0.0, 2.0)]))
def test_random_event_sequences_keep_the_books_straight(evs: list, spares: tuple) -> None:
    pool = WorkerPool(dict(TOTAL), max_workers=4, gpu_ids=[0], min_workers=1,
                      spare_workers=spares[0], idle_grace=spares[1], warm_grace=spares[2])
    now = [0.0]
    pool.clock = lambda: now[0]
    out = pool.startup()
    died: list[bytes] = []
    running: dict[bytes, str] = {}

    def apply(actions: list) -> None:
        for a in actions:
            if a[0] == "run":
                assert a[2]["tid"] not in running
                running[a[2]["tid"]] = a[1]
            elif a[0] == "died":
                died.append(a[1]["tid"])
                running.pop(a[1]["tid"])

    apply(out)
    for kind, pick, shape in evs:
        def nth(state: str, blocked: bool | None = None) -> str | None:
            ws = sorted(w.wid for w in pool.workers.values() if w.state == state
                        and (blocked is None or w.blocked == blocked))
            return ws[pick % len(ws)] if ws else None

        if kind == "task":
            t = task(**shape)
            apply(pool.task_arrived(t))
        elif kind == "ready" and (wid := nth(STARTING)):
            apply(pool.worker_ready(wid, 1))
        elif kind == "idle" and (wid := nth(BUSY)):
            running.pop(pool.workers[wid].task["tid"])
            apply(pool.worker_idle(wid))
        elif kind in ("block", "unblock") and (wid := nth(BUSY)):
            apply(pool.worker_blocked(wid, kind == "block"))
        elif kind == "die" and pool.workers:
            wid = sorted(pool.workers)[pick % len(pool.workers)]
            apply(pool.worker_died(wid))
        elif kind == "reap":
            now[0] += pick * 0.25
            apply(pool.reap()[0])
        check(pool)
    # drain: start every worker, finish every task
    for _ in range(500):
        starting = [w.wid for w in pool.workers.values() if w.state == STARTING]
        busy = [w.wid for w in pool.workers.values() if w.state == BUSY]
        if not starting and not busy:
            break
        for wid in starting:
            apply(pool.worker_ready(wid, 1))
        for wid in busy:
            if wid in pool.workers and pool.workers[wid].state == BUSY:
                running.pop(pool.workers[wid].task["tid"])
                apply(pool.worker_idle(wid))
        check(pool)
    assert not running
    if pool.startup_failures < pool.max_startup_failures:
        assert not pool.queue  # every task fits the node, so all of it ran
        # nothing blocked: at most spare_workers extra idle ones are kept
        # warm (none without warm_grace), and none past the grace
        apply(pool.reap()[0])
        assert len(pool.workers) <= pool.min_workers + (spares[0] if spares[2] else 0)
        now[0] += 10.0
        actions, again = pool.reap()
        apply(actions)
        assert again is None
        assert len(pool.workers) == pool.min_workers
    assert pool.available == pytest.approx(TOTAL)
    assert pool.free_gpus == [0]


def test_gpu_and_cpu_tasks_never_share_a_worker() -> None:
    pool = ready_pool({"CPU": 1.0, "GPU": 1.0}, gpu_ids=[0])
    (wid,) = pool.workers
    c = task(CPU=1.0)
    assert ran(pool.task_arrived(c)) == [(wid, c["tid"])]
    pool.worker_idle(wid)
    g = task(CPU=1.0, GPU=1.0)
    acts = pool.task_arrived(g)
    assert ran(acts) == []  # the idle worker ran a CPU-only task: a new one is started
    assert kinds(acts, "retire") == [("retire", wid)]
    (new,) = spawned(acts)
    assert ran(pool.worker_ready(new, 2000)) == [(new, g["tid"])]
    pool.worker_idle(new)
    g2 = task(CPU=1.0, GPU=1.0)
    assert ran(pool.task_arrived(g2)) == [(new, g2["tid"])]  # a GPU worker takes GPU tasks
    pool.worker_idle(new)
    c2 = task(CPU=1.0)
    assert ran(pool.task_arrived(c2)) == []  # ... but no CPU-only task


# ---------------------------------------------------------------- fractional GPUs
def test_two_half_gpu_tasks_share_one_gpu_id() -> None:
    pool = ready_pool({"CPU": 4.0, "GPU": 1.0}, gpu_ids=[0], min_workers=4)
    a, b, c = (task(CPU=1.0, GPU=0.5) for _ in range(3))
    (wa, _), = ran(pool.task_arrived(a))
    (wb, _), = ran(pool.task_arrived(b))
    assert a["gpu_ids"] == [0] and b["gpu_ids"] == [0]
    assert pool.free_gpus == [] and pool.available["GPU"] == pytest.approx(0.0)
    assert pool.task_arrived(c) == []  # the one GPU is fully used
    assert ran(pool.worker_idle(wa)) == [(wa, c["tid"])] and c["gpu_ids"] == [0]
    pool.worker_idle(wb)
    pool.worker_idle(wa)
    assert pool.free_gpus == [0] and pool.available["GPU"] == pytest.approx(1.0)


def test_fractions_pack_onto_a_used_gpu_and_leave_whole_ones_free() -> None:
    pool = ready_pool({"CPU": 8.0, "GPU": 2.0}, gpu_ids=[0, 1], min_workers=8)
    q1, q2 = task(CPU=1.0, GPU=0.25), task(CPU=1.0, GPU=0.25)
    pool.task_arrived(q1)
    pool.task_arrived(q2)
    assert q1["gpu_ids"] == q2["gpu_ids"] == [0]
    whole = task(CPU=1.0, GPU=1.0)
    assert ran(pool.task_arrived(whole)) and whole["gpu_ids"] == [1]
    half = task(CPU=1.0, GPU=0.5)  # fits on what is left of GPU 0
    assert ran(pool.task_arrived(half)) and half["gpu_ids"] == [0]
    assert pool.available["GPU"] == pytest.approx(0.0)


def test_a_task_waits_when_no_single_gpu_has_its_share_free() -> None:
    pool = ready_pool({"CPU": 8.0, "GPU": 2.0}, gpu_ids=[0, 1], min_workers=8)
    a, b = task(CPU=1.0, GPU=0.7), task(CPU=1.0, GPU=0.7)
    (wa, _), = ran(pool.task_arrived(a))
    pool.task_arrived(b)
    assert sorted(a["gpu_ids"] + b["gpu_ids"]) == [0, 1]
    c = task(CPU=1.0, GPU=0.6)  # 0.6 GPU is free in all, but 0.3 on each id
    assert pool.fits(c["res"]) is False
    assert pool.task_arrived(c) == [] and list(pool.queue) == [c]
    assert ran(pool.worker_idle(wa)) == [(wa, c["tid"])] and c["gpu_ids"] == a["gpu_ids"]


def test_one_and_a_half_gpus_take_a_whole_id_and_share_another() -> None:
    pool = ready_pool({"CPU": 4.0, "GPU": 2.0}, gpu_ids=[0, 1], min_workers=4)
    big, half = task(CPU=1.0, GPU=1.5), task(CPU=1.0, GPU=0.5)
    (wbig, _), = ran(pool.task_arrived(big))
    assert big["gpu_ids"] == [0, 1]
    assert ran(pool.task_arrived(half)) and half["gpu_ids"] == [1]
    pool.worker_idle(wbig)
    assert pool.free_gpus == [0]


def test_pool_without_gpu_ids_takes_them_from_its_gpu_total() -> None:
    pool = ready_pool({"CPU": 2.0, "GPU": 2.0})
    t = task(CPU=1.0, GPU=1.0)
    pool.task_arrived(t)
    assert t["gpu_ids"] == [0] and pool.free_gpus == [1]


def test_memory_is_accounted_like_any_resource() -> None:
    gib = float(1 << 30)
    pool = ready_pool({"CPU": 4.0, "memory": 3 * gib}, min_workers=4)
    a, b = task(CPU=1.0, memory=2 * gib), task(CPU=1.0, memory=2 * gib)
    (wa, _), = ran(pool.task_arrived(a))
    assert pool.task_arrived(b) == [] and list(pool.queue) == [b]
    assert pool.available["memory"] == pytest.approx(gib)
    assert ran(pool.worker_idle(wa)) == [(wa, b["tid"])]
    pool.reserve_bundle("pg:0", {"memory": gib})
    assert pool.available["memory"] == pytest.approx(0.0)
    pool.release_bundle("pg:0")
    assert pool.available["memory"] == pytest.approx(gib)


# ---------------------------------------------------------------- actors
def test_actor_holds_its_resources_and_gpu_ids_for_life() -> None:
    pool = ready_pool({"CPU": 2.0, "GPU": 1.0}, gpu_ids=[0])
    spec = {"aid": b"A" * 16, "hold": {"CPU": 1.0, "GPU": 0.5}}
    wid, old = pool.start_actor(spec["aid"], spec)
    assert old is None and pool.actor_of(wid) == spec["aid"] and wid not in pool.workers
    assert spec["gpu_ids"] == [0]
    assert pool.available == pytest.approx({"CPU": 1.0, "GPU": 0.5})
    t = task(CPU=1.0, GPU=0.5)  # shares the actor's GPU
    (tw, _), = ran(pool.task_arrived(t))
    assert t["gpu_ids"] == [0]
    # calls before the process connects wait for it
    pool.defer_call(spec["aid"], {"op": "run_task", "n": 1})
    got, backlog = pool.actor_registered(wid)
    assert got["aid"] == spec["aid"] and backlog == [{"op": "run_task", "n": 1}]
    assert pool.actor_registered("w-unknown") is None
    aid, actions = pool.actor_exited(wid)
    assert aid == spec["aid"] and actions == [] and not pool.actors
    pool.worker_idle(tw)
    assert pool.available == pytest.approx({"CPU": 2.0, "GPU": 1.0})
    assert pool.free_gpus == [0]


def test_actor_restart_keeps_its_hold_and_ignores_the_old_process() -> None:
    pool = ready_pool({"CPU": 1.0, "GPU": 1.0}, gpu_ids=[0])
    aid = b"B" * 16
    w1, _ = pool.start_actor(aid, {"aid": aid, "hold": {"GPU": 1.0}})
    spec2 = {"aid": aid, "hold": {"GPU": 1.0}}
    w2, old = pool.start_actor(aid, spec2)
    assert old == w1 and w2 != w1 and spec2["gpu_ids"] == [0]
    assert pool.available["GPU"] == pytest.approx(0.0)  # taken once
    assert pool.actor_exited(w1) == (None, [])   # the old process going changes nothing
    assert pool.available["GPU"] == pytest.approx(0.0)
    queued = task(CPU=1.0, GPU=1.0)
    assert pool.task_arrived(queued) == []
    aid2, actions = pool.actor_exited(w2)
    assert aid2 == aid and kinds(actions, "spawn") + kinds(actions, "run")
    assert pool.actor_exited(w2) == (None, [])


def test_actor_hold_in_a_bundle_goes_back_to_the_bundle() -> None:
    pool = ready_pool({"CPU": 2.0})
    pool.reserve_bundle("pg:0", {"CPU": 1.0})
    aid = b"C" * 16
    wid, _ = pool.start_actor(aid, {"aid": aid, "hold": {"CPU": 1.0}, "bundle": "pg:0"})
    assert pool.bundles["pg:0"] == pytest.approx({"CPU": 0.0})
    assert pool.available["CPU"] == pytest.approx(1.0)
    pool.actor_exited(wid)
    assert pool.bundles["pg:0"] == pytest.approx({"CPU": 1.0})


FRACTIONS = [{"CPU": 0.5, "GPU": 0.5}, {"GPU": 0.25}, {"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.5},
             {"CPU": 1.0}, {"GPU": 0.75}]


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["task", "ready", "idle", "die"]),
                          st.integers(0, 10), st.sampled_from(FRACTIONS)), max_size=50))
def test_random_fractional_gpu_sequences_keep_the_id_shares_straight(evs: list) -> None:
    total = {"CPU": 4.0, "GPU": 2.0}
    pool = WorkerPool(dict(total), max_workers=6, gpu_ids=[0, 1], min_workers=2)
    pool.startup()

    def check() -> None:
        used = {0: 0.0, 1: 0.0}
        for w in pool.workers.values():
            if w.state == BUSY:
                assert sum(w.gpu_grant.values()) == pytest.approx(w.task["res"].get("GPU", 0.0))
                assert sorted(w.gpu_grant) == w.task["gpu_ids"] == w.gpus
                for i, share in w.gpu_grant.items():
                    used[i] += share
            else:
                assert not w.gpu_grant
        for i in (0, 1):
            assert used[i] + pool.gpu_ids.free[i] == pytest.approx(1.0)
            assert -1e-9 <= pool.gpu_ids.free[i] <= 1.0 + 1e-9
        assert pool.available["GPU"] == pytest.approx(sum(pool.gpu_ids.free.values()))
        for amount in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0):
            grant = pool.gpu_ids.grant(amount)
            assert pool.gpu_ids.can_grant(amount) is False if grant is None else True
            if grant is not None:
                assert sum(grant.values()) == pytest.approx(amount)
                pool.gpu_ids.give(grant)
                assert pool.gpu_ids.can_grant(amount)

    for kind, pick, shape in evs:
        ws = sorted(pool.workers)
        if kind == "task":
            pool.task_arrived(task(**shape))
        elif kind == "ready" and (st_ := [w for w in ws if pool.workers[w].state == STARTING]):
            pool.worker_ready(st_[pick % len(st_)], 1)
        elif kind == "idle" and (busy := [w for w in ws if pool.workers[w].state == BUSY]):
            pool.worker_idle(busy[pick % len(busy)])
        elif kind == "die" and ws:
            pool.worker_died(ws[pick % len(ws)])
        check()


def test_workers_blocked_in_get_do_not_count_toward_the_warm_pool() -> None:
    """A task blocked in get() while its children run: the worker running
    the children stays warm between them instead of retiring (and another
    process starting) at every child."""
    pool = ready_pool({"CPU": 1.0})
    parent, child1, child2 = task(), task(), task()
    (wp, _), = ran(pool.task_arrived(parent))
    assert pool.task_arrived(child1) == []
    (wc,) = spawned(pool.worker_blocked(wp, True))
    assert ran(pool.worker_ready(wc, 2)) == [(wc, child1["tid"])]
    assert pool.worker_idle(wc) == []  # the parent is still blocked: wc stays
    assert ran(pool.task_arrived(child2)) == [(wc, child2["tid"])]
    assert pool.worker_idle(wc) == []
    # the parent resumes and ends: one worker more than the warm pool retires
    assert pool.worker_blocked(wp, False) == []
    assert pool.worker_idle(wp) == [("retire", wp)]
    assert list(pool.workers) == [wc]


# ---------------------------------------------------------------- nested work: spares


def test_spare_workers_are_forked_ahead_only_while_a_worker_is_blocked() -> None:
    """A parent blocked in get: besides the worker its queued child needs,
    the pool forks spare_workers more, so the next blocked parent's child
    starts in a process that is already there."""
    pool = ready_pool({"CPU": 1.0}, spare_workers=2)
    parent, child1, child2 = task(), task(), task()
    (wp, _), = ran(pool.task_arrived(parent))
    assert pool.task_arrived(child1) == []
    new = spawned(pool.worker_blocked(wp, True))
    assert len(new) == 3  # one for child1, two spares
    assert ran(pool.worker_ready(new[0], 2)) == [(new[0], child1["tid"])]
    for wid in new[1:]:
        assert pool.worker_ready(wid, 3) == []
    # child1 blocks too: its child starts at once on a spare, no fork needed
    # for it; one more spare is forked to keep two ready
    assert pool.task_arrived(child2) == []
    actions = pool.worker_blocked(new[0], True)
    assert ran(actions) == [(new[1], child2["tid"])]
    assert len(spawned(actions)) == 1


def test_no_spare_workers_without_a_blocked_worker() -> None:
    pool = ready_pool({"CPU": 2.0}, spare_workers=2, idle_grace=1.0)
    for _ in range(3):
        t = task()
        actions = pool.task_arrived(t)
        assert spawned(actions) == []
        (wid, _), = ran(actions)
        assert pool.worker_idle(wid) == []
    assert len(pool.workers) == 2


def test_spare_workers_stay_within_max_workers() -> None:
    pool = ready_pool({"CPU": 1.0}, spare_workers=8, max_workers=3)
    (wp, _), = ran(pool.task_arrived(task()))
    actions = pool.worker_blocked(wp, True)
    assert len(spawned(actions)) == 2
    assert kinds(actions, "warn") == []  # no task waits: the cap is not worth a warning
    assert len(pool.workers) == 3


def test_idle_workers_stay_while_a_parent_is_blocked_and_are_reaped_after_the_grace() -> None:
    """Workers that finish children of a blocked parent are kept (more
    children usually follow) for idle_grace seconds, then retired down to
    the warm pool; reap() says when to call it again."""
    now = [100.0]
    pool = ready_pool({"CPU": 1.0}, spare_workers=2, idle_grace=1.0)
    pool.clock = lambda: now[0]
    (wp, _), = ran(pool.task_arrived(task()))
    s1, s2 = spawned(pool.worker_blocked(wp, True))  # two spares
    pool.worker_ready(s1, 2)
    pool.worker_ready(s2, 3)
    now[0] += 0.5
    (wc, _), = ran(pool.task_arrived(task()))
    assert wc == s1
    assert pool.worker_idle(wc) == []          # kept: the parent is still blocked
    assert pool.reap() == ([], pytest.approx(0.5))  # s2 has been idle longest
    now[0] += 0.6
    actions, again = pool.reap()
    assert actions == [("retire", s2)] and again is None
    # one worker beside the blocked one: the warm pool (min_workers 1)
    assert sorted(pool.workers) == sorted([wp, wc])


def test_extra_idle_workers_retire_at_once_when_nothing_is_blocked_any_more() -> None:
    pool = ready_pool({"CPU": 1.0}, spare_workers=2, idle_grace=60.0)
    (wp, _), = ran(pool.task_arrived(task()))
    new = spawned(pool.worker_blocked(wp, True))
    for wid in new:
        pool.worker_ready(wid, 2)
    assert len(pool.workers) == 3
    assert pool.worker_blocked(wp, False) == []
    actions = pool.worker_idle(wp)
    assert sorted(kinds(actions, "retire")) == sorted(("retire", w) for w in [wp, *new][:2])
    assert len(pool.workers) == 1
    assert pool.reap() == ([], None)


def test_negative_spare_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="spare_workers"):
        WorkerPool({"CPU": 1.0}, spare_workers=-1)


# ---------------------------------------------------------------- warm grace once nothing is blocked


def _nested_cycle(pool: WorkerPool) -> tuple[str, list[str]]:
    """A parent task blocks in get; the spares forked for it start; the
    parent resumes and ends.  Returns the parent's worker and the spares."""
    (wp, _), = ran(pool.task_arrived(task()))
    new = spawned(pool.worker_blocked(wp, True))
    for wid in new:
        pool.worker_ready(wid, 2)
    assert pool.worker_blocked(wp, False) == []
    return wp, new


def test_extra_idle_workers_stay_warm_for_the_grace_once_nothing_is_blocked() -> None:
    """A nested burst ends: the workers forked for it stay idle for
    warm_grace (the next burst is leased them, no fork), then retire down
    to the warm pool; reap() says when to call it again."""
    now = [100.0]
    pool = ready_pool({"CPU": 1.0}, spare_workers=2, idle_grace=1.0, warm_grace=1.5)
    pool.clock = lambda: now[0]
    wp, new = _nested_cycle(pool)
    assert len(new) == 2
    assert pool.worker_idle(wp) == []          # kept: one warm + two extra
    assert len(pool.workers) == 3
    assert pool.reap() == ([], pytest.approx(1.5))
    # the next burst within the grace: leases take the kept workers, no fork
    forks = pool.spawned
    lease = pool.grant_lease(b"L1", {"CPU": 1.0}, None)
    assert lease is not None and pool.lease_declined({"CPU": 1.0}, None) == []
    assert pool.worker_idle(lease.wid) == []
    assert pool.spawned == forks
    now[0] += 1.6
    actions, again = pool.reap()
    assert len(kinds(actions, "retire")) == 2 and again is None
    assert len(pool.workers) == pool.min_workers == 1


def test_the_next_nested_burst_within_the_grace_forks_nothing() -> None:
    """Without warm_grace every nested burst forks its spares anew (the
    last ones retired as it ended); with it, the spares kept from the last
    burst serve the next one."""
    for warm, forks in ((0.0, 2), (1.0, 0)):
        pool = ready_pool({"CPU": 1.0}, spare_workers=2, idle_grace=1.0, warm_grace=warm)
        wp, _ = _nested_cycle(pool)
        pool.worker_idle(wp)
        before = pool.spawned
        wp, new = _nested_cycle(pool)
        assert pool.spawned - before == len(new) == forks, warm
        pool.worker_idle(wp)


def test_workers_kept_warm_are_bounded_by_spare_workers() -> None:
    """More extra workers than spare_workers go idle once nothing is
    blocked: those beyond spare_workers retire at once, the rest after the
    grace."""
    now = [0.0]
    pool = ready_pool({"CPU": 1.0}, spare_workers=1, idle_grace=1.0, warm_grace=60.0)
    pool.clock = lambda: now[0]
    chain = []
    (w, _), = ran(pool.task_arrived(task()))
    for _ in range(3):  # a chain of parents, each blocked on the next
        chain.append(w)
        for wid in spawned(pool.worker_blocked(w, True)):
            pool.worker_ready(wid, 2)
        (w, _), = ran(pool.task_arrived(task()))
    assert len(pool.workers) == 4  # three blocked parents and the last child
    assert pool.worker_idle(w) == []  # parents still blocked: all kept
    retired = []
    for wp in reversed(chain):
        pool.worker_blocked(wp, False)
        retired += kinds(pool.worker_idle(wp), "retire")
    assert retired and len(pool.workers) == 2  # the warm one and one spare
    assert pool.reap()[0] == []
    now[0] += 61.0
    assert len(kinds(pool.reap()[0], "retire")) == 1
    assert len(pool.workers) == 1


def test_negative_warm_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="warm_grace"):
        WorkerPool({"CPU": 1.0}, warm_grace=-1.0)
