"""flowcore: remote functions returning futures, resolved as an explicit
futures DAG by a head scheduler over per-node shared-memory object stores."""
from __future__ import annotations

from typing import Any, Callable, TypeVar, overload

from . import exceptions, state
from ._version import __version__
from .api import (available_resources, cancel, cluster_resources, get, get_runtime_context,
                  init, is_initialized, nodes, put, shutdown, wait)
from .executor import Executor
from .objects.ref import ObjectRef
from .remote_function import RemoteFunction
from .runtime_context import get_gpu_ids
from .scheduler.states import TaskState

F = TypeVar("F", bound=Callable[..., Any])


def _make_remote(target: Any, options: dict[str, Any]) -> Any:
    import inspect
    if inspect.isclass(target):
        raise TypeError(f"@flowcore.remote on class {target.__name__}: actors are not "
                        f"available in flowcore {__version__} yet")
    if not callable(target):
        raise TypeError(f"@flowcore.remote applies to functions, got "
                        f"{type(target).__name__}")
    return RemoteFunction(target, options)


@overload
def remote(__fn: Callable[..., Any]) -> RemoteFunction: ...
@overload
def remote(**options: Any) -> Callable[[Callable[..., Any]], RemoteFunction]: ...


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
    "exceptions",
]
