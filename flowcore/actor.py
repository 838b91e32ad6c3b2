"""Actors: ``@flowcore.remote`` on a class.

``Cls.remote(...)`` returns an ``ActorHandle`` at once; the constructor runs
in a worker process of its own.  ``handle.method.remote(...)`` returns
ObjectRefs like a task.  Calls from one caller start in submission order.
"""
from __future__ import annotations

import hashlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Generic, NoReturn, TypeVar

from . import ids
from . import options as opts
from .context import ActorExit, in_actor, namespace_of
from .session import client_or_init, current_client
from .exceptions import PendingCallsLimitExceeded
from .objects import serialization
from .remote_function import (_encode_retry, check_call, encode_args, pickle_checked,
                              returns_mode, signature_of, submit_returning)
from .runtime_env import for_task
from .scheduling import for_submit

if TYPE_CHECKING:
    from .client.core import CoreClient

T = TypeVar("T")


#: the key of the methods table that carries actor-wide facts handles need
#: (``max_pending_calls``, ``concurrency_groups``); not a method
ACTOR_OPTIONS_KEY = "__actor_options__"


def method(*args: Any, **options: Any) -> Any:
    """Declare options of an actor method (Ray's ``ray.method``)::

        @flowcore.method(num_returns=2, max_task_retries=3,
                         retry_exceptions=[IOError], concurrency_group="io")
        def m(self): ...

    ``num_returns`` (int >= 1), ``max_task_retries`` (int >= 0 or -1: this
    method's retries, instead of the actor's), ``retry_exceptions`` (True or
    a list of exception classes: also retry when the method raises them,
    within ``max_task_retries``), ``concurrency_group`` (one of the actor's
    ``concurrency_groups``).  Checked against the options table."""
    if args:
        if len(args) == 1 and callable(args[0]) and not options:
            return args[0]  # bare @flowcore.method: no options
        raise TypeError("use @flowcore.method(option=value, ...)")
    opts.validate(opts.METHOD, options, "method()")

    def deco(fn: Callable) -> Callable:
        fn.__flowcore_method_options__ = dict(options)  # type: ignore[attr-defined]
        return fn
    return deco


def _method_entry(options: dict[str, Any]) -> int | dict[str, Any]:
    """A method's entry in the table handles carry (msgpack-safe): its
    ``num_returns`` alone when that is all it sets, else its options."""
    if set(options) <= {"num_returns"}:
        return options.get("num_returns", 1)
    entry = dict(options)
    if "retry_exceptions" in entry:
        entry["retry_exceptions"] = _encode_retry(entry["retry_exceptions"])
    return entry


def method_table(cls: type) -> tuple[dict[str, Any], bool]:
    table: dict[str, Any] = {}
    is_async = False
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") or not callable(member):
            continue
        table[name] = _method_entry(getattr(member, "__flowcore_method_options__", {}))
        if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
            is_async = True
    return table, is_async


def method_signatures(cls: type) -> dict[str, Any]:
    """Each method's signature as a caller sees it (without ``self``), for
    checking a call's arguments at submit time."""
    out: dict[str, Any] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("__") or not callable(member):
            continue
        sig = signature_of(member)
        if sig is None:
            continue
        if not isinstance(inspect.getattr_static(cls, name, None), (staticmethod, classmethod)):
            params = list(sig.parameters.values())[1:]  # a plain method: drop ``self``
            sig = sig.replace(parameters=params)
        out[name] = sig
    return out


def method_group(cls: type, name: str) -> str | None:
    """The concurrency group ``@flowcore.method`` declared for a method."""
    member = getattr(cls, name, None)
    return (getattr(member, "__flowcore_method_options__", None) or {}).get("concurrency_group")


class ActorClass(Generic[T]):
    """A class turned into an actor factory by ``@flowcore.remote``."""

    def __init__(self, cls: type, options: dict[str, Any]):
        self._cls = cls
        self._name = cls.__qualname__
        # the class's names, as on the class itself (logs, docs, introspection)
        self.__name__, self.__qualname__ = cls.__name__, cls.__qualname__
        self.__module__, self.__doc__ = cls.__module__, cls.__doc__
        self._options = opts.validate(opts.ACTOR, dict(options), f"@remote({self._name})")
        self._methods, self._is_async = method_table(cls)
        self._signature = signature_of(cls)
        self._blob: bytes | None = None
        self._fid: bytes | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self._name} cannot be instantiated directly: use "
                        f"{self._name}.remote(...) to create an actor")

    def __getattr__(self, name: str) -> Any:
        # the user's class attributes, static methods and class methods stay
        # reachable (Foo.X, Foo.make()), as on Ray's actor classes
        cls = self.__dict__.get("_cls")
        if cls is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        try:
            return getattr(cls, name)
        except AttributeError:
            raise AttributeError(f"actor class {self._name} has no attribute {name!r}") from None

    def __dir__(self) -> list[str]:
        return sorted(set(object.__dir__(self)) | set(dir(self._cls)))

    def options(self, **overrides: Any) -> "ActorClass[T]":
        opts.validate(opts.ACTOR, overrides, f"{self._name}.options()")
        new = ActorClass.__new__(ActorClass)
        new.__dict__.update(self.__dict__)
        new._options = {**self._options, **overrides}
        return new

    def _identity(self) -> tuple[bytes, bytes]:
        if self._fid is None:
            self._blob = pickle_checked(self._cls, "actor class", self._name)
            self._fid = hashlib.blake2b(self._blob, digest_size=16).digest()
        return self._fid, self._blob  # type: ignore[return-value]

    def remote(self, *args: Any, **kwargs: Any) -> "ActorHandle":
        o = opts.resolved(opts.ACTOR, self._options)
        if o.get("get_if_exists") and not o.get("name"):
            raise ValueError(f"{self._name}.options(get_if_exists=True) needs name=...: only "
                             f"a named actor can be looked up")
        check_call(self._signature, f"{self._name}.remote()", args, kwargs)
        groups = o.get("concurrency_groups") or {}
        for m, entry in self._methods.items():
            group = entry.get("concurrency_group") if isinstance(entry, dict) else None
            if group is not None and group not in groups:
                raise ValueError(
                    f"{self._name}.{m} declares concurrency_group={group!r}, but the actor's "
                    f"concurrency_groups are {sorted(groups) or 'not set'}; pass "
                    f"concurrency_groups={{{group!r}: N, ...}} to @remote or .options()")
        methods: dict[str, Any] = dict(self._methods)
        if groups or o.get("max_pending_calls", -1) != -1:
            methods[ACTOR_OPTIONS_KEY] = {"concurrency_groups": dict(groups),
                                          "max_pending_calls": o.get("max_pending_calls", -1)}
        client = client_or_init()
        fid, blob = self._identity()
        client.ensure_function(fid, lambda: blob, self._name)
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
            "class_name": self._name, "methods": methods, "is_async": self._is_async,
            "concurrency_groups": dict(groups),
            "actor_name": o.get("name"), "namespace": o.get("namespace") or namespace_of(client),
            "get_if_exists": o.get("get_if_exists"), "detached": o.get("lifetime") == "detached",
            "max_restarts": o["max_restarts"], "max_task_retries": o["max_task_retries"],
            "max_concurrency": o["max_concurrency"],
            # placed with 1 CPU unless resources were given (num_cpus=0 included)
            "hold": explicit,
            "place": explicit if explicit or o.get("num_cpus") is not None else {"CPU": 1.0},
        })
        if getattr(client, "job", None):
            spec["job"] = client.job
        if o.get("scheduling_strategy") is not None:
            spec["strategy"] = for_submit(client, o["scheduling_strategy"], spec["place"],
                                          f"actor {self._name}")
        if client.runtime_env is not None or o["runtime_env"] is not None:
            spec["renv"] = for_task(client, o["runtime_env"])
        reply = client.request("head", {"op": "create_actor", "spec": spec})
        del keep
        if not reply.get("ok"):
            raise ValueError(reply.get("error", "the head refused to create the actor"))
        handle = ActorHandle._from_meta(reply["meta"], counted=not reply.get("existing"))
        if not reply.get("existing"):  # calls through it are checked against the class
            handle._signatures = method_signatures(self._cls)
        return handle


class ActorMethod:
    """``handle.method``: call it with ``.remote(...)``; ``.options(...)``
    changes this call's options (``num_returns``, ``name``,
    ``max_task_retries``, ``retry_exceptions``, ``concurrency_group``)."""

    def __init__(self, handle: "ActorHandle", name: str, entry: Any = 1):
        self._handle = handle
        self._name = name
        self._options: dict[str, Any] = dict(entry) if isinstance(entry, dict) else \
            {"num_returns": entry}

    @property
    def _num_returns(self) -> int:
        return self._options.get("num_returns", 1)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor method {self._handle._class_name}.{self._name} cannot be "
                        f"called directly: use .{self._name}.remote(...)")

    def options(self, **overrides: Any) -> "ActorMethod":
        opts.validate(opts.METHOD, overrides,
                      f"{self._handle._class_name}.{self._name}.options()")
        return ActorMethod(self._handle, self._name, {**self._options, **overrides})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        client = client_or_init()
        h = self._handle
        o = self._options
        check_call(h.__dict__.get("_signatures", {}).get(self._name),
                   f"{h._class_name}.{self._name}.remote()", args, kwargs)
        h._check_pending(client)
        try:
            spec = encode_args(client, args, kwargs)
        except TypeError as e:
            raise TypeError(f"{h._class_name}.{self._name}.remote(): {e}") from None
        keep = spec.pop("_keep")
        num_returns = o.get("num_returns", 1)
        nret, xopts = returns_mode(num_returns)
        retries = o.get("max_task_retries")
        spec.update({"tid": client.ids.task_id(), "fid": b"", "actor": h._aid,
                     "method": self._name,
                     "name": o.get("name") or f"{h._class_name}.{self._name}",
                     "nret": nret, "res": {},
                     # None: the actor's max_task_retries
                     "retries": None if retries is None else 10**9 if retries == -1 else retries})
        if o.get("retry_exceptions"):
            spec["retry_exc"] = _encode_retry(o["retry_exceptions"])
        if o.get("concurrency_group"):
            spec["cgroup"] = o["concurrency_group"]
        if xopts:
            spec["xopts"] = xopts
        out = submit_returning(client, spec, num_returns)
        del keep
        h._note_pending(ids.object_id(spec["tid"], 0))
        return out


class ActorHandle:
    """A reference to a live actor; serialisable (pass it to tasks and actors).

    Handles are counted like ObjectRefs: when no handle remains anywhere and
    the actor is not detached (named or not), it exits once its pending calls
    are done.
    """

    #: the methods' signatures, on the creator's handle only (calls are checked there)
    _signatures: dict[str, Any]

    def __init__(self, aid: bytes, class_name: str, methods: dict[str, int],
                 is_async: bool = False, *, counted: bool = False):
        self._aid = aid
        self._class_name = class_name
        self._methods = dict(methods)
        self._is_async = is_async
        actor_opts: Any = self._methods.get(ACTOR_OPTIONS_KEY) or {}
        self._max_pending: int = actor_opts.get("max_pending_calls", -1)
        self._pending: list[bytes] = []  # first return of calls made through this handle
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
        if name == "__ray_terminate__":  # Ray's graceful terminate, after queued calls
            return ActorMethod(self, name, 1)
        if name.startswith("__"):
            raise AttributeError(name)
        methods = self.__dict__.get("_methods", {})
        if name not in methods:
            names = sorted(m for m in methods if m != ACTOR_OPTIONS_KEY)
            raise AttributeError(
                f"actor {self.__dict__.get('_class_name', '?')} has no method {name!r}; its "
                f"methods are: {', '.join(names) or '(none)'}")
        return ActorMethod(self, name, methods[name])

    def _check_pending(self, client: CoreClient) -> None:
        """``max_pending_calls``: refuse a call while this handle already has
        that many unfinished calls (Ray's ``PendingCallsLimitExceeded``)."""
        if self._max_pending == -1:
            return
        expected = client.expected
        self._pending = [oid for oid in self._pending if oid in expected]
        if len(self._pending) >= self._max_pending:
            raise PendingCallsLimitExceeded(
                f"actor {self._class_name} ({self._aid.hex()[:12]}) has {len(self._pending)} "
                f"calls pending through this handle, its max_pending_calls="
                f"{self._max_pending}: wait for some (flowcore.get/wait) before calling "
                f"again, or raise max_pending_calls")

    def _note_pending(self, oid: bytes) -> None:
        if self._max_pending != -1:
            self._pending.append(oid)

    def __dir__(self) -> list[str]:
        methods = set(self.__dict__.get("_methods", {})) - {ACTOR_OPTIONS_KEY}
        return sorted(set(object.__dir__(self)) | methods)

    def __reduce__(self) -> Any:
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


def exit_actor() -> NoReturn:
    """End the current actor from inside one of its methods (Ray's
    ``ray.actor.exit_actor``): the actor is dead for good (no restart), the
    calling method's ref and calls queued after it raise ``ActorDiedError``,
    and the process runs its atexit handlers and exits.

    Raises ``TypeError`` when called outside an actor (on the driver or in a
    task)."""
    if not in_actor():
        raise TypeError("exit_actor() can only be called inside an actor's method; use "
                        "flowcore.kill(handle) to end an actor from outside")
    raise ActorExit("it called exit_actor()")


def kill(actor: ActorHandle, *, no_restart: bool = True) -> None:
    """End the actor's process now; pending and later calls raise
    ``ActorDiedError`` (with ``no_restart=False`` it may restart instead)."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an ActorHandle, got {type(actor).__name__}")
    client = client_or_init()
    # later calls from here go through the head, which holds them until the
    # kill's outcome is known (and, after a restart, hands out the new address)
    client.direct.pause(actor._aid)
    client.send("head", {"op": "kill_actor", "aid": actor._aid,
                         "no_restart": bool(no_restart)})


def list_named_actors(all_namespaces: bool = False) -> list[str] | list[dict[str, str]]:
    """The names of the live named actors in this job's namespace; with
    ``all_namespaces=True``, ``[{"name": ..., "namespace": ...}]`` across all."""
    client = client_or_init()
    rows = [r for r in client.query("list_actors", state=None)
            if r.get("name") and r.get("state") != "DEAD"]
    if all_namespaces:
        return [{"name": r["name"], "namespace": r["namespace"]} for r in rows]
    ns = namespace_of(client)
    return [r["name"] for r in rows if r["namespace"] == ns]


def get_actor(name: str, namespace: str | None = None) -> ActorHandle:
    """The handle of the live actor created with ``.options(name=name)``."""
    if not isinstance(name, str) or not name:
        raise TypeError("get_actor() takes the actor's name (a non-empty string)")
    client = client_or_init()
    meta = client.query("get_actor", name=name, namespace=namespace or namespace_of(client))
    if meta is None:
        raise ValueError(f"no live actor named {name!r} in namespace "
                         f"{namespace or namespace_of(client)!r}")
    return ActorHandle._from_meta(meta)
