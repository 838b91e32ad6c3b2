"""The Dask scheduler ``flowcore_dask_get``: a Dask graph as flowcore tasks.

The graph is converted to Dask's task spec, ordered with ``dask.order``
(Dask's own memory-friendly priority) and submitted in that order: each
``Task`` node one flowcore task named by its key, whose dependencies are the
refs of the nodes it reads, so flowcore's head resolves the graph, moves
data between nodes, retries tasks whose worker died and rebuilds lost
intermediates from lineage.  ``Alias`` nodes cost nothing (they reuse their
target's ref); ``DataNode`` constants travel inline when small and through
the store (``flowcore.put``) when large.  A ref is dropped once every task
reading it was submitted, so the store frees intermediates as the graph
runs.  With ``flowcore_persist=True`` the refs themselves are returned;
``persist()`` does that (through ``flowcore_dask_get.persist``, which Dask
calls for a scheduler that has one), so persisted collections keep their
results in the cluster, and later graphs holding those refs use them as
inputs.
"""
from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Mapping
from typing import Any

import cloudpickle
import dask
from dask._task_spec import Alias, DataNode, convert_legacy_graph, cull
from dask.callbacks import local_callbacks, unpack_callbacks
from dask.core import flatten
from dask.local import finish_task, start_state_from_dask
from dask.order import order

import flowcore
from flowcore import ObjectRef

from .callbacks import local_flowcore_callbacks, unpack_flowcore_callbacks

#: constants at least this large go through the object store (not inline)
PUT_MIN_BYTES = 64 * 1024


class _RefPickler(cloudpickle.CloudPickler):
    """Pickles a Dask task with every ObjectRef inside it (e.g. a persisted
    chunk that Dask's optimizer inlined into a fused task) taken out; the
    refs become top-level task arguments, resolved before the task runs."""

    def __init__(self, f: io.BytesIO):
        super().__init__(f, protocol=5)
        self.refs: list[ObjectRef] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, ObjectRef):
            self.refs.append(obj)
            return len(self.refs) - 1
        return None


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BytesIO, values: tuple):
        super().__init__(f)
        self.values = values

    def persistent_load(self, pid: Any) -> Any:
        return self.values[pid]


def _dump_node(node: Any) -> tuple[bytes, list[ObjectRef]]:
    buf = io.BytesIO()
    pickler = _RefPickler(buf)
    pickler.dump(node)
    return buf.getvalue(), pickler.refs


def _run_node(blob: bytes, dep_keys: list, hooks: Any, *values: Any) -> Any:
    """In a worker: run one Dask task with its dependencies' values (the
    first ``len(dep_keys)`` arguments; the rest are refs found inside it).
    ``hooks``: None, or ``(key, pretask callbacks, posttask callbacks)`` of
    the active ``FlowcoreDaskCallback`` objects."""
    n = len(dep_keys)
    node = _RefUnpickler(io.BytesIO(blob), values[n:]).load()
    if hooks is None:
        return node(dict(zip(dep_keys, values[:n])))
    key, pre, post = hooks
    states = [cb(key, list(values)) if cb is not None else None for cb in pre or ()]
    result = node(dict(zip(dep_keys, values[:n])))
    for i, cb in enumerate(post or ()):
        if cb is not None:
            cb(key, result, states[i] if i < len(states) else None)
    return result


_remote_run: Any = None


def _runner() -> Any:
    global _remote_run
    if _remote_run is None:
        _remote_run = flowcore.remote(_run_node)
    return _remote_run


def _nbytes(value: Any) -> int:
    n = getattr(value, "nbytes", None)
    if isinstance(n, int):
        return n
    try:
        return sys.getsizeof(value)
    except TypeError:
        return 0


def _task_name(key: Any) -> str:
    """The flowcore task's name: the Dask key as Dask prints it."""
    return str(key)


def _pack(keys: Any, values: dict) -> Any:
    """``keys``' nested list structure with each key replaced by its value."""
    if isinstance(keys, list):
        return [_pack(k, values) for k in keys]
    return values[keys]


def flowcore_dask_get(dsk: Mapping, keys: Any, *, flowcore_persist: bool = False,
                      flowcore_remote_args: dict | None = None,
                      flowcore_callbacks: Any = None, **kwargs: Any) -> Any:
    """Compute ``keys`` of the Dask graph ``dsk`` on flowcore.

    A Dask scheduler (the signature of ``dask.threaded.get``); pass it as
    ``scheduler=`` to ``compute``/``persist`` or set it with
    ``dask.config.set(scheduler=flowcore_dask_get)``.  Connects with
    ``flowcore.init()`` if this process is not connected yet.

    ``flowcore_persist=True``: return ObjectRefs instead of values (so
    ``persist`` keeps the results in the object store).
    ``flowcore_remote_args``: task options for every task (e.g.
    ``{"num_cpus": 2}`` or a scheduling strategy).
    ``flowcore_callbacks``: ``FlowcoreDaskCallback`` objects to use instead
    of the active ones (Ray's ``ray_callbacks``); ``callbacks``: Dask
    callbacks to use instead of the active ones (see ``callbacks.py``).
    Other keyword arguments Dask passes to schedulers (``num_workers``,
    ``pool``, ...) are accepted and ignored.
    """
    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    if not flowcore.is_initialized():
        flowcore.init()
    graph = convert_legacy_graph(dict(dsk))
    wanted = set(flatten(keys)) if isinstance(keys, list) else {keys}
    missing = [k for k in wanted if k not in graph]
    if missing:
        raise KeyError(f"flowcore_dask_get: keys {missing[:5]} are not in the graph")
    graph = cull(graph, list(wanted))  # only what the wanted keys need
    for key, node in graph.items():
        absent = [d for d in node.dependencies if d not in graph]
        if absent:
            raise KeyError(f"flowcore_dask_get: task {key!r} depends on {absent[:3]}, which "
                           f"the graph does not contain")
    with local_callbacks(kwargs.pop("callbacks", None)) as dask_cbs, \
            local_flowcore_callbacks(flowcore_callbacks) as fc_cbs:
        return _compute(graph, keys, wanted, flowcore_persist, flowcore_remote_args,
                        list(dask_cbs), unpack_flowcore_callbacks(fc_cbs))


def _compute(graph: dict, keys: Any, wanted: set, persist: bool, remote_args: dict | None,
             dask_cbs: list, fc: Any) -> Any:
    run = _runner()
    if remote_args:
        run = run.options(**remote_args)
    _, start_state, pretask, posttask, _ = unpack_callbacks(dask_cbs)
    started = []
    state: dict = {}
    failed = True
    try:
        for cb in dask_cbs:
            if cb[0]:
                cb[0](graph)
            started.append(cb)
        priority = order(graph)
        follow = bool(start_state or pretask or posttask)
        if follow:
            state = start_state_from_dask(graph, cache={}, keys=list(wanted),
                                          sortkey=priority.get)
            for f in start_state:
                f(graph, state)
        held, watch = _submit(graph, wanted, priority, run, fc, follow)
        if fc.flowcore_postsubmit_all_cbs:
            refs = _pack(keys, {k: held[k][1] for k in wanted})
            for f in fc.flowcore_postsubmit_all_cbs:
                f(refs, graph)
        if follow:
            _follow(graph, state, watch, wanted, priority.get, pretask, posttask)
        watch.clear()
        result = _results(keys, wanted, held, persist)
        for f in fc.flowcore_finish_cbs or ():
            f(result)
        failed = False
        return result
    finally:
        for cb in started:
            if cb[4]:
                cb[4](graph, state, failed)


def _submit(graph: dict, wanted: set, priority: dict, run: Any, fc: Any,
            follow: bool) -> tuple[dict, dict]:
    """Submit every task in Dask's priority order.  Returns what each wanted
    key holds, ``("ref", ObjectRef)`` or ``("value", inline value)``, and the
    refs of the tasks to follow (when Dask callbacks watch them)."""
    readers: dict[Any, int] = {}
    for node in graph.values():
        for dep in node.dependencies:
            readers[dep] = readers.get(dep, 0) + 1
    hooks = fc.flowcore_pretask_cbs or fc.flowcore_posttask_cbs
    held: dict[Any, tuple[str, Any]] = {}
    watch: dict[Any, ObjectRef] = {}
    for key in sorted(graph, key=priority.__getitem__):
        node = graph[key]
        if isinstance(node, Alias):
            held[key] = held[node.target]
        elif isinstance(node, DataNode):
            held[key] = _constant(node.value)
        else:
            held[key] = _submit_task(node, key, held, priority, run, fc, hooks)
            if follow and held[key][0] == "ref":
                watch[key] = held[key][1]
        for dep in node.dependencies:  # the submitted task holds what it reads
            readers[dep] -= 1
            if readers[dep] == 0 and dep not in wanted:
                del held[dep]
    return held, watch


def _constant(value: Any) -> tuple[str, Any]:
    if isinstance(value, ObjectRef):
        return ("ref", value)
    if _nbytes(value) >= PUT_MIN_BYTES:
        return ("ref", flowcore.put(value))
    return ("value", value)


def _submit_task(node: Any, key: Any, held: dict, priority: dict, run: Any, fc: Any,
                 hooks: Any) -> tuple[str, Any]:
    deps = sorted(node.dependencies, key=priority.__getitem__)
    if fc.flowcore_presubmit_cbs or fc.flowcore_postsubmit_cbs:
        dep_map = {d: held[d][1] for d in deps}
        for f in fc.flowcore_presubmit_cbs or ():
            instead = f(node, key, dep_map)
            if instead is not None:  # the first non-None answer is the result
                return _constant(instead)
    blob, inner = _dump_node(node)
    args = [held[d][1] for d in deps]
    task_hooks = (key, fc.flowcore_pretask_cbs, fc.flowcore_posttask_cbs) if hooks else None
    ref = run.options(name=_task_name(key)).remote(blob, deps, task_hooks, *args, *inner)
    for f in fc.flowcore_postsubmit_cbs or ():
        f(node, key, dep_map, ref)
    return ("ref", ref)


def _follow(graph: dict, state: dict, watch: dict, wanted: set, sortkey: Any,
            pretask: list, posttask: list) -> None:
    """Keep Dask's scheduler state in step with the flowcore tasks, firing the
    Dask callbacks' ``pretask`` when a task's inputs are done and
    ``posttask`` (with its ObjectRef as the result) when it is done."""

    def done(key: Any) -> None:
        ref = watch.pop(key, None)
        state["cache"][key] = ref
        finish_task(graph, key, state, wanted, sortkey)
        for f in posttask:
            f(key, ref, graph, state, None)

    def fire() -> None:
        while state["ready"]:
            key = state["ready"].pop()
            state["running"].add(key)
            for f in pretask:
                f(key, graph, state)
            if key not in watch:  # an alias, or a result a callback gave: done at once
                done(key)

    fire()
    while state["running"]:
        running = {watch[k]: k for k in state["running"] if k in watch}
        refs = list(running)
        flowcore.wait(refs, num_returns=1, fetch_local=False)
        ready, _ = flowcore.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        for ref in ready:
            done(running[ref])
        fire()


def _results(keys: Any, wanted: set, held: dict, persist: bool) -> Any:
    results: dict[Any, Any] = {}
    ref_keys = [k for k in wanted if held[k][0] == "ref"]
    if persist:
        for k in wanted:
            kind, v = held[k]
            results[k] = v if kind == "ref" else flowcore.put(v)
    else:
        values = flowcore.get([held[k][1] for k in ref_keys]) if ref_keys else []
        results = dict(zip(ref_keys, values))
        for k in wanted:
            if held[k][0] == "value":
                results[k] = held[k][1]
    return _pack(keys, results)


def _persist(collections: list, optimize_graph: bool = True, **kwargs: Any) -> list:
    """``persist`` for Dask collections: the results stay in the cluster's
    object store as refs in the persisted collections' graphs (pass
    ``flowcore_persist=False`` to bring the values here instead).  Dask calls
    this through ``flowcore_dask_get.persist`` (a scheduler's own persist)."""
    keep = kwargs.pop("flowcore_persist", True)
    remote_args = kwargs.pop("flowcore_remote_args", None)

    def get(dsk: Mapping, keys: Any, **kw: Any) -> Any:
        return flowcore_dask_get(dsk, keys, flowcore_persist=keep,
                                 flowcore_remote_args=remote_args)

    return list(dask.persist(*collections, scheduler=get, optimize_graph=optimize_graph,
                             traverse=False, **kwargs))


flowcore_dask_get.persist = _persist  # type: ignore[attr-defined]


def enable_dask_on_flowcore(shuffle: str | None = "tasks",
                            use_shuffle_optimization: bool = True) -> Any:
    """Make ``flowcore_dask_get`` Dask's default scheduler (and use the
    task-based shuffle for dataframes).  The returned object is also a
    context manager that restores the previous settings on exit.

    ``use_shuffle_optimization`` is accepted for compatibility with Ray's
    ``enable_dask_on_ray`` and has no effect (Dask's own shuffle runs)."""
    settings: dict[str, Any] = {"scheduler": flowcore_dask_get}
    if shuffle is not None:
        settings["dataframe.shuffle.method"] = shuffle
    return dask.config.set(settings)


def disable_dask_on_flowcore() -> Any:
    """Go back to Dask's own default schedulers."""
    return dask.config.set(scheduler=None)
