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
