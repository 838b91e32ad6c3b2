"""The experiment settings: ``TuneConfig``, ``RunConfig``,
``CheckpointConfig`` and ``FailureConfig`` (Ray Tune's names and defaults,
except ``reuse_actors`` which is on by default)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .stopper import check_stop

__all__ = ["TuneConfig", "RunConfig", "CheckpointConfig", "FailureConfig"]


def _check_mode(where: str, mode: Any) -> None:
    if mode is not None and mode not in ("min", "max"):
        raise ValueError(f"{where}(mode={mode!r}): mode must be 'min' or 'max'")


def _check_int(where: str, name: str, v: Any, low: int, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{where}({name}={v!r}): expected an int >= {low}")


@dataclass
class TuneConfig:
    """How to search: metric/mode, the search algorithm and scheduler, how
    many samples and how many run at once."""

    mode: str | None = None
    metric: str | None = None
    search_alg: Any = None
    scheduler: Any = None
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    time_budget_s: float | None = None
    reuse_actors: bool = True
    trial_name_creator: Callable[[Any], str] | None = None
    trial_dirname_creator: Callable[[Any], str] | None = None

    def __post_init__(self) -> None:
        _check_mode("TuneConfig", self.mode)
        if self.metric is not None and not isinstance(self.metric, str):
            raise TypeError(f"TuneConfig(metric={self.metric!r}): expected the name of a "
                            f"reported metric (a string)")
        if self.mode is not None and self.metric is None:
            raise ValueError("TuneConfig(mode=...) without metric: name the reported metric "
                             "to optimize, e.g. TuneConfig(metric='loss', mode='min')")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) \
                or self.num_samples == 0 or self.num_samples < -1:
            raise ValueError(f"TuneConfig(num_samples={self.num_samples!r}): expected an int "
                             f">= 1 (or -1: until the search algorithm is finished)")
        _check_int("TuneConfig", "max_concurrent_trials", self.max_concurrent_trials, 1)
        if self.time_budget_s is not None and (isinstance(self.time_budget_s, bool) or not
                                               isinstance(self.time_budget_s, (int, float))
                                               or self.time_budget_s <= 0):
            raise ValueError(f"TuneConfig(time_budget_s={self.time_budget_s!r}): expected "
                             f"seconds > 0")
        if not isinstance(self.reuse_actors, bool):
            raise TypeError(f"TuneConfig(reuse_actors={self.reuse_actors!r}): expected a bool")


@dataclass
class CheckpointConfig:
    """Which checkpoints to keep and when class trainables save."""

    num_to_keep: int | None = None
    checkpoint_score_attribute: str | None = None
    checkpoint_score_order: str = "max"
    checkpoint_frequency: int = 0
    checkpoint_at_end: bool | None = None

    def __post_init__(self) -> None:
        _check_int("CheckpointConfig", "num_to_keep", self.num_to_keep, 1)
        if self.checkpoint_score_order not in ("min", "max"):
            raise ValueError(f"CheckpointConfig(checkpoint_score_order="
                             f"{self.checkpoint_score_order!r}): expected 'min' or 'max'")
        _check_int("CheckpointConfig", "checkpoint_frequency", self.checkpoint_frequency, 0,
                   allow_none=False)


@dataclass
class FailureConfig:
    """How often a failed trial is retried (from its last checkpoint);
    ``max_failures=-1``: without limit.  ``fail_fast=True`` ends the
    experiment at the first error (``"raise"``: and raises it)."""

    max_failures: int = 0
    fail_fast: bool | str = False

    def __post_init__(self) -> None:
        _check_int("FailureConfig", "max_failures", self.max_failures, -1, allow_none=False)
        if self.fail_fast not in (True, False, "raise"):
            raise ValueError(f"FailureConfig(fail_fast={self.fail_fast!r}): expected True, "
                             f"False or 'raise'")


@dataclass
class RunConfig:
    """Where results go and when trials stop."""

    name: str | None = None
    storage_path: str | None = None
    storage_filesystem: Any = None
    failure_config: FailureConfig | None = None
    checkpoint_config: CheckpointConfig | None = None
    sync_config: Any = None
    verbose: int | None = None
    stop: Any = None
    callbacks: list | None = None
    progress_reporter: Any = None
    log_to_file: bool | str | tuple = False

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name
                                      or "/" in self.name):
            raise ValueError(f"RunConfig(name={self.name!r}): expected a non-empty directory "
                             f"name without '/'")
        if self.storage_path is not None and not isinstance(self.storage_path,
                                                            (str, os.PathLike)):
            raise TypeError(f"RunConfig(storage_path=...) must be a path or URI, got "
                            f"{type(self.storage_path).__name__}")
        if self.failure_config is None:
            self.failure_config = FailureConfig()
        elif not isinstance(self.failure_config, FailureConfig):
            raise TypeError("RunConfig(failure_config=...) must be a tune.FailureConfig")
        if self.checkpoint_config is None:
            self.checkpoint_config = CheckpointConfig()
        elif not isinstance(self.checkpoint_config, CheckpointConfig):
            raise TypeError("RunConfig(checkpoint_config=...) must be a tune.CheckpointConfig")
        if self.verbose is not None and self.verbose not in (0, 1, 2, 3):
            raise ValueError(f"RunConfig(verbose={self.verbose!r}): expected 0, 1, 2 or 3")
        check_stop(self.stop)
        self.callbacks = list(self.callbacks or [])
