"""flowcore.serve over real HTTP on 127.0.0.1 (uvicorn proxy, replica actors)."""
from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")

import flowcore
from flowcore import serve
from flowcore.serve.autoscaler import AutoscalingPolicy
from flowcore.serve.config import AutoscalingConfig
from flowcore.testing import Signal


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU cluster: two num_cpus=1 replicas fit beside the CPU-free
    controller and proxy."""
    flowcore.shutdown()
    flowcore.init(num_cpus=2, session_dir=str(tmp_path_factory.mktemp("serve-session")))
    yield
    serve.shutdown()
    flowcore.shutdown()


@pytest.fixture
def url(cluster):
    serve.start(http_options={"port": 0, "max_body_size": 4096})
    yield serve.http_address()
    serve.shutdown()


def request(url: str, path: str = "/", body: bytes | None = None, method: str | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
    headers = {"content-type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post_json(url: str, path: str, obj) -> tuple[int, object]:
    status, body = request(url, path, json.dumps(obj).encode())
    return status, (json.loads(body) if status == 200 else body)


# ------------------------------------------------------------------ HTTP basics

@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1})
class Echo:
    async def __call__(self, request):
        data = await request.json()
        return {"pid": os.getpid(), "echo": data, "q": dict(request.query_params),
                "path": request.url.path}


def test_two_replicas_serve_concurrent_posts(url):
    serve.run(Echo.bind())
    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda i: post_json(url, f"/x?i={i}", {"i": i}), range(16)))
    assert all(s == 200 for s, _ in results)
    assert sorted(r["echo"]["i"] for _, r in results) == list(range(16))
    assert all(r["q"] == {"i": str(r["echo"]["i"])} for _, r in results)
    assert len({r["pid"] for _, r in results}) == 2
    st = serve.status()
    assert st.applications["default"].status == "RUNNING"
    assert st.applications["default"].deployments["Echo"].replica_states == {"RUNNING": 2}
    names = {a["name"] for a in flowcore.state.list_actors(state="ALIVE")}
    assert {"SERVE_CONTROLLER", "SERVE_PROXY"} <= names
    assert len([n for n in names if n and n.startswith("SERVE_REPLICA::default#Echo#")]) == 2


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Faulty:
    async def __call__(self, request):
        if request.query_params.get("raise"):
            raise KeyError("boom-secret-detail")
        if request.query_params.get("text"):
            return "plain text"
        if request.query_params.get("bytes"):
            return b"\x00\x01"
        return await request.json()


def test_http_errors_and_return_types(url):
    serve.run(Faulty.bind(), route_prefix="/f")
    s, body = request(url, "/f?raise=1", b"{}")
    assert s == 500 and b"KeyError" in body and b"boom-secret-detail" not in body
    s, body = request(url, "/f", b"not json{")
    assert s == 400 and b"not valid JSON" in body
    s, body = request(url, "/f", b"x" * 5000)
    assert s == 413 and b"max_body_size" in body
    s, body = request(url, "/f?text=1", b"{}")
    assert (s, body) == (200, b"plain text")
    s, body = request(url, "/f?bytes=1", b"{}")
    assert (s, body) == (200, b"\x00\x01")
    s, body = request(url, "/elsewhere", b"{}")
    assert s == 404 and b"/f" in body
    assert post_json(url, "/f/sub", [1, 2]) == (200, [1, 2])
    s, metrics = request(url, "/-/metrics")
    text = metrics.decode()
    assert s == 200
    assert ('serve_num_http_requests_total{application="default",deployment="Faulty",'
            'method="POST",route="/f",status_code="500"} 1.0') in text
    assert 'status_code="413"} 1.0' in text and 'status_code="200"} 3.0' in text
    assert "serve_http_request_latency_ms_bucket" in text


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1,
                  max_queued_requests=1)
class Slow:
    def __init__(self, sig):
        self.sig = sig

    def __call__(self, request):
        self.sig.wait(60)
        return "done"


def test_overload_answers_503(url):
    sig = Signal()
    try:
        serve.run(Slow.bind(sig))
        with cf.ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(request, url, "/", b"") for _ in range(6)]
            # one request runs, one waits in the queue, the others are refused
            done, _ = cf.wait(futs, timeout=60, return_when=cf.FIRST_COMPLETED)
            deadline = time.time() + 60
            while sum(f.done() for f in futs) < 4 and time.time() < deadline:
                time.sleep(0.02)
            sig.set()
            results = [f.result(timeout=60) for f in futs]
        codes = sorted(s for s, _ in results)
        assert codes == [200, 200, 503, 503, 503, 503], codes
        assert all(b"max_queued_requests" in b for s, b in results if s == 503)
    finally:
        sig.close()


# ------------------------------------------------------------------ composition

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Adder:
    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x + self.k

    def pid(self):
        return os.getpid()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Doubler:
    async def __call__(self, x):
        return 2 * x


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Pipeline:
    def __init__(self, adder, doubler):
        self.adder, self.doubler = adder, doubler

    async def __call__(self, request):
        x = int(request.query_params["x"])
        first = self.adder.remote(x)              # not awaited here:
        return await self.doubler.remote(first)   # passed on to the next model

    async def both(self, x):
        return [await self.adder.remote(x), await self.doubler.remote(x)]


def test_composition_passes_responses(url):
    h = serve.run(Pipeline.bind(Adder.bind(10), Doubler.bind()))
    assert request(url, "/?x=1") == (200, b"22")
    assert h.both.remote(3).result(timeout_s=60) == [13, 6]
    adder = serve.get_deployment_handle("Adder", "default")
    assert adder.remote(adder.remote(1)).result(timeout_s=60) == 21
    assert serve.get_app_handle("default").both.remote(0).result() == [10, 0]


def test_bad_input_errors(url):
    serve.run(Adder.bind(1), name="a1", route_prefix="/same")
    with pytest.raises(ValueError, match="route_prefix '/same' is already used"):
        serve.run(Doubler.bind(), name="a2", route_prefix="/same")
    with pytest.raises(TypeError, match=r"call Adder.bind\(\) first"):
        serve.run(Adder)
    with pytest.raises(TypeError, match="application made by Deployment.bind"):
        serve.run(lambda: 1)
    with pytest.raises(TypeError, match="cannot be called directly"):
        Adder(1)
    h = serve.get_app_handle("a1")
    with pytest.raises(AttributeError, match="no method 'nope'.*pid"):
        h.nope.remote()
    with pytest.raises(ValueError, match="unknown option"):
        serve.deployment(num_replica=2)(Adder.func_or_class)
    with pytest.raises(ValueError, match="must start with '/'"):
        serve.run(Doubler.bind(), name="a3", route_prefix="nope")


def test_delete_removes_app_and_route(url):
    serve.run(Faulty.bind(), name="keep", route_prefix="/keep")
    serve.run(Pid.options(graceful_shutdown_wait_loop_s=0.1).bind(), name="gone",
              route_prefix="/gone")
    assert request(url, "/gone")[0] == 200
    serve.delete("gone")
    assert set(serve.status().applications) == {"keep"}
    assert request(url, "/gone")[0] == 404
    assert request(url, "/keep?text=1", b"{}") == (200, b"plain text")
    with pytest.raises(serve.RayServeException, match="no application named 'gone'"):
        serve.get_app_handle("gone")


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0.1,
                  graceful_shutdown_timeout_s=60)
class Draining:
    def __init__(self, sig):
        self.sig = sig

    def __call__(self, request):
        if request.query_params.get("slow"):
            self.sig.wait()
        return "done"


def test_delete_drains_requests_in_flight(url):
    import threading
    sig = Signal()
    try:
        h = serve.run(Draining.bind(sig), name="drain", route_prefix="/drain")
        with cf.ThreadPoolExecutor(2) as ex:
            slow = ex.submit(request, url, "/drain?slow=1")
            sig.wait_for_waiters(1, timeout=60)
            deleted = threading.Event()
            gone = ex.submit(lambda: (serve.delete("drain"), deleted.set()))
            # new requests are refused at once, while the slow one still runs
            deadline = time.time() + 30
            while request(url, "/drain")[0] != 404 and time.time() < deadline:
                time.sleep(0.02)
            assert request(url, "/drain")[0] == 404
            with pytest.raises(serve.RayServeException, match="being deleted|no deployment"):
                h.remote(None).result(timeout_s=30)
            # the replica drains instead of being killed: it stays while the
            # controller reconciles many times over (each status call waits
            # for the controller)
            for _ in range(50):
                app = serve.status().applications.get("drain")
                assert app is not None and app.status == "DELETING"
                assert app.deployments["Draining"].replica_states == {"STOPPING": 1}
            assert not slow.done() and not deleted.is_set()
            sig.set()
            assert slow.result(timeout=60) == (200, b"done")
            gone.result(timeout=60)
        assert "drain" not in serve.status().applications
    finally:
        sig.close()


# ------------------------------------------------------------------ batching

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Batched:
    def __init__(self):
        self.sizes = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.25)
    async def __call__(self, items):
        self.sizes.append(len(items))
        return [i * 10 for i in items]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.25)
    def sync_batched(self, items):
        self.sizes.append(len(items))
        return [-i for i in items]

    def get_sizes(self):
        return self.sizes


def test_batching_collects_batches(url):
    assert Batched.max_ongoing_requests == 8   # raised from the default 5, not capped
    h = serve.run(Batched.bind(), route_prefix=None)
    rs = [h.remote(i) for i in range(16)]
    assert [r.result(timeout_s=60) for r in rs] == [i * 10 for i in range(16)]
    rs = [h.sync_batched.remote(i) for i in range(8)]
    assert [r.result(timeout_s=60) for r in rs] == [-i for i in range(8)]
    sizes = h.get_sizes.remote().result()
    assert sum(sizes) == 24 and max(sizes) > 1
    with pytest.warns(UserWarning, match="max_ongoing_requests=2 is below max_batch_size=8"):
        Batched.options(max_ongoing_requests=2)


# ------------------------------------------------------------------ FastAPI, streaming

def test_fastapi_ingress_routes(url):
    fastapi = pytest.importorskip("fastapi") if os.environ.get("CI") != "true" \
        else __import__("fastapi")
    app = fastapi.FastAPI()

    @app.get("/free")
    def free(n: int = 1):
        return {"n": n}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Api:
        def __init__(self):
            self.hits = 0

        @app.get("/hello/{name}")
        def hello(self, name: str):
            self.hits += 1
            return {"hello": name, "hits": self.hits}

        @app.post("/items")
        async def create(self, item: dict):
            return {"got": item}

    serve.run(Api.bind(), route_prefix="/api")
    s, body = request(url, "/api/items", b"{\"a\": 1}")
    assert (s, json.loads(body)) == (200, {"got": {"a": 1}}), body
    s, body = request(url, "/api/hello/bob")
    assert s == 200 and json.loads(body) == {"hello": "bob", "hits": 1}
    s, body = request(url, "/api/free?n=3")
    assert s == 200 and json.loads(body) == {"n": 3}
    assert request(url, "/api/missing")[0] == 404


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Streamer:
    def __init__(self, sig):
        self.sig = sig

    def __call__(self, request):
        from starlette.responses import StreamingResponse

        def gen():
            yield "first;"
            self.sig.wait(60)       # the client has read the first piece
            yield "second;"
            yield "third"
        return StreamingResponse(gen(), media_type="text/plain")

    def tokens(self, n):
        for i in range(n):
            yield f"t{i}"


def test_streamed_response_arrives_in_pieces(url):
    sig = Signal()
    try:
        h = serve.run(Streamer.bind(sig))
        u = urllib.parse.urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read1(100) == b"first;"     # before the rest exists
        sig.set()
        assert resp.read() == b"second;third"
        conn.close()
        assert list(h.options(method_name="tokens", stream=True).remote(3)) == \
            ["t0", "t1", "t2"]
    finally:
        sig.close()


# ------------------------------------------------------------------ fault tolerance

@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=0.5,
                  health_check_timeout_s=5)
class Pid:
    def __call__(self, request):
        return os.getpid()


def test_sigkilled_replica_is_replaced(url):
    serve.run(Pid.bind())
    s, body = request(url)
    pid = int(body)
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    new = None
    while time.time() < deadline:
        s, body = request(url)
        if s == 200 and int(body) != pid:
            new = int(body)
            break
        time.sleep(0.05)
    assert new is not None
    assert all(request(url)[0] == 200 for _ in range(10))
    assert serve.status().applications["default"].status == "RUNNING"


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 1},
                  graceful_shutdown_wait_loop_s=0.1)
class V1:
    def __call__(self, request):
        return "v1"


@serve.deployment(name="V1", num_replicas=2, ray_actor_options={"num_cpus": 1},
                  graceful_shutdown_wait_loop_s=0.1)
class V2:
    def __call__(self, request):
        return "v2"


def test_rolling_update_drops_no_request(url):
    import threading
    serve.run(V1.bind())
    stop = threading.Event()
    seen: list = []

    def load():
        while not stop.is_set():
            seen.append(request(url))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while len(seen) < 8:
            time.sleep(0.01)
        serve.run(V2.bind())     # 2 CPUs: replicas are swapped one by one
        n = len(seen)
        while len(seen) < n + 8:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    bad = [r for r in seen if r[0] != 200]
    assert not bad, bad[:3]
    bodies = [b for _, b in seen]
    assert b"v1" in bodies and bodies[-1] == b"v2"
    assert request(url) == (200, b"v2")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 3,
                                      "target_ongoing_requests": 1,
                                      "metrics_interval_s": 0.1, "look_back_period_s": 0.5,
                                      "upscale_delay_s": 0.2, "downscale_delay_s": 0.5})
class Auto:
    def __init__(self, sig):
        self.sig = sig

    def __call__(self, x):
        self.sig.wait(60)
        return x


def test_autoscale_up_and_down(url):
    sig = Signal()
    try:
        h = serve.run(Auto.bind(sig), route_prefix=None)

        def replicas():
            return serve.status().applications["default"].deployments["Auto"] \
                .replica_states.get("RUNNING", 0)
        assert replicas() == 1
        rs = [h.remote(i) for i in range(6)]
        deadline = time.time() + 60
        while replicas() < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert replicas() >= 2
        sig.set()
        assert sorted(r.result(timeout_s=60) for r in rs) == list(range(6))
        while replicas() > 1 and time.time() < deadline:
            time.sleep(0.05)
        assert replicas() == 1
    finally:
        sig.close()


@serve.deployment(ray_actor_options={"num_cpus": 0},
                  autoscaling_config={"min_replicas": 0, "max_replicas": 1,
                                      "target_ongoing_requests": 1,
                                      "metrics_interval_s": 0.1, "look_back_period_s": 0.3,
                                      "upscale_delay_s": 0.1, "downscale_delay_s": 0.3})
class ZeroToOne:
    def __call__(self, x):
        return x * 3


def test_scale_from_and_to_zero(url):
    h = serve.run(ZeroToOne.bind(), route_prefix=None)

    def replicas():
        return serve.status().applications["default"].deployments["ZeroToOne"] \
            .replica_states.get("RUNNING", 0)
    assert replicas() == 0                     # min_replicas=0: nothing runs yet
    assert h.remote(5).result(timeout_s=60) == 15    # a request brings one up
    deadline = time.time() + 60
    while replicas() > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert replicas() == 0                     # and it goes away when idle


def test_shutdown_frees_actors_and_port(cluster):
    serve.start(http_options={"port": 0})
    port = int(serve.http_address().rsplit(":", 1)[1])
    serve.run(Echo.bind())
    before = {a["actor_id"] for a in flowcore.state.list_actors(state="ALIVE")}
    assert len(before) >= 4          # controller, proxy, 2 replicas
    serve.shutdown()
    deadline = time.time() + 30
    while time.time() < deadline:
        alive = {a["actor_id"] for a in flowcore.state.list_actors(state="ALIVE")}
        if not alive & before:
            break
        time.sleep(0.05)
    assert not alive & before
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))    # the port is free again
    assert serve.status().applications == {}


# ------------------------------------------------------------------ policy (no IO)

def test_batch_runs_up_to_max_concurrent_batches():
    import asyncio

    class Model:
        def __init__(self):
            self.running = 0
            self.peak = 0
            self.both = asyncio.Event()

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.05, max_concurrent_batches=2)
        async def __call__(self, items):
            self.running += 1
            self.peak = max(self.peak, self.running)
            if self.running == 2:
                self.both.set()
            await asyncio.wait_for(self.both.wait(), 30)   # both batches at once
            self.running -= 1
            return [i + 1 for i in items]

    async def main():
        m = Model()
        out = await asyncio.gather(*[m(i) for i in range(4)])
        return out, m.peak

    out, peak = asyncio.run(main())
    assert out == [1, 2, 3, 4] and peak == 2
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        serve.batch(max_concurrent_batches=0)


def test_batch_wait_adapts_to_arrival_gaps():
    from flowcore.serve.batching import _Gaps
    g = _Gaps()
    assert g.patience(0.5) == 0.5                 # nothing measured: the ceiling
    for t in (0.0, 0.001, 0.002, 0.003):
        g.arrived(t)
    assert abs(g.patience(0.5) - 0.002) < 1e-6     # twice the mean gap
    g.arrived(10.0)                                # a long pause raises the mean ...
    assert g.patience(0.5) == 0.5                  # ... up to the ceiling only


def test_autoscaling_policy_delays():
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=2,
                            look_back_period_s=1, upscale_delay_s=2, downscale_delay_s=5)
    p = AutoscalingPolicy(cfg)
    p.record(0.0, 8)
    assert p.decide(0.0, 1) == 1          # the wish must hold upscale_delay_s
    p.record(1.0, 8)
    assert p.decide(1.0, 1) == 1
    p.record(2.0, 8)
    assert p.decide(2.0, 1) == 4
    p.record(3.0, 100)
    assert p.desired(4) == 4              # max_replicas
    p.record(5.0, 0)
    assert p.decide(5.0, 4) == 4
    p.record(10.0, 0)
    assert p.decide(10.0, 4) == 1         # min_replicas, after downscale_delay_s
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)


# ------------------------------------------------------------------ lifecycle hooks

@serve.deployment(ray_actor_options={"num_cpus": 0}, user_config={"k": 1},
                  health_check_period_s=0.2, health_check_timeout_s=5)
class Hooks:
    def __init__(self, sig):
        self.sig = sig
        self.k = None

    def reconfigure(self, config):
        self.k = config["k"]

    def check_health(self):
        if self.sig.wait(0.01):           # once set, this replica reports unhealthy
            raise RuntimeError("unhealthy on purpose")

    def info(self):
        ctx = serve.get_replica_context()
        return {"k": self.k, "pid": os.getpid(), "app": ctx.app_name,
                "deployment": ctx.deployment, "same": ctx.servable_object is self}


def test_user_config_health_check_and_context(cluster):
    sig = Signal()
    try:
        serve.start(http_options={"port": 0})
        h = serve.run(Hooks.bind(sig), name="hooks", route_prefix=None)
        first = h.info.remote().result(timeout_s=60)
        assert first == {"k": 1, "pid": first["pid"], "app": "hooks",
                         "deployment": "Hooks", "same": True}
        # same version: user_config reaches the running replica via reconfigure()
        serve.run(Hooks.options(user_config={"k": 2}, version="v1").bind(sig), name="hooks",
                  route_prefix=None)
        serve.run(Hooks.options(user_config={"k": 3}, version="v1").bind(sig), name="hooks",
                  route_prefix=None)
        deadline = time.time() + 30
        while h.info.remote().result(timeout_s=60)["k"] != 3 and time.time() < deadline:
            time.sleep(0.05)
        same = h.info.remote().result(timeout_s=60)
        assert same["k"] == 3
        # a failing check_health() gets the replica replaced
        sig.set()
        pid = same["pid"]
        deadline = time.time() + 60
        while time.time() < deadline:
            r = serve.status().applications["hooks"]
            if "health check" in r.message or "health check" in \
                    r.deployments["Hooks"].message:
                break
            time.sleep(0.05)
        assert "unhealthy on purpose" in serve.status().applications["hooks"].message
        new_pid = pid
        while new_pid == pid and time.time() < deadline:
            try:
                new_pid = h.info.remote().result(timeout_s=60)["pid"]
            except Exception:  # noqa: BLE001 - a replica being replaced
                pass
        assert new_pid != pid              # the unhealthy replica was replaced
        with pytest.raises(RuntimeError, match="only inside"):
            serve.get_replica_context()
    finally:
        sig.close()
        serve.shutdown()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Broken:
    def __init__(self):
        raise ValueError("bad model path /nowhere")


def test_failing_constructor_fails_run_with_its_error(cluster):
    serve.start(http_options={"port": 0})
    try:
        with pytest.raises(serve.RayServeException, match="bad model path /nowhere"):
            serve.run(Broken.bind(), name="broken", route_prefix=None)
        assert serve.status().applications["broken"].status == "DEPLOY_FAILED"
    finally:
        serve.shutdown()


def test_replica_channel_refuses_wrong_secret_and_actor_path_works(url):
    serve.run(Echo.bind())
    from flowcore.serve.router import get_controller
    reps = flowcore.get(get_controller().list_replicas.remote())
    actor = reps[0]["actor"]
    info = flowcore.get(actor.ready.remote())
    host, port = info["channel"]
    with socket.create_connection((host, port), timeout=30) as s:
        nonce = s.recv(16)
        assert len(nonce) == 16
        s.sendall(b"\x00" * 48)                 # not the HMAC of the secret (+ a nonce)
        assert s.recv(1) == b"\x00"
        assert s.recv(1) == b""                 # and closed
    # the same request as an actor call (FLOWCORE_SERVE_DIRECT_HTTP=0 path)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/a", "raw_path": b"/a",
             "query_string": b"k=v", "root_path": "", "headers": [], "server": None,
             "client": None}
    kind, status, headers, body = flowcore.get(actor.handle_http.remote(scope, b'{"z": 1}'))
    assert (kind, status) == ("full", 200)
    assert json.loads(body)["echo"] == {"z": 1} and json.loads(body)["q"] == {"k": "v"}


def test_missing_extra_is_named():
    import subprocess
    import sys
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('starlette', 'uvicorn'):\n"
        "            raise ImportError('no ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from flowcore import serve\n"           # imports without the extra
        "try:\n"
        "    serve.start()\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert "IMPORTERROR" in out.stdout and "pip install 'flowcore[serve]'" in out.stdout, \
        out.stdout + out.stderr


def test_killed_proxy_is_restarted_on_the_same_port(url):
    serve.run(Pid.bind())
    assert request(url)[0] == 200
    info = flowcore.get(flowcore.get_actor("SERVE_PROXY", namespace="serve").ready.remote())
    os.kill(info["pid"], signal.SIGKILL)
    deadline = time.time() + 60
    ok = False
    while time.time() < deadline:
        try:
            if request(url, timeout=5)[0] == 200:
                ok = True
                break
        except OSError:
            pass                        # refused while the new proxy starts
        time.sleep(0.05)
    assert ok and serve.http_address() == url
    new = flowcore.get(flowcore.get_actor("SERVE_PROXY", namespace="serve").ready.remote())
    assert new["pid"] != info["pid"]


def test_request_timeout_answers_408(cluster):
    sig = Signal()
    try:
        serve.start(http_options={"port": 0, "request_timeout_s": 0.5})
        url = serve.http_address()
        serve.run(Slow.bind(sig))
        s, body = request(url, "/", b"")
        assert s == 408 and b"request_timeout_s" in body
    finally:
        sig.set()
        sig.close()
        serve.shutdown()


def test_proxy_start_failure_names_the_address(cluster):
    """serve.run() starting the proxy on a busy port says which address
    failed (it used to fail with a NameError inside the controller)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        serve.start(proxy_location="Disabled", http_options={"port": port})
        with pytest.raises(Exception) as ei:
            serve.run(Adder.bind(1), name="busy", route_prefix="/busy")
        assert f"could not start on 127.0.0.1:{port}" in str(ei.value)
        assert "NameError" not in str(ei.value)
    finally:
        busy.close()
        serve.shutdown()
