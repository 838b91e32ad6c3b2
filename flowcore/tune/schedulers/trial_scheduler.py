"""The scheduler interface (``TrialScheduler``) and ``FIFOScheduler``.

On each result the controller asks the scheduler whether the trial goes
on (``CONTINUE``), pauses (``PAUSE``) or stops (``STOP``); the scheduler
also picks which waiting trial starts next."""
from __future__ import annotations

from typing import Any

__all__ = ["TrialScheduler", "FIFOScheduler"]


class TrialScheduler:
    """Base class of trial schedulers."""

    CONTINUE = "CONTINUE"
    PAUSE = "PAUSE"
    STOP = "STOP"
    NOOP = "NOOP"

    _metric: str | None = None
    _mode: str | None = None
    _supports_buffered_results = True
    #: results of finished trials may be fed again after a restore
    _replay_on_restore = True
    #: needs a metric to work
    _needs_metric = False

    @property
    def metric(self) -> str | None:
        return self._metric

    @property
    def mode(self) -> str | None:
        return self._mode

    def _init_metric_mode(self, metric: str | None, mode: str | None) -> None:
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"{type(self).__name__}(mode={mode!r}): mode must be 'min' or 'max'")
        self._metric, self._mode = metric, mode

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Take metric/mode from TuneConfig unless the scheduler has its own."""
        if self._metric and metric and self._metric != metric:
            raise ValueError(f"{type(self).__name__} was created with metric="
                             f"{self._metric!r} but TuneConfig(metric={metric!r}); set it in "
                             f"one place")
        if self._mode and mode and self._mode != mode:
            raise ValueError(f"{type(self).__name__} was created with mode={self._mode!r} but "
                             f"TuneConfig(mode={mode!r}); set it in one place")
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        if self._needs_metric and not (self._metric and self._mode):
            raise ValueError(f"{type(self).__name__} needs a metric and a mode: pass "
                             f"TuneConfig(metric='loss', mode='min') or "
                             f"{type(self).__name__}(metric=..., mode=...)")
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        pass

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        pass

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        pass

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        pass

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """The next trial to start: the oldest PENDING, then the oldest PAUSED."""
        for status in ("PENDING", "PAUSED"):
            for trial in tune_controller.get_trials():
                if trial.status == status and tune_controller.can_start(trial):
                    return trial
        return None

    def debug_string(self) -> str:
        return type(self).__name__

    def _score(self, result: dict) -> float | None:
        v = result.get(self._metric) if self._metric else None
        if v is None:
            return None
        return float(v) if self._mode == "max" else -float(v)


class FIFOScheduler(TrialScheduler):
    """Run trials in the order they were added; never stop one early."""

    def __init__(self) -> None:
        pass

    def debug_string(self) -> str:
        return "Using FIFO scheduling algorithm."
