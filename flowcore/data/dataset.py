"""Dataset: a lazy plan of transformations over Arrow blocks; consuming it
(iterating, ``take``, ``count``, writing...) runs the streaming executor."""
from __future__ import annotations

import inspect
import uuid
from typing import Any, Callable, Iterator

import pyarrow as pa

import flowcore

from . import aggregate as agg_mod
from .block import check_batch_format, concat, iter_rows, require_pandas, schema_str, to_batch
from .compute import concurrency_from
from .context import DataContext
from .datasource import FileDatasink
from .datasource.formats import csv_writer, json_writer, numpy_writer, parquet_writer
from .executor import (Bundle, Execution, _convert_ref, execute, iter_tables, materialize_bundles,
                       slice_bundles)
from .grouped import GroupedData, global_aggregate
from .iterator import DataIterator, DatasetIterator
from .plan import (AllToAllOp, InputSource, LimitOp, LogicalPlan, MapOp, ReadSource, UnionSource,
                   ZipSource, even_ranges, fn_name)
from .shuffle import normalize_sort_keys
from .schema import Schema, plan_schema
from .physical import describe_stages
from .plan_graph import plan_digraph
from .split import streaming_split
from .stats import DatasetStats

__all__ = ["Dataset", "MaterializedDataset", "Schema"]


def _check_fn(fn: Any, op: str) -> None:
    if not callable(fn):
        raise TypeError(f"{op}: expected a function or a callable class, got "
                        f"{type(fn).__name__}")


def _check_cols(cols: Any, op: str) -> list[str]:
    if isinstance(cols, str):
        cols = [cols]
    cols = list(cols)
    if not cols or not all(isinstance(c, str) for c in cols):
        raise ValueError(f"{op}: expected a column name or a non-empty list of names, got "
                         f"{cols!r}")
    return cols


def _check_concurrency(concurrency: Any, fn: Any, op: str) -> None:
    if concurrency is None:
        return
    ok = isinstance(concurrency, int) and not isinstance(concurrency, bool) and concurrency >= 1
    if isinstance(concurrency, (tuple, list)):
        ok = 1 <= len(concurrency) <= 3 and all(isinstance(c, int) and c >= 1
                                                 for c in concurrency)
    if not ok:
        raise ValueError(f"{op}: concurrency={concurrency!r}; expected an int >= 1 or a "
                         f"(min, max) tuple")


def _noop() -> None:
    return None


class _NoopActor:
    pass


def _check_remote_args(args: dict, is_class: bool, op: str) -> None:
    """Validate ``**ray_remote_args`` now, with flowcore's option checks."""
    try:
        if is_class:
            flowcore.remote(**args)(_NoopActor)
        else:
            flowcore.remote(_noop).options(**args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{op}: {e}") from None


class Dataset:
    """A distributed collection of rows in Arrow blocks (Ray Data's Dataset)."""

    def __init__(self, plan: LogicalPlan) -> None:
        self._plan = plan
        self._last_stats: DatasetStats | None = None
        self._made_from: LogicalPlan | None = None
        self._name: str | None = None
        self._uuid = uuid.uuid4().hex[:16]

    # -- plumbing --------------------------------------------------------------
    def _with(self, op: Any) -> "Dataset":
        out = Dataset(self._plan.with_op(op))
        out._name = self._name
        return out

    def _map_op(self, kind: str, label: str, fn: Any, *, compute: Any = None,
                fn_args: Any = None, fn_kwargs: Any = None, fn_constructor_args: Any = None,
                fn_constructor_kwargs: Any = None, num_cpus: Any = None, num_gpus: Any = None,
                concurrency: Any = None, remote_args: dict | None = None,
                **kw: Any) -> "Dataset":
        _check_fn(fn, label.lower())
        concurrency = concurrency_from(compute, concurrency, f"{label}({fn_name(fn)})")
        _check_concurrency(concurrency, fn, label)
        if (fn_constructor_args or fn_constructor_kwargs) and not inspect.isclass(fn):
            raise ValueError(f"{label}: fn_constructor_args/fn_constructor_kwargs apply to a "
                             f"callable class only; {fn_name(fn)} is a function")
        remote_args = {k: v for k, v in (remote_args or {}).items() if k != "memory"}
        if remote_args:
            _check_remote_args(remote_args, inspect.isclass(fn), f"{label}({fn_name(fn)})")
        op = MapOp(kind, f"{label}({fn_name(fn)})", fn, fn_args=fn_args or (),
                   fn_kwargs=fn_kwargs, fn_constructor_args=fn_constructor_args or (),
                   fn_constructor_kwargs=fn_constructor_kwargs, concurrency=concurrency,
                   num_cpus=num_cpus, num_gpus=num_gpus, remote_args=remote_args, **kw)
        return self._with(op)

    def _execute(self) -> Iterator[Any]:
        self._last_stats = DatasetStats()
        return execute(self._plan, self._last_stats)

    def _iter_tables(self) -> Iterator[pa.Table]:
        return iter_tables(self._execute())

    # -- transformations -----------------------------------------------------
    def map(self, fn: Callable, *, compute: Any = None, fn_args: Any = None,
            fn_kwargs: Any = None, fn_constructor_args: Any = None,
            fn_constructor_kwargs: Any = None, num_cpus: float | None = None,
            num_gpus: float | None = None, memory: float | None = None,
            concurrency: Any = None, ray_remote_args_fn: Any = None,
            **ray_remote_args: Any) -> "Dataset":
        """Apply ``fn(row: dict) -> dict`` to each row."""
        return self._map_op("map", "Map", fn, compute=compute, fn_args=fn_args, fn_kwargs=fn_kwargs,
                            fn_constructor_args=fn_constructor_args,
                            fn_constructor_kwargs=fn_constructor_kwargs, num_cpus=num_cpus,
                            num_gpus=num_gpus, concurrency=concurrency,
                            remote_args=ray_remote_args)

    def map_batches(self, fn: Any, *, batch_size: int | None | str = None,
                    compute: Any = None, batch_format: str | None = "default",
                    zero_copy_batch: bool = True, fn_args: Any = None, fn_kwargs: Any = None,
                    fn_constructor_args: Any = None, fn_constructor_kwargs: Any = None,
                    num_cpus: float | None = None, num_gpus: float | None = None,
                    memory: float | None = None, concurrency: Any = None,
                    udf_modifying_row_count: bool = True, ray_remote_args_fn: Any = None,
                    **ray_remote_args: Any) -> "Dataset":
        """Apply ``fn(batch) -> batch`` to batches of ``batch_size`` rows
        (``None``: whole blocks).  A callable class runs in a pool of
        ``concurrency`` actors, each constructing it once."""
        check_batch_format(batch_format, f"map_batches({fn_name(fn)})")
        if batch_size == "default":
            batch_size = 1024
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1
                                       or isinstance(batch_size, bool)):
            raise ValueError(f"map_batches({fn_name(fn)}): batch_size={batch_size!r}; expected "
                             f"an int >= 1 or None (whole blocks)")
        return self._map_op("map_batches", "MapBatches", fn, compute=compute, fn_args=fn_args,
                            fn_kwargs=fn_kwargs, fn_constructor_args=fn_constructor_args,
                            fn_constructor_kwargs=fn_constructor_kwargs, num_cpus=num_cpus,
                            num_gpus=num_gpus, concurrency=concurrency,
                            remote_args=ray_remote_args, batch_size=batch_size,
                            batch_format=batch_format)

    def flat_map(self, fn: Callable, *, compute: Any = None, fn_args: Any = None,
                 fn_kwargs: Any = None, fn_constructor_args: Any = None,
                 fn_constructor_kwargs: Any = None, num_cpus: float | None = None,
                 num_gpus: float | None = None, memory: float | None = None,
                 concurrency: Any = None, ray_remote_args_fn: Any = None,
                 **ray_remote_args: Any) -> "Dataset":
        """Apply ``fn(row) -> list[dict]`` and flatten."""
        return self._map_op("flat_map", "FlatMap", fn, compute=compute, fn_args=fn_args,
                            fn_kwargs=fn_kwargs,
                            fn_constructor_args=fn_constructor_args,
                            fn_constructor_kwargs=fn_constructor_kwargs, num_cpus=num_cpus,
                            num_gpus=num_gpus, concurrency=concurrency,
                            remote_args=ray_remote_args)

    def filter(self, fn: Callable | None = None, expr: Any = None, *, compute: Any = None,
               fn_args: Any = None, fn_kwargs: Any = None, fn_constructor_args: Any = None,
               fn_constructor_kwargs: Any = None, num_cpus: float | None = None,
               num_gpus: float | None = None, memory: float | None = None,
               concurrency: Any = None, ray_remote_args_fn: Any = None,
               **ray_remote_args: Any) -> "Dataset":
        """Keep rows where ``fn(row)`` is True, or where the
        ``pyarrow.compute`` expression ``expr`` holds."""
        if (fn is None) == (expr is None):
            raise ValueError("filter: give exactly one of fn= (a row predicate) and expr= (a "
                             "pyarrow.compute expression)")
        if expr is not None:
            import pyarrow.compute as pc
            if isinstance(expr, str):
                raise TypeError("filter: expr= takes a pyarrow.compute expression such as "
                                "pc.field('x') > 3, not a string")
            if not isinstance(expr, pc.Expression):
                raise TypeError(f"filter: expr= must be a pyarrow.compute.Expression, got "
                                f"{type(expr).__name__}")
            return self._with(MapOp("filter", f"Filter({expr})", None, params={"expr": expr}))
        return self._map_op("filter", "Filter", fn, compute=compute, fn_args=fn_args,
                            fn_kwargs=fn_kwargs,
                            fn_constructor_args=fn_constructor_args,
                            fn_constructor_kwargs=fn_constructor_kwargs, num_cpus=num_cpus,
                            num_gpus=num_gpus, concurrency=concurrency,
                            remote_args=ray_remote_args)

    def add_column(self, col: str, fn: Callable, *, batch_format: str | None = "pandas",
                   compute: Any = None, concurrency: Any = None,
                   **ray_remote_args: Any) -> "Dataset":
        """Add (or replace) column ``col`` with ``fn(batch)``'s values."""
        if not isinstance(col, str):
            raise TypeError(f"add_column: col={col!r}; expected a column name (str)")
        _check_fn(fn, "add_column")
        check_batch_format(batch_format, "add_column")
        return self._with(MapOp("add_column", f"AddColumn({col})", fn,
                                batch_format=batch_format, params={"col": col}))

    def drop_columns(self, cols: list[str], *, compute: Any = None, concurrency: Any = None,
                     **ray_remote_args: Any) -> "Dataset":
        cols = _check_cols(cols, "drop_columns")
        return self._with(MapOp("drop_columns", f"DropColumns({cols})",
                                params={"cols": cols}))

    def select_columns(self, cols: list[str] | str, *, compute: Any = None,
                       concurrency: Any = None, **ray_remote_args: Any) -> "Dataset":
        cols = _check_cols(cols, "select_columns")
        return self._with(MapOp("select_columns", f"SelectColumns({cols})",
                                params={"cols": cols}))

    def rename_columns(self, names: dict[str, str] | list[str], *, concurrency: Any = None,
                       **ray_remote_args: Any) -> "Dataset":
        if isinstance(names, dict):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
                raise TypeError("rename_columns: expected a dict of old name -> new name")
        elif isinstance(names, (list, tuple)):
            names = list(names)
            if not all(isinstance(n, str) for n in names):
                raise TypeError("rename_columns: expected a list of new names (str)")
        else:
            raise TypeError(f"rename_columns: expected a dict or a list, got "
                            f"{type(names).__name__}")
        return self._with(MapOp("rename_columns", f"RenameColumns({names})",
                                params={"names": names}))

    def random_sample(self, fraction: float, *, seed: int | None = None) -> "Dataset":
        """Each row kept with probability ``fraction``."""
        if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"random_sample: fraction={fraction!r}; expected a number in "
                             f"[0, 1]")
        return self._with(MapOp("random_sample", f"RandomSample({fraction})",
                                params={"fraction": fraction, "seed": seed}))

    def limit(self, limit: int) -> "Dataset":
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"limit: limit={limit!r}; expected an int >= 0")
        return self._with(LimitOp(limit))

    def repartition(self, num_blocks: int | None = None,
                    target_num_rows_per_block: int | None = None, *, strict: bool = False,
                    shuffle: bool = False, keys: list[str] | None = None,
                    sort: bool = False) -> "Dataset":
        """``num_blocks`` blocks of near-equal rows (``shuffle``: rows
        randomly redistributed; ``keys``: hash-partitioned, so all rows of
        one key value are in one block, sorted by the keys with ``sort``),
        or blocks of ``target_num_rows_per_block`` rows (the last may be
        smaller; with or without ``strict``; ``keys``/``sort`` are ignored
        then, with a warning, as in Ray)."""
        if (num_blocks is None) == (target_num_rows_per_block is None):
            raise ValueError("repartition: give exactly one of num_blocks and "
                             "target_num_rows_per_block")
        if keys is not None and (isinstance(keys, str) or not keys
                                 or not all(isinstance(k, str) for k in keys)):
            raise TypeError(f"repartition: keys={keys!r}; expected a non-empty list of column "
                            f"names")
        if target_num_rows_per_block is not None and (keys is not None or sort):
            import warnings
            warnings.warn("repartition: keys= and sort= are ignored when "
                          "target_num_rows_per_block is set", stacklevel=2)
            keys, sort = None, False
        if sort and keys is None:
            raise ValueError("repartition: sort=True sorts each block by keys=; pass "
                             "keys=[...] too")
        if keys is not None:
            if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or \
                    num_blocks < 1:
                raise ValueError(f"repartition: num_blocks={num_blocks!r}; expected an int "
                                 f">= 1")
            return self._with(AllToAllOp("repartition", f"Repartition[num_blocks={num_blocks}"
                                         f", keys={list(keys)}, sort={sort}]",
                                         num_blocks=num_blocks, hash_keys=list(keys),
                                         sort=bool(sort)))
        if target_num_rows_per_block is not None:
            n = target_num_rows_per_block
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"repartition: target_num_rows_per_block={n!r}; expected an "
                                 f"int >= 1")
            if shuffle:
                raise ValueError("repartition: shuffle=True goes with num_blocks=, not with "
                                 "target_num_rows_per_block=")
            return self._with(AllToAllOp("repartition", f"Repartition[target_num_rows_per_block"
                                         f"={n}]", rows_per_block=n))
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"repartition: num_blocks={num_blocks!r}; expected an int >= 1")
        return self._with(AllToAllOp("repartition", f"Repartition[num_blocks={num_blocks}"
                                     f", shuffle={shuffle}]", num_blocks=num_blocks,
                                     shuffle=shuffle))

    def random_shuffle(self, *, seed: int | None = None, num_blocks: int | None = None,
                       **ray_remote_args: Any) -> "Dataset":
        return self._with(AllToAllOp("random_shuffle", "RandomShuffle", seed=seed,
                                     num_blocks=num_blocks))

    def randomize_block_order(self, *, seed: int | None = None) -> "Dataset":
        return self._with(AllToAllOp("randomize_block_order", "RandomizeBlockOrder",
                                     seed=seed))

    def sort(self, key: str | list[str], descending: bool | list[bool] = False,
             boundaries: list[int | float] | None = None) -> "Dataset":
        """Rows ordered by ``key``; ``boundaries``: the key values where the
        output's blocks split (``len(boundaries) + 1`` blocks)."""
        keys = normalize_sort_keys(key, descending, "sort")
        params: dict = {"keys": keys}
        if boundaries is not None:
            b = list(boundaries)
            if not b or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in b) or b != sorted(b):
                raise ValueError(f"sort: boundaries={boundaries!r}; expected a non-empty "
                                 f"ascending list of numbers")
            if len(keys) != 1:
                raise ValueError("sort: boundaries= works with a single sort key")
            params.update(boundaries=b, num_blocks=len(b) + 1)
        return self._with(AllToAllOp("sort", f"Sort[key={[k for k, _ in keys]}, descending="
                                     f"{[d == 'descending' for _, d in keys]}]", **params))

    def groupby(self, key: str | list[str] | None,
                num_partitions: int | None = None) -> "Any":
        """Rows grouped by ``key`` (``num_partitions``: blocks of the result)."""
        return GroupedData(self, key, num_partitions)

    def union(self, *other: "Dataset") -> "Dataset":
        """The rows of this dataset followed by the others' (same schema)."""
        for o in other:
            if not isinstance(o, Dataset):
                raise TypeError(f"union: expected Datasets, got {type(o).__name__}")
        return Dataset(LogicalPlan(UnionSource([self._plan] + [o._plan for o in other])))

    def zip(self, *other: "Dataset") -> "Dataset":
        """Columns side by side (equal row counts; clashing names get _1...)."""
        if len(other) != 1:
            if not other:
                raise TypeError("zip: expected another Dataset")
            out = self
            for o in other:
                out = out.zip(o)
            return out
        o = other[0]
        if not isinstance(o, Dataset):
            raise TypeError(f"zip: expected a Dataset, got {type(o).__name__}")
        return Dataset(LogicalPlan(ZipSource([self._plan, o._plan])))

    # -- splitting --------------------------------------------------------------------
    def split(self, n: int, *, equal: bool = False, locality_hints: Any = None
              ) -> list["MaterializedDataset"]:
        """``n`` materialized shards (``equal``: exactly the same row count,
        dropping the remainder)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"split: n={n!r}; expected an int >= 1")
        bundles = self.materialize()._plan.source.bundles
        total = sum(m["num_rows"] for _, m in bundles)
        if equal:
            per = total // n
            return self._split_ranges([(i * per, per) for i in range(n)], bundles)
        # whole blocks, balanced by rows
        groups: list[list] = [[] for _ in range(n)]
        rows = [0] * n
        for b in sorted(bundles, key=lambda b: -b[1]["num_rows"]):
            i = rows.index(min(rows))
            groups[i].append(b)
            rows[i] += b[1]["num_rows"]
        if any(not g for g in groups) and total >= n:
            return self._split_ranges(even_ranges(total, n), bundles)
        return [MaterializedDataset(LogicalPlan(InputSource(g or [], "Split"))) for g in groups]

    def _split_ranges(self, ranges: list[tuple[int, int]], bundles: list
                      ) -> list["MaterializedDataset"]:
        ex = Execution(DataContext.get_current(), DatasetStats())
        parts = slice_bundles(ex, [Bundle(r, m) for r, m in bundles], ranges)
        return [MaterializedDataset(LogicalPlan(InputSource([(b.ref, b.meta) for b in p],
                                                            "Split"))) for p in parts]

    def split_at_indices(self, indices: list[int]) -> list["MaterializedDataset"]:
        if list(indices) != sorted(indices) or any(i < 0 for i in indices):
            raise ValueError(f"split_at_indices: indices={indices!r}; expected sorted ints >= 0")
        bundles = self.materialize()._plan.source.bundles
        total = sum(m["num_rows"] for _, m in bundles)
        cuts = [0] + [min(i, total) for i in indices] + [total]
        return self._split_ranges([(a, b - a) for a, b in zip(cuts, cuts[1:])], bundles)

    def split_proportionately(self, proportions: list[float]) -> list["MaterializedDataset"]:
        if not proportions or any(p <= 0 for p in proportions) or sum(proportions) >= 1:
            raise ValueError(f"split_proportionately: proportions={proportions!r}; expected "
                             f"numbers > 0 summing to less than 1")
        total = self.count()
        idx, acc = [], 0.0
        for p in proportions:
            acc += p
            idx.append(int(total * acc))
        return self.split_at_indices(idx)

    def train_test_split(self, test_size: float | int, *, shuffle: bool = False,
                         seed: int | None = None, stratify: Any = None
                         ) -> tuple["MaterializedDataset", "MaterializedDataset"]:
        ds = self.random_shuffle(seed=seed) if shuffle else self
        total = ds.count()
        if isinstance(test_size, float):
            if not 0 < test_size < 1:
                raise ValueError(f"train_test_split: test_size={test_size}; a float must be "
                                 f"in (0, 1)")
            n_test = int(round(total * test_size))
        elif isinstance(test_size, int) and not isinstance(test_size, bool):
            if not 0 < test_size < total:
                raise ValueError(f"train_test_split: test_size={test_size}; an int must be in "
                                 f"(0, {total})")
            n_test = test_size
        else:
            raise TypeError(f"train_test_split: test_size={test_size!r}; expected a float or int")
        train, test = ds.split_at_indices([total - n_test])
        return train, test

    def streaming_split(self, n: int, *, equal: bool = False, locality_hints: Any = None
                        ) -> list[DataIterator]:
        """``n`` iterators over disjoint parts of one streaming execution;
        each can be passed to a task or actor (a coordinator actor holding
        no CPU hands out blocks).  All must be consumed for an epoch to end."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"streaming_split: n={n!r}; expected an int >= 1")
        return streaming_split(self._plan, n, equal)

    # -- consumption ------------------------------------------------------------------
    def iterator(self) -> DataIterator:
        return DatasetIterator(self)

    def iter_rows(self) -> Iterator[dict]:
        return self.iterator().iter_rows()

    def iter_batches(self, *, prefetch_batches: int = 1, batch_size: int | None = 256,
                     batch_format: str | None = "default", drop_last: bool = False,
                     local_shuffle_buffer_size: int | None = None,
                     local_shuffle_seed: int | None = None,
                     _collate_fn: Callable | None = None) -> Iterator[Any]:
        return self.iterator().iter_batches(
            prefetch_batches=prefetch_batches, batch_size=batch_size, batch_format=batch_format,
            drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size,
            local_shuffle_seed=local_shuffle_seed, _collate_fn=_collate_fn)

    def iter_torch_batches(self, *, prefetch_batches: int = 1, batch_size: int | None = 256,
                           dtypes: Any = None, device: Any = "auto",
                           collate_fn: Callable | None = None, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None,
                           pin_memory: bool = False) -> Iterator[Any]:
        """Batches as ``dict[str, torch.Tensor]`` (needs torch)."""
        return self.iterator().iter_torch_batches(
            prefetch_batches=prefetch_batches, batch_size=batch_size, dtypes=dtypes,
            device=device, collate_fn=collate_fn, drop_last=drop_last,
            local_shuffle_buffer_size=local_shuffle_buffer_size,
            local_shuffle_seed=local_shuffle_seed, pin_memory=pin_memory)

    def _take_table(self, limit: int | None) -> pa.Table:
        ds = self if limit is None else self.limit(limit)
        tables = list(ds._iter_tables())
        return concat(tables) if tables else pa.table({})

    def take(self, limit: int = 20) -> list[dict]:
        return list(iter_rows(self._take_table(limit)))

    def take_all(self, limit: int | None = None) -> list[dict]:
        t = self._take_table(None if limit is None else limit + 1)
        if limit is not None and t.num_rows > limit:
            raise ValueError(f"take_all: the dataset has more than limit={limit} rows")
        return list(iter_rows(t))

    def take_batch(self, batch_size: int = 20, *, batch_format: str | None = "default") -> Any:
        check_batch_format(batch_format, "take_batch")
        t = self._take_table(batch_size)
        if t.num_rows == 0:
            raise ValueError("take_batch: the dataset is empty")
        return to_batch(t, batch_format)

    def show(self, limit: int = 20) -> None:
        for row in self.take(limit):
            print(row)

    def count(self) -> int:
        src = self._plan.source
        if isinstance(src, InputSource) and not self._plan.ops:
            return sum(m["num_rows"] for _, m in src.bundles)
        if isinstance(src, ReadSource) and not self._plan.ops and all(
                t.num_rows is not None for t in src.tasks):
            return sum(t.num_rows for t in src.tasks)  # type: ignore[misc]
        n = 0
        for b in self._execute():
            n += b.num_rows
            b.release()
        return n

    def schema(self, fetch_if_missing: bool = True) -> Schema | None:
        return plan_schema(self._plan, fetch_if_missing, self._execute)

    def columns(self, fetch_if_missing: bool = True) -> list[str] | None:
        s = self.schema(fetch_if_missing)
        return None if s is None else s.names

    def num_blocks(self) -> int:
        src = self._plan.source
        if isinstance(src, InputSource) and not self._plan.ops:
            return len(src.bundles)
        if isinstance(src, ReadSource) and not self._plan.ops:
            return len(src.tasks)
        return len(self.materialize()._plan.source.bundles)

    def size_bytes(self) -> int:
        return sum(m["size_bytes"] for _, m in self.materialize()._plan.source.bundles)

    def input_files(self) -> list[str]:
        src = self._plan.source
        if isinstance(src, ReadSource):
            return [f for t in src.tasks for f in t.input_files]
        return []

    # -- aggregates ---------------------------------------------------------------------
    def aggregate(self, *aggs: agg_mod.AggregateFn) -> dict | None:
        """Whole-dataset aggregations -> ``{name: value}``."""
        return global_aggregate(self, aggs)

    def _agg1(self, cls: type[agg_mod._Builtin], on: Any, ignore_nulls: bool, **kw: Any) -> Any:
        if on is None:
            on = self.columns()
        cols = [on] if isinstance(on, str) else list(on)
        res = self.aggregate(*[cls(c, ignore_nulls=ignore_nulls, **kw) for c in cols])
        if res is None:
            return None
        return res[f"{cls.func_name}({cols[0]})"] if isinstance(on, str) else res

    def sum(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._agg1(agg_mod.Sum, on, ignore_nulls)

    def min(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._agg1(agg_mod.Min, on, ignore_nulls)

    def max(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._agg1(agg_mod.Max, on, ignore_nulls)

    def mean(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._agg1(agg_mod.Mean, on, ignore_nulls)

    def std(self, on: str | list[str] | None = None, ddof: int = 1,
            ignore_nulls: bool = True) -> Any:
        return self._agg1(agg_mod.Std, on, ignore_nulls, ddof=ddof)

    def unique(self, column: str, ignore_nulls: bool = False) -> list:
        """The distinct values of ``column`` (None among them unless
        ``ignore_nulls``)."""
        if not isinstance(column, str):
            raise TypeError(f"unique: column={column!r}; expected a column name")
        res = self.aggregate(agg_mod.Unique(column, ignore_nulls=ignore_nulls))
        return [] if res is None else res[f"unique({column})"]

    # -- conversion -------------------------------------------------------------------
    def to_pandas(self, limit: int | None = None) -> Any:
        pd = require_pandas()
        t = self._take_table(limit)
        if t.num_columns == 0:
            return pd.DataFrame()
        return to_batch(t, "pandas")

    def to_arrow_refs(self) -> list:
        return [r for r, _ in self.materialize()._plan.source.bundles]

    def to_pandas_refs(self) -> list:
        return [_convert_ref.remote(r, "pandas", None) for r in self.to_arrow_refs()]

    def to_numpy_refs(self, *, column: str | None = None) -> list:
        return [_convert_ref.remote(r, "numpy", column) for r in self.to_arrow_refs()]

    def materialize(self) -> "MaterializedDataset":
        """Execute now; the blocks stay in the store while the result lives."""
        if isinstance(self, MaterializedDataset):
            return self
        self._last_stats = DatasetStats()
        bundles = materialize_bundles(self._plan, self._last_stats)
        out = MaterializedDataset(LogicalPlan(InputSource(bundles, "Materialized")))
        out._last_stats = self._last_stats
        out._made_from = self._plan  # drawn by flowcore.visualize(ds)
        return out

    # -- writing ----------------------------------------------------------------------
    def _write(self, path: str, filesystem: Any, ext: str, writer: Any, op: str, *,
               try_create_dir: bool = True, arrow_open_stream_args: Any = None,
               filename_provider: Any = None, min_rows_per_file: int | None = None,
               max_rows_per_file: int | None = None, ray_remote_args: dict | None = None,
               concurrency: int | None = None, num_rows_per_file: int | None = None,
               mode: Any = "append", partition_cols: Any = None) -> None:
        """One file per block (or per ``min_rows_per_file`` rows), written
        under a temporary name and renamed; a failed write removes what it
        wrote.  ``mode``: "append"/"create" (add files), "overwrite" (empty
        the directory first), "error" (fail if it has files), "ignore" (do
        nothing if it has files)."""
        mode_s = str(getattr(mode, "value", mode)).lower()
        if mode_s not in ("append", "create", "overwrite", "error", "ignore"):
            raise ValueError(f"{op}: mode={mode!r}; expected one of SaveMode.APPEND, CREATE, "
                             f"OVERWRITE, ERROR, IGNORE")
        if arrow_open_stream_args:
            raise NotImplementedError(f"{op}: arrow_open_stream_args= is not supported; "
                                      f"write without it (parquet compression goes in "
                                      f"compression=...)")
        min_rows = min_rows_per_file if min_rows_per_file is not None else num_rows_per_file
        for name, v in (("min_rows_per_file", min_rows), ("max_rows_per_file",
                                                         max_rows_per_file)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{op}: {name}={v!r}; expected an int >= 1")
        if min_rows and max_rows_per_file and min_rows > max_rows_per_file:
            raise ValueError(f"{op}: min_rows_per_file={min_rows} is above "
                             f"max_rows_per_file={max_rows_per_file}")
        _check_concurrency(concurrency, None, op)
        remote = {k: v for k, v in (ray_remote_args or {}).items() if k != "memory"}
        if remote:
            _check_remote_args(remote, False, op)
        sink = FileDatasink(path, filesystem, ext, writer, op, try_create_dir=try_create_dir,
                            filename_provider=filename_provider,
                            max_rows_per_file=max_rows_per_file, partition_cols=partition_cols)
        before = set(sink.existing_files())
        if before and mode_s == "error":
            raise FileExistsError(f"{op}: {path!r} already holds {len(before)} files and "
                                  f"mode=ERROR; pick another path or mode=OVERWRITE/APPEND")
        if before and mode_s == "ignore":
            return
        if before and mode_s == "overwrite":
            sink.delete_existing()
            before = set()
        ds = self._with(MapOp("write", f"Write[{op}]", None, params={"sink": sink},
                              batch_size=min_rows, concurrency=concurrency,
                              remote_args=remote))
        try:
            for b in ds._execute():
                b.release()
        except BaseException:
            sink.cleanup(before)
            raise
        self._last_stats = ds._last_stats

    def write_parquet(self, path: str, *, partition_cols: list[str] | None = None,
                      filesystem: Any = None, try_create_dir: bool = True,
                      arrow_open_stream_args: dict | None = None,
                      filename_provider: Any = None, arrow_parquet_args_fn: Any = None,
                      min_rows_per_file: int | None = None,
                      max_rows_per_file: int | None = None,
                      ray_remote_args: dict | None = None, concurrency: int | None = None,
                      num_rows_per_file: int | None = None, mode: Any = "append",
                      **arrow_parquet_args: Any) -> None:
        """Parquet files under directory ``path`` (one per block, or per
        ``min_rows_per_file`` rows, split at ``max_rows_per_file``)."""
        args = dict(arrow_parquet_args_fn() if arrow_parquet_args_fn else {},
                    **arrow_parquet_args)
        self._write(path, filesystem, "parquet", parquet_writer(args), "write_parquet",
                    try_create_dir=try_create_dir,
                    arrow_open_stream_args=arrow_open_stream_args,
                    filename_provider=filename_provider, min_rows_per_file=min_rows_per_file,
                    max_rows_per_file=max_rows_per_file, ray_remote_args=ray_remote_args,
                    concurrency=concurrency, num_rows_per_file=num_rows_per_file, mode=mode,
                    partition_cols=partition_cols)

    def write_csv(self, path: str, *, filesystem: Any = None, try_create_dir: bool = True,
                  arrow_open_stream_args: dict | None = None, filename_provider: Any = None,
                  arrow_csv_args_fn: Any = None, min_rows_per_file: int | None = None,
                  ray_remote_args: dict | None = None, concurrency: int | None = None,
                  num_rows_per_file: int | None = None, mode: Any = "append",
                  **arrow_csv_args: Any) -> None:
        """CSV files under directory ``path`` (``arrow_csv_args`` go to
        ``pyarrow.csv.write_csv``)."""
        args = dict(arrow_csv_args_fn() if arrow_csv_args_fn else {}, **arrow_csv_args)
        self._write(path, filesystem, "csv", csv_writer(args), "write_csv",
                    try_create_dir=try_create_dir,
                    arrow_open_stream_args=arrow_open_stream_args,
                    filename_provider=filename_provider, min_rows_per_file=min_rows_per_file,
                    ray_remote_args=ray_remote_args, concurrency=concurrency,
                    num_rows_per_file=num_rows_per_file, mode=mode)

    def write_json(self, path: str, *, filesystem: Any = None, try_create_dir: bool = True,
                   arrow_open_stream_args: dict | None = None, filename_provider: Any = None,
                   pandas_json_args_fn: Any = None, min_rows_per_file: int | None = None,
                   ray_remote_args: dict | None = None, concurrency: int | None = None,
                   num_rows_per_file: int | None = None, mode: Any = "append",
                   **pandas_json_args: Any) -> None:
        """Newline-delimited JSON files (Ray's default ``orient="records",
        lines=True``; other pandas options are refused)."""
        args = dict(pandas_json_args_fn() if pandas_json_args_fn else {}, **pandas_json_args)
        if args.get("orient", "records") != "records" or not args.get("lines", True) or (
                set(args) - {"orient", "lines"}):
            raise NotImplementedError(f"write_json: only newline-delimited records are "
                                      f"written; got pandas options {args}")
        self._write(path, filesystem, "json", json_writer(), "write_json",
                    try_create_dir=try_create_dir,
                    arrow_open_stream_args=arrow_open_stream_args,
                    filename_provider=filename_provider, min_rows_per_file=min_rows_per_file,
                    ray_remote_args=ray_remote_args, concurrency=concurrency,
                    num_rows_per_file=num_rows_per_file, mode=mode)

    def write_numpy(self, path: str, *, column: str, filesystem: Any = None,
                    try_create_dir: bool = True, arrow_open_stream_args: dict | None = None,
                    filename_provider: Any = None, min_rows_per_file: int | None = None,
                    ray_remote_args: dict | None = None, concurrency: int | None = None,
                    num_rows_per_file: int | None = None, mode: Any = "append") -> None:
        """``.npy`` files of ``column``."""
        self._write(path, filesystem, "npy", numpy_writer(column), "write_numpy",
                    try_create_dir=try_create_dir,
                    arrow_open_stream_args=arrow_open_stream_args,
                    filename_provider=filename_provider, min_rows_per_file=min_rows_per_file,
                    ray_remote_args=ray_remote_args, concurrency=concurrency,
                    num_rows_per_file=num_rows_per_file, mode=mode)

    # -- introspection ---------------------------------------------------------------
    @property
    def name(self) -> str | None:
        """The name given with ``set_name`` (shown in stats and the dashboard)."""
        return self._name

    def set_name(self, name: str | None) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"set_name: name={name!r}; expected a str or None")
        self._name = name

    def get_dataset_id(self) -> str:
        """A unique id of this dataset (a new one per transformation)."""
        name = self._name or "dataset"
        return f"{name}_{self._uuid}"

    @property
    def context(self) -> DataContext:
        """The DataContext executions of this dataset use."""
        return DataContext.get_current()

    def copy(self) -> "Dataset":
        """A dataset with the same plan (and blocks, if materialized)."""
        out = type(self)(self._plan)
        out._name, out._made_from, out._last_stats = self._name, self._made_from, \
            self._last_stats
        return out

    def explain(self) -> None:
        """Print the logical plan and the physical stages it runs as."""
        print("-------- Logical Plan --------")
        print(repr(self))
        print("-------- Physical Plan --------")
        print(describe_stages(self._plan))


    def stats(self) -> str:
        """Per-operator wall time, tasks, rows and bytes of the latest run."""
        return (self._last_stats or DatasetStats()).to_string()

    def _source_summary(self) -> str:
        src = self._plan.source
        if isinstance(src, InputSource):
            rows = sum(m["num_rows"] for _, m in src.bundles)
            schema = next((m["schema"] for _, m in src.bundles if m["schema"] is not None
                           and len(m["schema"])), None)
            return f"{src.name}(num_rows={rows}, schema={schema_str(schema)})"
        if isinstance(src, ReadSource):
            rows = [t.num_rows for t in src.tasks]
            n = sum(rows) if all(r is not None for r in rows) else "?"  # type: ignore[misc]
            return f"{src.name}(num_blocks={len(src.tasks)}, num_rows={n})"
        return f"{src.name}[{len(src.plans)} inputs]"

    def __repr__(self) -> str:
        lines = [repr(o) for o in reversed(self._plan.ops)] + [self._source_summary()]
        out = lines[0]
        for depth, line in enumerate(lines[1:], 1):
            out += "\n" + "   " * (depth - 1) + "+- " + line
        return out

    def __iter__(self) -> Any:
        raise TypeError("a Dataset is not iterable; use iter_rows() or iter_batches()")

    def __flowcore_graph__(self) -> Any:
        """``flowcore.visualize(ds)``: the plan, the executed operators with
        their counts and (materialized) the tasks that made the blocks."""
        return plan_digraph(self)


class MaterializedDataset(Dataset):
    """A dataset whose blocks are already in the object store."""

