"""``get_runtime_context()`` and ``get_gpu_ids()``: where am I running?"""
from __future__ import annotations

from typing import Any

_worker: Any = None


def set_worker(worker: Any) -> None:
    global _worker
    _worker = worker


class RuntimeContext:
    """Facts about the current process and task."""

    def __init__(self, client: Any):
        self._client = client

    def get_node_id(self) -> str | None:
        return self._client.node_id if self._client else None

    def get_task_id(self) -> str | None:
        task = self._client.current_task if self._client else None
        return task["tid"].hex() if task else None

    def get_actor_id(self) -> str | None:
        aid = getattr(_worker, "actor_id", None)
        return aid.hex() if aid else None

    def get_worker_id(self) -> str | None:
        return self._client.client_id if self._client else None

    @property
    def worker_mode(self) -> str:
        return "worker" if _worker is not None else "driver"

    def __repr__(self) -> str:
        return (f"RuntimeContext(node_id={self.get_node_id()!r}, task_id={self.get_task_id()!r}, "
                f"mode={self.worker_mode!r})")


def get_gpu_ids() -> list[int]:
    """GPU ids assigned to the current task (empty on the driver)."""
    from .objects.ref import current_client
    client = current_client()
    task = getattr(client, "current_task", None) if client else None
    return list(task.get("gpu_ids") or []) if task else []
