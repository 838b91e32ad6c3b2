"""Prometheus metrics of the head, served at ``/metrics``.

A private ``CollectorRegistry`` (never the process-global one): gauges are
read from the dashboard's cached snapshot at scrape time, so a scrape costs
the scheduler no more than a page view; the task latency histogram is fed
from the state machine's bounded ``latencies`` deque, reading only the
entries added since the previous scrape.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .snapshot import ACTOR_STATES, TASK_STATES, Snapshot

__all__ = ["HeadMetrics", "CONTENT_TYPE_LATEST"]

#: task latency buckets, seconds (submission to completion)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0, 600.0, float("inf"))


class _SnapshotCollector:
    """Gauges and counters built from the latest snapshot at each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def describe(self) -> list:
        return []  # names are dynamic; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        summary = snap["summary"]
        nodes = snap["nodes"]

        g = GaugeMetricFamily("flowcore_tasks", "Tasks in the head's task table, by state",
                              labels=["state"])
        for st in TASK_STATES:
            g.add_metric([st], summary["tasks"]["by_state"].get(st, 0))
        yield g

        c = CounterMetricFamily("flowcore_task_outcomes", "Tasks since the head started, by "
                                "outcome "
                                "(submitted, finished, failed, cancelled, retried)",
                                labels=["outcome"])
        for outcome, n in sorted(summary["tasks"]["totals"].items()):
            c.add_metric([outcome], n)
        yield c

        g = GaugeMetricFamily("flowcore_actors", "Actors by state", labels=["state"])
        for st in ACTOR_STATES:
            g.add_metric([st], summary["actors"]["by_state"].get(st, 0))
        yield g

        g = GaugeMetricFamily("flowcore_nodes_alive", "Nodes connected to the head")
        g.add_metric([], summary["nodes"]["alive"])
        yield g

        alive = [n for n in nodes if n.get("alive")]
        used = GaugeMetricFamily("flowcore_object_store_used_bytes",
                                 "Bytes allocated in a node's shared-memory object store",
                                 labels=["node_id", "node"])
        cap = GaugeMetricFamily("flowcore_object_store_capacity_bytes",
                                "Capacity of a node's shared-memory object store",
                                labels=["node_id", "node"])
        spilled = GaugeMetricFamily("flowcore_object_store_spilled_bytes",
                                    "Bytes of a node's objects spilled to disk",
                                    labels=["node_id", "node"])
        workers = GaugeMetricFamily("flowcore_workers", "Worker processes of a node's pool, "
                                    "by state (idle, busy, starting)",
                                    labels=["node_id", "node", "state"])
        cpu = GaugeMetricFamily("flowcore_node_cpu_percent", "CPU use of a node's machine",
                                labels=["node_id", "node"])
        mem = GaugeMetricFamily("flowcore_node_memory_used_bytes",
                                "Memory in use on a node's machine", labels=["node_id", "node"])
        running = GaugeMetricFamily("flowcore_node_running_tasks",
                                    "Tasks the head has placed on a node and not seen finish",
                                    labels=["node_id", "node"])
        for n in alive:
            lab = [n["node_id"], str(n.get("name", ""))]
            store = n.get("store") or {}
            if "used" in store:
                used.add_metric(lab, store["used"])
                cap.add_metric(lab, store.get("capacity", 0))
                spilled.add_metric(lab, store.get("spilled_bytes", 0))
            elif "object_store_memory" in n:
                cap.add_metric(lab, n["object_store_memory"])
            pool = n.get("pool") or {}
            for st in ("idle", "busy", "starting"):
                if st in pool:
                    workers.add_metric(lab + [st], pool[st])
            if n.get("cpu_percent") is not None:
                cpu.add_metric(lab, n["cpu_percent"])
            if n.get("mem_used") is not None:
                mem.add_metric(lab, n["mem_used"])
            running.add_metric(lab, n.get("running_tasks", 0))
        yield from (used, cap, spilled, workers, cpu, mem, running)

        tot = GaugeMetricFamily("flowcore_resources_total", "Resources of the alive nodes",
                                labels=["resource"])
        use = GaugeMetricFamily("flowcore_resources_used", "Resources held by running work",
                                labels=["resource"])
        for name, r in summary["resources"].items():
            tot.add_metric([name], r["total"])
            use.add_metric([name], r["used"])
        yield tot
        yield use

        objs = summary["objects"]
        g = GaugeMetricFamily("flowcore_objects", "Objects the head tracks")
        g.add_metric([], objs["count"])
        yield g
        g = GaugeMetricFamily("flowcore_objects_bytes", "Total size of the objects the head "
                              "tracks (inline and in stores)")
        g.add_metric([], objs["bytes"])
        yield g


class HeadMetrics:
    """The head's metrics in a private registry; :meth:`render` for a scrape."""

    def __init__(self, state: Any, snapshot: Callable[[], Snapshot]):
        self.state = state
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "flowcore_task_latency_seconds",
            "Time from submission to completion of tasks that ran (finished or raised), "
            "observed at scrape time",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_SnapshotCollector(snapshot))
        # the completions still held count too: the dashboard (and so this)
        # is made when the first scrape arrives, not when the head starts
        self._seen = max(getattr(state, "latency_count", 0) - len(state.latencies), 0)

    def observe_new_latencies(self) -> int:
        """Feed the histogram the completions since the last call; returns how
        many.  The deque is bounded, so at most its length are seen per call."""
        latencies = self.state.latencies
        total = getattr(self.state, "latency_count", None)
        if total is None:  # an older state machine without the counter
            return 0
        new = min(total - self._seen, len(latencies))
        self._seen = total
        for x in itertools.islice(reversed(latencies), max(new, 0)):
            self.latency.observe(x)
        return new

    def render(self) -> bytes:
        self.observe_new_latencies()
        return generate_latest(self.registry)
