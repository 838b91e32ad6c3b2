"""The node's worker-pool decisions, free of IO.

Tasks arrive from the head already placed on this node.  The head may send
a few more than fit right now (pipelining, so a worker that finishes picks
up its next task without a round trip through the head); the pool enforces
the node's resources itself: a task starts only when its resources are free
here and a worker is idle.  A new worker process starts when a task could
start but no worker is idle or starting for it (workers blocked in ``get``
give their CPU back, which is what makes room), up to a cap.  Methods
return actions; the server carries them out.

Nested work (tasks blocked in ``get`` on tasks they submitted, as in a
recursive ``fib``) makes a worker process per blocked parent.  While any
worker is blocked the pool gets ahead of that: it keeps ``spare_workers``
(0 here by default; the node keeps 2) forked and idle beyond the work it
has, so a blocked parent's child starts in a process that is already
there, and with ``idle_grace`` (0 here by default: retired at once; the
node's is 1 s) it keeps workers that go idle instead of retiring them at
once (the next child would fork another): idle workers beyond the warm
pool retire once idle that long (``reap``).  Once no worker is blocked
any more they retire at once, unless ``warm_grace`` is set (0 here by
default; the node's is 1 s): then up to ``spare_workers`` extra idle
workers stay that long, so the next burst (the driver's right after a
nested one, or the next nested one) is leased workers that are already
there instead of waiting for forks; ``spawned`` counts every fork.

Resource amounts are ``flowcore.resources.Resources`` accounts (the node's
free resources, each bundle's free share).  The pool also owns the node's
actors' books: each actor runs in a process of its own outside the pool's
workers, and holds its resources and GPU ids (``ActorInfo``) from
``start_actor`` until its process is gone (``actor_exited``); GPU ids are
handed out here only.

Placement-group bundles reserved on this node (``reserve_bundle``) are taken
out of the node's free resources; a task carrying ``"bundle"`` counts against
that bundle instead, as the head does.  Once a bundle is released, what was
free in it returns to the node, and its tasks still running give theirs back
to the node when they end.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..resources import EPS, Resources

IDLE, BUSY, STARTING = "idle", "busy", "starting"


@dataclass
class WorkerInfo:
    wid: str
    state: str = STARTING
    task: dict | None = None
    blocked: bool = False
    pid: int = 0
    gpus: list[int] = field(default_factory=list)
    gpu_grant: dict[int, float] = field(default_factory=dict)  # id -> share of it
    tasks_run: int = 0
    renv: dict | None = None  # the runtime_env this worker was started with
    # set by its first task: a worker that ran a GPU task runs only GPU tasks,
    # one that ran a CPU-only task never runs a GPU task (CUDA state, as Ray)
    gpu: bool | None = None
    idle_since: float = 0.0  # (monotonic) when it last went idle

    @property
    def env(self) -> str | None:
        return self.renv["key"] if self.renv else None


class GpuIds:
    """The node's GPU ids and how much of each is in use.

    A request below one GPU shares an id: it goes to the most used id it
    still fits on (so whole GPUs stay free for whole requests), and two
    0.5-GPU tasks get the same id.  A request of n GPUs takes n whole ids; a
    fractional rest (1.5) shares one more id.  A grant is ``{id: share}``."""

    def __init__(self, ids: list[int]):
        self.free: dict[int, float] = {i: 1.0 for i in ids}  # id -> share not in use

    def whole(self) -> list[int]:
        """The ids nobody uses, in order."""
        return sorted(i for i, f in self.free.items() if f >= 1.0 - EPS)

    def can_grant(self, amount: float) -> bool:
        """Whether ``grant(amount)`` would succeed now (changes nothing)."""
        if not self.free:
            return True
        n = int(amount + EPS)
        rest = amount - n
        whole, part = 0, False
        for f in self.free.values():
            if f >= 1.0 - EPS:
                whole += 1
            elif rest > EPS and f >= rest - EPS:
                part = True
        if whole < n:
            return False
        return rest <= EPS or part or whole > n

    def grant(self, amount: float, partial: bool = False) -> dict[int, float] | None:
        """Take ids for ``amount`` GPUs and return them, or None when they are
        not free (with ``partial``: as much of them as is free)."""
        if not amount or not self.free:
            return {}
        n = int(amount + EPS)
        rest = amount - n
        got: dict[int, float] = {}
        if n:
            for i in self.whole()[:n]:
                got[i] = 1.0
            if len(got) < n and not partial:
                return None
        if rest > EPS:
            best = None  # (free share, id): the most used id the rest fits on
            for i, f in self.free.items():
                if f >= rest - EPS and i not in got and (best is None or (f, i) < best):
                    best = (f, i)
            if best is not None:
                got[best[1]] = rest
            elif not partial:
                return None
        for i, share in got.items():
            self.free[i] -= share
        return got

    def give(self, grant: dict[int, float]) -> None:
        for i, share in grant.items():
            self.free[i] += share


@dataclass
class ActorInfo:
    """An actor living on this node and what it holds for its life."""
    aid: bytes
    wid: str                 # its current process
    spec: dict               # the start message, sent to the process when it connects
    hold: dict[str, float] = field(default_factory=dict)
    bundle: str | None = None  # the placement-group bundle its hold counts against
    gpu_grant: dict[int, float] = field(default_factory=dict)

    @property
    def gpus(self) -> list[int]:
        return sorted(self.gpu_grant)


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


class WorkerPool:
    def __init__(self, resources: dict[str, float], max_workers: int | None = None,
                 gpu_ids: list[int] | None = None, min_workers: int | None = None,
                 spare_workers: int = 0, idle_grace: float = 0.0, warm_grace: float = 0.0):
        if spare_workers < 0 or idle_grace < 0 or warm_grace < 0:
            raise ValueError(f"spare_workers ({spare_workers}), idle_grace ({idle_grace}) and "
                             f"warm_grace ({warm_grace}) must be >= 0")
        #: idle plain workers kept ready beyond the queued work while a worker
        #: is blocked in get (nested tasks); bounded by max_workers too
        self.spare_workers = spare_workers
        #: seconds an extra idle worker stays while nested work goes on
        self.idle_grace = idle_grace
        #: seconds up to spare_workers extra idle workers stay once nothing
        #: is blocked (0: they retire at once)
        self.warm_grace = warm_grace
        self.spawned = 0  # worker processes started, ever (for views and tests)
        self.clock = time.monotonic  # (tests replace it)
        self.total = Resources(resources)
        self.available = Resources(resources)
        cpus = self.total.get("CPU", 0.0)
        self.min_workers = min_workers if min_workers is not None else max(1, math.ceil(cpus))
        self.max_workers = max_workers or max(128, 8 * self.min_workers)
        self.workers: dict[str, WorkerInfo] = {}
        self.queue: deque[dict] = deque()
        self.bundles: dict[str, Resources] = {}  # key -> what is free in it
        if gpu_ids is None:
            gpu_ids = list(range(int(self.total.get("GPU", 0.0) + EPS)))
        self.gpu_ids = GpuIds(gpu_ids)
        # actors: each runs in a process of its own, outside the pool's workers
        self.actors: dict[bytes, ActorInfo] = {}        # actor id -> its current process
        self.actor_workers: dict[str, bytes] = {}       # every actor process's wid -> actor id
        self.actor_backlog: dict[bytes, list[dict]] = {}  # calls before its process connects
        self.warned_cap = False
        self._next = 0
        self.startup_failures = 0
        self.max_startup_failures = 5

    # ------------------------------------------------------------ helpers
    @property
    def free_gpus(self) -> list[int]:
        """The GPU ids no task or actor uses (not even a share of)."""
        return self.gpu_ids.whole()

    def counts(self) -> dict[str, int]:
        c = {IDLE: 0, BUSY: 0, STARTING: 0, "blocked": 0}
        for w in self.workers.values():
            c[w.state] += 1
            if w.blocked:
                c["blocked"] += 1
        return c

    def _blocked(self) -> int:
        return sum(1 for w in self.workers.values() if w.blocked)

    def _account(self, bundle: str | None) -> Resources:
        """The free resources a task counts against: its bundle's, or the node's."""
        if bundle:
            b = self.bundles.get(bundle)
            if b is not None:
                return b
        return self.available

    def fits(self, res: Mapping[str, float], bundle: str | None = None) -> bool:
        """Whether ``res`` is free now in ``bundle``'s share, or the node's,
        and GPU ids for its GPUs are too."""
        if not self._account(bundle).fits(res):
            return False
        gpu = res.get("GPU")
        return not gpu or self.gpu_ids.can_grant(gpu)

    def reserve_bundle(self, key: str, res: dict[str, float]) -> list[Action]:
        """A placement-group bundle is reserved here: its resources leave the
        node's free pool and are kept for the tasks placed in it."""
        if key in self.bundles:
            return []
        self.available.take(res)
        self.bundles[key] = Resources({k: float(v) for k, v in res.items() if v})
        return []

    def release_bundle(self, key: str) -> list[Action]:
        free = self.bundles.pop(key, None)
        if free is None:
            return []
        self.available.give({k: max(v, 0.0) for k, v in free.items()})
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
        self.spawned += 1
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
            if not self.fits(res, task.get("bundle")):
                kept.append(task)
                continue
            env = _env_of(task)
            free = idle.get(env)
            picked = _pick(free, bool(res.get("GPU"))) if free else None
            if picked is not None:
                self._assign(picked, task, actions)
            else:
                # it could run now if it had a worker: reserve its resources
                # for it so later tasks do not jump ahead, and count it
                need[env] = need.get(env, 0) + 1
                envs[env] = task.get("renv")
                self._account(task.get("bundle")).take(res)
                task["_reserved"] = self.gpu_ids.grant(res.get("GPU", 0.0), partial=True)
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
            reserved = task.pop("_reserved", None)
            if reserved is not None:
                self._account(task.get("bundle")).give(task.get("res") or {})
                self.gpu_ids.give(reserved)
        return actions

    def _assign(self, w: WorkerInfo, task: dict, actions: list[Action]) -> None:
        res = task.get("res") or {}
        self._account(task.get("bundle")).take(res)
        ngpu = res.get("GPU", 0) or 0
        if ngpu:
            w.gpu_grant = self.gpu_ids.grant(ngpu, partial=True) or {}
            w.gpus = sorted(w.gpu_grant)
            task["gpu_ids"] = list(w.gpus)
        else:
            task["gpu_ids"] = []
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
            self._account(task.get("bundle")).give(res)
        if w.gpu_grant:
            self.gpu_ids.give(w.gpu_grant)
            w.gpu_grant, w.gpus = {}, []
        w.task, w.blocked = None, False

    # ------------------------------------------------------------ events
    def task_arrived(self, task: dict) -> list[Action]:
        self.queue.append(task)
        return self._pump()

    def worker_ready(self, wid: str, pid: int) -> list[Action]:
        w = self.workers.get(wid)
        if w is None:
            return []
        w.state = IDLE
        w.idle_since = self.clock()
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
        w.idle_since = self.clock()
        actions = self._pump()
        # shrink back towards the warm pool size when extra workers go idle;
        # this one first, then any that went idle while work was still queued.
        # Workers blocked in get() are not part of the warm pool: the ones
        # running their children stay (a task submitting from inside a task
        # would otherwise start a process per child).  While some worker is
        # blocked, more children are likely to come (the head holds them
        # until a CPU frees): idle workers stay for idle_grace (see reap).
        # Nothing blocked: up to spare_workers extra idle ones stay for
        # warm_grace (the next burst's leases find them), the rest go now
        if not self.queue and not (self.idle_grace and self._blocked()):
            self._shrink(actions, [wid] if w.state == IDLE else [], 0.0, self._warm_extra())
        return actions

    def _warm_extra(self) -> int:
        """Idle workers beyond the warm pool kept for warm_grace once
        nothing is blocked."""
        return self.spare_workers if self.warm_grace else 0

    def _shrink(self, actions: list[Action], first: list[str], idle_for: float,
                extra: int = 0) -> None:
        """Retire idle workers (``first``, then any idle for ``idle_for``
        seconds or more) down to the warm pool size plus ``extra``, not
        counting workers blocked in get."""
        now = self.clock()
        spare = first + [x.wid for x in self.workers.values() if x.state == IDLE
                         and x.wid not in first and now - x.idle_since >= idle_for]
        blocked = self._blocked() if spare else 0
        for other in spare:
            if len(self.workers) - blocked <= self.min_workers + extra:
                break
            del self.workers[other]
            actions.append(("retire", other))

    def reap(self) -> tuple[list[Action], float | None]:
        """Retire the extra idle workers that have been idle for idle_grace
        while a worker is blocked, else for warm_grace (beyond
        spare_workers of them: at once).  Returns the actions and how many
        seconds from now to call again (None: nothing to reap)."""
        actions: list[Action] = []
        if self.queue:
            return actions, None
        if self._blocked():
            grace = self.idle_grace
        else:
            grace = self.warm_grace
            self._shrink(actions, [], 0.0, self._warm_extra())
        self._shrink(actions, [], grace)
        idle = [x for x in self.workers.values() if x.state == IDLE]
        if not idle or len(self.workers) - self._blocked() <= self.min_workers:
            return actions, None
        oldest = min(x.idle_since for x in idle)
        return actions, max(0.0, oldest + grace - self.clock())

    def worker_blocked(self, wid: str, blocked: bool) -> list[Action]:
        w = self.workers.get(wid)
        if w is None or w.state != BUSY or w.blocked == blocked or w.task is None:
            return []
        w.blocked = blocked
        cpu = (w.task.get("res") or {}).get("CPU", 0.0)
        if cpu:
            account = self._account(w.task.get("bundle"))
            if blocked:
                account.give({"CPU": cpu})
            else:
                account.take({"CPU": cpu})
        if not blocked:
            return []
        actions = self._pump()
        self._top_up_spares(actions)
        return actions

    def _top_up_spares(self, actions: list[Action]) -> None:
        """Fork plain workers until ``spare_workers`` of them are idle or
        starting beyond what the queued tasks wait for."""
        if not self.spare_workers:
            return
        ready = sum(1 for w in self.workers.values() if w.state in (IDLE, STARTING)
                    and w.renv is None and w.gpu is not True)
        for _ in range(self.spare_workers + len(self.queue) - ready):
            # (at the cap no spare: the cap's warning is for tasks that wait)
            if len(self.workers) >= self.max_workers or not self._spawn(actions):
                break

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

    # ------------------------------------------------------------ actors
    def start_actor(self, aid: bytes, spec: dict) -> tuple[str, str | None]:
        """Actor ``aid`` is to start here (``spec``: the head's ``start_actor``
        message).  Its held resources (``spec["hold"]``) and GPU ids are taken
        for the actor's life, also across restarts of its process; the ids go
        into ``spec["gpu_ids"]``.  Returns the new process's worker id and the
        worker id of the actor's previous process (None if none), which must
        be gone before the new one starts."""
        self._next += 1
        wid = f"a{self._next}"
        a = self.actors.get(aid)
        old = a.wid if a is not None else None
        if a is None:
            a = self.actors[aid] = ActorInfo(aid, wid, spec)
            hold = spec.get("hold") or {}
            if hold:
                a.hold, a.bundle = dict(hold), spec.get("bundle")
                self._account(a.bundle).take(hold)
                # the head placed it: take what ids there are even if short
                a.gpu_grant = self.gpu_ids.grant(hold.get("GPU", 0.0), partial=True) or {}
        else:  # a restart while the old process is still known here
            a.wid, a.spec = wid, spec
        self.actor_workers[wid] = aid
        spec["gpu_ids"] = list(a.gpus)
        return wid, old

    def actor_of(self, wid: str) -> bytes | None:
        """The actor whose process is ``wid`` (None: a pool worker or unknown)."""
        return self.actor_workers.get(wid)

    def actor_registered(self, wid: str) -> tuple[dict, list[dict]] | None:
        """Actor process ``wid`` connected: the spec it is created from and
        the calls that came for it before (None: ``wid`` is no actor's)."""
        aid = self.actor_workers.get(wid)
        if aid is None:
            return None
        a = self.actors.get(aid)
        spec = dict(a.spec) if a is not None else {}
        return spec, self.actor_backlog.pop(aid, [])

    def defer_call(self, aid: bytes, call: dict) -> None:
        """A call for actor ``aid`` whose process has not connected yet."""
        self.actor_backlog.setdefault(aid, []).append(call)

    def actor_exited(self, wid: str) -> tuple[bytes | None, list[Action]]:
        """Actor process ``wid`` is gone.  Returns the actor's id when it was
        the actor's current process (its resources and GPU ids come back),
        else None (an older process of a restarted actor, or no actor's)."""
        aid = self.actor_workers.pop(wid, None)
        a = self.actors.get(aid) if aid is not None else None
        if a is None or a.wid != wid:
            return None, []
        del self.actors[a.aid]
        self.actor_backlog.pop(a.aid, None)
        self.gpu_ids.give(a.gpu_grant)
        if not a.hold:
            return a.aid, []
        self._account(a.bundle).give(a.hold)
        return a.aid, self._pump()

    # ------------------------------------------------------------ leases
    def grant_lease(self, lease: bytes, res: dict[str, float],
                    env: str | None) -> WorkerInfo | None:
        """An idle worker of runtime_env ``env`` leased to a client for
        tasks of shape ``res`` (no GPU), its resources taken until the lease
        ends (``worker_idle`` with the lease id); None when no worker is idle
        or ``res`` does not fit now, or tasks the head placed here wait."""
        if self.queue or res.get("GPU") or not self.available.fits(res):
            return None
        free = [w for w in self.workers.values() if w.state == IDLE and w.env == env]
        w = _pick(free, False)
        if w is None:
            return None
        self.available.take(res)
        if w.gpu is None:
            w.gpu = False
        w.state, w.task, w.blocked = BUSY, {"tid": lease, "res": dict(res), "lease": lease}, False
        w.tasks_run += 1
        return w

    def starting_for(self, res: dict[str, float], env: str | None) -> bool:
        """Whether a lease request of shape ``res`` declined here will find
        a worker soon: it fits now, nothing the head placed here waits, and
        a plain worker is starting (``lease_declined`` starts one)."""
        return env is None and self.can_fit_now(res) and any(
            w.env is None and w.state == STARTING for w in self.workers.values())

    def can_fit_now(self, res: dict[str, float]) -> bool:
        """Whether ``res`` fits this node's free resources now with nothing
        the head placed here waiting (else a lease request may be sent on)."""
        return not self.queue and not res.get("GPU") and self.available.fits(res)

    def lease_declined(self, res: dict[str, float], env: str | None) -> list[Action]:
        """A lease request of shape ``res`` found no idle plain worker though
        ``res`` fits now and nothing the head placed here waits: start one,
        so that the holder's next request (its tasks wait for it) finds it.
        (Workers die, retire or serve another runtime_env, and only tasks the
        head placed here start new ones otherwise.)"""
        actions: list[Action] = []
        if env is not None or self.queue or res.get("GPU") or not self.available.fits(res):
            return actions
        if any(w.env is None and (w.state == STARTING or (w.state == IDLE and w.gpu is not True))
               for w in self.workers.values()):
            return actions
        self._spawn(actions)
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
                "available": dict(self.available), "spawned": self.spawned, **self.counts()}
