"""A dataset execution's view for the dashboard's Datasets tab: the logical
plan (source and operators) and the executed operators with their rows,
bytes, tasks and wall time (from ``DatasetStats``), published through
``internal_kv`` while it runs (at most once a second, from the first second
on, so a short execution costs one put) and when it ends
(``flowcore.experimental.dashboard_feed``)."""
from __future__ import annotations

import os
import time
import uuid
from typing import Any

from ..experimental.dashboard_feed import DATA_PREFIX, Feed, retire
from .stats import DatasetStats

#: seconds an execution runs before its first view is published
FIRST_AFTER_S = 0.5


def plan_operators(plan: Any) -> list[str]:
    """The logical plan as operator names, source first."""
    src = plan.source
    plans = getattr(src, "plans", None)
    first = f"{src.name}[{len(plans)} inputs]" if plans else src.name
    return [first] + [getattr(o, "name", type(o).__name__) for o in plan.ops]


class DataFeed:
    def __init__(self, plan: Any, stats: DatasetStats) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.feed = Feed(DATA_PREFIX + self.id)
        self.feed.last = time.monotonic() - self.feed.interval + FIRST_AFTER_S
        self.plan = plan
        self.stats = stats
        self.start_time = time.time()

    def tick(self) -> None:
        self.feed.publish(lambda: self.view("RUNNING"))

    def finish(self, error: BaseException | None) -> None:
        self.feed.publish(self.view("FAILED" if error is not None else "FINISHED", error),
                          force=True)
        retire(self.feed.key, DATA_PREFIX)

    def view(self, state: str, error: BaseException | None = None) -> dict:
        ops = self.stats.as_dicts()
        plan = plan_operators(self.plan)
        return {"dataset_id": self.id, "name": " -> ".join(plan)[:200], "state": state,
                "plan": plan, "operators": ops, "pid": os.getpid(),
                "rows": ops[-1]["rows"] if ops else 0,
                "start_time": self.start_time, "time": time.time(),
                "end_time": time.time() if state != "RUNNING" else None,
                "peak_bytes": self.stats.peak_budget_bytes,
                "error": f"{type(error).__name__}: {error}"[:300] if error else None}
