"""flowcore.tune: hyperparameter search with Ray Tune's API.

``Tuner(trainable, param_space=..., tune_config=TuneConfig(...),
run_config=RunConfig(...)).fit()`` runs trials in reused worker actors,
stops poor ones early with a scheduler, checkpoints them to local or
``pyarrow.fs`` storage and can be restored after a crash.  See
docs/tune.md.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Tuner": "tuner", "TuneConfig": "config", "RunConfig": "config",
    "CheckpointConfig": "config", "FailureConfig": "config", "Checkpoint": "checkpoint",
    "report": "session", "get_checkpoint": "session", "get_context": "session",
    "TuneContext": "session", "Trainable": "trainable", "with_parameters": "trainable",
    "with_resources": "trainable", "PlacementGroupFactory": "resources",
    "ResultGrid": "result_grid", "Result": "result_grid", "Stopper": "stopper",
    "TuneError": "error", "Trial": "trial", "Callback": "callback",
    "grid_search": "search.sample", "choice": "search.sample", "uniform": "search.sample",
    "quniform": "search.sample", "loguniform": "search.sample",
    "qloguniform": "search.sample", "randint": "search.sample", "qrandint": "search.sample",
    "lograndint": "search.sample", "qlograndint": "search.sample", "randn": "search.sample",
    "qrandn": "search.sample", "sample_from": "search.sample",
}
_SUBMODULES = {"schedulers", "search", "stopper"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flowcore.tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
