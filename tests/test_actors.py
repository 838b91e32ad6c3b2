"""Actors through the public API on a real local cluster."""
from __future__ import annotations

import asyncio
import os
import threading

import pytest

import flowcore
from flowcore.exceptions import ActorDiedError, ActorError, TaskError
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(60)


@flowcore.remote
class Counter:
    def __init__(self, start=0):
        self.n = start

    def incr(self, k=1):
        self.n += k
        return self.n

    def value(self):
        return self.n

    def pid(self):
        return os.getpid()

    def fail(self, msg):
        raise ValueError(msg)

    @flowcore.method(num_returns=2)
    def pair(self):
        return self.n, -self.n

    def crash(self):
        os._exit(9)


def test_handle_calls_and_state(cluster):
    c = Counter.remote(10)
    assert isinstance(c, flowcore.ActorHandle)
    assert flowcore.get([c.incr.remote() for _ in range(5)]) == [11, 12, 13, 14, 15]
    assert flowcore.get(c.pair.remote()) == [15, -15]
    a, b = c.pair.remote()
    assert flowcore.get(b) == -15
    assert flowcore.get(c.incr.options(num_returns=1).remote(5)) == 20


def test_direct_calls_are_errors(cluster):
    with pytest.raises(TypeError, match=r"\.remote\("):
        Counter(1)
    c = Counter.remote()
    with pytest.raises(TypeError, match=r"\.incr\.remote"):
        c.incr(1)
    with pytest.raises(AttributeError) as ei:
        c.nope.remote()
    assert "incr" in str(ei.value) and "value" in str(ei.value)


def test_order_holds_when_an_earlier_call_waits_for_its_argument(cluster):
    sig = Signal()

    @flowcore.remote
    class Log:
        def __init__(self):
            self.items = []

        def add(self, x):
            self.items.append(x)
            return list(self.items)

    log = Log.remote()
    slow_arg = sig.wait_task.remote()
    first = log.add.remote(slow_arg)        # waits for its argument
    later = [log.add.remote(i) for i in range(3)]
    ready, _ = flowcore.wait(later, num_returns=1, timeout=0.5)
    assert ready == []                      # held back behind `first`
    sig.set()
    assert flowcore.get(later[-1], timeout=30) == [True, 0, 1, 2]
    assert flowcore.get(first) == [True]


def test_different_actors_run_in_parallel(cluster):
    sig = Signal()

    @flowcore.remote
    class Waiter:
        def wait(self, s):
            return s.wait()
    a, b = Waiter.remote(), Waiter.remote()
    ra, rb = a.wait.remote(sig), b.wait.remote(sig)
    sig.wait_for_waiters(2)  # both calls run at the same time
    sig.set()
    assert flowcore.get([ra, rb], timeout=30) == [True, True]


def test_more_actors_than_cpus(cluster):
    actors = [Counter.remote(i) for i in range(5)]  # 2 CPUs: actors hold none by default
    assert flowcore.get([a.value.remote() for a in actors], timeout=30) == list(range(5))
    assert len(set(flowcore.get([a.pid.remote() for a in actors]))) == 5


def test_method_error_keeps_the_actor(cluster):
    c = Counter.remote(1)
    with pytest.raises(ValueError) as ei:
        flowcore.get(c.fail.remote("bad input"))
    assert isinstance(ei.value, TaskError)
    assert "Counter.fail" in str(ei.value) and "bad input" in str(ei.value)
    assert flowcore.get(c.incr.remote()) == 2


def test_handles_pass_to_tasks_and_actors(cluster):
    c = Counter.remote(0)

    @flowcore.remote
    def bump(h, n):
        return flowcore.get([h.incr.remote() for _ in range(n)])[-1]
    assert flowcore.get(bump.remote(c, 3)) == 3

    @flowcore.remote
    class Caller:
        def __init__(self, target):
            self.target = target

        def go(self):
            return flowcore.get(self.target.incr.remote(10))
    caller = Caller.remote(c)
    assert flowcore.get(caller.go.remote()) == 13
    inside = flowcore.put({"h": c})
    assert flowcore.get(flowcore.get(inside)["h"].value.remote()) == 13


def test_named_actors(cluster):
    c = Counter.options(name="shared-counter").remote(5)
    assert flowcore.get(c.value.remote()) == 5
    with pytest.raises(ValueError, match="already exists"):
        Counter.options(name="shared-counter").remote()
    same = Counter.options(name="shared-counter", get_if_exists=True).remote()
    assert same == c

    @flowcore.remote
    def lookup():
        return flowcore.get(flowcore.get_actor("shared-counter").incr.remote())
    assert flowcore.get(lookup.remote()) == 6
    with pytest.raises(ValueError, match="no live actor"):
        flowcore.get_actor("missing")
    flowcore.kill(c)
    with pytest.raises(ActorDiedError):
        flowcore.get(c.value.remote(), timeout=30)
    with pytest.raises(ValueError):
        flowcore.get_actor("shared-counter")


def test_kill_fails_pending_and_later_calls(cluster):
    sig = Signal()

    @flowcore.remote
    class Busy:
        def hold(self, s):
            return s.wait()
    b = Busy.remote()
    running = b.hold.remote(sig)
    queued = b.hold.remote(sig)
    sig.wait_for_waiters(1)
    flowcore.kill(b)
    for ref in (running, queued, b.hold.remote(sig)):
        with pytest.raises(ActorDiedError, match="kill"):
            flowcore.get(ref, timeout=30)
    sig.set()


def test_crash_without_restarts_names_the_cause(cluster):
    c = Counter.remote()
    flowcore.get(c.value.remote())
    with pytest.raises(ActorDiedError) as ei:
        flowcore.get(c.crash.remote(), timeout=30)
    assert "exited with code 9" in str(ei.value)
    with pytest.raises(ActorDiedError):
        flowcore.get(c.value.remote(), timeout=30)
    rows = [a for a in flowcore.state.list_actors() if a["actor_id"] == c.actor_id]
    assert rows[0]["state"] == "DEAD" and "code 9" in rows[0]["death_cause"]


def test_restart_resets_state(cluster):
    c = Counter.options(max_restarts=2).remote(100)
    assert flowcore.get(c.incr.remote()) == 101
    pid = flowcore.get(c.pid.remote())
    with pytest.raises(ActorError):
        flowcore.get(c.crash.remote(), timeout=30)
    # the constructor ran again in a new process with the original arguments
    assert flowcore.get(c.value.remote(), timeout=30) == 100
    assert flowcore.get(c.pid.remote()) != pid
    rows = [a for a in flowcore.state.list_actors() if a["actor_id"] == c.actor_id]
    assert rows[0]["restarts"] == 1 and rows[0]["state"] == "ALIVE"


def test_restart_retries_calls_in_flight(cluster, tmp_path):
    flag = tmp_path / "crashed"

    @flowcore.remote(max_restarts=1, max_task_retries=1)
    class Fragile:
        def work(self, path):
            if not os.path.exists(path):
                open(path, "w").close()
                os._exit(1)
            return "done on retry"
    f = Fragile.remote()
    assert flowcore.get(f.work.remote(str(flag)), timeout=30) == "done on retry"


def test_constructor_error(cluster):
    @flowcore.remote
    class Broken:
        def __init__(self):
            raise RuntimeError("cannot start")

        def ping(self):
            return 1
    b = Broken.remote()
    with pytest.raises(ActorDiedError, match="cannot start"):
        flowcore.get(b.ping.remote(), timeout=30)


def test_threaded_actor_overlaps_calls(cluster):
    sig = Signal()

    @flowcore.remote(max_concurrency=3)
    class Pool:
        def wait(self, s):
            return s.wait(), threading.current_thread().name
    p = Pool.remote()
    refs = [p.wait.remote(sig) for _ in range(3)]
    sig.wait_for_waiters(3)  # three calls inside the actor at once
    sig.set()
    out = flowcore.get(refs, timeout=30)
    assert all(ok for ok, _ in out) and len({name for _, name in out}) == 3


def test_async_actor_overlaps_and_awaits_refs(cluster):
    @flowcore.remote
    class AsyncWorker:
        def __init__(self):
            self.gate = asyncio.Event()

        async def wait_gate(self):
            await self.gate.wait()
            return "opened"

        async def open_gate(self):
            self.gate.set()
            return "set"

        async def double(self, ref_holder):
            value = await ref_holder["r"]
            return value * 2

    w = AsyncWorker.remote()
    waiting = w.wait_gate.remote()
    # the second call runs while the first is suspended: calls overlap
    assert flowcore.get(w.open_gate.remote(), timeout=30) == "set"
    assert flowcore.get(waiting, timeout=30) == "opened"

    @flowcore.remote
    def seven():
        return 7
    assert flowcore.get(w.double.remote({"r": seven.remote()}), timeout=30) == 14


def test_actor_resources_and_gpu_ids(cluster):
    @flowcore.remote(num_gpus=1)
    class GpuUser:
        def ids(self):
            return flowcore.get_gpu_ids(), flowcore.get_runtime_context().get_actor_id()
    g = GpuUser.remote()
    ids, aid = flowcore.get(g.ids.remote(), timeout=30)
    assert len(ids) == 1 and aid == g.actor_id
    assert flowcore.available_resources().get("GPU") == 1.0
    flowcore.kill(g)
    with pytest.raises(ActorDiedError):
        flowcore.get(g.ids.remote(), timeout=30)


def test_bad_actor_input(cluster):
    with pytest.raises(ValueError, match="Valid options for an actor"):
        Counter.options(num_returns=2)
    with pytest.raises(TypeError, match="max_concurrency"):
        Counter.options(max_concurrency=0)
    with pytest.raises(TypeError, match="argument 0 .*lock"):
        Counter.remote(threading.Lock())
    with pytest.raises(TypeError, match="keyword argument 'start'"):
        Counter.remote(start=threading.Lock())
    with pytest.raises(TypeError):
        flowcore.remote(42)
    with pytest.raises(TypeError):
        flowcore.kill("not a handle")


def _wait_gone(pid, timeout=30):
    import psutil
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    return not psutil.pid_exists(pid)


def test_actor_exits_when_no_handle_remains(cluster):
    import gc
    c = Counter.remote(1)
    pid = flowcore.get(c.pid.remote())
    aid = c.actor_id
    del c
    gc.collect()
    flowcore.cluster_resources()  # flush the dropped handle to the head
    assert _wait_gone(pid)
    rows = [a for a in flowcore.state.list_actors() if a["actor_id"] == aid]
    assert rows[0]["state"] == "DEAD" and "out of scope" in rows[0]["death_cause"]
    # calls submitted through a handle that is dropped at once still run
    assert flowcore.get(Counter.remote(5).incr.remote(), timeout=30) == 6


def test_named_and_detached_actors_outlive_their_driver(cluster, tmp_path):
    import subprocess
    import sys
    import textwrap
    token = open(os.path.join(cluster["session_dir"], "token")).read().strip()
    script = tmp_path / "other_driver.py"
    script.write_text(textwrap.dedent(f"""
        import flowcore
        flowcore.init(address={cluster['address']!r}, token={token!r})
        @flowcore.remote
        class Box:
            def __init__(self, v):
                self.v = v
            def get(self):
                return self.v
        keep = Box.options(name="kept", lifetime="detached").remote("still here")
        gone = Box.options(name="temporary").remote("bye")
        assert flowcore.get(keep.get.remote()) == "still here"
        assert flowcore.get(gone.get.remote()) == "bye"
        flowcore.shutdown()
        print("OK")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip().endswith("OK"), out.stderr
    kept = flowcore.get_actor("kept")
    assert flowcore.get(kept.get.remote(), timeout=30) == "still here"
    # the other driver's non-detached actor died with it
    import time
    deadline = time.monotonic() + 30
    while True:
        try:
            flowcore.get_actor("temporary")
        except ValueError:
            break
        assert time.monotonic() < deadline, "non-detached actor outlived its driver"
        flowcore.cluster_resources()
    flowcore.kill(kept)


def test_order_under_varying_call_durations(cluster):
    @flowcore.remote
    class Recorder:
        def __init__(self):
            self.seen = []

        def work(self, i, spin):
            x = 0
            for _ in range(spin):  # calls take different times
                x += 1
            self.seen.append(i)
            return i

        def log(self):
            return self.seen

    r = Recorder.remote()
    spins = [50_000, 10, 200_000, 1, 30_000, 5, 100_000, 0] * 3
    refs = [r.work.remote(i, s) for i, s in enumerate(spins)]
    assert flowcore.get(refs, timeout=30) == list(range(len(spins)))
    assert flowcore.get(r.log.remote()) == list(range(len(spins)))
