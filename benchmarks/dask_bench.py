"""Dask collections on flowcore vs Dask's own schedulers.

    python -m benchmarks.dask_bench [--runs 3] [--n 10000] [--chunk 1000] [--quick]

One row per engine for the same dask.array computation,
``(x + x.T).mean(axis=0)`` of an ``n x n`` random array in ``chunk``-sized
blocks (10k x 10k in 1k chunks: 100 blocks of 8 MB, about 400 tasks):

* flowcore: ``flowcore.init(num_cpus=2)``, ``scheduler=flowcore_dask_get``;
* Dask distributed: ``LocalCluster(n_workers=2, threads_per_worker=1)``
  (optional: skipped with a note when ``distributed`` is not installed);
* Dask threaded: the single-process floor (``scheduler="threads"``, 2 threads).

Each engine starts once (start-up is not timed); the table shows the median
wall time of ``--runs`` computations and checks that all engines agree.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_expr(n: int, chunk: int) -> Any:
    import dask.array as da
    x = da.random.RandomState(0).random_sample((n, n), chunks=chunk)
    return (x + x.T).mean(axis=0)


def timed(runs: int, compute: Callable[[], Any]) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = compute()
        times.append(time.perf_counter() - t0)
    return times, result


def bench_flowcore(args: argparse.Namespace) -> tuple[list[float], Any]:
    import flowcore
    from flowcore.util.dask import flowcore_dask_get
    flowcore.init(num_cpus=2, object_store_memory=2 << 30)
    try:
        expr = make_expr(args.n, args.chunk)
        expr.compute(scheduler=flowcore_dask_get) if args.warmup else None
        return timed(args.runs, lambda: expr.compute(scheduler=flowcore_dask_get))
    finally:
        flowcore.shutdown()


def bench_distributed(args: argparse.Namespace) -> tuple[list[float], Any]:
    from dask.distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        expr = make_expr(args.n, args.chunk)
        client.compute(expr).result() if args.warmup else None
        return timed(args.runs, lambda: client.compute(expr).result())


def bench_threaded(args: argparse.Namespace) -> tuple[list[float], Any]:
    expr = make_expr(args.n, args.chunk)
    return timed(args.runs, lambda: expr.compute(scheduler="threads", num_workers=2))


ENGINES: dict[str, Callable[[argparse.Namespace], tuple[list[float], Any]]] = {
    "flowcore": bench_flowcore,
    "dask-distributed": bench_distributed,
    "dask-threaded": bench_threaded,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dask_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="timed computations per engine")
    p.add_argument("--n", type=int, default=10_000, help="array side")
    p.add_argument("--chunk", type=int, default=1_000, help="block side")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="do not run the computation once untimed first")
    p.add_argument("--quick", action="store_true", help="one run, 4k x 4k in 1k chunks")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.n = 1, 4_000
    try:
        import dask  # noqa: F401
    except ImportError:
        log("dask is not installed (pip install 'flowcore[dask]'); nothing to measure")
        return 0
    rows, results = [], {}
    for name in args.engines.split(","):
        if name not in ENGINES:
            p.error(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
        log(f"{name}: {args.runs} run(s) of (x + x.T).mean(axis=0), {args.n}x{args.n} in "
            f"{args.chunk}-blocks")
        try:
            times, result = ENGINES[name](args)
        except ImportError as e:
            rows.append((name, None, f"skipped: {e}"))
            continue
        results[name] = result
        rows.append((name, statistics.median(times), " ".join(f"{t:.2f}" for t in times)))
    ref = next(iter(results.values()), None)
    agree = all(np.allclose(r, ref) for r in results.values())
    base = dict((n, t) for n, t, _ in rows if t is not None).get("dask-distributed")
    print(f"\n(x + x.T).mean(axis=0), {args.n}x{args.n} float64 in {args.chunk}x{args.chunk} "
          f"blocks, 2 CPUs; median of {args.runs}")
    print(f"{'engine':<18} {'median s':>9} {'vs distributed':>15}  runs")
    for name, t, note in rows:
        if t is None:
            print(f"{name:<18} {'-':>9} {'-':>15}  {note}")
            continue
        ratio = f"{base / t:.2f}x faster" if base else "-"
        if name == "dask-distributed":
            ratio = "1.00x"
        elif base and t > base:
            ratio = f"{t / base:.2f}x slower"
        print(f"{name:<18} {t:>9.2f} {ratio:>15}  {note}")
    print(f"results agree: {agree}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
