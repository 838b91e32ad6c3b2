"""Metric table definition: labels, units, direction and the flowcore targets."""

from dataclasses import dataclass
from typing import Optional, Tuple

ENGINES = ("flowcore", "ray", "dask")

# Workload names accepted by --only (cold_start/idle_memory are measured on every
# run anyway since they are by-products of starting the engine).
WORKLOADS = ("cold_start", "idle_memory", "sync_rtt", "async_tasks", "small_put_get",
             "large_put", "large_get", "big_arg", "tree_reduce", "nested_submit", "fib10",
             "actor_sync", "actor_async",
             "xnode_transfer", "spread_tasks")
# (Same order as the worker runs them: run.py blames the first missing one on a crash.
# The last two run on a 2-node cluster each engine starts for them.)


@dataclass(frozen=True)
class Target:
    kind: str            # "abs_max", "abs_min", "vs" (ratio vs engine), "zero_copy"
    value: float
    engine: Optional[str] = None
    text: str = ""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    workload: str
    target: Optional[Target] = None
    ratios: bool = True          # False for reference rows (machine speed, not engine)


METRICS: Tuple[Metric, ...] = (
    Metric("cold_start_s", "cold start (import -> 1st result)", "s", False, "cold_start",
           Target("abs_max", 0.3, text="<= 0.3 s")),
    Metric("idle_mem_mib", "idle memory (PSS driver+children)", "MiB", False, "idle_memory",
           Target("abs_max", 100, text="<= 100 MiB")),
    Metric("sync_rtt_per_s", "sync round trips/s", "1/s", True, "sync_rtt",
           Target("vs", 4, "ray", ">= 4x ray")),
    Metric("async_tasks_per_s", "async tasks/s (1000 no-ops)", "1/s", True, "async_tasks",
           Target("vs", 3, "ray", ">= 3x ray")),
    Metric("actor_sync_per_s", "actor sync round trips/s", "1/s", True, "actor_sync",
           Target("vs", 3, "ray", ">= 3x ray")),
    Metric("actor_async_per_s", "actor async calls/s (1000 no-ops)", "1/s", True,
           "actor_async", Target("vs", 3, "ray", ">= 3x ray")),
    Metric("small_put_per_s", "small put/s (100 B)", "1/s", True, "small_put_get",
           Target("vs", 20, "ray", ">= 20x ray")),
    Metric("small_get_per_s", "small get/s (100 B)", "1/s", True, "small_put_get"),
    Metric("large_put_gbps", "large put, steady (100 MiB)", "GB/s", True, "large_put"),
    Metric("copy_gbps", "  reference: np.copyto (100 MiB)", "GB/s", True, "large_put",
           ratios=False),
    Metric("large_put_vs_copy", "  large put / plain copy", "%", True, "large_put",
           Target("abs_min", 0.8, text=">= 80% of copy")),
    Metric("large_get_gbps", "large get (100 MiB)", "GB/s", True, "large_get"),
    Metric("large_get_1mib_ms", "  get time, 1 MiB", "ms", False, "large_get"),
    Metric("large_get_small_ms", "  get time, 10 MiB", "ms", False, "large_get"),
    Metric("large_get_big_ms", "  get time, 100 MiB", "ms", False, "large_get",
           Target("vs", 1, "ray", "<= ray")),
    Metric("large_get_1gib_ms", "  get time, 1 GiB", "ms", False, "large_get"),
    Metric("large_get_growth", "  get time growth 10->100 MiB", "x", False, "large_get",
           Target("zero_copy", 2.0, text="zero-copy (<= 2x)")),
    Metric("large_get_growth_1g", "  get time growth 1 MiB->1 GiB", "x", False, "large_get",
           Target("zero_copy", 2.0, text="flat (<= 2x)")),
    Metric("big_arg_tasks_per_s", "tasks/s with 100 MiB ref arg", "1/s", True, "big_arg"),
    Metric("big_arg_first_tasks_per_s", "  first 20 tasks after the put", "1/s", True,
           "big_arg", Target("vs", 2, "ray", ">= 2x ray")),
    Metric("tree_reduce_s", "tree reduction 256 x 1 MiB", "s", False, "tree_reduce",
           Target("vs", 2, "dask", ">= 2x faster than dask")),
    Metric("nested_submit_s", "1000 tasks submitted from inside a task", "s", False,
           "nested_submit"),
    Metric("nested_driver_s", "  the same 1000 tasks from the driver", "s", False,
           "nested_submit"),
    Metric("nested_vs_driver", "  nested / driver time", "x", False, "nested_submit",
           Target("abs_max", 1.5, text="<= 1.5x")),
    Metric("fib10_s", "recursive fib(10), parents blocked in get (177 tasks)", "s", False,
           "fib10", Target("vs", 4, "ray", ">= 4x faster than ray")),
    # 2-node cluster (2 x 1 CPU on this machine)
    Metric("xnode_gbps", "2 nodes: cross-node transfer B->A (100 MiB)", "GB/s", True,
           "xnode_transfer", Target("abs_min", 1.0, text=">= 1 GB/s")),
    Metric("xnode_ms", "  producer done -> task on A returned", "ms", False, "xnode_transfer"),
    Metric("xnode_local_ms", "  reference: same task on B (no transfer)", "ms", False,
           "xnode_transfer"),
    Metric("spread_tasks_per_s", "2 nodes: async tasks/s, SPREAD (1000 no-ops)", "1/s", True,
           "spread_tasks", Target("vs", 2, "ray", ">= 2x ray")),
    Metric("spread_share_node_a", "  share of spread tasks on node A", "%", True,
           "spread_tasks", ratios=False),
)

# A copying get of 100 MiB cannot finish this fast (it would be > 50 GB/s), so a
# get this quick counts as zero-copy even if timer noise inflates the growth ratio.
ZERO_COPY_ABS_MS = 2.0
# growth metric -> the get time (of its larger size) that ZERO_COPY_ABS_MS applies to
ZERO_COPY_MS_KEY = {"large_get_growth": "large_get_big_ms",
                    "large_get_growth_1g": "large_get_1gib_ms"}


def oriented_ratio(metric, fc, other):
    """flowcore vs other, oriented so that > 1 means flowcore is better."""
    if fc is None or other is None:
        return None
    if metric.higher_is_better:
        return fc / other if other else None
    return other / fc if fc else None


def target_met(metric, values, fc_medians):
    """True/False/None (cannot tell) for flowcore against metric.target.

    ``values``: {engine: median of this metric}; ``fc_medians``: all flowcore medians."""
    t = metric.target
    fc = values.get("flowcore")
    if t is None or fc is None:
        return None
    if t.kind == "abs_max":
        return fc <= t.value
    if t.kind == "abs_min":
        return fc >= t.value
    if t.kind == "vs":
        r = oriented_ratio(metric, fc, values.get(t.engine))
        return None if r is None else r >= t.value
    if t.kind == "zero_copy":
        big_ms = fc_medians.get(ZERO_COPY_MS_KEY.get(metric.key, "large_get_big_ms"))
        return fc <= t.value or (big_ms is not None and big_ms <= ZERO_COPY_ABS_MS)
    raise ValueError(t.kind)
