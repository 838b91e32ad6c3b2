"""``DeploymentHandle`` and ``DeploymentResponse``: calling a deployment
from Python (a driver, a task, another replica).

A call whose arguments are plain values travels over the replica's
authenticated channel (the one the HTTP proxy uses): pickled in the
caller, one frame each way, no scheduler on the path. A call whose
arguments hold object references, and streaming calls, are actor calls. A
response passed as an argument of another handle call is not waited for by
the caller: an actor call's response travels as its object reference (the
next replica awaits it), a channel call's value is forwarded by the
process's serve loop as soon as it arrives, as Ray forwards a small
inlined return value through its owner."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, AsyncIterator, Iterator

import cloudpickle

import flowcore
from flowcore.exceptions import ActorDiedError, GetTimeoutError, TaskError

from . import channel
from .exceptions import RayServeException
from .router import Router, get_router, router_loop

_RETRIES = 3
#: calls whose pickled arguments are bigger go as actor calls (through the
#: object store, without a copy through the channel)
DIRECT_MAX_BYTES = 1 << 20


class _ResponseArg:
    """What an actor call's ``DeploymentResponse`` becomes inside another
    call's arguments: the replica receiving it awaits the reference."""

    __slots__ = ("ref",)

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __reduce__(self) -> Any:
        return (_ResponseArg, (self.ref,))


def _plain(value: Any) -> Any:
    return value


class _Direct:
    """The state of one channel call (touched on the router loop only,
    except ``fut``, which the caller waits on)."""

    __slots__ = ("fut", "attempt", "replica", "channel", "rid")

    def __init__(self) -> None:
        self.fut: concurrent.futures.Future = concurrent.futures.Future()
        self.attempt = 0
        self.replica: Any = None
        self.channel: Any = None
        self.rid: int | None = None


class _Call:
    """One call's target and arguments (kept for a retry on replica death)."""

    __slots__ = ("router", "method", "args", "kwargs", "stream", "deps", "has_refs")

    def __init__(self, router: Router, method: str, args: tuple, kwargs: dict,
                 stream: bool) -> None:
        self.router, self.method, self.args, self.kwargs = router, method, args, kwargs
        self.stream = stream
        self.deps: list[DeploymentResponse] = []      # channel calls' responses
        self.has_refs = False
        for a in (*args, *kwargs.values()):
            if isinstance(a, DeploymentResponse):
                if a._direct is not None:
                    self.deps.append(a)
                else:
                    self.has_refs = True
            elif isinstance(a, flowcore.ObjectRef):
                self.has_refs = True

    # ------------------------------------------------------------ actor path
    def _wire_args(self) -> tuple[tuple, dict]:
        """Arguments as sent: responses of actor calls and object references
        as references the replica awaits (as Ray resolves top-level object
        references), responses of channel calls (finished by now) as their
        values."""
        def conv(a: Any) -> Any:
            if isinstance(a, DeploymentResponse):
                return a._value_now() if a._direct is not None else a._arg()
            if isinstance(a, flowcore.ObjectRef):
                return _ResponseArg(a)
            return a
        return (tuple(conv(a) for a in self.args),
                {k: conv(v) for k, v in self.kwargs.items()})

    def submit(self, replica: Any) -> Any:
        try:
            args, kwargs = self._wire_args()
            ref = replica.actor.handle_request.remote(self.method, args, kwargs, self.stream)
        except BaseException:
            self.router.release(replica)
            raise
        return ref, self.router.track(replica, ref)

    async def assign(self) -> tuple[Any, Any, int]:
        for d in self.deps:
            await d._wait_direct()
        replica = await self.router.acquire()
        return (replica, *self.submit(replica))

    def assign_now(self) -> tuple[Any, Any, int] | None:
        if self.deps:
            return None          # the loop sends it once they are done
        replica = self.router.try_acquire()
        if replica is None:
            return None
        return (replica, *self.submit(replica))

    # ------------------------------------------------------------ channel path
    def direct_ok(self) -> bool:
        return (channel.ENABLED and not self.stream and not self.has_refs
                and self.router.direct)

    def start_direct(self) -> _Direct | None:
        """Send the call over the replica channel (None: it goes as an actor
        call instead)."""
        st = _Direct()
        router = self.router
        loop = router._loop
        if self.deps:
            asyncio.run_coroutine_threadsafe(self._direct_flow(st, None), loop)
            return st
        payload = cloudpickle.dumps((self.method, self.args, self.kwargs), protocol=5)
        if len(payload) > DIRECT_MAX_BYTES:
            return None
        replica = router.try_acquire()
        if replica is None:
            asyncio.run_coroutine_threadsafe(self._direct_flow(st, payload), loop)
        elif router.in_loop():
            self._send(replica, payload, st)
        else:
            loop.call_soon_threadsafe(self._send, replica, payload, st)
        return st

    async def _direct_flow(self, st: _Direct, payload: bytes | None) -> None:
        try:
            if payload is None:
                for d in self.deps:
                    await d._wait_direct()
                args, kwargs = self._wire_args()
                payload = cloudpickle.dumps((self.method, args, kwargs), protocol=5)
            replica = await self.router.acquire()
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            _fail(st.fut, e)
            return
        self._send(replica, payload, st)

    def _send(self, replica: Any, payload: bytes, st: _Direct) -> None:
        """On the router loop: write the call to ``replica``'s channel."""
        router = self.router
        if st.fut.cancelled():
            router.release(replica)
            return
        ch = replica.channel
        if ch is None or ch.closed:
            assert router.secret is not None  # set with the replica set
            ch = replica.channel = channel.Channel(replica.channel_addr, router.secret)
        if ch.writer is None:
            asyncio.ensure_future(self._connect_and_send(ch, replica, payload, st))
            return

        def answered(op: Any, data: Any, err: Any) -> None:
            router.release(replica)
            if err is None:
                _succeed(st.fut, (op, data))
            else:
                self._replica_lost(replica, payload, st, err)
        st.replica, st.channel = replica, ch
        st.rid = ch.send(channel.OP_CALL, payload, answered)

    async def _connect_and_send(self, ch: Any, replica: Any, payload: bytes,
                                st: _Direct) -> None:
        try:
            await ch.connect()
        except Exception as e:  # noqa: BLE001 - the replica is gone
            self.router.release(replica)
            self._replica_lost(replica, payload, st, e)
            return
        self._send(replica, payload, st)

    def _replica_lost(self, replica: Any, payload: bytes, st: _Direct,
                      err: BaseException) -> None:
        self.router.drop_replica(replica.rid)
        st.attempt += 1
        if st.attempt >= _RETRIES or st.fut.cancelled():
            _fail(st.fut, ActorDiedError(
                f"the replica {replica.rid} of {self.router.deployment_name!r} died while "
                f"serving the call to {self.method}() ({err}); it was tried on {st.attempt} "
                f"replicas"))
            return
        asyncio.ensure_future(self._direct_flow(st, payload))

    def decode(self, answer: tuple) -> Any:
        op, data = answer
        if op == channel.ANS_OK:
            return cloudpickle.loads(data)
        if op == channel.ANS_ERR:
            cause, tb, text = cloudpickle.loads(data)
            raise TaskError(f"{self.router.deployment_name}.{self.method}", tb, cause, "",
                            text).as_instanceof_cause()
        raise RayServeException(f"the call to {self.router.deployment_name}.{self.method}() "
                                f"failed in the replica: {cloudpickle.loads(data)[1]}")


def _succeed(fut: concurrent.futures.Future, value: Any) -> None:
    try:
        fut.set_result(value)
    except concurrent.futures.InvalidStateError:   # cancelled meanwhile
        pass


def _fail(fut: concurrent.futures.Future, err: BaseException) -> None:
    try:
        fut.set_exception(err)
    except concurrent.futures.InvalidStateError:
        pass


_UNSET = object()


class DeploymentResponse:
    """The future result of one handle call: ``.result(timeout_s=)``,
    ``await response``, or pass it to another handle call."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._direct: _Direct | None = None
        self._value: Any = _UNSET
        self._assigned: tuple[Any, Any, int] | None = None
        self._pending: concurrent.futures.Future | None = None
        if call.direct_ok():
            self._direct = call.start_direct()
            if self._direct is not None:
                return
        self._assigned = call.assign_now()
        if self._assigned is None:
            self._pending = asyncio.run_coroutine_threadsafe(call.assign(), router_loop())

    # ------------------------------------------------------------ channel calls
    def _finish(self, answer: tuple) -> Any:
        if self._value is _UNSET:
            self._value = self._call.decode(answer)
        return self._value

    async def _wait_direct(self) -> Any:
        assert self._direct is not None
        if self._value is not _UNSET:
            return self._value
        return self._finish(await asyncio.wrap_future(self._direct.fut))

    def _value_now(self) -> Any:
        assert self._direct is not None
        return self._finish(self._direct.fut.result(0))

    # ------------------------------------------------------------ actor calls
    def _assignment(self, timeout: float | None = None) -> tuple[Any, Any, int]:
        if self._assigned is None:
            assert self._pending is not None
            try:
                self._assigned = self._pending.result(timeout)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"no replica of {self._call.router.deployment_name!r} "
                                   f"took the request within {timeout} s") from None
        return self._assigned

    async def _assignment_async(self) -> tuple[Any, Any, int]:
        if self._assigned is None:
            assert self._pending is not None
            assigned: tuple[Any, Any, int] = await asyncio.wrap_future(self._pending)
            self._assigned = assigned
            return assigned
        return self._assigned

    def _arg(self) -> _ResponseArg:
        return _ResponseArg(self._assignment()[1])

    def __reduce__(self) -> Any:
        if self._direct is not None:
            # nested inside another value: travels as its value
            if not self._direct.fut.done() and self._call.router.in_loop():
                raise RuntimeError("a DeploymentResponse nested inside another argument "
                                   "must be finished first: pass it as a top-level "
                                   "argument or await it")
            return (_plain, (self.result(),))
        return (_ResponseArg, (self._assignment()[1],))

    def result(self, *, timeout_s: float | None = None,
               _skip_asyncio_check: bool = False) -> Any:
        """Block until the result is there (``TimeoutError`` after
        ``timeout_s``); raises the deployment's exception."""
        if self._value is not _UNSET:
            return self._value
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            if _skip_asyncio_check and not self._call.router.in_loop():
                return self._result_blocking(timeout_s)
            raise RuntimeError("DeploymentResponse.result() blocks the event loop; inside "
                               "async code use `await response` instead")
        return self._result_blocking(timeout_s)

    def _result_blocking(self, timeout_s: float | None) -> Any:
        if self._direct is not None:
            try:
                answer = self._direct.fut.result(timeout_s)
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"the call to {self._call.router.deployment_name!r} did "
                                   f"not finish within {timeout_s} s") from None
            return self._finish(answer)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for attempt in range(_RETRIES):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            replica, ref, token = self._assignment(left)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                value = flowcore.get(ref, timeout=left)
                self._call.router.untrack(token)
                return value
            except GetTimeoutError:
                raise TimeoutError(f"the call to {self._call.router.deployment_name!r} did "
                                   f"not finish within {timeout_s} s") from None
            except ActorDiedError:
                self._call.router.untrack(token)
                self._call.router.drop_replica(replica.rid)
                if attempt == _RETRIES - 1:
                    raise
                self._assigned = None
                self._pending = asyncio.run_coroutine_threadsafe(self._call.assign(),
                                                                 router_loop())
            except BaseException:
                self._call.router.untrack(token)
                raise
        raise AssertionError("unreachable")

    async def _result_async(self) -> Any:
        if self._direct is not None:
            return await self._wait_direct()
        for attempt in range(_RETRIES):
            replica, ref, token = await self._assignment_async()
            try:
                value = await ref
                self._call.router.untrack(token)
                return value
            except BaseException as e:
                self._call.router.untrack(token)
                if not isinstance(e, ActorDiedError):
                    raise
                self._call.router.drop_replica(replica.rid)
                if attempt == _RETRIES - 1:
                    raise
                self._assigned = None
                self._pending = asyncio.run_coroutine_threadsafe(self._call.assign(),
                                                                 router_loop())
        raise AssertionError("unreachable")

    def __await__(self) -> Any:
        return self._result_async().__await__()

    def cancel(self) -> None:
        """Cancel the call (best effort)."""
        if self._direct is not None:
            st = self._direct
            if st.fut.cancel():
                self._call.router._loop.call_soon_threadsafe(_cancel_direct, self._call, st)
        elif self._assigned is not None:
            flowcore.cancel(self._assigned[1])
        elif self._pending is not None:
            self._pending.cancel()

    def _to_object_ref_sync(self) -> Any:
        if self._direct is not None:
            return flowcore.put(self.result())
        return self._assignment()[1]

    async def _to_object_ref(self) -> Any:
        if self._direct is not None:
            return flowcore.put(await self)
        return (await self._assignment_async())[1]


def _cancel_direct(call: _Call, st: _Direct) -> None:
    """On the router loop: stop a channel call that is in flight."""
    ch, rid = st.channel, st.rid
    if ch is not None and rid is not None and rid in ch.pending:
        ch.cancel(rid)
        call.router.release(st.replica)


class DeploymentResponseGenerator:
    """The result of a call with ``handle.options(stream=True)`` to a
    generator method: iterate it (``for`` or ``async for``)."""

    def __init__(self, call: _Call) -> None:
        self._first = DeploymentResponse(call)
        self._sid: str | None = None
        self._buffer: list = []
        self._done = False

    def _start(self, first: Any) -> None:
        self._sid = first["sid"]

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while not self._buffer:
            if self._done:
                raise StopIteration
            if self._sid is None:
                self._start(self._first.result())
                continue
            replica = self._first._assignment()[0]
            items, done = flowcore.get(replica.actor.stream_next.remote(self._sid))
            self._buffer.extend(items)
            self._done = done
        return self._buffer.pop(0)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        while not self._buffer:
            if self._done:
                raise StopAsyncIteration
            if self._sid is None:
                self._start(await self._first)
                continue
            replica = (await self._first._assignment_async())[0]
            items, done = await replica.actor.stream_next.remote(self._sid)
            self._buffer.extend(items)
            self._done = done
        return self._buffer.pop(0)

    def cancel(self) -> None:
        self._first.cancel()


class DeploymentHandle:
    """Calls one deployment: ``handle.remote(...)``,
    ``handle.method_name.remote(...)``, ``handle.options(method_name=,
    stream=)``. Picklable: pass it to tasks, actors and other deployments."""

    def __init__(self, deployment_name: str, app_name: str = "default", *,
                 method_name: str = "__call__", stream: bool = False) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self._method_name = method_name
        self._stream = stream

    def __reduce__(self) -> Any:
        return (_rebuild_handle, (self.deployment_name, self.app_name, self._method_name,
                                  self._stream))

    def __repr__(self) -> str:
        return (f"DeploymentHandle(deployment={self.deployment_name!r}, "
                f"app={self.app_name!r})")

    def options(self, *, method_name: str | None = None, stream: bool | None = None,
                **_ignored: Any) -> "DeploymentHandle":
        """A copy calling another method and/or streaming."""
        return DeploymentHandle(self.deployment_name, self.app_name,
                                method_name=method_name or self._method_name,
                                stream=self._stream if stream is None else bool(stream))

    def __getattr__(self, name: str) -> "DeploymentHandle":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name.startswith("_"):
            raise AttributeError(f"DeploymentHandle has no attribute {name!r}")
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Send the call to a replica; returns a ``DeploymentResponse`` (a
        ``DeploymentResponseGenerator`` with ``stream=True``) at once."""
        router = get_router(self.app_name, self.deployment_name)
        if router.methods is None and not router.wait_for_snapshot(0.0):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                router.fetch_snapshot(30.0)
            else:
                router.wait_for_snapshot(0.0 if router.in_loop() else 10.0)
        router.check_method(self._method_name)
        call = _Call(router, self._method_name, args, kwargs, self._stream)
        if self._stream:
            return DeploymentResponseGenerator(call)
        return DeploymentResponse(call)


def _rebuild_handle(dep: str, app: str, method: str, stream: bool) -> DeploymentHandle:
    return DeploymentHandle(dep, app, method_name=method, stream=stream)
