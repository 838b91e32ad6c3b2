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
from dask.core import flatten
from dask.order import order

import flowcore
from flowcore import ObjectRef

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


def _run_node(blob: bytes, dep_keys: list, *values: Any) -> Any:
    """In a worker: run one Dask task with its dependencies' values (the
    first ``len(dep_keys)`` arguments; the rest are refs found inside it)."""
    n = len(dep_keys)
    node = _RefUnpickler(io.BytesIO(blob), values[n:]).load()
    return node(dict(zip(dep_keys, values[:n])))


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
                      flowcore_remote_args: dict | None = None, **kwargs: Any) -> Any:
    """Compute ``keys`` of the Dask graph ``dsk`` on flowcore.

    A Dask scheduler (the signature of ``dask.threaded.get``); pass it as
    ``scheduler=`` to ``compute``/``persist`` or set it with
    ``dask.config.set(scheduler=flowcore_dask_get)``.  Connects with
    ``flowcore.init()`` if this process is not connected yet.

    ``flowcore_persist=True``: return ObjectRefs instead of values (so
    ``persist`` keeps the results in the object store).
    ``flowcore_remote_args``: task options for every task (e.g.
    ``{"num_cpus": 2}`` or a scheduling strategy).  Other keyword
    arguments Dask passes to schedulers (``num_workers``, ``pool``, ...)
    are accepted and ignored.
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
    run = _runner()
    if flowcore_remote_args:
        run = run.options(**flowcore_remote_args)
    readers: dict[Any, int] = {}
    for node in graph.values():
        for dep in node.dependencies:
            readers[dep] = readers.get(dep, 0) + 1
    priority = order(graph)
    # a key maps to ("ref", ObjectRef) or ("value", inline value)
    held: dict[Any, tuple[str, Any]] = {}
    for key in sorted(graph, key=priority.__getitem__):
        node = graph[key]
        if isinstance(node, Alias):
            held[key] = held[node.target]
        elif isinstance(node, DataNode):
            value = node.value
            if isinstance(value, ObjectRef):
                held[key] = ("ref", value)
            elif _nbytes(value) >= PUT_MIN_BYTES:
                held[key] = ("ref", flowcore.put(value))
            else:
                held[key] = ("value", value)
        else:
            deps = sorted(node.dependencies, key=priority.__getitem__)
            blob, inner = _dump_node(node)
            args = [held[d][1] for d in deps]
            ref = run.options(name=_task_name(key)).remote(blob, deps, *args, *inner)
            held[key] = ("ref", ref)
        for dep in node.dependencies:  # the submitted task holds what it reads
            readers[dep] -= 1
            if readers[dep] == 0 and dep not in wanted:
                del held[dep]
    results: dict[Any, Any] = {}
    ref_keys = [k for k in wanted if held[k][0] == "ref"]
    if flowcore_persist:
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
