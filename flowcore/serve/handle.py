"""``DeploymentHandle`` and ``DeploymentResponse``: calling a deployment
from Python (a driver, a task, another replica). A response passed as an
argument of another handle call travels as its object reference, so the
value goes from one replica to the next without coming back to the caller."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, AsyncIterator, Iterator

import flowcore
from flowcore.exceptions import ActorDiedError, GetTimeoutError

from .router import Router, get_router, router_loop

_RETRIES = 3


class _ResponseArg:
    """What a ``DeploymentResponse`` becomes inside another call's arguments:
    the replica receiving it awaits the reference."""

    __slots__ = ("ref",)

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __reduce__(self) -> Any:
        return (_ResponseArg, (self.ref,))


class _Call:
    """One call's target and arguments (kept for a retry on replica death)."""

    __slots__ = ("router", "method", "args", "kwargs", "stream")

    def __init__(self, router: Router, method: str, args: tuple, kwargs: dict,
                 stream: bool) -> None:
        self.router, self.method, self.args, self.kwargs = router, method, args, kwargs
        self.stream = stream

    def submit(self, replica: Any) -> Any:
        args = tuple(a._arg() if isinstance(a, DeploymentResponse) else a for a in self.args)
        kwargs = {k: (v._arg() if isinstance(v, DeploymentResponse) else v)
                  for k, v in self.kwargs.items()}
        try:
            ref = replica.actor.handle_request.remote(self.method, args, kwargs, self.stream)
        except BaseException:
            self.router.release(replica)
            raise
        return ref, self.router.track(replica, ref)

    async def assign(self) -> tuple[Any, Any, int]:
        replica = await self.router.acquire()
        return (replica, *self.submit(replica))

    def assign_now(self) -> tuple[Any, Any, int] | None:
        replica = self.router.try_acquire()
        if replica is None:
            return None
        return (replica, *self.submit(replica))


class DeploymentResponse:
    """The future result of one handle call: ``.result(timeout_s=)``,
    ``await response``, or pass it to another handle call."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._assigned = call.assign_now()
        self._pending: concurrent.futures.Future | None = None
        if self._assigned is None:
            self._pending = asyncio.run_coroutine_threadsafe(call.assign(), router_loop())

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
        return (_ResponseArg, (self._assignment()[1],))

    def result(self, *, timeout_s: float | None = None) -> Any:
        """Block until the result is there (``TimeoutError`` after
        ``timeout_s``); raises the deployment's exception."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("DeploymentResponse.result() blocks the event loop; inside "
                               "async code use `await response` instead")
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
        if self._assigned is not None:
            flowcore.cancel(self._assigned[1])
        elif self._pending is not None:
            self._pending.cancel()

    def _to_object_ref_sync(self) -> Any:
        return self._assignment()[1]

    async def _to_object_ref(self) -> Any:
        return (await self._assignment_async())[1]


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
        if router.methods is None:
            router.wait_for_snapshot(0.0 if router.in_loop() else 10.0)
        router.check_method(self._method_name)
        call = _Call(router, self._method_name, args, kwargs, self._stream)
        if self._stream:
            return DeploymentResponseGenerator(call)
        return DeploymentResponse(call)


def _rebuild_handle(dep: str, app: str, method: str, stream: bool) -> DeploymentHandle:
    return DeploymentHandle(dep, app, method_name=method, stream=stream)
