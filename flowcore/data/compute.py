"""Compute strategies (Ray's older spelling of ``concurrency=``):
``ActorPoolStrategy(size=n)`` or ``(min_size=, max_size=)`` for a callable
class, ``TaskPoolStrategy(size=n)`` for a function."""
from __future__ import annotations

from typing import Any

__all__ = ["ActorPoolStrategy", "TaskPoolStrategy", "concurrency_from"]


class ActorPoolStrategy:
    def __init__(self, *, size: int | None = None, min_size: int | None = None,
                 max_size: int | None = None, max_tasks_in_flight_per_actor: int | None = None
                 ) -> None:
        if size is not None and (min_size is not None or max_size is not None):
            raise ValueError("ActorPoolStrategy: give size= or min_size=/max_size=, not both")
        for name, v in (("size", size), ("min_size", min_size), ("max_size", max_size)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"ActorPoolStrategy: {name}={v!r}; expected an int >= 1")
        self.size = size
        self.min_size = min_size or size or 1
        self.max_size = max_size or size
        self.max_tasks_in_flight_per_actor = max_tasks_in_flight_per_actor

    def __repr__(self) -> str:
        return f"ActorPoolStrategy(min_size={self.min_size}, max_size={self.max_size})"


class TaskPoolStrategy:
    def __init__(self, size: int | None = None) -> None:
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"TaskPoolStrategy: size={size!r}; expected an int >= 1")
        self.size = size

    def __repr__(self) -> str:
        return f"TaskPoolStrategy(size={self.size})"


def concurrency_from(compute: Any, concurrency: Any, op: str) -> Any:
    """The ``concurrency`` a ``compute=`` strategy stands for."""
    if compute is None:
        return concurrency
    if concurrency is not None:
        raise ValueError(f"{op}: give concurrency= or compute=, not both")
    if isinstance(compute, ActorPoolStrategy):
        if compute.max_size is None:
            return None if compute.min_size == 1 else (compute.min_size, 10**6)
        return compute.size or (compute.min_size, compute.max_size)
    if isinstance(compute, TaskPoolStrategy):
        return compute.size
    raise TypeError(f"{op}: compute={compute!r}; expected ActorPoolStrategy(...) or "
                    f"TaskPoolStrategy(...) (or use concurrency=)")
