"""Large objects: the first task reading a fresh 100 MB object costs about
what later tasks on it cost (no import, copy or scan on first use)."""
from __future__ import annotations

import time

import numpy as np
import pytest

import flowcore

MiB = 1 << 20


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _first_and_later(rounds: int) -> tuple[list[float], list[float]]:
    """Per round: a worker of its own (a runtime_env of its own starts one),
    warmed with a task that reads nothing from the store, and a 100 MB object
    on arena memory never touched before (earlier objects stay alive). Returns
    the first task's time on the object and the median of three later ones."""
    firsts, laters = [], []
    keep = []
    for k in range(rounds):
        env = {"env_vars": {"LARGE_OBJECT_TEST_ROUND": str(k)}}

        @flowcore.remote(runtime_env=env)
        def head10(x: np.ndarray) -> float:
            return float(x[:10].sum())

        @flowcore.remote(runtime_env=env)
        def warm() -> int:
            return 1

        assert flowcore.get(warm.remote()) == 1  # the worker is up
        ref = flowcore.put(np.ones(100 * MiB // 8))
        keep.append(ref)
        t = time.perf_counter()
        assert flowcore.get(head10.remote(ref)) == 10.0
        firsts.append(time.perf_counter() - t)
        later = []
        for _ in range(3):
            t = time.perf_counter()
            assert flowcore.get(head10.remote(ref)) == 10.0
            later.append(time.perf_counter() - t)
        laters.append(_median(later))
    return firsts, laters


@pytest.mark.timeout(120)
def test_first_task_on_a_fresh_large_object_is_not_slower_than_3x_a_later_one(fresh_cluster):
    # one CPU: every task of a round runs in the round's one worker
    fresh_cluster(num_cpus=1, object_store_memory=512 * MiB)
    # Medians over fresh objects, each in a fresh worker; a machine busy with
    # other work may disturb one measurement, so a failing one is repeated
    # once (the defect this guards against, an import or a pass over the
    # object on first use, costs tens of ms every time).
    for attempt in range(2):
        firsts, laters = _first_and_later(rounds=3)
        first, later = _median(firsts), _median(laters)
        if first <= 3 * later:
            break
    assert first <= 3 * later, (
        f"first task on a fresh 100 MB object took {first * 1e3:.1f} ms (median), later "
        f"ones {later * 1e3:.1f} ms: first use costs more than 3x "
        f"(firsts {[round(x * 1e3, 1) for x in firsts]} ms)")
