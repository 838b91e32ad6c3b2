"""The serve controller's view for the dashboard: applications,
deployments, replicas (state, pid, node, queue length), requests/s and
latency per deployment, published through ``internal_kv`` at most once a
second (``flowcore.experimental.dashboard_feed``).

Each second the controller asks every running replica for its counters
(``Replica.get_metrics``, an actor call that never blocks the reconcile
loop); when the answers are in, the view is built and published.
"""
from __future__ import annotations

import time
from typing import Any

from ..experimental.dashboard_feed import SERVE_KEY, Feed

#: seconds between metric rounds; a round whose answers take longer is dropped
INTERVAL_S = 1.0
ROUND_TIMEOUT_S = 5.0


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


class ServeFeed:
    def __init__(self) -> None:
        self.feed = Feed(SERVE_KEY, INTERVAL_S)
        self.round: dict[tuple[str, str, str], Any] = {}  # (app, dep, rid) -> future
        self.round_start = 0.0
        self.prev: dict[str, tuple[float, int, int]] = {}  # rid -> (time, total, errors)
        self.replica_info: dict[str, dict] = {}        # rid -> last metrics answer
        self.rates: dict[tuple[str, str], dict] = {}   # (app, dep) -> figures
        self.cumulative: dict[tuple[str, str], list[int]] = {}  # requests, errors ever

    def tick(self, ctl: Any, now: float) -> None:
        """Called on every reconcile tick of the controller."""
        if self.round:
            done = all(f.done() for f in self.round.values())
            if not done and now - self.round_start < ROUND_TIMEOUT_S:
                return
            self._collect()
            self.feed.publish(lambda: self.view(ctl), force=True)
            return
        if not self.feed.due():
            return
        running = [(a.name, ds.name, r) for a in ctl.apps.values()
                   for ds in a.deployments.values() for r in ds.running()]
        if not running:
            self.rates.clear()
            self.feed.publish(lambda: self.view(ctl))
            return
        self.round_start = now
        for app, dep, r in running:
            try:
                self.round[(app, dep, r.rid)] = r.actor.get_metrics.remote().future()
            except Exception:  # noqa: BLE001 - the replica is going away
                pass
        self.feed.last = time.monotonic()

    def _collect(self) -> None:
        now = time.monotonic()
        per_dep: dict[tuple[str, str], dict] = {}
        for (app, dep, rid), fut in self.round.items():
            if not fut.done():
                continue
            try:
                m = fut.result(0)
            except BaseException:  # noqa: BLE001 - a replica that died meanwhile
                continue
            self.replica_info[rid] = m
            d = per_dep.setdefault((app, dep), {"rate": 0.0, "lat": [], "queued": 0})
            t_prev, total_prev, errors_prev = self.prev.get(rid, (None, 0, 0))
            delta = max(0, m["total"] - total_prev)
            if t_prev is not None and now > t_prev:
                d["rate"] += delta / (now - t_prev)
            cum = self.cumulative.setdefault((app, dep), [0, 0])
            cum[0] += delta
            cum[1] += max(0, m["errors"] - errors_prev)
            self.prev[rid] = (now, m["total"], m["errors"])
            d["lat"].extend(m["latencies"])
            d["queued"] += m["ongoing"]
        self.round = {}
        self.rates = {}
        for key, d in per_dep.items():
            lat = sorted(d["lat"])
            self.rates[key] = {"requests_per_s": round(d["rate"], 3),
                               "latency_ms_p50": _ms(_quantile(lat, 0.5)),
                               "latency_ms_p99": _ms(_quantile(lat, 0.99)),
                               "ongoing_requests": d["queued"]}

    def view(self, ctl: Any) -> dict:
        apps = []
        live_rids = set()
        for a in ctl.apps.values():
            st = ctl._app_status(a.name)
            deps = []
            for ds in a.deployments.values():
                key = (a.name, ds.name)
                cum = self.cumulative.get(key, [0, 0])
                replicas = []
                for r in ds.replicas.values():
                    live_rids.add(r.rid)
                    info = self.replica_info.get(r.rid, {})
                    replicas.append({"replica_id": r.rid, "state": r.state, "pid": r.pid,
                                     "node_id": info.get("node_id"),
                                     "queue_len": info.get("ongoing", 0)
                                     if r.state == "RUNNING" else 0,
                                     "version": r.version})
                dst = st["deployments"].get(ds.name, {})
                deps.append({"name": ds.name, "status": dst.get("status", ds.status()),
                             "message": ds.message, "target_num_replicas": ds.target_num,
                             "requests_total": cum[0], "errors_total": cum[1],
                             **self.rates.get(key, {"requests_per_s": 0.0,
                                                    "latency_ms_p50": None,
                                                    "latency_ms_p99": None,
                                                    "ongoing_requests": 0}),
                             "replicas": replicas})
            apps.append({"name": a.name, "status": st["status"], "message": st["message"],
                         "route_prefix": a.route_prefix, "ingress": a.ingress,
                         "last_deployed_time_s": a.last_deployed_time_s, "deployments": deps})
        for rid in [k for k in self.prev if k not in live_rids]:
            self.prev.pop(rid, None)
            self.replica_info.pop(rid, None)
        proxy = ctl.proxy_info or {}
        return {"time": time.time(), "state": "RUNNING", "proxy_url": proxy.get("url"),
                "applications": apps}

    def clear(self) -> None:
        """serve.shutdown(): the view says so."""
        self.feed.publish({"time": time.time(), "state": "SHUTDOWN", "applications": []},
                          force=True)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
