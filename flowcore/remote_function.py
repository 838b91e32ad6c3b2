"""``@flowcore.remote`` on functions: ``RemoteFunction`` and task specs."""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from . import options as opts
from .context import worker_paths
from .session import client_or_init
from .objects.generator import ObjectRefGenerator
from .objects.ref import ObjectRef
from .objects.serialization import NO_ARGUMENTS_BYTES, explain_callable_failure, serialize
from .protocol import messages
from .runtime_env import for_task
from .scheduling import for_submit

if TYPE_CHECKING:
    from .client.core import CoreClient

R = TypeVar("R")


class ArgRef:
    """Placeholder for a top-level ObjectRef argument, replaced by its value
    in the worker before the function runs."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i

    def __reduce__(self) -> Any:
        return (ArgRef, (self.i,))


def _importable_roots() -> list[str]:
    paths = worker_paths()
    if paths is not None:
        return paths
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
    # flowcore's own modules are importable wherever flowcore runs, also from
    # an editable install outside site-packages (inside a worker, where the
    # driver's sys.path is not known): never ship the package by value
    if mod_name != "__main__" and mod_name in sys.modules and mod_name.split(".")[0] != "flowcore":
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
        raise explain_callable_failure(fn, exc) from exc


# Ray's limits on a pickled function or class: a warning past the first, an
# error past the second (the blob travels in one message to the head).
FUNCTION_SIZE_WARN = 10 << 20
FUNCTION_SIZE_LIMIT = 100 << 20


def pickle_checked(target: Any, kind: str, name: str) -> bytes:
    """``pickle_callable`` with Ray's size checks: a function or class whose
    pickle is too large (it captured a big object) gets an error naming it
    and its size, and how to fix it."""
    blob = pickle_callable(target)
    mib = len(blob) / (1 << 20)
    if len(blob) > FUNCTION_SIZE_LIMIT:
        raise ValueError(
            f"the {kind} {name} is too large to ship: it pickles to {mib:.1f} MiB (limit "
            f"{FUNCTION_SIZE_LIMIT / (1 << 20):.0f} MiB). Check that its definition does not "
            f"capture a large array or other object from its scope; put large objects in the "
            f"object store with flowcore.put() and pass the ref instead")
    if len(blob) > FUNCTION_SIZE_WARN:
        import warnings
        warnings.warn(f"the {kind} {name} pickles to {mib:.1f} MiB; check that it does not "
                      f"capture a large object from its scope (use flowcore.put())",
                      stacklevel=4)
    return blob


def signature_of(target: Any) -> "inspect.Signature | None":
    """The signature calls are checked against at submit time (None when
    Python cannot tell, e.g. some builtins)."""
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


#: id(signature) -> (signature, whether a call without arguments binds to it)
_NO_ARGUMENTS: dict[int, tuple["inspect.Signature", bool]] = {}


def _takes_no_arguments(sig: "inspect.Signature") -> bool:
    """Whether a call without arguments binds to ``sig`` (asked once per
    signature object: calls without arguments are common, and binding, or
    even hashing a signature, is not free)."""
    known = _NO_ARGUMENTS.get(id(sig))
    if known is not None and known[0] is sig:
        return known[1]
    try:
        sig.bind()
        ok = True
    except TypeError:
        ok = False
    if len(_NO_ARGUMENTS) >= 1024:
        _NO_ARGUMENTS.clear()
    _NO_ARGUMENTS[id(sig)] = (sig, ok)
    return ok


def check_call(sig: "inspect.Signature | None", what: str, args: tuple, kwargs: dict) -> None:
    """Raise TypeError now, at submit time, if ``args``/``kwargs`` do not
    bind to ``sig`` (Ray does the same), instead of failing in the worker."""
    if sig is None:
        return
    if not args and not kwargs and _takes_no_arguments(sig):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{what}: {e} (signature: {sig})") from None


@functools.lru_cache(maxsize=1)
def _no_arguments() -> bytes:
    return NO_ARGUMENTS_BYTES


def encode_args(client: CoreClient, args: tuple, kwargs: dict) -> dict:
    """Build the argument part of a task spec: top-level refs become
    dependencies, everything else is serialized (large payloads go to the
    object store as an extra dependency)."""
    if not args and not kwargs:  # the same bytes every time
        return {"deps": [], "nested": [], "args": _no_arguments(), "_keep": []}
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
    if s.total_size > messages.INLINE_MAX and client.has_store():
        ref = client.objects.put_serialized(s)
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
        self._signature = signature_of(fn)
        self._blob: bytes | None = None
        self._fid: bytes | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self._name} cannot be called directly: use "
                        f"{self._name}.remote(...) to run it as a task, and flowcore.get() "
                        f"for its result")

    def _identity(self) -> tuple[bytes, bytes]:
        if self._fid is None:
            self._blob = pickle_checked(self._function, "remote function", self._name)
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
        check_call(self._signature, f"{self._name}.remote()", args, kwargs)
        client = client_or_init()
        fid, blob = self._identity()
        client.ensure_function(fid, lambda: blob, self._name)
        o = opts.resolved(opts.TASK, self._options)
        spec = encode_args(client, args, kwargs)
        keep = spec.pop("_keep")
        nret, xopts = returns_mode(o["num_returns"])
        max_calls = o.get("max_calls")
        if max_calls is None:  # Ray's default: no limit, but 1 for GPU tasks
            max_calls = 1 if o.get("num_gpus") else 0
        if max_calls:
            xopts["max_calls"] = max_calls
        spec.update({
            "tid": client.ids.task_id(), "fid": fid, "name": o.get("name") or self._name,
            "nret": nret, "res": opts.resource_request(o),
            "retries": 10**9 if o["max_retries"] == -1 else o["max_retries"],
            "retry_exc": _encode_retry(o["retry_exceptions"]),
        })
        strategy = for_submit(client, o.get("scheduling_strategy"), spec["res"],
                              f"task {spec['name']}")
        if strategy is not None:
            spec["strategy"] = strategy
        if getattr(client, "job", None):
            spec["job"] = client.job
        if xopts:
            spec["xopts"] = xopts
        if client.runtime_env is not None or o["runtime_env"] is not None:
            spec["renv"] = for_task(client, o["runtime_env"])
        refs = submit_returning(client, spec, o["num_returns"])
        del keep  # dependencies are now held by the task at the head
        return refs


def returns_mode(num_returns: Any) -> tuple[int, dict]:
    """The number of return objects a task is submitted with, and the worker
    options its ``num_returns`` implies: a generator (``"streaming"`` or
    ``"dynamic"``) and ``num_returns=0`` have one object, the task's end."""
    if isinstance(num_returns, str):
        return 1, {"gen": num_returns}
    return max(1, num_returns), {}


def submit_returning(client: CoreClient, spec: dict, num_returns: Any) -> Any:
    """Submit ``spec``; what ``.remote()`` returns for ``num_returns``: a ref,
    a list of refs, None (0), an ``ObjectRefGenerator`` ("streaming"), or
    the ref of a ``DynamicObjectRefGenerator`` ("dynamic")."""
    if num_returns == "streaming":
        client.streams.add(spec["tid"])  # before any value can be announced
    refs = client.submit(spec)
    if num_returns == "streaming":
        return ObjectRefGenerator(refs[0], client)
    if num_returns == 0:
        return None
    return refs if isinstance(num_returns, int) and num_returns > 1 else refs[0]


def _encode_retry(v: Any) -> Any:
    if isinstance(v, (bool, bytes)):  # bytes: already encoded
        return v
    import cloudpickle
    return cloudpickle.dumps(list(v))
