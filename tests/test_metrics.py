"""Prometheus /metrics of the head: the collector on a state machine (no IO)
and a real scrape of a real cluster, parsed with prometheus_client's parser."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import flowcore
from flowcore.dashboard.metrics import HeadMetrics
from flowcore.dashboard.snapshot import SnapshotCache
from flowcore.ids import IdSource, object_id
from flowcore.scheduler.machine import SchedulerState

pytestmark = pytest.mark.timeout(120)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, family: str, sample: str | None = None) -> dict:
    """{frozenset(labels.items()): value} of one family's samples named ``sample``."""
    name = sample or family
    return {frozenset(s.labels.items()): s.value for s in fams[family].samples if s.name == name}


def one(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:
    vals = samples(fams, family, sample)
    return vals[frozenset(labels.items())]


# ====================================================================== no IO
def _state_with_work() -> tuple[SchedulerState, IdSource]:
    s = SchedulerState()
    ids = IdSource()
    s.handle("c1", {"op": "register_client", "kind": "driver"})
    s.handle("n1", {"op": "register_node", "node_id": "n1", "name": "alpha",
                    "address": "tcp://a:1", "resources": {"CPU": 4.0}})
    s.handle("n1", {"op": "heartbeat", "stats": {
        "cpu_percent": 12.0, "mem_total": 100, "mem_used": 40,
        "store": {"capacity": 1000, "used": 300, "spilled_bytes": 5},
        "pool": {"workers": 3, "idle": 1, "busy": 2, "starting": 0}}})
    return s, ids


def _run(s: SchedulerState, ids: IdSource, n: int, ok: bool = True) -> None:
    for _ in range(n):
        tid = ids.task_id()
        s.handle("c1", {"op": "submit", "tasks": [{
            "tid": tid, "fid": b"f", "name": "f", "args": b"", "deps": [], "nret": 1,
            "res": {"CPU": 1.0}, "retries": 0}]})
        s.handle("n1", {"op": "task_done", "tid": tid, "status": "ok" if ok else "error",
                        "results": [{"oid": object_id(tid), "inline": b"x", "size": 1,
                                     "error": not ok}]})


def test_latency_histogram_counts_each_completion_once():
    s, ids = _state_with_work()
    cache = SnapshotCache(s, interval=0.0)
    m = HeadMetrics(s, cache.get)
    _run(s, ids, 3)
    _run(s, ids, 2, ok=False)
    assert m.observe_new_latencies() == 5
    assert m.observe_new_latencies() == 0
    fams = families(m.render().decode())
    assert one(fams, "flowcore_task_latency_seconds", "flowcore_task_latency_seconds_count") == 5
    _run(s, ids, 4)
    fams = families(m.render().decode())
    assert one(fams, "flowcore_task_latency_seconds", "flowcore_task_latency_seconds_count") == 9


def test_latency_histogram_survives_more_completions_than_the_deque_holds():
    s, ids = _state_with_work()
    s.latencies = type(s.latencies)(maxlen=10)
    m = HeadMetrics(s, SnapshotCache(s).get)
    _run(s, ids, 25)
    assert m.observe_new_latencies() == 10  # the deque only has the newest 10
    _run(s, ids, 3)
    assert m.observe_new_latencies() == 3


def test_gauges_come_from_the_snapshot():
    s, ids = _state_with_work()
    _run(s, ids, 2)
    _run(s, ids, 1, ok=False)
    tid = ids.task_id()  # one left running
    s.handle("c1", {"op": "submit", "tasks": [{
        "tid": tid, "fid": b"f", "name": "f", "args": b"", "deps": [], "nret": 1,
        "res": {"CPU": 1.0}, "retries": 0}]})
    m = HeadMetrics(s, SnapshotCache(s).get)
    fams = families(m.render().decode())
    assert one(fams, "flowcore_tasks", state="RUNNING") == 1
    assert one(fams, "flowcore_tasks", state="QUEUED") == 0
    assert one(fams, "flowcore_task_outcomes", "flowcore_task_outcomes_total",
               outcome="finished") == 2
    assert one(fams, "flowcore_task_outcomes", "flowcore_task_outcomes_total",
               outcome="failed") == 1
    assert one(fams, "flowcore_nodes_alive") == 1
    node = {"node_id": "n1", "node": "alpha"}
    assert one(fams, "flowcore_object_store_used_bytes", **node) == 300
    assert one(fams, "flowcore_object_store_capacity_bytes", **node) == 1000
    assert one(fams, "flowcore_workers", **node, state="busy") == 2
    assert one(fams, "flowcore_node_cpu_percent", **node) == 12.0
    assert one(fams, "flowcore_resources_total", resource="CPU") == 4
    assert one(fams, "flowcore_resources_used", resource="CPU") == 1
    assert one(fams, "flowcore_actors", state="ALIVE") == 0
    # a private registry: nothing leaks into the process-global one
    assert "flowcore_tasks" not in {f.name for f in REGISTRY.collect()}


# ====================================================================== real
@flowcore.remote
def m_ok(x):
    return x + 1


@flowcore.remote
def m_fail():
    raise RuntimeError("metrics test failure")


@flowcore.remote
class MActor:
    def ping(self):
        return "pong"


@pytest.fixture(scope="module")
def metrics_cluster(tmp_path_factory):
    flowcore.shutdown()
    session = str(tmp_path_factory.mktemp("metrics-session"))
    info = flowcore.init(num_cpus=2, object_store_memory=64 << 20, session_dir=session)
    with open(os.path.join(session, "token")) as f:
        token = f.read().strip()
    assert flowcore.get([m_ok.remote(i) for i in range(5)]) == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError):
        flowcore.get(m_fail.remote())
    actor = MActor.remote()
    assert flowcore.get(actor.ping.remote()) == "pong"
    yield {"info": info, "token": token, "actor": actor}
    flowcore.shutdown()


def scrape(url: str, headers: dict | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url + "/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def test_metrics_need_the_token(metrics_cluster):
    url = metrics_cluster["info"]["dashboard_url"]
    status, _, body = scrape(url)
    assert status == 401 and "token" in json.loads(body)["error"]
    assert scrape(url, {"Authorization": "Bearer wrong"})[0] == 401
    assert scrape(url, {"Authorization": "Basic " + metrics_cluster["token"]})[0] == 401


def test_scrape_parses_and_shows_tasks(metrics_cluster):
    url = metrics_cluster["info"]["dashboard_url"]
    status, ctype, text = scrape(url, {"Authorization": f"Bearer {metrics_cluster['token']}"})
    assert status == 200 and ctype.startswith("text/plain")
    fams = families(text)
    assert one(fams, "flowcore_task_outcomes", "flowcore_task_outcomes_total",
               outcome="finished") >= 6
    assert one(fams, "flowcore_task_outcomes", "flowcore_task_outcomes_total",
               outcome="failed") == 1
    assert one(fams, "flowcore_task_outcomes", "flowcore_task_outcomes_total",
               outcome="submitted") >= 7
    assert set(dict(k)["state"] for k in samples(fams, "flowcore_tasks")) >= {
        "WAITING_FOR_ARGS", "QUEUED", "RUNNING", "FINISHED", "FAILED"}
    count = one(fams, "flowcore_task_latency_seconds", "flowcore_task_latency_seconds_count")
    assert count >= 7  # 5 + 1 failed + 1 actor call
    assert one(fams, "flowcore_task_latency_seconds", "flowcore_task_latency_seconds_bucket",
               le="+Inf") == count
    assert one(fams, "flowcore_nodes_alive") == 1
    assert one(fams, "flowcore_actors", state="ALIVE") == 1
    node = {"node_id": metrics_cluster["info"]["node_id"], "node": "node-0"}
    assert one(fams, "flowcore_object_store_capacity_bytes", **node) == 64 << 20
    assert one(fams, "flowcore_object_store_used_bytes", **node) >= 0
    assert sum(v for k, v in samples(fams, "flowcore_workers").items()
               if dict(k)["node_id"] == node["node_id"]) >= 1
    assert one(fams, "flowcore_resources_total", resource="CPU") == 2
    # a second scrape does not count the same completions again
    text2 = scrape(url, {"Authorization": f"Bearer {metrics_cluster['token']}"})[2]
    assert one(families(text2), "flowcore_task_latency_seconds",
               "flowcore_task_latency_seconds_count") == count
