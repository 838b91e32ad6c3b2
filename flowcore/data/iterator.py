"""DataIterator: batches and rows out of a stream of blocks.

``Dataset.iterator()`` and ``Dataset.streaming_split(n)`` return these;
they can be passed to tasks and actors (a training worker iterates its
shard with ``iter_batches`` / ``iter_torch_batches``).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

import flowcore

from .block import check_batch_format, concat, iter_rows, to_batch
from .context import DataContext

__all__ = ["DataIterator", "batch_tables"]


def _check_size(name: str, v: Any, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"iter_batches: {name}={v!r}; expected an int >= 1"
                         + (" or None" if allow_none else ""))


def batch_tables(tables: Iterable[pa.Table], batch_size: int | None, drop_last: bool,
                 local_shuffle_buffer_size: int | None = None,
                 local_shuffle_seed: int | None = None) -> Iterator[pa.Table]:
    """Re-cut a stream of tables into tables of ``batch_size`` rows."""
    if batch_size is None and not local_shuffle_buffer_size:
        for t in tables:
            if t.num_rows:
                yield t
        return
    size = batch_size or 256
    if local_shuffle_buffer_size:
        rng = np.random.default_rng(local_shuffle_seed)
        buf: pa.Table | None = None
        for t in tables:
            buf = t if buf is None else concat([buf, t])
            while buf.num_rows >= local_shuffle_buffer_size + size - 1 and buf.num_rows >= size:
                pick = rng.choice(buf.num_rows, size=size, replace=False)
                keep = np.ones(buf.num_rows, dtype=bool)
                keep[pick] = False
                yield buf.take(pa.array(pick))
                buf = buf.filter(pa.array(keep))
        while buf is not None and buf.num_rows:
            if buf.num_rows < size and drop_last:
                return
            n = min(size, buf.num_rows)
            pick = rng.choice(buf.num_rows, size=n, replace=False)
            keep = np.ones(buf.num_rows, dtype=bool)
            keep[pick] = False
            yield buf.take(pa.array(pick))
            buf = buf.filter(pa.array(keep))
        return
    pieces: list[pa.Table] = []
    have = 0
    for t in tables:
        off = 0
        while off < t.num_rows:
            take = min(size - have, t.num_rows - off)
            pieces.append(t.slice(off, take))
            have += take
            off += take
            if have == size:
                yield pieces[0] if len(pieces) == 1 else concat(pieces)
                pieces, have = [], 0
    if have and not drop_last:
        yield pieces[0] if len(pieces) == 1 else concat(pieces)


_END = object()


def _in_worker() -> bool:
    return flowcore.is_initialized() and flowcore.get_runtime_context().worker_mode == "worker"


def prefetched(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``source`` in a thread, ``depth`` items ahead of the consumer.
    Errors are re-raised here; closing this generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in source:
                if not put((item, None)):
                    break
            else:
                put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((_END, e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    th = threading.Thread(target=run, name="flowcore-data-prefetch", daemon=True)
    th.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        th.join(30)


class DataIterator:
    """Iterates a dataset (or one shard of it) in batches or rows."""

    def _iter_tables(self) -> Iterator[pa.Table]:
        raise NotImplementedError

    def iter_batches(self, *, prefetch_batches: int = 1, batch_size: int | None = 256,
                     batch_format: str | None = "default", drop_last: bool = False,
                     local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None,
                     _collate_fn: Callable | None = None) -> Iterator[Any]:
        """Batches of ``batch_size`` rows (``None``: whole blocks) in
        ``batch_format`` ("default"/"numpy": dict of arrays, "pandas",
        "pyarrow", None: Arrow)."""
        check_batch_format(batch_format, "iter_batches")
        _check_size("batch_size", batch_size)
        _check_size("local_shuffle_buffer_size", local_shuffle_buffer_size)
        if not isinstance(prefetch_batches, int) or prefetch_batches < 0:
            raise ValueError(f"iter_batches: prefetch_batches={prefetch_batches!r}; expected an "
                             f"int >= 0")
        tables = self._iter_tables()
        if prefetch_batches and not _in_worker():
            # a thread fetches blocks ahead (the part that waits); cutting
            # and formatting batches stay on this thread: one hand-off per
            # block instead of one per batch (1.5-2x the batches per second).
            # Inside a task or actor a helper thread's blocked get would not
            # give the task's CPU back, so the shard is read on this thread.
            tables = prefetched(tables, prefetch_batches)
        try:
            for t in batch_tables(tables, batch_size, drop_last, local_shuffle_buffer_size,
                                  local_shuffle_seed):
                b = to_batch(t, batch_format)
                yield _collate_fn(b) if _collate_fn is not None else b
        finally:
            close = getattr(tables, "close", None)
            if close is not None:
                close()  # stops the prefetch thread now

    def iter_rows(self) -> Iterator[dict]:
        for t in self._iter_tables():
            yield from iter_rows(t)

    def iter_torch_batches(self, *, prefetch_batches: int = 1, batch_size: int | None = 256,
                           dtypes: Any = None, device: Any = "auto",
                           collate_fn: Callable | None = None, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None,
                           pin_memory: bool = False) -> Iterator[Any]:
        """Batches as ``dict[str, torch.Tensor]`` (or ``collate_fn``'s result);
        ``pin_memory``: tensors in page-locked memory (when CUDA is present)."""
        try:
            import torch
        except ImportError:
            raise ImportError("iter_torch_batches needs torch: pip install 'flowcore[train]' "
                              "(or pip install torch)") from None
        if device == "auto":
            dev = None
        else:
            dev = torch.device(device) if device is not None else None

        def convert(batch: dict) -> Any:
            if collate_fn is not None:
                return collate_fn(batch)
            out = {}
            for k, v in batch.items():
                if v.dtype == object:
                    raise TypeError(f"iter_torch_batches: column {k!r} holds Python objects; "
                                    f"expected numeric columns (pass collate_fn= to convert)")
                dt = dtypes.get(k) if isinstance(dtypes, dict) else dtypes
                arr = v if v.flags.writeable else np.array(v)
                t = torch.as_tensor(arr, dtype=dt, device=dev)
                if pin_memory and t.device.type == "cpu" and torch.cuda.is_available():
                    t = t.pin_memory()
                out[k] = t
            return out

        for b in self.iter_batches(prefetch_batches=prefetch_batches, batch_size=batch_size,
                                   batch_format="numpy", drop_last=drop_last,
                                   local_shuffle_buffer_size=local_shuffle_buffer_size,
                                   local_shuffle_seed=local_shuffle_seed):
            yield convert(b)

    def materialize(self) -> Any:
        """The rows this iterator yields, as a MaterializedDataset."""
        from .read_api import from_arrow
        return from_arrow([t for t in self._iter_tables()] or [pa.table({})])

    def stats(self) -> str:
        return ""

    def schema(self) -> Any:
        """The Schema of the rows this iterator yields (None when unknown)."""
        return None

    def get_context(self) -> Any:
        return DataContext.get_current()

    def __iter__(self) -> Iterator[dict]:
        return self.iter_rows()


class DatasetIterator(DataIterator):
    """The iterator of a whole dataset (runs its plan in this process)."""

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset

    def _iter_tables(self) -> Iterator[pa.Table]:
        return self._dataset._iter_tables()

    def stats(self) -> str:
        return self._dataset.stats()

    def schema(self) -> Any:
        return self._dataset.schema()

    def __repr__(self) -> str:
        return f"DataIterator({self._dataset!r})"


__all__ += ["DatasetIterator"]
