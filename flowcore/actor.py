"""Actors: ``@flowcore.remote`` on a class.

``Cls.remote(...)`` returns an ``ActorHandle`` at once; the constructor runs
in a worker process of its own.  ``handle.method.remote(...)`` returns
ObjectRefs like a task.  Calls from one caller start in submission order.
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, Generic, TypeVar

from . import ids
from . import options as opts
from .objects.ref import ObjectRef, current_client
from .remote_function import encode_args, pickle_callable

T = TypeVar("T")


def method(*, num_returns: int = 1) -> Callable[[Callable], Callable]:
    """Declare options of an actor method: ``@flowcore.method(num_returns=2)``."""
    if not isinstance(num_returns, int) or isinstance(num_returns, bool) or num_returns < 1:
        raise ValueError(f"method(num_returns={num_returns!r}): expected an int >= 1")

    def deco(fn: Callable) -> Callable:
        fn.__flowcore_num_returns__ = num_returns  # type: ignore[attr-defined]
        return fn
    return deco


def _method_table(cls: type) -> tuple[dict[str, int], bool]:
    table: dict[str, int] = {}
    is_async = False
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") or not callable(member):
            continue
        table[name] = getattr(member, "__flowcore_num_returns__", 1)
        if inspect.iscoroutinefunction(member):
            is_async = True
    return table, is_async


def _client() -> Any:
    client = current_client()
    if client is None:
        from .api import _auto_init
        client = _auto_init()
    return client


class ActorClass(Generic[T]):
    """A class turned into an actor factory by ``@flowcore.remote``."""

    def __init__(self, cls: type, options: dict[str, Any]):
        self._cls = cls
        self._name = cls.__qualname__
        self._options = opts.validate(opts.ACTOR, dict(options), f"@remote({self._name})")
        self._methods, self._is_async = _method_table(cls)
        self._blob: bytes | None = None
        self._fid: bytes | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self._name} cannot be instantiated directly: use "
                        f"{self._name}.remote(...) to create an actor")

    def options(self, **overrides: Any) -> "ActorClass[T]":
        opts.validate(opts.ACTOR, overrides, f"{self._name}.options()")
        new = ActorClass.__new__(ActorClass)
        new.__dict__.update(self.__dict__)
        new._options = {**self._options, **overrides}
        return new

    def _identity(self) -> tuple[bytes, bytes]:
        if self._fid is None:
            self._blob = pickle_callable(self._cls)
            self._fid = hashlib.blake2b(self._blob, digest_size=16).digest()
        return self._fid, self._blob  # type: ignore[return-value]

    def remote(self, *args: Any, **kwargs: Any) -> "ActorHandle":
        client = _client()
        fid, blob = self._identity()
        client.ensure_function(fid, lambda: blob, self._name)
        o = opts.resolved(opts.ACTOR, self._options)
        try:
            spec = encode_args(client, args, kwargs)
        except TypeError as e:
            raise TypeError(f"{self._name}.remote(): cannot serialize the constructor's "
                            f"arguments: {e}") from None
        keep = spec.pop("_keep")
        tid = client.ids.task_id()
        explicit = {k: v for k, v in opts.resource_request(o, default_cpus=0).items()}
        spec.update({
            "tid": tid, "aid": tid, "fid": fid, "name": f"{self._name}.__init__",
            "class_name": self._name, "methods": self._methods, "is_async": self._is_async,
            "actor_name": o.get("name"), "namespace": o.get("namespace"),
            "get_if_exists": o.get("get_if_exists"), "detached": o.get("lifetime") == "detached",
            "max_restarts": o["max_restarts"], "max_task_retries": o["max_task_retries"],
            "max_concurrency": o["max_concurrency"],
            # placed with 1 CPU unless resources were given (num_cpus=0 included)
            "hold": explicit,
            "place": explicit if explicit or o.get("num_cpus") is not None else {"CPU": 1.0},
        })
        if o.get("scheduling_strategy") is not None:
            from .scheduling import for_submit
            spec["strategy"] = for_submit(client, o["scheduling_strategy"], spec["place"],
                                          f"actor {self._name}")
        if client.runtime_env is not None or o["runtime_env"] is not None:
            from .runtime_env import for_task
            spec["renv"] = for_task(client, o["runtime_env"])
        reply = client.request("head", {"op": "create_actor", "spec": spec})
        del keep
        if not reply.get("ok"):
            raise ValueError(reply.get("error", "the head refused to create the actor"))
        return ActorHandle._from_meta(reply["meta"], counted=not reply.get("existing"))


class ActorMethod:
    def __init__(self, handle: "ActorHandle", name: str, num_returns: int):
        self._handle = handle
        self._name = name
        self._num_returns = num_returns

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor method {self._handle._class_name}.{self._name} cannot be "
                        f"called directly: use .{self._name}.remote(...)")

    def options(self, *, num_returns: int | None = None) -> "ActorMethod":
        if num_returns is not None:
            method(num_returns=num_returns)  # validates
        return ActorMethod(self._handle, self._name, num_returns or self._num_returns)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        client = _client()
        h = self._handle
        try:
            spec = encode_args(client, args, kwargs)
        except TypeError as e:
            raise TypeError(f"{h._class_name}.{self._name}.remote(): {e}") from None
        keep = spec.pop("_keep")
        spec.update({"tid": client.ids.task_id(), "fid": b"", "actor": h._aid,
                     "method": self._name, "name": f"{h._class_name}.{self._name}",
                     "nret": self._num_returns, "res": {}, "retries": 0})
        refs = client.submit(spec)
        del keep
        return refs[0] if self._num_returns == 1 else refs


class ActorHandle:
    """A reference to a live actor; serialisable (pass it to tasks and actors).

    Handles are counted like ObjectRefs: when no handle remains anywhere and
    the actor is neither named nor detached, it exits once its pending calls
    are done.
    """

    def __init__(self, aid: bytes, class_name: str, methods: dict[str, int],
                 is_async: bool = False, *, counted: bool = False):
        self._aid = aid
        self._class_name = class_name
        self._methods = dict(methods)
        self._is_async = is_async
        self._client = current_client()
        if self._client is not None:
            self._client.add_local_ref(ids.actor_handle_id(aid), counted)

    def __del__(self) -> None:
        c = self.__dict__.get("_client")
        if c is not None:
            try:
                c.remove_local_ref(ids.actor_handle_id(self._aid))
            except Exception:
                pass

    @classmethod
    def _from_meta(cls, meta: dict, counted: bool = False) -> "ActorHandle":
        return cls(meta["aid"], meta["class_name"], meta["methods"], meta.get("is_async", False),
                   counted=counted)

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("__"):
            raise AttributeError(name)
        methods = self.__dict__.get("_methods", {})
        if name not in methods:
            raise AttributeError(
                f"actor {self.__dict__.get('_class_name', '?')} has no method {name!r}; its "
                f"methods are: {', '.join(sorted(methods)) or '(none)'}")
        return ActorMethod(self, name, methods[name])

    def __reduce__(self) -> Any:
        from .objects import serialization
        serialization.note_contained_ref(ids.actor_handle_id(self._aid))
        return (ActorHandle, (self._aid, self._class_name, self._methods, self._is_async))

    def __repr__(self) -> str:
        return f"ActorHandle({self._class_name}, {self._aid.hex()[:12]})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorHandle) and other._aid == self._aid

    def __hash__(self) -> int:
        return hash(self._aid)

    @property
    def actor_id(self) -> str:
        return self._aid.hex()


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """End the actor's process now; pending and later calls raise
    ``ActorDiedError`` (with ``no_restart=False`` it may restart instead)."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an ActorHandle, got {type(actor).__name__}")
    client = _client()
    # later calls from here go through the head, which holds them until the
    # kill's outcome is known (and, after a restart, hands out the new address)
    client.direct.pause(actor._aid)
    client.send("head", {"op": "kill_actor", "aid": actor._aid,
                         "no_restart": bool(no_restart)})


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor created with ``.options(name=name)``."""
    if not isinstance(name, str) or not name:
        raise TypeError("get_actor() takes the actor's name (a non-empty string)")
    meta = _client().query("get_actor", name=name, namespace=namespace)
    if meta is None:
        raise ValueError(f"no live actor named {name!r} in namespace "
                         f"{namespace or 'default'!r}")
    return ActorHandle._from_meta(meta)
