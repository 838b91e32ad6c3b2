"""Trial resources: a dict such as ``{"cpu": 2, "gpu": 1}`` or a
``PlacementGroupFactory`` of bundles, turned into what the trial's worker
actor asks flowcore for."""
from __future__ import annotations

from typing import Any

__all__ = ["PlacementGroupFactory", "normalize", "actor_options"]


class PlacementGroupFactory:
    """Bundles reserved together for one trial; the trial runs in the first
    bundle and may start tasks in the others."""

    def __init__(self, bundles: list[dict[str, float]], strategy: str = "PACK",
                 *args: Any, **kwargs: Any):
        if not isinstance(bundles, list) or not bundles or not all(
                isinstance(b, dict) for b in bundles):
            raise ValueError("PlacementGroupFactory(bundles=...) takes a non-empty list of "
                             "resource dicts such as [{'CPU': 1}, {'CPU': 2}]")
        self.bundles = [_upper(b, "PlacementGroupFactory") for b in bundles]
        self.strategy = strategy
        self._args, self._kwargs = args, kwargs

    @property
    def head_bundle_is_empty(self) -> bool:
        return not any(self.bundles[0].values())

    @property
    def required_resources(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PlacementGroupFactory) and other.bundles == self.bundles
                and other.strategy == self.strategy)

    def __hash__(self) -> int:
        return hash((repr(self.bundles), self.strategy))

    def __repr__(self) -> str:
        return f"PlacementGroupFactory({self.bundles!r}, strategy={self.strategy!r})"


def _upper(res: dict, where: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in res.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or v < 0:
            raise ValueError(f"{where}: resources map names to numbers >= 0, got {k!r}: {v!r}")
        key = k.upper() if k.lower() in ("cpu", "gpu") else k
        if key == "memory":
            continue
        out[key] = out.get(key, 0.0) + float(v)
    return out


def normalize(resources: Any, where: str = "with_resources") -> dict[str, float] | \
        PlacementGroupFactory:
    """A resource dict with CPU/GPU spelled upper case, or the factory."""
    if resources is None:
        return {"CPU": 1.0}
    if isinstance(resources, PlacementGroupFactory):
        return resources
    if isinstance(resources, dict):
        return _upper(resources, where)
    raise TypeError(f"{where}: resources must be a dict like {{'cpu': 1, 'gpu': 0}} or a "
                    f"tune.PlacementGroupFactory, got {type(resources).__name__}")


def key(request: dict | PlacementGroupFactory) -> Any:
    """A hashable identity: workers are reused only for the same request."""
    if isinstance(request, PlacementGroupFactory):
        return ("pg", repr(request.bundles), request.strategy)
    return tuple(sorted(request.items()))


def head(request: dict | PlacementGroupFactory) -> dict[str, float]:
    return dict(request.bundles[0]) if isinstance(request, PlacementGroupFactory) \
        else dict(request)


def total(request: dict | PlacementGroupFactory) -> dict[str, float]:
    return request.required_resources if isinstance(request, PlacementGroupFactory) \
        else dict(request)


def actor_options(res: dict[str, float]) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.get("CPU", 0.0)}
    if res.get("GPU"):
        opts["num_gpus"] = res["GPU"]
    custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU") and v}
    if custom:
        opts["resources"] = custom
    return opts
