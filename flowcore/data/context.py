"""DataContext: the knobs of flowcore.data's planner and streaming executor."""
from __future__ import annotations

import dataclasses
import threading
from typing import ClassVar

__all__ = ["DataContext"]


@dataclasses.dataclass
class DataContext:
    """Settings read when a dataset executes (``DataContext.get_current()``).

    * ``target_max_block_size``: blocks are sized to about this many bytes.
    * ``read_op_min_num_blocks``: a read or ``range`` makes at least this many
      blocks when the data is not small.
    * ``small_plan_bytes``: a plan whose input is at most this size runs as
      one task (no pools, no shuffle), the single-block fast path.
    * ``small_shuffle_bytes``: a sort, shuffle, repartition or groupby
      whose input is at most this size runs in one task (Arrow's kernels on
      the whole input beat a map/reduce exchange until then).
    * ``small_sort_bytes``: a sort's one-task limit (the smaller of the two
      applies): sorting is O(n log n), so a range-partitioned sort on every
      CPU wins from about 1M rows on.
    * ``store_memory_fraction``: the executor keeps the bytes of blocks it
      produced and nobody consumed yet under this share of the object store.
    * ``max_tasks_in_flight_per_op``: per operator; ``None``: 2 x CPUs.
    * ``max_tasks_in_flight_per_actor``: calls queued on one pool actor.
    * ``execution_timeout_s``: how long the executor waits for one task
      before declaring the pipeline stuck (``None``: forever).
    * ``default_num_cpus``: the CPUs a task or pool actor asks for when its
      operator sets no ``num_cpus`` (1, as in Ray).  flowcore.train reads
      ``datasets=`` with 0 when its workers leave no CPU free, so the reads
      run in the CPU time the workers spend waiting for them instead of
      waiting forever for a CPU the workers hold.
    """
    target_max_block_size: int = 128 << 20
    read_op_min_num_blocks: int = 200
    small_plan_bytes: int = 8 << 20
    small_shuffle_bytes: int = 128 << 20
    small_sort_bytes: int = 16 << 20
    store_memory_fraction: float = 0.5
    max_tasks_in_flight_per_op: int | None = None
    max_tasks_in_flight_per_actor: int = 2
    execution_timeout_s: float | None = None
    task_max_retries: int = 3
    default_num_cpus: float = 1.0

    _current: ClassVar["DataContext | None"] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @staticmethod
    def get_current() -> "DataContext":
        """The process-wide context (created with defaults on first use)."""
        with DataContext._lock:
            if DataContext._current is None:
                DataContext._current = DataContext()
            return DataContext._current

    @staticmethod
    def _set_current(ctx: "DataContext") -> None:
        with DataContext._lock:
            DataContext._current = ctx
