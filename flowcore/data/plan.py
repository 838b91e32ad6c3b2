"""The logical plan: a source (read tasks, blocks already in the store, a
union or a zip of other plans) followed by operators.

Map-like operators (``map``, ``map_batches``, ``filter``, column edits...)
turn into block transforms ``(Iterator[Table], TaskContext) -> Iterator[Table]``
that the executor fuses into one task; all-to-all operators (sort, shuffle,
repartition, groupby) are barriers the executor runs with ``shuffle``'s
kernels.  ``run_local`` executes a whole plan in one process: it is the
single-task path for small plans.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from . import shuffle
from .block import (concat, describe_batch, describe_row, iter_rows, rows_to_table, schema_str,
                    to_batch, to_table)
from .iterator import batch_tables

__all__ = [
    "TaskContext", "ReadTask", "MapOp", "AllToAllOp", "LimitOp", "LogicalPlan",
    "InputSource", "ReadSource", "UnionSource", "ZipSource", "run_local",
    "apply_transforms", "fn_name",
]


@dataclasses.dataclass
class TaskContext:
    task_index: int = 0
    op_name: str = ""


def fn_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class ReadTask:
    """One unit of reading: ``read()`` yields Tables.  ``num_rows`` and
    ``size_bytes`` are estimates (``None`` when unknown)."""

    def __init__(self, read: Callable[[], Iterator[pa.Table]], num_rows: int | None,
                 size_bytes: int | None, input_files: Sequence[str] = ()) -> None:
        self.read = read
        self.num_rows = num_rows
        self.size_bytes = size_bytes
        self.input_files = list(input_files)


# -- map-like operators ---------------------------------------------------
class MapOp:
    """A row/batch operator.  ``kind``: map, map_batches, flat_map, filter,
    add_column, drop_columns, select_columns, rename_columns, random_sample,
    write.  A callable class ``fn`` runs in an actor pool (``is_actor``)."""

    def __init__(self, kind: str, name: str, fn: Any = None, *, batch_size: Any = None,
                 batch_format: Any = "default", fn_args: Sequence = (),
                 fn_kwargs: dict | None = None, fn_constructor_args: Sequence = (),
                 fn_constructor_kwargs: dict | None = None, concurrency: Any = None,
                 num_cpus: float | None = None, num_gpus: float | None = None,
                 params: dict | None = None, remote_args: dict | None = None) -> None:
        self.kind = kind
        self.name = name
        self.fn = fn
        self.batch_size = batch_size
        self.batch_format = batch_format
        self.fn_args = tuple(fn_args or ())
        self.fn_kwargs = dict(fn_kwargs or {})
        self.ctor_args = tuple(fn_constructor_args or ())
        self.ctor_kwargs = dict(fn_constructor_kwargs or {})
        self.concurrency = concurrency
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.params = dict(params or {})
        self.remote_args = dict(remote_args or {})
        self.is_actor = inspect.isclass(fn)
        self._instance: Any = None

    def __repr__(self) -> str:
        return self.name

    # the callable: the function, or the actor's instance of the class
    def setup(self) -> None:
        if self.is_actor and self._instance is None:
            self._instance = self.fn(*self.ctor_args, **self.ctor_kwargs)

    def _callable(self) -> Callable:
        if self.is_actor:
            self.setup()
            return self._instance
        return self.fn

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_instance"] = None
        return d

    def __call__(self, blocks: Iterator[pa.Table], ctx: TaskContext) -> Iterator[pa.Table]:
        return getattr(self, "_t_" + self.kind)(blocks, ctx)

    # -- transforms ---------------------------------------------------
    def _t_map(self, blocks: Iterator[pa.Table], ctx: TaskContext) -> Iterator[pa.Table]:
        fn = self._callable()
        for t in blocks:
            out = []
            for row in iter_rows(t):
                try:
                    res = fn(row, *self.fn_args, **self.fn_kwargs)
                except Exception as e:
                    e.add_note(f"flowcore.data: {self.name} failed on {describe_row(row)}")
                    raise
                if not isinstance(res, dict):
                    raise TypeError(f"{self.name}: the function returned "
                                    f"{type(res).__name__}; expected a dict (one row)")
                out.append(res)
            yield rows_to_table(out, self.name) if out else t.slice(0, 0)

    def _t_flat_map(self, blocks: Iterator[pa.Table], ctx: TaskContext) -> Iterator[pa.Table]:
        fn = self._callable()
        for t in blocks:
            out: list = []
            for row in iter_rows(t):
                try:
                    res = fn(row, *self.fn_args, **self.fn_kwargs)
                except Exception as e:
                    e.add_note(f"flowcore.data: {self.name} failed on {describe_row(row)}")
                    raise
                if isinstance(res, dict) or not hasattr(res, "__iter__"):
                    raise TypeError(f"{self.name}: the function returned "
                                    f"{type(res).__name__}; expected a list of dicts (rows)")
                out.extend(res)
            yield rows_to_table(out, self.name) if out else t.slice(0, 0)

    def _t_filter(self, blocks: Iterator[pa.Table], ctx: TaskContext) -> Iterator[pa.Table]:
        expr = self.params.get("expr")
        if expr is not None:
            for t in blocks:
                yield t.filter(expr)
            return
        fn = self._callable()
        for t in blocks:
            mask = []
            for row in iter_rows(t):
                try:
                    keep = fn(row, *self.fn_args, **self.fn_kwargs)
                except Exception as e:
                    e.add_note(f"flowcore.data: {self.name} failed on {describe_row(row)}")
                    raise
                if not isinstance(keep, (bool, np.bool_)):
                    raise TypeError(f"{self.name}: the function returned "
                                    f"{type(keep).__name__}; expected a bool")
                mask.append(bool(keep))
            yield t.filter(pa.array(mask, type=pa.bool_())) if t.num_rows else t

    def _t_map_batches(self, blocks: Iterator[pa.Table], ctx: TaskContext
                       ) -> Iterator[pa.Table]:
        """Batches of exactly ``batch_size`` rows cut across the blocks of
        this call (the last may be smaller; ``None``: one batch per block).
        The executor hands a call a multiple of ``batch_size`` rows, so
        batches are exact across the whole dataset."""
        fn = self._callable()
        first: list[pa.Table] = []

        def nonempty() -> Iterator[pa.Table]:
            for t in blocks:
                if not first:
                    first.append(t)
                if t.num_rows:
                    yield t
        pieces = (t for t in nonempty()) if self.batch_size is None else \
            batch_tables(nonempty(), self.batch_size, False)
        produced = False
        for piece in pieces:
            produced = True
            yield from self._call_batch(fn, piece)
        if not produced and first:  # no rows: one call on the empty block fixes the schema
            yield from self._call_batch(fn, first[0])

    def _call_batch(self, fn: Callable, piece: pa.Table) -> Iterator[pa.Table]:
        batch = to_batch(piece, self.batch_format)
        try:
            res = fn(batch, *self.fn_args, **self.fn_kwargs)
            results = res if inspect.isgenerator(res) else [res]
            for r in results:
                yield to_table(r, self.name)
        except TypeError as e:
            if str(e).startswith(self.name):
                raise
            e.add_note(f"flowcore.data: {self.name} failed on {describe_batch(piece)}")
            raise
        except Exception as e:
            e.add_note(f"flowcore.data: {self.name} failed on {describe_batch(piece)}")
            raise

    @property
    def keeps_row_count(self) -> bool:
        """One output row per input row (batch boundaries stay put)."""
        return self.kind in ("map", "add_column", "drop_columns", "select_columns",
                             "rename_columns")

    @property
    def exact_batch_size(self) -> int | None:
        """The rows per call this operator needs its input cut into."""
        return self.batch_size if self.kind in ("map_batches", "write") else None

    def _t_add_column(self, blocks: Iterator[pa.Table], ctx: TaskContext) -> Iterator[pa.Table]:
        col = self.params["col"]
        for t in blocks:
            batch = to_batch(t, self.batch_format)
            try:
                values = self.fn(batch)
            except Exception as e:
                e.add_note(f"flowcore.data: {self.name} failed on {describe_batch(t)}")
                raise
            arr = to_table({col: values}, self.name).column(col)
            if len(arr) != t.num_rows:
                raise ValueError(f"{self.name}: the function returned {len(arr)} values for a "
                                 f"batch of {t.num_rows} rows; expected one per row")
            if col in t.column_names:
                t = t.set_column(t.column_names.index(col), col, arr)
            else:
                t = t.append_column(col, arr)
            yield t

    def _t_drop_columns(self, blocks: Iterator[pa.Table], ctx: TaskContext
                        ) -> Iterator[pa.Table]:
        cols = self.params["cols"]
        for t in blocks:
            if t.num_columns:
                shuffle.check_columns(t, cols, self.name)
                t = t.drop_columns(cols)
            yield t

    def _t_select_columns(self, blocks: Iterator[pa.Table], ctx: TaskContext
                          ) -> Iterator[pa.Table]:
        cols = self.params["cols"]
        for t in blocks:
            if t.num_columns:
                shuffle.check_columns(t, cols, self.name)
                t = t.select(cols)
            yield t

    def _t_rename_columns(self, blocks: Iterator[pa.Table], ctx: TaskContext
                          ) -> Iterator[pa.Table]:
        names = self.params["names"]
        for t in blocks:
            if not t.num_columns:
                yield t
                continue
            if isinstance(names, dict):
                shuffle.check_columns(t, list(names), self.name)
                new = [names.get(c, c) for c in t.column_names]
            else:
                if len(names) != t.num_columns:
                    raise ValueError(f"{self.name}: {len(names)} names given for "
                                     f"{t.num_columns} columns {t.column_names}")
                new = list(names)
            yield t.rename_columns(new)

    def _t_random_sample(self, blocks: Iterator[pa.Table], ctx: TaskContext
                         ) -> Iterator[pa.Table]:
        seed = self.params.get("seed")
        rng = np.random.default_rng(None if seed is None else [seed, ctx.task_index])
        frac = self.params["fraction"]
        for t in blocks:
            yield t.filter(pa.array(rng.random(t.num_rows) < frac, type=pa.bool_()))

    def _t_write(self, blocks: Iterator[pa.Table], ctx: TaskContext) -> Iterator[pa.Table]:
        sink = self.params["sink"]
        t = concat(list(blocks))
        paths = sink.write_table(t, ctx.task_index) if t.num_rows else [None]
        yield pa.table({"path": pa.array(paths, type=pa.string()),
                        "num_rows": pa.array([t.num_rows] + [0] * (len(paths) - 1),
                                             type=pa.int64())})


def apply_transforms(blocks: Iterator[pa.Table], transforms: Sequence[MapOp],
                     ctx: TaskContext) -> pa.Table:
    """Run fused transforms over ``blocks``; one output table."""
    it = blocks
    for t in transforms:
        it = t(it, TaskContext(ctx.task_index, t.name))
    return concat(list(it))


# -- all-to-all and limit ---------------------------------------------------
class AllToAllOp:
    """kind: sort, random_shuffle, repartition, randomize_block_order,
    aggregate, map_groups."""

    def __init__(self, kind: str, name: str, **params: Any) -> None:
        self.kind = kind
        self.name = name
        self.params = params

    def __repr__(self) -> str:
        return self.name

    def reduce(self, table: pa.Table, index: int = 0) -> pa.Table:
        """The reduce kernel for one partition (also the one-block path)."""
        p = self.params
        if self.kind == "sort":
            return shuffle.sort_table(table, p["keys"], self.name)
        if self.kind == "random_shuffle":
            seed = p.get("seed")
            return shuffle.permute(table, None if seed is None else seed + 7919 * index)
        if self.kind == "repartition" and p.get("sort"):
            return shuffle.sort_table(table, [(k, "ascending") for k in p["hash_keys"]],
                                      self.name)
        if self.kind == "aggregate":
            return shuffle.groupby_aggregate(table, [k for k, _ in p["keys"]], p["aggs"],
                                             self.name)
        if self.kind == "aggregate_final":
            return shuffle.final_aggregate(table, [k for k, _ in p["keys"]], p["aggs"])
        if self.kind == "map_groups":
            return shuffle.map_groups_table(table, [k for k, _ in p["keys"]], p["fn"],
                                            p["batch_format"],
                                            p["fn_args"], p["fn_kwargs"], self.name)
        return table

    def sort_bounds(self) -> list:
        """The user's ``sort(boundaries=)`` in range_partition's order."""
        b = list(self.params["boundaries"])
        return b[::-1] if self.params["keys"][0][1] == "descending" else b

    def local(self, tables: list[pa.Table]) -> list[pa.Table]:
        if self.kind == "randomize_block_order":
            rng = np.random.default_rng(self.params.get("seed"))
            return [tables[i] for i in rng.permutation(len(tables))]
        t = concat(tables)
        if self.kind == "repartition" and self.params.get("rows_per_block"):
            return [t.slice(*r) for r in fixed_ranges(t.num_rows, self.params["rows_per_block"])]
        if self.kind == "repartition" and self.params.get("hash_keys"):
            parts = shuffle.hash_partition(t, self.params["hash_keys"],
                                           self.params["num_blocks"])
            return [self.reduce(part) for part in parts]
        if self.kind == "repartition":
            n = self.params["num_blocks"]
            if self.params.get("shuffle"):
                t = shuffle.permute(t, None)
            return [t.slice(*r) for r in even_ranges(t.num_rows, n)]
        out = self.reduce(t)
        n = self.params.get("num_blocks")
        if self.kind == "sort" and self.params.get("boundaries"):
            (key, direction), = self.params["keys"]
            bounds = self.sort_bounds()   # len(bounds) + 1 == num_blocks
            return shuffle.range_partition(out, key, direction == "descending", bounds,
                                           len(bounds) + 1)
        if n and n > 1:
            return [out.slice(*r) for r in even_ranges(out.num_rows, n)]
        return [out]


def fixed_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of consecutive pieces of ``size`` rows (the last smaller)."""
    return [(o, min(size, total - o)) for o in range(0, total, size)] or [(0, 0)]


def even_ranges(total: int, n: int) -> list[tuple[int, int]]:
    """(offset, length) of ``n`` near-equal consecutive pieces of ``total``."""
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        ln = base + (1 if i < extra else 0)
        out.append((start, ln))
        start += ln
    return out


class LimitOp:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.name = f"Limit[limit={limit}]"
        self.kind = "limit"

    def __repr__(self) -> str:
        return self.name


# -- sources and the plan ----------------------------------------------------
class InputSource:
    """Blocks already in the store: ``bundles`` is a list of (ref, meta)."""
    def __init__(self, bundles: list, name: str = "InputData") -> None:
        self.bundles = bundles
        self.name = name

    def size_bytes(self) -> int | None:
        return sum(m["size_bytes"] for _, m in self.bundles)


class ReadSource:
    """Read tasks; ``remote_args`` (num_cpus=, ...) and ``concurrency`` (read
    tasks in flight) apply to the tasks that run them."""
    def __init__(self, tasks: list[ReadTask], name: str, remote_args: dict | None = None,
                 concurrency: int | None = None) -> None:
        self.tasks = tasks
        self.name = name
        self.remote_args = dict(remote_args or {})
        self.concurrency = concurrency

    def size_bytes(self) -> int | None:
        sizes = [s for t in self.tasks if (s := t.size_bytes) is not None]
        return sum(sizes) if len(sizes) == len(self.tasks) else None


class UnionSource:
    def __init__(self, plans: list["LogicalPlan"]) -> None:
        self.plans = plans
        self.name = "Union"

    def size_bytes(self) -> int | None:
        sizes = [s for p in self.plans if (s := p.input_size()) is not None]
        return sum(sizes) if len(sizes) == len(self.plans) else None


class ZipSource:
    def __init__(self, plans: list["LogicalPlan"]) -> None:
        self.plans = plans
        self.name = "Zip"

    def size_bytes(self) -> int | None:
        return UnionSource.size_bytes(self)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class LogicalPlan:
    source: Any
    ops: tuple = ()

    def with_op(self, op: Any) -> "LogicalPlan":
        return LogicalPlan(self.source, self.ops + (op,))

    def input_size(self) -> int | None:
        return self.source.size_bytes()

    def has_actors(self) -> bool:
        if any(isinstance(o, MapOp) and o.is_actor for o in self.ops):
            return True
        return any(p.has_actors() for p in getattr(self.source, "plans", []))

    def sets_blocks(self) -> bool:
        """An operator decides the output's blocks (repartition, a sort with
        boundaries, num_blocks/num_partitions): not run as one block."""
        if any(isinstance(o, AllToAllOp) and (o.params.get("num_blocks")
                                              or o.params.get("rows_per_block"))
               for o in self.ops):
            return True
        return any(p.sets_blocks() for p in getattr(self.source, "plans", []))

    def has_write(self) -> bool:
        return any(isinstance(o, MapOp) and o.kind == "write" for o in self.ops)

    def describe(self) -> str:
        lines = [repr(o) for o in reversed(self.ops)]
        src = self.source
        if isinstance(src, (UnionSource, ZipSource)):
            lines.append(f"{src.name}[{len(src.plans)} inputs]")
        else:
            lines.append(src.name)
        out = lines[0]
        for depth, line in enumerate(lines[1:], 1):
            out += "\n" + "   " * (depth - 1) + "+- " + line
        return out


# -- single-process execution (the small-plan path) -----------------------
def zip_tables(tables: list[pa.Table], op: str = "zip") -> pa.Table:
    n = tables[0].num_rows
    for t in tables[1:]:
        if t.num_rows != n:
            raise ValueError(f"{op}: the datasets have different numbers of rows "
                             f"({[x.num_rows for x in tables]}); zip needs equal row counts")
    out = tables[0]
    for t in tables[1:]:
        for name in t.column_names:
            new = name
            i = 1
            while new in out.column_names:
                new = f"{name}_{i}"
                i += 1
            out = out.append_column(new, t.column(name))
    return out


def check_union_schemas(tables: list[pa.Table]) -> None:
    schemas = [t.schema for t in tables if t.num_columns]
    for s in schemas[1:]:
        if s.names != schemas[0].names or not all(
                a.type == b.type or pa.types.is_null(a.type) or pa.types.is_null(b.type)
                for a, b in zip(s, schemas[0])):
            raise ValueError(f"union: the datasets' schemas differ: {schema_str(schemas[0])} "
                             f"vs {schema_str(s)}; expected the same column names and types "
                             f"(use select_columns/rename_columns or a map_batches cast first)")


def run_local(plan: LogicalPlan, inputs: list[pa.Table]) -> list[pa.Table]:
    """Execute ``plan`` in this process.  ``inputs``: the tables of an
    InputSource (already fetched) in order; nested plans take theirs from
    the front of the list."""
    tables = _source_local(plan.source, inputs)
    pending: list[MapOp] = []
    index = 0

    def flush(ts: list[pa.Table]) -> list[pa.Table]:
        nonlocal pending
        if not pending:
            return ts
        if any(o.exact_batch_size for o in pending):
            # batches cut across blocks: the blocks go through as one stream
            out = [apply_transforms(iter(ts), pending, TaskContext(0))]
        else:
            out = [apply_transforms(iter([t]), pending, TaskContext(i))
                   for i, t in enumerate(ts)]
        pending = []
        return out

    for op in plan.ops:
        if isinstance(op, MapOp):
            pending.append(op)
            continue
        tables = flush(tables)
        if isinstance(op, LimitOp):
            out, left = [], op.limit
            for t in tables:
                if left <= 0:
                    break
                out.append(t.slice(0, left))
                left -= min(left, t.num_rows)
            tables = out
        else:
            tables = op.local(tables)
        index += 1
    tables = flush(tables)
    return tables


def _source_local(src: Any, inputs: list[pa.Table]) -> list[pa.Table]:
    if isinstance(src, InputSource):
        out = inputs[:len(src.bundles)]
        del inputs[:len(src.bundles)]
        return out
    if isinstance(src, ReadSource):
        return [concat(list(t.read())) for t in src.tasks]
    if isinstance(src, UnionSource):
        parts = [concat(run_local(p, inputs)) for p in src.plans]
        check_union_schemas(parts)
        return parts
    if isinstance(src, ZipSource):
        return [zip_tables([concat(run_local(p, inputs)) for p in src.plans])]
    raise TypeError(f"unknown source {src!r}")


def plan_objects(plan: LogicalPlan) -> list:
    """Every source (nested ones too) and operator of ``plan``."""
    src = plan.source
    out = [o for p in getattr(src, "plans", []) for o in plan_objects(p)]
    return out + [src] + list(plan.ops)


def input_bundles(plan: LogicalPlan) -> list:
    """The (ref, meta) bundles a plan's InputSources hold, in run_local order."""
    src = plan.source
    if isinstance(src, InputSource):
        return list(src.bundles)
    if isinstance(src, (UnionSource, ZipSource)):
        return [b for p in src.plans for b in input_bundles(p)]
    return []


__all__ += ["even_ranges", "fixed_ranges", "zip_tables", "check_union_schemas", "input_bundles",
            "plan_objects"]
