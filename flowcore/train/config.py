"""Run configuration of flowcore.train, spelled as Ray Train 2.60 spells it:
``ScalingConfig``, ``RunConfig``, ``CheckpointConfig``, ``FailureConfig``.

Every config checks its values when it is made, so a bad value fails at the
line that wrote it, with a message naming the field and the fix.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ScalingConfig:
    """How many training workers to run and what each one holds.

    ``num_workers`` actors are started in one placement group (one bundle per
    worker, ``placement_strategy``); each reserves ``resources_per_worker``
    (default ``{"CPU": 1}``, plus ``{"GPU": 1}`` with ``use_gpu``).
    ``trainer_resources`` is accepted for compatibility: the coordinator runs
    in the calling process and holds no resources.
    """

    trainer_resources: Optional[dict] = None
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: Optional[dict] = None
    placement_strategy: str = "PACK"
    accelerator_type: Optional[str] = None

    def __post_init__(self) -> None:
        if not _is_int(self.num_workers) or self.num_workers < 1:
            raise ValueError(
                f"ScalingConfig(num_workers={self.num_workers!r}): expected an integer >= 1 "
                f"(the number of training worker processes), e.g. ScalingConfig(num_workers=2)")
        if not isinstance(self.use_gpu, bool):
            raise TypeError(f"ScalingConfig(use_gpu={self.use_gpu!r}): expected True or False")
        if self.placement_strategy not in _STRATEGIES:
            raise ValueError(f"ScalingConfig(placement_strategy={self.placement_strategy!r}): "
                             f"expected one of {', '.join(_STRATEGIES)}")
        if self.resources_per_worker is not None:
            if not isinstance(self.resources_per_worker, dict):
                raise TypeError("ScalingConfig(resources_per_worker=...): expected a dict such as "
                                "{'CPU': 1, 'GPU': 1}")
            for key, amount in self.resources_per_worker.items():
                if (not isinstance(key, str) or isinstance(amount, bool)
                        or not isinstance(amount, (int, float)) or amount < 0
                        or not math.isfinite(amount)):
                    raise ValueError(f"ScalingConfig(resources_per_worker="
                                     f"{{{key!r}: {amount!r}}}): expected resource names "
                                     f"mapped to numbers >= 0")
        if self.accelerator_type is not None:
            raise ValueError("ScalingConfig(accelerator_type=...) is not supported by flowcore: "
                             "ask for GPUs with use_gpu=True or resources_per_worker")

    @property
    def _resources_per_worker_not_none(self) -> dict:
        res = dict(self.resources_per_worker or {})
        res.setdefault("CPU", 1)
        if self.use_gpu:
            res.setdefault("GPU", 1)
        return {k: float(v) for k, v in res.items() if v}

    @property
    def num_cpus_per_worker(self) -> float:
        return self._resources_per_worker_not_none.get("CPU", 0.0)

    @property
    def num_gpus_per_worker(self) -> float:
        return self._resources_per_worker_not_none.get("GPU", 0.0)

    @property
    def additional_resources_per_worker(self) -> dict:
        return {k: v for k, v in self._resources_per_worker_not_none.items()
                if k not in ("CPU", "GPU")}

    @property
    def total_resources(self) -> dict:
        return {k: v * self.num_workers for k, v in self._resources_per_worker_not_none.items()}


@dataclass
class CheckpointConfig:
    """Which reported checkpoints stay in storage.

    ``num_to_keep`` (default ``None``: all) keeps that many: the best by
    ``checkpoint_score_attribute`` (``checkpoint_score_order`` ``"max"`` or
    ``"min"``) when given, else the newest; the newest is always kept too, so
    a restart can resume from it.
    """

    num_to_keep: Optional[int] = None
    checkpoint_score_attribute: Optional[str] = None
    checkpoint_score_order: str = "max"

    def __post_init__(self) -> None:
        if self.num_to_keep is not None and (not _is_int(self.num_to_keep)
                                             or self.num_to_keep < 1):
            raise ValueError(f"CheckpointConfig(num_to_keep={self.num_to_keep!r}): expected None "
                             f"(keep all) or an integer >= 1")
        if self.checkpoint_score_order not in ("max", "min"):
            raise ValueError(f"CheckpointConfig(checkpoint_score_order="
                             f"{self.checkpoint_score_order!r}): expected 'max' or 'min'")


@dataclass
class FailureConfig:
    """How often a run restarts its worker group after a failure (a worker
    process or node died, or the training function raised): ``max_failures``
    times (``0``: never, ``-1``: without limit), each time from the latest
    reported checkpoint."""

    max_failures: int = 0
    fail_fast: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_failures) or self.max_failures < -1:
            raise ValueError(f"FailureConfig(max_failures={self.max_failures!r}): expected an "
                             f"integer >= 0, or -1 for no limit")


def _default_storage_path() -> str:
    return os.environ.get("FLOWCORE_TRAIN_STORAGE_PATH",
                          os.path.join(os.path.expanduser("~"), "flowcore_results"))


@dataclass
class RunConfig:
    """Where and how a run keeps its results.

    ``storage_path`` (default ``~/flowcore_results``, or the environment
    variable ``FLOWCORE_TRAIN_STORAGE_PATH``) is a local directory, a URI a
    ``pyarrow.fs`` filesystem understands (``s3://bucket/dir``), or a path on
    ``storage_filesystem``. The run writes under ``storage_path/name``.
    ``worker_runtime_env`` is the ``runtime_env`` of the worker actors.
    """

    name: Optional[str] = None
    storage_path: Optional[str] = None
    storage_filesystem: Any = None
    failure_config: Optional[FailureConfig] = None
    checkpoint_config: Optional[CheckpointConfig] = None
    callbacks: Optional[list] = None
    verbose: Optional[int] = None
    worker_runtime_env: Optional[dict] = field(default=None)

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name
                                      or "/" in self.name):
            raise ValueError(f"RunConfig(name={self.name!r}): expected a non-empty name "
                             f"without '/'")
        if self.storage_path is not None:
            if not isinstance(self.storage_path, (str, os.PathLike)):
                raise TypeError(f"RunConfig(storage_path={self.storage_path!r}): expected a path "
                                f"or URI string")
            self.storage_path = os.fspath(self.storage_path)
        if self.failure_config is None:
            self.failure_config = FailureConfig()
        if self.checkpoint_config is None:
            self.checkpoint_config = CheckpointConfig()
        if not isinstance(self.failure_config, FailureConfig):
            raise TypeError("RunConfig(failure_config=...): expected a FailureConfig")
        if not isinstance(self.checkpoint_config, CheckpointConfig):
            raise TypeError("RunConfig(checkpoint_config=...): expected a CheckpointConfig")
        if self.callbacks:
            raise ValueError("RunConfig(callbacks=...) is not supported by flowcore.train: read "
                             "the metrics from Result.metrics_dataframe after fit()")
        if self.storage_path is None:
            self.storage_path = _default_storage_path()
