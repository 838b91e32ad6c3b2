"""``@serve.deployment``, ``Deployment`` (``.options``, ``.bind``),
``Application`` and ``@serve.ingress``: what a user declares; no IO."""
from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Callable

from .config import (AutoscalingConfig, DeploymentConfig, DEFAULT_MAX_ONGOING_REQUESTS,
                     auto_autoscaling_config)

logger = logging.getLogger("flowcore.serve")

_DEPLOYMENT_OPTIONS = (
    "name", "num_replicas", "max_ongoing_requests", "max_queued_requests",
    "autoscaling_config", "ray_actor_options", "user_config", "health_check_period_s",
    "health_check_timeout_s", "graceful_shutdown_timeout_s",
    "graceful_shutdown_wait_loop_s", "version", "route_prefix", "max_constructor_retry_count",
    "logging_config",
)


class Application:
    """A deployment bound to its constructor arguments (``Deployment.bind``).
    Applications bound into another's arguments reach its constructor as
    ``DeploymentHandle``s. Run one with ``serve.run``."""

    def __init__(self, deployment: "Deployment", args: tuple, kwargs: dict) -> None:
        self._deployment = deployment
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> "Deployment":
        return self._deployment

    def __repr__(self) -> str:
        return f"Application({self._deployment.name})"


class Deployment:
    """A class or function declared with ``@serve.deployment``."""

    def __init__(self, func_or_class: Callable, name: str, config: DeploymentConfig,
                 explicit: set[str], version: str | None = None) -> None:
        self.func_or_class = func_or_class
        self._name = name
        self._config = config
        self._explicit = set(explicit)
        self._version = version

    # --- Ray's read-only attributes
    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str | None:
        return self._version

    @property
    def num_replicas(self) -> int:
        return self._config.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def ray_actor_options(self) -> dict:
        return dict(self._config.ray_actor_options)

    @property
    def autoscaling_config(self) -> AutoscalingConfig | None:
        return self._config.autoscaling_config

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"deployment {self._name!r} cannot be called directly: use "
                        f"{self._name}.bind(...) and serve.run(...), then call its handle")

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """An ``Application``: this deployment with its constructor's
        arguments (other applications among them become handles)."""
        if not inspect.isclass(self.func_or_class) and (args or kwargs):
            raise TypeError(f"function deployment {self._name!r} takes no constructor "
                            f"arguments; call .bind() without arguments")
        return Application(self, args, kwargs)

    def options(self, **kwargs: Any) -> "Deployment":
        """A copy with some options changed (same keys as the decorator)."""
        return _make(self.func_or_class, kwargs, base=self)

    def __repr__(self) -> str:
        return f"Deployment(name={self._name})"


def _batch_sizes(target: Any) -> list[tuple[str, int]]:
    out = []
    if inspect.isclass(target):
        for attr, value in inspect.getmembers(target):
            size = getattr(value, "_serve_max_batch_size", None)
            if size is not None:
                out.append((attr, size))
    else:
        size = getattr(target, "_serve_max_batch_size", None)
        if size is not None:
            out.append((getattr(target, "__name__", "?"), size))
    return out


def _make(target: Callable, opts: dict[str, Any], base: Deployment | None = None) -> Deployment:
    unknown = sorted(set(opts) - set(_DEPLOYMENT_OPTIONS))
    if unknown:
        raise ValueError(f"@serve.deployment: unknown option(s) {unknown}; valid options: "
                         f"{sorted(_DEPLOYMENT_OPTIONS)}")
    if "route_prefix" in opts:
        raise ValueError("route_prefix is set by serve.run(app, route_prefix=...), not on "
                         "the deployment (as in Ray Serve 2.60)")
    if base is not None:
        cfg = base.config
        current = {"num_replicas": cfg.num_replicas,
                   "max_ongoing_requests": cfg.max_ongoing_requests,
                   "max_queued_requests": cfg.max_queued_requests,
                   "user_config": cfg.user_config,
                   "autoscaling_config": cfg.autoscaling_config,
                   "graceful_shutdown_wait_loop_s": cfg.graceful_shutdown_wait_loop_s,
                   "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
                   "health_check_period_s": cfg.health_check_period_s,
                   "health_check_timeout_s": cfg.health_check_timeout_s,
                   "max_constructor_retry_count": cfg.max_constructor_retry_count,
                   "ray_actor_options": dict(cfg.ray_actor_options)}
        name, version, explicit = base.name, base.version, set(base._explicit)
        if "num_replicas" in opts and "autoscaling_config" not in opts:
            current["autoscaling_config"] = None
    else:
        current = {}
        name = getattr(target, "__name__", None) or type(target).__name__
        version, explicit = None, set()
    explicit |= set(opts)
    name = opts.pop("name", name)
    version = opts.pop("version", version)
    if not isinstance(name, str) or not name or "#" in name or "/" in name:
        raise ValueError(f"deployment name must be a non-empty string without '#' or '/', "
                         f"got {name!r}")
    current.update(opts)
    # accepted for Ray compatibility: replica output goes to the worker logs
    current.pop("logging_config", None)
    num = current.get("num_replicas", 1)
    auto = current.get("autoscaling_config")
    if num == "auto":
        current["autoscaling_config"] = auto_autoscaling_config(auto)
        current["num_replicas"] = 1
    elif num is None:
        current["num_replicas"] = 1
    elif not isinstance(num, int) or isinstance(num, bool):
        raise TypeError(f"num_replicas must be an int >= 0 or \"auto\", got {num!r}")
    elif auto is not None and "num_replicas" in opts:
        raise ValueError("set either num_replicas or autoscaling_config, not both "
                         "(or num_replicas=\"auto\" with an autoscaling_config)")
    if current.get("autoscaling_config") is not None:
        current["autoscaling_config"] = AutoscalingConfig.build(current["autoscaling_config"])
    rao = current.get("ray_actor_options")
    if rao is None:
        current.pop("ray_actor_options", None)
    elif isinstance(rao, dict) and "num_cpus" not in rao:
        current["ray_actor_options"] = {**rao, "num_cpus": 1}
    # a batch is never silently capped by the default max_ongoing_requests
    sizes = _batch_sizes(target)
    if sizes:
        biggest = max(s for _, s in sizes)
        limit = current.get("max_ongoing_requests", DEFAULT_MAX_ONGOING_REQUESTS)
        if "max_ongoing_requests" not in explicit and biggest > limit:
            current["max_ongoing_requests"] = biggest
            logger.info("deployment %s: max_ongoing_requests raised from the default %d to "
                        "%d so that batches can fill to max_batch_size", name, limit, biggest)
        elif biggest > limit:
            method = [m for m, s in sizes if s == biggest][0]
            warnings.warn(f"deployment {name!r}: max_ongoing_requests={limit} is below "
                          f"max_batch_size={biggest} of {method}(); a replica never holds "
                          f"more than {limit} requests, so its batches stay at most {limit} "
                          f"long. Raise max_ongoing_requests to at least {biggest}.",
                          UserWarning, stacklevel=3)
    cfg = DeploymentConfig(**current)
    return Deployment(target, name, cfg, explicit, version)


def deployment(_func_or_class: Callable | None = None, **options: Any) -> Any:
    """``@serve.deployment`` or ``@serve.deployment(num_replicas=2, ...)`` on a
    class or a function: returns a ``Deployment``."""
    if _func_or_class is not None:
        if not callable(_func_or_class):
            raise TypeError(f"@serve.deployment applies to a class or a function, got "
                            f"{type(_func_or_class).__name__}")
        return _make(_func_or_class, dict(options))

    def wrap(target: Callable) -> Deployment:
        if not callable(target):
            raise TypeError(f"@serve.deployment applies to a class or a function, got "
                            f"{type(target).__name__}")
        return _make(target, dict(options))
    return wrap


def ingress(app: Any) -> Callable[[type], type]:
    """``@serve.ingress(fastapi_app)``: the class's replicas serve the app's
    routes; methods decorated with the app's route decorators are called on
    the replica's instance."""
    if not callable(app):
        raise TypeError(f"@serve.ingress expects an ASGI app such as a FastAPI() instance, "
                        f"got {type(app).__name__}")

    def wrap(cls: type) -> type:
        if not inspect.isclass(cls):
            raise TypeError("@serve.ingress applies to a class (put it under "
                            "@serve.deployment)")
        cls._serve_asgi_app = ASGIAppHolder(app)  # type: ignore[attr-defined]
        return cls
    return wrap


class ASGIAppHolder:
    """Carries an ASGI app to the replicas. Starlette's ``app.state`` does
    not survive pickling, so it travels as a plain dict."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __reduce__(self) -> Any:
        import cloudpickle
        state = getattr(self.app, "state", None)
        values = dict(getattr(state, "_state", {}) or {}) if state is not None else None
        if values is not None:
            self.app.state = None
        try:
            blob = cloudpickle.dumps(self.app)
        finally:
            if values is not None:
                self.app.state = state
        return (_load_app, (blob, values))


def _load_app(blob: bytes, values: dict | None) -> ASGIAppHolder:
    import pickle
    app = pickle.loads(blob)
    if values is not None:
        from starlette.datastructures import State
        app.state = State(values)
    return ASGIAppHolder(app)


def collect(app: Application) -> list[tuple[Application, bool]]:
    """Every application reachable from ``app`` through bound arguments,
    dependencies first; the flag marks the ingress (``app`` itself)."""
    if not isinstance(app, Application):
        raise TypeError(f"serve.run expects an application made by Deployment.bind(), got "
                        f"{type(app).__name__}" + (
                            f"; call {app.name}.bind() first" if isinstance(app, Deployment)
                            else ""))
    seen: dict[int, Application] = {}
    order: list[Application] = []

    def visit(node: Any) -> None:
        if isinstance(node, Application):
            if id(node) in seen:
                return
            seen[id(node)] = node
            for a in list(node._args) + list(node._kwargs.values()):
                visit(a)
            order.append(node)
        elif isinstance(node, Deployment):
            raise TypeError(f"deployment {node.name!r} is passed unbound; pass "
                            f"{node.name}.bind(...) instead")
        elif isinstance(node, (list, tuple)):
            for a in node:
                visit(a)
        elif isinstance(node, dict):
            for a in node.values():
                visit(a)

    visit(app)
    names: dict[str, Application] = {}
    for a in order:
        other = names.get(a.deployment.name)
        if other is not None and other is not a:
            raise ValueError(f"two deployments in one application are named "
                             f"{a.deployment.name!r}; give one another name with "
                             f".options(name=...)")
        names[a.deployment.name] = a
    return [(a, a is app) for a in order]
