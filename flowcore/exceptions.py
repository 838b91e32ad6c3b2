"""Errors raised by flowcore.  All derive from :class:`FlowcoreError`."""
from __future__ import annotations

from typing import Any


class FlowcoreError(Exception):
    """Base class of every flowcore error."""


class TaskError(FlowcoreError):
    """A remote task raised.  ``get`` raises an instance that is *also* an
    instance of the user's exception class, so ``except ValueError`` works.

    Attributes: ``function_name``, ``cause`` (the original exception when it
    could be transported), ``remote_traceback`` (text).
    """

    def __init__(self, function_name: str = "", remote_traceback: str = "",
                 cause: BaseException | None = None, task_id: str = "",
                 cause_text: str = "") -> None:
        self.function_name = function_name
        self.remote_traceback = remote_traceback
        self.cause = cause
        self.task_id = task_id
        #: "Type: message" of a cause that could not be transported
        self.cause_text = cause_text
        super().__init__(self._message())

    def _message(self) -> str:
        head = f"task {self.function_name}() raised"
        if self.cause is not None:
            head += f" {type(self.cause).__name__}: {self.cause}"
        elif getattr(self, "cause_text", ""):
            head += f" {self.cause_text}"
        return f"{head}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> Any:
        return (_rebuild_task_error, (self.function_name, self.remote_traceback,
                                      self.cause, self.task_id,
                                      getattr(self, "cause_text", "")))

    def as_instanceof_cause(self) -> "TaskError":
        """Return an error that is both a TaskError and the cause's class."""
        cause = self.cause
        if cause is None or isinstance(cause, TaskError) or not isinstance(cause, Exception):
            # SystemExit, KeyboardInterrupt and the like are not re-raised as
            # themselves in the caller: that would end the driver
            return self
        cls = type(cause)
        try:
            dual: Any = _dual_classes.get(cls)
            if dual is None:
                dual = type(f"TaskError({cls.__name__})", (TaskError, cls), {
                    "__init__": TaskError.__init__,
                    "__str__": TaskError.__str__,
                    "__reduce__": TaskError.__reduce__,
                })
                dual.__module__ = __name__
                _dual_classes[cls] = dual
            err = dual.__new__(dual)
            TaskError.__init__(err, self.function_name, self.remote_traceback,
                               cause, self.task_id)
            err.args = (self._message(),)
            return err
        except TypeError:  # e.g. layout conflicts with builtin classes
            return self


_dual_classes: dict[type, Any] = {}  # cause class -> its TaskError dual class


def _rebuild_task_error(function_name: str, tb: str, cause: BaseException | None,
                        task_id: str, cause_text: str = "") -> TaskError:
    return TaskError(function_name, tb, cause, task_id, cause_text).as_instanceof_cause()


class WorkerCrashedError(FlowcoreError):
    """The worker process running a task died (exit code or signal) and the
    task's retries were used up."""


class ActorError(FlowcoreError):
    """An actor call could not complete because of the actor process."""


class ActorDiedError(ActorError):
    """The actor is dead: killed, crashed without restarts left, or its node died."""


class ObjectLostError(FlowcoreError):
    """Every copy of an object was lost and it could not be rebuilt.

    ``reason`` is a code: ``"freed"`` (no reference remained), ``"put"`` (made
    by put(), nothing to re-run), ``"actor_call"``, ``"lineage_evicted"``,
    ``"retries_exhausted"``, ``"unknown_producer"``, ``"fetch_failed"``,
    ``"head_restart"`` (lost when the head restarted) or
    ``""`` when not known; ``object_id`` (hex) and ``creator`` (the task's
    name, or "put") say which object.
    """

    def __init__(self, message: str = "", *, reason: str = "", object_id: str = "",
                 creator: str = ""):
        super().__init__(message)
        self.reason = reason
        self.object_id = object_id
        self.creator = creator

    def __reduce__(self) -> Any:
        return (_rebuild_lost, (str(self), self.reason, self.object_id, self.creator))


def _rebuild_lost(message: str, reason: str, object_id: str, creator: str) -> "ObjectLostError":
    return ObjectLostError(message, reason=reason, object_id=object_id, creator=creator)


class GetTimeoutError(FlowcoreError, TimeoutError):
    """``get`` or ``wait`` gave up after its timeout."""


class TaskCancelledError(FlowcoreError):
    """The task was cancelled with :func:`flowcore.cancel`."""


class PlacementGroupError(FlowcoreError):
    """A task or actor cannot run in its placement group (the group was
    removed, or its bundle cannot hold the request)."""


class NodeDiedError(FlowcoreError):
    """A node died while holding work or data that was needed."""


class ObjectStoreFullError(FlowcoreError):
    """The object store is full, nothing more can be spilled and the disk
    fallback failed too."""


class AuthenticationError(FlowcoreError):
    """A peer failed the token challenge (wrong or missing token)."""


class PendingCallsLimitExceeded(FlowcoreError):
    """An actor call was refused: the handle already has ``max_pending_calls``
    unfinished calls (Ray's name)."""


class SerializationError(FlowcoreError, TypeError):
    """A value could not be serialized; the message names its type and where it sits."""


class ProtocolError(FlowcoreError):
    """A malformed, oversized or unexpected message arrived on a connection."""


class RuntimeEnvSetupError(FlowcoreError):
    """A task's or actor's ``runtime_env`` could not be set up on its node
    (its package could not be fetched or unpacked)."""


__all__ = [
    "FlowcoreError", "TaskError", "WorkerCrashedError", "ActorError",
    "ActorDiedError", "ObjectLostError", "GetTimeoutError", "TaskCancelledError",
    "NodeDiedError", "ObjectStoreFullError", "AuthenticationError", "ProtocolError",
    "SerializationError", "RuntimeEnvSetupError", "PendingCallsLimitExceeded",
]
