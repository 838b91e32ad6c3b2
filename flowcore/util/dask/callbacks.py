"""Callbacks while a Dask graph runs on flowcore.

Two kinds, both entered with ``with cb:`` (or ``cb.register()``):

* Dask's own local callbacks (``dask.callbacks.Callback``: ``start``,
  ``start_state``, ``pretask``, ``posttask``, ``finish``; e.g.
  ``dask.diagnostics.ProgressBar``).  ``flowcore_dask_get`` fires them in
  this process, with a Dask scheduler state (``ready``, ``waiting``,
  ``running``, ``finished``...) that follows the flowcore tasks as they
  finish: ``pretask`` when a task's inputs are done, ``posttask`` when it is
  done, with its ObjectRef as the result (the value stays in the cluster).
* ``FlowcoreDaskCallback``: Ray's ``RayDaskCallback`` hooks under flowcore
  names.  ``flowcore_presubmit(task, key, deps)`` runs here before a task is
  submitted (a non-None return is used as the task's result and nothing is
  submitted), ``flowcore_postsubmit(task, key, deps, object_ref)`` after,
  ``flowcore_pretask(key, object_refs)`` in the worker before the task runs
  (its return is handed to ``flowcore_posttask(key, result, pre_state)``,
  also in the worker), ``flowcore_postsubmit_all(object_refs, dsk)`` once
  everything was submitted and ``flowcore_finish(result)`` with the result.
"""
from __future__ import annotations

import contextlib
from collections import namedtuple
from datetime import datetime
from typing import Any, Iterator

from dask.callbacks import Callback

import flowcore

#: the flowcore hooks, in the order ``FlowcoreCallback`` holds them
CBS = ("flowcore_presubmit", "flowcore_postsubmit", "flowcore_pretask", "flowcore_posttask",
       "flowcore_postsubmit_all", "flowcore_finish")
#: kept even when None, so pretask and posttask results pair up in the worker
CBS_DONT_DROP = frozenset({"flowcore_pretask", "flowcore_posttask"})

FlowcoreCallback = namedtuple("FlowcoreCallback", CBS)  # type: ignore[misc]
FlowcoreCallbacks = namedtuple("FlowcoreCallbacks",  # type: ignore[misc]
                               [c + "_cbs" for c in CBS])


class FlowcoreDaskCallback(Callback):
    """A Dask callback with flowcore's hooks too (Ray's ``RayDaskCallback``
    under flowcore names: ``_flowcore_presubmit`` ... ``_flowcore_finish``).

    Subclass it and define the ``_flowcore_*`` (and Dask's ``_start``,
    ``_pretask``... ) methods you need, or pass them as keyword arguments
    (``FlowcoreDaskCallback(flowcore_postsubmit=f, finish=g)``).  The
    ``_flowcore_pretask`` / ``_flowcore_posttask`` hooks run inside the
    workers, so the callback object must pickle."""

    flowcore_active: set = set()

    def __init__(self, **kwargs: Any) -> None:
        for name in CBS:
            fn = kwargs.pop(name, None)
            if fn is not None:
                setattr(self, "_" + name, fn)
        super().__init__(**kwargs)

    @property
    def _flowcore_callback(self) -> FlowcoreCallback:
        return FlowcoreCallback(*[_given(self, name) for name in CBS])

    def __enter__(self) -> "FlowcoreDaskCallback":
        self._flowcore_cm = add_flowcore_callbacks(self)
        self._flowcore_cm.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._flowcore_cm.__exit__(*args)

    def register(self) -> None:
        FlowcoreDaskCallback.flowcore_active.add(self._flowcore_callback)
        super().register()

    def unregister(self) -> None:
        FlowcoreDaskCallback.flowcore_active.discard(self._flowcore_callback)
        super().unregister()

    def __getstate__(self) -> dict:
        # shipped to workers for the pretask/posttask hooks: not the context managers
        return {k: v for k, v in self.__dict__.items() if k not in ("_cm", "_flowcore_cm")}

    # the hooks (Ray's signatures); none by default
    def _flowcore_presubmit(self, task: Any, key: Any, deps: dict) -> Any:
        """Before the task is submitted; a non-None return is its result
        (and it is not submitted)."""

    def _flowcore_postsubmit(self, task: Any, key: Any, deps: dict, object_ref: Any) -> None:
        """After the task was submitted, with the ObjectRef of its result."""

    def _flowcore_pretask(self, key: Any, object_refs: list) -> Any:
        """In the worker, before the task runs, with its arguments; the return
        value is ``pre_state`` for ``_flowcore_posttask``."""

    def _flowcore_posttask(self, key: Any, result: Any, pre_state: Any) -> None:
        """In the worker, after the task ran, with its result."""

    def _flowcore_postsubmit_all(self, object_refs: list, dsk: Any) -> None:
        """Once every task was submitted, with the refs of the wanted keys."""

    def _flowcore_finish(self, result: Any) -> None:
        """With the computation's result once it is complete."""


# the base class's no-op hooks count as "not given" (as Ray's do not)
_NOOPS = {name: getattr(FlowcoreDaskCallback, "_" + name) for name in CBS}


def _given(cb: Any, name: str) -> Any:
    fn = getattr(cb, "_" + name, None)
    if fn is None or getattr(fn, "__func__", None) is _NOOPS[name]:
        return None
    return fn


class add_flowcore_callbacks:
    """Make callbacks active for the enclosed block (``with``)."""

    def __init__(self, *callbacks: Any) -> None:
        self.callbacks = [normalize_flowcore_callback(c) for c in callbacks]
        FlowcoreDaskCallback.flowcore_active.update(self.callbacks)

    def __enter__(self) -> "add_flowcore_callbacks":
        return self

    def __exit__(self, *args: Any) -> None:
        for c in self.callbacks:
            FlowcoreDaskCallback.flowcore_active.discard(c)


def normalize_flowcore_callback(cb: Any) -> FlowcoreCallback:
    if isinstance(cb, FlowcoreDaskCallback):
        return cb._flowcore_callback
    if isinstance(cb, FlowcoreCallback):
        return cb
    raise TypeError(f"flowcore_callbacks must be FlowcoreDaskCallback objects or "
                    f"FlowcoreCallback tuples, got {type(cb).__name__}")


def unpack_flowcore_callbacks(cbs: Any) -> FlowcoreCallbacks:
    """The active callbacks, hook by hook (None where no callback has it)."""
    cbs = [normalize_flowcore_callback(c) for c in cbs or ()]
    if not cbs:
        return FlowcoreCallbacks(*([None] * len(CBS)))
    out = []
    for i, fns in enumerate(zip(*cbs)):
        keep = [f for f in fns if f is not None or CBS[i] in CBS_DONT_DROP]
        if CBS[i] in CBS_DONT_DROP and all(f is None for f in fns):
            keep = []
        out.append(keep or None)
    return FlowcoreCallbacks(*out)


@contextlib.contextmanager
def local_flowcore_callbacks(callbacks: Any = None) -> Iterator[Any]:
    """The callbacks of this computation: those given, else the active ones,
    which a scheduler nested inside it then does not see again."""
    taken = callbacks is None
    if taken:
        callbacks, FlowcoreDaskCallback.flowcore_active = \
            FlowcoreDaskCallback.flowcore_active, set()
    try:
        yield callbacks or ()
    finally:
        if taken:
            FlowcoreDaskCallback.flowcore_active = callbacks


class _ProgressRecorder:
    """The actor behind ``ProgressBarCallback``: when each task was
    submitted, started and finished."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.submission_queue: list = []
        self.submitted: dict = {}
        self.scheduled: dict = {}
        self.finished: dict = {}
        self.deps: dict = {}

    def submit(self, key: Any, deps: list, now: Any) -> None:
        self.deps.setdefault(key, set()).update(deps)
        self.submitted[key] = now
        self.submission_queue.append((key, now))

    def task_scheduled(self, key: Any, now: Any) -> None:
        self.scheduled[key] = now

    def finish(self, key: Any, now: Any) -> None:
        self.finished[key] = now

    def result(self) -> tuple[int, int]:
        """(tasks submitted, tasks finished)."""
        return len(self.submitted), len(self.finished)

    def report(self) -> dict:
        """Per key: ``execution_time`` and ``scheduling_time`` (s); and the
        ``submission_order``."""
        out: dict[Any, Any] = {}
        for key, end in self.finished.items():
            start = self.scheduled.get(key, end)
            out[key] = {"execution_time": (end - start).total_seconds(),
                        "scheduling_time": (start - self.submitted.get(key, start))
                        .total_seconds()}
        out["submission_order"] = list(self.submission_queue)
        return out

    def ready(self) -> None:
        pass


#: the name of ProgressBarCallback's recording actor
PROGRESS_ACTOR = "_dask_on_flowcore_pb"


class ProgressBarCallback(FlowcoreDaskCallback):
    """Records when each task was submitted, started and finished in a
    named actor (``_dask_on_flowcore_pb``; Ray's ``ProgressBarCallback``):
    ``cb.pb.result.remote()`` gives (submitted, finished) counts,
    ``cb.pb.report.remote()`` the times per key."""

    def __init__(self) -> None:
        super().__init__()
        try:
            self.pb = flowcore.get_actor(PROGRESS_ACTOR)
            flowcore.get(self.pb.reset.remote())
        except ValueError:
            self.pb = flowcore.remote(_ProgressRecorder).options(name=PROGRESS_ACTOR).remote()
            flowcore.get(self.pb.ready.remote())

    def _flowcore_postsubmit(self, task: Any, key: Any, deps: dict, object_ref: Any) -> None:
        self.pb.submit.remote(key, list(deps), datetime.now())

    def _flowcore_pretask(self, key: Any, object_refs: list) -> None:
        self.pb.task_scheduled.remote(key, datetime.now())

    def _flowcore_posttask(self, key: Any, result: Any, pre_state: Any) -> None:
        self.pb.finish.remote(key, datetime.now())

    def _flowcore_finish(self, result: Any) -> None:
        print("All tasks are completed.")
