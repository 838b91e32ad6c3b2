"""Generator tasks (num_returns="streaming" / "dynamic"), num_returns=0 and
max_calls, through the public API on a real local cluster."""
from __future__ import annotations

import asyncio
import os

import pytest

import flowcore
from flowcore import DynamicObjectRefGenerator, ObjectRefGenerator
from flowcore.exceptions import GetTimeoutError, TaskError
from flowcore.testing import Signal

pytestmark = pytest.mark.timeout(60)


@flowcore.remote(num_returns="streaming")
def stream(n, gate=None):
    for i in range(n):
        if gate is not None and i == 1:
            gate.wait()  # the first value must reach the caller before this returns
        yield i * 10


def test_streaming_values_arrive_as_they_are_yielded(cluster):
    gate = Signal()
    gen = stream.remote(3, gate)
    assert isinstance(gen, ObjectRefGenerator)
    first = next(gen)
    assert flowcore.get(first, timeout=30) == 0  # while the task waits at the gate
    assert not gen.is_finished()
    with pytest.raises(GetTimeoutError):
        gen._next(0.2)  # the next value is not yielded yet
    gate.set()
    assert [flowcore.get(r) for r in gen] == [10, 20]
    assert gen.is_finished() and flowcore.get(gen.completed()) == 3
    with pytest.raises(StopIteration):
        next(gen)


def test_streaming_big_values_and_refs_outliving_the_generator(cluster):
    import numpy as np

    @flowcore.remote(num_returns="streaming")
    def arrays(n):
        for i in range(n):
            yield np.full(300_000, i, dtype=np.int64)  # 2.4 MB: through the store

    refs = list(arrays.remote(3))
    import gc
    gc.collect()  # the generator is gone; the refs keep their values
    assert [int(flowcore.get(r)[0]) for r in refs] == [0, 1, 2]


def test_streaming_error_after_some_values(cluster):
    @flowcore.remote(num_returns="streaming")
    def fails_after(k):
        for i in range(k):
            yield i
        raise ValueError("stream broke")

    refs = list(fails_after.remote(2))
    assert len(refs) == 3 and flowcore.get(refs[:2]) == [0, 1]
    with pytest.raises(ValueError, match="stream broke") as info:
        flowcore.get(refs[2])
    assert isinstance(info.value, TaskError)

    @flowcore.remote(num_returns="streaming")
    def not_a_generator():
        return 3

    with pytest.raises(TypeError, match="not a generator"):
        flowcore.get(list(not_a_generator.remote()))


def test_dynamic_generator(cluster):
    @flowcore.remote(num_returns="dynamic")
    def dyn(n):
        for i in range(n):
            yield {"i": i}

    ref = dyn.remote(3)
    gen = flowcore.get(ref)
    assert isinstance(gen, DynamicObjectRefGenerator) and len(gen) == 3
    assert [flowcore.get(r)["i"] for r in gen] == [0, 1, 2]

    @flowcore.remote
    def total(g):  # the refs travel inside the value to another task
        return sum(flowcore.get(r)["i"] for r in g)

    assert flowcore.get(total.remote(ref)) == 3


def test_async_iteration_and_generator_actor_methods(cluster):
    @flowcore.remote(num_cpus=0)
    class Sync:
        @flowcore.method(num_returns="streaming")
        def count(self, n):
            yield from range(n)

        def plain(self):
            return "plain"

    @flowcore.remote(num_cpus=0)
    class Async:
        async def count(self, n):
            for i in range(n):
                await asyncio.sleep(0)
                yield i

    s, a = Sync.remote(), Async.remote()
    assert [flowcore.get(r) for r in s.count.remote(3)] == [0, 1, 2]
    assert flowcore.get(s.plain.remote()) == "plain"
    gen = a.count.options(num_returns="streaming").remote(4)

    async def collect():
        return [await r async for r in gen]

    assert asyncio.run(collect()) == [0, 1, 2, 3]
    dyn = flowcore.get(a.count.options(num_returns="dynamic").remote(2))
    assert [flowcore.get(r) for r in dyn] == [0, 1]
    flowcore.kill(s)
    flowcore.kill(a)


def test_num_returns_zero_and_max_calls(cluster, tmp_path):
    marker = tmp_path / "ran"

    @flowcore.remote(num_returns=0)
    def side_effect(path):
        with open(path, "w") as f:
            f.write("done")

    assert side_effect.remote(str(marker)) is None
    import time
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the num_returns=0 task never ran"
        time.sleep(0.05)

    @flowcore.remote(max_calls=1)
    def pid():
        return os.getpid()

    @flowcore.remote(max_calls=0)
    def pid_reused():
        return os.getpid()

    pids = [flowcore.get(pid.remote()) for _ in range(3)]
    assert len(set(pids)) == 3  # a fresh worker process each time
    again = {flowcore.get(pid_reused.remote()) for _ in range(4)}
    assert len(again) < 4
