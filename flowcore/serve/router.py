"""Request routing in a calling process: one ``Router`` per deployment
keeps the replica set (long-polled from the controller) and this process's
count of ongoing requests per replica, and picks a replica by the power of
two choices on that count, never past ``max_ongoing_requests``; requests
that find every replica full wait in a queue bounded by
``max_queued_requests`` (``BackPressureError`` beyond it).

All routers of a process share one event loop thread (``router_loop``)."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from typing import Any

import flowcore

from .exceptions import BackPressureError, RayServeException

logger = logging.getLogger("flowcore.serve")

CONTROLLER_NAME = "SERVE_CONTROLLER"
SERVE_NAMESPACE = "serve"

_loop_lock = threading.RLock()
_loop: asyncio.AbstractEventLoop | None = None
_routers: dict[tuple[str, str], "Router"] = {}
_controller: Any = None


def router_loop() -> asyncio.AbstractEventLoop:
    """The process's serve event loop, running in a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop: asyncio.AbstractEventLoop
            try:
                import uvloop
                loop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="flowcore-serve-loop",
                             daemon=True).start()
            _loop = loop
        return _loop


def get_controller() -> Any:
    """The serve controller's actor handle (``RayServeException`` when serve
    is not running)."""
    global _controller
    if _controller is None:
        try:
            _controller = flowcore.get_actor(CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            raise RayServeException(
                "flowcore.serve is not running: call serve.start() or serve.run(app) "
                "first") from None
    return _controller


def reset_process_state() -> None:
    """Forget the controller and every router (after ``serve.shutdown``)."""
    global _controller
    _controller = None
    with _loop_lock:
        routers = list(_routers.values())
        _routers.clear()
    for r in routers:
        r.close()


def get_router(app_name: str, deployment_name: str) -> "Router":
    key = (app_name, deployment_name)
    with _loop_lock:
        r = _routers.get(key)
        if r is None or r.closed:
            r = _routers[key] = Router(app_name, deployment_name)
    return r


class _Replica:
    __slots__ = ("rid", "actor", "ongoing", "channel_addr", "channel")

    def __init__(self, rid: str, actor: Any, channel_addr: Any = None) -> None:
        self.rid = rid
        self.actor = actor
        self.ongoing = 0
        self.channel_addr = tuple(channel_addr) if channel_addr else None
        self.channel: Any = None    # the proxy's HTTP channel to it, made on first use


class Router:
    """Routes one deployment's calls from this process."""

    def __init__(self, app_name: str, deployment_name: str) -> None:
        self.app_name = app_name
        self.deployment_name = deployment_name
        self.key = f"replicas:{app_name}#{deployment_name}"
        self.closed = False
        self.version = -1
        self.methods: set[str] | None = None
        self.max_ongoing = 5
        self.max_queued = -1
        self.error: str | None = None
        #: the replicas' channel secret (None: calls go as actor calls)
        self.secret: bytes | None = None
        #: every known replica listens on a channel
        self.direct = False
        self._lock = threading.Lock()
        self._replicas: dict[str, _Replica] = {}
        self._queued = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._loop = router_loop()
        # calls whose end nobody has seen yet: released when their response
        # is read, or by the sweep once their object is ready
        self._tracked: dict[int, tuple[_Replica, Any, float]] = {}
        self._track_ids = iter(range(1 << 62))
        self._sweeping = False
        self._have_snapshot = threading.Event()
        self._watch = asyncio.run_coroutine_threadsafe(self._watch_replicas(), self._loop)

    # ------------------------------------------------------------ replica set
    async def _watch_replicas(self) -> None:
        delay = 0.05
        while not self.closed:
            try:
                ctrl = get_controller()
                snap = await ctrl.listen_for_change.remote(self.key, self.version)
                delay = 0.05
            except asyncio.CancelledError:
                return
            except Exception as e:  # noqa: BLE001 - the controller went away
                if self.closed:
                    return
                global _controller
                _controller = None       # look it up again (it may have been replaced)
                self.error = f"the serve controller is unreachable: {e}"
                logger.debug("router %s: %s", self.key, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if snap is not None:
                self._apply(snap)

    def _apply(self, snap: dict) -> None:
        with self._lock:
            self.version = snap["version"]
            if snap.get("missing"):
                self.error = (f"no deployment {self.deployment_name!r} in application "
                              f"{self.app_name!r}")
                if snap.get("reason"):
                    self.error += f" ({snap['reason']})"
                self._replicas = {}
            else:
                self.error = None
                self.max_ongoing = snap["max_ongoing_requests"]
                self.max_queued = snap["max_queued_requests"]
                self.methods = set(snap["methods"]) if snap.get("methods") is not None else None
                old = self._replicas
                new: dict[str, _Replica] = {}
                for rid, actor, channel_addr in snap["replicas"]:
                    r = old.get(rid) or _Replica(rid, actor, channel_addr)
                    new[rid] = r
                self._replicas = new
                self.secret = snap.get("channel_secret")
                self.direct = self.secret is not None and \
                    all(r.channel_addr for r in new.values())
        self._have_snapshot.set()
        self._wake_all()

    def wait_for_snapshot(self, timeout: float) -> bool:
        return self._have_snapshot.wait(timeout)

    def fetch_snapshot(self, timeout: float) -> None:
        """Ask the controller for the replica set now, from the calling
        thread (a task's worker answers the long-poll of the serve loop
        only while its task waits in a flowcore call)."""
        snap = flowcore.get(get_controller().listen_for_change.remote(self.key, -1),
                            timeout=timeout)
        if snap is not None and not self._have_snapshot.is_set():
            self._apply(snap)

    def drop_replica(self, rid: str) -> None:
        """A call found the replica dead: stop using it and tell the
        controller so that it is replaced at once."""
        with self._lock:
            gone = self._replicas.pop(rid, None)
        if gone is not None:
            try:
                get_controller().report_dead_replica.remote(self.app_name,
                                                           self.deployment_name, rid)
            except Exception:  # noqa: BLE001 - best effort
                pass

    def close(self) -> None:
        self.closed = True
        self._watch.cancel()
        self._loop.call_soon_threadsafe(self._fail_waiters)
        with self._lock:
            channels = [r.channel for r in self._replicas.values() if r.channel is not None]
        for ch in channels:        # their reader tasks end with the connections
            self._loop.call_soon_threadsafe(ch.close)

    def _fail_waiters(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(RayServeException("flowcore.serve was shut down"))

    def _wake_all(self) -> None:
        def wake() -> None:
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result(None)
        self._loop.call_soon_threadsafe(wake)

    def _wake_one(self) -> None:
        def wake() -> None:
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result(None)
                    return
        self._loop.call_soon_threadsafe(wake)

    # ------------------------------------------------------------ choosing
    def check_method(self, method: str) -> None:
        methods = self.methods
        if methods is not None and method not in methods:
            raise AttributeError(
                f"deployment {self.deployment_name!r} has no method {method!r}; its "
                f"methods: {sorted(methods) or '(none)'}")

    def _choose(self) -> _Replica | None:
        """Power of two choices among replicas below max_ongoing_requests
        (caller holds the lock)."""
        reps = list(self._replicas.values())
        if not reps:
            return None
        limit = self.max_ongoing
        if len(reps) == 1:
            r = reps[0]
            return r if r.ongoing < limit else None
        a, b = random.sample(reps, 2)
        best = a if a.ongoing <= b.ongoing else b
        if best.ongoing < limit:
            return best
        free = [r for r in reps if r.ongoing < limit]
        return min(free, key=lambda r: r.ongoing) if free else None

    def try_acquire(self) -> _Replica | None:
        """A replica with room, counted as having one more request; None
        when every replica is full or none is known yet."""
        with self._lock:
            if self._queued:
                return None  # requests already waiting go first
            r = self._choose()
            if r is not None:
                r.ongoing += 1
            return r

    async def acquire(self) -> _Replica:
        """Wait (on the router loop) for a replica with room."""
        while not self._have_snapshot.is_set():   # a new router: learn the replicas
            if self.closed:
                raise RayServeException("flowcore.serve was shut down")
            await asyncio.sleep(0.002)
        with self._lock:
            r = self._choose() if not self._queued else None
            if r is not None:
                r.ongoing += 1
                return r
            if self.max_queued != -1 and self._queued >= self.max_queued and self._replicas:
                raise BackPressureError(
                    f"request dropped: deployment {self.deployment_name!r} has "
                    f"{self._queued} requests queued (max_queued_requests="
                    f"{self.max_queued}) and every replica holds max_ongoing_requests="
                    f"{self.max_ongoing}")
            self._queued += 1
        last_report = 0.0
        try:
            while True:
                if self.closed:
                    raise RayServeException("flowcore.serve was shut down")
                now = self._loop.time()
                if not self._replicas and now - last_report >= 0.5:
                    # no replica at all (scaled to zero): the controller learns
                    # of the waiting requests from here
                    last_report = now
                    self._report_queued()
                if self.error is not None and self._have_snapshot.is_set() and \
                        self.error.startswith("no deployment"):
                    raise RayServeException(self.error)
                fut = self._loop.create_future()
                self._waiters.append(fut)
                try:
                    await asyncio.wait_for(fut, 1.0)
                except asyncio.TimeoutError:
                    pass
                with self._lock:
                    r = self._choose()
                    if r is not None:
                        r.ongoing += 1
                        return r
        finally:
            with self._lock:
                self._queued -= 1
            if self._queued:
                self._wake_one()

    def track(self, r: _Replica, ref: Any) -> int:
        """Count ``ref``'s call on ``r`` until ``untrack`` or until the sweep
        finds it finished."""
        import time
        with self._lock:
            token = next(self._track_ids)
            self._tracked[token] = (r, ref, time.monotonic())
            start = not self._sweeping
            self._sweeping = True
        if start:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._sweep()))
        return token

    def untrack(self, token: int) -> None:
        with self._lock:
            entry = self._tracked.pop(token, None)
        if entry is not None:
            self.release(entry[0])

    async def _sweep(self) -> None:
        """Release calls that finished without anyone reading them."""
        import time
        while True:
            await asyncio.sleep(0.05)
            with self._lock:
                if not self._tracked or self.closed:
                    self._sweeping = False
                    return
                old = [(t, e) for t, e in self._tracked.items()
                       if time.monotonic() - e[2] > 0.05]
            if not old:
                continue
            try:
                ready, _ = flowcore.wait([e[1] for _, e in old], num_returns=len(old),
                                         timeout=0)
            except Exception:  # noqa: BLE001 - flowcore shut down
                ready = [e[1] for _, e in old]
            done = {id(r) for r in ready}
            for t, e in old:
                if id(e[1]) in done:
                    self.untrack(t)

    def _report_queued(self) -> None:
        try:
            get_controller().record_queued.remote(self.app_name, self.deployment_name,
                                                  self._queued)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def release(self, r: _Replica) -> None:
        with self._lock:
            r.ongoing -= 1
            waiting = self._queued
        if waiting:
            self._wake_one()

    def in_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False
