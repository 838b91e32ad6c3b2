"""The worker process: runs tasks handed over by its node.

The main thread executes tasks one at a time; the client's IO thread holds
the connections.  A task's result goes to the node first ("idle", so the
node can reuse this worker at once) and then to the head ("task_done").
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
from collections import deque
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

from .. import daemon
from ..exceptions import TaskError
from ..objects.ref import set_client
from ..protocol import messages
from .leases import WorkerLease
from .malloc import find_mallopt, keep_freed_memory

logger = logging.getLogger("flowcore.worker")

#: calls of an async actor that overlap when max_concurrency is not given (Ray's)
ASYNC_DEFAULT_CONCURRENCY = 1000
#: thread-pool sizes of native libraries, set per task to its num_cpus
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: those the user set (the environment this process started with, including
#: a runtime_env's env_vars): left alone; see main()
USER_THREAD_VARS: frozenset[str] = frozenset()


class TaskContext:
    def __init__(self) -> None:
        self.task: dict | None = None
        self.gpu_ids: list[int] = []


class Worker:
    def __init__(self, client: Any, wid: str, actor_id: bytes | None = None):
        self.client = client
        self.wid = wid
        self.actor_id = actor_id
        self.instance: Any = None
        self.actor_class = ""
        self.threads: Any = None      # ThreadPoolExecutor of a threaded actor
        self.aloop: Any = None        # event loop of an async actor
        self.asem: Any = None
        self.groups: dict[str, Any] = {}  # concurrency group -> its executor / semaphore
        self.actor_gpus: list[int] = []
        self.actor_spec: dict = {}    # the start_actor message of the hosted actor
        self.tasks: deque[dict | None] = deque()
        self.functions: dict[bytes, Any] = {}
        main_ident = threading.main_thread().ident
        assert main_ident is not None  # the main thread has started
        self.main_ident: int = main_ident
        self.running_tid: bytes | None = None
        self.cancel_requested: bytes | None = None
        self.cancel_before_start: set[bytes] = set()
        self.exiting = False          # the hosted actor exits (exit_actor, sys.exit)
        self.calls: dict[bytes, int] = {}  # runs per function, for max_calls
        self.pid = os.getpid()  # (asked once: a system call per report otherwise)
        self._method_groups: dict[str, str | None] = {}  # method -> its declared group
        # what every call uses, imported once (not at each call)
        from .. import ids
        from ..objects.serialization import NO_ARGUMENTS_BYTES, NONE_BYTES, deserialize, serialize
        self._no_arguments = NO_ARGUMENTS_BYTES
        self._none = NONE_BYTES
        self._object_id = ids.object_id
        self._serialize = serialize
        self._deserialize = deserialize
        #: what this worker does with each op from its node (and with the
        #: actor calls its head and callers send)
        self._ops: dict[str, Callable[[dict], None]] = {
            "run_task": self._queue, "create_actor": self._queue, "cancel": self._cancel,
            "exit": self._exit,
            "release_cached": lambda m: None}  # (the client answers it itself)
        self.lease = WorkerLease(self)  # the lease this pool worker serves, if any
        self._ops.update(self.lease.ops())

    # called by whichever thread is reading the sockets (the client has
    # checked the op against its node's role table)
    def on_node_message(self, msg: dict) -> None:
        self._ops[msg["op"]](msg)

    def _queue(self, msg: dict) -> None:
        if msg.get("lease") is not None and msg["tid"] in self.cancel_before_start:
            # sent by a lease holder and cancelled before it came: ends now,
            # not after the task running here
            self.cancel_before_start.discard(msg["tid"])
            self._report(msg, "cancelled", [], False)
            return
        self.tasks.append(msg)

    def _cancel(self, msg: dict) -> None:
        if self.running_tid == msg["tid"]:
            self.cancel_requested = msg["tid"]
            self.client.interrupt_main = True
            if threading.get_ident() != self.main_ident:
                # read on another thread: wake the main thread to raise it
                signal.pthread_kill(self.main_ident, signal.SIGUSR1)
        elif (queued := next((t for t in self.tasks if t is not None and t.get("lease")
                              is not None and t["tid"] == msg["tid"]), None)) is not None:
            # sent by a lease holder, queued behind the task running here:
            # it ends now (its node cannot drop it, as it does its own)
            self.tasks.remove(queued)
            self._report(queued, "cancelled", [], False)
        else:
            # not started yet (queued here, or still on its way: a task sent
            # by a lease holder may come after its cancel): never start it
            if len(self.cancel_before_start) > 10_000:
                self.cancel_before_start.clear()  # (cancels of tasks long gone)
            self.cancel_before_start.add(msg["tid"])

    def _exit(self, msg: dict) -> None:
        self.tasks.append(None)

    def on_disconnect(self, which: str) -> None:
        os._exit(0)

    def function(self, fid: bytes) -> Any:
        fn = self.functions.get(fid)
        if fn is None:
            import cloudpickle
            blob = self.client.fetch_function(fid)
            fn = self.functions[fid] = cloudpickle.loads(blob)
            _know_identity(fn, fid, blob)
        return fn

    def run(self) -> None:
        tasks = self.tasks
        while True:
            try:
                if not tasks:
                    self.client._wait_until(lambda: bool(tasks), None)
                task = tasks.popleft()
            except KeyboardInterrupt:  # a late cancel signal
                continue
            if task is None:
                return
            try:
                if task["op"] == "create_actor":
                    self.create_actor(task)
                elif task["op"] == "lease_end":
                    self.lease.ended(task)
                elif task.get("actor") is not None and self.threads is not None:
                    pool = self.groups.get(self._group_of(task) or "") or self.threads
                    pool.submit(self.execute, task)
                elif task.get("actor") is not None and self.aloop is not None:
                    import asyncio
                    asyncio.run_coroutine_threadsafe(self.execute_async(task), self.aloop)
                else:
                    self.execute(task)
            except KeyboardInterrupt:
                # a cancel that arrived after the task ended: nothing to interrupt
                pass

    def _resolve_args(self, task: dict) -> tuple[tuple, dict]:
        deps = task["deps"]
        if not deps and task.get("args") is not None:  # no ref among the arguments
            if task["args"] == self._no_arguments:  # a call without arguments
                return (), {}
            a, k = self._deserialize(task["args"])
            return tuple(a), k
        from ..remote_function import ArgRef
        values = [self.client.objects.value_of(info) for info in deps]
        if task.get("args") is None:
            a, k = values[task["args_dep"]]
        else:
            a, k = self._deserialize(task["args"])

        def sub(v: Any) -> Any:
            return values[v.i] if isinstance(v, ArgRef) else v
        return tuple(sub(v) for v in a), {key: sub(v) for key, v in k.items()}

    def _group_of(self, task: dict) -> str | None:
        """An actor call's concurrency group: the call's own
        (``.options(concurrency_group=)``), else its method's declared one."""
        if task.get("cgroup"):
            return task["cgroup"]
        method = task.get("method") or ""
        try:
            return self._method_groups[method]
        except KeyError:
            pass
        member = getattr(type(self.instance), method, None)
        group = self._method_groups[method] = (
            getattr(member, "__flowcore_method_options__", None) or {}).get("concurrency_group")
        return group

    def _target(self, task: dict) -> Any:
        if task.get("actor") is not None:
            if task["method"] == "__ray_terminate__":
                return _terminate
            group = self._group_of(task)
            if group is not None and group not in self.groups:
                raise ValueError(f"concurrency group {group!r} of {task.get('name')} is not one "
                                 f"of the actor's concurrency_groups "
                                 f"{sorted(self.groups) or '(none declared)'}")
            return getattr(self.instance, task["method"])
        return self.function(task["fid"])

    def execute(self, task: dict) -> None:
        tid = task["tid"]
        if tid in self.cancel_before_start:
            self.cancel_before_start.discard(tid)
            self._report(task, "cancelled", [], False)
            return
        self._set_gpus(task)
        if self.actor_id is None:
            self._set_threads(task)
        task["_started"] = time.time()
        self.client.current_task = task
        if self.actor_id is None:  # tasks it submits inherit its runtime_env and job
            self.client.process_task = task  # (its threads' gets give its CPU back)
            self.client.runtime_env = task.get("renv")
            self.client.job = task.get("job")
        concurrent_call = task.get("actor") is not None and self.threads is not None
        status, results, retryable = "ok", None, False
        leaving: SystemExit | None = None
        keep: list = []  # values stay alive until task_done is queued, so refs inside
        # them are not dropped (decref) before the head learns they are held
        try:
            try:
                if not concurrent_call:
                    self.client.interrupt_main = False  # (a cancel of the task before)
                    self.running_tid = tid
                if tid in self.cancel_before_start:
                    # its cancel was read while it was being set up (before
                    # it counted as running): it ends here, cancelled
                    self.cancel_before_start.discard(tid)
                    self.cancel_requested = tid
                    raise KeyboardInterrupt("cancelled")
                fn = self._target(task)
                args, kwargs = self._resolve_args(task)
                value = fn(*args, **kwargs)
                del args, kwargs
                if self.instance is None and inspect.iscoroutine(value):
                    # ``@remote`` on an ``async def``: run the coroutine to
                    # completion here, on an event loop of its own
                    value = asyncio.run(value)
                if (task.get("xopts") or {}).get("gen"):
                    status, results = self._stream(task, value, keep)  # runs the body
                    self.running_tid = None
                else:
                    self.running_tid = None
                    results = self._results(task, value, keep)
                del value
            except SystemExit as e:  # exit_actor(), sys.exit(), exit()
                self.running_tid = None
                leaving = e
            except KeyboardInterrupt as e:
                self.running_tid = None
                if self.cancel_requested == tid:
                    status = "cancelled"
                else:  # the task raised it itself: an ordinary failure
                    status = "error"
                    results = self._error_results(task, e)
            except BaseException as e:  # noqa: BLE001 - every error goes back to the caller
                self.running_tid = None
                status = "error"
                retryable = _retryable(task.get("retry_exc"), e)
                results = self._error_results(task, e)
        finally:
            self.running_tid = None
            self.cancel_requested = None
            self.client.interrupt_main = False
            self.client.current_task = None
            self.client.process_task = None
        ended = getattr(self.client, "task_ended", None)
        if ended is not None and self.actor_id is None:
            ended()  # the task's leases end with it (client/worker_leases.py)
        if leaving is not None:
            self._leave(task, leaving)
            return
        self._report(task, status, results or [], retryable)
        del keep

    # ------------------------------------------------------------ generator tasks
    def _stream_start(self, task: dict, value: Any, keep: list) -> tuple[Callable, list]:
        """Check ``value`` is a generator; return ``push(item)``, which makes
        each yielded value an object and reports it (``task_yield``), and the
        list of yielded object ids it fills."""
        mode = task["xopts"]["gen"]
        if not (inspect.isgenerator(value) or inspect.isasyncgen(value)
                or hasattr(value, "__next__")):
            raise TypeError(f"{task.get('name', '?')} has num_returns={mode!r} but returned "
                            f"{type(value).__name__}, not a generator: use yield")
        oids: list[bytes] = []

        def push(item: Any) -> None:
            info = self._store_result(task["tid"], len(oids) + 1, item)
            oids.append(info["oid"])
            keep.append(item)
            self.client.send("head", messages.task_yield(task["tid"], info,
                                                         mode == "streaming"))
            if mode == "streaming":
                self._flush_now()  # the caller hears of it now, not when the task ends
        return push, oids

    def _stream_end(self, task: dict, oids: list[bytes],
                    error: BaseException | None) -> tuple[str, list[dict]]:
        """The end object (index 0): the number of values (streaming) or
        their refs (dynamic), or the error; it holds the yielded values."""
        if error is not None:
            results = self._error_results(task, error)
            results[0]["nested"] = list(oids)
            return "error", results
        if task["xopts"]["gen"] == "streaming":
            result = self._store_result(task["tid"], 0, len(oids))
            result["nested"] = list(oids)
        else:
            from ..objects.generator import YieldedRefs
            result = self._store_result(task["tid"], 0, YieldedRefs(oids))
        return "ok", [result]

    def _stream(self, task: dict, value: Any, keep: list) -> tuple[str, list[dict]]:
        push, oids = self._stream_start(task, value, keep)
        try:
            if inspect.isasyncgen(value):
                async def drive() -> None:
                    async for item in value:
                        push(item)
                asyncio.run(drive())
            else:
                for item in value:
                    push(item)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - ends the stream with the error
            return self._stream_end(task, oids, e)
        return self._stream_end(task, oids, None)

    async def _stream_async(self, task: dict, value: Any, keep: list) -> tuple[str, list[dict]]:
        push, oids = self._stream_start(task, value, keep)
        try:
            if inspect.isasyncgen(value):
                async for item in value:
                    push(item)
            else:
                for item in value:
                    push(item)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            return self._stream_end(task, oids, e)
        return self._stream_end(task, oids, None)

    def _flush_now(self) -> None:
        """Send what is queued now, from a thread running user code (a thread
        waiting in select was already woken by ``send``)."""
        c = self.client
        pump = getattr(c, "_pump", None)
        if pump is not None and pump.acquire(blocking=False):
            c._pump_owner = threading.get_ident()
            try:
                c._flush()
            finally:
                c._pump_owner = None
                pump.release()
                # a thread that found the pump taken waits to be told it is free
                # (as after any pump): without this it would sleep for good
                with c._cv:
                    c._cv.notify_all()

    def _leave(self, task: dict, exc: SystemExit) -> None:
        """A task or actor call raised SystemExit: as in Ray, the process ends.

        In an actor (``exit_actor()``, ``sys.exit()``, ``__ray_terminate__``)
        the head is told first, so the actor is dead for good (no restart) and
        its pending calls fail with ``ActorDiedError`` naming the exit; the
        process then leaves the run loop and runs its atexit handlers.  In a
        task the worker just exits: the task fails with
        ``WorkerCrashedError`` (retried within ``max_retries`` like any crash).
        """
        from ..runtime_context import ActorExit
        name = task.get("name", "?")
        if self.actor_id is None:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            logger.warning("task %s called sys.exit(%r): the worker process exits", name,
                           exc.code)
            flush = getattr(self.client, "_flush", None)
            if flush is not None:  # side reports of earlier tasks go before the process
                try:
                    flush(force=True)
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            os._exit(code)
        how = exc.reason if isinstance(exc, ActorExit) else \
            f"it called sys.exit({'' if exc.code is None else repr(exc.code)}) in {name}"
        if not self.exiting:
            self.exiting = True
            self.client.send("head", messages.actor_exit(self.actor_id, how))
            self.tasks.appendleft(None)  # the run loop ends; main() runs atexit handlers
            wake = getattr(self.client, "_wake", None)
            if wake is not None:
                wake()

    async def execute_async(self, task: dict) -> None:
        """One call of an async actor: runs on the actor's event loop, at most
        ``max_concurrency`` at a time."""
        sem = self.groups.get(self._group_of(task) or "") or self.asem
        async with sem:
            self._set_gpus(task)
            task["_started"] = time.time()
            self.client.current_task = task
            keep: list = []
            try:
                fn = self._target(task)
                args, kwargs = self._resolve_args(task)
                value = fn(*args, **kwargs)
                if hasattr(value, "__await__"):
                    value = await value
                if (task.get("xopts") or {}).get("gen"):
                    status, results = await self._stream_async(task, value, keep)
                else:
                    status, results = "ok", self._results(task, value, keep)
            except SystemExit as e:  # exit_actor(), sys.exit()
                self.client.current_task = None
                self._leave(task, e)
                return
            except BaseException as e:  # noqa: BLE001
                status, results = "error", self._error_results(task, e)
                retryable = _retryable(task.get("retry_exc"), e)
            else:
                retryable = False
            finally:
                self.client.current_task = None
            self._report(task, status, results, retryable)
            del keep

    def _set_threads(self, task: dict) -> None:
        """OMP/MKL/OpenBLAS thread counts follow the task's ``num_cpus`` (at
        least 1), as in Ray, unless the user set them for the process."""
        if self.actor_id is not None:
            cpus = (self.actor_spec.get("hold") or {}).get("CPU")
        else:
            cpus = (task.get("res") or {}).get("CPU")
        n = str(max(1, int(cpus or 1)))
        for var in THREAD_VARS:
            if var not in USER_THREAD_VARS:
                os.environ[var] = n

    def _set_gpus(self, task: dict) -> None:  # noqa: D401
        if self.actor_id is not None:
            task["gpu_ids"] = self.actor_gpus  # an actor's GPUs are its own for life
            return
        gpu_ids = task.get("gpu_ids") or []
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
        elif self.actor_id is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)

    def _results(self, task: dict, value: Any, keep: list) -> list[dict]:
        nret = task.get("nret", 1)
        if nret == 1:
            keep.append(value)
            return [self._store_result(task["tid"], 0, value)]
        name = task.get("name", "?")
        if not isinstance(value, (tuple, list)) or len(value) != nret:
            raise ValueError(
                f"task {name} declared num_returns={nret} but returned "
                f"{type(value).__name__}"
                + (f" of length {len(value)}" if hasattr(value, "__len__") else "")
                + f"; return a tuple of {nret} values")
        values = list(value)
        keep.append(values)
        return [self._store_result(task["tid"], i, v) for i, v in enumerate(values)]

    def _report(self, task: dict, status: str, results: list, retryable: bool) -> None:
        tid = task["tid"]
        reply = task.get("reply_conn")
        answer = None
        if reply:
            # a call sent here directly by its caller: the caller gets the
            # inline returns at once (the main thread of a sync actor or of a
            # leased worker writes them now, before building the head's
            # report: the caller goes on meanwhile); the head learns the
            # outcome as usual
            answer = messages.direct_answer(task, [] if retryable and status == "error"
                                            else results)  # (a retried call: the head's)
            if threading.get_ident() == self.main_ident:
                self.client.answer_now(reply, answer)
                answer = None
        if task.get("actor") is None and task.get("lease") is None:
            retire = False
            limit = (task.get("xopts") or {}).get("max_calls")
            if limit and status != "cancelled":  # max_calls: this process runs it N times
                n = self.calls[task["fid"]] = self.calls.get(task["fid"], 0) + 1
                retire = n >= limit  # the node replaces this process
            self.client.send("node", messages.worker_idle(tid, retire))
        msg = messages.task_done(tid, status, results, retryable, pid=self.pid,
                                 wid=self.wid, started=task.get("_started"))
        if status == "error" and results:
            msg["error_text"] = results[0].get("text")
        if task.get("local"):
            msg["local"] = True  # the head may not have recorded it as running yet
        if reply:
            # (the answer first; the report is a side report, sent with others
            # within SIDE_FLUSH: the caller's next call need not wait for it)
            msg["answered_direct"] = True
            if not (retryable and status == "error"):  # (else the head retries it)
                msg["results"] = messages.mark_sent(results)
            if answer is not None:
                self.client.send(reply, answer)  # the answer first, the report after
            self.client.send("head", msg, lazy=True)
            return
        self.client.send("head", msg)

    # ------------------------------------------------------------ actors
    def create_actor(self, spec: dict) -> None:
        """Run the constructor; tell the head the actor is ready, or why not."""
        from ..objects.serialization import serialize
        from ..exceptions import ActorDiedError
        self.actor_class = spec.get("name", "?")
        self.actor_spec = spec
        self._set_threads(spec)
        self.client.runtime_env = spec.get("renv")
        self.client.job = spec.get("job")
        self.client.actor_bundle = spec.get("bundle")
        self.actor_gpus = list(spec.get("gpu_ids") or [])
        if self.actor_gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.actor_gpus)
        self.client.current_task = {"tid": spec["tid"], "actor": spec["aid"],
                                    "bundle": spec.get("bundle")}
        try:
            cls = self.function(spec["fid"])
            args, kwargs = self._resolve_args(spec)
            self.instance = cls(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            err = ActorDiedError(f"actor {self.actor_class} failed in its constructor "
                                 f"(pid {os.getpid()}):\n{tb}")
            self.client.send("head", messages.actor_failed(
                spec["aid"], f"{type(e).__name__}: {e}", serialize(err).to_bytes()))
            return
        finally:
            self.client.current_task = None
        if spec.get("is_async"):
            import asyncio
            self.aloop = asyncio.new_event_loop()
            # an explicit max_concurrency bounds the overlapping calls (1: one
            # at a time, in order); unset, up to 1000 (Ray's default)
            limit = spec.get("max_concurrency")
            self.asem = asyncio.Semaphore(ASYNC_DEFAULT_CONCURRENCY if limit is None else limit)
            self.groups = {g: asyncio.Semaphore(n)
                           for g, n in (spec.get("concurrency_groups") or {}).items()}
            threading.Thread(target=self.aloop.run_forever, name="flowcore-actor-loop",
                             daemon=True).start()
        elif (spec.get("max_concurrency") or 1) > 1 or spec.get("concurrency_groups"):
            from concurrent.futures import ThreadPoolExecutor
            self.threads = ThreadPoolExecutor(spec.get("max_concurrency") or 1,
                                              thread_name_prefix="flowcore-actor")
            # each concurrency group runs its calls on threads of its own
            self.groups = {g: ThreadPoolExecutor(n, thread_name_prefix=f"flowcore-actor-{g}")
                           for g, n in (spec.get("concurrency_groups") or {}).items()}
        port = self._listen_for_callers()
        self.client.send("head", messages.actor_ready(spec["aid"], os.getpid(), port))

    def _listen_for_callers(self) -> int | None:
        """Open the socket on which callers send calls directly; its port."""
        if not self.client.takes_direct_calls() or self.client.listener is not None:
            return getattr(self.client.listener, "port", None)
        from ..protocol.comm import parse_address
        from .actor_listener import ActorListener
        try:
            host = parse_address(self.client.node_address or "")[0]
            self.client.listener = ActorListener(self.client, host, self.client.token,
                                                 self.client.tls)
        except OSError as e:
            logger.warning("actor %s takes no direct calls: %s", self.actor_class, e)
            return None
        return self.client.listener.port

    def _store_result(self, tid: bytes, i: int, value: Any) -> dict:
        oid = self._object_id(tid, i)
        if value is None:  # (the same bytes every time)
            return {"oid": oid, "inline": self._none, "size": len(self._none), "nested": []}
        s = self._serialize(value)
        nested = list(s.contained_refs)
        if s.total_size <= messages.INLINE_MAX:
            data = s.to_bytes()
            return {"oid": oid, "inline": data, "size": len(data), "nested": nested}
        self.client.objects.write_to_store(oid, s)
        return {"oid": oid, "node": self.client.node_id, "size": s.total_size, "nested": nested}

    def _error_results(self, task: dict, exc: BaseException) -> list[dict]:
        from .. import ids
        from ..objects.serialization import serialize
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name = task.get("name", "?")
        if isinstance(exc, TaskError):
            err: BaseException = exc  # an upstream failure passes through unchanged
        else:
            err = TaskError(name, f"(in task {name}, pid {os.getpid()})\n{tb}", exc,
                            task["tid"].hex())
        try:
            data = serialize(err).to_bytes()
        except Exception:
            try:
                text = str(exc)
            except Exception:  # noqa: BLE001 - a __str__ that raises
                text = "<str() failed>"
            kind = type(exc).__qualname__
            err = TaskError(name, f"(in task {name}, pid {os.getpid()})\n{tb}\n"
                            f"(the exception {kind} could not be serialized, "
                            f"so only its text is kept)", None, task["tid"].hex(),
                            f"{kind}: {text}" if text else kind)
            data = serialize(err).to_bytes()
        # for views (the dashboard, the history): the traceback, ending with
        # "Type: message"; its end kept when long
        text = tb if len(tb) <= 4000 else "…\n" + tb[-4000:]
        return [{"oid": ids.object_id(task["tid"], i), "inline": data, "size": len(data),
                 "error": True, "text": text} for i in range(task.get("nret", 1))]


def _know_identity(fn: Any, fid: bytes, blob: bytes) -> None:
    """A remote function calling itself (a recursive task: ``fib`` submits
    ``fib``) finds its own ``RemoteFunction`` among its globals, unpickled
    without its id: give it the id and pickle it was loaded from, so its
    first ``.remote()`` here does not pickle and hash the function again."""
    from ..remote_function import RemoteFunction
    for value in list(getattr(fn, "__globals__", {}).values()):
        if isinstance(value, RemoteFunction) and value._function is fn and value._fid is None:
            value._fid, value._blob = fid, blob


def _terminate() -> None:
    """The body of ``handle.__ray_terminate__.remote()``: runs after the calls
    queued before it, then ends the actor gracefully."""
    from ..runtime_context import ActorExit
    raise ActorExit("it was terminated with __ray_terminate__")


def _retryable(spec: Any, exc: BaseException) -> bool:
    if spec is True:
        return True
    if not spec:
        return False
    try:
        import cloudpickle
        types = tuple(cloudpickle.loads(spec))
        return isinstance(exc, types)
    except Exception:  # noqa: BLE001 - an unreadable spec retries nothing
        return False


def preload() -> None:
    """Import what ``main`` and a task's first API calls import, in the
    process that forks workers (the node), so that a forked worker starts
    with them (and, where bytecode is not cached, does not compile them):
    the API module (``flowcore.get`` inside a task), the ``idna`` codec
    (``getaddrinfo`` of the node's and head's addresses), glibc's
    ``mallopt`` (found by running ``ldconfig``)."""
    import codecs

    from .. import api, runtime_context  # noqa: F401
    from ..client.inline import InlineClient  # noqa: F401
    from ..protocol import tls  # noqa: F401
    from .output import install  # noqa: F401
    codecs.lookup("idna")
    find_mallopt()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flowcore-worker-process")
    p.add_argument("--node", required=True)
    p.add_argument("--head", required=True)
    p.add_argument("--wid", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--session-dir", required=True)
    p.add_argument("--actor", default=None, help="hex id of the actor this process hosts")
    p.add_argument("--path", action="append", default=[],
                   help="a runtime_env directory to put first on sys.path (repeatable)")
    args = p.parse_args(argv)
    global USER_THREAD_VARS
    USER_THREAD_VARS = frozenset(v for v in THREAD_VARS if v in os.environ)
    keep_freed_memory()
    daemon.setup_logging(None, os.environ.get("FLOWCORE_LOG_LEVEL", "WARNING"))
    extra = os.environ.get("FLOWCORE_WORKER_SYS_PATH")
    if extra:
        for entry in reversed(extra.split(os.pathsep)):
            if entry not in sys.path:
                sys.path.insert(0, entry)
    # the runtime_env's working_dir, then its py_modules, before anything else
    sys.path[:0] = args.path
    token = os.environ.pop("FLOWCORE_TOKEN", "").encode()
    from ..client.inline import InlineClient
    from ..protocol import tls
    client = InlineClient(args.head, token, args.node, wid=args.wid, tls=tls.from_env())
    client.actor_id = bytes.fromhex(args.actor) if args.actor else None
    worker = Worker(client, args.wid, bytes.fromhex(args.actor) if args.actor else None)
    client.on_node_message = worker.on_node_message
    client.worker_lease = worker.lease if worker.actor_id is None else None
    client.on_disconnect = worker.on_disconnect
    set_client(client)
    if os.environ.get("FLOWCORE_LOG_TO_DRIVER", "1") != "0":
        from .output import install

        def label() -> tuple[str, str | None] | None:
            task = client.current_task
            if task is None:
                return (worker.actor_class or "worker", None) if worker.actor_id else None
            name = task.get("name") or worker.actor_class or "task"
            return name, task["tid"].hex() if task.get("tid") else None
        install(client, label)
    from .. import runtime_context
    runtime_context.set_worker(worker)
    client.start()
    try:
        worker.run()
    finally:
        client.close()
    if worker.exiting:
        # an actor that exited on purpose: its atexit handlers run; threads
        # still running calls (threaded or async actors) do not hold it up
        import atexit
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
