"""The node's worker-pool decisions, free of IO.

Tasks arrive from the head already placed on this node.  The head may send
a few more than fit right now (pipelining, so a worker that finishes picks
up its next task without a round trip through the head); the pool enforces
the node's resources itself: a task starts only when its resources are free
here and a worker is idle.  A new worker process starts when a task could
start but no worker is idle or starting for it (workers blocked in ``get``
give their CPU back, which is what makes room), up to a cap.  Methods
return actions; the server carries them out.

Placement-group bundles reserved on this node (``reserve_bundle``) are taken
out of the node's free resources; a task carrying ``"bundle"`` counts against
that bundle instead, as the head does.  Once a bundle is released, what was
free in it returns to the node, and its tasks still running give theirs back
to the node when they end.
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
    renv: dict | None = None  # the runtime_env this worker was started with
    # set by its first task: a worker that ran a GPU task runs only GPU tasks,
    # one that ran a CPU-only task never runs a GPU task (CUDA state, as Ray)
    gpu: bool | None = None

    @property
    def env(self) -> str | None:
        return self.renv["key"] if self.renv else None


def _pick(free: list[WorkerInfo], gpu: bool) -> WorkerInfo | None:
    """An idle worker for a task (that needs a GPU or not): one of that kind
    first, else a fresh one; never one of the other kind."""
    for want in (gpu, None):
        for i, w in enumerate(free):
            if w.gpu is want:
                return free.pop(i)
    return None


def _env_of(task: dict) -> str | None:
    renv = task.get("renv")
    return renv["key"] if renv else None


Action = tuple  # ("spawn", wid) | ("run", wid, task) | ("died", task, wid) | ("retire", wid)
#               | ("warn", text) | ("env_failed", task)

_EPS = 1e-9


class WorkerPool:
    def __init__(self, resources: dict[str, float], max_workers: int | None = None,
                 gpu_ids: list[int] | None = None, min_workers: int | None = None):
        self.total = dict(resources)
        self.available = dict(resources)
        cpus = self.total.get("CPU", 0.0)
        self.min_workers = min_workers if min_workers is not None else max(1, math.ceil(cpus))
        self.max_workers = max_workers or max(128, 8 * self.min_workers)
        self.workers: dict[str, WorkerInfo] = {}
        self.queue: deque[dict] = deque()
        self.bundles: dict[str, dict[str, float]] = {}  # key -> what is free in it
        self.free_gpus = list(gpu_ids or [])
        self.warned_cap = False
        self._next = 0
        self.startup_failures = 0
        self.max_startup_failures = 5

    # ------------------------------------------------------------ helpers
    def counts(self) -> dict[str, int]:
        c = {IDLE: 0, BUSY: 0, STARTING: 0, "blocked": 0}
        for w in self.workers.values():
            c[w.state] += 1
            if w.blocked:
                c["blocked"] += 1
        return c

    def _account(self, bundle: str | None) -> dict[str, float]:
        """The free resources a task counts against: its bundle's, or the node's."""
        if bundle:
            b = self.bundles.get(bundle)
            if b is not None:
                return b
        return self.available

    def _fits(self, res: dict[str, float], bundle: str | None = None) -> bool:
        av = self._account(bundle)
        return all(av.get(k, 0.0) >= v - _EPS for k, v in res.items() if v)

    def _take(self, res: dict[str, float], sign: float = -1.0,
              bundle: str | None = None) -> None:
        av = self._account(bundle)
        for k, v in res.items():
            if v:
                av[k] = av.get(k, 0.0) + sign * v

    def reserve_bundle(self, key: str, res: dict[str, float]) -> list[Action]:
        """A placement-group bundle is reserved here: its resources leave the
        node's free pool and are kept for the tasks placed in it."""
        if key in self.bundles:
            return []
        self._take(res)
        self.bundles[key] = {k: float(v) for k, v in res.items() if v}
        return []

    def release_bundle(self, key: str) -> list[Action]:
        free = self.bundles.pop(key, None)
        if free is None:
            return []
        self._take({k: max(v, 0.0) for k, v in free.items()}, +1.0)
        return self._pump()

    def _spawn(self, actions: list[Action], renv: dict | None = None) -> bool:
        if self.startup_failures >= self.max_startup_failures:
            return False
        if len(self.workers) >= self.max_workers:
            c = self.counts()
            if not self.warned_cap:
                self.warned_cap = True
                actions.append(("warn",
                    f"{len(self.queue)} task(s) wait for a worker but the node already runs "
                    f"{len(self.workers)} workers (the cap, max_workers), {c['blocked']} of "
                    f"them blocked in get(); raise max_workers or avoid blocking get() "
                    f"inside tasks"))
            return False
        self._next += 1
        wid = f"w{self._next}"
        self.workers[wid] = WorkerInfo(wid, renv=renv)
        actions.append(("spawn", wid))
        return True

    def startup(self) -> list[Action]:
        actions: list[Action] = []
        for _ in range(self.min_workers):
            self._spawn(actions)
        return actions

    def _pump(self) -> list[Action]:
        actions: list[Action] = []
        if not self.queue:
            return actions
        # workers are dedicated to one runtime_env (None: the plain one), so
        # idle and starting workers are counted per environment
        idle: dict[str | None, list[WorkerInfo]] = {}
        starting: dict[str | None, int] = {}
        for w in self.workers.values():
            if w.state == IDLE:
                idle.setdefault(w.env, []).append(w)
            elif w.state == STARTING:
                starting[w.env] = starting.get(w.env, 0) + 1
        need: dict[str | None, int] = {}
        envs: dict[str | None, dict | None] = {}
        kept: deque[dict] = deque()
        while self.queue:
            task = self.queue.popleft()
            res = task.get("res") or {}
            if not self._fits(res, task.get("bundle")):
                kept.append(task)
                continue
            env = _env_of(task)
            free = idle.get(env)
            w = _pick(free, bool(res.get("GPU"))) if free else None
            if w is not None:
                self._assign(w, task, actions)
            else:
                # it could run now if it had a worker: reserve its resources
                # for it so later tasks do not jump ahead, and count it
                need[env] = need.get(env, 0) + 1
                envs[env] = task.get("renv")
                self._take(res, bundle=task.get("bundle"))
                task["_reserved"] = True
                kept.append(task)
        self.queue = kept
        # idle workers of environments nobody waits for may make way
        spare = [w for ws in idle.values() for w in ws]
        for env, n in need.items():
            for _ in range(n - starting.get(env, 0)):
                if spare and len(self.workers) >= self.min_workers:
                    old = spare.pop()
                    del self.workers[old.wid]
                    actions.append(("retire", old.wid))
                if not self._spawn(actions, envs[env]):
                    break
        # reservations are only for this decision; give them back
        for task in self.queue:
            if task.pop("_reserved", False):
                self._take(task.get("res") or {}, +1.0, task.get("bundle"))
        return actions

    def _assign(self, w: WorkerInfo, task: dict, actions: list[Action]) -> None:
        res = task.get("res") or {}
        self._take(res, bundle=task.get("bundle"))
        ngpu = res.get("GPU", 0) or 0
        if ngpu:
            k = max(1, math.ceil(ngpu))
            w.gpus, self.free_gpus = self.free_gpus[:k], self.free_gpus[k:]
        else:
            w.gpus = []
        task["gpu_ids"] = list(w.gpus)
        if w.gpu is None:
            w.gpu = bool(ngpu)
        w.state = BUSY
        w.task = task
        w.blocked = False
        w.tasks_run += 1
        actions.append(("run", w.wid, task))

    def _release(self, w: WorkerInfo) -> None:
        task = w.task
        if task is not None:
            res = dict(task.get("res") or {})
            if w.blocked and "CPU" in res:
                res.pop("CPU")  # already given back while blocked
            self._take(res, +1.0, task.get("bundle"))
        if w.gpus:
            self.free_gpus = sorted(self.free_gpus + w.gpus)
            w.gpus = []
        w.task, w.blocked = None, False

    def _give_back(self, res: dict[str, float], bundle: str | None = None) -> list[Action]:
        """Resources held outside the pool (by an actor) come back."""
        self._take(res, +1.0, bundle)
        return self._pump()

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

    def worker_idle(self, wid: str, retire: bool = False) -> list[Action]:
        """``wid`` finished its task; with ``retire`` (its function's
        ``max_calls`` was reached) it exits instead of taking more work."""
        w = self.workers.get(wid)
        if w is None:
            return []
        self._release(w)
        if retire:
            del self.workers[wid]
            actions: list[Action] = [("retire", wid)]
            if len(self.workers) < self.min_workers:
                self._spawn(actions)
            actions.extend(self._pump())
            return actions
        w.state = IDLE
        actions = self._pump()
        # shrink back towards the warm pool size when extra workers go idle;
        # this one first, then any that went idle while work was still queued
        if not self.queue:
            spare = [wid] if w.state == IDLE else []
            spare += [x.wid for x in self.workers.values() if x.state == IDLE and x.wid != wid]
            for other in spare:
                if len(self.workers) <= self.min_workers:
                    break
                del self.workers[other]
                actions.append(("retire", other))
        return actions

    def worker_blocked(self, wid: str, blocked: bool) -> list[Action]:
        w = self.workers.get(wid)
        if w is None or w.state != BUSY or w.blocked == blocked or w.task is None:
            return []
        w.blocked = blocked
        cpu = (w.task.get("res") or {}).get("CPU", 0.0)
        if cpu:
            self._take({"CPU": cpu}, +1.0 if blocked else -1.0, w.task.get("bundle"))
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
            task = w.task
            self._release(w)
            actions.append(("died", task, wid))
        if len(self.workers) < self.min_workers:
            self._spawn(actions)
        actions.extend(self._pump())
        return actions

    def env_failed(self, wid: str) -> list[Action]:
        """The runtime_env of starting worker ``wid`` could not be set up:
        drop the worker and fail the queued tasks that need that environment."""
        w = self.workers.pop(wid, None)
        if w is None or w.state != STARTING:
            if w is not None:
                self.workers[wid] = w
            return []
        env = w.env
        actions: list[Action] = []
        kept: deque[dict] = deque()
        for task in self.queue:
            if _env_of(task) == env:
                actions.append(("env_failed", task))
            else:
                kept.append(task)
        self.queue = kept
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
        return {"workers": len(self.workers), "queued": len(self.queue),
                "available": dict(self.available), **self.counts()}
