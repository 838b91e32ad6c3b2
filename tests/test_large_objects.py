"""Large objects: the first task reading a fresh 100 MB object costs about
what later tasks on it cost (no import, copy or scan on first use)."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pytest

import flowcore

MiB = 1 << 20


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _round(start: Callable[..., Any]) -> tuple[float, float]:
    """In a fresh cluster with one CPU (so one worker): warm the worker with
    the task's function on a small array sent inline (the worker is up and
    has the function, but has never read the store), put a 100 MB array, and
    time the first task reading it and the median of three later ones, each
    after a put of another 100 MB array (the same pause as the first's)."""
    flowcore.shutdown()
    start(num_cpus=1, object_store_memory=256 * MiB)

    @flowcore.remote
    def head10(x: np.ndarray) -> float:
        return float(x[:10].sum())

    assert flowcore.get(head10.remote(np.ones(10))) == 10.0
    ref = flowcore.put(np.ones(100 * MiB // 8))
    t = time.perf_counter()
    assert flowcore.get(head10.remote(ref)) == 10.0
    first = time.perf_counter() - t
    later = []
    for _ in range(3):
        # the same pause as before the first task (a put of as many bytes
        # the task does not read): a task after a while idle pays its
        # processes' wake-ups, whatever it reads
        other = flowcore.put(np.ones(100 * MiB // 8))
        t = time.perf_counter()
        assert flowcore.get(head10.remote(ref)) == 10.0
        later.append(time.perf_counter() - t)
        del other
    del ref
    return first, _median(later)


@pytest.mark.timeout(180)
def test_first_task_on_a_fresh_large_object_is_not_slower_than_3x_a_later_one(fresh_cluster):
    # Medians over three fresh clusters; a machine busy with other work may
    # disturb a measurement, so a failing one is repeated up to twice (the
    # defect this guards against, an import or a pass over the object on a
    # worker's first read, costs 70-500 ms every time: 25-100x a later task).
    for attempt in range(3):
        rounds = [_round(fresh_cluster) for _ in range(3)]
        first = _median([f for f, _ in rounds])
        later = _median([lt for _, lt in rounds])
        if first <= 3 * later:
            break
    assert first <= 3 * later, (
        f"first task on a fresh 100 MB object took {first * 1e3:.1f} ms (median), later "
        f"ones {later * 1e3:.1f} ms: first use costs more than 3x "
        f"(rounds, ms: {[(round(f * 1e3, 1), round(lt * 1e3, 1)) for f, lt in rounds]})")
