"""The node daemon: a Tornado server owning the worker pool and the
shared-memory object store, connected to the head."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from typing import Any


from .. import ids
from .._version import __version__
from ..private_files import make_private_dir
from ..protocol import messages
from ..protocol.comm import Comm, connect, guarded, serve
from .oom import OomWatch
from ..protocol.tls import TLSConfig, strip_env
from .packages import PackageCache, WorkerSetup
from .leases import NodeLeases
from .pool import WorkerPool
from .procs import WorkerProcess, start_worker
from .transfer import Transfers

logger = logging.getLogger("flowcore.node")

#: the ops a node takes from its head, and on its port from each role
#: (protocol/messages.py); anything else is refused and logged
HEAD_OPS = messages.ops_for(messages.NODE, messages.HEAD)
CLIENT_ROLE_OPS = {role: messages.ops_for(messages.NODE, role)
                   for role in (messages.PEER, messages.DRIVER, messages.WORKER)}


LOCAL_MEMORY = 100_000  # local-first decisions remembered per kind
#: idle workers kept forked ahead while a task is blocked in get (nested tasks)
SPARE_WORKERS = int(os.environ.get("FLOWCORE_SPARE_WORKERS", "2"))
#: seconds an extra idle worker stays while a task is blocked in get
IDLE_GRACE = float(os.environ.get("FLOWCORE_WORKER_IDLE_GRACE", "1.0"))
#: seconds up to FLOWCORE_SPARE_WORKERS extra idle workers stay once no task
#: is blocked any more (the next burst is leased them instead of forking)
WARM_GRACE = float(os.environ.get("FLOWCORE_WORKER_WARM_GRACE", "1.0"))

#: seconds a creation that needs the room of clients' held pins waits for
#: them to be given back (a client busy elsewhere answers late: the object
#: then spills others or goes to disk as it would have)
RELEASE_WAIT = 2.0
#: ... from a worker that may be running a task (it answers once it waits)
BUSY_RELEASE_WAIT = 0.25
#: seconds a large creation that would take arena memory never used before
#: waits for the free of an object its creator just dropped (the head's
#: delete follows the creator's unpin): memory used before costs one copy,
#: fresh memory a page fault per 4 KiB on top (several copies' worth)
FREE_WAIT = float(os.environ.get("FLOWCORE_CREATE_FREE_WAIT_MS", "20")) / 1000
#: ... and all such waits together until fresh memory is taken anyway, at
#: most about what faulting fresh memory in costs (seconds per byte): when
#: the frees come late (a busy head), a put takes the fresh memory once and
#: from then on the two regions of put, drop, put are both warm
FREE_WAIT_BUDGET = 0.3e-3 / (1 << 20)


async def _briefly(fut: "asyncio.Future[dict]", timeout: float) -> None:
    """Wait at most ``timeout`` s for ``fut`` (left running)."""
    try:
        await asyncio.wait_for(asyncio.shield(fut), timeout)
    except (asyncio.TimeoutError, ConnectionError):
        pass


def _remember(table: "OrderedDict[bytes, None]", tid: bytes) -> None:
    table[tid] = None
    if len(table) > LOCAL_MEMORY:
        table.popitem(last=False)



def default_memory() -> int:
    """The node's ``memory`` resource when not given: the machine's available memory."""
    import psutil
    return int(psutil.virtual_memory().available)


def _local_address_towards(host: str) -> str | None:
    """This machine's address on the route to ``host`` (a UDP socket is
    "connected", which sends nothing), or None."""
    if not host:
        return None
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return None

class NodeServer:
    def __init__(self, head_address: str, token: bytes, *, num_cpus: float,
                 num_gpus: int = 0, resources: dict[str, float] | None = None,
                 object_store_memory: int, session_dir: str, host: str = "127.0.0.1",
                 name: str | None = None, max_workers: int | None = None,
                 worker_env: dict[str, str] | None = None, worker_cwd: str | None = None,
                 worker_memory_limit: int | None = None, tls: TLSConfig | None = None,
                 memory: float | None = None, advertise_host: str | None = None):
        from ..objects.store import ObjectStore, sweep_stale_segments

        self.head_address = head_address
        self.token = token
        self.tls = tls  # a protocol.tls.TLSConfig for every link, or None
        self.host = host
        self.advertise_host = advertise_host  # what peers connect to (default: see start)
        self.node_id = "n-" + ids.random_id(6).hex()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.session_dir = session_dir
        self.resources = {"CPU": float(num_cpus), **({"GPU": float(num_gpus)} if num_gpus else {}),
                          **(resources or {})}
        if "memory" not in self.resources:
            # bytes tasks and actors may ask for with memory= (a scheduling
            # quantity, as in Ray): by default what the machine has available
            self.resources["memory"] = float(memory if memory is not None
                                             else default_memory())
        self.pool = WorkerPool(self.resources, max_workers, list(range(num_gpus)),
                               spare_workers=SPARE_WORKERS, idle_grace=IDLE_GRACE,
                               warm_grace=WARM_GRACE)
        self._reap_timer: asyncio.TimerHandle | None = None
        self.leases = NodeLeases(self)
        self.worker_env = worker_env or {}
        self.worker_cwd = worker_cwd
        sweep_stale_segments()
        spill = self.spill_dir = os.path.join(session_dir, f"spill-{self.node_id}")
        make_private_dir(spill)
        self.store = ObjectStore(os.path.basename(session_dir.rstrip("/")) or "session",
                                 self.node_id, object_store_memory, spill)
        self.head: Comm | None = None
        self.clients: dict[str, Comm] = {}
        self._head_ops = self._head_op_table()
        self._client_ops = self._client_op_table()
        self.procs: dict[str, WorkerProcess] = {}
        self.start_method = os.environ.get("FLOWCORE_WORKER_START", "fork")
        self.worker_comms: dict[str, Comm] = {}
        self.pin_waiters: dict[bytes, list[tuple[Comm, dict]]] = {}
        self.creating: set[bytes] = set()
        self._freed: asyncio.Future | None = None  # set when the store frees (see _create)
        self._free_waited = 0.0  # seconds creates waited for frees since fresh memory was taken
        self._deaths: dict[str, tuple[str, int]] = {}
        self.transfers = Transfers(self)
        self.packages = PackageCache(os.path.join(session_dir, "runtime_env"),
                                     self._fetch_package)
        limit = os.environ.get("FLOWCORE_WORKER_MEMORY_LIMIT")
        self.worker_memory_limit = int(limit) if limit else worker_memory_limit
        self._kill_reasons: dict[str, str] = {}
        self._oom = OomWatch()
        # local-first starts decided here (bounded), to answer the head again
        self._local_started: OrderedDict[bytes, None] = OrderedDict()
        self._local_refused: OrderedDict[bytes, None] = OrderedDict()
        self._undelivered_verdicts: list[dict] = []
        self._env_errors: dict[str, str] = {}   # runtime_env key -> why it failed
        self._ps: dict[int, Any] = {}
        self.head_grace = float(os.environ.get("FLOWCORE_HEAD_GRACE", "30"))
        self.heartbeat_interval = float(os.environ.get("FLOWCORE_HEARTBEAT_INTERVAL", "1.0"))
        self._psutil_proc = None
        self._hb_timer: asyncio.TimerHandle | None = None
        self.address = ""
        self.stopped = asyncio.Event()
        self._stopping = False
        self._client_seq = 0
        self.started = time.time()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> str:
        self.server, port = await serve(self.token, self._on_comm, self.host, 0,
                                        name="flowcore-worker", tls=self.tls)
        self.address = f"tcp://{self._advertised_host()}:{port}"
        self.transfers.start(self.host)
        self._act(self.pool.startup())
        await self._join_head()
        self._heartbeat()
        if self.worker_memory_limit:
            self._memory_guard()
        logger.info("node %s (%s) serving at %s with %s", self.name, self.node_id,
                    self.address, self.resources)
        return self.address

    def _advertised_host(self) -> str:
        """The host peers reach this node at (registered with the head, used by
        other nodes and drivers to pull objects): ``advertise_host``, else
        ``host``, else, when listening on every interface, this machine's
        address on the route to the head."""
        from ..protocol.comm import parse_address
        host = self.advertise_host or self.host
        head_host = ""
        try:
            head_host = parse_address(self.head_address)[0]
        except (TypeError, ValueError):
            pass
        if host in ("0.0.0.0", "", "::") and not self.advertise_host:
            host = _local_address_towards(head_host) or socket.gethostname()
        loopback = ("127.", "localhost", "::1")
        if host.startswith(loopback) and head_host and not head_host.startswith(loopback):
            logger.warning(
                "this node serves objects at %s, a loopback address, but its head is at %s: "
                "nodes and drivers on other machines cannot pull objects from it. Start it "
                "with --host 0.0.0.0 (or this machine's address)", host, head_host)
        return host

    async def _join_head(self) -> None:
        self.head = await connect(self.head_address, self.token, timeout=5.0, tls=self.tls)
        asyncio.ensure_future(self._run_head(self.head))
        # what this node holds, so a restarted head can rebuild its object
        # table and adopt the actors still running here
        actors = []
        for aid, a in self.pool.actors.items():
            proc = self.procs.get(a.wid)
            if proc is not None and not proc.exited:
                actors.append([aid, proc.pid])
        reply = await self.head.request({
            "op": "register_node", "node_id": self.node_id, "address": self.address,
            "resources": self.resources, "name": self.name, "hostname": socket.gethostname(),
            "pid": os.getpid(), "version": __version__,
            "objects": self.store.sealed_objects(), "actors": actors,
            "info": {"object_store_memory": self.store.stats()["capacity"],
                     "session_dir": self.session_dir}})
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error", "the head refused this node"))

    async def _run_head(self, comm: Comm) -> None:
        await comm.run(self._on_head_message)
        if self._stopping or comm is not self.head:
            return
        # the head went away without telling us to stop: it may be restarting
        logger.error("lost the connection to the head at %s; retrying for %.0f s",
                     self.head_address, self.head_grace)
        deadline = time.monotonic() + self.head_grace
        while not self._stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            # tasks queued here by the old head: the new one does not know them
            self.pool.queue.clear()
            try:
                await self._join_head()
            except Exception as e:  # noqa: BLE001 - keep trying until the grace ends
                logger.info("head not back yet: %s", e)
                continue
            logger.warning("re-registered with the head at %s", self.head_address)
            self._heartbeat()
            undelivered, self._undelivered_verdicts = self._undelivered_verdicts, []
            for verdict in undelivered:  # decided while the head was away
                self.head.send(verdict)
            return
        if not self._stopping:
            logger.error("the head did not come back within %.0f s; stopping", self.head_grace)
            self.stop()

    def _memory_guard(self) -> None:
        """Kill a worker whose memory passes ``worker_memory_limit`` and say so,
        long before the kernel's OOM killer would take the whole node."""
        if self._stopping:
            return
        import psutil
        limit = self.worker_memory_limit or 0
        for wid, proc in list(self.procs.items()):
            if proc.exited or wid in self._kill_reasons:
                continue
            try:
                p = self._ps.get(proc.pid)
                if p is None:
                    p = self._ps[proc.pid] = psutil.Process(proc.pid)
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                self._kill_reasons[wid] = (
                    f"was killed for using {rss / 2**20:.0f} MiB, over the worker memory limit "
                    f"of {limit / 2**20:.0f} MiB (worker_memory_limit)")
                logger.warning("worker %s (pid %s) %s", wid, proc.pid, self._kill_reasons[wid])
                proc.kill()
        asyncio.get_event_loop().call_later(0.2, self._memory_guard)

    def _heartbeat(self) -> None:
        """Every ``heartbeat_interval`` s: load, memory and store figures to the head."""
        if self._stopping or self.head is None or self.head.closed:
            return
        try:
            import psutil
            if self._psutil_proc is None:
                self._psutil_proc = psutil.Process()
                psutil.cpu_percent(None)
            vm = psutil.virtual_memory()
            stats = {"cpu_percent": psutil.cpu_percent(None),
                     "mem_total": vm.total, "mem_used": vm.total - vm.available,
                     "mem_percent": vm.percent, "store": self.store.stats(),
                     "pool": self.pool.snapshot(), "actors": len(self.pool.actors)}
        except Exception as e:  # never let reporting kill the node
            stats = {"error": str(e)}
        self.head.send(messages.heartbeat(stats))
        self._oom.observe()  # forget OOM kills of other processes, long past
        if self._hb_timer is not None:
            self._hb_timer.cancel()  # one loop, also after a re-registration
        self._hb_timer = asyncio.get_event_loop().call_later(self.heartbeat_interval,
                                                             self._heartbeat)

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._reap_timer is not None:
            self._reap_timer.cancel()
        for proc in list(self.procs.values()):
            proc.kill()
        for c in list(self.clients.values()):
            c.close()
        self.transfers.close()
        if self.head is not None:
            self.head.send({"op": "node_leaving"})
            self.head.close()
        if getattr(self, "server", None) is not None:
            self.server.close()
        self.store.close()
        try:
            os.rmdir(self.spill_dir)  # empty after the store removed its files
        except OSError:
            pass
        self.stopped.set()

    # ------------------------------------------------------------ workers
    def _act(self, actions: list) -> None:
        for a in actions:
            kind = a[0]
            if kind == "spawn":
                w = self.pool.workers.get(a[1])
                if w is not None and w.renv:
                    asyncio.ensure_future(self._spawn_env_worker(a[1], w.renv))
                else:
                    self._spawn_worker(a[1])
            elif kind == "run":
                comm = self.worker_comms.get(a[1])
                if comm is None:
                    logger.error("no connection for worker %s", a[1])
                    continue
                comm.send(messages.run_task(self._pin_deps(comm, a[2])))
            elif kind == "died":
                task, wid = a[1], a[2]
                how, pid = self._deaths.pop(wid, ("exited", 0))
                if self.head is not None:
                    self.head.send(messages.worker_died(task["tid"], how, pid)
                                   if not task.get("lease") else
                                   {"op": "lease_lost", "wid": wid, "how": how, "pid": pid})
            elif kind == "retire":
                comm = self.worker_comms.get(a[1])
                if comm is not None:
                    comm.send(messages.exit_worker())
            elif kind == "warn":
                logger.warning(a[1])
                if self.head is not None:
                    self.head.send(messages.node_warning(a[1]))
            elif kind == "env_failed":
                task = a[1]
                if self.head is not None:
                    self.head.send(messages.task_done(task["tid"], "error",
                                                      self._env_error_results(task), False))

    # ------------------------------------------------------------ runtime_env
    async def _fetch_package(self, h: str) -> bytes | None:
        if self.head is None:
            raise ConnectionError("not connected to the head")
        reply = await self.head.request({"op": "get_package", "hash": h})
        return reply.get("blob")

    async def _prepare_env(self, renv: dict) -> WorkerSetup | str:
        """The worker setup for ``renv``, or the reason it cannot be made."""
        try:
            return await self.packages.prepare(renv)
        except Exception as e:  # noqa: BLE001 - reported to the task's caller
            logger.warning("runtime_env %s could not be set up: %s", renv.get("key"), e)
            return (f"the runtime_env of this task could not be set up on node {self.name}: "
                    f"{type(e).__name__}: {e}")

    async def _spawn_env_worker(self, wid: str, renv: dict) -> None:
        setup = await self._prepare_env(renv)
        w = self.pool.workers.get(wid)
        if self._stopping or w is None:
            return
        if isinstance(setup, str):
            self._env_errors[renv["key"]] = setup
            self._act(self.pool.env_failed(wid))
            return
        self._spawn_worker(wid, setup=setup)

    def _env_error_results(self, task: dict) -> list[dict]:
        from ..exceptions import RuntimeEnvSetupError
        from ..objects.serialization import serialize
        text = self._env_errors.get((task.get("renv") or {}).get("key") or "", "runtime_env failed")
        data = serialize(RuntimeEnvSetupError(text)).to_bytes()
        return [{"oid": ids.object_id(task["tid"], i), "inline": data, "size": len(data),
                 "error": True, "text": text} for i in range(task.get("nret", 1))]


    def _spawn_worker(self, wid: str, actor: bytes | None = None,
                      setup: WorkerSetup | None = None) -> None:
        env = strip_env(dict(os.environ))
        env.update(self.worker_env)
        if self.tls is not None:
            env.update(self.tls.env())
        if setup is not None:
            env.update(setup.env_vars)
        env["FLOWCORE_TOKEN"] = self.token.decode()
        env["FLOWCORE_NODE_ID"] = self.node_id
        log = os.path.join(self.session_dir, "logs", f"worker-{self.node_id}-{wid}.log")
        argv = ["--node", self.address, "--head", self.head_address, "--wid", wid,
                "--node-id", self.node_id, "--session-dir", self.session_dir]
        if actor is not None:
            argv += ["--actor", actor.hex()]
        cwd = self.worker_cwd
        if setup is not None:
            for p in setup.paths:
                argv += ["--path", p]
            cwd = setup.cwd or cwd
        self.procs[wid] = start_worker(argv, env, log, cwd,
                                       functools.partial(self._worker_exited, wid),
                                       self.start_method)

    def _worker_exited(self, wid: str, how: str) -> None:
        proc = self.procs.pop(wid, None)
        reason = self._kill_reasons.pop(wid, None)
        if reason is not None:
            how = reason
        elif how == "killed by signal SIGKILL":
            oom = self._oom.explain_sigkill()
            if oom:
                how = f"{how}, {oom}"
        if proc is not None:
            self._ps.pop(proc.pid, None)
        if self.pool.actor_of(wid) is not None:
            self._actor_exited(wid, how, proc.pid if proc is not None else 0)
            return
        comm = self.worker_comms.pop(wid, None)
        w = self.pool.workers.get(wid)
        pid = proc.pid if proc is not None else 0
        if w is not None and w.task is not None:
            logger.warning("worker %s (pid %s) %s while running %s", wid, pid, how,
                           w.task.get("name"))
        self._deaths[wid] = (how, pid)
        if comm is not None:
            self.store.release_client(comm.info.get("id", wid))
        self.leases.worker_gone(wid)
        if not self._stopping:
            self._act(self.pool.worker_died(wid))
        self._deaths.pop(wid, None)

    # ------------------------------------------------------------ actors
    def _start_actor(self, msg: dict) -> None:
        aid = msg["aid"]
        wid, old = self.pool.start_actor(aid, msg)
        if old is not None and old in self.procs:  # a restart: the old process must be gone
            self.procs[old].kill()
        if msg.get("renv"):
            asyncio.ensure_future(self._start_env_actor(wid, aid, msg["renv"]))
        else:
            self._spawn_worker(wid, actor=aid)

    async def _start_env_actor(self, wid: str, aid: bytes, renv: dict) -> None:
        setup = await self._prepare_env(renv)
        if self._stopping or self.pool.actor_of(wid) != aid:
            return
        if isinstance(setup, str):
            from ..exceptions import ActorDiedError
            from ..objects.serialization import serialize
            if self.head is not None:
                self.head.send(messages.actor_failed(
                    aid, setup, serialize(ActorDiedError(setup)).to_bytes()))
            self._actor_exited(wid, setup, 0)
            return
        self._spawn_worker(wid, actor=aid, setup=setup)

    def _actor_exited(self, wid: str, how: str, pid: int) -> None:
        comm = self.worker_comms.pop(wid, None)
        if comm is not None:
            self.store.release_client(comm.info.get("id", wid))
        aid, actions = self.pool.actor_exited(wid)
        if aid is None:
            return  # an older process of a restarted actor
        logger.warning("actor %s (pid %s) %s", aid.hex()[:12], pid, how)
        self._act(actions)
        if self.head is not None and not self._stopping:
            self.head.send(messages.actor_died(aid, how, pid))

    def _actor_call(self, msg: dict) -> None:
        aid = msg["actor"]
        a = self.pool.actors.get(aid)
        comm = self.worker_comms.get(a.wid) if a is not None else None
        if comm is None:
            self.pool.defer_call(aid, msg)
        else:
            comm.send(msg)

    def _kill_actor(self, aid: bytes) -> None:
        a = self.pool.actors.get(aid)
        proc = self.procs.get(a.wid) if a is not None else None
        if proc is not None:
            proc.kill()

    # ------------------------------------------------------------ head messages
    def _on_head_message(self, comm: Comm, msg: dict, frames: list) -> None:
        handler = self._head_ops.get(msg["op"])
        if handler is None:
            messages.refuse("node", messages.HEAD, msg["op"], comm.peer)
            return
        guarded("node", handler, comm, msg, frames)

    def _head_start_actor(self, comm: Comm, msg: dict, frames: list) -> None:
        self._start_actor(msg)
        self._room_for_the_head()

    def _head_reserve_bundle(self, comm: Comm, msg: dict, frames: list) -> None:
        self._act(self.pool.reserve_bundle(msg["bundle"], msg["res"]))
        self._room_for_the_head()

    def _head_op_table(self) -> dict[str, Any]:
        """What the node does with each op its head sends (``HEAD_OPS``)."""
        return {
            "run_task": self._head_run_task,
            "local_query": lambda c, m, f: self._local_query(m["tids"]),
            "start_actor": self._head_start_actor,
            "reserve_bundle": self._head_reserve_bundle,
            "release_bundle": lambda c, m, f: self._act(self.pool.release_bundle(m["bundle"])),
            "lease_reclaim": lambda c, m, f: self.leases.reclaim(),
            "kill_actor": lambda c, m, f: self._kill_actor(m["aid"]),
            "delete_objects": self._delete_objects,
            "cancel_task": lambda c, m, f: self._cancel(m["tid"], m.get("force", False),
                                                        bool(m.get("local")), m.get("lease")),
            "prefetch": self._prefetch_all,  # keep a second copy of a put object
            "shutdown": self._head_shutdown,
        }

    def _head_run_task(self, comm: Comm, msg: dict, frames: list) -> None:
        if msg.get("actor") is not None:
            self._actor_call(msg)
        else:
            self._act(self.pool.task_arrived(msg))
            self._room_for_the_head()

    def _room_for_the_head(self) -> None:
        """What the head placed here waits for room (or overdraws the pool)
        while leases hold resources: ask for the leases back."""
        if self.leases.leases and (self.pool.queue or any(
                v < -1e-9 for v in self.pool.available.values())):
            self.leases.reclaim()

    def _delete_objects(self, comm: Comm, msg: dict, frames: list) -> None:
        held: dict[str, list[bytes]] = {}
        for oid in msg["oids"]:
            for cid in self.store.cached_by(oid):
                held.setdefault(cid, []).append(oid)
            self.store.delete(oid)
        self._wake_free_waiters()
        for cid, oids in held.items():  # freed while still held: give the pins back
            c = self.clients.get(cid)
            if c is not None and not c.closed:
                c.request({"op": "release_cached", "oids": oids}).add_done_callback(
                    lambda f: f.cancelled() or f.exception())

    def _prefetch_all(self, comm: Comm, msg: dict, frames: list) -> None:
        for item in msg["objects"]:
            asyncio.ensure_future(self._prefetch(item))

    def _head_shutdown(self, comm: Comm, msg: dict, frames: list) -> None:
        logger.info("the head asked this node to stop")
        self.stop()

    def _cancel(self, tid: bytes, force: bool, local: bool = False,
                lease: str | None = None) -> None:
        """``local``: a task offered to this node (local-first) that the head
        cancelled before hearing the verdict; if it has not come yet, it is
        refused when it does.  ``lease``: the leased worker its submitter
        sent it to."""
        if lease is not None:
            self.leases.cancel(lease, tid, force)
            return
        wid, task = self.pool.find_task(tid)
        if task is None:
            if local and tid not in self._local_started:
                _remember(self._local_refused, tid)
            return
        if wid is None:
            self.pool.drop_queued(tid)
            if self.head is not None:
                self.head.send(messages.task_done(tid, "cancelled", [], False))
            return
        if force:
            proc = self.procs.get(wid)
            if proc is not None:
                proc.kill()
        else:
            comm = self.worker_comms.get(wid)
            if comm is not None:
                comm.send(messages.cancel(tid))
                comm._flush()  # on the wire before the signal that says "read it now"
                w = self.pool.workers.get(wid)
                if w is not None and w.pid:
                    try:
                        os.kill(w.pid, signal.SIGUSR1)
                    except ProcessLookupError:
                        pass

    # ------------------------------------------------------------ local clients
    async def _on_comm(self, comm: Comm) -> None:
        self._client_seq += 1
        comm.info["id"] = f"l{self._client_seq}"
        self.clients[comm.info["id"]] = comm
        await comm.run(self._on_client_message)
        self.clients.pop(comm.info["id"], None)
        self.leases.holder_gone(comm.info["id"])
        self.store.release_client(comm.info["id"])
        for waiters in self.pin_waiters.values():
            waiters[:] = [(c, m) for c, m in waiters if c is not comm]

    def _on_client_message(self, comm: Comm, msg: dict, frames: list) -> None:
        op = msg["op"]
        role = comm.info.get("role", messages.PEER)
        if op not in CLIENT_ROLE_OPS[role]:
            messages.refuse("node", role, op, comm.info["id"])
            return
        guarded("node", self._client_ops[op], comm, msg, frames)

    def _client_op_table(self) -> dict[str, Any]:
        """What the node does with each op from a connection on its port."""
        return {
            "create": self._create,
            "submit_local": lambda c, m, f: self._submit_local(m["task"]),
            "write_chunk": self._write_chunk,
            "seal": self._seal,
            "abort": self._abort,
            "pin": lambda c, m, f: self._pin(c, m),
            "fetch_chunk": lambda c, m, f: self.transfers.serve_chunk(c, m),
            "bulk_port": lambda c, m, f: self.transfers.serve_bulk_port(c, m),
            "prefetch": self._prefetch_all,
            "unpin": self._unpin,
            "register_worker": self._register_worker,
            "register_client": self._register_client,
            "worker_idle": self._worker_idle,
            "worker_blocked": self._worker_blocked,
            "stats": self._stats,
            "lease_request": lambda c, m, f: self.leases.request(c, m, f),
            "lease_return": lambda c, m, f: self.leases.give_back(c, m, f),
            "lease_listening": lambda c, m, f: self.leases.listening(c, m, f),
        }

    def _worker_idle(self, comm: Comm, msg: dict, frames: list) -> None:
        wid = comm.info.get("wid", "")
        if self.leases.released and self.leases.stale_idle(wid, msg["tid"]):
            return  # (a lease given back idle: the pool has the worker already)
        self.leases.worker_idle(wid, msg["tid"])  # a lease's end: its tables
        self.pool_idle(wid, retire=bool(msg.get("retire")))

    def pool_idle(self, wid: str, retire: bool = False) -> None:
        """Worker ``wid`` is done (a task, or a lease): back to the pool,
        and the reap timer armed for the idle workers it keeps."""
        self._act(self.pool.worker_idle(wid, retire=retire))
        self._arm_reap_for_idle()

    def _arm_reap_for_idle(self) -> None:
        """A worker went idle (or started idle, a spare that came up after
        the work ended): the reap timer runs while the pool keeps extras."""
        grace = self.pool.idle_grace or self.pool.warm_grace
        if self._reap_timer is None and grace:
            self._arm_reap(grace)

    def _worker_blocked(self, comm: Comm, msg: dict, frames: list) -> None:
        self._act(self.pool.worker_blocked(comm.info.get("wid", ""), msg.get("blocked", True)))
        if self._reap_timer is None and self.pool.idle_grace:
            # spares forked for a blocked task go once nothing is blocked
            self._arm_reap(self.pool.idle_grace)

    def _arm_reap(self, delay: float) -> None:
        self._reap_timer = asyncio.get_event_loop().call_later(max(delay, 0.05), self._reap)

    def _reap(self) -> None:
        """Retire the workers kept idle past the grace (WorkerPool.reap)."""
        self._reap_timer = None
        if self._stopping:
            return
        actions, again = self.pool.reap()
        self._act(actions)
        if again is not None:
            self._arm_reap(again)

    def _create(self, comm: Comm, msg: dict, frames: list, asked: bool = False,
                waited: bool = False) -> None:
        store = self.store
        oid = msg["oid"]
        if not asked and not store.contains(oid):
            holders = store.cached_holders(msg["size"])
            if holders:  # the room is under clients' held pins: ask for them first
                asyncio.ensure_future(self._create_after_release(comm, msg, holders))
                return
            if not waited and FREE_WAIT > 0 and store.free_expected(msg["size"]) \
                    and store.fresh_memory(msg["size"]) \
                    and self._free_waited < FREE_WAIT_BUDGET * msg["size"]:
                # put, drop, put: the memory of the one dropped is about to be free
                asyncio.ensure_future(self._create_after_free(comm, msg))
                return
        if store.contains(oid):
            # a re-run of a task (rebuilding a lost result) can find a copy
            # here that was being pulled: wait for the pull, then use it
            pull = self.transfers.pulls.get(oid)
            if pull is not None:
                asyncio.ensure_future(self._create_after_pull(comm, msg, pull))
                return
            if store.is_sealed(oid):
                comm.reply(msg, exists=True)
                return
        touched = store.touched_end
        try:
            loc = store.create(oid, msg["size"], comm.info["id"])
        except Exception as e:  # ObjectStoreFullError and bad requests
            comm.reply(msg, error=f"{type(e).__name__}: {e}",
                       full=type(e).__name__ == "ObjectStoreFullError")
            return
        self.creating.add(oid)
        if store.touched_end > touched:
            self._free_waited = 0.0  # fresh memory taken: waits pay off again
        comm.reply(msg, loc=loc.to_wire())

    def _write_chunk(self, comm: Comm, msg: dict, frames: list) -> None:
        """A client-mode driver fills an object it created."""
        store = self.store
        try:
            if store.owner_of(msg["oid"]) != comm.info["id"]:
                raise ValueError("only the client that created an object may write it")
            store.write_chunk(msg["oid"], msg["start"], frames[msg["_frames"][0]])
        except Exception as e:
            comm.reply(msg, error=f"{type(e).__name__}: {e}")
            return
        comm.reply(msg)

    def _seal(self, comm: Comm, msg: dict, frames: list) -> None:
        oid = msg["oid"]
        # a put: the writer holds it (pinned as it is sealed: see ObjectStore.seal)
        self.store.seal(oid, pin_for=comm.info["id"] if msg.get("pin") else None)
        self.sealed(oid)

    def _abort(self, comm: Comm, msg: dict, frames: list) -> None:
        self.store.abort(msg["oid"])
        self.creating.discard(msg["oid"])

    def _unpin(self, comm: Comm, msg: dict, frames: list) -> None:
        cid = comm.info["id"]
        for oid in msg["oids"]:
            self.store.unpin(oid, cid)
        self._wake_free_waiters()

    def _wake_free_waiters(self) -> None:
        fut, self._freed = self._freed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _create_after_free(self, comm: Comm, msg: dict) -> None:
        """Wait (at most FREE_WAIT s) until a creation of ``msg["size"]``
        would reuse arena memory: the object its creator just dropped is
        freed (the head's delete), or nothing is expected any more."""
        size, store = msg["size"], self.store
        start = time.monotonic()
        deadline = start + min(FREE_WAIT, FREE_WAIT_BUDGET * size - self._free_waited)
        while not comm.closed and store.free_expected(size) and store.fresh_memory(size):
            left = deadline - time.monotonic()
            if self._freed is None:
                self._freed = asyncio.get_running_loop().create_future()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(asyncio.shield(self._freed), left)
            except asyncio.TimeoutError:
                store.forget_expected()  # held elsewhere: do not wait for them again
                break
        self._free_waited += time.monotonic() - start
        if not comm.closed:
            guarded("node", functools.partial(self._create, waited=True), comm, msg, [])

    def _register_worker(self, comm: Comm, msg: dict, frames: list) -> None:
        wid = msg["wid"]
        comm.info.update(role=messages.WORKER, wid=wid)
        self.worker_comms[wid] = comm
        comm.reply(msg, node_id=self.node_id, arena=self.store.path)
        actor = self.pool.actor_registered(wid)
        if actor is not None:
            spec, backlog = actor
            comm.send(messages.create_actor_in_worker(spec))
            for call in backlog:
                comm.send(call)
        else:
            self._act(self.pool.worker_ready(wid, msg.get("pid", 0)))
            self._arm_reap_for_idle()

    def _register_client(self, comm: Comm, msg: dict, frames: list) -> None:
        comm.info.update(role=messages.DRIVER)
        comm.reply(msg, node_id=self.node_id, store=self.store.stats())

    def _stats(self, comm: Comm, msg: dict, frames: list) -> None:
        comm.reply(msg, store=self.store.stats(), pool=dict(self.pool.snapshot(),
                                                            **self.leases.snapshot()),
                   packages=list(self.packages.fetched), transfer=self.transfers.stats())

    def _pin_deps(self, comm: Comm, task: dict) -> dict:
        """``task`` with its arguments in this store pinned for the worker
        that runs it (a held pin, see objects/held.py), their locations in
        ``pinned``: its first read of them asks nothing.  Those it already
        holds are left to it.  The task's own dicts are not changed (a retry
        goes to another worker)."""
        deps = task.get("deps")
        if not deps:
            return task
        store, cid = self.store, comm.info["id"]
        out = None
        for i, d in enumerate(deps):
            oid = d.get("oid")
            if d.get("inline") is not None or oid is None or not store.contains(oid) \
                    or not store.is_sealed(oid) or cid in store.cached_by(oid):
                continue
            try:
                loc = store.pin(oid, cid, cached=True)
            except Exception:  # noqa: BLE001 - the worker asks itself, as before
                continue
            if out is None:
                out = list(deps)
            out[i] = dict(d, pinned=loc.to_wire())
        return task if out is None else dict(task, deps=out)

    async def _create_after_release(self, comm: Comm, msg: dict,
                                    holders: dict[str, list[bytes]]) -> None:
        """Ask clients for their held pins back (see objects/held.py), wait
        for their answers (at most RELEASE_WAIT s), then create.  A pin under
        a live view stays (until the view goes): then ask for more."""
        deadline = time.monotonic() + RELEASE_WAIT
        while holders and not comm.closed:
            futs: list[asyncio.Future[Any]] = []
            for cid, oids in holders.items():
                c = self.clients.get(cid)
                if c is not None and not c.closed:
                    fut = c.request({"op": "release_cached", "oids": oids})
                    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
                    # a worker running a task answers once it waits: awaited
                    # briefly (a leased one may be between tasks)
                    w = self.pool.workers.get(c.info.get("wid", ""))
                    if w is not None and w.state != "idle":
                        futs.append(asyncio.ensure_future(_briefly(fut, BUSY_RELEASE_WAIT)))
                    else:
                        futs.append(fut)
            left = deadline - time.monotonic()
            if not futs or left <= 0:
                break
            _, late = await asyncio.wait(futs, timeout=left)
            if late:
                break
            holders = self.store.cached_holders(msg["size"])
        if not comm.closed:
            guarded("node", functools.partial(self._create, asked=True), comm, msg, [])

    async def _create_after_pull(self, comm: Comm, msg: dict, pull: asyncio.Future) -> None:
        try:
            await asyncio.shield(pull)
        except Exception:
            pass  # the pull failed and removed its partial copy: create anew
        if not comm.closed:
            self._on_client_message(comm, msg, [])

    def _submit_local(self, task: dict) -> None:
        """Local-first: a task from a client on this node, its arguments all
        here or inline. Start it now if it fits and nothing waits ahead of it;
        either way tell the head (which holds it until it hears)."""
        store = self.store
        head = self.head
        tid = task["tid"]
        start = (not self._stopping and head is not None and not head.closed
                 and tid not in self._local_refused and not self.pool.queue
                 and self.pool.fits(task.get("res") or {})
                 and all(d.get("inline") is not None
                         or (store.contains(d["oid"]) and store.is_sealed(d["oid"]))
                         for d in task["deps"]))
        verdict = messages.local_verdict(tid, start)
        if head is not None and not head.closed:
            head.send(verdict)
        else:
            self._undelivered_verdicts.append(verdict)
        if start:
            _remember(self._local_started, tid)
            task = messages.run_task(task)
            task["local"] = True
            self._act(self.pool.task_arrived(task))
        else:
            _remember(self._local_refused, tid)

    def _local_query(self, tids: list[bytes]) -> None:
        """The head asks again about local starts whose verdict it missed:
        one that never reached this node is refused for good."""
        for tid in tids:
            started = tid in self._local_started
            if not started:
                _remember(self._local_refused, tid)
            if self.head is not None:
                self.head.send(messages.local_verdict(tid, started))

    def sealed(self, oid: bytes) -> None:
        """``oid`` was sealed here (by a local writer or a pull): serve its waiters."""
        self.creating.discard(oid)
        self.transfers.sealed(oid)
        for c, m in self.pin_waiters.pop(oid, ()):
            self._pin(c, m)

    def _pin(self, comm: Comm, msg: dict) -> None:
        oid = msg["oid"]
        store = self.store
        if store.contains(oid) and store.is_sealed(oid):
            try:
                loc = store.pin(oid, comm.info["id"], cached=bool(msg.get("cache")))
            except Exception as e:
                comm.reply(msg, error=f"{type(e).__name__}: {e}")
                return
            comm.reply(msg, loc=loc.to_wire())
        elif oid in self.creating or store.contains(oid):
            self.pin_waiters.setdefault(oid, []).append((comm, msg))
        elif msg.get("sources"):
            asyncio.ensure_future(self._pin_remote(comm, msg))
        else:
            comm.reply(msg, error=f"object {oid.hex()} is not in the store of node {self.name}")

    async def _pin_remote(self, comm: Comm, msg: dict) -> None:
        """Pull the object from a node that holds it, then pin it here."""
        sources = [tuple(x) for x in msg["sources"]]
        try:
            await self.transfers.ensure_local(msg["oid"], msg["size"], sources)
        except Exception as e:
            comm.reply(msg, error=f"{type(e).__name__}: {e}")
            return
        if not comm.closed:
            self._pin(comm, dict(msg, sources=None))

    async def _prefetch(self, item: list) -> None:
        oid, size, sources = item
        try:
            await self.transfers.ensure_local(oid, size, [tuple(x) for x in sources])
        except Exception as e:
            logger.info("prefetch of %s failed: %s", oid.hex()[:12], e)

    def stats(self) -> dict[str, Any]:
        return {"store": self.store.stats(), "pool": self.pool.snapshot()}
