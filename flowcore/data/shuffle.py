"""All-to-all kernels on Arrow tables: sorting, range and random
partitioning, grouped aggregation and per-group mapping.

The executor runs them as map tasks (partition each block into N parts)
and reduce tasks (combine part i of every block); the single-block fast
path calls the same reduce kernels on one table.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .aggregate import AbsMax, AggregateFn, Count, Max, Mean, Min, Std, Sum, _Builtin
from .block import concat, iter_rows, rows_to_table, to_batch, to_table

__all__ = [
    "normalize_sort_keys", "sort_table", "sample_keys", "boundaries_from_samples",
    "range_partition", "random_partition", "groupby_aggregate", "map_groups_table",
    "split_groups",
]


def normalize_sort_keys(key: Any, descending: Any, op: str) -> list[tuple[str, str]]:
    keys = [key] if isinstance(key, str) else list(key or [])
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{op}: key={key!r}; expected a column name or a list of them")
    if isinstance(descending, bool):
        desc = [descending] * len(keys)
    else:
        desc = list(descending)
        if len(desc) != len(keys) or not all(isinstance(d, bool) for d in desc):
            raise ValueError(f"{op}: descending={descending!r}; expected a bool or one bool "
                             f"per key ({len(keys)})")
    return [(k, "descending" if d else "ascending") for k, d in zip(keys, desc)]


def check_columns(table: pa.Table, cols: Sequence[str], op: str) -> None:
    for c in cols:
        if c not in table.column_names:
            raise KeyError(f"{op}: unknown column {c!r}; the dataset has columns "
                           f"{table.column_names}")


def sort_table(table: pa.Table, keys: list[tuple[str, str]], op: str = "sort") -> pa.Table:
    if table.num_rows == 0:
        return table
    check_columns(table, [k for k, _ in keys], op)
    idx = pc.sort_indices(table, sort_keys=keys)  # nulls sort last
    return table.take(idx)


def sample_keys(table: pa.Table, key: str, n: int, seed: int) -> list:
    if table.num_rows == 0:
        return []
    col = table.column(key)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, table.num_rows, size=min(n, table.num_rows))
    return [v for v in col.take(pa.array(idx)).to_pylist() if v is not None]


def boundaries_from_samples(samples: list, n: int, descending: bool) -> list:
    """``n - 1`` cut points splitting ``samples`` into ``n`` ranges."""
    if n <= 1 or not samples:
        return []
    s = sorted(samples)
    cuts = [s[min(len(s) - 1, (i * len(s)) // n)] for i in range(1, n)]
    return cuts[::-1] if descending else cuts


def _key_numpy(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """Values (nulls filled) and the null mask of a sort key column."""
    nulls = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None
    vals = col.to_numpy(zero_copy_only=False)
    if nulls is not None:
        vals = vals.copy()
        good = vals[~nulls]
        fill = good[0] if len(good) else 0
        vals[nulls] = fill
    return vals, nulls


def range_partition(table: pa.Table, key: str, descending: bool, bounds: list,
                    n: int) -> list[pa.Table]:
    """Split ``table`` into ``n`` parts by ranges of ``key`` (nulls last)."""
    if n == 1:
        return [table]
    vals, nulls = _key_numpy(table.column(key))
    if descending:
        asc = np.asarray(bounds[::-1], dtype=vals.dtype if vals.dtype != object else object)
        part = (n - 1) - np.searchsorted(asc, vals, side="left")
    else:
        b = np.asarray(bounds, dtype=vals.dtype if vals.dtype != object else object)
        part = np.searchsorted(b, vals, side="right")
    if nulls is not None:
        part[nulls] = n - 1
    return _split_by(table, part, n)


def _split_by(table: pa.Table, part: np.ndarray, n: int) -> list[pa.Table]:
    order = np.argsort(part, kind="stable")
    counts = np.bincount(part, minlength=n)
    taken = table.take(pa.array(order))
    out, start = [], 0
    for c in counts:
        out.append(taken.slice(start, int(c)))
        start += int(c)
    return out


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit finalizer (splitmix64): equal inputs, equal outputs, in
    every process (Python's ``hash`` of a str differs per process)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _column_hash(col: pa.ChunkedArray) -> np.ndarray:
    """A process-independent uint64 hash of each value of ``col`` (nulls
    hash alike; values of one type hash alike wherever they are)."""
    import zlib
    typ = col.type
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        arr = col if typ == pa.int64() else col.cast(pa.int64(), safe=False)
        vals = np.asarray(arr.fill_null(0).to_numpy(), dtype=np.int64).view(np.uint64)
    elif pa.types.is_floating(typ):
        f = np.asarray(col.cast(pa.float64()).fill_null(0.0).to_numpy(), dtype=np.float64)
        vals = (f + 0.0).view(np.uint64)   # + 0.0: -0.0 and 0.0 hash alike
    else:   # strings, binaries, anything else: each distinct value hashed once
        enc = col.combine_chunks().dictionary_encode() if col.num_chunks else \
            pa.array([], typ).dictionary_encode()
        words = np.fromiter((zlib.crc32(repr(v).encode()) | (zlib.adler32(repr(v).encode())
                                                             << 32)
                             for v in enc.dictionary.to_pylist()), dtype=np.uint64,
                            count=len(enc.dictionary))
        idx = np.asarray(enc.indices.fill_null(0).to_numpy(zero_copy_only=False),
                         dtype=np.int64)
        vals = words[idx] if len(words) else np.zeros(len(idx), np.uint64)
    h = _mix64(vals.astype(np.uint64, copy=False))
    if col.null_count:
        nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        h = np.where(nulls, _MIX, h)
    return h


def hash_partition(table: pa.Table, keys: Sequence[str], n: int) -> list[pa.Table]:
    """``n`` parts of ``table``: the rows of one key value always land in
    the same part, whichever block or process they come from."""
    check_columns(table, keys, "repartition")
    h = np.zeros(table.num_rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = _mix64(h * np.uint64(31) + _column_hash(table.column(k)))
    return _split_by(table, (h % np.uint64(n)).astype(np.int64), n)


def random_partition(table: pa.Table, n: int, seed: int | None) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    part = rng.integers(0, n, size=table.num_rows)
    return _split_by(table, part, n)


def permute(table: pa.Table, seed: int | None) -> pa.Table:
    rng = np.random.default_rng(seed)
    return table.take(pa.array(rng.permutation(table.num_rows)))


def groupby_aggregate(table: pa.Table, keys: list[str], aggs: Sequence[AggregateFn],
                      op: str = "groupby") -> pa.Table:
    """One row per distinct key, sorted by key; columns: keys then one per
    aggregation, named as Ray names them."""
    check_columns(table, keys + [c for a in aggs for c in a.columns()], op)
    if all(isinstance(a, _Builtin) for a in aggs):
        for a in aggs:
            table = a.prepare(table)  # type: ignore[attr-defined]
        specs = [a.arrow_spec() for a in aggs]  # type: ignore[attr-defined]
        uniq: list = []
        for s in specs:
            if not any(s[0] == u[0] and s[1] == u[1] for u in uniq):
                uniq.append(s)
        grouped = table.group_by(keys, use_threads=False).aggregate(
            [(s[0], s[1], s[2]) if s[2] is not None else (s[0], s[1]) for s in uniq])
        cols = {k: grouped.column(k) for k in keys}
        for a, s in zip(aggs, specs):
            cols[a.name] = grouped.column(f"{s[0]}_{s[1]}" if s[0] else s[1])
        out = pa.table(cols)
    else:
        rows = []
        for key_vals, group in split_groups(table, keys):
            row = dict(zip(keys, key_vals))
            for a in aggs:
                acc = a.init(key_vals[0] if len(keys) == 1 else tuple(key_vals)) \
                    if not isinstance(a, _Builtin) else None
                if isinstance(a, _Builtin):
                    row[a.name] = a.final(a.block_state(group))
                else:
                    row[a.name] = a.finalize(a._accumulate(acc, group))
            rows.append(row)
        out = rows_to_table(rows, op) if rows else pa.table(
            {**{k: table.column(k).slice(0, 0) for k in keys}})
    if keys and out.num_rows:
        out = sort_table(out, [(k, "ascending") for k in keys], op)
    return out


def split_groups(table: pa.Table, keys: list[str]) -> list[tuple[list, pa.Table]]:
    """(key values, rows) per group of a table, in key order."""
    if table.num_rows == 0:
        return []
    table = sort_table(table, [(k, "ascending") for k in keys])
    ids = table.group_by(keys, use_threads=False).aggregate([([], "count_all")])
    ids = sort_table(ids, [(k, "ascending") for k in keys])
    counts = ids.column("count_all").to_pylist()
    key_rows = [[ids.column(k)[i].as_py() for k in keys] for i in range(ids.num_rows)]
    out, start = [], 0
    for kv, c in zip(key_rows, counts):
        out.append((kv, table.slice(start, c)))
        start += c
    return out


def map_groups_table(table: pa.Table, keys: list[str], fn: Callable, batch_format: Any,
                     fn_args: tuple, fn_kwargs: dict, op: str) -> pa.Table:
    check_columns(table, keys, op)
    outs = []
    for kv, group in split_groups(table, keys):
        batch = to_batch(group, batch_format)
        try:
            res = fn(batch, *fn_args, **fn_kwargs)
        except Exception as e:
            e.add_note(f"flowcore.data: {op} failed on the group {dict(zip(keys, kv))} "
                       f"({group.num_rows} rows)")
            raise
        outs.append(to_table(res, op))
    return concat(outs) if outs else table.slice(0, 0)


__all__ += ["permute", "check_columns", "iter_rows"]


# -- combining grouped aggregation (partial per block, final per partition) ---
def combinable(aggs: Sequence[AggregateFn]) -> bool:
    """Built-ins whose per-block partials merge exactly (nulls skipped)."""
    for a in aggs:
        if isinstance(a, Count):
            continue
        if not isinstance(a, (Sum, Min, Max, AbsMax, Mean, Std)) or not a.ignore_nulls:
            return False
    return True


def _partial_specs(i: int, a: AggregateFn) -> list[tuple]:
    """(source column, arrow function, options, partial column name)."""
    p = f"__p{i}"
    valid = pc.CountOptions(mode="only_valid")
    skip = pc.ScalarAggregateOptions(skip_nulls=True, min_count=1)
    if isinstance(a, Count):
        if a.on is None:
            return [([], "count_all", None, p)]
        return [(a.on, "count", pc.CountOptions(mode="only_valid" if a.ignore_nulls
                                                else "all"), p)]
    if isinstance(a, (Sum, Min, Max)):
        return [(a.on, a.arrow_func, skip, p)]
    if isinstance(a, AbsMax):
        return [(f"__abs_{a.on}", "max", skip, p)]
    if isinstance(a, Mean):
        return [(a.on, "sum", skip, p + "_s"), (a.on, "count", valid, p + "_n")]
    if isinstance(a, Std):
        return [(f"__f_{a.on}", "sum", skip, p + "_s"), (a.on, "count", valid, p + "_n"),
                (f"__sq_{a.on}", "sum", skip, p + "_q")]
    raise TypeError(f"not combinable: {a!r}")


def partial_aggregate(table: pa.Table, keys: list[str], aggs: Sequence[AggregateFn],
                      op: str = "groupby") -> pa.Table:
    """Per-group partial states of one block (the combiner)."""
    check_columns(table, keys + [c for a in aggs for c in a.columns()], op)
    for a in aggs:
        if isinstance(a, AbsMax):
            table = a.prepare(table)
        if isinstance(a, Std) and f"__sq_{a.on}" not in table.column_names:
            f = pc.cast(table.column(a.on), pa.float64())
            table = table.append_column(f"__f_{a.on}", f)
            table = table.append_column(f"__sq_{a.on}", pc.multiply(f, f))
    specs = []
    outputs = []   # (partial column, Arrow's output column)
    used: set = set()
    for i, a in enumerate(aggs):
        for src, func, opts, name in _partial_specs(i, a):
            if src and (src, func) in used:  # Arrow names outputs src_func: alias the column
                alias = f"__dup_{name}"
                table = table.append_column(alias, table.column(src))
                src = alias
            out = f"{src}_{func}" if src else func
            if (src or "", func) not in used:
                used.add((src or "", func))
                specs.append((src, func, opts))
            outputs.append((name, out))
    grouped = table.group_by(keys, use_threads=False).aggregate(
        [(s[0], s[1], s[2]) if s[2] is not None else (s[0], s[1]) for s in specs])
    cols = {k: grouped.column(k) for k in keys}
    for name, out in outputs:
        cols[name] = grouped.column(out)
    return pa.table(cols)


def final_aggregate(table: pa.Table, keys: list[str], aggs: Sequence[AggregateFn]
                    ) -> pa.Table:
    """Merge partial states (``partial_aggregate``'s columns) per group."""
    skip = pc.ScalarAggregateOptions(skip_nulls=True, min_count=1)
    specs = []
    for i, a in enumerate(aggs):
        for src, _f, _o, name in _partial_specs(i, a):
            func = "min" if isinstance(a, Min) else "max" if isinstance(a, (Max, AbsMax)) \
                else "sum"
            opts = pc.ScalarAggregateOptions(skip_nulls=True, min_count=0) \
                if isinstance(a, Count) or name.endswith("_n") else skip
            specs.append((name, func, opts))
    merged = table.group_by(keys, use_threads=False).aggregate(specs)
    cols = {k: merged.column(k) for k in keys}
    for i, a in enumerate(aggs):
        p = f"__p{i}"
        if isinstance(a, Mean):
            s = merged.column(f"{p}_s_sum")
            n = merged.column(f"{p}_n_sum")
            cols[a.name] = pc.if_else(pc.equal(n, 0), pa.scalar(None, pa.float64()),
                                      pc.divide(pc.cast(s, pa.float64()), pc.cast(n, pa.float64())))
        elif isinstance(a, Std):
            s = pc.cast(merged.column(f"{p}_s_sum"), pa.float64())
            n = pc.cast(merged.column(f"{p}_n_sum"), pa.float64())
            q = pc.cast(merged.column(f"{p}_q_sum"), pa.float64())
            dof = pc.subtract(n, float(a.ddof))
            m2 = pc.max_element_wise(pc.subtract(q, pc.divide(pc.multiply(s, s), n)), 0.0)
            var = pc.divide(m2, dof)
            cols[a.name] = pc.if_else(pc.less_equal(dof, 0), pa.scalar(None, pa.float64()),
                                      pc.sqrt(var))
        else:
            func = "min" if isinstance(a, Min) else "max" if isinstance(a, (Max, AbsMax)) \
                else "sum"
            cols[a.name] = merged.column(f"{p}_{func}")
    out = pa.table(cols)
    if out.num_rows:
        out = sort_table(out, [(k, "ascending") for k in keys])
    return out


__all__ += ["combinable", "partial_aggregate", "final_aggregate"]
