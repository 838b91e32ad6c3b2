"""The dashboard's Serve, Tune and Datasets views: a real cluster runs a
tiny serve application, a tiny Tune experiment and a small dataset; their
views reach the head's key-value table, the JSON API (token-protected) and
/metrics, and a real browser (Debian's chromium via Playwright) shows them
in the three tabs."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest

import flowcore
from flowcore.experimental import internal_kv
from flowcore.experimental.dashboard_feed import Feed

pytestmark = pytest.mark.timeout(150)



def _need(module: str) -> None:
    if os.environ.get("CI") != "true":
        pytest.importorskip(module)


def get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def until(what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``fn`` until it returns something true (views are published
    about once a second by other processes)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value!r}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    _need("starlette")
    _need("uvicorn")
    from flowcore import data, serve, tune
    flowcore.shutdown()
    session = str(tmp_path_factory.mktemp("dashlib-session"))
    info = flowcore.init(num_cpus=2, session_dir=session)
    with open(os.path.join(session, "token")) as f:
        token = f.read().strip()
    env = {"url": info["dashboard_url"], "token": token}
    try:
        @serve.deployment(name="Doubler", num_replicas=1, ray_actor_options={"num_cpus": 0})
        class Doubler:
            def __call__(self, x: int) -> int:
                return 2 * x

        serve.start(http_options={"port": 0})
        handle = serve.run(Doubler.bind(), name="dashapp", route_prefix="/double")
        assert [handle.remote(i).result(timeout_s=60) for i in range(5)] == [0, 2, 4, 6, 8]

        def trainable(config):
            for i in range(2):
                tune.report({"loss": (config["x"] - 2) ** 2 + i})

        tune.Tuner(trainable, param_space={"x": tune.grid_search([1, 2, 3])},
                   tune_config=tune.TuneConfig(metric="loss", mode="min"),
                   run_config=tune.RunConfig(
                       name="dash_exp", storage_path=str(tmp_path_factory.mktemp("tune")),
                       verbose=0)).fit()
        ds = data.range(200, override_num_blocks=4).map_batches(lambda b: {"id": b["id"] * 3})\
            .filter(lambda r: r["id"] % 2 == 0)
        assert ds.count() == 100
        env["handle"] = handle
        yield env
    finally:
        try:
            serve.shutdown()
        finally:
            flowcore.shutdown()


def api(env: dict, path: str) -> Any:
    status, body = get(env["url"] + path, env["token"])
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


@pytest.mark.parametrize("path", ["/api/serve", "/api/tune", "/api/datasets"])
def test_views_need_the_token(libs, path):
    status, body = get(libs["url"] + path, None)
    assert status == 401 and "token" in json.loads(body)["error"]
    assert get(libs["url"] + path, "wrong")[0] == 401


def test_serve_view_lists_apps_deployments_replicas_and_rates(libs):
    def ready():
        v = api(libs, "/api/serve")
        apps = {a["name"]: a for a in v["applications"]}
        app = apps.get("dashapp")
        if not app or app["status"] != "RUNNING":
            return None
        dep = app["deployments"][0]
        if dep["requests_total"] < 5 or not dep["replicas"] or \
                dep["replicas"][0].get("node_id") is None:
            return None
        return v
    v = until("the serve view", ready)
    app = v["applications"][0]
    assert app["route_prefix"] == "/double" and app["ingress"] == "Doubler"
    dep = app["deployments"][0]
    assert dep["name"] == "Doubler" and dep["status"] == "HEALTHY"
    assert dep["target_num_replicas"] == 1 and dep["errors_total"] == 0
    assert dep["latency_ms_p50"] is not None and dep["latency_ms_p99"] >= dep["latency_ms_p50"]
    (rep,) = dep["replicas"]
    assert rep["state"] == "RUNNING" and rep["pid"] > 0 and rep["queue_len"] == 0
    assert rep["pid"] in {a["pid"] for a in flowcore.state.list_actors()
                          if (a.get("name") or "").startswith("SERVE_REPLICA::dashapp")}
    # the same figures on the head's /metrics
    status, body = get(libs["url"] + "/metrics", libs["token"])
    text = body.decode()
    assert status == 200
    assert 'flowcore_serve_requests_total{application="dashapp",deployment="Doubler"}' in text
    assert ('flowcore_serve_replicas{application="dashapp",deployment="Doubler",'
            'state="RUNNING"} 1.0') in text


def test_tune_view_lists_the_experiment_and_its_trials(libs):
    # views are put without waiting for the head's answer: they may trail a little
    (exp,) = until("the finished experiment", lambda: [
        e for e in api(libs, "/api/tune")["experiments"]
        if e["name"] == "dash_exp" and e["state"] == "FINISHED"])
    assert exp["state"] == "FINISHED" and exp["metric"] == "loss" and exp["mode"] == "min"
    assert exp["path"].endswith("dash_exp") and exp["num_trials"] == 3
    assert exp["trial_counts"] == {"TERMINATED": 3}
    trials = {json.loads(t["config"])["x"]: t for t in exp["trials"]}
    assert sorted(trials) == [1, 2, 3]
    assert all(t["iteration"] == 2 for t in trials.values())
    assert [trials[x]["metric"] for x in (1, 2, 3)] == [2, 1, 2]
    assert exp["best_trial_id"] == trials[2]["trial_id"]


def test_datasets_view_shows_the_plan_and_operator_stats(libs):
    runs = until("the finished dataset", lambda: [
        d for d in api(libs, "/api/datasets")["datasets"]
        if d["plan"][0] == "ReadRange" and d["plan"][1].startswith("MapBatches")
        and d["state"] == "FINISHED"])
    d = runs[0]
    assert d["state"] == "FINISHED" and d["error"] is None
    assert d["plan"] == ["ReadRange", "MapBatches(<lambda>)", "Filter(<lambda>)"]
    assert d["rows"] == 100
    assert sum(o["tasks"] for o in d["operators"]) >= 1
    assert d["operators"][-1]["rows"] == 100 and d["operators"][-1]["bytes"] > 0


def test_a_failed_dataset_is_marked_failed(libs):
    from flowcore import data

    def boom(row):
        raise ValueError("no such row")
    with pytest.raises(Exception, match="no such row"):
        data.range(10).map(boom).take_all()
    bad = until("the failed dataset", lambda: [
        d for d in api(libs, "/api/datasets")["datasets"]
        if d["plan"] == ["ReadRange", "Map(boom)"] and d["state"] != "RUNNING"])
    assert bad[0]["state"] == "FAILED" and "no such row" in bad[0]["error"]


def test_feed_is_rate_limited_and_skips_unchanged_views(libs):
    clock = [100.0]
    feed = Feed("feedtest", interval=1.0, clock=lambda: clock[0])
    try:
        assert feed.publish({"n": 1}) is True
        assert feed.publish({"n": 2}) is False  # within the interval
        clock[0] += 1.0
        assert feed.publish({"n": 1}) is False  # unchanged
        assert feed.publish({"n": 3}, force=True) is True
        raw = internal_kv._internal_kv_get("feedtest", namespace="dashboard")
        assert json.loads(raw) == {"n": 3}
    finally:
        internal_kv._internal_kv_del("feedtest", namespace="dashboard")


# ====================================================================== browser
# the `browser` fixture (Debian chromium through Playwright) is in conftest.py


@pytest.mark.timeout(180)
def test_browser_shows_serve_tune_and_datasets_tabs(libs, browser):
    until("serve replica metrics", lambda: any(
        d["requests_total"] >= 5 for a in api(libs, "/api/serve")["applications"]
        for d in a["deployments"]))
    errors: list[str] = []
    ctx = browser.new_context(viewport={"width": 1360, "height": 880})
    try:
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(libs["url"] + "/?token=" + libs["token"] + "#serve")
        page.locator("#serve-apps-table tbody tr[data-app=dashapp]", has_text="RUNNING").wait_for()
        dep = page.locator("#serve-deployments-table tbody tr[data-deployment=Doubler]")
        dep.wait_for()
        assert "HEALTHY" in dep.inner_text() and "1 / 1" in dep.inner_text()
        rep = page.locator("#serve-replicas-table tbody tr[data-replica]", has_text="RUNNING")
        rep.wait_for()
        assert "dashapp / Doubler" in rep.inner_text()

        page.click("#tabs a[data-page=tune]")
        page.locator("#tune-table tbody tr[data-experiment=dash_exp]",
                     has_text="FINISHED").wait_for()
        assert "loss (min)" in page.locator("#tune-table").inner_text()
        trials = page.locator("#tune-trials-table tbody tr[data-trial]")
        trials.nth(2).wait_for()
        assert trials.count() == 3
        assert "TERMINATED" in trials.first.inner_text()
        assert "★" in page.locator("#tune-trials-table tbody tr.best").inner_text()

        page.click("#tabs a[data-page=datasets]")
        row = page.locator("#datasets-table tbody tr[data-dataset]",
                           has_text="MapBatches(<lambda>)").first
        row.wait_for()
        assert "ReadRange" in row.inner_text() and "Filter(<lambda>)" in row.inner_text()
        row.click()
        page.locator("#dataset-ops-table tbody tr", has_text="100").first.wait_for()
        assert not errors, errors
    finally:
        ctx.close()


@flowcore.remote
def dataset_in_a_task(n):
    from flowcore import data
    return data.range(n).filter(lambda r: r["id"] < 7).count()


def test_a_dataset_consumed_in_a_task_is_listed_with_the_workers_pid(libs):
    assert flowcore.get(dataset_in_a_task.remote(50), timeout=60) == 7
    runs = until("the dataset run by a worker", lambda: [
        d for d in api(libs, "/api/datasets")["datasets"]
        if d["plan"] == ["ReadRange", "Filter(<lambda>)"] and d["state"] == "FINISHED"])
    assert runs[0]["rows"] == 7 and runs[0]["pid"] != os.getpid()


def test_finished_views_beyond_the_newest_twenty_are_deleted(libs):
    from flowcore import data
    for _ in range(22):
        assert data.range(3).filter(lambda r: r["id"] != 1).count() == 2
    assert flowcore.get(dataset_in_a_task.remote(10), timeout=60) == 7  # a round trip later
    mine = until("this driver's 20 newest views", lambda: [
        d for d in api(libs, "/api/datasets")["datasets"] if d["pid"] == os.getpid()])
    assert len(mine) == 20


def test_serve_shutdown_is_shown(libs):
    from flowcore import serve
    serve.shutdown()
    until("the serve view to say SHUTDOWN",
          lambda: api(libs, "/api/serve")["state"] == "SHUTDOWN")
    assert api(libs, "/api/serve")["applications"] == []
