"""One engine, one fresh interpreter: measure every workload, print JSON lines.

Usage (normally started by ``python -m benchmarks.run``)::

    python benchmarks/engine_worker.py ENGINE [--quick] [--only NAME,...]

Every result is printed on its own stdout line prefixed with ``@@BENCH `` as
soon as it is known, so a parent that has to kill a hung run still keeps the
results measured before the hang.
"""
import time

T0 = time.perf_counter()  # first statement: cold start is measured from here

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks.adapters import EngineUnavailable, make_engine  # noqa: E402  (stdlib only)

MiB = 1 << 20
PREFIX = "@@BENCH "


# --------------------------------------------------------------------------------------
# Task bodies. They live in __main__ so that every engine ships them by value
# (cloudpickle); numpy is imported inside them so that no engine relies on the
# driver's globals.

def one():
    return 1


def noop():
    return None


def array_len(arr):
    return arr.shape[0]


def leaf(n):
    import numpy as np
    return np.ones(n)


def add(a, b):
    return a + b


def make_array(n):
    import numpy as np
    return np.arange(n, dtype=np.float64)


def node_here(engine):
    """The id of the node running this task, as the adapter's start_cluster() names it."""
    if engine == "flowcore":
        import flowcore
        return flowcore.get_runtime_context().get_node_id()
    if engine == "ray":
        import ray
        return ray.get_runtime_context().get_node_id()
    from distributed import get_worker
    return get_worker().address


def child(i):
    return i


# Set by the nested workloads before they start (the remote functions, shipped
# by value with the bodies that call them).
CHILD = None
FIB = None


def nested_parent(engine, n):
    """Submits ``n`` child tasks from inside a task and sums their results."""
    if engine == "dask":
        from distributed import worker_client
        with worker_client() as client:
            return sum(client.gather([client.submit(child, i, pure=False) for i in range(n)]))
    import importlib
    mod = importlib.import_module(engine)
    return sum(mod.get([CHILD.remote(i) for i in range(n)]))


def fib(engine, n):
    """The user guide's recursive fib: each parent blocks in get on its two children."""
    if n < 2:
        return n
    if engine == "dask":
        from distributed import worker_client
        with worker_client() as client:
            a = client.submit(fib, engine, n - 1, pure=False)
            b = client.submit(fib, engine, n - 2, pure=False)
            return a.result() + b.result()
    import importlib
    mod = importlib.import_module(engine)
    return sum(mod.get([FIB.remote(engine, n - 1), FIB.remote(engine, n - 2)]))


# Actor classes (also in __main__, shipped by value). No constructor arguments.

class SyncPinger:
    def ping(self):
        return None


class AsyncPinger:
    """An async actor: its calls overlap on one event loop in the actor's process."""

    async def ping(self):
        return None


# --------------------------------------------------------------------------------------
# Sizes. --quick shrinks durations and counts, not the array sizes the targets refer to.

FULL = dict(
    sync_seconds=2.0,
    async_n=1000, async_reps=5,
    small_seconds=1.5, small_max=20000,
    large_mib=100, put_seconds=1.5, copy_seconds=1.0,
    get_reps=10,
    bigarg_n=100, bigarg_first_n=20,
    tree_leaves=256, tree_leaf_len=131072, tree_reps=3, tree_warmups=1,
    xnode_reps=5, xnode_warmups=1,
    nested_n=1000, nested_reps=3, fib_n=10, fib_reps=2,
    workload_timeout=120,
)
QUICK = dict(
    FULL,
    sync_seconds=0.3,
    async_n=200, async_reps=2,
    small_seconds=0.3, small_max=2000,
    put_seconds=0.4, copy_seconds=0.3,
    get_reps=3,
    bigarg_n=20,
    tree_reps=1, tree_warmups=0,
    xnode_reps=3, xnode_warmups=1,
    nested_reps=1, fib_reps=1,
    workload_timeout=60,
)

perf = time.perf_counter


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


# --------------------------------------------------------------------------------------
# Workloads: each takes (engine, cfg) and returns {metric: value}.

def _round_trips(call, seconds):
    """(calls per second, count) of ``call()`` repeated for ``seconds``."""
    n = 0
    t0 = perf()
    deadline = t0 + seconds
    while True:
        call()
        n += 1
        t = perf()
        if t >= deadline:
            break
    return n / (t - t0), n


def _bursts(eng, submit, n, reps, check=None):
    """``n`` submissions then one get of all, ``reps`` times (one warm-up
    first): (median completion rate, median submission rate)."""
    eng.get([submit() for _ in range(n)])  # warm-up rep, not counted
    rates, submit_rates = [], []
    for _ in range(reps):
        t0 = perf()
        refs = [submit() for _ in range(n)]
        t1 = perf()
        out = eng.get(refs)
        dt = perf() - t0
        if len(out) != n or (check is not None and not check(out)):
            raise AssertionError(f"got {len(out)} results for {n} submissions, or wrong ones")
        rates.append(n / dt)
        submit_rates.append(n / (t1 - t0))
        del refs, out
    return median(rates), median(submit_rates)


def w_sync_rtt(eng, cfg):
    f = eng.remote(noop)
    for _ in range(10):
        eng.get(f())
    rate, n = _round_trips(lambda: eng.get(f()), cfg["sync_seconds"])
    return {"sync_rtt_per_s": rate, "sync_rtt_count": n}


def w_async_tasks(eng, cfg):
    f = eng.remote(noop)
    rate, submit = _bursts(eng, f, cfg["async_n"], cfg["async_reps"])
    return {"async_tasks_per_s": rate, "async_submit_per_s": submit}


def w_small_put_get(eng, cfg):
    payload = b"x" * 100
    for _ in range(10):
        eng.get(eng.put(payload))
    refs = []
    limit = cfg["small_max"]
    t0 = perf()
    deadline = t0 + cfg["small_seconds"]
    while True:
        refs.append(eng.put(payload))
        t = perf()
        if t >= deadline or len(refs) >= limit:
            break
    put_rate = len(refs) / (t - t0)
    got = 0
    t0 = perf()
    deadline = t0 + cfg["small_seconds"]
    for r in refs:
        v = eng.get(r)
        got += 1
        t = perf()
        if t >= deadline:
            break
    get_rate = got / (t - t0)
    if v != payload:
        raise AssertionError(f"get returned {v!r:.60}")
    return {"small_put_per_s": put_rate, "small_get_per_s": get_rate,
            "small_put_count": len(refs), "small_get_count": got}


def w_large_put(eng, cfg):
    import numpy as np
    nbytes = cfg["large_mib"] * MiB
    arr = np.arange(nbytes // 8, dtype=np.float64)
    # Reference: a plain in-process copy into a preallocated destination.
    dst = np.empty_like(arr)
    np.copyto(dst, arr)
    n = 0
    t0 = perf()
    deadline = t0 + cfg["copy_seconds"]
    while True:
        np.copyto(dst, arr)
        n += 1
        t = perf()
        if t >= deadline and n >= 3:
            break
    copy_gbps = n * nbytes / (t - t0) / 1e9
    del dst
    # Engine: one warm put, then put-and-drop for put_seconds.
    t = perf()
    ref = eng.put(arr)
    first_put_s = perf() - t
    del ref
    n = 0
    t0 = perf()
    deadline = t0 + cfg["put_seconds"]
    while True:
        ref = eng.put(arr)
        del ref
        n += 1
        t = perf()
        if t >= deadline and n >= 3:
            break
    put_gbps = n * nbytes / (t - t0) / 1e9
    return {"large_put_gbps": put_gbps, "copy_gbps": copy_gbps,
            "large_put_vs_copy": put_gbps / copy_gbps, "large_first_put_s": first_put_s,
            "large_put_count": n}


def w_large_get(eng, cfg):
    """Median time of a get of an array already in the store, at 1 MiB .. 1 GiB.

    A zero-copy get costs the same at every size; the 10 and 100 MiB rows keep
    their historical names (large_get_small_ms, large_get_big_ms)."""
    import numpy as np
    big = cfg["large_mib"] * MiB
    sizes = [("1mib", MiB), ("small", big // 10), ("big", big), ("1gib", 1024 * MiB)]
    times = {}
    for name, nbytes in sizes:
        a = np.arange(nbytes // 8, dtype=np.float64)
        ref = eng.put(a)
        v = eng.get(ref)  # warm-up get, also checks the content
        if v.shape != a.shape or v[-1] != a[-1]:
            raise AssertionError("large get returned wrong data")
        del v, a
        ts = []
        for _ in range(cfg["get_reps"]):
            t = perf()
            v = eng.get(ref)
            ts.append(perf() - t)
            del v
        times[name] = median(ts)
        del ref
    return {"large_get_gbps": big / times["big"] / 1e9,
            "large_get_1mib_ms": times["1mib"] * 1e3,
            "large_get_small_ms": times["small"] * 1e3, "large_get_big_ms": times["big"] * 1e3,
            "large_get_1gib_ms": times["1gib"] * 1e3,
            "large_get_growth": times["big"] / times["small"],
            "large_get_growth_1g": times["1gib"] / times["1mib"]}


def w_big_arg(eng, cfg):
    import numpy as np
    arr = np.ones(cfg["large_mib"] * MiB // 8)
    ref = eng.put(arr)
    expected = arr.shape[0]
    del arr
    f = eng.remote(array_len)
    # The first batch after the put: each worker's first use of the object
    n_first = cfg["bigarg_first_n"]
    t0 = perf()
    out = eng.get([f(ref) for _ in range(n_first)])
    first_rate = n_first / (perf() - t0)
    if out != [expected] * n_first:
        raise AssertionError(f"wrong results: {out[:3]}")
    n = cfg["bigarg_n"]
    t0 = perf()
    out = eng.get([f(ref) for _ in range(n)])
    dt = perf() - t0
    bad = [x for x in out if x != expected]
    if len(out) != n or bad:
        raise AssertionError(f"wrong results: {bad[:3]}")
    return {"big_arg_tasks_per_s": n / dt, "big_arg_first_tasks_per_s": first_rate}


def w_tree_reduce(eng, cfg):
    leaf_r, add_r = eng.remote(leaf), eng.remote(add)
    leaves, length = cfg["tree_leaves"], cfg["tree_leaf_len"]

    def once():
        t0 = perf()
        level = [leaf_r(length) for _ in range(leaves)]
        while len(level) > 1:
            nxt = [add_r(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        out = eng.get(level[0])
        dt = perf() - t0
        total = float(out.sum())
        if out.shape != (length,) or total != float(leaves * length):
            raise AssertionError(f"tree sum {total} != {leaves * length} (shape {out.shape})")
        return dt

    for _ in range(cfg["tree_warmups"]):
        once()
    times = [once() for _ in range(cfg["tree_reps"])]
    return {"tree_reduce_s": median(times)}


class actor_of:
    """``with actor_of(eng, Cls) as h:`` one actor, killed on the way out.

    A failure to kill after the workload itself failed is only printed, so the
    workload's own error is the one reported."""

    def __init__(self, eng, cls):
        self.eng, self.cls = eng, cls

    def __enter__(self):
        self.handle = self.eng.actor(self.cls)
        return self.handle

    def __exit__(self, exc_type, exc, tb):
        try:
            self.eng.kill_actor(self.handle)
        except Exception:  # noqa: BLE001
            if exc_type is None:
                raise
            traceback.print_exc()
        return False


def w_actor_sync(eng, cfg):
    # Same count rule as sync_rtt: 10 warm-up calls (they also wait for the actor
    # to be up), then get(a.ping.remote()) in a loop for sync_seconds.
    with actor_of(eng, SyncPinger) as h:
        ping = eng.actor_method(h, "ping")
        for _ in range(10):
            if eng.get(ping()) is not None:
                raise AssertionError("ping returned something")
        rate, n = _round_trips(lambda: eng.get(ping()), cfg["sync_seconds"])
    return {"actor_sync_per_s": rate, "actor_sync_count": n}


def w_actor_async(eng, cfg):
    # Same rule as async_tasks: async_n calls submitted, then one get of all;
    # one warm-up rep, median of async_reps.
    n = cfg["async_n"]
    with actor_of(eng, AsyncPinger) as h:
        ping = eng.actor_method(h, "ping")
        eng.get(ping())  # waits for the actor to be up
        rate, submit = _bursts(eng, ping, n, cfg["async_reps"],
                               check=lambda out: all(x is None for x in out))
    return {"actor_async_per_s": rate, "actor_async_submit_per_s": submit}


# --------------------------------------------------------------------------------------
# Multi-node workloads: they run on a 2-node cluster the engine starts for them
# (adapter.start_cluster(); node A = the driver's node, node B = the other one).

def w_xnode_transfer(eng, cfg, nodes):
    a, b = nodes
    n = cfg["large_mib"] * MiB // 8
    nbytes = n * 8
    make_on_b = eng.remote_on(make_array, b)
    len_on_a = eng.remote_on(array_len, a)
    len_on_b = eng.remote_on(array_len, b)
    # Worker processes up and functions shipped on both nodes before anything is timed.
    eng.get([eng.remote_on(noop, a)(), eng.remote_on(noop, b)()])

    def once(consumer):
        ref = make_on_b(n)            # a fresh array, made on node B
        eng.wait_done(ref)            # producer finished; nothing fetched anywhere
        t0 = perf()
        got = eng.get(consumer(ref))  # a task that takes the ref and returns its length
        dt = perf() - t0
        if got != n:
            raise AssertionError(f"consumer returned {got!r}, expected {n}")
        del ref
        return dt

    for _ in range(cfg["xnode_warmups"]):
        once(len_on_a)
    remote, local = [], []
    for _ in range(cfg["xnode_reps"]):  # interleaved so that drifts hit both alike
        remote.append(once(len_on_a))
        local.append(once(len_on_b))
    m = median(remote)
    return {"xnode_gbps": nbytes / m / 1e9, "xnode_ms": m * 1e3,
            "xnode_local_ms": median(local) * 1e3}


def w_spread_tasks(eng, cfg, nodes):
    a, b = nodes
    n = cfg["async_n"]
    # Not timed: where do spread tasks land? (also the warm-up of both nodes)
    where = eng.remote_spread(node_here)
    placed = eng.get([where(eng.name) for _ in range(n)])
    on_a = sum(1 for x in placed if x == a)
    on_b = sum(1 for x in placed if x == b)
    if on_a + on_b != n:
        raise AssertionError(f"tasks ran on unknown nodes: {sorted(set(placed) - {a, b})}")
    f = eng.remote_spread(noop)
    rate, submit = _bursts(eng, f, n, cfg["async_reps"])
    return {"spread_tasks_per_s": rate, "spread_submit_per_s": submit,
            "spread_share_node_a": on_a / n}


def _nested_remote(eng, fn):
    """``fn`` as a remote function of the engine's own API, to be called from
    inside a task (None for Dask, whose tasks use worker_client instead)."""
    if eng.name == "dask":
        return None
    return eng.mod.remote(fn)


def w_nested_submit(eng, cfg):
    """``n`` tasks submitted from inside one task (which then gets them all)
    against the same ``n`` tasks submitted from the driver."""
    global CHILD
    n = cfg["nested_n"]
    CHILD = _nested_remote(eng, child)
    parent = eng.remote(nested_parent)
    c = eng.remote(child)
    want = n * (n - 1) // 2
    name = getattr(eng, "module_name", eng.name)
    if eng.get(parent(name, 10)) != 45 or sum(eng.get([c(i) for i in range(10)])) != 45:
        raise AssertionError("wrong warm-up sums")
    nested, driver = [], []
    for _ in range(cfg["nested_reps"]):
        t0 = perf()
        got = eng.get(parent(name, n))
        nested.append(perf() - t0)
        t0 = perf()
        got_d = sum(eng.get([c(i) for i in range(n)]))
        driver.append(perf() - t0)
        if got != want or got_d != want:
            raise AssertionError(f"sums {got}, {got_d}, expected {want}")
    return {"nested_submit_s": median(nested), "nested_driver_s": median(driver),
            "nested_vs_driver": median(nested) / median(driver)}


def w_fib10(eng, cfg):
    """Recursive fib (parents blocked in get): fib(10) is 177 tasks."""
    global FIB
    FIB = _nested_remote(eng, fib)
    f = eng.remote(fib)
    name = getattr(eng, "module_name", eng.name)
    if eng.get(f(name, 4)) != 3:  # warm-up (and the workers' first imports)
        raise AssertionError("fib(4) != 3")
    n = cfg["fib_n"]
    want = {10: 55}.get(n)
    times = []
    for _ in range(cfg["fib_reps"]):
        t0 = perf()
        got = eng.get(f(name, n))
        times.append(perf() - t0)
        if want is not None and got != want:
            raise AssertionError(f"fib({n}) returned {got}")
    return {"fib10_s": median(times)}


WORKLOADS = [
    ("sync_rtt", w_sync_rtt),
    ("async_tasks", w_async_tasks),
    ("small_put_get", w_small_put_get),
    ("large_put", w_large_put),
    ("large_get", w_large_get),
    ("big_arg", w_big_arg),
    ("tree_reduce", w_tree_reduce),
    ("nested_submit", w_nested_submit),
    ("fib10", w_fib10),
    # Actors run last so that their processes cannot disturb the task workloads.
    ("actor_sync", w_actor_sync),
    ("actor_async", w_actor_async),
]
# Multi-node workloads run after all the others, on a 2-node cluster started for them.
CLUSTER_WORKLOADS = [
    ("xnode_transfer", w_xnode_transfer),
    ("spread_tasks", w_spread_tasks),
]
WORKLOAD_NAMES = [n for n, _ in WORKLOADS + CLUSTER_WORKLOADS]
ALWAYS = ("cold_start", "idle_memory")  # by-products of starting the engine


# --------------------------------------------------------------------------------------

class WorkloadTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise WorkloadTimeout("workload exceeded its time limit")


def emit(kind, **record):
    sys.stdout.write(PREFIX + json.dumps({"kind": kind, **record}) + "\n")
    sys.stdout.flush()


def error_text(exc):
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 400 else text[:400] + "..."


def parse_args(argv):
    # Hand-rolled on purpose: nothing heavier than sys/json before the engine import.
    if len(argv) < 1:
        raise SystemExit("usage: engine_worker.py ENGINE [--quick] [--only NAME,...] "
                         "[--workload-timeout S]")
    engine, quick, only, wl_timeout = argv[0], False, None, None
    it = iter(argv[1:])
    for a in it:
        if a == "--quick":
            quick = True
        elif a == "--only":
            only = [x for x in next(it).split(",") if x]
        elif a == "--workload-timeout":
            wl_timeout = int(float(next(it)))
        else:
            raise SystemExit(f"unknown argument {a!r}")
    return engine, quick, only, wl_timeout


def main(argv):
    engine_name, quick, only, wl_timeout = parse_args(argv)
    cfg = dict(QUICK if quick else FULL)
    if wl_timeout:
        cfg["workload_timeout"] = max(1, wl_timeout)
    # Starting a 2-node cluster (Ray: ~15 s on this machine) gets its own limit.
    cfg["cluster_start_timeout"] = max(120, cfg["workload_timeout"])

    # Harness probe (excluded from the cold start): baseline PSS of this driver.
    h0 = perf()
    import psutil
    from benchmarks import proctree
    me = psutil.Process()
    base_bytes, _ = proctree.pss_bytes(me)
    harness_s = perf() - h0

    signal.signal(signal.SIGALRM, _on_alarm)
    eng = make_engine(engine_name)
    status = 0
    try:
        signal.alarm(max(60, cfg["workload_timeout"]))  # startup limit
        try:
            eng.start()
            first = eng.get(eng.remote(one)())
            t_first = perf()
            if first != 1:
                raise AssertionError(f"trivial task returned {first!r}")
            cold = t_first - T0 - harness_s
        except EngineUnavailable as exc:
            emit("startup", available=False, reason=str(exc))
            return 0
        except BaseException as exc:  # noqa: BLE001 - report anything, keep the run going
            traceback.print_exc()
            emit("startup", available=True, version=eng.version(), error=error_text(exc))
            return 1
        finally:
            signal.alarm(0)

        time.sleep(1.0)
        total, kinds, detail = proctree.tree_memory(me)
        emit("startup", available=True, version=eng.version(),
             metrics={"cold_start_s": cold, "idle_mem_mib": (total - base_bytes) / MiB},
             info={"memory_kind": kinds, "processes": detail,
                   "driver_baseline_mib": base_bytes / MiB, "harness_probe_s": harness_s})

        for name, fn in WORKLOADS:
            if only is not None and name not in only:
                continue
            t = perf()
            signal.alarm(cfg["workload_timeout"])
            try:
                metrics = fn(eng, cfg)
                signal.alarm(0)
                emit("workload", name=name, metrics=metrics, seconds=perf() - t)
            except BaseException as exc:  # noqa: BLE001
                signal.alarm(0)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                emit("workload", name=name, error=error_text(exc), seconds=perf() - t)
                status = 1

        # Multi-node: the single-node instance is stopped and a 2-node cluster started,
        # once, for all the selected cluster workloads (shutdown() below stops it).
        selected = [(n, fn) for n, fn in CLUSTER_WORKLOADS if only is None or n in only]
        nodes, cluster_error = None, None
        if selected:
            t = perf()
            signal.alarm(cfg["cluster_start_timeout"])
            try:
                nodes = eng.start_cluster()
                signal.alarm(0)
                emit("cluster", metrics={"cluster_start_s": perf() - t}, nodes=list(nodes))
            except BaseException as exc:  # noqa: BLE001
                signal.alarm(0)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                cluster_error = "2-node cluster start failed: " + error_text(exc)
                emit("cluster", error=cluster_error, seconds=perf() - t)
                status = 1
        for name, fn in selected:
            if cluster_error:
                emit("workload", name=name, error=cluster_error, seconds=0.0)
                continue
            t = perf()
            signal.alarm(cfg["workload_timeout"])
            try:
                metrics = fn(eng, cfg, nodes)
                signal.alarm(0)
                emit("workload", name=name, metrics=metrics, seconds=perf() - t)
            except BaseException as exc:  # noqa: BLE001
                signal.alarm(0)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                emit("workload", name=name, error=error_text(exc), seconds=perf() - t)
                status = 1
    finally:
        signal.alarm(0)
        shutdown_error = None
        t = perf()
        try:
            signal.alarm(60)
            eng.shutdown()
        except BaseException as exc:  # noqa: BLE001
            traceback.print_exc()
            shutdown_error = error_text(exc)
        finally:
            signal.alarm(0)
        shutdown_s = perf() - t
        # Everything the engine started must be gone; stop stragglers by pid.
        known = proctree.snapshot_descendants(me.pid, {})
        stopped = proctree.reap(known, grace=10.0, ignore=("multiprocessing.resource_tracker",))
        emit("done", shutdown_s=shutdown_s, shutdown_error=shutdown_error,
             stopped_after_shutdown=stopped)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
