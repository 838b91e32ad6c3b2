"""Ray's actor, task and runtime API semantics, through the public API on a
real local cluster: argument checks at submit time, async functions, the
runtime context, small names Ray programs use, actor class attributes,
actor exit, method options, worker environment."""
from __future__ import annotations

import os

import pytest

import flowcore
from flowcore.exceptions import TaskError

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------ submit-time checks
def test_task_arguments_checked_at_submit(cluster):
    @flowcore.remote
    def f(a, b="x", *, c=0):
        return (a, b, c)

    with pytest.raises(TypeError, match=r"f\.remote\(\).*too many positional"):
        f.remote(1, 2, 3)
    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        f.remote()
    with pytest.raises(TypeError, match="unexpected keyword argument 'd'"):
        f.options(num_cpus=0).remote(1, d=4)
    assert flowcore.get(f.remote(1, c=5)) == (1, "x", 5)


def test_actor_constructor_arguments_checked_at_submit(cluster):
    @flowcore.remote
    class A:
        def __init__(self, x, *, y=1):
            self.v = x + y

        def value(self):
            return self.v

    with pytest.raises(TypeError, match=r"A\.remote\(\).*missing a required argument: 'x'"):
        A.remote()
    with pytest.raises(TypeError, match="too many positional"):
        A.remote(1, 2)
    a = A.remote(1, y=2)
    assert flowcore.get(a.value.remote()) == 3


def test_async_def_function_runs_its_coroutine(cluster):
    import asyncio

    @flowcore.remote
    async def f(x):
        await asyncio.sleep(0)
        return x + 1

    @flowcore.remote
    async def boom():
        raise ValueError("async failure")

    assert flowcore.get([f.remote(i) for i in range(3)]) == [1, 2, 3]
    with pytest.raises(ValueError, match="async failure"):
        flowcore.get(boom.remote())


def test_get_if_exists_needs_a_name(cluster):
    @flowcore.remote
    class A:
        def ping(self):
            return 1

    with pytest.raises(ValueError, match="get_if_exists=True.*name"):
        A.options(get_if_exists=True).remote()
    a = A.options(get_if_exists=True, name="gie-named").remote()
    b = A.options(get_if_exists=True, name="gie-named").remote()
    assert a == b and flowcore.get(b.ping.remote()) == 1
    flowcore.kill(a)


def test_too_large_function_gets_a_clear_error(cluster):
    big = b"x" * (101 << 20)

    @flowcore.remote
    def f():
        return len(big)

    with pytest.raises(ValueError, match=r"remote function .*f is too large.*MiB.*flowcore\.put"):
        f.remote()

    @flowcore.remote
    class Holder:
        def size(self):
            return len(big)

    with pytest.raises(ValueError, match=r"actor class .*Holder is too large"):
        Holder.remote()


# ------------------------------------------------------------ runtime context
def test_runtime_context_in_driver_task_and_actor(cluster):
    ctx = flowcore.get_runtime_context()
    job = ctx.get_job_id()
    assert isinstance(job, str) and len(job) == 8
    assert ctx.namespace == "default" and ctx.get_task_id() is None
    assert ctx.current_actor is None and ctx.get_actor_id() is None
    assert ctx.get() == {"job_id": job, "node_id": ctx.get_node_id(), "namespace": "default"}

    @flowcore.remote(num_cpus=0.5, num_gpus=1)
    def where():
        c = flowcore.get_runtime_context()
        return {"job": c.get_job_id(), "task": c.get_task_id(), "name": c.get_task_name(),
                "res": c.get_assigned_resources(), "acc": c.get_accelerator_ids(),
                "ns": c.namespace, "pg": c.get_placement_group_id(), "get": c.get()}

    ref = where.remote()
    got = flowcore.get(ref)
    assert got["job"] == job and got["ns"] == "default" and got["pg"] is None
    assert got["task"] == ref.task_id and got["name"].endswith("where")
    assert got["res"] == {"CPU": 0.5, "GPU": 1.0}
    assert len(got["acc"]["GPU"]) == 1 and all(isinstance(g, str) for g in got["acc"]["GPU"])
    assert got["get"]["task_id"] == ref.task_id and "actor_id" not in got["get"]

    @flowcore.remote(resources={"custom": 1})
    class Me:
        def facts(self):
            c = flowcore.get_runtime_context()
            return {"aid": c.get_actor_id(), "name": c.get_actor_name(), "job": c.get_job_id(),
                    "res": c.get_assigned_resources(),
                    "again": c.was_current_actor_reconstructed, "me": c.current_actor}

        def ping(self):
            return "pong"

    a = Me.options(name="ctx-me").remote()
    f = flowcore.get(a.facts.remote())
    assert f["aid"] == a.actor_id and f["name"] == "ctx-me" and f["job"] == job
    assert f["res"] == {"custom": 1.0} and f["again"] is False
    assert f["me"] == a and flowcore.get(f["me"].ping.remote()) == "pong"
    flowcore.kill(a)


# ------------------------------------------------------------ small names Ray programs use
def test_as_future_is_an_asyncio_future(cluster):
    import asyncio

    @flowcore.remote
    def double(x):
        return 2 * x

    async def main():
        futs = [double.remote(i).as_future() for i in range(3)]
        assert all(isinstance(f, asyncio.Future) for f in futs)
        return await asyncio.gather(*futs)

    assert asyncio.run(main()) == [0, 2, 4]


def test_util_names(cluster):
    import flowcore.util as util
    from flowcore.placement_groups import placement_group_table

    assert util.get_node_ip_address() == "127.0.0.1"  # the embedded node's address
    assert flowcore.get_node_ip_address is util.get_node_ip_address

    @flowcore.remote(num_cpus=0)
    class Named:
        def ip(self):
            return util.get_node_ip_address()

    a = Named.options(name="util-a").remote()
    b = Named.options(name="util-b", namespace="other").remote()
    assert flowcore.get(a.ip.remote()) == "127.0.0.1"
    flowcore.get(b.ip.remote())
    assert "util-a" in util.list_named_actors() and "util-b" not in util.list_named_actors()
    everywhere = util.list_named_actors(all_namespaces=True)
    assert {"name": "util-b", "namespace": "other"} in everywhere
    flowcore.kill(a)
    flowcore.kill(b)

    pg = flowcore.placement_group([{"CPU": 1}, {"custom": 1}], strategy="PACK")
    assert pg.wait(30)
    row = placement_group_table(pg)
    assert row["placement_group_id"] == pg.id.hex() and row["state"] == "CREATED"
    assert row["bundles"] == {0: {"CPU": 1.0}, 1: {"custom": 1.0}}
    assert set(row["bundles_to_node_id"]) == {0, 1}
    assert util.placement_group_table()[pg.id.hex()]["strategy"] == "PACK"
    with pytest.raises(TypeError):
        placement_group_table("nope")

    @flowcore.remote(num_cpus=1)
    def pg_id():
        return flowcore.get_runtime_context().get_placement_group_id()

    from flowcore import PlacementGroupSchedulingStrategy
    strat = PlacementGroupSchedulingStrategy(pg, 0)
    assert flowcore.get(pg_id.options(scheduling_strategy=strat).remote()) == pg.id.hex()
    flowcore.remove_placement_group(pg)


def test_finished_tasks_stay_listed_after_their_refs_are_dropped(cluster):
    import time

    @flowcore.remote
    def whoami():
        return flowcore.get_runtime_context().get_task_id()

    tid = flowcore.get(whoami.remote())  # the ref is dropped after this line
    deadline = time.monotonic() + 30
    # wait until the head has freed the result (and pruned the task's record)
    while any(o["object_id"].startswith(tid) for o in flowcore.state.list_objects()):
        assert time.monotonic() < deadline, "the dropped result was never freed"
        time.sleep(0.05)
    rows = [r for r in flowcore.state.list_tasks() if r["task_id"] == tid]
    assert len(rows) == 1 and rows[0]["state"] == "FINISHED"
    assert rows[0]["name"].endswith("whoami") and rows[0]["ended"] >= rows[0]["started"]
    assert rows[0]["resources"] == {"CPU": 1.0}
    assert [r["task_id"] for r in flowcore.state.list_tasks(state="FINISHED")].count(tid) == 1
    assert tid not in {r["task_id"] for r in flowcore.state.list_tasks(state="RUNNING")}


def test_task_cancelled_from_an_actor(cluster):
    from flowcore.exceptions import TaskCancelledError
    from flowcore.testing import Signal

    sig = Signal()

    @flowcore.remote(num_cpus=1)
    def blocked(s):
        s.wait()

    @flowcore.remote(num_cpus=0)
    class Canceller:
        def run(self, s, reraise):
            ref = blocked.remote(s)
            flowcore.cancel(ref)  # queued or running: either way it is cancelled
            if reraise:
                return flowcore.get(ref, timeout=30)
            try:
                flowcore.get(ref, timeout=30)
            except TaskCancelledError as e:
                return type(e).__name__, isinstance(e, TaskError)

    c = Canceller.remote()
    # inside the actor: the plain TaskCancelledError, as for the driver
    assert flowcore.get(c.run.remote(sig, False)) == ("TaskCancelledError", False)
    # raised out of the actor's method: a TaskError that is also a TaskCancelledError
    with pytest.raises(TaskCancelledError) as info:
        flowcore.get(c.run.remote(sig, True))
    assert isinstance(info.value, TaskError)
    sig.set()
    flowcore.kill(c)


# ------------------------------------------------------------ actor classes
def test_actor_class_keeps_class_attributes_and_lists_methods(cluster):
    @flowcore.remote
    class Foo:
        X = 3

        def __init__(self, v=0):
            self.v = v

        @staticmethod
        def s(a):
            return a + 4

        @classmethod
        def make(cls):
            return cls(7)

        def get(self):
            return self.v + Foo.X

    assert Foo.X == 3 and Foo.s(1) == 5 and Foo.__name__ == "Foo"
    local = Foo.make()  # a plain local instance, as with Ray
    assert local.v == 7
    with pytest.raises(AttributeError, match="Foo has no attribute 'nope'"):
        Foo.nope
    assert {"X", "s", "make", "get", "remote", "options"} <= set(dir(Foo))
    h = Foo.remote(1)
    assert flowcore.get(h.get.remote()) == 4
    assert {"get", "s", "make"} <= set(dir(h)) and "remote" in dir(h.get)

    # an actor class captured by a task still works there
    @flowcore.remote
    def make_and_ask():
        a = Foo.remote(2)
        return Foo.X, flowcore.get(a.get.remote())

    assert flowcore.get(make_and_ask.remote()) == (3, 5)


# ------------------------------------------------------------ ending an actor from inside
def _wait_file(path, timeout=30.0):
    import time
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@flowcore.remote(num_cpus=0, max_restarts=2)
class Leaver:
    def __init__(self, marker=None):
        if marker:
            import atexit

            def mark():
                with open(marker, "w") as f:
                    f.write("atexit ran")
            atexit.register(mark)

    def ping(self):
        return os.getpid()

    def leave(self):
        flowcore.actor.exit_actor()

    def sys_exit(self):
        import sys
        sys.exit(3)

    def gated(self, sig, v):
        sig.wait()
        return v


def test_exit_actor_ends_it_for_good_and_runs_atexit(cluster, tmp_path):
    from flowcore.exceptions import ActorDiedError
    marker = str(tmp_path / "atexit")
    a = Leaver.remote(marker)
    flowcore.get(a.ping.remote())
    with pytest.raises(ActorDiedError, match="exit_actor"):
        flowcore.get(a.leave.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match="not restarted"):  # despite max_restarts=2
        flowcore.get(a.ping.remote(), timeout=30)
    _wait_file(marker)
    row = [r for r in flowcore.state.list_actors() if r["actor_id"] == a.actor_id][0]
    assert row["state"] == "DEAD" and row["restarts"] == 0 and "exit_actor" in row["death_cause"]
    assert flowcore.exit_actor is flowcore.actor.exit_actor
    with pytest.raises(TypeError, match="inside an actor"):
        flowcore.exit_actor()

    @flowcore.remote
    def in_task():
        try:
            flowcore.exit_actor()
        except TypeError as e:
            return str(e)

    assert "inside an actor" in flowcore.get(in_task.remote())


def test_ray_terminate_runs_after_queued_calls(cluster, tmp_path):
    from flowcore.exceptions import ActorDiedError
    from flowcore.testing import Signal
    marker = str(tmp_path / "atexit")
    a = Leaver.remote(marker)
    sig = Signal()
    queued = [a.gated.remote(sig, i) for i in range(3)]
    bye = a.__ray_terminate__.remote()
    after = a.ping.remote()
    sig.wait_for_waiters(1)
    sig.set()
    assert flowcore.get(queued, timeout=30) == [0, 1, 2]  # they ran before the terminate
    with pytest.raises(ActorDiedError, match="__ray_terminate__"):
        flowcore.get(bye, timeout=30)
    with pytest.raises(ActorDiedError):
        flowcore.get(after, timeout=30)
    _wait_file(marker)


def test_sys_exit_in_an_actor_method_ends_the_actor(cluster):
    from flowcore.exceptions import ActorDiedError
    a = Leaver.remote()
    with pytest.raises(ActorDiedError, match=r"sys\.exit\(3\)"):
        flowcore.get(a.sys_exit.remote(), timeout=30)
    with pytest.raises(ActorDiedError):
        flowcore.get(a.ping.remote(), timeout=30)


@pytest.mark.parametrize("kind", ["threaded", "async"])
def test_exit_actor_in_threaded_and_async_actors(cluster, kind):
    from flowcore.exceptions import ActorDiedError

    if kind == "async":
        @flowcore.remote(num_cpus=0)
        class A:
            async def ping(self):
                return 1

            async def leave(self):
                flowcore.exit_actor()
    else:
        @flowcore.remote(num_cpus=0, max_concurrency=4)
        class A:
            def ping(self):
                return 1

            def leave(self):
                flowcore.exit_actor()

    a = A.remote()
    assert flowcore.get(a.ping.remote()) == 1
    with pytest.raises(ActorDiedError, match="exit_actor"):
        flowcore.get(a.leave.remote(), timeout=30)
    with pytest.raises(ActorDiedError):
        flowcore.get(a.ping.remote(), timeout=30)


def test_sys_exit_in_a_task_is_a_worker_crash(cluster):
    from flowcore.exceptions import WorkerCrashedError

    @flowcore.remote(max_retries=0)
    def quit_():
        exit()

    @flowcore.remote(max_retries=1)
    def quit_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            import sys
            sys.exit(1)
        return "second try"

    with pytest.raises(WorkerCrashedError, match="died"):
        flowcore.get(quit_.remote(), timeout=30)
    import tempfile
    with tempfile.TemporaryDirectory() as d:  # a crash is retried within max_retries
        assert flowcore.get(quit_once.remote(os.path.join(d, "once")), timeout=30) == "second try"


# ------------------------------------------------------------ method options, groups, limits
def test_method_retries_and_retry_exceptions(cluster, tmp_path):
    from flowcore.exceptions import ActorError

    @flowcore.remote(num_cpus=0, max_restarts=2)
    class Flaky:
        def __init__(self):
            self.failures = 0

        @flowcore.method(max_task_retries=1)
        def crash_once(self, marker):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return "after restart"

        def crash_always(self):
            os._exit(1)

        @flowcore.method(max_task_retries=2, retry_exceptions=[ValueError])
        def shaky(self, n):
            self.failures += 1
            if self.failures <= n:
                raise ValueError(f"failure {self.failures}")
            return self.failures

        def plain(self, n):
            self.failures += 1
            if self.failures <= n:
                raise KeyError(self.failures)
            return self.failures

    a = Flaky.remote()
    assert flowcore.get(a.crash_once.remote(str(tmp_path / "m")), timeout=60) == "after restart"
    with pytest.raises(ActorError):  # the actor's own max_task_retries=0 applies
        flowcore.get(a.crash_always.remote(), timeout=60)
    b = Flaky.remote()
    assert flowcore.get(b.shaky.remote(2), timeout=30) == 3  # two retries
    with pytest.raises(ValueError, match="failure 6"):  # 3 more failures: retries used up
        flowcore.get(b.shaky.remote(10), timeout=30)
    with pytest.raises(KeyError):  # not retried without options
        flowcore.get(b.plain.remote(100), timeout=30)
    c = Flaky.remote()
    m = c.plain.options(max_task_retries=3, retry_exceptions=True, name="plain-retried")
    ref = m.remote(2)
    assert flowcore.get(ref, timeout=30) == 3
    rows = [r for r in flowcore.state.list_tasks() if r["task_id"] == ref.task_id]
    assert rows and rows[0]["name"] == "plain-retried"
    with pytest.raises(ValueError, match="Valid options for an actor method"):
        c.plain.options(num_cpus=1)
    for h in (a, b, c):
        flowcore.kill(h)


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_concurrency_groups(cluster, kind):
    from flowcore.testing import Signal
    if kind == "threads":
        @flowcore.remote(num_cpus=0, concurrency_groups={"io": 2})
        class G:
            @flowcore.method(concurrency_group="io")
            def io(self, sig):
                sig.wait()
                return "io"

            def compute(self, sig=None):
                if sig is not None:
                    sig.wait()
                return "compute"
    else:
        import asyncio

        @flowcore.remote(num_cpus=0, concurrency_groups={"io": 2})
        class G:
            @flowcore.method(concurrency_group="io")
            async def io(self, sig):
                await asyncio.get_running_loop().run_in_executor(None, sig.wait)
                return "io"

            async def compute(self, sig=None):
                if sig is not None:
                    await asyncio.get_running_loop().run_in_executor(None, sig.wait)
                return "compute"

    g = G.remote()
    sig = Signal()
    io = [g.io.remote(sig) for _ in range(3)]
    sig.wait_for_waiters(2)          # two io calls run at once: the group's limit
    assert flowcore.get(g.compute.remote(), timeout=30) == "compute"  # other group not blocked
    ready, _ = flowcore.wait(io, num_returns=1, timeout=0.3)
    assert ready == [] and sig.arrived == 2  # the third waits for a free io slot
    sig.set()
    assert flowcore.get(io, timeout=30) == ["io"] * 3
    # a call put into the io group by its options
    sig2 = Signal()
    held = [g.compute.options(concurrency_group="io").remote(sig2) for _ in range(2)]
    sig2.wait_for_waiters(2)
    sig2.set()
    assert flowcore.get(held, timeout=30) == ["compute"] * 2
    with pytest.raises(ValueError, match="'nope' .*concurrency_groups"):
        flowcore.get(g.compute.options(concurrency_group="nope").remote(), timeout=30)
    flowcore.kill(g)


def test_undeclared_group_and_max_pending_calls(cluster):
    from flowcore.exceptions import PendingCallsLimitExceeded
    from flowcore.testing import Signal

    @flowcore.remote(num_cpus=0)
    class Bad:
        @flowcore.method(concurrency_group="io")
        def f(self):
            return 1

    with pytest.raises(ValueError, match="concurrency_groups"):
        Bad.remote()
    assert flowcore.get(Bad.options(concurrency_groups={"io": 1}).remote().f.remote()) == 1

    @flowcore.remote(num_cpus=0, max_pending_calls=2)
    class Limited:
        def gated(self, sig):
            return sig.wait()

    a = Limited.remote()
    sig = Signal()
    first = [a.gated.remote(sig) for _ in range(2)]
    with pytest.raises(PendingCallsLimitExceeded, match="max_pending_calls=2"):
        a.gated.remote(sig)
    sig.set()
    assert flowcore.get(first, timeout=30) == [True, True]
    assert flowcore.get(a.gated.remote(sig), timeout=30) is True  # room again
    flowcore.kill(a)


# ------------------------------------------------------------ actor lifetime
def test_actor_exits_when_the_task_holding_its_last_handle_ends(cluster):
    import pickle
    import time

    import psutil
    from flowcore.exceptions import ActorDiedError

    @flowcore.remote(num_cpus=0)
    class A:
        def pid(self):
            return os.getpid()

        def one(self):
            return 1

    @flowcore.remote
    def use(h):
        return flowcore.get(h.one.remote())

    a = A.remote()
    pid = flowcore.get(a.pid.remote())
    saved = pickle.dumps(a)  # bytes outside flowcore: they do not keep the actor alive
    result = use.remote(a)
    del a
    assert flowcore.get(result) == 1  # `result` stays referenced

    def dead():
        return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    deadline = time.monotonic() + 30
    while not dead():
        assert time.monotonic() < deadline, "the actor outlived the task holding its last handle"
        time.sleep(0.05)
    again = pickle.loads(saved)
    with pytest.raises(ActorDiedError, match="lost reference to the actor"):
        flowcore.get(again.one.remote(), timeout=30)
    del result


# ------------------------------------------------------------ worker environment
def _threads():
    return tuple(os.environ.get(v) for v in
                 ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"))


def test_thread_counts_follow_num_cpus_unless_set(cluster):
    threads = flowcore.remote(_threads)
    assert flowcore.get(threads.options(num_cpus=2).remote()) == ("2", "2", "2")
    assert flowcore.get(threads.remote()) == ("1", "1", "1")
    assert flowcore.get(threads.options(num_cpus=0.5).remote()) == ("1", "1", "1")
    mine = threads.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": "7"}}, num_cpus=2)
    assert flowcore.get(mine.remote()) == ("7", "2", "2")  # the user's value stays

    @flowcore.remote(num_cpus=2)
    class Big:
        def threads(self):
            return _threads()

    a = Big.remote()
    assert flowcore.get(a.threads.remote()) == ("2", "2", "2")
    flowcore.kill(a)


def test_gpu_tasks_never_reuse_a_cpu_task_worker(cluster):
    @flowcore.remote(num_cpus=1)
    def cpu():
        return os.getpid()

    @flowcore.remote(num_cpus=1, num_gpus=1)
    def gpu():
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

    cpu_pids, gpu_pids = set(), set()
    for _ in range(3):
        cpu_pids.add(flowcore.get(cpu.remote()))
        pid, visible = flowcore.get(gpu.remote())
        assert visible in ("0", "1")
        gpu_pids.add(pid)
    assert not cpu_pids & gpu_pids


def test_named_actor_is_collected_with_its_last_handle(cluster):
    import gc
    import time

    @flowcore.remote(num_cpus=0)
    class Named:
        def hello(self):
            return "hello"

    a = Named.options(name="collect-me").remote()
    h = flowcore.get_actor("collect-me")
    assert flowcore.get(h.hello.remote()) == "hello"
    d = Named.options(name="stay", lifetime="detached").remote()
    flowcore.get(d.hello.remote())
    del a, h, d
    gc.collect()
    deadline = time.monotonic() + 30
    while True:  # as in Ray: a named, non-detached actor goes with its last handle
        try:
            flowcore.get_actor("collect-me")
        except ValueError:
            break
        assert time.monotonic() < deadline, "the named actor outlived its last handle"
        time.sleep(0.05)
    kept = flowcore.get_actor("stay")  # a detached one stays
    assert flowcore.get(kept.hello.remote()) == "hello"
    flowcore.kill(kept)


def test_actor_method_arguments_checked_at_submit(cluster):
    @flowcore.remote(num_cpus=0)
    class M:
        def add(self, a, b=1):
            return a + b

        @staticmethod
        def twice(x):
            return 2 * x

    m = M.remote()
    with pytest.raises(TypeError, match=r"M\.add\.remote\(\).*too many positional"):
        m.add.remote(1, 2, 3)
    with pytest.raises(TypeError, match="missing a required argument: 'a'"):
        m.add.remote()
    assert flowcore.get([m.add.remote(1), m.add.remote(1, b=5), m.twice.remote(4)]) == [2, 6, 8]
    flowcore.kill(m)
