"""Trainables: the class API (``tune.Trainable``), ``with_parameters`` and
``with_resources``, and the clock that fills in the automatic result keys
(``training_iteration``, ``time_total_s`` and the rest)."""
from __future__ import annotations

import copy
import datetime
import functools
import inspect
import os
import socket
import time
from typing import Any

import flowcore

from .resources import PlacementGroupFactory, normalize

__all__ = ["Trainable", "with_parameters", "with_resources", "is_class_trainable",
           "trainable_name", "resource_request"]

_NODE_IP: str | None = None


def _node_ip() -> str:
    global _NODE_IP
    if _NODE_IP is None:
        try:
            _NODE_IP = socket.gethostbyname(socket.gethostname())
        except OSError:
            _NODE_IP = "127.0.0.1"
    return _NODE_IP


class ResultClock:
    """Counts iterations and time of one trial run and stamps results."""

    def __init__(self, iteration: int = 0, time_total: float = 0.0):
        self.iteration = iteration
        self.time_total = time_total
        self.since_restore = 0
        self.time_since_restore = 0.0
        self.last = time.monotonic()

    def stamp(self, metrics: dict, checkpoint_dir_name: str | None = None) -> dict:
        now = time.monotonic()
        dt = now - self.last
        self.last = now
        self.iteration += 1
        self.since_restore += 1
        self.time_total += dt
        self.time_since_restore += dt
        result = dict(metrics)
        wall = time.time()
        result.update({
            "timestamp": int(wall),
            "checkpoint_dir_name": checkpoint_dir_name,
            "done": bool(metrics.get("done", False)),
            "training_iteration": self.iteration,
            "date": datetime.datetime.fromtimestamp(wall).strftime("%Y-%m-%d_%H-%M-%S"),
            "time_this_iter_s": dt,
            "time_total_s": self.time_total,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "node_ip": _node_ip(),
            "time_since_restore": self.time_since_restore,
            "iterations_since_restore": self.since_restore,
        })
        return result


class Trainable:
    """The class API: override ``setup(config)``, ``step() -> dict``, and for
    checkpoints ``save_checkpoint(checkpoint_dir) -> dict | None`` and
    ``load_checkpoint(checkpoint)``; optionally ``reset_config(new_config)
    -> bool`` (reuse this object for another config) and ``cleanup()``."""

    def __init__(self, config: dict | None = None, logger_creator: Any = None,
                 storage: Any = None, **_trial_info: Any):
        self.config = config if config is not None else {}
        info = _trial_info.get("trial_info") or {}
        self._trial_info = info
        self._clock = ResultClock(info.get("iteration", 0), info.get("time_total", 0.0))
        self.setup(copy.deepcopy(self.config))

    # -- identity --------------------------------------------------------
    @property
    def trial_id(self) -> str:
        return self._trial_info.get("trial_id", "default")

    @property
    def trial_name(self) -> str:
        return self._trial_info.get("trial_name", "default")

    @property
    def trial_resources(self) -> Any:
        return self._trial_info.get("resources")

    @property
    def logdir(self) -> str:
        return self._trial_info.get("trial_dir", "")

    @property
    def iteration(self) -> int:
        return self._clock.iteration

    @property
    def training_iteration(self) -> int:
        return self._clock.iteration

    # -- what the worker calls -------------------------------------------
    def train(self) -> dict:
        """Run one ``step()`` and return its result with the automatic keys."""
        result = self.step()
        if not isinstance(result, dict):
            raise TypeError(f"{type(self).__name__}.step() must return a dict of metrics, got "
                            f"{type(result).__name__}")
        return self._clock.stamp(result)

    def stop(self) -> None:
        self.cleanup()

    # -- to override -----------------------------------------------------
    def setup(self, config: dict) -> None:
        pass

    def step(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement step()")

    def save_checkpoint(self, checkpoint_dir: str) -> dict | None:
        raise NotImplementedError(f"{type(self).__name__} must implement save_checkpoint() to "
                                  f"be checkpointed")

    def load_checkpoint(self, checkpoint: dict | str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement load_checkpoint() to "
                                  f"be restored")

    def reset_config(self, new_config: dict) -> bool:
        return False

    def cleanup(self) -> None:
        pass

    @classmethod
    def default_resource_request(cls, config: dict) -> Any:
        return None


def is_class_trainable(trainable: Any) -> bool:
    return inspect.isclass(trainable) and issubclass(trainable, Trainable)


def check_trainable(trainable: Any) -> None:
    if is_class_trainable(trainable):
        return
    if inspect.isclass(trainable):
        raise TypeError(f"trainable class {trainable.__name__} must subclass tune.Trainable")
    if isinstance(trainable, str):
        raise TypeError(f"trainable {trainable!r}: registered trainable names are not supported; "
                        f"pass the function or tune.Trainable subclass itself")
    if not callable(trainable):
        raise TypeError(f"trainable must be a function taking config or a tune.Trainable "
                        f"subclass, got {type(trainable).__name__}")
    try:
        params = [p for p in inspect.signature(trainable).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return
    if not params and not any(p.kind == p.VAR_POSITIONAL for p in
                              inspect.signature(trainable).parameters.values()):
        raise TypeError(f"trainable {trainable_name(trainable)}() must take the trial's config "
                        f"as its argument: def {trainable_name(trainable)}(config): ...")


def trainable_name(trainable: Any) -> str:
    name = getattr(trainable, "__name__", None) or type(trainable).__name__
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "trainable"


def resource_request(trainable: Any, config: dict | None = None) -> Any:
    """The resources of one trial of ``trainable`` (default one CPU)."""
    res = getattr(trainable, "_tune_resources", None)
    if callable(res) and not isinstance(res, PlacementGroupFactory):
        res = res(config or {})
    if res is None and is_class_trainable(trainable):
        res = trainable.default_resource_request(config or {})
    return normalize(res)


def with_resources(trainable: Any, resources: Any) -> Any:
    """``trainable`` asking for ``resources`` per trial: a dict such as
    ``{"cpu": 2, "gpu": 1}``, a ``PlacementGroupFactory``, or a function
    ``config -> either``."""
    check_trainable(trainable)
    if not callable(resources) or isinstance(resources, PlacementGroupFactory):
        normalize(resources)  # errors now, not when a trial starts
    if is_class_trainable(trainable):
        return type(trainable.__name__, (trainable,), {"_tune_resources": resources,
                                                       "__module__": trainable.__module__})

    @functools.wraps(trainable)
    def wrapped(config: dict, *args: Any, **kwargs: Any) -> Any:
        return trainable(config, *args, **kwargs)
    wrapped._tune_resources = resources  # type: ignore[attr-defined]
    return wrapped


def with_parameters(trainable: Any, **kwargs: Any) -> Any:
    """``trainable`` with extra arguments that are stored once in the
    object store (``flowcore.put``) and fetched by each trial, instead of
    being pickled with every trial."""
    check_trainable(trainable)
    refs = {k: flowcore.put(v) for k, v in kwargs.items()}
    res = getattr(trainable, "_tune_resources", None)

    def fetch() -> dict[str, Any]:
        return {k: flowcore.get(r) for k, r in refs.items()}

    if is_class_trainable(trainable):
        def setup(self: Any, config: dict) -> None:
            trainable.setup(self, config, **fetch())
        return type(trainable.__name__, (trainable,), {"setup": setup, "_tune_refs": refs,
                                                       "__module__": trainable.__module__})

    @functools.wraps(trainable)
    def inner(config: dict) -> Any:
        return trainable(config, **fetch())
    inner._tune_refs = refs  # type: ignore[attr-defined]
    if res is not None:
        inner._tune_resources = res  # type: ignore[attr-defined]
    return inner
