"""The two kinds of search algorithm.

``Searcher`` (Ray's spelling) suggests one config per call and learns from
results (Optuna, user searchers); ``SearchAlgorithm`` is what the
controller drives: it hands out the next config of the experiment or says
to wait or that it is finished.  ``SearchGenerator`` turns a Searcher into
a SearchAlgorithm that asks it ``num_samples`` times.
"""
from __future__ import annotations

import copy
import pickle
from typing import Any

from .variant_generator import flatten, has_search

__all__ = ["Searcher", "SearchAlgorithm", "SearchGenerator"]


class Searcher:
    """Base class of searchers: override ``suggest`` and
    ``on_trial_complete``; the others are optional."""

    FINISHED = "FINISHED"

    def __init__(self, metric: str | None = None, mode: str | None = None):
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"{type(self).__name__}(mode={mode!r}): mode must be 'min' or "
                             f"'max'")
        self._metric = metric
        self._mode = mode

    @property
    def metric(self) -> str | None:
        return self._metric

    @property
    def mode(self) -> str | None:
        return self._mode

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        """Take metric/mode/space from the Tuner when not given to the
        searcher; returns False if the searcher cannot accept them."""
        if self._metric is None and metric is not None:
            self._metric = metric
        if self._mode is None and mode is not None:
            self._mode = mode
        return True

    def suggest(self, trial_id: str) -> dict | None | str:
        """A config for a new trial, None to wait, or ``Searcher.FINISHED``."""
        raise NotImplementedError

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass

    def add_evaluated_point(self, parameters: dict, value: float, error: bool = False,
                            pruned: bool = False, intermediate_values: list | None = None
                            ) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not take evaluated points")

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def get_state(self) -> dict:
        return dict(self.__dict__)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)


class SearchAlgorithm:
    """What the controller asks for new trials."""

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return True

    def next_config(self, trial_id: str) -> dict | None | str:
        """The next config, None (wait) or Searcher.FINISHED."""
        raise NotImplementedError

    def total_samples(self) -> int | None:
        return None

    def is_finished(self) -> bool:
        raise NotImplementedError

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass

    def get_state(self) -> Any:
        return self.__dict__

    def set_state(self, state: Any) -> None:
        self.__dict__.update(state)


class SearchGenerator(SearchAlgorithm):
    """Asks a Searcher for ``num_samples`` configs (merging the constant
    parts of param_space into each suggestion)."""

    def __init__(self, searcher: Searcher):
        if not isinstance(searcher, Searcher):
            raise TypeError(f"search_alg must be a Searcher or SearchAlgorithm, got "
                            f"{type(searcher).__name__}")
        self.searcher = searcher
        self.num_samples = 1
        self.suggested = 0
        self.finished = False
        self.constants: dict = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        self.num_samples = int(spec.get("num_samples", 1))
        if any(k.endswith("grid_search") for k in flatten(config)):
            raise ValueError(f"{type(self.searcher).__name__} cannot expand tune.grid_search; "
                             f"use tune.choice([...]) in param_space, or no search_alg")
        self.constants = {k: v for k, v in config.items() if not has_search({k: v})}
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def total_samples(self) -> int | None:
        return self.num_samples if self.num_samples >= 0 else None

    def next_config(self, trial_id: str) -> dict | None | str:
        if self.finished or (0 <= self.num_samples <= self.suggested):
            self.finished = True
            return Searcher.FINISHED
        suggestion = self.searcher.suggest(trial_id)
        if suggestion == Searcher.FINISHED:
            self.finished = True
            return Searcher.FINISHED
        if suggestion is None:
            return None
        if not isinstance(suggestion, dict):
            raise TypeError(f"{type(self.searcher).__name__}.suggest() returned {suggestion!r}; "
                            f"it must return a config dict, None or Searcher.FINISHED")
        self.suggested += 1
        config = copy.deepcopy(self.constants)
        _deep_update(config, suggestion)
        return config

    def is_finished(self) -> bool:
        return self.finished or 0 <= self.num_samples <= self.suggested

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)


def _deep_update(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_update(into[k], v)
        else:
            into[k] = v
