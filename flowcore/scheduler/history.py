"""Rows of the finished-task history (the head's bounded ``history``) in the
columns of ``list_tasks``: finished tasks stay listed after the head pruned
their records (their refs were dropped)."""
from __future__ import annotations

from typing import Any, Iterable


def history_entry(t: Any) -> dict:
    """The history entry of a finished task record."""
    return {"task_id": t.tid.hex(), "name": t.name, "kind": t.kind, "state": str(t.state),
            "node_id": t.node, "worker": t.worker, "submitted": t.submitted,
            "started": t.started or None, "ended": t.ended, "attempt": t.attempt,
            "actor_id": t.actor.hex() if t.actor else None, "error": t.error_text,
            "cause": t.cause, "owner": t.owner, "retries_left": t.retries_left,
            "resources": dict(t.res)}


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
