"""``@flowcore.remote`` on functions: ``RemoteFunction`` and task specs."""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from typing import Any, Callable, Generic, TypeVar

from . import options as opts
from .objects.ref import ObjectRef, current_client

R = TypeVar("R")


class ArgRef:
    """Placeholder for a top-level ObjectRef argument, replaced by its value
    in the worker before the function runs."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __reduce__(self) -> Any:
        return (ArgRef, (self.i,))


_worker_paths: list[str] | None = None


def set_worker_paths(paths: list[str] | None) -> None:
    """Record the import path worker processes were given (None: unknown,
    e.g. a cluster started elsewhere, where only installed packages are
    assumed importable)."""
    global _worker_paths
    _worker_paths = None if paths is None else [os.path.abspath(p or os.getcwd()) for p in paths]


def _importable_roots() -> list[str]:
    if _worker_paths is not None:
        return _worker_paths
    import sysconfig
    return [os.path.abspath(p) for p in {sysconfig.get_paths()["purelib"],
                                         sysconfig.get_paths()["platlib"],
                                         sysconfig.get_paths()["stdlib"]}]


def pickle_callable(fn: Any) -> bytes:
    """cloudpickle ``fn``; a function from a module that worker processes
    could not import (not under the sys.path they were given) is pickled by
    value, so it still runs there."""
    import cloudpickle
    mod_name = getattr(fn, "__module__", None) or "__main__"
    by_value = None
    if mod_name != "__main__" and mod_name in sys.modules:
        mod = sys.modules[mod_name]
        path = getattr(mod, "__file__", None)
        if path:
            path = os.path.abspath(path)
            roots = _importable_roots()
            if not any(path.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                top = sys.modules.get(mod_name.split(".")[0], mod)
                by_value = top
    try:
        if by_value is not None:
            cloudpickle.register_pickle_by_value(by_value)
            try:
                return cloudpickle.dumps(fn, protocol=5)
            finally:
                cloudpickle.unregister_pickle_by_value(by_value)
        return cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:  # name the function and the path to what failed
        from .objects.serialization import explain_callable_failure
        raise explain_callable_failure(fn, exc) from exc


def encode_args(client: Any, args: tuple, kwargs: dict) -> dict:
    """Build the argument part of a task spec: top-level refs become
    dependencies, everything else is serialized (large payloads go to the
    object store as an extra dependency)."""
    from .client.core import INLINE_MAX
    from .objects.serialization import serialize
    deps: list[bytes] = []
    keep: list[ObjectRef] = []

    def sub(v: Any) -> Any:
        if isinstance(v, ObjectRef):
            deps.append(v._id)
            keep.append(v)
            return ArgRef(len(deps) - 1)
        return v

    a = tuple(sub(v) for v in args)
    k = {key: sub(v) for key, v in kwargs.items()}
    try:
        s = serialize((a, k))
    except TypeError as e:
        raise TypeError(f"cannot serialize {_culprit(a, k)}: {e}") from None
    spec: dict[str, Any] = {"deps": deps, "nested": list(s.contained_refs)}
    if s.total_size > INLINE_MAX and client.has_store():
        ref = client.put_serialized(s)
        keep.append(ref)
        spec["deps"] = deps + [ref._id]
        spec["args"] = None
        spec["args_dep"] = len(deps)
    else:
        spec["args"] = s.to_bytes()
    spec["_keep"] = keep
    return spec


def _culprit(args: tuple, kwargs: dict) -> str:
    """Name the argument that does not serialize (for the error message)."""
    from .objects.serialization import serialize
    for i, v in enumerate(args):
        try:
            serialize(v)
        except TypeError:
            return f"argument {i} ({type(v).__name__})"
    for key, v in kwargs.items():
        try:
            serialize(v)
        except TypeError:
            return f"keyword argument {key!r} ({type(v).__name__})"
    return "the arguments"


class RemoteFunction(Generic[R]):
    """A function turned into a task factory by ``@flowcore.remote``."""

    def __init__(self, fn: Callable[..., R], options: dict[str, Any]):
        self._function = fn
        self._options = opts.validate(opts.TASK, dict(options), f"@remote({fn.__qualname__})")
        self._name = getattr(fn, "__qualname__", repr(fn))
        self._blob: bytes | None = None
        self._fid: bytes | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self._name} cannot be called directly: use "
                        f"{self._name}.remote(...) to run it as a task, and flowcore.get() "
                        f"for its result")

    def _identity(self) -> tuple[bytes, bytes]:
        if self._fid is None:
            self._blob = pickle_callable(self._function)
            self._fid = hashlib.blake2b(self._blob, digest_size=16).digest()
        return self._fid, self._blob  # type: ignore[return-value]

    def options(self, **overrides: Any) -> "RemoteFunction[R]":
        """A copy with some options changed for the calls made through it."""
        opts.validate(opts.TASK, overrides, f"{self._name}.options()")
        new = RemoteFunction.__new__(RemoteFunction)
        new.__dict__.update(self.__dict__)
        new._options = {**self._options, **overrides}
        return new

    def remote(self, *args: Any, **kwargs: Any) -> "ObjectRef[R]":
        """Submit a task; returns its ObjectRef at once (a list of refs when
        ``num_returns`` > 1)."""
        client = current_client()
        if client is None:
            from .api import _auto_init
            client = _auto_init()
        fid, blob = self._identity()
        client.ensure_function(fid, lambda: blob, self._name)
        o = opts.resolved(opts.TASK, self._options)
        spec = encode_args(client, args, kwargs)
        keep = spec.pop("_keep")
        spec.update({
            "tid": client.ids.task_id(), "fid": fid, "name": o.get("name") or self._name,
            "nret": o["num_returns"], "res": opts.resource_request(o),
            "retries": 10**9 if o["max_retries"] == -1 else o["max_retries"],
            "retry_exc": _encode_retry(o["retry_exceptions"]),
        })
        from .scheduling import for_submit
        strategy = for_submit(client, o.get("scheduling_strategy"), spec["res"],
                              f"task {spec['name']}")
        if strategy is not None:
            spec["strategy"] = strategy
        if client.runtime_env is not None or o["runtime_env"] is not None:
            from .runtime_env import for_task
            spec["renv"] = for_task(client, o["runtime_env"])
        refs = client.submit(spec)
        del keep  # dependencies are now held by the task at the head
        return refs[0] if o["num_returns"] == 1 else refs  # type: ignore[return-value]


def _encode_retry(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    import cloudpickle
    return cloudpickle.dumps(list(v))
