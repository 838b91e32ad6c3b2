"""Configuration objects of flowcore.serve, spelled as in Ray Serve 2.60:
``AutoscalingConfig``, ``HTTPOptions`` and the per-deployment options with
their defaults and validation. Plain data, no IO."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

DEFAULT_MAX_ONGOING_REQUESTS = 5
DEFAULT_MAX_QUEUED_REQUESTS = -1
DEFAULT_HTTP_PORT = 8000
DEFAULT_MAX_BODY_SIZE = 100 * 1024 * 1024

# Ray Serve's actor options for a replica: 1 CPU unless told otherwise
DEFAULT_RAY_ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 1}
_ACTOR_OPTION_KEYS = {"num_cpus", "num_gpus", "resources", "runtime_env", "memory",
                      "accelerator_type", "object_store_memory"}


def _number(owner: str, key: str, value: Any, *, minimum: float = 0.0,
            integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{owner}: {key} must be {kind} >= {minimum:g}, got {value!r}")


@dataclass
class AutoscalingConfig:
    """How a deployment's replica count follows its load (Ray's fields and
    defaults). The autoscaler aims at ``target_ongoing_requests`` ongoing
    requests per replica, averaged over ``look_back_period_s``, and acts only
    after the wish to scale up (down) held for ``upscale_delay_s``
    (``downscale_delay_s``)."""

    min_replicas: int = 1
    initial_replicas: int | None = None
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None
    smoothing_factor: float = 1.0
    upscale_smoothing_factor: float | None = None
    downscale_smoothing_factor: float | None = None
    #: the delay before going from 1 replica to 0 (None: downscale_delay_s)
    downscale_to_zero_delay_s: float | None = None

    def __post_init__(self) -> None:
        o = "AutoscalingConfig"
        _number(o, "min_replicas", self.min_replicas, integer=True)
        _number(o, "max_replicas", self.max_replicas, minimum=1, integer=True)
        _number(o, "initial_replicas", self.initial_replicas, integer=True, allow_none=True)
        _number(o, "target_ongoing_requests", self.target_ongoing_requests, minimum=1e-9)
        for key in ("metrics_interval_s", "look_back_period_s", "upscale_delay_s",
                    "downscale_delay_s"):
            _number(o, key, getattr(self, key))
        for key in ("upscaling_factor", "downscaling_factor", "smoothing_factor",
                    "upscale_smoothing_factor", "downscale_smoothing_factor"):
            _number(o, key, getattr(self, key), minimum=1e-9, allow_none=True)
        _number(o, "downscale_to_zero_delay_s", self.downscale_to_zero_delay_s,
                allow_none=True)
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"AutoscalingConfig: min_replicas ({self.min_replicas}) is "
                             f"above max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"AutoscalingConfig: initial_replicas ({self.initial_replicas}) "
                             f"must lie between min_replicas and max_replicas")

    def get_upscaling_factor(self) -> float:
        """``upscaling_factor``, else ``upscale_smoothing_factor``, else
        ``smoothing_factor`` (as in Ray)."""
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        return (self.downscaling_factor or self.downscale_smoothing_factor
                or self.smoothing_factor)

    @classmethod
    def build(cls, value: "AutoscalingConfig | dict | None") -> "AutoscalingConfig | None":
        if value is None or isinstance(value, AutoscalingConfig):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"autoscaling_config must be a dict or AutoscalingConfig, got "
                            f"{type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"autoscaling_config: unknown key(s) {unknown}; valid keys: "
                             f"{sorted(known)}")
        return cls(**value)

    def dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HTTPOptions:
    """Where the HTTP proxy listens. ``max_body_size`` (bytes) is flowcore's:
    a larger request body is answered with 413."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    root_path: str = ""
    request_timeout_s: float | None = None
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    keep_alive_timeout_s: float = 90.0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise TypeError(f"http_options: host must be a non-empty string, got {self.host!r}")
        _number("http_options", "port", self.port, integer=True)
        if self.port > 65535:
            raise ValueError(f"http_options: port {self.port} is above 65535")
        _number("http_options", "max_body_size", self.max_body_size, integer=True)
        _number("http_options", "keep_alive_timeout_s", self.keep_alive_timeout_s)
        _number("http_options", "request_timeout_s", self.request_timeout_s,
                minimum=1e-9, allow_none=True)

    @classmethod
    def build(cls, value: "HTTPOptions | dict | None") -> "HTTPOptions":
        if value is None:
            return cls()
        if isinstance(value, HTTPOptions):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"http_options must be a dict or HTTPOptions, got "
                            f"{type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"http_options: unknown key(s) {unknown}; valid keys: "
                             f"{sorted(known)}")
        return cls(**value)


@dataclass
class DeploymentConfig:
    """Everything the controller needs to run one deployment's replicas."""

    num_replicas: int = 1
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    max_constructor_retry_count: int = 20
    ray_actor_options: dict[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_RAY_ACTOR_OPTIONS))

    def __post_init__(self) -> None:
        o = "deployment"
        _number(o, "num_replicas", self.num_replicas, integer=True)
        _number(o, "max_ongoing_requests", self.max_ongoing_requests, minimum=1, integer=True)
        if self.max_queued_requests != -1:
            _number(o, "max_queued_requests (or -1 for no limit)", self.max_queued_requests,
                    integer=True)
        for key in ("graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s",
                    "health_check_period_s", "health_check_timeout_s"):
            _number(o, key, getattr(self, key))
        _number(o, "max_constructor_retry_count", self.max_constructor_retry_count, minimum=1,
                integer=True)
        if not isinstance(self.ray_actor_options, dict):
            raise TypeError(f"ray_actor_options must be a dict, got "
                            f"{type(self.ray_actor_options).__name__}")
        unknown = sorted(set(self.ray_actor_options) - _ACTOR_OPTION_KEYS)
        if unknown:
            raise ValueError(f"ray_actor_options: unknown key(s) {unknown}; valid keys: "
                             f"{sorted(_ACTOR_OPTION_KEYS)}")

    def initial_replicas(self) -> int:
        a = self.autoscaling_config
        if a is None:
            return self.num_replicas
        if a.initial_replicas is not None:
            return a.initial_replicas
        return a.min_replicas

    def actor_options(self) -> dict[str, Any]:
        """The flowcore actor options of one replica (unsupported Ray keys
        such as ``memory`` are accepted and dropped)."""
        opts = {k: v for k, v in self.ray_actor_options.items()
                if k in ("num_cpus", "num_gpus", "resources", "runtime_env")}
        opts.setdefault("num_cpus", 1)
        return opts


def auto_autoscaling_config(given: dict | AutoscalingConfig | None) -> AutoscalingConfig:
    """``num_replicas="auto"``: Ray's defaults for it (1..100 replicas, 2
    ongoing requests each) under whatever the user set explicitly."""
    base = {"min_replicas": 1, "max_replicas": 100, "target_ongoing_requests": 2.0}
    if isinstance(given, AutoscalingConfig):
        return given
    base.update(given or {})
    return AutoscalingConfig.build(base)  # type: ignore[return-value]
