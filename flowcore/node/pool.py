"""The node's worker-pool decisions, free of IO.

Tasks arrive from the head already placed on this node (the head accounts
resources); the pool decides which worker runs each one and when to start
another worker process.  It starts one when a task is waiting, no worker is
idle or starting for it, and fewer workers are actively running than there
are tasks that need one (workers blocked in ``get`` do not count), up to a
cap.  Methods return actions; the server carries them out.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

IDLE, BUSY, STARTING = "idle", "busy", "starting"


@dataclass
class WorkerInfo:
    wid: str
    state: str = STARTING
    task: dict | None = None
    blocked: bool = False
    pid: int = 0
    gpus: list[int] = field(default_factory=list)
    tasks_run: int = 0


Action = tuple  # ("spawn",) | ("run", wid, task) | ("died", task, wid) | ("warn", text)


class WorkerPool:
    def __init__(self, num_cpus: float, max_workers: int | None = None,
                 gpu_ids: list[int] | None = None, min_workers: int | None = None):
        self.num_cpus = num_cpus
        self.min_workers = min_workers if min_workers is not None else max(1, math.ceil(num_cpus))
        self.max_workers = max_workers or max(32, 4 * self.min_workers)
        self.workers: dict[str, WorkerInfo] = {}
        self.queue: deque[dict] = deque()
        self.free_gpus = list(gpu_ids or [])
        self.warned_cap = False
        self._next = 0
        self.startup_failures = 0
        self.max_startup_failures = 5

    # ------------------------------------------------------------ helpers
    def new_worker_id(self) -> str:
        self._next += 1
        return f"w{self._next}"

    def counts(self) -> dict[str, int]:
        c = {IDLE: 0, BUSY: 0, STARTING: 0, "blocked": 0}
        for w in self.workers.values():
            c[w.state] += 1
            if w.blocked:
                c["blocked"] += 1
        return c

    def _spawn(self, actions: list[Action]) -> None:
        if self.startup_failures >= self.max_startup_failures:
            return
        wid = self.new_worker_id()
        self.workers[wid] = WorkerInfo(wid)
        actions.append(("spawn", wid))

    def startup(self) -> list[Action]:
        actions: list[Action] = []
        for _ in range(self.min_workers):
            self._spawn(actions)
        return actions

    def _pump(self) -> list[Action]:
        actions: list[Action] = []
        while self.queue:
            idle = next((w for w in self.workers.values() if w.state == IDLE), None)
            if idle is None:
                break
            task = self.queue.popleft()
            self._assign(idle, task, actions)
        if self.queue:
            c = self.counts()
            active = c[BUSY] - c["blocked"] + c[STARTING]
            need = len(self.queue) + c[BUSY] - c["blocked"]
            to_start = min(len(self.queue) - c[STARTING], need - active)
            for _ in range(max(0, to_start)):
                if len(self.workers) >= self.max_workers:
                    if not self.warned_cap and c["blocked"]:
                        self.warned_cap = True
                        actions.append(("warn",
                            f"{len(self.queue)} task(s) wait for a worker but the node "
                            f"already runs {len(self.workers)} workers (the cap), "
                            f"{c['blocked']} of them blocked in get(); raise max_workers "
                            f"or avoid blocking get() inside tasks"))
                    break
                self._spawn(actions)
        return actions

    def _assign(self, w: WorkerInfo, task: dict, actions: list[Action]) -> None:
        ngpu = task.get("res", {}).get("GPU", 0) or 0
        if ngpu:
            k = max(1, math.ceil(ngpu))
            w.gpus, self.free_gpus = self.free_gpus[:k], self.free_gpus[k:]
        else:
            w.gpus = []
        task["gpu_ids"] = list(w.gpus)
        w.state = BUSY
        w.task = task
        w.tasks_run += 1
        actions.append(("run", w.wid, task))

    def _release_gpus(self, w: WorkerInfo) -> None:
        if w.gpus:
            self.free_gpus = sorted(self.free_gpus + w.gpus)
            w.gpus = []

    # ------------------------------------------------------------ events
    def task_arrived(self, task: dict) -> list[Action]:
        self.queue.append(task)
        return self._pump()

    def worker_ready(self, wid: str, pid: int) -> list[Action]:
        w = self.workers.get(wid)
        if w is None:
            return []
        w.state = IDLE
        w.pid = pid
        self.startup_failures = 0
        return self._pump()

    def worker_idle(self, wid: str) -> list[Action]:
        w = self.workers.get(wid)
        if w is None:
            return []
        self._release_gpus(w)
        w.state, w.task, w.blocked = IDLE, None, False
        actions = self._pump()
        # shrink back towards the warm pool size when extra workers go idle
        if len(self.workers) > self.min_workers and w.state == IDLE and not self.queue:
            del self.workers[wid]
            actions.append(("retire", wid))
        return actions

    def worker_blocked(self, wid: str, blocked: bool) -> list[Action]:
        w = self.workers.get(wid)
        if w is None or w.state != BUSY:
            return []
        w.blocked = blocked
        return self._pump() if blocked else []

    def worker_died(self, wid: str) -> list[Action]:
        w = self.workers.pop(wid, None)
        if w is None:
            return []
        actions: list[Action] = []
        if w.state == STARTING:
            self.startup_failures += 1
            if self.startup_failures == self.max_startup_failures:
                actions.append(("warn", f"{self.startup_failures} worker processes in a row "
                                "died before registering; not starting more. See the worker "
                                "logs in the session directory"))
        if w.task is not None:
            self._release_gpus(w)
            actions.append(("died", w.task, wid))
        if len(self.workers) < self.min_workers:
            self._spawn(actions)
        actions.extend(self._pump())
        return actions

    def find_task(self, tid: bytes) -> tuple[str | None, dict | None]:
        for w in self.workers.values():
            if w.task is not None and w.task["tid"] == tid:
                return w.wid, w.task
        for task in self.queue:
            if task["tid"] == tid:
                return None, task
        return None, None

    def drop_queued(self, tid: bytes) -> dict | None:
        for task in list(self.queue):
            if task["tid"] == tid:
                self.queue.remove(task)
                return task
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"workers": len(self.workers), "queued": len(self.queue), **self.counts()}
