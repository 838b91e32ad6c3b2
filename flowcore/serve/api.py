"""The serve API of a driver (or any flowcore process): ``start``, ``run``,
``status``, ``delete``, ``shutdown``, ``get_app_handle``,
``get_deployment_handle``; it talks to the controller actor only."""
from __future__ import annotations

import inspect
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import flowcore

from . import router as _router
from .config import HTTPOptions
from .deployment import Application, collect
from .exceptions import RayServeException
from .handle import DeploymentHandle

_DEPLOY_TIMEOUT_S = 300.0


def _ensure_flowcore() -> None:
    if flowcore.is_initialized():
        return
    if flowcore.get_runtime_context().worker_mode == "worker":
        return
    flowcore.init()


def _controller_or_none() -> Any:
    try:
        return _router.get_controller()
    except RayServeException:
        return None


def start(proxy_location: Any = None, http_options: dict | HTTPOptions | None = None,
          grpc_options: Any = None, logging_config: Any = None, **_ignored: Any) -> None:
    """Start serve on the cluster (the controller and the HTTP proxy on
    ``http_options`` {"host", "port", "root_path", "request_timeout_s",
    "max_body_size"}); does nothing when serve already runs. Starts flowcore
    first if needed. ``grpc_options`` and ``logging_config`` are accepted for
    Ray compatibility; no gRPC proxy runs."""
    if isinstance(proxy_location, (dict, HTTPOptions)) and http_options is None:
        raise TypeError("serve.start(): the first positional argument is proxy_location (as "
                        "in Ray); pass the HTTP options as serve.start(http_options=...)")
    opts = HTTPOptions.build(http_options)
    if proxy_location not in ("Disabled", "NoServer"):
        from .proxy import _import_uvicorn
        _import_uvicorn()     # ImportError naming the extra, here rather than in the proxy
    _ensure_flowcore()
    ctrl = _controller_or_none()
    if ctrl is None:
        from .controller import ServeController, create_proxy
        secret = os.urandom(32)
        ctrl = flowcore.remote(ServeController).options(
            name=_router.CONTROLLER_NAME, namespace=_router.SERVE_NAMESPACE,
            lifetime="detached", num_cpus=0, get_if_exists=True,
        ).remote(opts.__dict__, secret)
        _router._controller = ctrl
        if proxy_location not in ("Disabled", "NoServer"):
            # its process starts beside the controller's; the controller adopts it
            try:
                create_proxy(opts, opts.port, secret)
            except ValueError:      # one already runs (a racing serve.start)
                pass
    if proxy_location in ("Disabled", "NoServer"):
        flowcore.get(ctrl.ping.remote())
        return
    flowcore.get(ctrl.start_http.remote())


def _handles_for(node: Any, app_name: str) -> Any:
    if isinstance(node, Application):
        return DeploymentHandle(node.deployment.name, app_name)
    if isinstance(node, list):
        return [_handles_for(x, app_name) for x in node]
    if isinstance(node, tuple):
        return tuple(_handles_for(x, app_name) for x in node)
    if isinstance(node, dict):
        return {k: _handles_for(v, app_name) for k, v in node.items()}
    return node


def _methods(target: Any) -> list[str] | None:
    if not inspect.isclass(target):
        return ["__call__"]
    return sorted(n for n, v in inspect.getmembers(target)
                  if callable(v) and (not n.startswith("_") or n == "__call__")
                  and not inspect.isclass(v))


def run(target: Application, blocking: bool = False, name: str = "default",
        route_prefix: str | None = "/", logging_config: Any = None,
        _local_testing_mode: bool = False, external_scaler_enabled: bool = False,
        controller_options: Any = None) -> DeploymentHandle:
    """Deploy the application ``target`` under ``name`` (replacing a running
    one of that name by a rolling update) and wait until it is RUNNING;
    returns the ingress deployment's handle. ``route_prefix=None`` serves it
    only through handles."""
    nodes = collect(target)
    if not isinstance(name, str) or not name:
        raise ValueError(f"serve.run: name must be a non-empty string, got {name!r}")
    if route_prefix is not None:
        if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
            raise ValueError(f"serve.run: route_prefix must start with '/', got "
                             f"{route_prefix!r}")
        if route_prefix != "/" and route_prefix.endswith("/"):
            raise ValueError(f"serve.run: route_prefix must not end with '/', got "
                             f"{route_prefix!r}")
    start_http = route_prefix is not None
    ctrl = _controller_or_none()
    if ctrl is None:
        start()
        ctrl = _router.get_controller()
    elif start_http:
        flowcore.get(ctrl.start_http.remote())
    version = uuid.uuid4().hex[:12]
    specs = []
    for app, is_ingress in nodes:
        d = app.deployment
        specs.append({"name": d.name, "target": d.func_or_class,
                      "args": _handles_for(app._args, name),
                      "kwargs": _handles_for(app._kwargs, name),
                      "config": d.config, "version": d.version or version,
                      "ingress": is_ingress, "methods": _methods(d.func_or_class)})
    flowcore.get(ctrl.deploy_application.remote(name, route_prefix, specs))
    st = flowcore.get(ctrl.wait_for_app.remote(name, _DEPLOY_TIMEOUT_S))
    if st["status"] == "DEPLOY_FAILED":
        raise RayServeException(f"application {name!r} failed to deploy: {st['message']}")
    if st["status"] != "RUNNING":
        raise RayServeException(f"application {name!r} is still {st['status']} after "
                                f"{_DEPLOY_TIMEOUT_S:.0f} s: {st['message']}")
    if route_prefix is not None:
        _wait_for_route(route_prefix, name, st.get("ingress"),
                        st.get("ingress_replicas_version"))
    handle = DeploymentHandle([n for n, i in nodes if i][0].deployment.name, name)
    if blocking:
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return handle


def _wait_for_route(route_prefix: str | None, app_name: str, ingress: str | None = None,
                    replicas_version: int | None = None, timeout_s: float = 30.0) -> None:
    """Return once the HTTP proxy routes ``route_prefix`` to the app's
    ``ingress`` deployment and knows its replicas of ``replicas_version``,
    so that a request sent right after ``serve.run`` is neither answered
    404 nor queued (past ``max_queued_requests``) for replicas the proxy
    has not heard of (with ``route_prefix=None``: once no route leads to
    the app any more)."""
    from .controller import PROXY_NAME
    try:
        proxy = flowcore.get_actor(PROXY_NAME, namespace=_router.SERVE_NAMESPACE)
    except ValueError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if route_prefix is None:
            if not flowcore.get(proxy.routes_to.remote(app_name)):
                return
        elif flowcore.get(proxy.has_route.remote(route_prefix, app_name, ingress,
                                                      replicas_version)):
            return
        time.sleep(0.005)


def get_app_handle(name: str) -> DeploymentHandle:
    """The handle of application ``name``'s ingress deployment."""
    ctrl = _router.get_controller()
    st = flowcore.get(ctrl.get_status.remote())["applications"].get(name)
    if st is None:
        raise RayServeException(f"no application named {name!r} is running; running: "
                                f"{sorted(flowcore.get(ctrl.get_status.remote())['applications'])}")
    return DeploymentHandle(st["ingress"], name)


def get_deployment_handle(deployment_name: str, app_name: str | None = None,
                          _check_exists: bool = True,
                          _record_telemetry: bool = True) -> DeploymentHandle:
    """A handle to one deployment of an application (default: the replica's
    own application inside a replica, else ``"default"``)."""
    if app_name is None:
        from .replica import _context
        app_name = _context.app_name if _context is not None else "default"
    if not _check_exists:
        return DeploymentHandle(deployment_name, app_name)
    ctrl = _router.get_controller()
    st = flowcore.get(ctrl.get_status.remote())["applications"].get(app_name)
    if st is None or deployment_name not in st["deployments"]:
        raise RayServeException(f"no deployment {deployment_name!r} in application "
                                f"{app_name!r}")
    return DeploymentHandle(deployment_name, app_name)


def delete(name: str, _blocking: bool = True) -> None:
    """Delete application ``name`` (nothing happens when there is none): its
    route goes at once (new HTTP requests get 404, new handle calls an
    error), requests in flight finish (up to each deployment's
    ``graceful_shutdown_timeout_s``), then its replicas stop. Blocks until
    then."""
    ctrl = _router.get_controller()
    ref = ctrl.delete_application.remote(name)
    if _blocking:
        flowcore.get(ref)
        _wait_for_route(None, name)


@dataclass
class DeploymentStatusOverview:
    status: str
    replica_states: dict[str, int]
    message: str = ""


@dataclass
class ApplicationStatusOverview:
    status: str
    message: str
    last_deployed_time_s: float
    deployments: dict[str, DeploymentStatusOverview]
    route_prefix: str | None = None


@dataclass
class ServeStatus:
    proxies: dict[str, str] = field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
    target_capacity: float | None = None
    http_address: str | None = None


def status() -> ServeStatus:
    """Applications, their deployments and replica states, the proxy."""
    ctrl = _controller_or_none()
    if ctrl is None:
        return ServeStatus()
    raw = flowcore.get(ctrl.get_status.remote())
    apps = {}
    for n, a in raw["applications"].items():
        deps = {d: DeploymentStatusOverview(v["status"], v["replica_states"], v["message"])
                for d, v in a["deployments"].items()}
        apps[n] = ApplicationStatusOverview(a["status"], a["message"],
                                            a["last_deployed_time_s"], deps,
                                            a.get("route_prefix"))
    proxy = raw.get("proxy")
    return ServeStatus(proxies={proxy.get("node_id") or "head": "HEALTHY"} if proxy else {},
                       applications=apps,
                       http_address=proxy["url"] if proxy else None)


def http_address() -> str | None:
    """flowcore's own: the proxy's ``http://host:port`` (useful with port 0)."""
    ctrl = _controller_or_none()
    if ctrl is None:
        return None
    info = flowcore.get(ctrl.get_http_info.remote())
    return info["url"] if info else None


def shutdown() -> None:
    """Stop serve: every replica, the proxy (its port is free again) and the
    controller."""
    ctrl = _controller_or_none()
    if ctrl is None:
        _router.reset_process_state()
        return
    try:
        flowcore.get(ctrl.shutdown.remote(), timeout=60)
    except Exception:  # noqa: BLE001 - kill it anyway
        pass
    _router.reset_process_state()
    try:
        flowcore.kill(ctrl)
    except Exception:  # noqa: BLE001
        pass
    # the names are free (and the port closed) once the actors are gone
    from .controller import PROXY_NAME
    deadline = time.monotonic() + 30
    for name in (_router.CONTROLLER_NAME, PROXY_NAME):
        while time.monotonic() < deadline:
            try:
                flowcore.get_actor(name, namespace=_router.SERVE_NAMESPACE)
            except ValueError:
                break
            time.sleep(0.01)


async def shutdown_async() -> None:
    """``serve.shutdown()`` for async code (runs it in a thread)."""
    import asyncio
    await asyncio.get_running_loop().run_in_executor(None, shutdown)
