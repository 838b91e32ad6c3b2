"""``Trial``: one config's run, its status, results and checkpoints."""
from __future__ import annotations

from typing import Any

from .checkpoint import Checkpoint

__all__ = ["Trial"]


class Trial:
    """One trial of an experiment (the controller owns and updates it)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    TERMINATED = "TERMINATED"
    ERROR = "ERROR"

    def __init__(self, trial_id: str, config: dict, *, trainable_name: str,
                 experiment_tag: str, path: str, filesystem: Any, resources: Any,
                 index: int, dirname: str, name: str | None = None):
        self.trial_id = trial_id
        self.config = config
        self.trainable_name = trainable_name
        self.experiment_tag = experiment_tag
        self.path = path
        self.storage_filesystem = filesystem
        self.placement_group_factory = resources
        self.index = index
        self.dirname = dirname
        self.custom_trial_name = name
        self.status = Trial.PENDING
        self.last_result: dict = {}
        self.results: list[dict] = []
        self.num_failures = 0
        self.error: BaseException | None = None
        self.error_msg: str | None = None
        self.error_file: str | None = None
        self.pending_reason: str = ""
        self.restore_from: dict | None = None  # checkpoint entry the next start resumes
        # the checkpoint a retry or restore resumes from: the newest one of
        # the trial, or the one a PBT exploit copied from another trial
        self.resume_entry: dict | None = None
        self.start_entry: dict | None = None  # the entry its current worker started from
        self.checkpoint_manager: Any = None
        self.iteration_offset = 0
        self.time_offset = 0.0

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The newest persisted checkpoint."""
        entry = self.checkpoint_manager.latest if self.checkpoint_manager else None
        return Checkpoint(entry["path"], self.storage_filesystem) if entry else None

    @property
    def local_path(self) -> str:
        return self.path

    @property
    def evaluated_params(self) -> dict:
        return self.config

    def explain(self) -> str:
        """What the trial is doing or waiting for, in plain words."""
        if self.status == Trial.ERROR:
            return f"failed after {self.num_failures} attempt(s); see {self.error_file}"
        if self.status == Trial.TERMINATED:
            return f"finished after {self.last_result.get('training_iteration', 0)} iterations"
        if self.pending_reason:
            return f"{self.status}: {self.pending_reason}"
        if self.status == Trial.RUNNING:
            return (f"running, at iteration {self.last_result.get('training_iteration', 0)}")
        return f"{self.status}: waiting to be started"

    def is_finished(self) -> bool:
        return self.status in (Trial.TERMINATED, Trial.ERROR)

    def __str__(self) -> str:
        return self.custom_trial_name or f"{self.trainable_name}_{self.trial_id}"

    def __repr__(self) -> str:
        return str(self)
