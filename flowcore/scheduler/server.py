"""The head's Tornado server: feeds messages into ``SchedulerState`` and
carries out what it returns."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from .._version import __version__
from ..protocol.comm import Comm, serve
from ..protocol.tls import TLSConfig
from .kv import OPS as KV_OPS, KVTable
from .machine import SchedulerState
from .packages import PackageTable
from .persist import TableFiles, state_path

logger = logging.getLogger("flowcore.scheduler")

#: ops answered directly by the server (requests carrying a ``rid``)
_QUERY_OPS = ("explain", "cluster_resources", "available_resources", "list_nodes", "list_tasks",
              "list_objects", "task_info", "event_log", "counts", "list_actors", "get_actor",
              "graph", "history", "list_placement_groups", "get_placement_group",
              "list_packages")


def lineage_memory_from_env() -> int:
    """FLOWCORE_LINEAGE_MEMORY: bytes of lineage the head keeps (default 512 MiB)."""
    raw = os.environ.get("FLOWCORE_LINEAGE_MEMORY", "")
    if not raw:
        return 512 << 20
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0:
        raise ValueError(f"FLOWCORE_LINEAGE_MEMORY={raw!r} is not a positive number of "
                         f"bytes; set it to e.g. {512 << 20} or unset it")
    return value


#: seconds a worker's request for a function not (yet) registered is held
FUNCTION_WAIT = 30.0
#: ops that may change the persisted tables (besides joining and leaving)
_TABLE_OPS = frozenset(("register_function", "create_actor", "actor_ready", "actor_failed",
                        "actor_died", "kill_actor", "actor_exit"))


class HeadServer:
    def __init__(self, token: bytes, host: str = "127.0.0.1", port: int = 0,
                 session_dir: str | None = None, tls: TLSConfig | None = None,
                 persist_dir: str | None = None):
        self.token = token
        self.tls = tls  # a protocol.tls.TLSConfig, or None for plain TCP
        self.host = host
        self.port = port
        self.session_dir = session_dir
        self.dashboard_url: str | None = None  # set by the dashboard when it serves
        self.state = SchedulerState(lineage_memory=lineage_memory_from_env())
        self.packages = PackageTable()  # runtime_env archives, by hash
        self.kv = KVTable()  # flowcore.experimental.internal_kv
        self.comms: dict[str, Comm] = {}
        self.server = None
        self.address = ""
        self.started = time.time()
        self.stopped = asyncio.Event()
        self._next_client = 0
        self.node_timeout = float(os.environ.get("FLOWCORE_NODE_TIMEOUT", "30"))
        self._function_waiters: dict[bytes, list[tuple[Comm, dict]]] = {}
        # the small tables persist under persist_dir (a state directory), so a
        # head restarted at the same port finds them; see persist.py
        self.persist_dir = persist_dir
        self.tables: TableFiles | None = None
        self.persist_interval = float(os.environ.get("FLOWCORE_PERSIST_INTERVAL", "0.2"))
        self.recovery_window = float(os.environ.get("FLOWCORE_HEAD_RECOVERY", "30"))
        self._dirty = True  # the persisted tables may be stale
        self._persist_failed = False

    async def start(self) -> str:
        self.server, self.port = await serve(self.token, self._on_comm, self.host, self.port,
                                             name="flowcore-scheduler", tls=self.tls)
        host = self.host
        if host in ("0.0.0.0", ""):  # reachable on every interface: name one others can use
            import socket
            host = socket.gethostname()
        self.address = f"tcp://{host}:{self.port}"
        logger.info("flowcore-scheduler %s listening at %s", __version__, self.address)
        from tornado.ioloop import PeriodicCallback
        self._membership = PeriodicCallback(self._check_nodes, 1000.0)
        self._membership.start()
        if self.persist_dir:
            self._open_tables(state_path(self.persist_dir, self.port))
        return self.address

    def _open_tables(self, path: str) -> None:
        """Load what a previous head at this port persisted (then wait for its
        nodes and drivers), and save the small tables from now on.  Runs
        before the first connection is handled."""
        from tornado.ioloop import PeriodicCallback
        self.tables = TableFiles(path)
        loaded = self.tables.load()
        if loaded is not None:
            tables, functions = loaded
            logger.warning("found the tables of a previous head in %s: recovering (waiting up "
                           "to %.0f s for its nodes and drivers)", path, self.recovery_window)
            self.state.restore_tables(tables, functions)
            self.kv.restore(tables.get("kv"))
            asyncio.get_event_loop().call_later(self.recovery_window, self._end_recovery)
        self._persist()
        self._persister = PeriodicCallback(self._persist, self.persist_interval * 1000.0)
        self._persister.start()

    def _persist(self) -> None:
        """Write the small tables if something that may change them happened
        since the last write (at most once per ``persist_interval``)."""
        if self.tables is None or self.stopped.is_set() or not self._dirty:
            return
        self._dirty = False
        try:
            self.tables.save(dict(self.state.persistent_tables(), kv=self.kv.dump()),
                             self.state.functions)
            self._persist_failed = False
        except OSError as e:
            self._dirty = True
            if not self._persist_failed:  # once, not every interval
                logger.warning("cannot persist the head's tables in %s: %s", self.tables.path, e)
            self._persist_failed = True

    def _end_recovery(self) -> None:
        if self.state.recovery is not None:
            logger.warning("recovery window of %.0f s passed; %d node(s) and %d driver(s) did "
                           "not come back", self.recovery_window,
                           len(self.state.recovery.nodes), len(self.state.recovery.drivers))
            self._deliver(self.state.finish_recovery("the recovery window passed"))
            self._dirty = True

    def _check_nodes(self) -> None:
        """Declare nodes dead that stopped sending heartbeats (a busy or hung
        machine whose connection is still open)."""
        for nid in self.state.check_heartbeats(time.time(), self.node_timeout):
            logger.warning("node %s sent no heartbeat for %.0f s: declaring it dead", nid,
                           self.node_timeout)
            comm = self.comms.pop(nid, None)
            self._dirty = True
            self._deliver(self.state.node_died(
                nid, f"no heartbeat for {self.node_timeout:.0f} s"))
            if comm is not None:
                comm.close()

    async def _on_comm(self, comm: Comm) -> None:
        await comm.run(self._first_message)
        cid = comm.info.get("id")
        if cid is None:
            return
        self.comms.pop(cid, None)
        self._dirty = True
        if comm.info.get("role") == "node":
            how = ("it stopped" if comm.info.get("leaving")
                   else "its connection was lost")
            logger.warning("node %s left: %s", cid, how)
            self._deliver(self.state.node_died(cid, how))
        else:
            self._deliver(self.state.client_disconnected(cid))

    # The first message names the peer; after it, messages go to _handle.
    def _first_message(self, comm: Comm, msg: dict, frames: list) -> None:
        if "id" in comm.info:
            return self._handle(comm, msg, frames)
        op = msg["op"]
        self._dirty = True
        if op == "register_node":
            if msg.get("version") != __version__:
                comm.reply(msg, ok=False, error=(
                    f"node runs flowcore {msg.get('version')} but the head runs "
                    f"{__version__}: install the same version on every machine"))
                return None
            nid = msg["node_id"]
            comm.info.update(id=nid, role="node")
            self.comms[nid] = comm
            self._deliver(self.state.handle(nid, msg))
            comm.reply(msg, ok=True, session_dir=self.session_dir)
            logger.info("node %s joined from %s with %s", msg.get("name"), comm.peer,
                        msg.get("resources"))
        elif op == "register_client":
            self._next_client += 1
            cid = f"c{self._next_client}-{os.getpid()}"
            comm.info.update(id=cid, role="client", kind=msg.get("kind"))
            self.comms[cid] = comm
            self._deliver(self.state.handle(cid, msg))
            comm.reply(msg, ok=True, client_id=cid, nodes=self.state.list_nodes(),
                       session_dir=self.session_dir, version=__version__,
                       dashboard_url=self.dashboard_url)
        else:
            logger.warning("closing %s: first message was %r, not a registration", comm.peer, op)
            comm.close()
        return None

    def _handle(self, comm: Comm, msg: dict, frames: list) -> None:
        op = msg["op"]
        src = comm.info["id"]
        if op == "get_function":
            blob = self.state.function_blob(msg["fid"])
            if blob is None:
                # a task started on its submitter's node may ask before the
                # submitter's registration (another connection) is read
                self._function_waiters.setdefault(msg["fid"], []).append((comm, msg))
                asyncio.get_event_loop().call_later(
                    FUNCTION_WAIT, self._answer_function_waiters, msg["fid"])
                return
            comm.reply(msg, blob=blob)
        elif op == "register_function":
            self._dirty = True
            self._deliver(self.state.handle(src, msg))
            self._answer_function_waiters(msg["fid"])
        elif op == "has_package":
            comm.reply(msg, known=self.packages.has(msg["hash"]))
        elif op == "upload_package":
            error = self.packages.add(msg["hash"], msg["blob"])
            comm.reply(msg, ok=error is None, error=error)
        elif op == "get_package":
            comm.reply(msg, blob=self.packages.get(msg["hash"]))
        elif op in KV_OPS:
            self._dirty = self._dirty or op in ("kv_put", "kv_del")
            answer = self.kv.handle(msg)
            if "rid" in msg:  # a dashboard view is put without waiting for the answer
                comm.reply(msg, **answer)
        elif op in _QUERY_OPS:
            try:
                result = self._query(op, msg, src)
            except Exception as e:  # the asker gets the error, not a timeout
                logger.exception("query %s failed", op)
                comm.reply(msg, error=f"{type(e).__name__}: {e}")
                return
            comm.reply(msg, result=result)
        elif op == "node_leaving":
            comm.info["leaving"] = True
        elif op == "shutdown_cluster":
            comm.reply(msg, ok=True)
            asyncio.get_event_loop().call_later(0.01, self.stop)
        else:
            if op in _TABLE_OPS:
                self._dirty = True
            try:
                out = self.state.handle(src, msg)
            except Exception:
                logger.exception("error handling %s from %s", op, src)
                return
            self._deliver(out)

    def _answer_function_waiters(self, fid: bytes) -> None:
        blob = self.state.function_blob(fid)
        for comm, msg in self._function_waiters.pop(fid, ()):
            comm.reply(msg, blob=blob)

    def _query(self, op: str, msg: dict, src: str | None = None) -> Any:
        s = self.state
        if op == "graph":  # the futures DAG, for flowcore.visualize()
            from .export import DEFAULT_LIMIT, export_graph
            return export_graph(s, msg.get("roots"), src, msg.get("limit", DEFAULT_LIMIT))
        if op == "history":  # finished tasks, for flowcore.timeline()
            return list(s.history)
        if op == "cluster_resources":
            return s.cluster_resources()
        if op == "available_resources":
            return s.available_resources()
        if op == "list_nodes":
            return s.list_nodes()
        if op == "list_tasks":
            return s.list_tasks(msg.get("state"), msg.get("limit", 10_000))
        if op == "list_objects":
            return s.list_objects(msg.get("limit", 10_000))
        if op == "task_info":
            return s.task_info(msg["tid"])
        if op == "event_log":
            return s.log.tail(msg.get("n", 100))
        if op == "explain":
            from .explain import explain
            return explain(s, msg["oid"])
        if op == "list_actors":
            return s.list_actors(msg.get("state"))
        if op == "get_actor":
            return s.get_actor(msg["name"], msg.get("namespace"))
        if op == "list_placement_groups":
            return s.list_placement_groups(msg.get("state"))
        if op == "get_placement_group":
            return s.get_placement_group(msg.get("name"), msg.get("pgid"))
        if op == "list_packages":
            return self.packages.listing()
        if op == "counts":
            return dict(s.counts, tasks=len(s.tasks), objects=len(s.objects))
        return None

    def _deliver(self, out: list[tuple[str, dict]]) -> None:
        comms = self.comms
        for dest, m in out:
            c = comms.get(dest)
            if c is not None:
                c.send(m)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        if self.tables is not None:
            # a clean stop: nodes are told to stop, so nothing persisted survives
            self._persister.stop()
            self.tables.clear()
        for cid, c in list(self.comms.items()):
            if c.info.get("role") == "node":
                c.send({"op": "shutdown"})
        for c in list(self.comms.values()):
            c.close()
        if self.server is not None:
            self.server.close()
        self.stopped.set()
