"""``MedianStoppingRule``: stop a trial whose best result so far is worse
than the median of the other trials' running averages at the same time."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from .trial_scheduler import TrialScheduler

__all__ = ["MedianStoppingRule"]


class MedianStoppingRule(TrialScheduler):
    """Stop (``hard_stop=True``) or pause trials that fall below the median."""

    _needs_metric = True

    def __init__(self, time_attr: str = "time_total_s", metric: str | None = None,
                 mode: str | None = None, grace_period: float = 60.0,
                 min_samples_required: int = 3, min_time_slice: float = 0,
                 hard_stop: bool = True):
        self._init_metric_mode(metric, mode)
        self._time_attr = time_attr
        self._grace_period = grace_period
        self._min_samples_required = min_samples_required
        self._min_time_slice = min_time_slice
        self._hard_stop = hard_stop
        self._results: dict[str, list[dict]] = defaultdict(list)
        self._completed: set[str] = set()
        self._last_pause: dict[str, float] = {}
        self._stopped: set[str] = set()  # paused once: FIFO from then on
        self._num_stopped = 0

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return self.CONTINUE
        tid = trial.trial_id
        if tid in self._completed or tid in self._stopped:
            return self.CONTINUE
        self._results[tid].append(result)
        t = result[self._time_attr]
        if t < self._grace_period:
            return self.CONTINUE
        others = [m for o in self._results if o != tid
                  if (m := self._running_mean(o, t)) is not None]
        if len(others) < self._min_samples_required:
            return self.CONTINUE
        mine = [s for r in self._results[tid] if (s := self._score(r)) is not None]
        if not mine:
            return self.CONTINUE
        best = max(mine)
        median = float(np.median(others))
        if best < median:
            self._num_stopped += int(self._hard_stop or tid not in self._stopped)
            if self._hard_stop:
                return self.STOP
            if t - self._last_pause.get(tid, float("-inf")) >= self._min_time_slice:
                self._last_pause[tid] = t
                self._stopped.add(tid)
                return self.PAUSE
        return self.CONTINUE

    def _running_mean(self, tid: str, t: float) -> float | None:
        scores = [s for r in self._results[tid]
                  if r[self._time_attr] <= t and (s := self._score(r)) is not None]
        return float(np.mean(scores)) if scores else None

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._completed.add(trial.trial_id)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._completed.add(trial.trial_id)

    def debug_string(self) -> str:
        return f"Using MedianStoppingRule: num_stopped={self._num_stopped}."
