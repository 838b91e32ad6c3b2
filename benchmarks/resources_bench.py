"""The node's resource accounting on the task path, in isolation.

``python -m benchmarks.resources_bench`` times, in one process with no IO:

* ``fits+take+give``: one ``Resources.fits`` / ``take`` / ``give`` round on a
  3-resource request (what the pool does per task);
* ``same, 0.1.0 functions``: that round written as flowcore 0.1.0's pool
  wrote it (generator fit, signed add), for reference;
* ``pool cycle``: ``WorkerPool.task_arrived`` + ``worker_idle`` for a 1-CPU
  task on a ready 2-CPU pool (the node's whole per-task bookkeeping);
* ``pool cycle 0.5 GPU``: the same for a task asking for half a GPU (GPU
  ids granted and given back).

Each row is the best of 9 repetitions of this process's CPU time (the least
disturbed by other load on the machine), in microseconds per operation.  To
compare with another tree, run it with ``PYTHONPATH=/that/tree`` (rows whose
API the other tree lacks print as skipped).
"""
from __future__ import annotations

import time
from typing import Callable


def _best_us(fn: Callable[[int], None], n: int, reps: int = 9) -> float:
    out = []
    for _ in range(reps):
        t = time.process_time()
        fn(n)
        out.append((time.process_time() - t) / n * 1e6)
    return min(out)


def bench_resources(n: int) -> None:
    from flowcore.resources import Resources
    free = Resources({"CPU": 8.0, "GPU": 2.0, "memory": 16e9})
    req = {"CPU": 1.0, "GPU": 0.5, "memory": 1e9}
    for _ in range(n):
        if free.fits(req):
            free.take(req)
            free.give(req)


def bench_dict_functions(n: int) -> None:
    """The same round as flowcore 0.1.0 wrote it: a generator ``all()`` for
    the fit and a signed add for take/give, on a plain dict."""
    eps = 1e-9
    free = {"CPU": 8.0, "GPU": 2.0, "memory": 16e9}
    req = {"CPU": 1.0, "GPU": 0.5, "memory": 1e9}

    def add(res: dict, sign: float) -> None:
        for k, v in res.items():
            if v:
                free[k] = free.get(k, 0.0) + sign * v

    for _ in range(n):
        if all(free.get(k, 0.0) >= v - eps for k, v in req.items() if v):
            add(req, -1.0)
            add(req, +1.0)


def _ready_pool(res: dict, gpu_ids: list[int] | None = None):
    from flowcore.node.pool import WorkerPool
    pool = WorkerPool(res, gpu_ids=gpu_ids)
    for i, a in enumerate(pool.startup()):
        pool.worker_ready(a[1], 1000 + i)
    return pool


def _cycle(pool, res: dict, n: int) -> None:
    tid = b"\0" * 16
    for _ in range(n):
        acts = pool.task_arrived({"tid": tid, "res": res})
        pool.worker_idle(acts[0][1])


def bench_pool(n: int) -> None:
    _cycle(_ready_pool({"CPU": 2.0, "memory": 16e9}), {"CPU": 1.0}, n)


def bench_pool_gpu(n: int) -> None:
    _cycle(_ready_pool({"CPU": 2.0, "GPU": 1.0}, [0]), {"CPU": 1.0, "GPU": 0.5}, n)


def main() -> None:
    rows = [("fits+take+give", bench_resources, 50_000),
            ("same, 0.1.0 functions", bench_dict_functions, 50_000),
            ("pool cycle", bench_pool, 10_000),
            ("pool cycle 0.5 GPU", bench_pool_gpu, 10_000)]
    print(f"{'row':<22}{'us/op':>10}")
    for name, fn, n in rows:
        try:
            us = _best_us(fn, n)
        except ImportError as e:
            print(f"{name:<22}{'skipped':>10}  ({e})")
            continue
        print(f"{name:<22}{us:>10.3f}")


if __name__ == "__main__":
    main()
