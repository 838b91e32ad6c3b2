"""ASHA: asynchronous successive halving (``ASHAScheduler``).

Rungs sit at ``grace_period * reduction_factor**k`` (in ``time_attr``
units) below ``max_t``.  A trial reaching a rung continues only if its
metric is in the top ``1/reduction_factor`` of what trials recorded at that
rung so far; otherwise it stops.  Every trial stops at ``max_t``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .trial_scheduler import TrialScheduler

__all__ = ["AsyncHyperBandScheduler", "ASHAScheduler"]


class _Bracket:
    def __init__(self, min_t: float, max_t: float, reduction_factor: float, s: int,
                 stop_last_trials: bool):
        self.rf = reduction_factor
        max_rungs = int(math.log(max_t / min_t, reduction_factor) - s + 1)
        self.rungs: list[tuple[float, dict[str, float]]] = [
            (min_t * reduction_factor ** (k + s), {}) for k in reversed(range(max_rungs))]
        self.stop_last_trials = stop_last_trials

    def cutoff(self, recorded: dict[str, float]) -> float | None:
        if not recorded:
            return None
        return float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100))

    def on_result(self, trial_id: str, cur_iter: float, score: float | None) -> str:
        action = TrialScheduler.CONTINUE
        for milestone, recorded in self.rungs:
            if cur_iter >= milestone and trial_id not in recorded:
                cutoff = self.cutoff(recorded)
                if score is None:
                    break
                if cutoff is not None and score < cutoff:
                    action = TrialScheduler.STOP
                recorded[trial_id] = score
                break
        return action


class AsyncHyperBandScheduler(TrialScheduler):
    """Asynchronous HyperBand / successive halving."""

    _needs_metric = True

    def __init__(self, time_attr: str = "training_iteration", metric: str | None = None,
                 mode: str | None = None, max_t: float = 100, grace_period: float = 1,
                 reduction_factor: float = 4, brackets: int = 1, stop_last_trials: bool = True):
        if grace_period <= 0:
            raise ValueError(f"{type(self).__name__}(grace_period={grace_period}): must be > 0")
        if max_t <= 0 or max_t < grace_period:
            raise ValueError(f"{type(self).__name__}(max_t={max_t}): must be >= grace_period "
                             f"({grace_period})")
        if reduction_factor <= 1:
            raise ValueError(f"{type(self).__name__}(reduction_factor={reduction_factor}): "
                             f"must be > 1")
        if not isinstance(brackets, int) or brackets < 1:
            raise ValueError(f"{type(self).__name__}(brackets={brackets!r}): expected an int >= 1")
        self._init_metric_mode(metric, mode)
        self._time_attr = time_attr
        self._max_t = max_t
        self._grace_period = grace_period
        self._reduction_factor = reduction_factor
        self._brackets = [_Bracket(grace_period, max_t, reduction_factor, s, stop_last_trials)
                          for s in range(brackets)]
        self._trial_info: dict[str, _Bracket] = {}
        self._counter = 0
        self._num_stopped = 0
        self._stop_last_trials = stop_last_trials

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        # brackets are chosen with probability proportional to their size
        sizes = np.array([len(b.rungs) for b in self._brackets], dtype=float)
        probs = np.e ** (sizes - sizes.max())
        idx = int(np.random.default_rng(self._counter).choice(len(self._brackets),
                                                              p=probs / probs.sum()))
        self._counter += 1
        self._trial_info[trial.trial_id] = self._brackets[idx]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if self._time_attr not in result:
            raise ValueError(f"{type(self).__name__}(time_attr={self._time_attr!r}): the result "
                             f"has no {self._time_attr!r}; reported keys: {sorted(result)}")
        if self._metric not in result:
            return self.CONTINUE
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None:
            self.on_trial_add(tune_controller, trial)
            bracket = self._trial_info[trial.trial_id]
        if result[self._time_attr] >= self._max_t and self._stop_last_trials:
            action = self.STOP
        else:
            action = bracket.on_result(trial.trial_id, result[self._time_attr],
                                       self._score(result))
        if action == self.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result and self._time_attr in result and self._metric in result:
            bracket = self._trial_info.get(trial.trial_id)
            if bracket is not None:
                bracket.on_result(trial.trial_id, result[self._time_attr], self._score(result))
        self._trial_info.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._trial_info.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        rungs = ", ".join(f"{m:g}: {len(r)}" for m, r in self._brackets[0].rungs)
        return f"Using AsyncHyperBand: num_stopped={self._num_stopped}; rungs {{{rungs}}}"


ASHAScheduler = AsyncHyperBandScheduler
