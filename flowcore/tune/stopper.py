"""When trials (or the whole experiment) stop: ``RunConfig(stop=...)``
takes a dict of result thresholds, a function ``(trial_id, result) -> bool``
or a :class:`Stopper`."""
from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["Stopper", "MaximumIterationStopper", "TimeoutStopper", "FunctionStopper",
           "CombinedStopper", "check_stop", "make_stopper"]


class Stopper:
    """Override ``__call__(trial_id, result) -> bool`` (stop this trial) and
    ``stop_all() -> bool`` (stop the experiment)."""

    def __call__(self, trial_id: str, result: dict) -> bool:
        raise NotImplementedError

    def stop_all(self) -> bool:
        return False


class MaximumIterationStopper(Stopper):
    """Stop each trial after ``max_iter`` reports."""

    def __init__(self, max_iter: int):
        self._max_iter = max_iter

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result.get("training_iteration", 0) >= self._max_iter


class TimeoutStopper(Stopper):
    """Stop the experiment after ``timeout`` seconds."""

    def __init__(self, timeout: float):
        self._deadline = time.monotonic() + float(timeout)

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return time.monotonic() >= self._deadline


class FunctionStopper(Stopper):
    def __init__(self, fn: Callable[[str, dict], bool]):
        self._fn = fn

    def __call__(self, trial_id: str, result: dict) -> bool:
        return bool(self._fn(trial_id, result))


class CombinedStopper(Stopper):
    """Stop when any of ``stoppers`` says so."""

    def __init__(self, *stoppers: Stopper):
        self._stoppers = stoppers

    def __call__(self, trial_id: str, result: dict) -> bool:
        return any(s(trial_id, result) for s in self._stoppers)

    def stop_all(self) -> bool:
        return any(s.stop_all() for s in self._stoppers)


class _DictStopper(Stopper):
    """``{"key": threshold}``: stop once any result[key] >= threshold."""

    def __init__(self, criteria: dict):
        self.criteria = dict(criteria)

    def __call__(self, trial_id: str, result: dict) -> bool:
        for key, limit in self.criteria.items():
            value = _lookup(result, key)
            if value is _MISSING:
                raise ValueError(f"RunConfig(stop={{{key!r}: ...}}): the trial's result has no "
                                 f"{key!r}; reported keys: {sorted(result)}")
            if value is not None and value >= limit:
                return True
        return False


_MISSING = object()


def _lookup(result: dict, key: str) -> Any:
    if key in result:
        return result[key]
    cur: Any = result
    for part in key.split("/"):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, Stopper) or callable(stop):
        return
    if isinstance(stop, dict):
        for k, v in stop.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"RunConfig(stop={stop!r}): a stop dict maps result keys to "
                                f"numbers, e.g. {{'training_iteration': 10}}")
        return
    raise TypeError(f"RunConfig(stop=...) must be a dict, a function (trial_id, result) -> bool "
                    f"or a tune.Stopper, got {type(stop).__name__}")


def make_stopper(stop: Any) -> Stopper | None:
    if stop is None:
        return None
    if isinstance(stop, Stopper):
        return stop
    if isinstance(stop, dict):
        return _DictStopper(stop) if stop else None
    return FunctionStopper(stop)
