"""``Result`` of ``fit()`` and the run's checkpoint bookkeeping.

``CheckpointManager`` registers each checkpoint once every rank has made
that report, and deletes the ones ``CheckpointConfig.num_to_keep`` no longer
keeps (never the newest, which a restart resumes from).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .checkpoint import Checkpoint, resolve_filesystem
from .config import CheckpointConfig


def pafs_local() -> type:
    import pyarrow.fs as pafs
    return pafs.LocalFileSystem


class TrainingFailedError(RuntimeError):
    """The run failed and its ``FailureConfig.max_failures`` were used up."""


class WorkerGroupError(TrainingFailedError):
    """A training worker raised, or its process or node died."""

    setup = False       # True when the workers' process group could not be set up


class BackendSetupError(RuntimeError):
    """A worker could not set up the run's process group (for example the
    rendezvous port was taken meanwhile); the group is started again."""


@dataclass
class Result:
    """What a run produced: rank 0's last ``metrics``, the newest
    ``checkpoint``, the ``error`` if it failed, the run's ``path`` in
    ``filesystem``, and ``best_checkpoints`` (the kept ones with their
    metrics)."""

    metrics: Optional[dict[str, Any]]
    checkpoint: Optional[Checkpoint]
    error: Optional[BaseException]
    path: str
    filesystem: Any = None
    best_checkpoints: list = field(default_factory=list)
    _metrics_history: list = field(default_factory=list, repr=False)

    @property
    def metrics_dataframe(self) -> Any:
        """Every metrics dict rank 0 reported, one row each (pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Result.metrics_dataframe needs pandas: pip install pandas") from e
        return pd.DataFrame(self._metrics_history)

    @classmethod
    def from_path(cls, path: Union[str, os.PathLike], storage_filesystem: Any = None) -> "Result":
        """The result of the run stored in the directory ``path`` (local,
        a URI, or a path on ``storage_filesystem``), read from its
        ``result.json`` and ``checkpoints.json``."""
        import pyarrow.fs as pafs

        fs, run_path = resolve_filesystem(path, storage_filesystem)
        results = f"{run_path}/result.json"
        if fs.get_file_info(results).type == pafs.FileType.NotFound:
            raise ValueError(f"Result.from_path({os.fspath(path)!r}): no result.json there; pass "
                             f"the run directory (storage_path/name) of a finished fit()")
        with fs.open_input_stream(results) as f:
            history = [json.loads(line) for line in f.read().decode().splitlines() if line]
        manager = CheckpointManager(CheckpointConfig(), fs, run_path)
        manager.load()
        return cls(metrics=history[-1] if history else None, checkpoint=manager.latest,
                   error=None, path=run_path, filesystem=fs,
                   best_checkpoints=list(manager.kept), _metrics_history=history)

    def get_best_checkpoint(self, metric: str, mode: str) -> Optional[Checkpoint]:
        """The kept checkpoint whose metrics have the best ``metric``
        (``mode`` ``"max"`` or ``"min"``)."""
        if mode not in ("max", "min"):
            raise ValueError(f"get_best_checkpoint(mode={mode!r}): expected 'max' or 'min'")
        scored = [(m[metric], c) for c, m in self.best_checkpoints if metric in m]
        if not scored:
            raise ValueError(f"get_best_checkpoint({metric!r}): no kept checkpoint reported "
                             f"that metric")
        pick = max if mode == "max" else min
        return pick(scored, key=lambda t: t[0])[1]


class CheckpointManager:
    """The run's registered checkpoints, oldest first, also written to
    ``checkpoints.json`` in the run directory so that a new ``fit()`` of a
    run with the same name and storage resumes from them."""

    STATE_FILE = "checkpoints.json"

    def __init__(self, config: CheckpointConfig, filesystem: Any, run_path: str = ""):
        self.config = config
        self.filesystem = filesystem
        self.run_path = run_path
        self.kept: list[tuple[Checkpoint, dict]] = []
        self.latest: Optional[Checkpoint] = None
        self.next_index = 0

    def load(self) -> bool:
        """Read the state an earlier ``fit()`` of this run left; False if none."""
        import pyarrow.fs as pafs
        path = f"{self.run_path}/{self.STATE_FILE}"
        if not self.run_path or self.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return False
        with self.filesystem.open_input_stream(path) as f:
            state = json.loads(f.read().decode())
        self.kept = [(Checkpoint(k["path"], self.filesystem), k["metrics"])
                     for k in state.get("kept", [])]
        latest = state.get("latest")
        self.latest = Checkpoint(latest, self.filesystem) if latest else None
        self.next_index = int(state.get("next_index", 0))
        return self.latest is not None

    def save(self, next_index: int) -> None:
        if not self.run_path:
            return
        state = {"kept": [{"path": c.path, "metrics": m} for c, m in self.kept],
                 "latest": self.latest.path if self.latest else None, "next_index": next_index}
        path = f"{self.run_path}/{self.STATE_FILE}"
        tmp = f"{path}.tmp"
        with self.filesystem.open_output_stream(tmp) as f:
            f.write(json.dumps(state, default=str).encode())
        self.filesystem.move(tmp, path)
        if isinstance(self.filesystem, pafs_local()):
            os.chmod(path, 0o600)

    def register(self, path: str, metrics: dict) -> Checkpoint:
        ckpt = Checkpoint(path, self.filesystem)
        self.kept = [(c, m) for c, m in self.kept if c.path != path]
        self.kept.append((ckpt, metrics))
        self.latest = ckpt
        self._prune()
        return ckpt

    def _score(self, metrics: dict) -> float:
        attr = self.config.checkpoint_score_attribute
        value = metrics.get(attr) if attr else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return -math.inf
        return value if self.config.checkpoint_score_order == "max" else -value

    def _prune(self) -> None:
        keep_n = self.config.num_to_keep
        if keep_n is None or len(self.kept) <= keep_n:
            return
        if self.config.checkpoint_score_attribute:
            ranked = sorted(self.kept, key=lambda cm: self._score(cm[1]), reverse=True)
        else:
            ranked = list(reversed(self.kept))
        keep = {id(cm) for cm in ranked[:keep_n]}
        keep.add(id(self.kept[-1]))
        for cm in list(self.kept):
            if id(cm) not in keep:
                self.delete(cm[0].path)
        self.kept = [cm for cm in self.kept if id(cm) in keep]

    def delete(self, path: str) -> None:
        try:
            self.filesystem.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass
