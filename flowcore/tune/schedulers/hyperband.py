"""``HyperBandScheduler``: synchronous HyperBand.

New trials fill brackets; bracket ``s`` starts ``n`` trials that each run
``r`` units of ``time_attr``, then pause.  When every trial of the bracket
has reached the milestone, the best ``1/reduction_factor`` of them go on
for ``reduction_factor`` times longer and the rest stop, until ``max_t``.
Paused trials resume from their checkpoint (a class trainable is saved when
it pauses; a function trainable resumes from its newest reported
checkpoint, or from the start without one).
"""
from __future__ import annotations

import math
from typing import Any

from .trial_scheduler import TrialScheduler

__all__ = ["HyperBandScheduler"]


class _Bracket:
    def __init__(self, n: int, r: float, max_t: float, eta: float):
        self.capacity = n
        self.milestone = r
        self.max_t = max_t
        self.eta = eta
        self.trials: list[Any] = []  # live members, in the order they joined
        self.reached: dict[str, float] = {}  # trial_id -> score at the milestone
        self.finished: set[str] = set()
        self.go_on: set[str] = set()  # paused trials promoted to the next rung

    def full(self) -> bool:
        return len(self.trials) >= self.capacity

    def live(self) -> list[Any]:
        return [t for t in self.trials if t.trial_id not in self.finished]


class HyperBandScheduler(TrialScheduler):
    """Synchronous HyperBand (successive halving over several brackets)."""

    _needs_metric = True
    _replay_on_restore = False

    def __init__(self, time_attr: str = "training_iteration", metric: str | None = None,
                 mode: str | None = None, max_t: float = 81, reduction_factor: float = 3,
                 stop_last_trials: bool = True):
        if max_t <= 0:
            raise ValueError(f"HyperBandScheduler(max_t={max_t}): must be > 0")
        if reduction_factor <= 1:
            raise ValueError(f"HyperBandScheduler(reduction_factor={reduction_factor}): must "
                             f"be > 1")
        self._init_metric_mode(metric, mode)
        self._time_attr = time_attr
        self._max_t = max_t
        self._eta = reduction_factor
        self._stop_last_trials = stop_last_trials
        self._s_max_1 = int(round(math.log(max_t) / math.log(reduction_factor))) + 1
        self._next_s = self._s_max_1 - 1
        self._brackets: list[_Bracket] = []
        self._of: dict[str, _Bracket] = {}
        self._num_stopped = 0

    def _new_bracket(self) -> _Bracket:
        s = self._next_s
        self._next_s = self._next_s - 1 if self._next_s > 0 else self._s_max_1 - 1
        n = int(math.ceil(self._s_max_1 / (s + 1) * self._eta ** s))
        r = self._max_t * self._eta ** (-s)
        b = _Bracket(n, r, self._max_t, self._eta)
        self._brackets.append(b)
        return b

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if trial.trial_id in self._of:
            return
        b = next((b for b in self._brackets if not b.full()), None)
        if b is None:
            b = self._new_bracket()
        b.trials.append(trial)
        self._of[trial.trial_id] = b

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        b = self._of.get(trial.trial_id)
        if b is None or self._time_attr not in result:
            return self.CONTINUE
        t = result[self._time_attr]
        if t >= self._max_t and self._stop_last_trials:
            return self.STOP
        if t < b.milestone:
            return self.CONTINUE
        score = self._score(result)
        b.reached[trial.trial_id] = float("-inf") if score is None else score
        b.go_on.discard(trial.trial_id)
        self._maybe_halve(tune_controller, b, deciding=trial)
        if trial.trial_id in b.finished:
            return self.STOP
        if trial.trial_id in b.go_on:
            b.go_on.discard(trial.trial_id)
            return self.CONTINUE
        return self.PAUSE

    def _maybe_halve(self, tune_controller: Any, b: _Bracket, deciding: Any) -> None:
        live = b.live()
        if not b.full() and not getattr(tune_controller, "search_finished", True):
            return  # more trials will join this bracket
        if not live or any(t.trial_id not in b.reached for t in live):
            return
        ranked = sorted(live, key=lambda t: b.reached[t.trial_id], reverse=True)
        keep = max(1, int(len(ranked) / b.eta))
        for t in ranked[keep:]:
            b.finished.add(t.trial_id)
            self._num_stopped += 1
            if t is not deciding:
                tune_controller.stop_paused_trial(t)
        b.milestone = min(b.milestone * b.eta, b.max_t)
        b.reached = {}
        for t in ranked[:keep]:
            b.go_on.add(t.trial_id)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._drop(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._drop(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._drop(tune_controller, trial)

    def _drop(self, tune_controller: Any, trial: Any) -> None:
        b = self._of.get(trial.trial_id)
        if b is None:
            return
        b.finished.add(trial.trial_id)
        b.reached.pop(trial.trial_id, None)
        self._maybe_halve(tune_controller, b, deciding=None)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        for trial in tune_controller.get_trials():
            if trial.status == "PENDING" and tune_controller.can_start(trial):
                return trial
        for trial in tune_controller.get_trials():
            b = self._of.get(trial.trial_id)
            if trial.status == "PAUSED" and b is not None and trial.trial_id in b.go_on \
                    and tune_controller.can_start(trial):
                return trial
        return None

    def debug_string(self) -> str:
        return (f"Using HyperBand: {len(self._brackets)} brackets, "
                f"num_stopped={self._num_stopped}")
