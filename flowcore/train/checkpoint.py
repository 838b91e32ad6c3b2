"""``flowcore.train.Checkpoint`` is ``flowcore.tune.Checkpoint``: one class,
as in Ray 2.60 (``ray.train.Checkpoint is ray.tune.Checkpoint``), so a
checkpoint passes between a training run and a Tune trial unchanged.

The implementation, with the filesystem helpers train uses to copy
checkpoints into its storage, lives in :mod:`flowcore.tune.checkpoint`
(a module that needs only pyarrow and imports nothing else of Tune).
"""
from __future__ import annotations

from flowcore.tune.checkpoint import Checkpoint, copy_tree, is_local, resolve_filesystem

__all__ = ["Checkpoint", "copy_tree", "is_local", "resolve_filesystem"]
