"""Aggregations: ``Count``, ``Sum``, ``Min``, ``Max``, ``Mean``, ``Std``,
``AbsMax``, ``Unique`` and the generic ``AggregateFn``.

Each names its output column as Ray does (``count()``, ``sum(v)``,
``mean(v)``...).  Built-ins run on Arrow's kernels: ``Table.group_by`` for
grouped aggregation, and combinable per-block partial states for a whole
dataset, so no row is ever handled in Python.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from .block import iter_rows

__all__ = ["AggregateFn", "Count", "Sum", "Min", "Max", "Mean", "Std", "AbsMax", "Unique"]


class AggregateFn:
    """A user-defined aggregation (Ray's ``AggregateFn``).

    ``init(key) -> acc``; ``accumulate_block(acc, block: pyarrow.Table) -> acc``
    or ``accumulate_row(acc, row: dict) -> acc``; ``merge(acc, acc) -> acc``;
    ``finalize(acc) -> value``; ``name``: the output column.
    """

    def __init__(self, init: Callable[[Any], Any], merge: Callable[[Any, Any], Any],
                 name: str | None = None,
                 accumulate_row: Callable[[Any, dict], Any] | None = None,
                 accumulate_block: Callable[[Any, pa.Table], Any] | None = None,
                 finalize: Callable[[Any], Any] | None = None) -> None:
        if (accumulate_row is None) == (accumulate_block is None):
            raise ValueError("AggregateFn: give exactly one of accumulate_row and "
                             "accumulate_block")
        self.init = init
        self.merge = merge
        self.accumulate_row = accumulate_row
        self.accumulate_block = accumulate_block
        self.finalize = finalize or (lambda a: a)
        self.name = name or "AggregateFn"
        self.on: str | None = None

    # -- the generic (Python) path --------------------------------------
    def _accumulate(self, acc: Any, table: pa.Table) -> Any:
        if self.accumulate_block is not None:
            return self.accumulate_block(acc, table)
        for row in iter_rows(table):
            acc = self.accumulate_row(acc, row)  # type: ignore[misc]
        return acc

    def block_state(self, table: pa.Table) -> Any:
        return self._accumulate(self.init(None), table)

    def merge_states(self, a: Any, b: Any) -> Any:
        return self.merge(a, b)

    def final(self, state: Any) -> Any:
        return self.finalize(state)

    def columns(self) -> list[str]:
        return []

    arrow_func: str | None = None  # built-ins set this


class _Builtin(AggregateFn):
    func_name = ""
    arrow_func: str | None = None

    def __init__(self, on: str | None = None, ignore_nulls: bool = True,
                 alias_name: str | None = None) -> None:
        if on is not None and not isinstance(on, str):
            raise TypeError(f"{type(self).__name__}(on={on!r}): expected a column name (str)")
        self.on = on
        self.ignore_nulls = ignore_nulls
        self.name = alias_name or f"{self.func_name}({on or ''})"
        self.accumulate_block = None
        self.accumulate_row = None

    def columns(self) -> list[str]:
        return [self.on] if self.on else []

    def arrow_options(self) -> Any:
        return pc.ScalarAggregateOptions(skip_nulls=self.ignore_nulls, min_count=1)

    def arrow_spec(self) -> tuple:
        return (self.on, self.arrow_func, self.arrow_options())

    def prepare(self, table: pa.Table) -> pa.Table:
        return table

    def _col(self, table: pa.Table) -> pa.ChunkedArray:
        return table.column(self.on)


class Count(_Builtin):
    """Rows (``on=None``: column ``count()``) or non-null values of ``on``."""
    func_name = "count"
    arrow_func = "count"

    def __init__(self, on: str | None = None, ignore_nulls: bool = False,
                 alias_name: str | None = None) -> None:
        super().__init__(on, ignore_nulls, alias_name)

    def arrow_spec(self) -> tuple:
        if self.on is None:
            return ([], "count_all", None)
        return (self.on, "count", pc.CountOptions(mode="only_valid" if self.ignore_nulls
                                                  else "all"))

    def block_state(self, table: pa.Table) -> Any:
        if self.on is None:
            return table.num_rows
        col = self._col(table)
        return len(col) - col.null_count if self.ignore_nulls else len(col)

    def merge_states(self, a: Any, b: Any) -> Any:
        return a + b

    def final(self, state: Any) -> Any:
        return state


class _Reducing(_Builtin):
    """Sum, Min, Max: the per-block result combines with the same function."""
    def block_state(self, table: pa.Table) -> Any:
        col = self._col(table)
        if not self.ignore_nulls and col.null_count:
            return _NULL
        return getattr(pc, self.arrow_func)(col).as_py()  # type: ignore[arg-type]

    def _combine(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def merge_states(self, a: Any, b: Any) -> Any:
        if a is _NULL or b is _NULL:
            return _NULL
        if a is None:
            return b
        if b is None:
            return a
        return self._combine(a, b)

    def final(self, state: Any) -> Any:
        return None if state is _NULL else state


class _Null:
    def __repr__(self) -> str:
        return "NULL"


_NULL = _Null()


class Sum(_Reducing):
    func_name = arrow_func = "sum"

    def _combine(self, a: Any, b: Any) -> Any:
        return a + b


class _Extremum(_Reducing):
    def __init__(self, on: str | None = None, ignore_nulls: bool = True,
                 alias_name: str | None = None,
                 zero_factory: Callable[[], Any] | None = None) -> None:
        super().__init__(on, ignore_nulls, alias_name)
        # Ray's accumulator start; here a group always has a value or a
        # null, so it never shows in a result
        self.zero_factory = zero_factory


class Min(_Extremum):
    func_name = arrow_func = "min"

    def _combine(self, a: Any, b: Any) -> Any:
        return min(a, b)


class Max(_Extremum):
    func_name = arrow_func = "max"

    def _combine(self, a: Any, b: Any) -> Any:
        return max(a, b)


class AbsMax(_Extremum):
    func_name = "abs_max"
    arrow_func = "max"

    def _hidden(self) -> str:
        return f"__abs_{self.on}"

    def arrow_spec(self) -> tuple:
        return (self._hidden(), "max", self.arrow_options())

    def prepare(self, table: pa.Table) -> pa.Table:
        if self._hidden() in table.column_names:
            return table
        return table.append_column(self._hidden(), pc.abs(table.column(self.on)))

    def _col(self, table: pa.Table) -> pa.ChunkedArray:
        return pc.abs(table.column(self.on))

    def _combine(self, a: Any, b: Any) -> Any:
        return max(a, b)


class Mean(_Builtin):
    func_name = "mean"
    arrow_func = "mean"

    def block_state(self, table: pa.Table) -> Any:
        col = self._col(table)
        if not self.ignore_nulls and col.null_count:
            return _NULL
        n = len(col) - col.null_count
        return (pc.sum(col).as_py() or 0, n)

    def merge_states(self, a: Any, b: Any) -> Any:
        if a is _NULL or b is _NULL:
            return _NULL
        return (a[0] + b[0], a[1] + b[1])

    def final(self, state: Any) -> Any:
        if state is _NULL or state[1] == 0:
            return None
        return state[0] / state[1]


class Std(_Builtin):
    """Standard deviation with ``ddof`` (default 1, like pandas)."""
    func_name = "std"
    arrow_func = "stddev"

    def __init__(self, on: str | None = None, ddof: int = 1, ignore_nulls: bool = True,
                 alias_name: str | None = None) -> None:
        super().__init__(on, ignore_nulls, alias_name)
        self.ddof = ddof

    def arrow_options(self) -> Any:
        return pc.VarianceOptions(ddof=self.ddof, skip_nulls=self.ignore_nulls)

    def block_state(self, table: pa.Table) -> Any:
        col = self._col(table)
        if not self.ignore_nulls and col.null_count:
            return _NULL
        n = len(col) - col.null_count
        if n == 0:
            return (0, 0.0, 0.0)
        mean = pc.mean(col).as_py()
        m2 = pc.sum(pc.power(pc.subtract(pc.cast(col, pa.float64()), mean), 2)).as_py()
        return (n, mean, m2)

    def merge_states(self, a: Any, b: Any) -> Any:
        if a is _NULL or b is _NULL:
            return _NULL
        na, ma, qa = a
        nb, mb, qb = b
        if na == 0:
            return b
        if nb == 0:
            return a
        n = na + nb
        delta = mb - ma
        return (n, ma + delta * nb / n, qa + qb + delta * delta * na * nb / n)

    def final(self, state: Any) -> Any:
        if state is _NULL:
            return None
        n, _, m2 = state
        if n - self.ddof <= 0:
            return None
        return math.sqrt(m2 / (n - self.ddof))


class Unique(_Builtin):
    """The distinct values of ``on`` (a list; None among them unless
    ``ignore_nulls``)."""
    func_name = "unique"
    arrow_func = "distinct"

    def __init__(self, on: str | None = None, ignore_nulls: bool = False,
                 alias_name: str | None = None) -> None:
        super().__init__(on, ignore_nulls, alias_name)

    def arrow_options(self) -> Any:
        return pc.CountOptions(mode="only_valid" if self.ignore_nulls else "all")

    def block_state(self, table: pa.Table) -> Any:
        values = set(pc.unique(self._col(table)).to_pylist())
        if self.ignore_nulls:
            values.discard(None)
        return values

    def merge_states(self, a: Any, b: Any) -> Any:
        return a | b

    def final(self, state: Any) -> Any:
        return list(state)


def check_aggs(aggs: tuple, op: str, columns: list[str] | None) -> None:
    if not aggs:
        raise ValueError(f"{op}: give at least one aggregation (e.g. Count(), Sum('x'))")
    for a in aggs:
        if not isinstance(a, AggregateFn):
            raise TypeError(f"{op}: {a!r} is not an aggregation; expected Count(), Sum(on), "
                            f"Min(on), Max(on), Mean(on), Std(on), AbsMax(on), Unique(on) "
                            f"or an AggregateFn")
        if columns is not None:
            for c in a.columns():
                if c not in columns:
                    raise KeyError(f"{op}: unknown column {c!r} in {a.name}; the dataset "
                                   f"has columns {columns}")
