"""Read the head's tables: ``list_tasks``, ``list_objects``, ``list_nodes``,
``list_actors``, ``list_placement_groups``.  Plain dicts, newest state; filters by state."""
from __future__ import annotations

from .session import require_client
from .scheduler.states import TaskState


def list_tasks(state: str | TaskState | None = None, limit: int = 10_000) -> list[dict]:
    if state is not None:
        try:
            state = TaskState(str(state)).value
        except ValueError:
            raise ValueError(f"list_tasks(state={state!r}): expected one of "
                             f"{[s.value for s in TaskState]}") from None
    return require_client().query("list_tasks", state=state, limit=limit)


def list_objects(limit: int = 10_000) -> list[dict]:
    return require_client().query("list_objects", limit=limit)


def list_nodes() -> list[dict]:
    return require_client().query("list_nodes")


def list_actors(state: str | None = None) -> list[dict]:
    """The head's actor table: id, class, name, node, pid, state, restarts, pending calls."""
    if state is not None and state not in ("PENDING", "ALIVE", "RESTARTING", "RECOVERING",
                                           "DEAD"):
        raise ValueError(f"list_actors(state={state!r}): expected PENDING, ALIVE, RESTARTING, "
                         f"RECOVERING (after a head restart, until its node reports it) or DEAD")
    return require_client().query("list_actors", state=state)


def list_placement_groups(state: str | None = None) -> list[dict]:
    """The head's placement groups: id, name, strategy, state (PENDING,
    CREATED, RESCHEDULING, REMOVED), bundles and the node of each, what is
    free in each bundle, whether any set of current nodes could ever fit the
    group (``feasible``) and the ``cause`` of its state in words."""
    valid = ("PENDING", "CREATED", "RESCHEDULING", "REMOVED")
    if state is not None and state not in valid:
        raise ValueError(f"list_placement_groups(state={state!r}): expected one of {valid}")
    return require_client().query("list_placement_groups", state=state)


def task_events(n: int = 100) -> list[dict]:
    """The newest ``n`` entries of the head's task-transition log."""
    return require_client().query("event_log", n=n)


def list_packages() -> list[dict]:
    """The head's runtime_env packages: hash, size in bytes, how many times
    a driver uploaded it and how many times a node fetched it."""
    return require_client().query("list_packages")
