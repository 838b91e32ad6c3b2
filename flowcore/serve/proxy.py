"""The HTTP proxy: an actor holding no CPU that runs uvicorn (httptools and
uvloop when installed) with a plain ASGI app on the process's serve event
loop. It matches the longest ``route_prefix``, reads the body (413 past
``max_body_size``), routes the request to a replica of the application's
ingress deployment through that deployment's ``Router`` (503 when its queue
is full) and writes the replica's answer, or pulls a streamed body chunk by
chunk."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import flowcore
from flowcore.exceptions import ActorDiedError

from . import channel
from .channel import Channel, ChannelClosed
from .exceptions import BackPressureError, RayServeException
from .router import get_controller, get_router, router_loop

logger = logging.getLogger("flowcore.serve")

_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_ASGI = {"version": "3.0", "spec_version": "2.3"}
# HTTP requests travel over the replicas' channels unless it is disabled
DIRECT_HTTP = channel.ENABLED
_RETRIES = 3


def _import_uvicorn() -> Any:
    try:
        import starlette  # noqa: F401 - replicas build Requests with it
        import uvicorn
    except ImportError as e:
        raise ImportError(f"flowcore.serve's HTTP proxy needs uvicorn and starlette ({e}); "
                          f"install them with: pip install 'flowcore[serve]'") from None
    return uvicorn


class ProxyApp:
    """The ASGI application of the proxy."""

    def __init__(self, max_body_size: int, request_timeout_s: float | None,
                 root_path: str = "", channel_secret: bytes | None = None) -> None:
        self.channel_secret = channel_secret if DIRECT_HTTP else None
        self.max_body_size = max_body_size
        self.request_timeout_s = request_timeout_s
        self.root_path = root_path.rstrip("/")
        self.routes: dict[str, tuple[str, str]] = {}
        self.prefixes: list[str] = []
        self.routes_version = -1
        self.requests = 0
        self.errors = 0
        self.metrics = _Metrics()

    def set_routes(self, routes: dict) -> None:
        self.routes = dict(routes)
        self.prefixes = sorted(self.routes, key=len, reverse=True)
        for app_name, dep in self.routes.values():
            get_router(app_name, dep)     # learn the replicas before the first request

    async def watch_routes(self) -> None:
        delay = 0.05
        while True:
            try:
                snap = await get_controller().listen_for_change.remote(
                    "routes", self.routes_version)
                delay = 0.05
            except Exception as e:  # noqa: BLE001
                logger.debug("proxy: routes long-poll failed: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if snap is not None:
                self.routes_version = snap["version"]
                self.set_routes(snap["routes"])

    def match(self, path: str) -> tuple[str, tuple[str, str]] | None:
        for p in self.prefixes:
            if p == "/" or path == p or path.startswith(p + "/") or \
                    (p.endswith("/") and path.startswith(p)):
                return p, self.routes[p]
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        self.requests += 1
        path = scope["path"]
        if self.root_path and path.startswith(self.root_path):
            path = path[len(self.root_path):] or "/"
        if path == "/-/healthz":
            return await self._reply(send, 200, _TEXT, b"success")
        if path == "/-/metrics":
            body, ctype = self.metrics.render()
            return await self._reply(send, 200, [(b"content-type", ctype.encode())], body)
        if path == "/-/routes":
            import json
            body = json.dumps({p: a for p, (a, _) in self.routes.items()}).encode()
            return await self._reply(send, 200, [(b"content-type", b"application/json")],
                                     body)
        m = self.match(path)
        if m is None:
            return await self._reply(send, 404, _TEXT,
                                     f"no application serves the path {path!r}; routes: "
                                     f"{sorted(self.routes) or 'none'}".encode())
        prefix, (app_name, dep) = m
        started = time.perf_counter()
        status_box = [0]

        async def counting_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status_box[0] = msg["status"]
            await send(msg)
        try:
            await self._route(scope, receive, counting_send, path, prefix, app_name, dep)
        finally:
            self.metrics.observe(app_name, dep, prefix, scope["method"], status_box[0],
                                 time.perf_counter() - started)

    async def _route(self, scope: dict, receive: Any, send: Any, path: str, prefix: str,
                     app_name: str, dep: str) -> None:
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        sub = {"type": "http", "asgi": _ASGI, "http_version": scope["http_version"],
               "method": scope["method"], "scheme": scope.get("scheme", "http"),
               "path": path, "raw_path": scope.get("raw_path"),
               "query_string": scope.get("query_string", b""),
               "root_path": "" if prefix == "/" else prefix.rstrip("/"),
               "headers": scope["headers"], "server": scope.get("server"),
               "client": scope.get("client")}
        router = get_router(app_name, dep)
        for attempt in range(_RETRIES):
            try:
                replica = await router.acquire()
            except BackPressureError as e:
                return await self._reply(send, 503, _TEXT, str(e).encode())
            except RayServeException as e:
                return await self._reply(send, 503, _TEXT, str(e).encode())
            try:
                try:
                    if self.channel_secret and replica.channel_addr:
                        if replica.channel is None or replica.channel.closed:
                            replica.channel = Channel(replica.channel_addr,
                                                      self.channel_secret)
                        pending = replica.channel.call(sub, body)
                    else:
                        pending = _await(replica.actor.handle_http.remote(sub, body))
                    if self.request_timeout_s is not None:
                        result = await asyncio.wait_for(pending, self.request_timeout_s)
                    else:
                        result = await pending
                finally:
                    router.release(replica)
                if result[0] == "error":
                    raise RuntimeError(result[1])
            except (ActorDiedError, ChannelClosed):
                router.drop_replica(replica.rid)
                if attempt == _RETRIES - 1:
                    return await self._reply(send, 503, _TEXT,
                                             b"the replica died while serving the request")
                continue
            except asyncio.TimeoutError:
                return await self._reply(send, 408, _TEXT,
                                         f"request timed out after {self.request_timeout_s} s "
                                         f"(request_timeout_s)".encode())
            except Exception as e:  # noqa: BLE001
                self.errors += 1
                logger.warning("proxy: request to %s failed: %s", dep, e)
                return await self._reply(send, 500, _TEXT,
                                         f"Internal Server Error: {type(e).__name__}".encode())
            kind, status, headers, payload = result
            if kind == "full":
                return await self._reply(send, status, headers, payload)
            return await self._stream(send, replica, status, headers, payload)

    async def _read_body(self, scope: dict, receive: Any, send: Any) -> bytes | None:
        limit = self.max_body_size
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    await self._reply(send, 400, _TEXT, b"bad Content-Length header")
                    return None
                if n > limit:
                    await self._reply(send, 413, _TEXT, self._too_big(n))
                    return None
        chunks = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reply(send, 413, _TEXT, self._too_big(size))
                return None
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_big(self, n: int) -> bytes:
        return (f"request body of {n} bytes is over the limit of {self.max_body_size} "
                f"bytes (raise it with serve.start(http_options={{'max_body_size': ...}}))"
                ).encode()

    @staticmethod
    async def _reply(send: Any, status: int, headers: list, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, send: Any, replica: Any, status: int, headers: list,
                      sid: str) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        while True:
            try:
                items, done = await replica.actor.stream_next.remote(sid)
            except Exception as e:  # noqa: BLE001
                logger.warning("proxy: stream %s broke: %s", sid, e)
                break
            for item in items:
                if isinstance(item, str):
                    item = item.encode()
                await send({"type": "http.response.body", "body": item, "more_body": True})
            if done:
                break
        await send({"type": "http.response.body", "body": b""})


class _Metrics:
    """Prometheus metrics of the proxy (``GET /-/metrics``), per route and
    deployment: request counts by status code, and latency."""

    def __init__(self) -> None:
        try:
            import prometheus_client as pc
        except ImportError:      # a core dependency; tolerate its absence
            self.pc = None
            return
        self.pc = pc
        self.registry = pc.CollectorRegistry()
        labels = ["application", "deployment", "route", "method", "status_code"]
        self.count = pc.Counter("serve_num_http_requests", "HTTP requests answered",
                                labels, registry=self.registry)
        self.errors = pc.Counter("serve_num_http_error_requests",
                                 "HTTP requests answered with a status >= 400", labels,
                                 registry=self.registry)
        self.latency = pc.Histogram(
            "serve_http_request_latency_ms", "HTTP request latency at the proxy (ms)",
            ["application", "deployment", "route"], registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000))
        self._children: dict[tuple, tuple] = {}

    def observe(self, app: str, dep: str, route: str, method: str, status: int,
                secs: float) -> None:
        if self.pc is None:
            return
        key = (app, dep, route, method, status)
        children = self._children.get(key)
        if children is None:
            lab = (app, dep, route, method, str(status))
            children = self._children[key] = (
                self.count.labels(*lab), self.errors.labels(*lab) if status >= 400 else None,
                self.latency.labels(app, dep, route))
        children[0].inc()
        if children[1] is not None:
            children[1].inc()
        children[2].observe(secs * 1e3)

    def render(self) -> tuple[bytes, str]:
        if self.pc is None:
            return b"", "text/plain"
        return self.pc.generate_latest(self.registry), self.pc.CONTENT_TYPE_LATEST


async def _await(ref: Any) -> Any:
    return await ref


class ProxyActor:
    """The proxy actor: serves HTTP on ``host:port`` (0 picks a free port)."""

    def __init__(self, host: str, port: int, max_body_size: int,
                 request_timeout_s: float | None, root_path: str = "",
                 channel_secret: bytes | None = None,
                 keep_alive_timeout_s: float = 90.0) -> None:
        uvicorn = _import_uvicorn()
        self.app = ProxyApp(max_body_size, request_timeout_s, root_path, channel_secret)
        kwargs: dict[str, Any] = {"host": host, "port": port, "log_level": "warning",
                                  "access_log": False, "lifespan": "off",
                                  "timeout_keep_alive": keep_alive_timeout_s}
        try:
            import httptools  # noqa: F401
            kwargs["http"] = "httptools"
        except ImportError:
            kwargs["http"] = "h11"
        import socket
        try:
            self.sock = socket.create_server((host, port), reuse_port=False, backlog=2048)
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port}: {e}; pass another port with "
                               f"serve.start(http_options={{'port': ...}})") from None
        self.sock.set_inheritable(False)
        config = uvicorn.Config(self.app, **kwargs)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None
        loop = router_loop()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.serve_fut = asyncio.run_coroutine_threadsafe(self._serve(), loop)
        asyncio.run_coroutine_threadsafe(self.app.watch_routes(), loop)
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            if self.serve_fut.done():
                exc = self.serve_fut.exception()
                raise RuntimeError(f"cannot listen on {host}:{port}: "
                                   f"{exc or 'uvicorn exited (is the port in use?)'}")
            time.sleep(0.005)
        if not self.server.started:
            raise RuntimeError(f"the HTTP proxy did not start on {host}:{port} in 30 s")
        self.host, self.port = self.sock.getsockname()[:2]

    async def _serve(self) -> None:
        await self.server.serve(sockets=[self.sock])
        if not self.server.started:
            raise RuntimeError("uvicorn could not bind (is the port in use?)")

    def ready(self) -> dict:
        return {"host": self.host, "port": self.port, "pid": os.getpid(),
                "url": f"http://{self.host}:{self.port}",
                "node_id": flowcore.get_runtime_context().get_node_id(),
                "direct_http": bool(self.app.channel_secret)}

    def has_route(self, route_prefix: str, app_name: str, ingress: str | None = None,
                  replicas_version: int | None = None) -> bool:
        """Whether the proxy routes ``route_prefix`` to ``app_name`` yet and,
        given ``ingress`` and ``replicas_version``, to that ingress deployment
        through a router that knows that version of its replica set (so the
        first requests go to the running replicas under their
        ``max_ongoing_requests`` / ``max_queued_requests`` rather than wait,
        unbounded, for replicas the proxy has not heard of yet)."""
        target = self.app.routes.get(route_prefix)
        if target is None or target[0] != app_name:
            return False
        if ingress is None or replicas_version is None:
            return True
        return target[1] == ingress and get_router(*target).version >= replicas_version

    def routes_to(self, app_name: str) -> bool:
        """Whether any route leads to ``app_name``."""
        return any(a == app_name for a, _ in self.app.routes.values())

    def stats(self) -> dict:
        return {"requests": self.app.requests, "errors": self.app.errors}
