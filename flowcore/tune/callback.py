"""``tune.Callback``: hooks the experiment loop calls (Ray Tune's names).

Pass instances in ``RunConfig(callbacks=[...])``; override the hooks you
need.  Hooks run in the driver, inside the loop: keep them short."""
from __future__ import annotations

from typing import Any

__all__ = ["Callback"]


class Callback:
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        pass

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        pass

    def on_trial_complete(self, iteration: int, trials: list, trial: Any,
                          **info: Any) -> None:
        pass

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        pass

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        pass
