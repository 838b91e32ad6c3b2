"""What ``Tuner.fit()`` returns: a ``ResultGrid`` of per-trial ``Result``s."""
from __future__ import annotations

import math
from typing import Any, Iterator

from . import storage
from .checkpoint import Checkpoint
from .error import TuneError
from .search.variant_generator import flatten
from .trial import Trial

__all__ = ["Result", "ResultGrid"]


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("results as a DataFrame need pandas: pip install 'flowcore[tune]'"
                          ) from None
    return pandas


class Result:
    """One trial's outcome: its last ``metrics`` (with ``config``), newest
    ``checkpoint``, ``error`` (None unless it failed) and ``path``."""

    def __init__(self, metrics: dict | None, checkpoint: Checkpoint | None,
                 error: BaseException | None, path: str, metrics_history: list[dict] | None = None,
                 best_checkpoints: list[tuple[Checkpoint, dict]] | None = None,
                 _storage_filesystem: Any = None):
        self.metrics = metrics
        self.checkpoint = checkpoint
        self.error = error
        self.path = path
        self.best_checkpoints = best_checkpoints or []
        self.filesystem = _storage_filesystem
        self._history = metrics_history or []

    @classmethod
    def from_path(cls, path: str, storage_filesystem: Any = None) -> "Result":
        """The result of the trial whose directory is ``path`` (read from its
        ``result.json``, ``params.json``, ``checkpoint_*`` and ``error.txt``)."""
        import json

        fs, p = storage.resolve(path, storage_filesystem)
        if not storage.exists(fs, storage.join(p, "params.json")):
            raise ValueError(f"Result.from_path({path!r}): not a trial directory (no "
                             f"params.json)")
        config = json.loads(storage.read_bytes(fs, storage.join(p, "params.json")))
        history = []
        if storage.exists(fs, storage.join(p, "result.json")):
            for line in storage.read_bytes(fs, storage.join(p, "result.json")).splitlines():
                try:
                    history.append(json.loads(line))
                except ValueError:
                    continue  # a line torn by a crash
        names = [n for n in storage.list_dir(fs, p) if n.startswith("checkpoint_")]
        checkpoints = [Checkpoint(storage.join(p, n), fs) for n in names]
        by_name = {r.get("checkpoint_dir_name"): r for r in history}
        error = None
        if storage.exists(fs, storage.join(p, "error.txt")):
            error = TuneError(storage.read_bytes(fs, storage.join(p, "error.txt")).decode())
        metrics = dict(history[-1]) if history else {}
        if metrics:
            metrics["config"] = config
        return cls(metrics=metrics, checkpoint=checkpoints[-1] if checkpoints else None,
                   error=error, path=p, metrics_history=history,
                   best_checkpoints=[(c, by_name.get(n, {})) for c, n in zip(checkpoints,
                                                                            names)],
                   _storage_filesystem=fs)

    @property
    def config(self) -> dict | None:
        """The trial's config."""
        return (self.metrics or {}).get("config")

    @property
    def metrics_dataframe(self) -> Any:
        """Every reported result of the trial as a pandas DataFrame."""
        pd = _pandas()
        return pd.DataFrame([flatten({k: v for k, v in r.items() if k != "config"})
                             for r in self._history])

    def get_best_checkpoint(self, metric: str, mode: str) -> Checkpoint | None:
        if mode not in ("min", "max"):
            raise ValueError(f"get_best_checkpoint(mode={mode!r}): expected 'min' or 'max'")
        scored = [(m[metric], c) for c, m in self.best_checkpoints
                  if isinstance(m.get(metric), (int, float))]
        if not scored:
            return None
        return (max if mode == "max" else min)(scored, key=lambda p: p[0])[1]

    def __repr__(self) -> str:
        shown = {k: v for k, v in (self.metrics or {}).items()
                 if k not in ("config", "date", "timestamp", "pid", "hostname", "node_ip",
                              "checkpoint_dir_name", "trial_id", "time_since_restore",
                              "iterations_since_restore", "time_this_iter_s", "done")}
        return (f"Result(metrics={shown}, path={self.path!r}, "
                f"checkpoint={self.checkpoint!r}, error={self.error!r})")


class ResultGrid:
    """The results of all trials of an experiment (terminated, errored or
    left unfinished)."""

    def __init__(self, trials: list[Trial], *, metric: str | None, mode: str | None,
                 experiment_path: str, filesystem: Any):
        self._trials = list(trials)
        self._metric = metric
        self._mode = mode
        self.experiment_path = experiment_path
        self.filesystem = filesystem
        self._results = [self._to_result(t) for t in self._trials]

    @staticmethod
    def _to_result(trial: Trial) -> Result:
        mgr = trial.checkpoint_manager
        best = [(Checkpoint(e["path"], trial.storage_filesystem), e.get("metrics") or {})
                for e in (mgr.entries if mgr else [])]
        metrics = dict(trial.last_result) if trial.last_result else {}
        if metrics:
            metrics["config"] = trial.config
        return Result(metrics=metrics, checkpoint=trial.checkpoint,
                      error=trial.error if trial.status == Trial.ERROR else None,
                      path=trial.path, metrics_history=trial.results, best_checkpoints=best,
                      _storage_filesystem=trial.storage_filesystem)

    def get_best_result(self, metric: str | None = None, mode: str | None = None,
                        scope: str = "last", filter_nan_and_inf: bool = True) -> Result:
        """The result of the best trial by ``metric`` and ``mode`` (default:
        the TuneConfig's); ``scope`` is "last", "avg", "last-5-avg",
        "last-10-avg" or "all" (the best value a trial ever reported)."""
        metric = metric or self._metric
        mode = mode or self._mode
        if not metric:
            raise ValueError("get_best_result(): no metric; pass metric= or set "
                             "TuneConfig(metric=..., mode=...)")
        if not mode:
            raise ValueError("get_best_result(): no mode; pass mode='min' or 'max' or set "
                             "TuneConfig(metric=..., mode=...)")
        if mode not in ("min", "max"):
            raise ValueError(f"get_best_result(mode={mode!r}): expected 'min' or 'max'")
        if scope not in ("last", "avg", "last-5-avg", "last-10-avg", "all"):
            raise ValueError(f"get_best_result(scope={scope!r}): expected 'last', 'avg', "
                             f"'last-5-avg', 'last-10-avg' or 'all'")
        best: tuple[float, int] | None = None
        for i, trial in enumerate(self._trials):
            values = [r[metric] for r in trial.results
                      if isinstance(r.get(metric), (int, float)) and not isinstance(
                          r.get(metric), bool)]
            if not values and isinstance(trial.last_result.get(metric), (int, float)):
                values = [trial.last_result[metric]]
            if filter_nan_and_inf:
                values = [v for v in values if math.isfinite(v)]
            if not values:
                continue
            if scope == "last":
                score = values[-1]
            elif scope == "all":
                score = max(values) if mode == "max" else min(values)
            else:
                n = {"avg": len(values), "last-5-avg": 5, "last-10-avg": 10}[scope]
                tail = values[-n:]
                score = sum(tail) / len(tail)
            key = score if mode == "max" else -score
            if best is None or key > best[0]:
                best = (key, i)
        if best is None:
            reported = sorted({k for t in self._trials for k in t.last_result
                               if k != "config"})
            raise RuntimeError(f"no best trial for metric {metric!r}: no trial reported it"
                               f"{' (NaN/inf values are ignored)' if filter_nan_and_inf else ''}"
                               f". Reported keys: {reported}")
        return self._results[best[1]]

    def get_dataframe(self, filter_metric: str | None = None,
                      filter_mode: str | None = None) -> Any:
        """One row per trial: its last result (or, with ``filter_metric``
        and ``filter_mode``, its best) with ``config/<key>`` columns."""
        pd = _pandas()
        if (filter_metric is None) != (filter_mode is None):
            raise ValueError("get_dataframe(): pass both filter_metric and filter_mode, or "
                             "neither")
        if filter_mode is not None and filter_mode not in ("min", "max"):
            raise ValueError(f"get_dataframe(filter_mode={filter_mode!r}): expected 'min' or "
                             f"'max'")
        rows = []
        for trial in self._trials:
            row = trial.last_result
            if filter_metric is not None:
                scored = [r for r in trial.results
                          if isinstance(r.get(filter_metric), (int, float))]
                if scored:
                    pick = max if filter_mode == "max" else min
                    row = pick(scored, key=lambda r: r[filter_metric])
            if not row:
                continue
            flat = flatten({k: v for k, v in row.items() if k != "config"})
            flat.update(flatten({"config": trial.config}))
            flat["logdir"] = trial.dirname
            rows.append(flat)
        return pd.DataFrame(rows)

    @property
    def errors(self) -> list[BaseException]:
        """The errors of the trials that failed."""
        return [r.error for r in self._results if r.error is not None]

    @property
    def num_errors(self) -> int:
        return sum(1 for t in self._trials if t.status == Trial.ERROR)

    @property
    def num_terminated(self) -> int:
        return sum(1 for t in self._trials if t.status == Trial.TERMINATED)

    def __len__(self) -> int:
        return len(self._results)

    def __getitem__(self, i: int) -> Result:
        return self._results[i]

    def __iter__(self) -> Iterator[Result]:
        return iter(self._results)

    def __repr__(self) -> str:
        return (f"ResultGrid<{len(self)} trials: {self.num_terminated} terminated, "
                f"{self.num_errors} errored>")
