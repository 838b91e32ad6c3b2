"""``get_runtime_context()`` and ``get_gpu_ids()``: where am I running?

The job facts (job id, namespace) travel with every task and actor creation
a job submits (the spec's ``"job"``: ``[job_id_hex, namespace]``), so tasks
and actors know their job's namespace as the driver does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import context as _ctx
from .actor import ActorHandle, method_table
# the job and worker facts live in the process context; named here too
from .context import (DEFAULT_NAMESPACE, ActorExit, current_client, in_actor, job_of,
                      namespace_of, new_job, set_worker)

if TYPE_CHECKING:
    from .client.core import CoreClient

__all__ = ["RuntimeContext", "get_gpu_ids", "ActorExit", "in_actor", "set_worker", "new_job",
           "job_of", "namespace_of", "DEFAULT_NAMESPACE"]


class RuntimeContext:
    """Facts about the current process, job, task and actor (Ray's names)."""

    def __init__(self, client: CoreClient | None):
        self._client = client

    # ------------------------------------------------------------ what is running
    def _task(self) -> dict | None:
        return getattr(self._client, "current_task", None) if self._client else None

    def _actor_spec(self) -> dict:
        return getattr(_ctx.current_worker(), "actor_spec", None) or {}

    def get_job_id(self) -> str | None:
        """The id of the job (driver) this process works for, hex."""
        job = job_of(self._client)
        return job[0] if job else None

    def get_node_id(self) -> str | None:
        return self._client.node_id if self._client else None

    def get_task_id(self) -> str | None:
        """The running task's (or actor call's) id; None on the driver."""
        task = self._task()
        return task["tid"].hex() if task and task.get("tid") else None

    def get_task_name(self) -> str | None:
        task = self._task()
        return task.get("name") if task else None

    def get_task_function_name(self) -> str | None:
        return self.get_task_name()

    def get_actor_id(self) -> str | None:
        aid = getattr(_ctx.current_worker(), "actor_id", None)
        return aid.hex() if aid else None

    def get_actor_name(self) -> str | None:
        """Inside a named actor: its name; else None."""
        return self._actor_spec().get("actor_name") if self.get_actor_id() else None

    def get_worker_id(self) -> str | None:
        return self._client.client_id if self._client else None

    @property
    def namespace(self) -> str:
        """The namespace this job's named actors live in (``init(namespace=)``)."""
        return namespace_of(self._client)

    @property
    def gcs_address(self) -> str | None:
        """The head's address."""
        return getattr(self._client, "head_address", None)

    # deprecated spellings Ray keeps
    job_id = property(get_job_id)
    node_id = property(get_node_id)
    task_id = property(get_task_id)
    actor_id = property(get_actor_id)

    def get(self) -> dict[str, Any]:
        """The context as a dict: ``job_id``, ``node_id``, ``namespace``, and
        in a worker ``task_id`` / ``actor_id`` when set."""
        out: dict[str, Any] = {"job_id": self.get_job_id(), "node_id": self.get_node_id(),
                               "namespace": self.namespace}
        if _ctx.current_worker() is not None:
            if self.get_task_id() is not None:
                out["task_id"] = self.get_task_id()
            if self.get_actor_id() is not None:
                out["actor_id"] = self.get_actor_id()
        return out

    # ------------------------------------------------------------ resources
    def get_assigned_resources(self) -> dict[str, float]:
        """Resources reserved for this worker: the running task's request
        (``{"CPU": 1.0}`` by default), or an actor's explicit request (``{}``
        by default, as actors hold no CPU unless they ask)."""
        if self.get_actor_id():
            return {k: float(v) for k, v in (self._actor_spec().get("hold") or {}).items()}
        task = self._task()
        return {k: float(v) for k, v in ((task or {}).get("res") or {}).items()}

    def get_accelerator_ids(self) -> dict[str, list[str]]:
        """Accelerator ids visible to this worker, as strings: ``{"GPU": [...]}``."""
        if self.get_actor_id():
            gpus = getattr(_ctx.current_worker(), "actor_gpus", None) or []
        else:
            gpus = (self._task() or {}).get("gpu_ids") or []
        return {"GPU": [str(g) for g in gpus]}

    def get_resource_ids(self) -> dict[str, list[str]]:
        """Deprecated spelling of ``get_accelerator_ids``."""
        return self.get_accelerator_ids()

    def get_placement_group_id(self) -> str | None:
        """The placement group this task or actor runs in, hex; else None."""
        key = (self._task() or {}).get("bundle") or self._actor_spec().get("bundle")
        return key.split(":")[0] if key else None

    current_placement_group_id = property(get_placement_group_id)

    # ------------------------------------------------------------ actors
    @property
    def current_actor(self) -> Any:
        """Inside an actor: a handle to itself (pass it to tasks, call it);
        None elsewhere (on the driver, in a task, during the constructor)."""
        worker = _ctx.current_worker()
        aid = getattr(worker, "actor_id", None)
        if aid is None or getattr(worker, "instance", None) is None:
            return None
        methods, is_async = method_table(type(worker.instance))
        return ActorHandle(aid, self._actor_spec().get("name") or type(worker.instance).__name__,
                           methods, is_async)

    @property
    def was_current_actor_reconstructed(self) -> bool:
        """True in an actor that was restarted after its process died."""
        return bool(self._actor_spec().get("restart")) if self.get_actor_id() else False

    @property
    def worker_mode(self) -> str:
        return "worker" if _ctx.current_worker() is not None else "driver"

    def __repr__(self) -> str:
        return (f"RuntimeContext(job_id={self.get_job_id()!r}, node_id={self.get_node_id()!r}, "
                f"task_id={self.get_task_id()!r}, mode={self.worker_mode!r})")


def get_gpu_ids() -> list[int]:
    """GPU ids assigned to the current task (empty on the driver)."""
    client = current_client()
    task = getattr(client, "current_task", None) if client else None
    return list(task.get("gpu_ids") or []) if task else []
