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
    del big


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


def test_runtime_context_starts_the_cluster_and_init_namespace(tmp_path):
    flowcore.shutdown()
    try:
        ctx = flowcore.get_runtime_context()  # no init(): starts the embedded cluster
        assert flowcore.is_initialized() and ctx.get_node_id()
    finally:
        flowcore.shutdown()
    with pytest.raises(TypeError, match="namespace"):
        flowcore.init(namespace=3)
    flowcore.init(num_cpus=1, namespace="team-a", session_dir=str(tmp_path / "s"))
    try:
        assert flowcore.get_runtime_context().namespace == "team-a"

        @flowcore.remote(num_cpus=0)
        class Named:
            def ns(self):
                return flowcore.get_runtime_context().namespace

        a = Named.options(name="svc").remote()
        assert flowcore.get(a.ns.remote()) == "team-a"
        assert flowcore.get_actor("svc") == a          # looked up in the job's namespace
        with pytest.raises(ValueError, match="'default'"):
            flowcore.get_actor("svc", namespace="default")

        @flowcore.remote(num_cpus=0)
        def lookup():  # tasks inherit the job's namespace
            h = flowcore.get_actor("svc")
            return flowcore.get_runtime_context().namespace, flowcore.get(h.ns.remote())

        assert flowcore.get(lookup.remote()) == ("team-a", "team-a")
        actors = flowcore.state.list_actors()
        assert [r["namespace"] for r in actors if r["name"] == "svc"] == ["team-a"]
    finally:
        flowcore.shutdown()
