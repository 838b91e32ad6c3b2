"""The serve controller: a detached actor holding no CPU that owns the
target state (applications, their deployments and configs) and reconciles
the running state towards it every tick: replicas are actors, started with
the deployment's resources, health-checked and replaced when they die or
fail a check; a new version replaces replicas one at a time (start the new
one first when resources allow, else retire an old one first) while the
others serve; autoscaled deployments follow ``AutoscalingPolicy``. Routers
and the proxy learn of changes by long-polling ``listen_for_change``."""
from __future__ import annotations

import asyncio
import logging
import os
import time
import traceback
import uuid
from typing import Any

import flowcore

from .autoscaler import AutoscalingPolicy
from .config import DeploymentConfig, HTTPOptions
from .status_feed import ServeFeed

logger = logging.getLogger("flowcore.serve")

TICK_S = 0.1
MAX_CONSTRUCTOR_FAILURES = 3
PROXY_NAME = "SERVE_PROXY"
PROXY_CHECK_S = 1.0


def _short(err: BaseException) -> str:
    """The first line of an error (tracebacks stay in the replica's log)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _done_error(fut: Any) -> BaseException | None:
    try:
        fut.result(0)
    except BaseException as e:  # noqa: BLE001
        return e
    return None


class _ReplicaState:
    def __init__(self, rid: str, actor: Any, version: str) -> None:
        self.rid = rid
        self.actor = actor
        self.version = version
        self.state = "STARTING"
        self.ready_fut = actor.ready.remote().future()
        self.pid: int | None = None
        self.channel: tuple[str, int] | None = None
        self.hc_fut: Any = None
        self.hc_sent = 0.0
        self.last_hc = time.monotonic()
        self.stop_fut: Any = None
        self.stop_deadline = 0.0
        self.metrics_fut: Any = None


class _DeploymentState:
    def __init__(self, app: str, spec: dict) -> None:
        self.app = app
        self.name: str = spec["name"]
        self.replicas: dict[str, _ReplicaState] = {}
        self.policy: AutoscalingPolicy | None = None
        self.failures = 0
        self.failed = False
        self.message = ""
        self.ever_ready = False
        self.last_metrics = 0.0
        self.queued_at_callers: tuple[float, int] = (0.0, 0)   # (when, how many)
        self.deleting = False
        # set by apply()
        self.config: DeploymentConfig
        self.version: str
        self.target_num: int
        self.apply(spec, initial=True)

    def apply(self, spec: dict, initial: bool = False) -> None:
        cfg: DeploymentConfig = spec["config"]
        new_code = initial or spec["version"] != self.version
        old_user_config = None if initial else self.config.user_config
        self.target = spec["target"]
        self.init_args = spec["args"]
        self.init_kwargs = spec["kwargs"]
        self.methods = spec.get("methods")
        self.config = cfg
        self.version = spec["version"]
        if cfg.autoscaling_config is not None:
            if self.policy is None or self.policy.config != cfg.autoscaling_config:
                self.policy = AutoscalingPolicy(cfg.autoscaling_config)
                self.target_num = cfg.initial_replicas() if new_code else \
                    max(cfg.autoscaling_config.min_replicas,
                        min(self.target_num, cfg.autoscaling_config.max_replicas))
        else:
            self.policy = None
            self.target_num = cfg.num_replicas
        if new_code:
            self.failures, self.failed, self.message, self.ever_ready = 0, False, "", False
        elif cfg.user_config != old_user_config:
            for r in self.replicas.values():
                if r.state != "STOPPING":
                    r.actor.reconfigure.remote(cfg.user_config)

    def live(self) -> list[_ReplicaState]:
        return [r for r in self.replicas.values() if r.state != "STOPPING"]

    def running(self) -> list[_ReplicaState]:
        return [r for r in self.replicas.values() if r.state == "RUNNING"]

    def status(self) -> str:
        if self.failed:
            return "DEPLOY_FAILED"
        live = self.live()
        new_running = [r for r in live if r.state == "RUNNING" and r.version == self.version]
        settled = len(new_running) == self.target_num and len(live) == self.target_num
        if settled:
            self.ever_ready = True
            return "HEALTHY"
        if self.ever_ready and self.policy is not None:
            return "UPSCALING" if len(new_running) < self.target_num else "DOWNSCALING"
        return "UPDATING"

    def snapshot(self, version: int) -> dict:
        return {"version": version,
                "replicas": [(r.rid, r.actor, r.channel) for r in self.running()],
                "max_ongoing_requests": self.config.max_ongoing_requests,
                "max_queued_requests": self.config.max_queued_requests,
                "methods": self.methods}


class _AppState:
    def __init__(self, name: str, route_prefix: str | None, ingress: str) -> None:
        self.name = name
        self.route_prefix = route_prefix
        self.ingress = ingress
        self.deployments: dict[str, _DeploymentState] = {}
        self.deleting = False
        self.last_deployed_time_s = time.time()


def create_proxy(opts: HTTPOptions, port: int, channel_secret: bytes) -> Any:
    """Start the HTTP proxy actor (not waiting for it)."""
    from .proxy import ProxyActor
    return flowcore.remote(ProxyActor).options(
        name=PROXY_NAME, namespace="serve", lifetime="detached", num_cpus=0,
        max_concurrency=4).remote(opts.host, port, opts.max_body_size,
                                  opts.request_timeout_s, opts.root_path, channel_secret,
                                  opts.keep_alive_timeout_s)


class ServeController:
    """The detached controller actor (``SERVE_CONTROLLER`` in namespace
    ``serve``)."""

    def __init__(self, http_options: dict, channel_secret: bytes | None = None) -> None:
        self.http_options = HTTPOptions.build(http_options)
        self.apps: dict[str, _AppState] = {}
        self.versions: dict[str, int] = {}
        self.counter = 0
        self.proxy: Any = None
        self.proxy_info: dict | None = None
        self._changed: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._resources_cache: tuple[float, dict] = (0.0, {})
        self._proxy_check: Any = None
        self._proxy_checked = 0.0
        self._proxy_restarting = False
        # authenticates the proxy to the replicas' HTTP channels
        self.channel_secret = channel_secret or os.urandom(32)
        self.feed = ServeFeed()  # the dashboard's Serve tab
        #: deleted deployments whose replicas drain after a new deployment took
        #: their name
        self.draining: list[_DeploymentState] = []

    # ------------------------------------------------------------ plumbing
    def _ensure_loop(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def _bump(self, key: str) -> None:
        self.counter += 1
        self.versions[key] = self.counter
        self._notify()

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _snapshot(self, key: str) -> dict:
        version = self.versions.get(key, 0)
        if key == "routes":
            return {"version": version, "routes": self._routes()}
        app, _, dep = key.partition(":")[2].partition("#")
        a = self.apps.get(app)
        ds = a.deployments.get(dep) if a is not None else None
        if ds is None:
            return {"version": version, "missing": True}
        if ds.deleting:
            return {"version": version, "missing": True,
                    "reason": f"application {app!r} is being deleted"}
        snap = ds.snapshot(version)
        snap["channel_secret"] = self.channel_secret
        return snap

    def _routes(self) -> dict:
        return {a.route_prefix: (a.name, a.ingress) for a in self.apps.values()
                if a.route_prefix is not None and not a.deleting}

    # ------------------------------------------------------------ API
    async def ping(self) -> bool:
        self._ensure_loop()
        return True

    async def start_http(self) -> dict:
        """Start the HTTP proxy once; its address."""
        self._ensure_loop()
        if self.proxy_info is not None:
            return self.proxy_info
        try:     # serve.start() started it beside this controller
            self.proxy = flowcore.get_actor(PROXY_NAME, namespace="serve")
        except ValueError:
            self.proxy_info = await self._start_proxy(self.http_options.port)
            return self.proxy_info
        try:
            self.proxy_info = await self.proxy.ready.remote()
        except Exception as e:
            self.proxy = None
            opts = self.http_options
            raise RuntimeError(f"the serve HTTP proxy could not start on "
                               f"{opts.host}:{opts.port}: {e}") from None
        return self.proxy_info

    async def _start_proxy(self, port: int) -> dict:
        self.proxy = create_proxy(self.http_options, port, self.channel_secret)
        try:
            return await self.proxy.ready.remote()
        except Exception as e:
            self.proxy = None
            raise RuntimeError(f"the serve HTTP proxy could not start on "
                               f"{self.http_options.host}:{port}: {e}") from None

    async def _restart_proxy(self) -> None:
        """The proxy died: start another on the same address."""
        assert self.proxy_info is not None
        port = self.proxy_info["port"]
        delay = 0.1
        while not self._stopping:
            try:
                flowcore.get_actor(PROXY_NAME, namespace="serve")
                await asyncio.sleep(0.05)      # the dead one still holds the name
                continue
            except ValueError:
                pass
            try:
                self.proxy_info = await self._start_proxy(port)
                logger.warning("serve: the HTTP proxy died and was restarted on port %d", port)
                self._proxy_restarting = False
                return
            except Exception as e:  # noqa: BLE001
                logger.warning("serve: restarting the HTTP proxy failed: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _check_proxy(self, now: float) -> None:
        if self.proxy is None or self.proxy_info is None or self._proxy_restarting:
            return
        if self._proxy_check is None:
            if now - self._proxy_checked >= PROXY_CHECK_S:
                self._proxy_check = self.proxy.ready.remote().future()
                self._proxy_checked = now
        elif self._proxy_check.done():
            err = _done_error(self._proxy_check)
            self._proxy_check = None
            if err is not None:
                logger.warning("serve: the HTTP proxy failed its check: %s", _short(err))
                self._proxy_restarting = True
                asyncio.ensure_future(self._restart_proxy())

    async def get_http_info(self) -> dict | None:
        return self.proxy_info

    async def listen_for_change(self, key: str, known_version: int,
                                timeout_s: float = 30.0) -> dict | None:
        """The snapshot of ``key`` once its version differs from
        ``known_version``; None after ``timeout_s`` without change."""
        self._ensure_loop()
        deadline = time.monotonic() + timeout_s
        while self.versions.get(key, 0) == known_version and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ev = self._changed
            assert ev is not None
            try:
                await asyncio.wait_for(ev.wait(), left)
            except asyncio.TimeoutError:
                return None
        return self._snapshot(key)

    async def deploy_application(self, name: str, route_prefix: str | None,
                                 specs: list[dict]) -> None:
        self._ensure_loop()
        if route_prefix is not None:
            for other in self.apps.values():
                if other.name != name and other.route_prefix == route_prefix and \
                        not other.deleting:
                    raise ValueError(
                        f"route_prefix {route_prefix!r} is already used by application "
                        f"{other.name!r}; choose another route_prefix or serve.delete("
                        f"{other.name!r}) first")
        ingress = [s["name"] for s in specs if s["ingress"]][0]
        app = self.apps.get(name)
        if app is None or app.deleting:
            if app is not None:   # deployed again while draining: the old ones drain on
                self.draining.extend(app.deployments.values())
            app = self.apps[name] = _AppState(name, route_prefix, ingress)
        app.route_prefix, app.ingress = route_prefix, ingress
        app.last_deployed_time_s = time.time()
        wanted = {s["name"] for s in specs}
        for dname, old in list(app.deployments.items()):
            if dname not in wanted:
                old.deleting = True
                old.target_num = 0
        for s in specs:
            ds = app.deployments.get(s["name"])
            if ds is None or ds.deleting:
                if ds is not None:
                    self.draining.append(ds)
                app.deployments[s["name"]] = _DeploymentState(name, s)
            else:
                ds.apply(s)
            self._bump(f"replicas:{name}#{s['name']}")
        self._bump("routes")
        self._kick()

    async def wait_for_app(self, name: str, timeout_s: float) -> dict:
        """Wait until the application is RUNNING or failed; its status, with
        ``ingress_replicas_version``: the version of the ingress deployment's
        replica set that callers must have seen to route to its replicas."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self._app_status(name)
            if st.get("ingress") is not None:
                st["ingress_replicas_version"] = self.versions.get(
                    f"replicas:{name}#{st['ingress']}", 0)
            if st["status"] in ("RUNNING", "DEPLOY_FAILED", "NOT_STARTED"):
                return st
            left = deadline - time.monotonic()
            if left <= 0:
                return st
            ev = self._changed
            assert ev is not None
            try:
                await asyncio.wait_for(ev.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    async def delete_application(self, name: str, timeout_s: float = 60.0) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        app.deleting = True
        for ds in app.deployments.values():
            ds.deleting = True
            ds.target_num = 0
        self._bump("routes")
        self._kick()
        deadline = time.monotonic() + timeout_s
        while name in self.apps and time.monotonic() < deadline:
            ev = self._changed
            assert ev is not None
            try:
                await asyncio.wait_for(ev.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def report_dead_replica(self, app: str, dep: str, rid: str) -> None:
        a = self.apps.get(app)
        ds = a.deployments.get(dep) if a else None
        r = ds.replicas.get(rid) if ds else None
        if ds is not None and r is not None and r.state == "RUNNING":
            # confirm with a health check before dropping it
            r.hc_fut = r.actor.check_health.remote().future()
            r.hc_sent = time.monotonic() - max(0.0, ds.config.health_check_timeout_s - 2.0)
            self._kick()

    async def record_queued(self, app: str, dep: str, queued: int) -> None:
        """A caller holds ``queued`` requests for a deployment that has no
        replica (scaled to zero)."""
        a = self.apps.get(app)
        ds = a.deployments.get(dep) if a else None
        if ds is not None:
            ds.queued_at_callers = (time.monotonic(), int(queued))
            self._kick()

    async def get_status(self) -> dict:
        return {"applications": {n: self._app_status(n) for n in self.apps},
                "proxy": self.proxy_info}

    async def list_replicas(self) -> list[dict]:
        out = []
        for a in self.apps.values():
            for ds in a.deployments.values():
                for r in ds.replicas.values():
                    out.append({"app": a.name, "deployment": ds.name, "replica_id": r.rid,
                                "state": r.state, "pid": r.pid, "version": r.version,
                                "actor": r.actor})
        return out

    async def shutdown(self) -> None:
        """Stop every replica and the proxy (no draining)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        for ds in [d for a in self.apps.values() for d in a.deployments.values()] + \
                self.draining:
            for r in ds.replicas.values():
                self._kill(r)
        self.apps.clear()
        self.draining.clear()
        self.feed.clear()
        if self.proxy is not None:
            try:
                flowcore.kill(self.proxy)
            except Exception:  # noqa: BLE001
                pass
            self.proxy = None
            self.proxy_info = None
        if self._changed is not None:
            self._notify()

    # ------------------------------------------------------------ status
    def _app_status(self, name: str) -> dict:
        a = self.apps.get(name)
        if a is None:
            return {"status": "NOT_STARTED", "message": "", "deployments": {},
                    "route_prefix": None, "last_deployed_time_s": 0.0}
        deps = {}
        for ds in a.deployments.values():
            if ds.deleting and not a.deleting:
                continue
            counts: dict[str, int] = {}
            for r in ds.replicas.values():
                counts[r.state] = counts.get(r.state, 0) + 1
            deps[ds.name] = {"status": ds.status(), "replica_states": counts,
                             "message": ds.message, "target_num_replicas": ds.target_num}
        sts = [d["status"] for d in deps.values()]
        if a.deleting:
            status = "DELETING"
        elif "DEPLOY_FAILED" in sts:
            status = "DEPLOY_FAILED"
        elif all(a.deployments[d].ever_ready for d in deps):
            status = "RUNNING"
        else:
            status = "DEPLOYING"
        msg = "; ".join(f"{n}: {d['message']}" for n, d in deps.items() if d["message"])
        return {"status": status, "message": msg, "deployments": deps,
                "route_prefix": a.route_prefix, "ingress": a.ingress,
                "last_deployed_time_s": a.last_deployed_time_s}

    # ------------------------------------------------------------ reconcile
    async def _run(self) -> None:
        while not self._stopping:
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - keep reconciling
                logger.error("serve controller tick failed:\n%s", traceback.format_exc())
            assert self._wake is not None
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _tick(self) -> None:
        now = time.monotonic()
        self._check_proxy(now)
        self.feed.tick(self, now)
        for a in list(self.apps.values()):
            for ds in list(a.deployments.values()):
                before = (ds.status(), tuple(sorted((r.rid, r.state)
                                                    for r in ds.replicas.values())))
                replicas_changed = self._reconcile(ds, now)
                after = (ds.status(), tuple(sorted((r.rid, r.state)
                                                   for r in ds.replicas.values())))
                if replicas_changed:
                    self._bump(f"replicas:{a.name}#{ds.name}")
                elif before != after:
                    self._notify()
                if ds.deleting and not ds.replicas:
                    del a.deployments[ds.name]
                    self._bump(f"replicas:{a.name}#{ds.name}")
            if a.deleting and not a.deployments:
                del self.apps[a.name]
                self._bump("routes")
        for ds in list(self.draining):
            self._reconcile(ds, now)
            if not ds.replicas:
                self.draining.remove(ds)

    def _kill(self, r: _ReplicaState) -> None:
        try:
            flowcore.kill(r.actor)
        except Exception:  # noqa: BLE001
            pass

    def _fits(self, cfg: DeploymentConfig) -> bool:
        t, avail = self._resources_cache
        if time.monotonic() - t > 0.2:
            try:
                avail = flowcore.available_resources()
            except Exception:  # noqa: BLE001
                avail = {}
            self._resources_cache = (time.monotonic(), avail)
        opts = cfg.actor_options()
        need = {"CPU": opts.get("num_cpus") or 0, "GPU": opts.get("num_gpus") or 0}
        need.update(opts.get("resources") or {})
        return all(avail.get(k, 0.0) >= v for k, v in need.items() if v)

    def _start_replica(self, ds: _DeploymentState) -> None:
        from .replica import Replica
        rid = f"{ds.name}#{uuid.uuid4().hex[:8]}"
        opts = ds.config.actor_options()
        # named as in Ray, so flowcore.state.list_actors() tells replicas apart
        opts.update(name=f"SERVE_REPLICA::{ds.app}#{rid}", namespace="serve")
        actor = flowcore.remote(Replica).options(**opts).remote(
            ds.app, ds.name, rid, ds.target, ds.init_args, ds.init_kwargs,
            ds.config.user_config, ds.config.max_ongoing_requests, self.channel_secret)
        r = ds.replicas[rid] = _ReplicaState(rid, actor, ds.version)
        self._resources_cache = (0.0, {})
        # reconcile as soon as it is ready, not at the next tick
        loop = asyncio.get_running_loop()

        def ready(_f: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._kick)
        r.ready_fut.add_done_callback(ready)

    def _stop_replica(self, ds: _DeploymentState, r: _ReplicaState, now: float) -> None:
        r.state = "STOPPING"
        cfg = ds.config
        # drained also when its application is deleted: requests in flight
        # finish (up to graceful_shutdown_timeout_s), no new one arrives
        r.stop_fut = r.actor.prepare_for_shutdown.remote(
            cfg.graceful_shutdown_wait_loop_s, cfg.graceful_shutdown_timeout_s).future()
        r.stop_deadline = now + cfg.graceful_shutdown_timeout_s + 5.0

    def _reconcile(self, ds: _DeploymentState, now: float) -> bool:
        """One step towards the target; True when the running set changed."""
        changed = False
        cfg = ds.config
        # starting replicas that became ready (or failed in the constructor)
        for r in list(ds.replicas.values()):
            if r.state == "STARTING" and r.ready_fut.done():
                err = _done_error(r.ready_fut)
                if err is None:
                    info = r.ready_fut.result()
                    r.state, r.pid, r.last_hc = "RUNNING", info["pid"], now
                    r.channel = info.get("channel")
                    if r.version == ds.version:
                        ds.failures = 0
                    changed = True
                else:
                    ds.replicas.pop(r.rid)
                    self._kill(r)
                    ds.failures += 1
                    ds.message = f"a replica failed to start: {err}"
                    logger.warning("deployment %s: %s", ds.name, ds.message)
                    # as in Ray: max_constructor_retry_count, at most 3 per replica
                    if ds.failures >= min(cfg.max_constructor_retry_count,
                                          max(1, ds.target_num) * MAX_CONSTRUCTOR_FAILURES):
                        ds.failed = True
            elif r.state == "RUNNING":
                # health checks, and replicas found dead
                if r.hc_fut is None:
                    if now - r.last_hc >= cfg.health_check_period_s:
                        r.hc_fut = r.actor.check_health.remote().future()
                        r.hc_sent = now
                elif r.hc_fut.done() or now - r.hc_sent > cfg.health_check_timeout_s:
                    err = _done_error(r.hc_fut) if r.hc_fut.done() else TimeoutError(
                        f"no answer in {cfg.health_check_timeout_s} s")
                    r.hc_fut, r.last_hc = None, now
                    if err is not None:
                        logger.warning("replica %s failed its health check (%s); "
                                       "replacing it", r.rid, err)
                        ds.message = f"replica {r.rid} failed its health check: {_short(err)}"
                        ds.replicas.pop(r.rid)
                        self._kill(r)
                        changed = True
            elif r.state == "STOPPING":
                if r.stop_fut is None or r.stop_fut.done() or now >= r.stop_deadline:
                    ds.replicas.pop(r.rid)
                    self._kill(r)
        # autoscaling from replica-reported ongoing requests
        if ds.policy is not None and not ds.deleting:
            running = ds.running()
            when, queued = ds.queued_at_callers
            if queued and not ds.live() and now - when < 2.0:
                # requests wait and no replica exists: start one now
                ds.target_num = max(ds.target_num, 1)
                ds.queued_at_callers = (0.0, 0)
            pending = [r for r in running if r.metrics_fut is not None]
            if pending and all(r.metrics_fut.done() for r in pending):
                total = 0
                for r in pending:
                    if _done_error(r.metrics_fut) is None:
                        total += r.metrics_fut.result()
                    r.metrics_fut = None
                ds.policy.record(now, total)
                ds.target_num = ds.policy.decide(now, ds.target_num)
            interval = ds.policy.config.metrics_interval_s
            if not pending and running and now - ds.last_metrics >= interval:
                ds.last_metrics = now
                for r in running:
                    r.metrics_fut = r.actor.get_num_ongoing.remote().future()
        # move towards target_num replicas of the current version
        live = ds.live()
        new = [r for r in live if r.version == ds.version]
        old = [r for r in live if r.version != ds.version]
        stopping = [r for r in ds.replicas.values() if r.state == "STOPPING"]
        target = 0 if ds.deleting else ds.target_num
        if ds.deleting:
            for r in live:
                self._stop_replica(ds, r, now)
                changed = True
            return changed
        if len(new) < target and not ds.failed:
            if not old:
                for _ in range(target - len(new)):
                    self._start_replica(ds)
            elif len(live) < target or self._fits(cfg):
                self._start_replica(ds)
            elif not stopping:
                victim = old[-1]
                self._stop_replica(ds, victim, now)
                changed = True
        new_running = [r for r in new if r.state == "RUNNING"]
        if old and len(new_running) + len(old) > target and not stopping:
            victim = sorted(old, key=lambda r: r.state == "RUNNING")[0]
            self._stop_replica(ds, victim, now)
            changed = True
        if len(new) > target:
            extra = sorted(new, key=lambda r: r.state == "RUNNING")[:len(new) - target]
            for r in extra:
                self._stop_replica(ds, r, now)
                changed = True
        return changed
