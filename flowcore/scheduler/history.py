"""Rows of the finished-task history (the head's bounded ``history``) in the
columns of ``list_tasks``: finished tasks stay listed after the head pruned
their records (their refs were dropped)."""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Iterator


def history_entry(t: Any) -> dict:
    """The history entry of a finished task record."""
    return _entry(_snapshot(t))


def _snapshot(t: Any) -> tuple:
    """What an entry needs, taken when the task ends (its record may run
    again later, for lineage); the dict is built when it is read."""
    return (t.tid, t.name, t.kind, t.state, t.node, t.worker, t.submitted, t.started,
            t.ended, t.attempt, t.actor, t.error_text, t.cause, t.owner, t.retries_left, t.res)


def _entry(e: tuple) -> dict:
    (tid, name, kind, state, node, worker, submitted, started, ended, attempt, actor,
     error, cause, owner, retries_left, res) = e
    return {"task_id": tid.hex(), "name": name, "kind": kind, "state": str(state),
            "node_id": node, "worker": worker, "submitted": submitted,
            "started": started or None, "ended": ended, "attempt": attempt,
            "actor_id": actor.hex() if actor else None, "error": error,
            "cause": cause, "owner": owner, "retries_left": retries_left,
            "resources": dict(res)}


class History:
    """The bounded finished-task history: ``add(task)`` on every end (cheap:
    a tuple); iterating (oldest first) or ``reversed`` gives the entries as
    dicts in the columns of ``history_entry``."""

    def __init__(self, maxlen: int):
        self._items: deque[tuple] = deque(maxlen=maxlen)
        self._append = self._items.append

    @property
    def maxlen(self) -> int | None:
        return self._items.maxlen

    def add(self, t: Any) -> None:
        # (_snapshot, inlined: this runs for every task that ends)
        self._append((t.tid, t.name, t.kind, t.state, t.node, t.worker, t.submitted, t.started,
                      t.ended, t.attempt, t.actor, t.error_text, t.cause, t.owner,
                      t.retries_left, t.res))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[dict]:
        return (_entry(e) for e in list(self._items))

    def __reversed__(self) -> Iterator[dict]:
        return (_entry(e) for e in reversed(list(self._items)))


def history_rows(history: Iterable[dict], tracked: Any, state: str | None, room: int,
                 seen: set[str]) -> list[dict]:
    """Up to ``room`` rows, newest first, for finished tasks not in
    ``tracked`` (the live task table, keyed by task id bytes) nor ``seen``."""
    out: list[dict] = []
    for h in reversed(list(history)):
        if len(out) >= room:
            break
        if h["task_id"] in seen or (state is not None and h["state"] != state) \
                or bytes.fromhex(h["task_id"]) in tracked:
            continue
        seen.add(h["task_id"])
        out.append({"task_id": h["task_id"], "name": h["name"], "state": h["state"],
                    "node_id": h["node_id"], "owner": h.get("owner"), "attempt": h["attempt"],
                    "retries_left": h.get("retries_left"), "resources": h.get("resources") or {},
                    "submitted": h["submitted"], "started": h["started"], "ended": h["ended"],
                    "cause": h["cause"], "waiting_for": []})
    return out
