"""A small real workload on the embedded local cluster.

Estimates pi with parallel Monte Carlo tasks, builds a tree reduction of
NumPy arrays through the shared-memory store, uses put/get/wait, and ends
by drawing the tree reduction's DAG to demo-output/dag.svg (and .dot); on a
machine without a Graphviz renderer it writes the .dot and says how to draw it.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

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


def tree_sum(refs: list, keep: list | None = None) -> flowcore.ObjectRef:
    """Pairwise sums down to one ref; ``keep`` collects every level's refs
    (the head forgets finished tasks whose refs are dropped, so the DAG can
    be drawn afterwards only while they are held)."""
    while len(refs) > 1:
        if keep is not None:
            keep.extend(refs)
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
    tree_refs: list = []  # held until the DAG is drawn at the end
    tree = tree_sum([leaf.remote(i) for i in range(64)], keep=tree_refs)
    total = flowcore.get(tree)
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

    out = Path("demo-output")
    out.mkdir(exist_ok=True)
    svg = out / "dag.svg"
    svg.unlink(missing_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        dag = flowcore.visualize(tree, filename=svg)
    (out / "dag.dot").write_text(dag.source)
    if svg.exists():
        print(f"DAG of the tree reduction (64 leaf tasks, 63 combine tasks) drawn to "
              f"{svg.resolve()} (Graphviz source: {out / 'dag.dot'})")
    else:  # no Graphviz `dot` and no graphviz-pure: the DOT source only
        why = "; ".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
        print(f"DAG of the tree reduction written as Graphviz source to "
              f"{(out / 'dag.dot').resolve()}, not drawn: {why}")
    del tree, tree_refs
    if info.get("dashboard_url"):
        print(f"dashboard: {info['dashboard_url']} (log in with the token in "
              f"{info['session_dir']}/token; the start line above has a tokenised link)")
    flowcore.shutdown()
    print(f"done in {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
