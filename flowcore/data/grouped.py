"""GroupedData (``Dataset.groupby(key)``) and whole-dataset aggregation."""
from __future__ import annotations

from typing import Any, Callable

import flowcore

from . import aggregate as agg_mod
from .block import check_batch_format
from .context import DataContext
from .executor import _block_states
from .plan import AllToAllOp, fn_name

__all__ = ["GroupedData", "global_aggregate"]


def global_aggregate(ds: Any, aggs: tuple) -> dict | None:
    """``{name: value}`` over the whole dataset: per-block partial states
    computed in tasks (Arrow kernels), combined here."""
    agg_mod.check_aggs(aggs, "aggregate", None)
    aggs = tuple(aggs)
    refs = []
    cpus = DataContext.get_current().default_num_cpus
    states_task = _block_states if cpus == 1.0 else _block_states.options(num_cpus=cpus)
    gen = ds._execute()
    try:
        for b in gen:
            if b.num_rows:
                refs.append(states_task.remote(list(aggs), b.ref))
            b.release()
    finally:
        gen.close()
    if not refs:
        return None
    states = flowcore.get(refs)
    out = {}
    for i, a in enumerate(aggs):
        acc = states[0][i]
        for s in states[1:]:
            acc = a.merge_states(acc, s[i])
        out[a.name] = a.final(acc)
    return out


class GroupedData:
    """Rows grouped by ``key``: aggregate per group or map each group."""

    def __init__(self, dataset: Any, key: str | list[str] | None,
                 num_partitions: int | None = None) -> None:
        if num_partitions is not None and (not isinstance(num_partitions, int) or isinstance(
                num_partitions, bool) or num_partitions < 1):
            raise ValueError(f"groupby: num_partitions={num_partitions!r}; expected an int >= 1 "
                             f"or None")
        self._num_partitions = num_partitions
        if key is not None and not isinstance(key, str) and not (
                isinstance(key, (list, tuple)) and key and all(isinstance(k, str) for k in key)):
            raise ValueError(f"groupby: key={key!r}; expected a column name, a list of names, "
                             f"or None")
        self._ds = dataset
        self._key = key
        self._keys = [] if key is None else ([key] if isinstance(key, str) else list(key))

    def __repr__(self) -> str:
        return f"GroupedData(dataset={self._ds!r}, key={self._key!r})"

    def aggregate(self, *aggs: agg_mod.AggregateFn) -> Any:
        """One row per group: the key column(s), then one column per
        aggregation, sorted by key."""
        agg_mod.check_aggs(aggs, "groupby().aggregate", None)
        if not self._keys:
            from .read_api import from_items
            res = self._ds.aggregate(*aggs)
            return from_items([res] if res is not None else [])
        names = ", ".join(a.name for a in aggs)
        return self._ds._with(AllToAllOp(
            "aggregate", f"Aggregate[key={self._keys}, {names}]",
            keys=[(k, "ascending") for k in self._keys], aggs=list(aggs),
            num_blocks=self._num_partitions))

    def _one(self, cls: type, on: Any, ignore_nulls: bool, **kw: Any) -> Any:
        if on is None:
            cols = [c for c in (self._ds.columns() or []) if c not in self._keys]
        else:
            cols = [on] if isinstance(on, str) else list(on)
        return self.aggregate(*[cls(c, ignore_nulls=ignore_nulls, **kw) for c in cols])

    def count(self) -> Any:
        """Column ``count()``: rows per group."""
        return self.aggregate(agg_mod.Count())

    def sum(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._one(agg_mod.Sum, on, ignore_nulls)

    def min(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._one(agg_mod.Min, on, ignore_nulls)

    def max(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._one(agg_mod.Max, on, ignore_nulls)

    def mean(self, on: str | list[str] | None = None, ignore_nulls: bool = True) -> Any:
        return self._one(agg_mod.Mean, on, ignore_nulls)

    def std(self, on: str | list[str] | None = None, ddof: int = 1,
            ignore_nulls: bool = True) -> Any:
        return self._one(agg_mod.Std, on, ignore_nulls, ddof=ddof)

    def map_groups(self, fn: Callable, *, zero_copy_batch: bool = True, compute: Any = None,
                   batch_format: str | None = "default", fn_args: Any = None,
                   fn_kwargs: Any = None, fn_constructor_args: Any = None,
                   fn_constructor_kwargs: Any = None, num_cpus: float | None = None,
                   num_gpus: float | None = None, memory: float | None = None,
                   concurrency: Any = None, ray_remote_args_fn: Any = None,
                   **ray_remote_args: Any) -> Any:
        """``fn(batch of one group) -> batch``; results concatenated."""
        if not callable(fn):
            raise TypeError(f"map_groups: expected a function, got {type(fn).__name__}")
        check_batch_format(batch_format, "map_groups")
        keys = self._keys
        if not keys:
            return self._ds.map_batches(fn, batch_size=None, batch_format=batch_format,
                                        fn_args=fn_args, fn_kwargs=fn_kwargs).repartition(1)
        return self._ds._with(AllToAllOp(
            "map_groups", f"MapGroups({fn_name(fn)})", keys=[(k, "ascending") for k in keys],
            fn=fn, batch_format=batch_format, fn_args=tuple(fn_args or ()),
            fn_kwargs=dict(fn_kwargs or {}), num_blocks=self._num_partitions))
