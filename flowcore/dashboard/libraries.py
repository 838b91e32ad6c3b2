"""The dashboard's Serve, Tune and Datasets views.

The libraries run in their own processes (the serve controller actor, the
driver running ``Tuner.fit``, whoever consumes a dataset) and publish JSON
views into the head's key-value table (``flowcore.experimental.internal_kv``,
namespace ``dashboard``; see ``flowcore.experimental.dashboard_feed``).
These handlers read that table on the head's loop (no actor call, no IO)
and the static app renders the tables.  Serve's request counts, rates,
latencies and replicas are exported on ``/metrics`` too.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..experimental.dashboard_feed import DATA_PREFIX, NAMESPACE, SERVE_KEY, TUNE_PREFIX
from .handlers import Api

#: views whose publisher stopped updating them while RUNNING for this long are
#: marked STALE (a driver killed mid-run publishes no end)
STALE_AFTER_S = 60.0
#: most tune experiments / dataset executions listed, newest first
MAX_LISTED = 50


def _table(dash: Any) -> Any:
    return getattr(dash.head, "kv", None)


def _views(dash: Any, prefix: str) -> list[dict]:
    kv = _table(dash)
    if kv is None:
        return []
    out = []
    for key, raw in kv.items(NAMESPACE.encode(), prefix.encode()):
        try:
            view = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(view, dict):
            continue
        view["key"] = key.decode(errors="replace")
        if view.get("state") == "RUNNING" and time.time() - (view.get("time") or 0) > \
                STALE_AFTER_S:
            view["state"] = "STALE"
        out.append(view)
    return out


def serve_view(dash: Any) -> dict:
    views = _views(dash, SERVE_KEY)
    view = next((v for v in views if v["key"] == SERVE_KEY), None)
    if view is None:
        return {"state": "NOT_STARTED", "applications": [], "time": None}
    return view


class ServeApi(Api):
    def get(self) -> None:
        self.write_json(serve_view(self.dash))


class TuneApi(Api):
    def get(self) -> None:
        views = sorted(_views(self.dash, TUNE_PREFIX), key=lambda v: v.get("start_time") or 0,
                       reverse=True)[:MAX_LISTED]
        self.write_json({"time": time.time(), "experiments": views})


class DatasetsApi(Api):
    def get(self) -> None:
        views = sorted(_views(self.dash, DATA_PREFIX), key=lambda v: v.get("start_time") or 0,
                       reverse=True)[:MAX_LISTED]
        self.write_json({"time": time.time(), "datasets": views})


class _ServeCollector:
    """Serve's figures from the controller's latest view, at scrape time."""

    def __init__(self, dash: Any):
        self.dash = dash

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Metric]:
        view = serve_view(self.dash)
        labels = ["application", "deployment"]
        total = CounterMetricFamily("flowcore_serve_requests", "Requests the replicas of a "
                                    "deployment answered (handle calls and HTTP)", labels=labels)
        errors = CounterMetricFamily("flowcore_serve_errors", "Requests that raised in a "
                                     "replica", labels=labels)
        rate = GaugeMetricFamily("flowcore_serve_requests_per_second", "Requests per second "
                                 "over the last metrics round", labels=labels)
        ongoing = GaugeMetricFamily("flowcore_serve_ongoing_requests", "Requests in the "
                                    "replicas now", labels=labels)
        latency = GaugeMetricFamily("flowcore_serve_latency_ms", "Replica latency quantiles "
                                    "over the last 10 s (ms)", labels=labels + ["quantile"])
        replicas = GaugeMetricFamily("flowcore_serve_replicas", "Replicas by state",
                                     labels=labels + ["state"])
        for app in view.get("applications") or []:
            for d in app.get("deployments") or []:
                lab = [app["name"], d["name"]]
                total.add_metric(lab, d.get("requests_total") or 0)
                errors.add_metric(lab, d.get("errors_total") or 0)
                rate.add_metric(lab, d.get("requests_per_s") or 0.0)
                ongoing.add_metric(lab, d.get("ongoing_requests") or 0)
                for q, k in (("0.5", "latency_ms_p50"), ("0.99", "latency_ms_p99")):
                    if d.get(k) is not None:
                        latency.add_metric(lab + [q], d[k])
                counts: dict[str, int] = {}
                for r in d.get("replicas") or []:
                    counts[r["state"]] = counts.get(r["state"], 0) + 1
                for st, n in counts.items():
                    replicas.add_metric(lab + [st], n)
        yield from (total, errors, rate, ongoing, latency, replicas)


def routes(d: dict) -> list:
    """The API routes; also registers Serve's figures on the dashboard's /metrics."""
    dash = d["dash"]
    metrics = getattr(dash, "metrics", None)
    if metrics is not None:
        metrics.registry.register(_ServeCollector(dash))
    return [
        (r"/api/serve", ServeApi, d),
        (r"/api/tune", TuneApi, d),
        (r"/api/datasets", DatasetsApi, d),
    ]
