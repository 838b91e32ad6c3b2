"""``ConcurrencyLimiter``: at most ``max_concurrent`` trials of a Searcher
run at once (new suggestions wait until one finishes)."""
from __future__ import annotations

from typing import Any

from .searcher import Searcher

__all__ = ["ConcurrencyLimiter"]


class ConcurrencyLimiter(Searcher):
    """Wrap ``searcher`` so it has at most ``max_concurrent`` live trials.

    With ``batch=True`` new suggestions wait until the whole current batch
    has completed."""

    def __init__(self, searcher: Searcher, max_concurrent: int, batch: bool = False):
        if not isinstance(searcher, Searcher):
            raise TypeError(f"ConcurrencyLimiter(searcher=...) needs a Searcher, got "
                            f"{type(searcher).__name__}")
        if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool) \
                or max_concurrent < 1:
            raise ValueError(f"ConcurrencyLimiter(max_concurrent={max_concurrent!r}): expected "
                             f"an int >= 1")
        self.searcher = searcher
        self.max_concurrent = max_concurrent
        self.batch = batch
        self.live_trials: set[str] = set()
        self.num_unfinished_live_trials = 0
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def suggest(self, trial_id: str) -> dict | None | str:
        if len(self.live_trials) >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if isinstance(suggestion, dict):
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.live_trials:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.live_trials:
            return
        self.searcher.on_trial_complete(trial_id, result=result, error=error)
        self.num_unfinished_live_trials -= 1
        if not self.batch or self.num_unfinished_live_trials == 0:
            if self.batch:
                self.live_trials.clear()
            else:
                self.live_trials.discard(trial_id)

    def get_state(self) -> dict:
        return {"live_trials": set(self.live_trials),
                "num_unfinished_live_trials": self.num_unfinished_live_trials,
                "searcher": self.searcher.get_state()}

    def set_state(self, state: dict) -> None:
        self.live_trials = set(state["live_trials"])
        self.num_unfinished_live_trials = state["num_unfinished_live_trials"]
        self.searcher.set_state(state["searcher"])
