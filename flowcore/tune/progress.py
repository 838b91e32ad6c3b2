"""The progress table printed while an experiment runs: how many trials
are in each state, each trial's config values, iteration and metric, and
for a waiting trial the reason it waits."""
from __future__ import annotations

import sys
import time
from typing import Any

from .search.variant_generator import flatten

__all__ = ["ProgressTable"]

_INTERVAL = {0: None, 1: 5.0, 2: 5.0, 3: 5.0}


class ProgressTable:
    def __init__(self, controller: Any, verbose: int | None, metric: str | None,
                 file: Any = None, max_rows: int = 20):
        self.controller = controller
        self.verbose = 1 if verbose is None else verbose
        self.metric = metric
        self.file = file
        self.max_rows = max_rows
        self.interval = _INTERVAL[self.verbose]
        self.start = time.monotonic()
        self.next_at = self.start + (self.interval or 0)

    def seconds_to_next(self) -> float:
        if self.interval is None:
            return 1.0
        return max(0.05, min(1.0, self.next_at - time.monotonic()))

    def maybe_print(self) -> None:
        if self.interval is None or time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + self.interval
        self.print()

    def trial_line(self, trial: Any, what: str, result: dict | None = None) -> None:
        """One line per trial event at verbose >= 2 (results at verbose 3)."""
        shown = {k: v for k, v in (result or {}).items()
                 if k in ("training_iteration", "time_total_s") or k == self.metric}
        print(f"Trial {trial} {what}" + (f": {shown}" if shown else ""),
              file=self.file or sys.stdout, flush=True)

    def final(self) -> None:
        if self.verbose:
            self.print(final=True)

    def render(self, final: bool = False) -> str:
        trials = self.controller.get_trials()
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        elapsed = time.monotonic() - self.start
        head = " | ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        lines = [f"Trial status: {head or 'no trials yet'}",
                 f"{'Finished' if final else 'Running'} for {_clock(elapsed)}"]
        best = self._best(trials)
        if best is not None:
            lines.append(f"Current best trial: {best[1]} with {self.metric}={best[0]:.6g}")
        keys = self._config_keys(trials)
        header = ["Trial name", "status"] + keys + ["iter", "total time (s)"]
        if self.metric:
            header.append(self.metric)
        rows = []
        shown = trials if len(trials) <= self.max_rows else (
            [t for t in trials if t.status == "RUNNING"] +
            [t for t in trials if t.status != "RUNNING"])[:self.max_rows]
        for t in shown:
            r = t.last_result or {}
            row = [str(t), t.status] + [_fmt(_get(t.config, k)) for k in keys] + [
                _fmt(r.get("training_iteration", "")), _fmt(r.get("time_total_s", ""))]
            if self.metric:
                row.append(_fmt(r.get(self.metric, "")))
            rows.append(row)
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else []
        if rows:
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
            for row, t in zip(rows, shown):
                line = "  ".join(str(c).ljust(w) for c, w in zip(row, widths))
                if t.pending_reason and t.status in ("PENDING", "PAUSED", "RUNNING"):
                    line += f"  ({t.pending_reason})"
                lines.append(line)
            if len(trials) > len(shown):
                lines.append(f"... {len(trials) - len(shown)} more trials")
        errors = [t for t in trials if t.status == "ERROR"]
        for t in errors[:5]:
            lines.append(f"Trial {t} errored after {t.num_failures} failure(s): "
                         f"{t.error_file}")
        return "\n".join(lines)

    def print(self, final: bool = False) -> None:
        out = self.file or sys.stdout
        print(self.render(final) + "\n", file=out, flush=True)

    def _best(self, trials: list) -> tuple[float, Any] | None:
        mode = self.controller.mode
        if not self.metric or mode is None:
            return None
        vals = [(t.last_result[self.metric], t) for t in trials
                if isinstance(t.last_result.get(self.metric), (int, float))]
        if not vals:
            return None
        return (min if mode == "min" else max)(vals, key=lambda p: p[0])

    @staticmethod
    def _config_keys(trials: list) -> list[str]:
        varying: dict[str, set] = {}
        for t in trials:
            for k, v in flatten(t.config).items():
                varying.setdefault(k, set()).add(repr(v))
        return [k for k, vs in varying.items() if len(vs) > 1][:6]


def _get(config: dict, key: str) -> Any:
    cur: Any = config
    for part in key.split("/"):
        if not isinstance(cur, dict) or part not in cur:
            return ""
        cur = cur[part]
    return cur


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v)


def _clock(s: float) -> str:
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h:02d}:{m:02d}:{sec:02d}.{int((s % 1) * 100):02d}"
