"""The streaming executor.

A plan compiles to a chain of stages, each a generator of ``Bundle``s
(a block's ref plus its metadata):

* task stages run a read task or an input block through fused transforms
  (read -> map -> map_batches -> filter in one task), a bounded number of
  tasks in flight;
* actor stages do the same on a pool of actors (a callable class); the
  upstream transforms and the read itself run inside the actor call, so
  the pool never waits for tasks that need the CPUs it holds;
* barrier stages (sort, shuffle, repartition, groupby) collect their input
  and run map/reduce tasks with the kernels in ``shuffle``;
* limit stages stop pulling once they have enough rows.

Backpressure: a stage submits a task only while the bytes of blocks the
executor produced and nobody released yet (plus the estimate for the tasks
in flight) stay under ``store_memory_fraction`` of the object store, and
only while its output window has room, so a slow consumer stops the
pipeline instead of filling the store.  A plan whose input is small runs
as one task (``run_local``), without pools or shuffles.
"""
from __future__ import annotations

import collections
import math
import os
import threading
import time
from typing import Any, Callable, Generator, Iterable, Iterator

import pyarrow as pa

import flowcore

from . import shuffle
from .aggregate import check_aggs
from .block import concat, to_batch
from .context import DataContext
from .plan import (AllToAllOp, InputSource, LimitOp, LogicalPlan, MapOp, ReadSource, ReadTask,
                   TaskContext, UnionSource, ZipSource, apply_transforms, check_union_schemas,
                   even_ranges, fixed_ranges, input_bundles, plan_objects, run_local,
                   zip_tables)
from .physical import one_task_plan, segments_with_tasks, stage_name, stages
from .stats import DatasetStats, OpStats
from .status_feed import DataFeed

__all__ = ["Bundle", "MemoryBudget", "execute", "block_meta"]


def block_meta(t: pa.Table) -> dict:
    return {"num_rows": t.num_rows, "size_bytes": t.nbytes, "schema": t.schema}


class MemoryBudget:
    """Bytes of blocks produced and not yet released, against a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0          # blocks produced, not yet released by their consumer
        self.reserved = 0      # estimated outputs of tasks in flight
        self.peak = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.used += n
            self.peak = max(self.peak, self.used + self.reserved)

    def release(self, n: int) -> None:
        with self.lock:
            self.used -= n

    def reserve(self, n: int) -> None:
        with self.lock:
            self.reserved += n
            self.peak = max(self.peak, self.used + self.reserved)

    def unreserve(self, n: int) -> None:
        with self.lock:
            self.reserved -= n

    def room_for(self, n: int) -> bool:
        return self.used + self.reserved + n <= self.limit


class Bundle:
    """One block in the store: ``ref`` and ``meta`` (num_rows, size_bytes,
    schema).  ``release()`` gives its bytes back to the budget (once)."""
    __slots__ = ("ref", "meta", "_budget")

    def __init__(self, ref: Any, meta: dict, budget: MemoryBudget | None = None) -> None:
        self.ref = ref
        self.meta = meta
        self._budget = budget
        if budget is not None:
            budget.add(meta["size_bytes"])

    def release(self) -> None:
        b, self._budget = self._budget, None
        if b is not None:
            b.release(self.meta["size_bytes"])

    @property
    def num_rows(self) -> int:
        return self.meta["num_rows"]


class Pieces:
    """Rows cut from consecutive blocks for one task: ``parts`` is a list of
    (Bundle, offset, length).  A block cut between two groups is released
    by the later one (the groups finish in order)."""
    __slots__ = ("parts", "meta", "owned")

    def __init__(self, parts: list[tuple[Bundle, int, int]], owned: list[Bundle]) -> None:
        self.parts = parts
        self.owned = owned
        rows = sum(ln for _, _, ln in parts)
        size = sum(b.meta["size_bytes"] * ln // max(1, b.num_rows) for b, _, ln in parts)
        self.meta = {"num_rows": rows, "size_bytes": size,
                     "schema": parts[0][0].meta.get("schema") if parts else None}

    def payload(self) -> tuple[list, list]:
        """(pieces as (table index, offset, length), the blocks' refs)."""
        refs: list = []
        index: dict[int, int] = {}
        out = []
        for b, off, ln in self.parts:
            if id(b) not in index:
                index[id(b)] = len(refs)
                refs.append(b.ref)
            out.append((index[id(b)], off, ln))
        return out, refs

    def release(self) -> None:
        owned, self.owned = self.owned, []
        for b in owned:
            b.release()


def _rebundled(items: Iterator[Any], batch: int | None) -> Generator[Any, None, None]:
    """``items`` (Bundles) regrouped so each task gets a multiple of
    ``batch`` rows (only the last group may hold fewer): whole small
    blocks are grouped, a block straddling a boundary is cut.  With
    ``batch`` None, ``items`` unchanged."""
    if not batch:
        yield from items
        return
    parts: list[tuple[Bundle, int, int]] = []
    owned: list[Bundle] = []
    have = 0
    empty: Bundle | None = None
    emitted = False
    for b in items:
        if not b.num_rows:
            if empty is None:
                empty = b
            else:
                b.release()
            continue
        off = 0
        while off < b.num_rows:
            ln = b.num_rows - off
            if have + ln >= batch:
                ln = (have + ln) // batch * batch - have
            parts.append((b, off, ln))
            have += ln
            off += ln
            if off == b.num_rows:
                owned.append(b)
            if have and have % batch == 0:
                emitted = True
                yield Pieces(parts, owned)
                parts, owned, have = [], [], 0
    if parts:
        emitted = True
        yield Pieces(parts, owned)
    if empty is not None:
        if emitted:
            empty.release()
        else:  # no rows at all: one task on an empty block gives the schema
            yield Pieces([(empty, 0, 0)], [empty])


# -- remote functions ------------------------------------------------------------
@flowcore.remote(num_returns=2)
def _run_transforms(transforms: list, index: int, kind: str, payload: Any,
                    *tables: pa.Table) -> tuple:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._run_transforms_impl(transforms, index, kind, payload, *tables)


def _run_transforms_impl(transforms: list, index: int, kind: str, payload: Any,
                         *tables: pa.Table) -> tuple:
    """``kind``: "read" (payload: a ReadTask), "block" (payload: the table)
    or "pieces" (payload: (table index, offset, length) slices of ``tables``)."""
    if kind == "read":
        blocks = payload.read()
    elif kind == "pieces":
        blocks = iter([tables[i].slice(off, ln) for i, off, ln in payload])
    else:
        blocks = iter([payload])
    t = apply_transforms(blocks, transforms, TaskContext(index))
    return t, block_meta(t)


@flowcore.remote(num_returns=2)
def _run_plan(plan: LogicalPlan, *tables: pa.Table) -> tuple:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._run_plan_impl(plan, *tables)


def _run_plan_impl(plan: LogicalPlan, *tables: pa.Table) -> tuple:
    t = concat(run_local(plan, list(tables)))
    return t, block_meta(t)


@flowcore.remote
def _run_local_op(op: AllToAllOp, *tables: pa.Table) -> tuple:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._run_local_op_impl(op, *tables)


def _run_local_op_impl(op: AllToAllOp, *tables: pa.Table) -> tuple:
    """The op on all its input in one task: its k output tables, then
    their metadata (k + 1 return values)."""
    out = op.local(list(tables))
    return (*out, [block_meta(t) for t in out])


@flowcore.remote
def _sample(table: pa.Table, key: str, n: int, seed: int) -> list:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._sample_impl(table, key, n, seed)


def _sample_impl(table: pa.Table, key: str, n: int, seed: int) -> list:
    shuffle.check_columns(table, [key], "sort")
    return shuffle.sample_keys(table, key, n, seed)


@flowcore.remote
def _partition(kind: str, params: dict, n: int, index: int, table: pa.Table) -> Any:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._partition_impl(kind, params, n, index, table)


def _partition_impl(kind: str, params: dict, n: int, index: int, table: pa.Table) -> Any:
    if params.get("combine") is not None:
        table = shuffle.partial_aggregate(table, params["combine"], params["aggs"],
                                          params["op"])
    if kind == "range":
        parts = shuffle.range_partition(table, params["key"], params["descending"],
                                        params["bounds"], n)
    elif kind == "hash":
        parts = shuffle.hash_partition(table, params["keys"], n)
    else:
        seed = params.get("seed")
        parts = shuffle.random_partition(table, n, None if seed is None else seed + index)
    return tuple(parts) if n > 1 else parts[0]


@flowcore.remote(num_returns=2)
def _reduce(op: AllToAllOp, index: int, *parts: pa.Table) -> tuple:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._reduce_impl(op, index, *parts)


def _reduce_impl(op: AllToAllOp, index: int, *parts: pa.Table) -> tuple:
    t = op.reduce(concat(parts), index)
    return t, block_meta(t)


@flowcore.remote(num_returns=2)
def _slice_concat(pieces: list, *tables: pa.Table) -> tuple:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._slice_concat_impl(pieces, *tables)


def _slice_concat_impl(pieces: list, *tables: pa.Table) -> tuple:
    t = concat([tables[i].slice(off, ln) for i, off, ln in pieces])
    if not pieces:
        t = tables[0].slice(0, 0) if tables else pa.table({})
    return t, block_meta(t)


@flowcore.remote
def _split_block(pieces: list, table: pa.Table) -> tuple:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._split_block_impl(pieces, table)


def _split_block_impl(pieces: list, table: pa.Table) -> tuple:
    out = [table.slice(off, ln) for off, ln in pieces]
    return (*out, [block_meta(t) for t in out])


@flowcore.remote(num_returns=2)
def _zip_blocks(n_left: int, *tables: pa.Table) -> tuple:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._zip_blocks_impl(n_left, *tables)


def _zip_blocks_impl(n_left: int, *tables: pa.Table) -> tuple:
    t = zip_tables([concat(tables[:n_left]), concat(tables[n_left:])])
    return t, block_meta(t)


@flowcore.remote
def _convert_ref(table: pa.Table, fmt: str, column: str | None) -> Any:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._convert_ref_impl(table, fmt, column)


def _convert_ref_impl(table: pa.Table, fmt: str, column: str | None) -> Any:
    if column is not None:
        shuffle.check_columns(table, [column], "to_numpy_refs")
        return to_batch(table.select([column]), "numpy")[column]
    return to_batch(table, fmt)


@flowcore.remote
def _block_states(aggs: list, table: pa.Table) -> list:
    from flowcore.data import executor as _m  # the real module, also when shipped by value
    return _m._block_states_impl(aggs, table)


def _block_states_impl(aggs: list, table: pa.Table) -> list:
    check_aggs(tuple(aggs), "aggregate", table.column_names if table.num_columns else None)
    return [a.block_state(table) if table.num_rows else None for a in aggs]


class _PoolWorker:
    """An actor of a ``map_batches(Class)`` pool: constructs the user's
    class once, then runs (read +) fused transforms per call."""

    def __init__(self, transforms: list, n_pre: int = 0) -> None:
        self.transforms = transforms
        self.parts = (transforms[:n_pre], transforms[n_pre:])
        for t in transforms:
            t.setup()

    def pid(self) -> int:
        return os.getpid()

    @flowcore.method(num_returns=2)
    def run(self, part: int | None, index: int, kind: str, payload: Any,
            *tables: pa.Table) -> tuple:
        """``part``: None for all transforms, 0 for the ones before the
        pool's class, 1 for the class and after."""
        from flowcore.data import executor as _m  # the real module, also when shipped by value
        ts = self.transforms if part is None else self.parts[part]
        return _m._run_transforms_impl(ts, index, kind, payload, *tables)


# -- cluster facts ------------------------------------------------------------------
def cluster_cpus() -> float:
    return float(flowcore.cluster_resources().get("CPU", 1.0)) or 1.0


def store_capacity() -> int:
    caps = [n.get("store", {}).get("capacity") or n.get("object_store_memory") or 0
            for n in flowcore.nodes() if n.get("alive")]
    return max(caps) if caps else 256 << 20


#: seconds the CPUs and store capacity read for one execution are reused by
#: the next ones (two head queries saved per small plan)
FACTS_TTL_S = 5.0
_facts: dict = {}
_facts_lock = threading.Lock()


def cluster_facts() -> tuple[float, int]:
    """(cluster CPUs, largest node store capacity), cached for FACTS_TTL_S
    per cluster connection."""
    rc = flowcore.get_runtime_context()
    key = (rc.gcs_address, rc.get_job_id())
    now = time.monotonic()
    with _facts_lock:
        hit = _facts.get(key)
        if hit is not None and now - hit[0] < FACTS_TTL_S:
            return hit[1]
    facts = (cluster_cpus(), store_capacity())
    with _facts_lock:
        _facts.clear()
        _facts[key] = (now, facts)
    return facts


# -- execution ------------------------------------------------------------------
class Execution:
    """State shared by the stages of one execution."""

    def __init__(self, ctx: DataContext, stats: DatasetStats) -> None:
        self.ctx = ctx
        self.stats = stats
        if not flowcore.is_initialized():
            flowcore.init()
        self.cpus, capacity = cluster_facts()
        self.budget = MemoryBudget(int(capacity * ctx.store_memory_fraction))
        self.max_in_flight = ctx.max_tasks_in_flight_per_op or max(2, int(2 * self.cpus))
        self.actors_cpus_left = self.cpus

    def get_meta(self, ref: Any) -> dict:
        return flowcore.get(ref, timeout=self.ctx.execution_timeout_s)

    def task(self, fn: Any, **options: Any) -> Any:
        """``fn.options(**options)``, asking for ``ctx.default_num_cpus``
        CPUs unless ``options`` name them."""
        if "num_cpus" not in options and self.ctx.default_num_cpus != 1.0:
            options["num_cpus"] = self.ctx.default_num_cpus
        return fn.options(**options) if options else fn


def execute(plan: LogicalPlan, stats: DatasetStats | None = None,
            ctx: DataContext | None = None) -> Iterator[Bundle]:
    """Stream the blocks of ``plan`` in order."""
    ctx = ctx or DataContext.get_current()
    stats = stats or DatasetStats()
    ex = Execution(ctx, stats)
    feed = DataFeed(plan, stats)  # the dashboard's Datasets tab
    error: BaseException | None = None
    out: Generator[Bundle, None, None] | None = None
    try:
        if one_task_plan(plan, ctx):
            out = _one_task(ex, plan)
        else:
            out = _build(ex, plan)
        for b in out:
            feed.tick()
            yield b
    except GeneratorExit:
        raise
    except BaseException as e:
        error = e
        raise
    finally:
        if out is not None:
            out.close()  # as ``yield from`` would: its stages clean up now
        stats.peak_budget_bytes = ex.budget.peak
        stats.finished()
        feed.finish(error)


def _one_task(ex: Execution, plan: LogicalPlan) -> Generator[Bundle, None, None]:
    st = ex.stats.op("ExecutePlanInOneTask[" + " -> ".join(
        [plan.source.name] + [o.name for o in plan.ops]) + "]", plan_objects(plan))
    st.started()
    refs = [r for r, _ in input_bundles(plan)]
    st.tasks += 1
    out, meta_ref = ex.task(_run_plan, name=_task_name(st.name)).remote(plan, *refs)
    meta = ex.get_meta(meta_ref)
    st.output(meta)
    yield Bundle(out, meta, ex.budget)


def _source_items(ex: Execution, src: Any) -> Generator[Any, None, None]:
    if isinstance(src, InputSource):
        for ref, meta in src.bundles:
            yield Bundle(ref, meta)
    elif isinstance(src, ReadSource):
        yield from src.tasks
    elif isinstance(src, UnionSource):
        first_schema = None
        for p in src.plans:
            for b in _build(ex, p):
                s = b.meta.get("schema")
                if b.num_rows and s is not None:
                    if first_schema is None:
                        first_schema = s
                    else:
                        check_union_schemas([first_schema.empty_table(), s.empty_table()])
                yield b
    elif isinstance(src, ZipSource):
        yield from _zip_stage(ex, src)
    else:
        raise TypeError(f"unknown source {src!r}")


def _gathered(items: Iterator[Bundle]) -> Generator[Bundle, None, None]:
    """All of ``items`` first, then yield them (lets a pool finish and free
    its CPUs before the tasks that consume its output start)."""
    collected = list(items)
    yield from collected


def _build(ex: Execution, plan: LogicalPlan) -> Generator[Any, None, None]:
    """Compile ``plan`` to chained stage generators."""
    stream: Generator[Any, None, None] = _source_items(ex, plan.source)
    stage_list = stages(plan)
    with_tasks = segments_with_tasks(plan, stage_list)
    n_pools = sum(1 for st in stage_list if st[0] == "actor")
    reads = plan.source if isinstance(plan.source, ReadSource) else None
    for i, st in enumerate(stage_list):
        source = reads if i == 0 else None  # the first stage runs the read tasks
        if st[0] == "task":
            stream = _task_stage(ex, _rebundled(stream, st[2]), st[1], source)
        elif st[0] == "actor":
            free = 0.0
            if with_tasks[i]:
                per = _op_cpus(ex, st[2][0])
                if ex.cpus - 1 >= per * n_pools:
                    free = 1.0   # leave a CPU to the tasks around the pool
                else:            # too few CPUs to share: run the segment in turns
                    stream = _gathered(stream)
            stream = _actor_stage(ex, stream, st[1], st[2], n_pools, free, st[3], st[4],
                                  source)
            if with_tasks[i] and not free and any(s[0] == "task" for s in stage_list[i + 1:]):
                stream = _gathered(stream)
        elif st[0] == "limit":
            stream = _limit_stage(ex, stream, st[1])
        else:
            stream = _barrier_stage(ex, stream, st[1])
    return stream


def _task_name(stage: str) -> str:
    return stage if len(stage) <= 120 else stage[:117] + "..."


def _windowed(ex: Execution, st: OpStats, items: Iterator[Any],
              submit: Callable[[int, Any], tuple], can_submit: Callable[[], bool],
              on_done: Callable[[Any], None] = lambda slot: None,
              limit: int | None = None) -> Generator[Bundle, None, None]:
    """Submit tasks for ``items`` with at most ``max_in_flight`` outstanding
    and within the memory budget; yield their outputs in order."""
    pending: collections.deque = collections.deque()
    limit = limit or ex.max_in_flight
    est = 0
    sizes: list[int] = []
    index = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < limit and can_submit():
                guess = int(sum(sizes) / len(sizes)) if sizes else est
                if pending and not ex.budget.room_for(guess):
                    break
                item = next(items, None)
                if item is None:
                    exhausted = True
                    break
                st.started()
                out_ref, meta_ref, slot = submit(index, item)
                index += 1
                st.tasks += 1
                if not est:
                    est = (item.meta["size_bytes"] if isinstance(item, (Bundle, Pieces))
                           else (item.size_bytes or 0)) or (1 << 20)
                    guess = est
                pending.append((out_ref, meta_ref, item, slot, guess))
                ex.budget.reserve(guess)
            if not pending:
                return
            out_ref, meta_ref, item, slot, guess = pending.popleft()
            ex.budget.unreserve(guess)
            try:
                meta = ex.get_meta(meta_ref)
            finally:
                on_done(slot)
                if isinstance(item, (Bundle, Pieces)):
                    item.release()
            sizes.append(meta["size_bytes"])
            del sizes[:-16]
            for ref, m in _split_if_big(ex, out_ref, meta):
                st.output(m)
                yield Bundle(ref, m, ex.budget)
    finally:
        for *_, item, _slot, g in pending:
            ex.budget.unreserve(g)
            if isinstance(item, (Bundle, Pieces)):
                item.release()
        pending.clear()


def _split_if_big(ex: Execution, ref: Any, meta: dict) -> list[tuple[Any, dict]]:
    """A block over twice the target size, cut into target-sized blocks."""
    target = ex.ctx.target_max_block_size
    if meta["size_bytes"] <= 2 * target or meta["num_rows"] < 2:
        return [(ref, meta)]
    k = min(meta["num_rows"], -(-meta["size_bytes"] // target))
    pieces = even_ranges(meta["num_rows"], k)
    refs = ex.task(_split_block, num_returns=k + 1, name="SplitBlock").remote(pieces, ref)
    return list(zip(refs[:k], ex.get_meta(refs[k])))


def _task_stage(ex: Execution, items: Iterator[Any], transforms: list[MapOp],
                source: Any = None) -> Generator[Bundle, None, None]:
    """``source``: the ReadSource whose read tasks ``items`` are, if any."""
    st = ex.stats.op(stage_name(transforms), transforms + ([source] if source else []))
    tref = flowcore.put(transforms)
    res = _resources(transforms)
    limit = _task_limit(ex, transforms)
    if source is not None:  # the read's own num_cpus=, concurrency=... (the larger CPU ask wins)
        cpus = [c for c in (source.remote_args.get("num_cpus"), res.get("num_cpus"))
                if c is not None]
        res = {**source.remote_args, **res}
        if cpus:
            res["num_cpus"] = max(cpus)
        if source.concurrency:
            limit = min(limit, source.concurrency)
    fns: dict = {}

    def submit(index: int, item: Any) -> tuple:
        if isinstance(item, ReadTask):
            if st.name == stage_name(transforms):
                st.name = stage_name(transforms, "ReadTask")
        fn = fns.get(st.name)
        if fn is None:  # tasks carry the operator's name (dashboard, visualize)
            fn = fns[st.name] = ex.task(_run_transforms, name=_task_name(st.name), **res)
        if isinstance(item, ReadTask):
            out, meta = fn.remote(tref, index, "read", item)
        elif isinstance(item, Pieces):
            pieces, refs = item.payload()
            out, meta = fn.remote(tref, index, "pieces", pieces, *refs)
        else:
            out, meta = fn.remote(tref, index, "block", item.ref)
        return out, meta, None

    return _windowed(ex, st, items, submit, lambda: True, limit=limit)


def _resources(ops: list[MapOp]) -> dict:
    res: dict = {}
    cpus = [o.num_cpus for o in ops if o.num_cpus is not None]
    gpus = [o.num_gpus for o in ops if o.num_gpus]
    if cpus:
        res["num_cpus"] = max(cpus)
    if gpus:
        res["num_gpus"] = max(gpus)
    for o in ops:
        res.update(o.remote_args)
    return res


def _task_limit(ex: Execution, ops: list[MapOp]) -> int:
    """Tasks in flight: 2 x CPUs, or the smallest ``concurrency`` given."""
    limits = []
    for o in ops:
        c = o.concurrency
        if isinstance(c, (tuple, list)):
            c = c[1] if len(c) > 1 else c[0]
        if c:
            limits.append(int(c))
    return min([ex.max_in_flight] + limits)


def _op_cpus(ex: Execution, op: MapOp) -> float:
    """CPUs one task or pool actor of ``op`` asks for."""
    return op.num_cpus if op.num_cpus is not None else ex.ctx.default_num_cpus


def pool_size(op: MapOp, cpus: float, n_pools: int, free: float = 0.0,
              default_cpus: float = 1.0) -> int:
    """Actors for ``op``'s pool: ``concurrency`` (an int, or the max of a
    (min, max) tuple), capped so all pools of the plan fit the cluster's
    CPUs together; ValueError when even one actor per pool cannot fit."""
    per = op.num_cpus if op.num_cpus is not None else default_cpus
    c = op.concurrency
    if isinstance(c, (tuple, list)):
        want = int(c[1] if len(c) > 1 else c[0])
    elif c is None:
        want = max(1, int(cpus // max(per, 1e-9)) if per else 1)
    else:
        want = int(c)
    if per <= 0:
        return want
    share = (cpus - free) / n_pools
    fit = int(math.floor(share / per + 1e-9))
    if fit < 1:
        raise ValueError(f"{op.name}: {n_pools} actor pool(s) of {per} CPU actors cannot all "
                         f"run on a cluster of {cpus:g} CPUs (a pool that cannot start would "
                         f"wait forever); lower num_cpus= for the class or add CPUs")
    return max(1, min(want, fit))


def _actor_stage(ex: Execution, items: Iterator[Any], pre: list[MapOp], ops: list[MapOp],
                 n_pools: int, free: float = 0.0, batch: int | None = None,
                 split_pre: bool = False, source: Any = None) -> Generator[Bundle, None, None]:
    """A pool of actors running ``pre + ops`` per call.  ``split_pre``: the
    read and ``pre`` run as calls of their own on the same actors, their
    blocks are re-cut into multiples of ``batch`` rows, then ``ops`` run
    (exact batches without tasks competing with the pool for CPUs)."""
    head = ops[0]
    transforms = pre + ops
    size = pool_size(head, ex.cpus, n_pools, free, ex.ctx.default_num_cpus)
    opts: dict = {"num_cpus": _op_cpus(ex, head)}
    if head.num_gpus:
        opts["num_gpus"] = head.num_gpus
    opts.update(head.remote_args)
    cls = flowcore.remote(**opts)(_PoolWorker)
    actors: list = []
    per_actor = ex.ctx.max_tasks_in_flight_per_actor

    def phase(part: int | None, stream: Iterator[Any], st: OpStats) -> Generator[Bundle, None, None]:
        outstanding = [0] * size

        def can_submit() -> bool:
            return min(outstanding) < per_actor

        def submit(index: int, item: Any) -> tuple:
            if not actors:
                actors.extend(cls.remote(transforms, len(pre)) for _ in range(size))
            st.actors = size
            i = min(range(size), key=outstanding.__getitem__)
            outstanding[i] += 1
            run = actors[i].run
            if isinstance(item, ReadTask) and part == 0 and st.name == stage_name(pre):
                st.name = stage_name(pre, "ReadTask")
            if isinstance(item, ReadTask):
                out, meta = run.remote(part, index, "read", item)
            elif isinstance(item, Pieces):
                pieces, refs = item.payload()
                out, meta = run.remote(part, index, "pieces", pieces, *refs)
            else:
                out, meta = run.remote(part, index, "block", item.ref)
            return out, meta, i

        def done(slot: int) -> None:
            outstanding[slot] -= 1
        return _windowed(ex, st, stream, submit, can_submit, done)

    if split_pre:
        src = [source] if source else []
        st_pre = ex.stats.op(stage_name(pre), pre + src)
        stream = _rebundled(phase(0, items, st_pre), batch)
        main = phase(1, stream, ex.stats.op(stage_name(ops), ops))
    else:
        main = phase(None, _rebundled(items, batch), ex.stats.op(
            stage_name(transforms), transforms + ([source] if source else [])))

    def run() -> Generator[Bundle, None, None]:
        try:
            yield from main
        finally:
            main.close()
            for a in actors:
                try:
                    flowcore.kill(a)
                except Exception:  # noqa: BLE001 - already gone
                    pass
    return run()


def _limit_stage(ex: Execution, items: Iterator[Bundle], op: LimitOp) -> Generator[Bundle, None, None]:
    st = ex.stats.op(op.name, [op])
    st.started()
    left = op.limit
    try:
        for b in items:
            if left <= 0:
                b.release()
                break
            if b.num_rows <= left:
                left -= b.num_rows
                st.output(b.meta)
                yield b
            else:
                st.tasks += 1
                out, meta_ref = ex.task(_slice_concat, name=op.name).remote([(0, 0, left)],
                                                                           b.ref)
                meta = ex.get_meta(meta_ref)
                b.release()
                left = 0
                st.output(meta)
                yield Bundle(out, meta, ex.budget)
            if left <= 0:
                break
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _gather(ex: Execution, items: Iterator[Any]) -> list[Bundle]:
    out = []
    for b in items:
        if not isinstance(b, Bundle):  # a raw read task (a barrier right after a read)
            raise TypeError("internal: barrier fed with read tasks")
        out.append(b)
    return out


def _collect(ex: Execution, st: OpStats, pairs: list[tuple]) -> list[Bundle]:
    out = []
    metas = flowcore.get([m for _, m in pairs], timeout=ex.ctx.execution_timeout_s)
    for (ref, _), meta in zip(pairs, metas):
        st.output(meta)
        out.append(Bundle(ref, meta, ex.budget))
    return out


def _barrier_stage(ex: Execution, items: Iterator[Any], op: AllToAllOp) -> Generator[Bundle, None, None]:
    bundles = _gather(ex, items)
    st = ex.stats.op(op.name, [op])
    st.started()
    try:
        result = _all_to_all(ex, st, bundles, op)
    finally:
        for b in bundles:
            b.release()
    yield from result


def _all_to_all(ex: Execution, st: OpStats, bundles: list[Bundle], op: AllToAllOp
                ) -> list[Bundle]:
    if op.kind == "randomize_block_order":
        import numpy as np
        rng = np.random.default_rng(op.params.get("seed"))
        out = [Bundle(bundles[i].ref, bundles[i].meta, ex.budget)
               for i in rng.permutation(len(bundles))]
        for b in out:
            st.output(b.meta)
        return out
    total = sum(b.meta["size_bytes"] for b in bundles)
    n_out = op.params.get("num_blocks") or len(bundles) or 1
    if op.kind == "repartition" and op.params.get("rows_per_block"):
        rows = sum(b.num_rows for b in bundles)
        return _repartition(ex, st, bundles, fixed_ranges(rows, op.params["rows_per_block"]))
    if op.kind == "repartition" and not op.params.get("shuffle") \
            and not op.params.get("hash_keys"):
        return _repartition(ex, st, bundles, even_ranges(sum(b.num_rows for b in bundles),
                                                         n_out))
    small = ex.ctx.small_shuffle_bytes
    if op.kind == "sort":  # an O(n log n) kernel: both CPUs beat one task sooner
        small = min(small, ex.ctx.small_sort_bytes)
    if total <= small or len(bundles) <= 1:
        st.tasks += 1
        k = op.params.get("num_blocks") or 1
        refs = ex.task(_run_local_op, name=op.name, num_returns=k + 1).remote(
            op, *[b.ref for b in bundles])
        out = []
        for ref, meta in zip(refs[:k], ex.get_meta(refs[k])):
            st.output(meta)
            out.append(Bundle(ref, meta, ex.budget))
        return out
    refs = [b.ref for b in bundles]
    if op.kind == "repartition" and op.params.get("hash_keys"):
        kind, params = "hash", {"keys": op.params["hash_keys"]}
    elif op.kind in ("random_shuffle", "repartition"):
        kind, params = "random", {"seed": op.params.get("seed")}
    elif op.params.get("boundaries"):
        key, direction = op.params["keys"][0]
        kind = "range"
        params = {"key": key, "descending": direction == "descending",
                  "bounds": op.sort_bounds()}
    else:
        key, direction = op.params["keys"][0]
        samples: list = []
        per = max(8, 4 * n_out)
        sample = ex.task(_sample, name=f"{op.name}:sample")
        for chunk in flowcore.get([sample.remote(r, key, per, i) for i, r in enumerate(refs)]):
            samples.extend(chunk)
        st.tasks += len(refs)
        desc = direction == "descending"
        kind = "range"
        params = {"key": key, "descending": desc,
                  "bounds": shuffle.boundaries_from_samples(samples, n_out, desc)}
    reduce_op = op
    if op.kind == "aggregate" and shuffle.combinable(op.params["aggs"]):
        # combine in the map tasks: each block sends one partial row per group
        params = dict(params, combine=[k for k, _ in op.params["keys"]],
                      aggs=op.params["aggs"], op=op.name)
        reduce_op = AllToAllOp("aggregate_final", op.name, **op.params)
    parts = []
    for i, r in enumerate(refs):
        p = ex.task(_partition, num_returns=n_out, name=f"{op.name}:map").remote(
            kind, params, n_out, i, r)
        parts.append(p if n_out > 1 else [p])
    st.tasks += len(refs) + n_out
    reduce = ex.task(_reduce, name=f"{op.name}:reduce")
    pairs = [reduce.remote(reduce_op, j, *[parts[i][j] for i in range(len(refs))])
             for j in range(n_out)]
    del parts
    return _collect(ex, st, pairs)


def _repartition(ex: Execution, st: OpStats, bundles: list[Bundle],
                 ranges: list[tuple[int, int]]) -> list[Bundle]:
    """One block per (offset, length) of global rows."""
    starts = []
    acc = 0
    for b in bundles:
        starts.append(acc)
        acc += b.num_rows
    pairs = []
    for off, ln in ranges:
        pieces: list[tuple[int, int, int]] = []
        refs: list[Any] = []  # the blocks' object refs
        for bi, b in enumerate(bundles):
            s, e = starts[bi], starts[bi] + b.num_rows
            lo, hi = max(s, off), min(e, off + ln)
            if lo < hi or (ln == 0 and not refs and b is bundles[0]):
                refs.append(b.ref)
                if lo < hi:
                    pieces.append((len(refs) - 1, lo - s, hi - lo))
        if not refs and bundles:
            refs.append(bundles[0].ref)
        pairs.append(ex.task(_slice_concat).remote(pieces, *refs))
        st.tasks += 1
    return _collect(ex, st, pairs)


def slice_bundles(ex: Execution, bundles: list[Bundle], ranges: list[tuple[int, int]]
                  ) -> list[list[Bundle]]:
    """For each (offset, length) of global rows, the bundles holding
    exactly those rows (whole blocks reused, cut blocks sliced by a task)."""
    starts, acc = [], 0
    for b in bundles:
        starts.append(acc)
        acc += b.num_rows
    out = []
    for off, ln in ranges:
        parts = []
        for bi, b in enumerate(bundles):
            s, e = starts[bi], starts[bi] + b.num_rows
            lo, hi = max(s, off), min(e, off + ln)
            if lo >= hi:
                continue
            if lo == s and hi == e:
                parts.append(Bundle(b.ref, b.meta))
            else:
                ref, meta_ref = ex.task(_slice_concat).remote([(0, lo - s, hi - lo)], b.ref)
                parts.append(Bundle(ref, ex.get_meta(meta_ref)))
        out.append(parts)
    return out


def _zip_stage(ex: Execution, src: ZipSource) -> Generator[Bundle, None, None]:
    st = ex.stats.op("Zip", [src])
    st.started()
    sides = [_gather(ex, _build(ex, p)) for p in src.plans]
    left, right = sides[0], sides[1]
    nl, nr = sum(b.num_rows for b in left), sum(b.num_rows for b in right)
    if nl != nr:
        raise ValueError(f"zip: the datasets have different numbers of rows ({nl} vs {nr}); "
                         f"zip needs equal row counts")
    ranges, acc = [], 0
    for b in left:
        ranges.append((acc, b.num_rows))
        acc += b.num_rows
    aligned = slice_bundles(ex, right, ranges)
    pairs = []
    for lb, rparts in zip(left, aligned):
        rrefs = [p.ref for p in rparts] or [right[0].ref]
        if not rparts:
            pairs.append(ex.task(_slice_concat).remote([(0, 0, 0)], right[0].ref))
            pairs[-1] = ex.task(_zip_blocks).remote(1, lb.ref, pairs[-1][0])
        else:
            pairs.append(ex.task(_zip_blocks).remote(1, lb.ref, *rrefs))
        st.tasks += 1
    out = _collect(ex, st, pairs)
    for b in left + right:
        b.release()
    yield from out


def materialize_bundles(plan: LogicalPlan, stats: DatasetStats | None = None
                        ) -> list[tuple[Any, dict]]:
    out = []
    for b in execute(plan, stats):
        b.release()
        out.append((b.ref, b.meta))
    return out


def iter_tables(bundles: Iterable[Bundle], timeout: float | None = None) -> Iterator[pa.Table]:
    """Fetch each bundle's table (zero-copy from the store) in order."""
    for b in bundles:
        t = flowcore.get(b.ref, timeout=timeout)
        b.release()
        yield t
