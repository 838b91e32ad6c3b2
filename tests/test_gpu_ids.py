"""GPU ids through the public API, on a node declaring fake GPUs
(``init(num_gpus=2)``: no real device is touched, the ids are what a task
would hand to CUDA through ``CUDA_VISIBLE_DEVICES``)."""
from __future__ import annotations

import os

import pytest

import flowcore
from flowcore.testing import Signal


@pytest.mark.timeout(180)
def test_fractional_gpu_tasks_and_actors_share_ids(fresh_cluster) -> None:
    fresh_cluster(num_cpus=2, num_gpus=2)
    sig, sig2 = Signal(), Signal()
    try:
        _run(sig, sig2)
    finally:
        sig.close()
        sig2.close()


def _run(sig: Signal, sig2: Signal) -> None:

    @flowcore.remote(num_cpus=0.25, num_gpus=0.5)
    def half(s):
        s.wait()
        return flowcore.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    @flowcore.remote(num_cpus=0.25, num_gpus=1)
    def whole(s):
        s.wait()
        return flowcore.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    a, b = half.remote(sig), half.remote(sig)
    sig.wait_for_waiters(2)          # both run at once
    c = whole.remote(sig)
    sig.wait_for_waiters(3)
    assert flowcore.available_resources().get("GPU", 0.0) == pytest.approx(0.0)
    sig.set()
    (ia, ea), (ib, eb), (ic, ec) = flowcore.get([a, b, c], timeout=60)
    assert ia == ib and len(ia) == 1 and ea == eb == str(ia[0])  # one GPU, shared
    assert len(ic) == 1 and ic != ia and ec == str(ic[0])        # the other one, whole

    @flowcore.remote(num_cpus=0, num_gpus=0.5)
    class HalfGpu:
        def ids(self):
            return flowcore.get_gpu_ids()

    actor = HalfGpu.remote()
    actor_ids = flowcore.get(actor.ids.remote(), timeout=60)
    d = half.remote(sig2)
    sig2.wait_for_waiters(1)
    sig2.set()
    task_ids, _ = flowcore.get(d, timeout=60)
    assert len(actor_ids) == 1 and task_ids == actor_ids  # packed onto the actor's GPU
    flowcore.kill(actor)
