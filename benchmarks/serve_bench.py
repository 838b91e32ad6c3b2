"""flowcore.serve beside a single uvicorn+FastAPI process (the floor) and,
when installed, Ray Serve: HTTP requests/s and p50/p99 latency of a trivial
deployment under 8 and 64 keep-alive clients, handle round trips/s from
Python, a batched numpy matmul (batch size 8) over HTTP, and the time from
``serve.run`` to ready.

    python -m benchmarks.serve_bench            # 10 s per load level
    python -m benchmarks.serve_bench --quick    # 3 s per load level

The load generator is bounded (a fixed number of connections, each sending
its next request when the previous answer arrived) and runs in its own
process on 127.0.0.1, so it does not share the interpreter of the driver."""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

BODY = json.dumps({"x": 1}).encode()


# ------------------------------------------------------------------ load generator
async def _client(host: str, port: int, path: str, body: bytes, stop_at: float,
                  lat: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    req = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(req)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if length:
                await reader.readexactly(length)
            if b" 200 " not in status_line:
                errors.append(1)
            lat.append(time.perf_counter() - t0)
    finally:
        writer.close()


def _load_proc(host: str, port: int, path: str, clients: int, seconds: float,
               out: Any) -> None:
    lat: list[float] = []
    errors: list[int] = []

    async def main() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*[_client(host, port, path, BODY, stop_at, lat, errors)
                               for _ in range(clients)])
    t0 = time.perf_counter()
    asyncio.run(main())
    out.put({"n": len(lat), "secs": time.perf_counter() - t0, "errors": len(errors),
             "lat": sorted(lat)})


def _cpu_snapshot(root: int) -> dict[int, float]:
    """CPU seconds used so far by ``root``'s descendants (and ``root``
    itself unless it is this process)."""
    import psutil
    out = {}
    try:
        top = psutil.Process(root)
        procs = top.children(recursive=True) + ([top] if root != os.getpid() else [])
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def http_load(url: str, clients: int, seconds: float, path: str = "/",
              cpu_root: int | None = None) -> dict:
    """Run the load generator; with ``cpu_root``, also the server CPU per
    request: the CPU time of ``cpu_root``'s process tree during the run
    (the load generator, started during it, is not counted), which stays
    meaningful on a busy machine where req/s does not."""
    host, port = url.split("//")[1].split(":")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    before = _cpu_snapshot(cpu_root) if cpu_root else {}
    p = ctx.Process(target=_load_proc, args=(host, int(port), path, clients, seconds, q))
    p.start()
    r = q.get(timeout=seconds + 120)
    after = _cpu_snapshot(cpu_root) if cpu_root else {}
    p.join(30)
    lat = r["lat"]
    pct = (lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1e3) if lat else \
        (lambda f: float("nan"))
    out = {"rps": r["n"] / r["secs"], "p50_ms": pct(0.50), "p99_ms": pct(0.99),
           "errors": r["errors"]}
    if cpu_root:
        used = sum(after[k] - before[k] for k in after if k in before)
        out["cpu_us"] = used / max(1, r["n"]) * 1e6
    return out


# ------------------------------------------------------------------ flowcore.serve
def bench_flowcore(seconds: float) -> dict:
    os.environ.setdefault("FLOWCORE_QUIET", "1")
    import numpy as np
    import flowcore
    from flowcore import serve

    flowcore.init(num_cpus=2)
    out: dict = {}
    try:
        @serve.deployment(ray_actor_options={"num_cpus": 1})
        class Noop:
            async def __call__(self, request):
                return "ok"

            def ping(self):
                return 1

        @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
        class MatMul:
            def __init__(self):
                self.w = np.random.default_rng(0).standard_normal((256, 256))
                self.sizes: list[int] = []

            @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
            async def predict(self, xs):
                self.sizes.append(len(xs))
                return list((np.stack(xs) @ self.w).sum(axis=1))

            async def __call__(self, request):
                await request.body()
                return float(await self.predict(np.ones(256)))

            def mean_batch(self):
                return sum(self.sizes) / max(1, len(self.sizes))

        t0 = time.perf_counter()
        serve.start(http_options={"port": 0})
        t1 = time.perf_counter()
        h = serve.run(Noop.bind())
        out["ready_s"] = time.perf_counter() - t0
        out["run_s"] = time.perf_counter() - t1
        url = serve.http_address()
        http_load(url, 8, 1.0)                      # warm-up
        for c in (8, 64):
            out[f"http_{c}"] = http_load(url, c, seconds, cpu_root=os.getpid())
        for _ in range(100):                        # warm-up
            h.ping.remote().result()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min(seconds, 3.0):
            h.ping.remote().result()
            n += 1
        out["handle_rtt"] = n / (time.perf_counter() - t0)
        serve.delete("default")
        hm = serve.run(MatMul.bind(), name="mm", route_prefix="/mm")
        out["matmul_64"] = http_load(url, 64, seconds, path="/mm")
        out["matmul_64"]["mean_batch"] = hm.mean_batch.remote().result()
    finally:
        serve.shutdown()
        flowcore.shutdown()
    return out


# ------------------------------------------------------------------ floor: uvicorn+FastAPI
FLOOR_APP = textwrap.dedent("""
    import sys, fastapi, uvicorn
    app = fastapi.FastAPI()
    import numpy as np
    w = np.random.default_rng(0).standard_normal((256, 256))
    @app.post("/")
    async def root(request: fastapi.Request):
        await request.body()
        return "ok"
    @app.post("/mm")
    async def mm(request: fastapi.Request):
        await request.body()
        return float((np.ones(256) @ w).sum())
    kw = {}
    try:
        import httptools; kw["http"] = "httptools"
    except ImportError:
        pass
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False, **kw)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_floor(seconds: float) -> dict | None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return None
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port)])
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        http_load(url, 8, 1.0)
        out = {f"http_{c}": http_load(url, c, seconds, cpu_root=p.pid) for c in (8, 64)}
        out["matmul_64"] = http_load(url, 64, seconds, path="/mm")
        return out
    finally:
        p.terminate()
        p.wait(10)


# ------------------------------------------------------------------ HTTP layer: uvicorn vs Tornado
RAW_UVICORN = textwrap.dedent("""
    import sys, uvicorn
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False, http="httptools", loop="uvloop", lifespan="off")
""")
RAW_TORNADO = textwrap.dedent("""
    import sys, asyncio, tornado.web
    class H(tornado.web.RequestHandler):
        def post(self):
            self.set_header("content-type", "text/plain")
            self.write(b"ok")
    async def main():
        tornado.web.Application([(r"/.*", H)]).listen(int(sys.argv[1]), "127.0.0.1")
        await asyncio.Event().wait()
    asyncio.run(main())
""")


def bench_http_servers(seconds: float) -> dict:
    """The proxy's HTTP layer alone: server CPU per request of a bare
    uvicorn (httptools, uvloop) app and a bare Tornado app, 8 clients."""
    import psutil
    out = {}
    for name, code in (("uvicorn", RAW_UVICORN), ("tornado", RAW_TORNADO)):
        try:
            __import__(name)
            if name == "uvicorn":
                import httptools  # noqa: F401
                import uvloop  # noqa: F401
        except ImportError:
            continue
        port = _free_port()
        p = subprocess.Popen([sys.executable, "-c", code, str(port)])
        try:
            _wait_port(port)
            url = f"http://127.0.0.1:{port}"
            http_load(url, 8, 1.0)
            proc = psutil.Process(p.pid)
            c0 = sum(proc.cpu_times()[:2])
            r = http_load(url, 8, seconds)
            r["cpu_us"] = (sum(proc.cpu_times()[:2]) - c0) / max(1, r["rps"] * seconds) * 1e6
            out[name] = r
        finally:
            p.terminate()
            p.wait(10)
    return out


def _wait_port(port: int) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)


# ------------------------------------------------------------------ Ray Serve (optional)
def bench_ray(seconds: float) -> dict | None:
    try:
        import numpy as np
        import ray
        from ray import serve as rserve
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict = {}
    try:
        @rserve.deployment
        class Noop:
            async def __call__(self, request):
                return "ok"

            def ping(self):
                return 1
        port = _free_port()
        t0 = time.perf_counter()
        rserve.start(http_options={"port": port})
        t1 = time.perf_counter()
        h = rserve.run(Noop.bind())
        out["ready_s"] = time.perf_counter() - t0
        out["run_s"] = time.perf_counter() - t1
        url = f"http://127.0.0.1:{port}"
        http_load(url, 8, 1.0)
        for c in (8, 64):
            out[f"http_{c}"] = http_load(url, c, seconds, cpu_root=os.getpid())
        for _ in range(100):                        # warm-up
            h.ping.remote().result()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min(seconds, 3.0):
            h.ping.remote().result()
            n += 1
        out["handle_rtt"] = n / (time.perf_counter() - t0)
        rserve.delete("default")

        @rserve.deployment(max_ongoing_requests=64)
        class MatMul:
            def __init__(self):
                self.w = np.random.default_rng(0).standard_normal((256, 256))
                self.sizes: list[int] = []

            @rserve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
            async def predict(self, xs):
                self.sizes.append(len(xs))
                return list((np.stack(xs) @ self.w).sum(axis=1))

            async def __call__(self, request):
                await request.body()
                return float(await self.predict(np.ones(256)))

            def mean_batch(self):
                return sum(self.sizes) / max(1, len(self.sizes))
        hm = rserve.run(MatMul.bind(), name="mm", route_prefix="/mm")
        out["matmul_64"] = http_load(url, 64, seconds, path="/mm")
        out["matmul_64"]["mean_batch"] = hm.mean_batch.remote().result()
    finally:
        rserve.shutdown()
        ray.shutdown()
    return out


def _median(runs: list[Any]) -> Any:
    """The per-number median of several runs' nested results."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _median([r[k] for r in runs if isinstance(r, dict) and k in r])
                for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(runs)
    if isinstance(first, list):
        return first
    return first


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "ms":
        return f"{v:.2f}"
    if unit == "us":
        return f"{v:,.0f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="3 s per load level")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--runs", type=int, default=1,
                    help="run everything this many times and print the medians")
    args = ap.parse_args()
    secs = 3.0 if args.quick else args.seconds
    runs = []
    for i in range(max(1, args.runs)):
        runs.append({"flowcore": bench_flowcore(secs), "floor": bench_floor(secs),
                     "ray": bench_ray(secs),
                     "http_servers": bench_http_servers(min(secs, 3.0))})
        if args.runs > 1:
            print(f"run {i + 1}/{args.runs} done", flush=True)
    res = _median(runs)
    fc, fl, ray = res["flowcore"], res["floor"] or {}, res["ray"] or {}
    rows = []
    for c in (8, 64):
        k = f"http_{c}"
        for metric, unit in (("rps", "1/s"), ("p50_ms", "ms"), ("p99_ms", "ms"),
                             ("cpu_us", "us")):
            label = "server CPU/request" if metric == "cpu_us" else metric.split("_")[0]
            rows.append((f"HTTP no-op, {c} keep-alive clients: {label}", unit,
                         fc[k][metric], ray.get(k, {}).get(metric),
                         fl.get(k, {}).get(metric)))
    rows.append(("handle round trips/s", "1/s", fc["handle_rtt"], ray.get("handle_rtt"),
                 None))
    rows.append(("serve.start+run until ready", "s", fc["ready_s"], ray.get("ready_s"), None))
    rows.append(("  of which serve.run", "s", fc.get("run_s"), ray.get("run_s"), None))
    mm, rmm, fmm = fc["matmul_64"], ray.get("matmul_64", {}), fl.get("matmul_64", {})
    rows.append(("batched matmul (batch<=8), 64 clients: rps", "1/s", mm["rps"],
                 rmm.get("rps"), fmm.get("rps")))
    rows.append(("  p50 latency", "ms", mm["p50_ms"], rmm.get("p50_ms"), fmm.get("p50_ms")))
    rows.append(("  p99 latency", "ms", mm["p99_ms"], rmm.get("p99_ms"), fmm.get("p99_ms")))
    rows.append(("  mean batch size (uvicorn: unbatched)", "", mm["mean_batch"],
                 rmm.get("mean_batch"), None))
    med = f", medians of {len(runs)} runs" if len(runs) > 1 else ""
    print(f"\nflowcore.serve benchmark ({secs:g} s per load level, flowcore.init(num_cpus=2)"
          f"{med})")
    print(f"{'metric':<52} {'unit':>4} {'flowcore':>9} {'ray':>9} {'uvicorn':>9}")
    for name, unit, a, b, c in rows:
        print(f"{name:<52} {unit:>4} {_fmt(a, unit):>9} {_fmt(b, unit):>9} "
              f"{_fmt(c, unit):>9}")
    for name, r in res["http_servers"].items():
        print(f"bare {name} app (the proxy's HTTP layer), 8 clients: {r['rps']:,.0f} req/s, "
              f"p50 {r['p50_ms']:.2f} ms, server CPU {r['cpu_us']:.0f} us/request")
    errs = {k: v.get("errors") for k, v in fc.items() if isinstance(v, dict)}
    print(f"errors (non-200 answers): {errs}")
    if not res["ray"]:
        print("ray: not installed (pip install 'ray[serve]==2.60.0' to compare)")
    if not res["floor"]:
        print("uvicorn+FastAPI floor: fastapi/uvicorn not installed")
    try:
        print(f"1-min load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    except OSError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": res, "runs": runs}, f, indent=1, default=lambda o: None)


if __name__ == "__main__":
    main()
