"""Execution statistics of a dataset: per operator wall time, tasks, rows
and bytes out; ``Dataset.stats()`` prints them."""
from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["OpStats", "DatasetStats"]


class OpStats:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks = 0
        self.rows = 0
        self.bytes = 0
        self.blocks = 0
        self.start: float | None = None
        self.end: float | None = None
        self.actors = 0
        self.logical: tuple[int, ...] = ()  # id()s of the plan's operators/sources it ran

    def started(self) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def output(self, meta: dict) -> None:
        self.blocks += 1
        self.rows += meta["num_rows"]
        self.bytes += meta["size_bytes"]
        self.end = time.perf_counter()

    @property
    def wall_s(self) -> float:
        if self.start is None:
            return 0.0
        return (self.end or time.perf_counter()) - self.start

    def as_dict(self) -> dict[str, Any]:
        return {"operator": self.name, "wall_s": self.wall_s, "tasks": self.tasks,
                "actors": self.actors, "blocks": self.blocks, "rows": self.rows,
                "bytes": self.bytes}


class DatasetStats:
    """Stats of the latest execution of a dataset."""

    def __init__(self) -> None:
        self.ops: list[OpStats] = []
        self.lock = threading.Lock()
        self.start = time.perf_counter()
        self.end: float | None = None
        self.peak_budget_bytes = 0

    def op(self, name: str, logical: Any = ()) -> OpStats:
        s = OpStats(name)
        s.logical = tuple(id(o) for o in logical)
        with self.lock:
            self.ops.append(s)
        return s

    def finished(self) -> None:
        self.end = time.perf_counter()

    def to_string(self) -> str:
        if not self.ops:
            return "Dataset has not been executed yet (stats appear after consumption)."
        lines = []
        for i, s in enumerate(self.ops, 1):
            lines.append(f"Operator {i} {s.name}: {s.tasks} tasks"
                         + (f", {s.actors} actors" if s.actors else "")
                         + f", {s.blocks} blocks produced in {s.wall_s:.3f}s")
            lines.append(f"* Output rows: {s.rows}; output bytes: {s.bytes}")
        total = (self.end or time.perf_counter()) - self.start
        lines.append(f"Dataset total execution time: {total:.3f}s; peak bytes held by the "
                     f"executor: {self.peak_budget_bytes}")
        return "\n".join(lines)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in self.ops]
