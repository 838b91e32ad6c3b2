"""A replica: the actor that holds one instance of a deployment's class
(or its function) and runs handle calls and HTTP requests on it. Async user
methods run on the actor's event loop; sync ones in a thread pool sized by
``max_ongoing_requests``. HTTP requests arrive as an ASGI scope and body and
leave as (status, headers, body), or as a stream pulled by the proxy."""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import json
import os
import pickle
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

import flowcore

from . import channel
from .handle import _ResponseArg


@dataclass
class ReplicaContext:
    """What ``serve.get_replica_context()`` returns inside a replica."""

    app_name: str
    deployment: str
    replica_tag: str
    servable_object: Any

    @property
    def replica_id(self) -> str:
        return self.replica_tag


_context: ReplicaContext | None = None


def get_replica_context() -> ReplicaContext:
    """The running replica's context; ``RuntimeError`` outside a replica."""
    if _context is None:
        raise RuntimeError("serve.get_replica_context() works only inside a deployment's "
                           "replica")
    return _context


class _Stream:
    """Items produced by a running generator or streamed HTTP body, pulled
    in chunks by the caller."""

    def __init__(self) -> None:
        self.items: list = []
        self.done = False
        self.event = asyncio.Event()

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.event.set()

    def finish(self) -> None:
        self.done = True
        self.event.set()

    async def take(self) -> tuple[list, bool]:
        while not self.items and not self.done:
            self.event.clear()
            await self.event.wait()
        items, self.items = self.items, []
        return items, self.done


class BadJSONError(json.JSONDecodeError):
    """``await request.json()`` on a body that is not JSON (answered 400)."""


def _request_class() -> type:
    from starlette.requests import Request

    class ServeRequest(Request):
        async def json(self) -> Any:
            body = await self.body()
            try:
                return json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadJSONError(f"request body is not valid JSON: {e}",
                                   getattr(e, "doc", ""), getattr(e, "pos", 0)) from None
    return ServeRequest


def _to_response(value: Any) -> Any:
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    if isinstance(value, Response):
        return value
    # a user generator streams whatever it yields (str or bytes chunks)
    streamed = inspect.isgenerator(value) or inspect.isasyncgen(value)
    if streamed:
        return StreamingResponse(value)
    if isinstance(value, str):
        return PlainTextResponse(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Response(bytes(value), media_type="application/octet-stream")
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    return JSONResponse(value)


def _bind_class_routes(app: Any, instance: Any, cls: type) -> None:
    """Routes of a FastAPI app declared on the class's methods are bound to
    this replica's instance (``self`` is not a request parameter)."""
    try:
        from fastapi.routing import APIRoute
    except ImportError:
        return
    # matched by qualified name: the app may have travelled apart from the class
    own = {getattr(getattr(cls, n), "__qualname__", None) for n in dir(cls)
           if inspect.isfunction(getattr(cls, n, None))}
    routes = list(app.router.routes)
    for i, route in enumerate(routes):
        if not isinstance(route, APIRoute) or \
                getattr(route.endpoint, "__qualname__", None) not in own:
            continue
        bound = getattr(instance, route.endpoint.__name__)
        app.router.routes.remove(route)
        app.router.add_api_route(
            route.path, bound, methods=list(route.methods or ["GET"]),
            response_model=route.response_model, status_code=route.status_code,
            tags=route.tags, dependencies=route.dependencies, summary=route.summary,
            description=route.description, response_description=route.response_description,
            responses=route.responses, deprecated=route.deprecated, name=route.name,
            include_in_schema=route.include_in_schema,
            response_class=route.response_class)
        new = app.router.routes.pop()
        app.router.routes.insert(i, new)


def _node_host() -> str:
    """The address of this process's node, where proxies can reach it."""
    try:
        me = flowcore.get_runtime_context().get_node_id()
        for n in flowcore.nodes():
            if n["node_id"] == me and n.get("address"):
                return n["address"].split("//")[-1].rsplit(":", 1)[0]
    except Exception:  # noqa: BLE001
        pass
    return "127.0.0.1"


class Replica:
    """One replica of a deployment (created by the controller)."""

    def __init__(self, app_name: str, deployment_name: str, replica_id: str,
                 target: Any, init_args: tuple, init_kwargs: dict, user_config: Any,
                 max_ongoing_requests: int, channel_secret: bytes | None = None) -> None:
        global _context
        self.app_name = app_name
        self.deployment_name = deployment_name
        self.replica_id = replica_id
        self.ongoing = 0
        self.total = 0
        self.errors = 0
        # (end time, seconds) of the newest requests, for the dashboard's latency
        self.latencies: deque[tuple[float, float]] = deque(maxlen=4096)
        self._node_id: str | None = None
        self.streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max(1, max_ongoing_requests), thread_name_prefix="serve-replica")
        self.is_class = inspect.isclass(target)
        holder = getattr(target, "_serve_asgi_app", None) if self.is_class else None
        self.asgi_app = holder.app if holder is not None else None
        if self.is_class:
            self.instance = target(*init_args, **init_kwargs)
        else:
            self.instance = target
        _context = ReplicaContext(app_name, deployment_name, replica_id, self.instance)
        if self.asgi_app is not None:
            _bind_class_routes(self.asgi_app, self.instance, target)
        self._request_cls: type | None = None
        self.user_config = user_config
        if user_config is not None:
            self._reconfigure_sync(user_config)
        self._channel_secret = channel_secret
        self._channel: Any = None
        self._channel_addr: tuple[str, int] | None = None

    # ----------------------------------------------------------- lifecycle
    def _reconfigure_sync(self, user_config: Any) -> None:
        fn = getattr(self.instance, "reconfigure", None) if self.is_class else None
        if fn is None:
            raise TypeError(f"deployment {self.deployment_name!r} got a user_config but "
                            f"defines no reconfigure(self, config) method")
        value = fn(user_config)
        if inspect.isawaitable(value):
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(value)
            finally:
                loop.close()

    async def ready(self) -> dict:
        if self._channel_secret and self._channel is None:
            self._channel, self._channel_addr = await channel.serve(
                {channel.OP_HTTP: self._channel_http, channel.OP_CALL: self._channel_call},
                _node_host(), self._channel_secret)
        return {"pid": os.getpid(), "replica_id": self.replica_id,
                "channel": self._channel_addr}

    async def reconfigure(self, user_config: Any) -> None:
        fn = getattr(self.instance, "reconfigure", None) if self.is_class else None
        if fn is None:
            raise TypeError(f"deployment {self.deployment_name!r} got a user_config but "
                            f"defines no reconfigure(self, config) method")
        await self._invoke(fn, (user_config,), {})
        self.user_config = user_config

    async def check_health(self) -> bool:
        fn = getattr(self.instance, "check_health", None) if self.is_class else None
        if fn is not None:
            await self._invoke(fn, (), {})
        return True

    async def get_num_ongoing(self) -> int:
        return self.ongoing

    async def prepare_for_shutdown(self, wait_loop_s: float, timeout_s: float) -> None:
        """Wait until no request is in flight (checked every
        ``wait_loop_s``), at most ``timeout_s``; then run ``__del__``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            await asyncio.sleep(min(wait_loop_s, max(0.0, deadline - loop.time())))
            if (self.ongoing == 0 and not self.streams) or loop.time() >= deadline:
                break
        fn = getattr(self.instance, "__del__", None) if self.is_class else None
        if fn is not None:
            try:
                await self._invoke(fn, (), {})
            except Exception:  # noqa: BLE001
                traceback.print_exc()

    # ----------------------------------------------------------- calls
    async def _invoke(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn) or \
                inspect.iscoroutinefunction(getattr(fn, "__call__", None)):
            value = fn(*args, **kwargs)
        else:
            loop = asyncio.get_running_loop()
            value = await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))
        if inspect.isawaitable(value):
            value = await value
        return value

    def _method(self, name: str) -> Callable:
        if not self.is_class:
            if name != "__call__":
                raise AttributeError(f"function deployment {self.deployment_name!r} has "
                                     f"no method {name!r}; call the handle itself")
            return self.instance
        fn = getattr(self.instance, name, None)
        if fn is None or not callable(fn):
            raise AttributeError(f"deployment {self.deployment_name!r} has no method "
                                 f"{name!r}")
        return fn

    async def handle_request(self, method: str, args: tuple, kwargs: dict,
                             stream: bool = False) -> Any:
        """A handle call: arguments that are other calls' responses are
        awaited here, then the method runs."""
        self.ongoing += 1
        self.total += 1
        t0 = time.monotonic()
        try:
            if any(isinstance(a, _ResponseArg) for a in args):
                args = tuple([await a.ref if isinstance(a, _ResponseArg) else a
                              for a in args])
            if any(isinstance(v, _ResponseArg) for v in kwargs.values()):
                kwargs = {k: (await v.ref if isinstance(v, _ResponseArg) else v)
                          for k, v in kwargs.items()}
            fn = self._method(method)
            if stream:
                if not (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
                    raise TypeError(f"{self.deployment_name}.{method}() is not a generator; "
                                    f"call it without stream=True")
                return {"sid": self._start_stream(fn(*args, **kwargs))}
            value = await self._invoke(fn, args, kwargs)
            if inspect.isgenerator(value) or inspect.isasyncgen(value):
                raise TypeError(f"{self.deployment_name}.{method}() returned a generator; "
                                f"call it with handle.options(stream=True)")
            return value
        except BaseException:
            self.errors += 1
            raise
        finally:
            self.ongoing -= 1
            self._observe(t0)

    async def _channel_http(self, payload: bytes) -> tuple[int, bytes]:
        scope, body = pickle.loads(payload)
        answer = await self.handle_http(scope, body)
        return channel.ANS_HTTP, pickle.dumps(answer, protocol=5)

    async def _channel_call(self, payload: bytes) -> tuple[int, bytes]:
        """A handle call that came over the channel: its value, or the
        exception with this replica's traceback."""
        method, args, kwargs = pickle.loads(payload)
        try:
            value = await self.handle_request(method, args, kwargs)
        except Exception as e:  # noqa: BLE001 - travels to the caller
            tb = traceback.format_exc()
            try:
                return channel.ANS_ERR, cloudpickle.dumps((e, tb, ""), protocol=5)
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                return channel.ANS_ERR, cloudpickle.dumps(
                    (None, tb, f"{type(e).__name__}: {e}"), protocol=5)
        try:
            return channel.ANS_OK, cloudpickle.dumps(value, protocol=5)
        except Exception as e:  # noqa: BLE001
            return channel.ANS_ERR, cloudpickle.dumps(
                (None, traceback.format_exc(),
                 f"{type(e).__name__}: the return value of {self.deployment_name}."
                 f"{method}() cannot be pickled: {e}"), protocol=5)

    def _start_stream(self, gen: Any) -> str:
        sid = f"{self.replica_id}:{next(self._ids)}"
        st = self.streams[sid] = _Stream()
        loop = asyncio.get_running_loop()

        async def pump() -> None:
            try:
                if inspect.isasyncgen(gen):
                    async for item in gen:
                        st.put(item)
                else:
                    done = object()
                    while True:
                        item = await loop.run_in_executor(self.pool, next, gen, done)
                        if item is done:
                            break
                        st.put(item)
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            finally:
                st.finish()
        asyncio.ensure_future(pump())
        return sid

    async def stream_next(self, sid: str) -> tuple[list, bool]:
        st = self.streams.get(sid)
        if st is None:
            return [], True
        items, done = await st.take()
        if done and not st.items:
            self.streams.pop(sid, None)
        return items, done

    # ----------------------------------------------------------- HTTP
    async def handle_http(self, scope: dict, body: bytes) -> tuple:
        """One HTTP request. Returns ``("full", status, headers, body)`` or,
        for a streamed body, ``("stream", status, headers, sid)``."""
        self.ongoing += 1
        self.total += 1
        t0 = time.monotonic()
        try:
            if self.asgi_app is None:
                return await self._http_direct(scope, body)
            return await self._http_asgi(self.asgi_app, scope, body)
        except BaseException:
            self.errors += 1
            raise
        finally:
            self.ongoing -= 1
            self._observe(t0)

    def _observe(self, t0: float) -> None:
        now = time.monotonic()
        self.latencies.append((now, now - t0))

    async def get_metrics(self, window_s: float = 10.0) -> dict:
        """Counters and the latencies of the last ``window_s`` seconds (for
        the controller's dashboard view)."""
        since = time.monotonic() - window_s
        if self._node_id is None:
            self._node_id = flowcore.get_runtime_context().get_node_id()
        return {"ongoing": self.ongoing, "total": self.total, "errors": self.errors,
                "latencies": [d for t, d in self.latencies if t >= since],
                "node_id": self._node_id}

    async def _http_direct(self, scope: dict, body: bytes) -> tuple:
        """A deployment's own ``__call__``: build the Request, call, and turn
        the value into an answer without an ASGI round (unless it streams)."""
        from starlette.responses import StreamingResponse
        if self._request_cls is None:
            self._request_cls = _request_class()
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        request = self._request_cls(scope, receive)
        try:
            value = await self._invoke(self._method("__call__"), (request,), {})
            response = _to_response(value)
        except Exception as e:  # noqa: BLE001
            return self._error_response(e, False, 500, [], [])
        if isinstance(response, StreamingResponse) or not hasattr(response, "body"):
            return await self._http_asgi(response, scope, body)
        return ("full", response.status_code, response.raw_headers, response.body)

    async def _http_asgi(self, app: Any, scope: dict, body: bytes) -> tuple:
        out: asyncio.Queue = asyncio.Queue()
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()   # until cancelled
            return {"type": "http.disconnect"}

        async def send(msg: dict) -> None:
            out.put_nowait(msg)

        task = asyncio.ensure_future(app(scope, receive, send))
        task.add_done_callback(lambda _t: out.put_nowait(None))
        status, headers, chunks = 500, [], []
        started = False
        while True:
            msg = await out.get()
            if msg is None:       # the app returned or raised
                break
            if msg["type"] == "http.response.start":
                status, headers, started = msg["status"], msg.get("headers", []), True
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
                return ("stream", status, headers, self._stream_http(task, out, chunks))
        if task.done() and task.exception() is not None:
            return self._error_response(task.exception(), started, status, headers, chunks)
        return ("full", status, headers, b"".join(chunks))

    def _stream_http(self, task: asyncio.Future, out: asyncio.Queue, first: list) -> str:
        sid = f"{self.replica_id}:{next(self._ids)}"
        st = self.streams[sid] = _Stream()
        for c in first:
            st.put(c)

        async def pump() -> None:
            try:
                while True:
                    msg = await out.get()
                    if msg is None:
                        break
                    if msg["type"] == "http.response.body":
                        if msg.get("body"):
                            st.put(msg["body"])
                        if not msg.get("more_body", False):
                            break
                e = task.exception() if task.done() and not task.cancelled() else None
                if e is not None:
                    print(f"replica {self.replica_id}: streamed response failed:\n"
                          + "".join(traceback.format_exception(type(e), e, e.__traceback__)),
                          file=sys.stderr, flush=True)
            finally:
                st.finish()
        asyncio.ensure_future(pump())
        return sid

    def _error_response(self, e: BaseException, started: bool, status: int, headers: list,
                        chunks: list) -> tuple:
        if isinstance(e, BadJSONError):
            return ("full", 400, [(b"content-type", b"text/plain; charset=utf-8")],
                    str(e).encode())
        print(f"replica {self.replica_id} of {self.deployment_name}: request failed:\n"
              + "".join(traceback.format_exception(type(e), e, e.__traceback__)),
              file=sys.stderr, flush=True)
        if started and status != 500:
            return ("full", status, headers, b"".join(chunks))
        return ("full", 500, [(b"content-type", b"text/plain; charset=utf-8")],
                f"Internal Server Error: {type(e).__name__} in {self.deployment_name} "
                f"(traceback in the replica's log)".encode())
