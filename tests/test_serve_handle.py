"""DeploymentHandle calls over the replicas' channels: results, await,
timeouts, passing responses on, queue limits, errors with the replica's
traceback, replica death, and the actor-call path for arguments holding
object references."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import time

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")

import flowcore
from flowcore import serve
from flowcore.serve.router import get_router
from flowcore.testing import Signal


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    flowcore.shutdown()
    flowcore.init(num_cpus=2, session_dir=str(tmp_path_factory.mktemp("serve-handle")))
    serve.start(http_options={"port": 0})
    yield
    serve.shutdown()
    flowcore.shutdown()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1,
                  max_queued_requests=1)
class Model:
    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x + self.k

    async def add(self, x, y=0):
        return x + y + self.k

    def blocked(self, sig, value):
        sig.wait()
        return value

    def pid(self):
        return os.getpid()

    async def parked(self, sig):
        await asyncio.get_running_loop().run_in_executor(None, sig.wait)
        return "not cancelled"

    def fail(self, text):
        raise ValueError(f"bad input: {text}")

    def count(self, n):
        for i in range(n):
            yield i


def _channel_calls(router) -> int:
    """Answers that came back over this process's channels so far."""
    return sum(next(r.channel.ids) for r in router._replicas.values()
               if r.channel is not None)


def test_handle_calls_use_the_channel_and_keep_semantics(cluster):
    h = serve.run(Model.bind(10), name="h1", route_prefix=None)
    router = get_router("h1", "Model")
    assert h.remote(1).result(timeout_s=60) == 11
    assert h.add.remote(1, y=2).result() == 13
    assert h.options(method_name="add").remote(5).result() == 15
    assert _channel_calls(router) >= 3      # not actor calls
    # a response passed on: the caller does not wait for the first call
    sig = Signal()
    try:
        first = h.blocked.remote(sig, 5)
        t0 = time.monotonic()
        second = h.add.remote(first, y=first)      # the same response twice
        assert time.monotonic() - t0 < 5
        with pytest.raises(TimeoutError):
            second.result(timeout_s=0.2)
        sig.set()
        assert second.result(timeout_s=60) == 20
        assert first.result() == 5
    finally:
        sig.close()

    # awaited inside async code, passed on from there too
    async def main():
        a = h.remote(1)
        return await h.add.remote(a), await a

    assert asyncio.run(main()) == (21, 11)
    # a streaming call, with a response of a channel call as its argument
    gen = h.options(stream=True).count.remote(h.remote(-7))
    assert list(gen) == [0, 1, 2]


def test_handle_errors_and_queue_limit(cluster):
    h = serve.run(Model.bind(0), name="h2", route_prefix=None)
    with pytest.raises(ValueError, match="bad input: x") as info:
        h.fail.remote("x").result(timeout_s=60)
    assert isinstance(info.value, flowcore.exceptions.TaskError)
    # the replica's traceback, down to the method that raised
    assert ", in fail\n" in info.value.remote_traceback
    assert "ValueError: bad input: x" in info.value.remote_traceback
    with pytest.raises(AttributeError, match="no method 'nope'"):
        h.nope.remote()
    # max_ongoing_requests=1 runs one, max_queued_requests=1 queues one
    sig = Signal()
    try:
        running = h.blocked.remote(sig, 1)
        sig.wait_for_waiters(1, timeout=60)
        queued = h.blocked.remote(sig, 2)
        with pytest.raises(serve.exceptions.BackPressureError, match="max_queued_requests"):
            h.blocked.remote(sig, 3).result(timeout_s=60)
        sig.set()
        assert (running.result(timeout_s=60), queued.result(timeout_s=60)) == (1, 2)
    finally:
        sig.close()
    # a cancelled call frees its place at once (max_ongoing_requests=1)
    sig = Signal()
    try:
        parked = h.parked.remote(sig)
        sig.wait_for_waiters(1, timeout=60)
        parked.cancel()
        with pytest.raises(cf.CancelledError):
            parked.result(timeout_s=60)
        assert h.remote(7).result(timeout_s=60) == 7
    finally:
        sig.close()


def test_object_ref_and_large_arguments_go_as_actor_calls(cluster):
    import numpy as np
    h = serve.run(Model.bind(1), name="h3", route_prefix=None)
    router = get_router("h3", "Model")
    assert h.remote(flowcore.put(41)).result(timeout_s=60) == 42
    big = np.ones(300_000)                 # 2.4 MB: through the object store
    assert float(h.remote(big).result(timeout_s=60).sum()) == 600_000.0
    assert _channel_calls(router) == 0


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0},
                  health_check_period_s=0.5)
class Two:
    def wait_pid(self, sig):
        sig.wait()
        return os.getpid()

    def pid(self):
        return os.getpid()


def test_call_on_a_killed_replica_is_retried_on_another(cluster):
    h = serve.run(Two.bind(), name="h4", route_prefix=None)
    pids = set()
    deadline = time.time() + 60
    while len(pids) < 2 and time.time() < deadline:
        pids.add(h.pid.remote().result(timeout_s=60))
    assert len(pids) == 2
    sig = Signal()
    try:
        resp = h.wait_pid.remote(sig)
        sig.wait_for_waiters(1, timeout=60)
        # the replica running it is the one with a call in flight
        router = get_router("h4", "Two")
        busy = [r for r in router._replicas.values() if r.ongoing]
        assert len(busy) == 1
        victim = [p for p in pids
                  if flowcore.get(busy[0].actor.ready.remote())["pid"] == p][0]
        os.kill(victim, signal.SIGKILL)
        sig.set()
        assert resp.result(timeout_s=60) in pids - {victim}
    finally:
        sig.close()


def test_ray_spelling_of_options_and_signatures():
    """Ray 2.60's names and defaults for the options flowcore.serve reads."""
    import inspect
    from flowcore.serve.autoscaler import AutoscalingPolicy
    from flowcore.serve.config import AutoscalingConfig, DeploymentConfig, HTTPOptions
    assert list(inspect.signature(serve.start).parameters)[:2] == ["proxy_location",
                                                                   "http_options"]
    with pytest.raises(TypeError, match="proxy_location"):
        serve.start({"port": 0})
    assert HTTPOptions().keep_alive_timeout_s == 90
    cfg = DeploymentConfig()
    assert (cfg.max_ongoing_requests, cfg.max_queued_requests, cfg.health_check_period_s,
            cfg.health_check_timeout_s, cfg.graceful_shutdown_wait_loop_s,
            cfg.graceful_shutdown_timeout_s, cfg.max_constructor_retry_count) == \
        (5, -1, 10, 30, 2, 20, 20)
    dep = serve.deployment(max_constructor_retry_count=2,
                           logging_config={"enable_access_log": False})(Model)
    assert dep.config.max_constructor_retry_count == 2
    # smoothing_factor halves a step; downscale_to_zero_delay_s shortens 1 -> 0
    a = AutoscalingConfig(min_replicas=0, max_replicas=10, target_ongoing_requests=1,
                          smoothing_factor=0.5, downscale_delay_s=100,
                          downscale_to_zero_delay_s=1, upscale_delay_s=0)
    p = AutoscalingPolicy(a)
    p.record(0.0, 8.0)
    assert p.desired(2) == 5                      # 2 + (8 - 2) * 0.5
    q = AutoscalingPolicy(a)
    q.record(0.0, 0.0)
    assert q.decide(0.0, 1) == 1 and q.decide(1.5, 1) == 0
    assert "timeout_s" in inspect.signature(serve.DeploymentResponse.result).parameters
    assert inspect.iscoroutinefunction(serve.shutdown_async)
