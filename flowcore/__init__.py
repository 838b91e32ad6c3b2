"""flowcore: remote functions returning futures, resolved as an explicit
futures DAG by a head scheduler over per-node shared-memory object stores.

Public names load on first use, so the head, node and worker processes
(which live inside this package) do not pay for the driver's API at start.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, TypeVar, overload

from . import exceptions
from ._version import __version__

if TYPE_CHECKING:  # what a type checker sees
    from . import state
    from .api import (available_resources, cancel, cluster_resources, explain, get,
                      get_node_ip_address, get_runtime_context, init, is_initialized, nodes,
                      put, shutdown, wait)
    from .actor import (ActorClass, ActorHandle, exit_actor, get_actor, kill, list_named_actors,
                        method)
    from .executor import Executor
    from .scheduling import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy
    from .placement_groups import (PlacementGroup, get_current_placement_group,
                                   get_placement_group, placement_group,
                                   placement_group_table, remove_placement_group)
    from .objects.generator import DynamicObjectRefGenerator, ObjectRefGenerator
    from .objects.ref import ObjectRef
    from .remote_function import RemoteFunction
    from .runtime_context import get_gpu_ids
    from .scheduler.states import TaskState
    from .graph.visualize import visualize
    from .progress_bar import progress
    from .trace import timeline

_LAZY = {
    "init": "session", "shutdown": "session", "is_initialized": "session", "get": "api",
    "put": "api",
    "wait": "api", "cancel": "api", "nodes": "api", "cluster_resources": "api",
    "available_resources": "api", "get_runtime_context": "api", "explain": "api",
    "Executor": "executor", "ObjectRef": "objects.ref", "RemoteFunction": "remote_function",
    "get_gpu_ids": "runtime_context", "TaskState": "scheduler.states",
    "method": "actor", "kill": "actor", "exit_actor": "actor", "get_actor": "actor",
    "ActorHandle": "actor",
    "ActorClass": "actor", "NodeAffinitySchedulingStrategy": "scheduling",
    "visualize": "graph.visualize", "timeline": "trace", "progress": "progress_bar",
    "PlacementGroupSchedulingStrategy": "scheduling", "PlacementGroup": "placement_groups",
    "placement_group": "placement_groups", "remove_placement_group": "placement_groups",
    "get_placement_group": "placement_groups", "get_current_placement_group": "placement_groups",
    "placement_group_table": "placement_groups", "list_named_actors": "actor",
    "get_node_ip_address": "api", "ActorPool": "util.actor_pool",
    "ObjectRefGenerator": "objects.generator", "DynamicObjectRefGenerator": "objects.generator",
}
_SUBMODULES = {"state", "testing", "api", "cluster", "scheduling", "data", "util", "context", "session"}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'flowcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


def _make_remote(target: Any, options: dict[str, Any]) -> Any:
    import inspect

    from .remote_function import RemoteFunction
    if inspect.isclass(target):
        from .actor import ActorClass
        return ActorClass(target, options)
    if not callable(target):
        raise TypeError(f"@flowcore.remote applies to functions and classes, got "
                        f"{type(target).__name__}")
    return RemoteFunction(target, options)


R = TypeVar("R")
C = TypeVar("C")


@overload
def remote(__cls: type[C]) -> "ActorClass[C]": ...  # type: ignore[overload-overlap]
@overload
def remote(__fn: Callable[..., R]) -> "RemoteFunction[R]": ...
@overload
def remote(**options: Any) -> Callable[[Any], Any]: ...


def remote(*args: Any, **options: Any) -> Any:
    """Turn a function into a remote function: ``f.remote(...)`` runs it as
    a task and returns an ``ObjectRef`` at once.

    Use bare (``@remote``) or with options (``@remote(num_cpus=2, ...)``).
    """
    if args:
        if len(args) != 1 or options:
            raise TypeError("use @flowcore.remote or @flowcore.remote(option=value, ...)")
        return _make_remote(args[0], {})
    return lambda target: _make_remote(target, options)


__all__ = [
    "__version__", "init", "shutdown", "is_initialized", "remote", "get", "put", "wait",
    "cancel", "nodes", "cluster_resources", "available_resources", "get_gpu_ids",
    "get_runtime_context", "ObjectRef", "RemoteFunction", "Executor", "TaskState",
    "exceptions", "state", "method", "kill", "exit_actor", "get_actor", "ActorHandle", "ActorClass",
    "NodeAffinitySchedulingStrategy", "PlacementGroupSchedulingStrategy", "PlacementGroup",
    "placement_group", "remove_placement_group", "get_placement_group",
    "get_current_placement_group", "placement_group_table", "list_named_actors",
    "get_node_ip_address", "ObjectRefGenerator", "DynamicObjectRefGenerator",
    "visualize", "timeline", "progress",
]
