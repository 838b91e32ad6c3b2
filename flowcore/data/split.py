"""``Dataset.streaming_split(n)``: one streaming execution shared by ``n``
iterators (e.g. one per training worker).

A coordinator actor (``num_cpus=0``; threaded so each shard's request
waits on its own) runs the plan and hands the next block to whichever
shard asks (``equal=True``: each shard gets exactly the same number of
rows, the remainder dropped).  An epoch ends when every shard has seen the
end; the next ``iter_batches`` on a shard starts the next epoch after all
shards finished the previous one.

Lifetime: when every shard finished an epoch the coordinator closes the
execution and drops its block refs; the actor exits when the last
iterator holding its handle is garbage-collected (in the driver or in the
tasks and actors the shards were sent to), as handles are counted.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Iterator

import pyarrow as pa

import flowcore

from .context import DataContext
from .executor import Bundle, Execution, execute, slice_bundles
from .iterator import DataIterator
from .plan import LogicalPlan
from .schema import plan_schema
from .stats import DatasetStats

__all__ = ["streaming_split", "SplitCoordinator", "StreamSplitDataIterator"]


class SplitCoordinator:
    def __init__(self, plan: LogicalPlan, n: int, equal: bool, ctx: DataContext) -> None:
        DataContext._set_current(ctx)
        self.plan, self.n, self.equal = plan, n, equal
        self.epoch = -1
        self.finished = [True] * n
        self.cond = threading.Condition()
        self.gen: Iterator[Any] | None = None
        self.queues: list[collections.deque] = [collections.deque() for _ in range(n)]
        self.lock = threading.Lock()
        self.split_epochs = [-1] * n
        self.handed: list[list] = [[] for _ in range(n)]

    def begin(self, split: int) -> int:
        """The epoch a new pass of ``split`` reads (its previous one + 1)."""
        with self.cond:
            self.split_epochs[split] += 1
            return self.split_epochs[split]

    def _start(self, epoch: int) -> None:
        close = getattr(self.gen, "close", None)
        if close is not None:
            close()
        self.epoch = epoch
        self.finished = [False] * self.n
        self.queues = [collections.deque() for _ in range(self.n)]
        self.gen = execute(self.plan)
        if self.equal:
            bundles = []
            for b in self.gen:
                b.release()
                bundles.append(Bundle(b.ref, b.meta))
            total = sum(b.num_rows for b in bundles)
            per = total // self.n
            ex = Execution(DataContext.get_current(), DatasetStats())
            parts = slice_bundles(ex, bundles, [(i * per, per) for i in range(self.n)])
            for i, p in enumerate(parts):
                self.queues[i].extend(b.ref for b in p)
            self.gen = iter(())

    def next_block(self, split: int, epoch: int) -> list:
        """``[ref]`` of the next block for ``split`` in ``epoch``; ``[]`` at
        the end of the epoch."""
        with self.cond:
            while epoch > self.epoch and not all(self.finished):
                self.cond.wait(1.0)
            if epoch > self.epoch:
                self._start(epoch)
            if epoch < self.epoch or self.finished[split]:
                return []
        with self.lock:
            q = self.queues[split]
            ref = None
            if q:
                ref = q.popleft()
            else:
                b = next(self.gen, None) if self.gen is not None else None
                if b is not None:
                    b.release()
                    ref = b.ref
            if ref is not None:
                # the shard fetches a block before it asks for the next one:
                # holding the last two keeps each alive until its reader has it
                self.handed[split].append(ref)
                del self.handed[split][:-2]
                return [ref]
        with self.cond:
            self.finished[split] = True
            if all(self.finished):
                self._free()
            self.cond.notify_all()
        return []

    def _free(self) -> None:
        """Every shard finished the epoch: close the execution and drop
        every block ref, so the store holds nothing for this split until a
        next epoch starts (the actor itself exits with the last iterator)."""
        with self.lock:
            close = getattr(self.gen, "close", None)
            if close is not None:
                close()
            self.gen = None
            self.queues = [collections.deque() for _ in range(self.n)]
            self.handed = [[] for _ in range(self.n)]

    def schema(self) -> Any:
        return plan_schema(self.plan)

    def holds_blocks(self) -> int:
        """Block refs this coordinator keeps (0 between epochs)."""
        with self.lock:
            return sum(len(q) for q in self.queues) + sum(len(h) for h in self.handed) + (
                self.gen is not None)


class StreamSplitDataIterator(DataIterator):
    """One shard of a ``streaming_split``; picklable (send it to a worker)."""

    def __init__(self, coordinator: Any, index: int, n: int) -> None:
        self._coord = coordinator
        self._index = index
        self._n = n

    def _iter_tables(self) -> Iterator[pa.Table]:
        epoch = flowcore.get(self._coord.begin.remote(self._index))
        while True:
            got = flowcore.get(self._coord.next_block.remote(self._index, epoch))
            if not got:
                return
            yield flowcore.get(got[0])

    def schema(self) -> Any:
        """The dataset's schema (read from the plan, without consuming)."""
        return flowcore.get(self._coord.schema.remote())

    def __repr__(self) -> str:
        return f"StreamSplitDataIterator(index={self._index}, n={self._n})"


def streaming_split(plan: LogicalPlan, n: int, equal: bool,
                    ctx: DataContext | None = None) -> list[DataIterator]:
    """``n`` shards of one execution of ``plan`` under ``ctx`` (default: the
    current DataContext)."""
    if not flowcore.is_initialized():
        flowcore.init()
    actor_cls = flowcore.remote(num_cpus=0, max_concurrency=n + 2)(SplitCoordinator)
    coord = actor_cls.remote(plan, n, equal, ctx or DataContext.get_current())
    return [StreamSplitDataIterator(coord, i, n) for i in range(n)]
