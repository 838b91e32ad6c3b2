"""Keeps a trial's checkpoints: the newest always, and at most
``num_to_keep`` ranked by ``checkpoint_score_attribute`` (newest first when
no attribute is set); the others are deleted from storage."""
from __future__ import annotations

import math
from typing import Any

from . import storage
from .config import CheckpointConfig

__all__ = ["CheckpointManager"]


class CheckpointManager:
    def __init__(self, config: CheckpointConfig, filesystem: Any):
        self.config = config
        self.fs = filesystem
        self.entries: list[dict] = []  # {"path", "name", "index", "iteration", "metrics"}

    @property
    def latest(self) -> dict | None:
        return self.entries[-1] if self.entries else None

    def _rank(self, entry: dict) -> tuple[float, int]:
        attr = self.config.checkpoint_score_attribute
        if attr is None:
            return (0.0, entry["index"])
        v = (entry.get("metrics") or {}).get(attr)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return (-math.inf, entry["index"])
        return (float(v) if self.config.checkpoint_score_order == "max" else -float(v),
                entry["index"])

    def best(self) -> list[dict]:
        return sorted(self.entries, key=self._rank, reverse=True)

    def register(self, entry: dict, delete: bool = True) -> list[dict]:
        """Add ``entry``; returns the entries dropped (deleted from storage)."""
        self.entries.append(entry)
        keep = self.config.num_to_keep
        if keep is None or len(self.entries) <= keep:
            return []
        latest = self.entries[-1]
        ranked = [e for e in self.best() if e is not latest]
        kept = ranked[:max(keep - 1, 0)] + [latest]
        dropped = [e for e in self.entries if all(e is not k for k in kept)]
        self.entries = [e for e in self.entries if any(e is k for k in kept)]
        if delete:
            for e in dropped:
                storage.delete_dir(self.fs, e["path"])
        return dropped

    def forget(self, paths: set[str]) -> None:
        self.entries = [e for e in self.entries if e["path"] not in paths]
