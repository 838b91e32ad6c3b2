"""This process's context: the one client it reaches its cluster through,
the job it belongs to, and the worker it is (inside tasks and actors).

The lowest layer above ids and exceptions: ``ObjectRef``, the worker and the
client read and set the client here.  ``flowcore.session`` (``init``,
``shutdown``, the auto-init) sits above it and is how the user-facing
modules reach the client.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client.core import CoreClient

# The client of this process (driver or worker): set by ``init`` and by the
# worker at start; ObjectRefs use it to count references.
_client: CoreClient | None = None


def set_client(client: CoreClient | None) -> None:
    """Make ``client`` this process's client (a worker at start; ``init``)."""
    global _client
    _client = client


def current_client() -> CoreClient | None:
    """This process's client, or None when it is not connected."""
    return _client


def require_client() -> CoreClient:
    """This process's client; raises when ``init()`` was not called."""
    c = _client
    if c is None:
        raise RuntimeError("flowcore is not initialized: call flowcore.init() first")
    return c


# ------------------------------------------------------------ job and worker
_worker: Any = None

DEFAULT_NAMESPACE = "default"


class ActorExit(SystemExit):
    """Raised by ``exit_actor()`` (and ``__ray_terminate__``) to end the
    current actor; ``reason`` becomes the actor's cause of death."""

    def __init__(self, reason: str):
        super().__init__(0)
        self.reason = reason


def in_actor() -> bool:
    """True inside an actor's process."""
    return getattr(_worker, "actor_id", None) is not None


def set_worker(worker: Any) -> None:
    """Record the worker this process is (a worker process, at start)."""
    global _worker
    _worker = worker


def current_worker() -> Any:
    """The worker this process is, or None in a driver."""
    return _worker


def new_job(namespace: str | None) -> list[str]:
    """The job facts a driver hands to everything it submits."""
    return [os.urandom(4).hex(), namespace or DEFAULT_NAMESPACE]


def job_of(client: CoreClient | None) -> list[str] | None:
    return getattr(client, "job", None) if client is not None else None


def namespace_of(client: CoreClient | None) -> str:
    """The namespace named actors are created in and looked up in by default."""
    job = job_of(client)
    return job[1] if job else DEFAULT_NAMESPACE



_worker_paths: list[str] | None = None


def set_worker_paths(paths: list[str] | None) -> None:
    """Record the import path worker processes were given (None: unknown,
    e.g. a cluster started elsewhere, where only installed packages are
    assumed importable)."""
    global _worker_paths
    _worker_paths = None if paths is None else [os.path.abspath(p or os.getcwd()) for p in paths]


def worker_paths() -> list[str] | None:
    """The import path worker processes were given (see ``set_worker_paths``)."""
    return _worker_paths
