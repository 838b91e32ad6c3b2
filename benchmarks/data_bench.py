"""flowcore.data benchmarks beside pandas (the single-process floor) and
Ray Data (only when ``ray`` is installed; skipped with a note otherwise).

    python -m benchmarks.data_bench            # full sizes (10M rows, 1 GB parquet)
    python -m benchmarks.data_bench --quick    # 1M rows, 100 MB parquet
    python -m benchmarks.data_bench --parquet-mb 256 --repeat 3
    python -m benchmarks.data_bench --engines flowcore,pandas

Rows: map_batches rows/s (iter_batches consumer), groupby-sum of 1M rows x
1000 keys (s), range(1000).map(f).take_all() latency (s, warm median),
sort (s), read_parquet -> map_batches -> write_parquet (GB/s of input),
iter_batches rows/s from a materialized dataset.  Each engine runs in this
process with num_cpus=2; flowcore's peak object-store use is printed too.
Times are medians of ``--repeat`` (default 3) warm runs; the "first call"
row is the first dataset execution after ``init`` (workers already
started), where Ray Data starts its executor.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

os.environ.setdefault("FLOWCORE_QUIET", "1")


REPEAT = 3


def _timed(fn: Callable[[], Any], repeat: int | None = None) -> float:
    repeat = repeat or REPEAT
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _pieces(total: int, n: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        ln = base + (1 if i < extra else 0)
        out.append((start, ln))
        start += ln
    return out


def _write_parquet_input(path: str, total_bytes: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(path, exist_ok=True)
    per_file = 32 << 20
    n_files = max(1, total_bytes // per_file)
    rows = per_file // 16
    rng = np.random.default_rng(0)
    for i in range(n_files):
        pq.write_table(pa.table({"a": rng.random(rows), "b": rng.integers(0, 1000, rows)}),
                       f"{path}/part-{i:04d}.parquet", compression=None)
    return n_files * per_file


def _warm_workers(engine: Any) -> None:
    """Every worker process has imported the data library before timing."""
    @engine.remote
    def warm() -> int:
        import flowcore.data.executor  # noqa: F401
        return os.getpid()
    engine.get([warm.remote() for _ in range(8)])


def bench_flowcore(sizes: dict, tmp: str) -> dict:
    import flowcore
    import flowcore.data as fd
    flowcore.init(num_cpus=2)
    res: dict = {}
    try:
        n = sizes["rows"]
        _warm_workers(flowcore)
        res["range(1000).map.take_all first call (s)"] = _timed(
            lambda: fd.range(1000).map(lambda r: {"id": r["id"] + 1}).take_all(), 1)
        ds = fd.range(n).map_batches(lambda b: {"id": b["id"] * 2})
        ds.count()  # warm: the first run starts workers and loads the function
        t = _timed(lambda: sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)))
        res["map_batches rows/s"] = n / t
        import pandas as pd
        rng = np.random.default_rng(0)
        df = pd.DataFrame({"k": rng.integers(0, 1000, 1_000_000), "v": rng.random(1_000_000)})
        src = fd.from_pandas(df)
        res["groupby-sum 1M x 1000 keys (s)"] = _timed(
            lambda: src.groupby("k").sum("v").to_pandas())
        fd.range(1000).map(lambda r: r).take_all()  # warm the workers
        res["range(1000).map.take_all (s)"] = _timed(
            lambda: fd.range(1000).map(lambda r: {"id": r["id"] + 1}).take_all(), 5)
        sdf = pd.DataFrame({"v": rng.random(sizes["sort_rows"])})
        sds = fd.from_pandas([sdf.iloc[o:o + ln] for o, ln in _pieces(len(sdf), 8)])
        res["sort (s)"] = _timed(lambda: sds.sort("v").materialize())
        src_dir, out_dir = f"{tmp}/in", f"{tmp}/out_fc"
        nbytes = sizes["parquet_bytes_real"]
        t = _timed(lambda: fd.read_parquet(src_dir).map_batches(
            lambda b: {"a": b["a"] * 2, "b": b["b"]}).write_parquet(out_dir))
        res["parquet read->map->write GB/s"] = nbytes / t / 1e9
        mat = fd.range(n).materialize()
        t = _timed(lambda: sum(len(b["id"]) for b in mat.iter_batches(batch_size=4096)))
        res["iter_batches rows/s"] = n / t
        res["peak store use (MiB)"] = max(
            nd["store"]["used"] for nd in flowcore.nodes() if nd.get("alive")) / 2**20
    finally:
        flowcore.shutdown()
    return res


def bench_pandas(sizes: dict, tmp: str) -> dict:
    import pandas as pd
    import pyarrow.parquet as pq
    res: dict = {"range(1000).map.take_all first call (s)": float("nan")}
    n = sizes["rows"]
    df = pd.DataFrame({"id": np.arange(n)})
    t = _timed(lambda: (df["id"] * 2).sum())
    res["map_batches rows/s"] = n / t
    rng = np.random.default_rng(0)
    g = pd.DataFrame({"k": rng.integers(0, 1000, 1_000_000), "v": rng.random(1_000_000)})
    res["groupby-sum 1M x 1000 keys (s)"] = _timed(lambda: g.groupby("k")["v"].sum())
    res["range(1000).map.take_all (s)"] = _timed(
        lambda: [{"id": i + 1} for i in range(1000)], 5)
    s = pd.DataFrame({"v": rng.random(sizes["sort_rows"])})
    res["sort (s)"] = _timed(lambda: s.sort_values("v"))
    src_dir, out_dir = f"{tmp}/in", f"{tmp}/out_pd"
    os.makedirs(out_dir, exist_ok=True)

    def pq_pipeline() -> None:
        for f in sorted(os.listdir(src_dir)):
            d = pq.read_table(f"{src_dir}/{f}").to_pandas()
            d["a"] = d["a"] * 2
            d.to_parquet(f"{out_dir}/{f}")
    res["parquet read->map->write GB/s"] = sizes["parquet_bytes_real"] / _timed(pq_pipeline) / 1e9
    res["iter_batches rows/s"] = n / _timed(
        lambda: sum(len(df.iloc[i:i + 4096]) for i in range(0, n, 4096)))
    return res


def bench_ray(sizes: dict, tmp: str) -> dict:
    import logging

    import ray
    import ray.data as rd
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    res: dict = {}
    try:
        n = sizes["rows"]

        @ray.remote
        def warm() -> int:
            import ray.data  # noqa: F401
            return os.getpid()
        ray.get([warm.remote() for _ in range(8)])
        res["range(1000).map.take_all first call (s)"] = _timed(
            lambda: rd.range(1000).map(lambda r: {"id": r["id"] + 1}).take_all(), 1)
        ds = rd.range(n).map_batches(lambda b: {"id": b["id"] * 2})
        ds.count()
        res["map_batches rows/s"] = n / _timed(
            lambda: sum(len(b["id"]) for b in ds.iter_batches(batch_size=None)))
        import pandas as pd
        rng = np.random.default_rng(0)
        df = pd.DataFrame({"k": rng.integers(0, 1000, 1_000_000), "v": rng.random(1_000_000)})
        src = rd.from_pandas(df)
        res["groupby-sum 1M x 1000 keys (s)"] = _timed(
            lambda: src.groupby("k").sum("v").to_pandas())
        res["range(1000).map.take_all (s)"] = _timed(
            lambda: rd.range(1000).map(lambda r: {"id": r["id"] + 1}).take_all(), 5)
        # 8 blocks as for flowcore (Ray 2.60's from_pandas(override_num_blocks=)
        # fails on a single DataFrame, so the frame is cut here)
        sdf = pd.DataFrame({"v": rng.random(sizes["sort_rows"])})
        sds = rd.from_pandas([sdf.iloc[o:o + ln] for o, ln in _pieces(len(sdf), 8)])
        res["sort (s)"] = _timed(lambda: sds.sort("v").materialize())
        res["parquet read->map->write GB/s"] = sizes["parquet_bytes_real"] / _timed(
            lambda: rd.read_parquet(f"{tmp}/in").map_batches(
                lambda b: {"a": b["a"] * 2, "b": b["b"]}).write_parquet(f"{tmp}/out_ray")) / 1e9
        mat = rd.range(n).materialize()
        res["iter_batches rows/s"] = n / _timed(
            lambda: sum(len(b["id"]) for b in mat.iter_batches(batch_size=4096)))
    finally:
        ray.shutdown()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engines", default="flowcore,pandas,ray")
    ap.add_argument("--parquet-mb", type=int, default=None,
                    help="size of the parquet input (default 1024, 100 with --quick)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (the median is shown)")
    args = ap.parse_args(argv)
    global REPEAT
    REPEAT = max(1, args.repeat)
    mb = args.parquet_mb or (100 if args.quick else 1024)
    sizes = {"rows": 1_000_000 if args.quick else 10_000_000,
             "sort_rows": 1_000_000 if args.quick else 10_000_000,
             "parquet_bytes": mb << 20}
    tmp = tempfile.mkdtemp(prefix="flowcore-data-bench-")
    os.chmod(tmp, 0o700)
    results: dict[str, dict] = {}
    try:
        sizes["parquet_bytes_real"] = _write_parquet_input(f"{tmp}/in", sizes["parquet_bytes"])
        runners = {"flowcore": bench_flowcore, "pandas": bench_pandas, "ray": bench_ray}
        for eng in args.engines.split(","):
            if eng == "ray":
                try:
                    import ray.data  # noqa: F401
                except ImportError:
                    print("note: ray is not installed; Ray Data rows skipped "
                          "(pip install 'flowcore[bench]')")
                    continue
            try:
                results[eng] = runners[eng](sizes, tmp)
            except Exception as e:  # noqa: BLE001 - one engine failing keeps the others
                print(f"note: {eng} failed: {type(e).__name__}: {e}")
                continue
            print(f"{eng}: {results[eng]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = list(next(iter(results.values())).keys()) if results else []
    engines = list(results)
    print(f"sizes: {sizes['rows']:,} rows, sort {sizes['sort_rows']:,} rows, parquet "
          f"{sizes['parquet_bytes_real'] / 2**20:.0f} MiB; medians of {REPEAT} runs")
    print(f"{'workload':42s}" + "".join(f"{e:>16s}" for e in engines))
    for r in rows:
        cells = "".join(f"{results[e].get(r, float('nan')):16.4g}" for e in engines)
        print(f"{r:42s}{cells}")


if __name__ == "__main__":
    main()
