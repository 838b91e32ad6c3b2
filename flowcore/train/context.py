"""The training session inside a worker: ``report``, ``get_context``,
``get_checkpoint`` and ``get_dataset_shard``.

One session exists per worker process while its training function runs.
``report`` copies a checkpoint's files to the run's storage at once (every
rank into the same directory) and queues the metrics; the coordinator drains
the queue with a long poll, and its next poll confirms what it received:
``report`` returns after that confirmation, so a report that returned is
never lost with its worker.
"""
from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from .checkpoint import Checkpoint, copy_tree

_session: Optional["_Session"] = None


@dataclass
class _Session:
    world_rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    experiment_name: str
    storage_path: str          # the run's directory inside storage_filesystem
    storage_filesystem: Any
    checkpoint: Optional[Checkpoint]
    dataset_shards: dict
    next_index: int
    device: Any = None
    queue: deque = field(default_factory=deque)
    cond: threading.Condition = field(default_factory=threading.Condition)
    finished: bool = False
    produced: int = 0          # reports made
    acked: int = 0             # reports the coordinator confirmed it holds

    def put(self, item: dict) -> None:
        """Queue a report and return once the coordinator holds it, so a
        report that returned survives this process dying right after."""
        with self.cond:
            self.queue.append(item)
            self.produced += 1
            seq = self.produced
            self.cond.notify_all()
            while self.acked < seq:
                self.cond.wait()

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def drain(self, timeout: float, acked: int = 0) -> tuple[list, bool]:
        """The queued reports (waiting up to ``timeout`` for one), after
        recording that the coordinator holds the first ``acked``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            if acked > self.acked:
                self.acked = acked
                self.cond.notify_all()
            while not self.queue and not self.finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            items = list(self.queue)
            self.queue.clear()
            return items, self.finished and not self.queue


def _set_session(session: Optional[_Session]) -> None:
    global _session
    _session = session


def _get_session(what: str) -> _Session:
    if _session is None:
        raise RuntimeError(f"flowcore.train.{what}() works only inside a training function run "
                           f"by a trainer (TorchTrainer(train_loop_per_worker=...).fit())")
    return _session


class TrainContext:
    """What a worker knows about its place in the run."""

    def get_world_rank(self) -> int:
        """This worker's rank, 0 .. world size - 1."""
        return _get_session("get_context").world_rank

    def get_world_size(self) -> int:
        """The number of workers."""
        return _get_session("get_context").world_size

    def get_local_rank(self) -> int:
        """This worker's rank among the workers on its node."""
        return _get_session("get_context").local_rank

    def get_local_world_size(self) -> int:
        """The number of workers on this worker's node."""
        return _get_session("get_context").local_world_size

    def get_node_rank(self) -> int:
        """The rank of this worker's node among the run's nodes."""
        return _get_session("get_context").node_rank

    def get_experiment_name(self) -> str:
        """The run's name (``RunConfig.name``)."""
        return _get_session("get_context").experiment_name

    def get_storage(self) -> Any:
        """The run's storage: an object with ``storage_filesystem`` and
        ``storage_path`` (the run's directory)."""
        s = _get_session("get_context")
        return _Storage(s.storage_filesystem, s.storage_path)


@dataclass(frozen=True)
class _Storage:
    storage_filesystem: Any
    storage_path: str


def get_context() -> TrainContext:
    """The ``TrainContext`` of the calling worker."""
    _get_session("get_context")
    return TrainContext()


def report(metrics: dict[str, Any], checkpoint: Optional[Checkpoint] = None,
           checkpoint_dir_name: Optional[str] = None) -> None:
    """Report ``metrics`` (and optionally a ``checkpoint``) from this worker.

    Every worker should call it the same number of times. Rank 0's metrics
    become the result's metrics; the checkpoint files of every rank that
    passes one are copied into one directory of the run's storage
    (``checkpoint_dir_name``, default ``checkpoint_NNNNNN``), registered
    once every rank has made this report.
    """
    s = _get_session("report")
    if not isinstance(metrics, dict):
        raise TypeError(f"flowcore.train.report(metrics=...): expected a dict, got "
                        f"{type(metrics).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        raise TypeError("flowcore.train.report(checkpoint=...): expected a "
                        "flowcore.train.Checkpoint (Checkpoint.from_directory(path))")
    index = s.next_index
    s.next_index += 1
    ckpt_dir = None
    if checkpoint is not None:
        name = checkpoint_dir_name or f"checkpoint_{index:06d}"
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"checkpoint_dir_name={name!r}: expected a plain directory name")
        ckpt_dir = f"{s.storage_path}/{name}"
        copy_tree(checkpoint.filesystem, checkpoint.path, s.storage_filesystem, ckpt_dir)
    s.put({"index": index, "rank": s.world_rank, "metrics": copy.deepcopy(metrics),
           "checkpoint_dir": ckpt_dir, "time": time.time()})


def get_checkpoint() -> Optional[Checkpoint]:
    """The checkpoint to resume from: the newest one this run registered
    before a restart, else ``resume_from_checkpoint``, else ``None``."""
    return _get_session("get_checkpoint").checkpoint


def get_dataset_shard(dataset_name: Optional[str] = None) -> Any:
    """This worker's shard of the dataset passed as ``datasets={name: ...}``:
    an iterator with ``iter_batches`` / ``iter_torch_batches``. Shards of
    the workers are disjoint and together cover the dataset."""
    s = _get_session("get_dataset_shard")
    if dataset_name is None:
        if len(s.dataset_shards) == 1:
            return next(iter(s.dataset_shards.values()))
        raise ValueError(f"get_dataset_shard(): name the dataset, one of "
                         f"{sorted(s.dataset_shards)}")
    if dataset_name not in s.dataset_shards:
        given = sorted(s.dataset_shards)
        raise KeyError(f"get_dataset_shard({dataset_name!r}): no dataset of that name was passed "
                       f"to the trainer (datasets= has {given or 'nothing'}); pass it as "
                       f"TorchTrainer(..., datasets={{{dataset_name!r}: ds}})")
    return s.dataset_shards[dataset_name]


__all__ = ["TrainContext", "get_context", "report", "get_checkpoint", "get_dataset_shard"]
