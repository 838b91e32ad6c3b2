"""A small real workload on the embedded local cluster.

Estimates pi with parallel Monte Carlo tasks, builds a tree reduction of
NumPy arrays through the shared-memory store, and uses put/get/wait.
"""
from __future__ import annotations

import time

import numpy as np

import flowcore


@flowcore.remote
def sample(seed: int, n: int) -> int:
    rng = np.random.default_rng(seed)
    xy = rng.random((n, 2))
    return int(((xy ** 2).sum(axis=1) <= 1.0).sum())


@flowcore.remote
def leaf(i: int) -> np.ndarray:
    return np.full(131_072, float(i))  # 1 MiB


@flowcore.remote
def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def tree_sum(refs: list) -> flowcore.ObjectRef:
    while len(refs) > 1:
        refs = [combine.remote(refs[i], refs[i + 1]) if i + 1 < len(refs) else refs[i]
                for i in range(0, len(refs), 2)]
    return refs[0]


def main() -> None:
    t0 = time.perf_counter()
    info = flowcore.init()
    print(f"cluster up in {time.perf_counter() - t0:.2f}s: head {info['address']}, "
          f"session {info['session_dir']}")
    print(f"resources: {flowcore.cluster_resources()}")

    t = time.perf_counter()
    n, tasks = 200_000, 40
    refs = [sample.remote(seed, n) for seed in range(tasks)]
    ready, rest = flowcore.wait(refs, num_returns=tasks // 2)
    print(f"{len(ready)} sampling tasks finished first, {len(rest)} still going")
    pi = 4 * sum(flowcore.get(refs)) / (n * tasks)
    print(f"pi ~ {pi:.4f} from {tasks} tasks in {time.perf_counter() - t:.2f}s")

    t = time.perf_counter()
    total = flowcore.get(tree_sum([leaf.remote(i) for i in range(64)]))
    expected = sum(range(64))
    assert total[0] == expected, total[0]
    print(f"tree reduction of 64 x 1 MiB arrays -> {total[0]:.0f} (expected {expected}) "
          f"in {time.perf_counter() - t:.2f}s; result is a read-only zero-copy view: "
          f"{not total.flags.writeable}")

    big = flowcore.put(np.arange(10_000_000, dtype=np.float64))
    t = time.perf_counter()
    view = flowcore.get(big)
    print(f"get of an 80 MB array took {1e3 * (time.perf_counter() - t):.2f} ms (zero-copy), "
          f"sum {view.sum():.0f}")
    del view, big
    flowcore.shutdown()
    print(f"done in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
