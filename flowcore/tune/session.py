"""What a trial sees while it runs: ``tune.report``, ``tune.get_checkpoint``
and ``tune.get_context``.

A trial worker process runs one trial at a time; the trial's session is
set here while it runs (the function trainable runs on its own thread, so
this is a process-wide slot, not a thread-local)."""
from __future__ import annotations

from typing import Any, Callable

from .checkpoint import Checkpoint

__all__ = ["report", "get_checkpoint", "get_context", "TuneContext"]


class TuneContext:
    """Facts about the running trial."""

    def __init__(self, info: dict[str, Any]):
        self._info = info

    def get_trial_id(self) -> str:
        return self._info["trial_id"]

    def get_trial_name(self) -> str:
        return self._info["trial_name"]

    def get_trial_dir(self) -> str:
        return self._info["trial_dir"]

    def get_experiment_name(self) -> str:
        return self._info["experiment_name"]

    def get_trial_resources(self) -> dict[str, float]:
        return dict(self._info.get("resources") or {})

    def get_storage(self) -> Any:
        return self._info.get("filesystem")

    def __repr__(self) -> str:
        return f"TuneContext(trial_id={self.get_trial_id()!r})"


class _TrialSession:
    def __init__(self, info: dict[str, Any], checkpoint: Checkpoint | None,
                 reporter: Callable[[dict, Checkpoint | None], None]):
        self.info = info
        self.checkpoint = checkpoint
        self.reporter = reporter


_session: _TrialSession | None = None


def _set(session: _TrialSession | None) -> None:
    global _session
    _session = session


def _require(fn: str) -> _TrialSession:
    if _session is None:
        raise RuntimeError(f"tune.{fn}() was called outside a Tune trial: call it inside the "
                           f"trainable function passed to tune.Tuner(...)")
    return _session


def report(metrics: dict, *, checkpoint: Checkpoint | None = None) -> None:
    """Report ``metrics`` (a dict) for this iteration, optionally with a
    checkpoint directory, which is copied to the experiment's storage
    before this returns.  Each call is one ``training_iteration``."""
    s = _require("report")
    if not isinstance(metrics, dict):
        raise TypeError(f"tune.report() takes a dict of metrics, got {type(metrics).__name__}; "
                        f"write tune.report({{'loss': value}})")
    for k in metrics:
        if not isinstance(k, str):
            raise TypeError(f"tune.report(): metric names must be strings, got {k!r}")
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"tune.report(checkpoint=...) takes a tune.Checkpoint (e.g. "
                        f"Checkpoint.from_directory(dir)), got {type(checkpoint).__name__}")
    s.reporter(metrics, checkpoint)


def get_checkpoint() -> Checkpoint | None:
    """The checkpoint to resume from (after a failure, a restore or a PBT
    exploit), else None."""
    return _require("get_checkpoint").checkpoint


def get_context() -> TuneContext:
    """The running trial's id, name, directory and resources."""
    return TuneContext(_require("get_context").info)
