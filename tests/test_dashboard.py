"""The head's web dashboard: snapshots (no IO), the JSON API and login over
real HTTP against a real cluster, the CLI flags, and a real browser
(Debian's chromium driven by Playwright) that also saves the screenshot in
docs/images/dashboard.png."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import Any
from urllib.parse import urlencode, urlparse

import pytest

import flowcore
from flowcore.dashboard.auth import bearer, cookie_secret, safe_next, token_matches
from flowcore.dashboard.snapshot import SnapshotCache, encode
from flowcore.ids import IdSource, object_id
from flowcore.scheduler.machine import SchedulerState
from flowcore.testing import Signal, wait_recorded

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(ROOT, "docs", "images", "dashboard.png")


# ====================================================================== no IO
class Head:
    """Feeds well-formed messages to a ``SchedulerState``."""

    def __init__(self, **kw: Any):
        self.state = SchedulerState(**kw)
        self.ids = IdSource()
        self.state.handle("c1", {"op": "register_client", "kind": "driver"})

    def node(self, nid: str, cpus: float = 2.0) -> None:
        self.state.handle(nid, {"op": "register_node", "node_id": nid, "name": f"name-{nid}",
                                "address": f"tcp://{nid}:1", "resources": {"CPU": cpus}})

    def submit(self, name: str = "f") -> bytes:
        tid = self.ids.task_id()
        self.state.handle("c1", {"op": "submit", "tasks": [{
            "tid": tid, "fid": b"fid", "name": name, "args": b"", "deps": [], "nret": 1,
            "res": {"CPU": 1.0}, "retries": 0}]})
        return tid

    def done(self, tid: bytes, ok: bool = True, pid: int = 4242) -> None:
        t = self.state.tasks[tid]
        self.state.handle(t.node, {
            "op": "task_done", "tid": tid, "status": "ok" if ok else "error", "pid": pid,
            "error_text": None if ok else "Traceback...\nValueError: bad input",
            "results": [{"oid": object_id(tid), "inline": b"x", "size": 1,
                         "error": not ok}]})

    def drop(self, tid: bytes) -> None:
        self.state.handle("c1", {"op": "decref", "oids": [object_id(tid)]})


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_snapshot_is_built_at_most_once_per_interval():
    h = Head()
    h.node("n1")
    clock = FakeClock()
    cache = SnapshotCache(h.state, interval=1.0, clock=clock)
    first = cache.get()
    h.submit("later")
    assert cache.get() is first and cache.builds == 1  # served from the cache
    clock.now += 0.99
    assert cache.get() is first
    clock.now += 0.02
    second = cache.get()
    assert second is not first and cache.builds == 2
    assert [r["name"] for r in second.tasks()] == ["later"]
    # JSON encodings are cached per snapshot too
    assert second.json("k", lambda: {"a": 1}) is second.json("k", lambda: {"a": 2})


def test_slow_builds_are_spaced_out_to_stay_within_budget():
    h = Head()
    clock = FakeClock()

    class SlowCache(SnapshotCache):
        def build(self) -> dict:
            clock.now += 0.2  # pretend a build takes 200 ms
            return super().build()

    cache = SlowCache(h.state, interval=1.0, budget=0.05, clock=clock)
    first = cache.get()
    clock.now += 3.0  # 200 ms at 5% -> not again for 4 s
    assert cache.get() is first
    clock.now += 1.0
    assert cache.get() is not first


def test_snapshot_lists_are_bounded_and_newest_first():
    h = Head()
    h.node("n1", cpus=1000)
    tids = [h.submit(f"t{i}") for i in range(30)]
    for tid in tids[:20]:
        h.done(tid)
    for tid in tids[:10]:
        h.drop(tid)  # pruned from the table: only the history remembers them
    assert sum(1 for t in tids if t in h.state.tasks) == 20
    cache = SnapshotCache(h.state, max_tasks=7, max_objects=5)
    snap = cache.get()
    everything = snap.tasks()
    assert [r["name"] for r in everything] == [f"t{i}" for i in range(29, 22, -1)]
    finished = snap.tasks("FINISHED")
    assert len(finished) == 7 and finished[0]["name"] == "t19"
    assert [r["name"] for r in snap.tasks("RUNNING")] == [f"t{i}" for i in range(29, 22, -1)]
    assert snap["summary"]["tasks"]["by_state"]["RUNNING"] == 10
    assert snap["summary"]["tasks"]["totals"]["finished"] == 20
    assert len(snap["objects"]) == 5 and snap["summary"]["objects"]["count"] == 20
    # pruned tasks come back from the history, with their worker
    cache2 = SnapshotCache(h.state, max_tasks=100)
    rows = {r["name"]: r for r in cache2.get().tasks("FINISHED")}
    assert set(rows) == {f"t{i}" for i in range(20)}
    assert rows["t0"]["pid"] == 4242 and rows["t0"]["node"] == "name-n1"


def test_snapshot_shows_failures_with_their_error_and_dead_nodes():
    h = Head()
    h.node("n1")
    h.node("n2")
    bad = h.submit("bad")
    h.done(bad, ok=False)
    clock = FakeClock()
    cache = SnapshotCache(h.state, clock=clock)
    (row,) = cache.get().tasks("FAILED")
    assert row["name"] == "bad" and row["error"].endswith("ValueError: bad input")
    assert row["cause"] == "raised an exception"
    h.state.node_died("n2", "test")
    clock.now += 10
    nodes = {n["name"]: n for n in cache.get()["nodes"]}
    assert nodes["name-n1"]["alive"] and not nodes["name-n2"]["alive"]
    assert cache.get()["summary"]["nodes"] == {"alive": 1, "total": 2}
    # the head's own list (nodes()) keeps it too, dead, with the cause
    assert [(n["node_id"], n["alive"]) for n in h.state.list_nodes()] == [("n1", True),
                                                                         ("n2", False)]
    assert h.state.list_nodes()[1]["death_cause"] == "test"


def test_node_figures_come_from_heartbeats():
    h = Head()
    h.node("n1")
    h.state.handle("n1", {"op": "heartbeat", "stats": {
        "cpu_percent": 37.5, "mem_total": 1000, "mem_used": 250,
        "store": {"capacity": 4096, "used": 1024}, "pool": {"workers": 2, "busy": 1}}})
    snap = SnapshotCache(h.state).get()
    (node,) = snap["nodes"]
    assert node["cpu_percent"] == 37.5 and node["mem_used"] == 250
    assert node["heartbeat_age"] is not None and node["heartbeat_age"] >= 0
    assert snap["summary"]["store"] == {"used": 1024, "capacity": 4096}


def test_timeline_has_finished_and_running_tasks():
    h = Head()
    h.node("n1")
    a, b = h.submit("a"), h.submit("b")
    h.done(a, pid=7)
    bars = {x["name"]: x for x in SnapshotCache(h.state).get()["timeline"]["tasks"]}
    assert bars["a"]["state"] == "FINISHED" and bars["a"]["pid"] == 7 and bars["a"]["end"]
    assert bars["b"]["state"] == "RUNNING" and bars["b"]["end"] is None
    assert b in h.state.tasks


def test_json_encoding_handles_bytes_and_non_finite_numbers():
    assert json.loads(encode({"b": b"\x01\x02", "x": float("nan"), "l": [float("inf")]})) == \
        {"b": "0102", "x": None, "l": [None]}


def test_auth_helpers():
    token = b"s3cret"
    assert token_matches("s3cret", token) and token_matches(" s3cret\n", token)
    assert not token_matches("s3cre", token) and not token_matches("", token)
    assert not token_matches(None, token) and not token_matches("sécret", token)
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer ") is None and bearer(None) is None
    assert safe_next("/#tasks") == "/#tasks" and safe_next("/api/tasks?x=1") == "/api/tasks?x=1"
    for evil in ("//evil.example", "http://evil.example/", "evil", "/\\evil", "", None):
        assert safe_next(evil) == "/"
    assert cookie_secret(token) != cookie_secret(b"other") and "s3cret" not in cookie_secret(token)


# ====================================================================== HTTP
class Http:
    """A tiny client on http.client: no redirect following, cookies kept."""

    def __init__(self, base: str):
        u = urlparse(base)
        self.host, self.port = u.hostname, u.port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: Any = None,
                headers: dict | None = None) -> tuple[int, Any, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        h = dict(headers or {})
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if isinstance(body, dict):
            body = urlencode(body)
            h["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        for v in r.headers.get_all("Set-Cookie") or []:
            name, _, rest = v.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return r.status, r.headers, data

    def get(self, path: str, **kw: Any) -> tuple[int, Any, bytes]:
        return self.request("GET", path, **kw)


@flowcore.remote
def dash_ok(x):
    return x * 2


@flowcore.remote
def dash_fail(record):
    raise ValueError(f"malformed record {record!r}")


@flowcore.remote
def dash_hold(sig):
    sig.wait()
    return "released"


@flowcore.remote
class DashCounter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1
        return self.n


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    """A cluster with finished and failed tasks, an actor, a put object and a
    task held running, all done before the first request (the dashboard's
    snapshot may be up to a second old, and tests must not sleep)."""
    flowcore.shutdown()
    session = str(tmp_path_factory.mktemp("dash-session"))
    info = flowcore.init(num_cpus=2, num_gpus=1, resources={"custom": 4},
                         object_store_memory=128 << 20, session_dir=session)
    with open(os.path.join(session, "token")) as f:
        token = f.read().strip()
    sig = Signal()
    import numpy as np
    oks = [dash_ok.remote(i) for i in range(6)]
    assert flowcore.get(oks) == [0, 2, 4, 6, 8, 10]
    bad = dash_fail.remote("a,b")
    with pytest.raises(ValueError):
        flowcore.get(bad)
    counter = DashCounter.remote()
    assert flowcore.get([counter.incr.remote() for _ in range(3)]) == [1, 2, 3]
    blob = flowcore.put(np.ones(200_000))
    held = dash_hold.remote(sig)
    sig.wait_for_waiters(1)
    wait_recorded(oks + [bad])  # the head's views lag the answers a moment
    env = {"info": info, "token": token, "url": info["dashboard_url"], "oks": oks,
           "bad": bad, "counter": counter, "blob": blob, "held": held, "signal": sig}
    yield env
    sig.set()
    assert flowcore.get(held, timeout=30) == "released"
    sig.close()
    flowcore.shutdown()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def api(dash: dict, path: str) -> Any:
    status, _, body = Http(dash["url"]).get(path, headers=auth(dash["token"]))
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


API_PATHS = ["/api/summary", "/api/nodes", "/api/tasks", "/api/tasks?state=FAILED",
             "/api/actors", "/api/objects", "/api/timeline", "/api/dag.svg", "/metrics"]


def test_init_reports_the_dashboard_url(dash):
    url = dash["info"]["dashboard_url"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
    assert flowcore.api.session_info()["dashboard_url"] == url


@pytest.mark.parametrize("path", API_PATHS)
def test_api_needs_the_token(dash, path):
    c = Http(dash["url"])
    status, headers, body = c.get(path)
    assert status == 401 and "token" in json.loads(body)["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert c.get(path, headers=auth("not-the-token"))[0] == 401
    assert c.get(path + ("&" if "?" in path else "?") + "token=wrong")[0] == 401
    assert c.get(path, headers=auth(dash["token"]))[0] in (200, 404, 501)


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/index.html"])
def test_pages_redirect_to_the_login_form_without_the_token(dash, path):
    status, headers, _ = Http(dash["url"]).get(path)
    assert status == 302 and headers["Location"].startswith("/login?next=")


def test_tokenised_url_logs_in_and_drops_the_token_from_the_address(dash):
    c = Http(dash["url"])
    status, headers, _ = c.get("/?token=" + dash["token"])
    assert status == 302 and headers["Location"] == "/"
    cookie = c.cookies.get("flowcore_dashboard", "")
    assert cookie and dash["token"] not in cookie
    status, headers, body = c.get("/")
    assert status == 200 and b"flowcore dashboard" in body
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert c.get("/api/summary")[0] == 200 and c.get("/metrics")[0] == 200
    # a wrong token in a URL leads to the login form, saying so
    status, headers, _ = Http(dash["url"]).get("/?token=nope")
    assert status == 302 and "bad=1" in headers["Location"]
    # logging out forgets the cookie
    assert c.get("/logout")[0] == 302
    assert c.get("/api/summary")[0] == 401


def test_login_form(dash):
    c = Http(dash["url"])
    status, _, body = c.get("/login?next=/%23tasks")
    assert status == 200 and b'name="token"' in body and b"Cluster token" in body
    xsrf = re.search(rb'name="_xsrf" value="([^"]+)"', body).group(1).decode()
    # without the form's anti-forgery field the post is refused
    assert c.request("POST", "/login", {"token": dash["token"]})[0] == 403
    status, _, body = c.request("POST", "/login", {"token": "wrong", "_xsrf": xsrf,
                                                   "next": "/#tasks"})
    assert status == 401 and b"not this cluster" in body
    assert c.get("/api/summary")[0] == 401
    status, headers, _ = c.request("POST", "/login", {"token": dash["token"], "_xsrf": xsrf,
                                                      "next": "/#tasks"})
    assert status == 302 and headers["Location"] == "/#tasks"
    assert c.get("/api/summary")[0] == 200
    # an open redirect is not possible
    status, headers, _ = c.request("POST", "/login", {"token": dash["token"], "_xsrf": xsrf,
                                                      "next": "//evil.example/"})
    assert headers["Location"] == "/"


def test_forged_cookie_is_refused(dash):
    c = Http(dash["url"])
    c.cookies["flowcore_dashboard"] = "2|1:0|10:1700000000|18:flowcore_dashboard|12:dG9rZW4tb2s=|" \
                                      + "0" * 64
    assert c.get("/api/summary")[0] == 401


def test_summary_and_nodes(dash):
    s = api(dash, "/api/summary")
    assert s["nodes"] == {"alive": 1, "total": 1}
    assert s["resources"]["CPU"]["total"] == 2.0 and s["resources"]["GPU"]["total"] == 1.0
    assert s["resources"]["custom"]["total"] == 4.0
    assert s["resources"]["CPU"]["used"] == 1.0  # the held task
    assert s["tasks"]["totals"]["finished"] >= 9 and s["tasks"]["totals"]["failed"] == 1
    assert s["tasks"]["by_state"]["RUNNING"] == 1
    assert s["actors"]["by_state"]["ALIVE"] == 1
    # (store use arrives with the node's heartbeats: see the unit test)
    assert s["store"]["capacity"] == 128 << 20 and s["store"]["used"] >= 0
    (node,) = api(dash, "/api/nodes")["nodes"]
    assert node["alive"] and node["name"] == "node-0"
    assert node["node_id"] == dash["info"]["node_id"]
    assert 0 <= node["cpu_percent"] <= 100 and node["mem_total"] > node["mem_used"] > 0
    assert node["store"]["capacity"] == 128 << 20 and node["pool"]["workers"] >= 1


def test_tasks_api_shows_finished_and_failed_tasks(dash):
    finished = api(dash, "/api/tasks?state=FINISHED")["tasks"]
    assert {"dash_ok", "DashCounter.incr"} <= {t["name"] for t in finished}
    assert all(t["state"] == "FINISHED" for t in finished)
    (failed,) = api(dash, "/api/tasks?state=failed")["tasks"]
    assert failed["name"] == "dash_fail" and failed["state"] == "FAILED"
    assert failed["task_id"] == dash["bad"].task_id
    # the error text is the remote traceback, naming the function
    assert "ValueError: malformed record 'a,b'" in failed["error"]
    assert "in dash_fail" in failed["error"] and "Traceback" in failed["error"]
    assert failed["pid"] and failed["node"] == "node-0"
    everything = api(dash, "/api/tasks")
    assert {"dash_ok", "dash_fail", "dash_hold"} <= {t["name"] for t in everything["tasks"]}
    assert len(api(dash, "/api/tasks?limit=2")["tasks"]) == 2
    status, _, body = Http(dash["url"]).get("/api/tasks?state=BOGUS", headers=auth(dash["token"]))
    assert status == 400 and b"WAITING_FOR_ARGS" in body


def test_task_detail_has_the_error_and_the_state_changes(dash):
    t = api(dash, "/api/tasks/" + dash["bad"].task_id)
    assert t["name"] == "dash_fail" and "ValueError" in t["error"]
    assert [e["to"] for e in t["events"]] == ["QUEUED", "RUNNING", "FAILED"]
    c = Http(dash["url"])
    assert c.get("/api/tasks/" + "ab" * 16, headers=auth(dash["token"]))[0] == 404
    assert c.get("/api/tasks/abc", headers=auth(dash["token"]))[0] == 400


def test_actors_objects_and_timeline(dash):
    (actor,) = api(dash, "/api/actors")["actors"]
    assert actor["class_name"] == "DashCounter" and actor["state"] == "ALIVE"
    assert actor["node"] == "node-0" and actor["restarts"] == 0 and actor["pid"]
    objects = api(dash, "/api/objects")
    by_id = {o["object_id"]: o for o in objects["objects"]}
    blob = by_id[dash["blob"]._id.hex()]
    assert blob["size"] >= 1_600_000 and blob["nodes"] == ["node-0"] and not blob["inline"]
    assert blob["references"] >= 1 and blob["state"] == "READY"
    bad = by_id[dash["bad"]._id.hex()]
    assert bad["error"] and bad["inline"] and bad["task"] == "dash_fail"
    assert objects["summary"]["count"] >= 8
    bars = api(dash, "/api/timeline")["tasks"]
    states = {(b["name"], b["state"]) for b in bars}
    assert {("dash_ok", "FINISHED"), ("dash_fail", "FAILED"), ("dash_hold", "RUNNING")} <= states
    # the actor's creation runs in the actor's process
    (create,) = [b for b in bars if b["name"].startswith("DashCounter") and
                 b["kind"] == "create"]
    assert create["pid"] == actor["pid"]


def test_dag_view(dash):
    status, headers, body = Http(dash["url"]).get("/api/dag.svg", headers=auth(dash["token"]))
    try:
        import flowcore.scheduler.export  # noqa: F401
    except ImportError:
        assert status == 501 and b"export" in body
        return
    from flowcore.graph.draw import find_renderer
    if find_renderer("svg") is None:
        assert status == 501 and b"Graphviz" in body and b"graphviz-pure" in body
        return
    assert status == 200 and headers["Content-Type"] == "image/svg+xml"
    assert body.lstrip().startswith((b"<?xml", b"<svg", b"<!DOCTYPE")) and b"dash_hold" in body


# ====================================================================== CLI
def _read_line(proc: subprocess.Popen, pattern: str) -> str:
    """The first stdout line of ``proc`` matching ``pattern`` (pytest-timeout
    bounds the wait)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if re.search(pattern, line):
            return line.strip()
    raise AssertionError(f"the process ended without printing {pattern!r}")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "FLOWCORE_TOKEN"}


def test_cli_prints_a_tokenised_dashboard_url(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowcore.scheduler.cli", "--port", "0", "--dashboard-port", "0",
         "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=_env())
    try:
        address = _read_line(proc, r"listening at ").split("listening at ", 1)[1]
        line = _read_line(proc, r"dashboard at ")
        url = line.split("dashboard at ", 1)[1]
        m = re.fullmatch(r"(http://127\.0\.0\.1:\d+)/\?token=([0-9a-f]{64})", url)
        assert m, line
        with open(tmp_path / "token") as f:
            assert f.read().strip() == m.group(2)
        c = Http(m.group(1))
        assert c.get("/api/summary")[0] == 401
        status, headers, _ = c.get(urlparse(url).path + "?" + urlparse(url).query)
        assert status == 302 and headers["Location"] == "/"
        status, _, body = c.get("/api/summary")
        assert status == 200 and json.loads(body)["nodes"]["total"] == 0
        status, _, body = Http(m.group(1)).get("/login")
        assert status == 200 and str(tmp_path / "token").encode() in body  # where it is
        # a driver connecting to the head learns the dashboard's URL
        from flowcore.client.core import CoreClient
        client = CoreClient(address, m.group(2).encode(), None)
        client.start()
        try:
            assert client.dashboard_url == m.group(1)
        finally:
            client.close()
    finally:
        assert _stop(proc) == 0


def test_cli_dashboard_can_be_disabled_and_a_busy_port_is_an_error(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "flowcore.scheduler.cli", "--port", "0",
             "--dashboard-port", str(port), "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, env=_env())
        assert r.returncode == 1 and "--dashboard-port" in r.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowcore.scheduler.cli", "--port", "0", "--dashboard-port", "-1",
         "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, env=_env())
    try:
        out = [_read_line(proc, r"join nodes with")]
    finally:
        assert _stop(proc) == 0
    assert proc.stdout is not None
    out += proc.stdout.read().splitlines()
    assert out[0] and not any("dashboard at" in line for line in out)


# ====================================================================== browser
# the `browser` fixture (Debian chromium through Playwright) is in conftest.py


@pytest.mark.timeout(180)
def test_browser_shows_nodes_and_tasks_and_asks_for_the_token(dash, browser, tmp_path):
    errors: list[str] = []
    ctx = browser.new_context(viewport={"width": 1360, "height": 880})
    try:
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dash["url"] + "/?token=" + dash["token"])
        assert page.url.rstrip("/") == dash["url"]  # the token left the address bar
        # overview: the node list, and a finished and a failed task
        node_row = page.locator("#nodes-table tbody tr[data-node]")
        node_row.first.wait_for()
        assert "node-0" in node_row.first.inner_text()
        assert "ALIVE" in node_row.first.inner_text()
        page.locator("#failures-table tbody tr", has_text="dash_fail").wait_for()
        assert "malformed record" in page.locator("#failures-table").inner_text()
        page.locator("#recent-table tbody tr", has_text="dash_hold").wait_for()
        page.locator("#cards .card", has_text="Nodes alive").wait_for()
        page.locator("#updated", has_text="live").wait_for()
        # the store's use arrives with the node's next heartbeat
        store_used = re.compile(r"Object store\s*[1-9][0-9.]* MiB\s*of 128 MiB")
        page.locator("#cards .card", has_text=store_used).wait_for()
        # the screenshot goes to the test's tmp dir; FLOWCORE_UPDATE_SCREENSHOTS=1
        # refreshes the one in docs/images
        shot = str(tmp_path / "dashboard.png")
        page.screenshot(path=shot, full_page=True)
        assert os.path.getsize(shot) > 10_000
        if os.environ.get("FLOWCORE_UPDATE_SCREENSHOTS") == "1":
            import shutil
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            shutil.copyfile(shot, SCREENSHOT)

        # tasks page: filter by state, open the failed task's traceback
        page.click("#tabs a[data-page=tasks]")
        page.locator("#tasks-table tbody tr", has_text="dash_ok").first.wait_for()
        page.click("#task-chips button[data-state=FAILED]")
        failed = page.locator("#tasks-table tbody tr", has_text="dash_fail")
        failed.wait_for()
        page.locator("#tasks-table tbody tr", has_text="dash_ok").first.wait_for(state="detached")
        failed.click()
        page.locator("#task-detail pre.traceback", has_text="in dash_fail").wait_for()
        assert "ValueError: malformed record" in page.locator("#task-detail").inner_text()
        page.click("#task-chips button[data-state=FINISHED]")
        page.locator("#tasks-table tbody tr", has_text="dash_ok").first.wait_for()
        assert "FINISHED" in page.locator("#tasks-table tbody tr", has_text="dash_ok")\
            .first.inner_text()

        # the other pages render their data
        page.click("#tabs a[data-page=actors]")
        page.locator("#actors-table tbody tr", has_text="DashCounter").wait_for()
        page.click("#tabs a[data-page=objects]")
        page.locator("#objects-table tbody tr", has_text="dash_fail").wait_for()
        page.click("#tabs a[data-page=timeline]")
        page.locator("#timeline svg rect.tl-bar").first.wait_for()
        page.click("#tabs a[data-page=dag]")
        page.locator("#dag-img:not([hidden]), #dag-message:not([hidden])").first.wait_for()
        assert not errors, errors
    finally:
        ctx.close()

    # a browser without the cookie gets the login form, and it works
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.goto(dash["url"] + "/#tasks")
        page.locator("#login-form").wait_for()
        assert "Cluster token" in page.inner_text("body")
        assert page.locator("#nodes-table").count() == 0
        page.fill("#token", "wrong")
        page.click("#login-form button[type=submit]")
        page.locator(".error", has_text="not this cluster").wait_for()
        page.fill("#token", dash["token"])
        page.click("#login-form button[type=submit]")
        page.locator("#tasks-table tbody tr", has_text="dash_fail").first.wait_for()
    finally:
        ctx.close()
