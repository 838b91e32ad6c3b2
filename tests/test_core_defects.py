"""Core defects found by the libraries built on flowcore's public API, each
pinned by a test through that API."""
from __future__ import annotations

import os

import pytest

import flowcore
from flowcore import state

pytestmark = pytest.mark.timeout(120)


@flowcore.remote(num_cpus=1)
class OneCpu:
    def pid(self):
        return os.getpid()


def test_actor_holds_its_cpus_third_waits_until_one_is_killed(cluster):
    # the cluster has 2 CPUs: two 1-CPU actors take them for their lifetime,
    # a third stays pending until one of them is gone (Ray's semantics)
    a, b, c = OneCpu.remote(), OneCpu.remote(), OneCpu.remote()
    first = flowcore.get([a.pid.remote(), b.pid.remote()], timeout=60)
    assert len(set(first)) == 2
    third = c.pid.remote()
    ready, _ = flowcore.wait([third], timeout=2)
    assert ready == [], "a third 1-CPU actor ran on a 2-CPU cluster"
    states = sorted(x["state"] for x in state.list_actors()
                    if x["class_name"] == "OneCpu")
    assert states == ["ALIVE", "ALIVE", "PENDING"]
    assert flowcore.available_resources().get("CPU", 0.0) == 0.0
    flowcore.kill(a)
    assert flowcore.get(third, timeout=60) not in first
    flowcore.kill(b)
    flowcore.kill(c)


@flowcore.remote
def _square(i):
    return i * i


@flowcore.remote
def _put_in_list(i):
    return [flowcore.put(b"v" * 300 + str(i).encode())]


@flowcore.remote(num_cpus=0)
class Returner:
    def put_in_list(self, i):
        return [flowcore.put(b"v" * 300 + str(i).encode())]

    def task_in_list(self, i):
        return [_square.remote(i)]


@flowcore.remote(num_cpus=0)
class AsyncReturner:
    async def put_in_list(self, i):
        return [flowcore.put(b"v" * 300 + str(i).encode())]


def test_refs_nested_in_results_stay_alive_until_the_caller_holds_them(cluster):
    # the producer's own ref goes away as soon as it returns; the ref inside
    # the result must be held for the caller (direct actor calls, calls
    # through the head, async actors and plain tasks alike)
    sync_actor, async_actor = Returner.remote(), AsyncReturner.remote()
    makers = [lambda i: sync_actor.put_in_list.remote(i),
              lambda i: sync_actor.task_in_list.remote(i),
              lambda i: async_actor.put_in_list.remote(i),
              lambda i: _put_in_list.remote(i)]
    expected = [lambda i: b"v" * 300 + str(i).encode(), lambda i: i * i,
                lambda i: b"v" * 300 + str(i).encode(), lambda i: b"v" * 300 + str(i).encode()]
    lists = [(k, i, flowcore.get(make(i), timeout=60))
             for k, make in enumerate(makers) for i in range(50)]
    lost = []
    for k, i, inner in lists:
        try:
            assert flowcore.get(inner[0], timeout=60) == expected[k](i)
        except flowcore.exceptions.ObjectLostError:
            lost.append((k, i))
    assert not lost, f"{len(lost)} of {len(lists)} nested refs were freed: {lost[:5]}"
    flowcore.kill(sync_actor)
    flowcore.kill(async_actor)


@flowcore.remote
def _plus_one(i):
    return i + 1


@flowcore.remote(num_cpus=2)
def _get_from_a_helper_thread():
    # takes both CPUs; its helper thread waits on tasks that need one of them
    import threading
    box = {}

    def helper():
        try:
            box["value"] = flowcore.get([_plus_one.remote(i) for i in range(3)], timeout=60)
        except Exception as e:  # noqa: BLE001 - reported to the test
            box["error"] = repr(e)
    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    return box


def test_get_blocked_in_a_helper_thread_gives_the_cpu_back(cluster):
    box = flowcore.get(_get_from_a_helper_thread.remote(), timeout=100)
    assert box == {"value": [1, 2, 3]}
    # the CPUs came back once the task ended
    flowcore.get(_plus_one.options(num_cpus=2).remote(0), timeout=60)


def test_signal_wait_zero_polls():
    from flowcore.testing import Signal
    sig = Signal()
    try:
        assert sig.wait(0) is False
        assert sig.wait(-1) is False
        assert sig.arrived == 0  # a poll is not a waiter
        sig.set()
        assert sig.wait(0) is True
        assert sig.wait(0.5) is True
    finally:
        sig.close()


def test_futures_complete_without_a_thread_per_result(cluster):
    from flowcore.testing import Signal
    import threading
    sig = Signal()
    try:
        gated = [sig.wait_task.remote() for _ in range(2)]
        runners = []
        lock = threading.Lock()

        def note(_fut):
            with lock:
                runners.append(threading.current_thread())
        futures = []
        for i in range(200):
            fut = gated[i % 2].future()  # not ready: completed from the IO thread
            fut.add_done_callback(note)
            futures.append(fut)
        sig.set()
        assert [f.result(timeout=60) for f in futures] == [True] * 200
        with lock:
            distinct = {id(t) for t in runners}
        assert len(runners) == 200
        assert len(distinct) <= 8, f"{len(distinct)} threads completed 200 futures"
    finally:
        sig.close()


@flowcore.remote
def _refaults_of_a_second_round() -> int:
    """Page faults of copying 200 MiB again after the first 200 MiB was freed
    (what a task does that gets large bytearrays out of the store)."""
    import resource

    def one_round() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        bufs = [bytearray(20 * 2**20) for _ in range(10)]  # zero-filled: every page touched
        del bufs
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    one_round()
    return one_round()


def test_workers_keep_freed_memory_for_the_next_task(cluster):
    """A worker does not hand 200 MiB back to the kernel after each task, only
    to fault every page in again in the next one (51,200 faults of 4 KiB)."""
    faults = flowcore.get(_refaults_of_a_second_round.remote(), timeout=60)
    assert faults < 51_200 // 4, faults


def test_a_users_allocator_settings_are_left_alone():
    from flowcore.node.malloc import keep_freed_memory
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "1000"}) is False
    assert keep_freed_memory({"MALLOC_MMAP_THRESHOLD_": "1000"}) is False
    assert keep_freed_memory({"FLOWCORE_WORKER_MALLOC_TRIM": "0"}) is False
    assert keep_freed_memory({"FLOWCORE_WORKER_MALLOC_TRIM": "lots"}) is False
