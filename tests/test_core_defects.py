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
