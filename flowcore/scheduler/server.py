"""The head's Tornado server: feeds messages into ``SchedulerState`` and
carries out what it returns."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from .._version import __version__
from ..protocol import messages
from ..protocol.comm import Comm, serve
from ..protocol.tls import TLSConfig
from .kv import OPS as KV_OPS, KVTable
from .machine import SchedulerState
from .packages import PackageTable
from .persist import TableFiles, state_path

logger = logging.getLogger("flowcore.scheduler")

#: the ops the head takes from each role (protocol/messages.py); a message
#: whose op is not in its sender's table is refused and logged
ROLE_OPS = {role: messages.ops_for(messages.HEAD, role)
            for role in ("node", messages.DRIVER, messages.WORKER)}


def client_role(kind: Any) -> str:
    """The role of a registered client: its ``kind``, a worker or a driver."""
    return messages.WORKER if kind == messages.WORKER else messages.DRIVER


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
#: of those, the ones written at once rather than at the next interval: an
#: actor that came up (or went) just before a crash is not forgotten by the
#: restarted head, which would otherwise kill it when its node reports it
_WRITE_NOW_OPS = frozenset(("actor_ready", "actor_died", "actor_exit"))


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
        self._ops = self._op_table()

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
            comm.info.update(id=nid, role="node", ops=ROLE_OPS["node"])
            self.comms[nid] = comm
            self._deliver(self.state.handle(nid, msg))
            self._persist()  # at once: a restarted head waits for every node it knew
            comm.reply(msg, ok=True, session_dir=self.session_dir)
            logger.info("node %s joined from %s with %s", msg.get("name"), comm.peer,
                        msg.get("resources"))
        elif op == "register_client":
            self._next_client += 1
            cid = f"c{self._next_client}-{os.getpid()}"
            comm.info.update(id=cid, role="client", kind=msg.get("kind"),
                             ops=ROLE_OPS[client_role(msg.get("kind"))])
            self.comms[cid] = comm
            self._deliver(self.state.handle(cid, msg))
            if msg.get("kind", "driver") == "driver":
                self._persist()  # at once, as a node's (workers are not in the tables)
            comm.reply(msg, ok=True, client_id=cid, nodes=self.state.list_nodes(),
                       session_dir=self.session_dir, version=__version__,
                       dashboard_url=self.dashboard_url)
        else:
            logger.warning("closing %s: first message was %r, not a registration", comm.peer, op)
            comm.close()
        return None

    def _handle(self, comm: Comm, msg: dict, frames: list) -> None:
        op = msg["op"]
        if op not in comm.info["ops"]:  # checked before SchedulerState sees it
            messages.refuse("head", comm.info.get("kind") or comm.info["role"], op,
                            comm.info["id"])
            return
        own = self._ops.get(op)
        if own is not None:
            own(comm, msg)
            return
        if op in _TABLE_OPS:
            self._dirty = True
        try:
            out = self.state.handle(comm.info["id"], msg)
        except Exception:
            logger.exception("error handling %s from %s", op, comm.info["id"])
            return
        if op in _WRITE_NOW_OPS:
            self._persist()
        self._deliver(out)

    # ops the server answers itself; the rest go to SchedulerState
    def _op_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {
            "get_function": self._get_function,
            "register_function": self._register_function,
            "has_package": self._has_package,
            "upload_package": self._upload_package,
            "get_package": self._get_package,
            "node_leaving": self._node_leaving,
            "shutdown_cluster": self._shutdown_cluster,
        }
        for op in KV_OPS:
            table[op] = self._kv
        for op in _QUERIES:
            table[op] = self._answer_query
        return table

    def _get_function(self, comm: Comm, msg: dict) -> None:
        blob = self.state.function_blob(msg["fid"])
        if blob is None:
            # a task started on its submitter's node may ask before the
            # submitter's registration (another connection) is read
            self._function_waiters.setdefault(msg["fid"], []).append((comm, msg))
            asyncio.get_event_loop().call_later(
                FUNCTION_WAIT, self._answer_function_waiters, msg["fid"])
            return
        comm.reply(msg, blob=blob)

    def _register_function(self, comm: Comm, msg: dict) -> None:
        self._dirty = True
        self._deliver(self.state.handle(comm.info["id"], msg))
        self._answer_function_waiters(msg["fid"])

    def _has_package(self, comm: Comm, msg: dict) -> None:
        comm.reply(msg, known=self.packages.has(msg["hash"]))

    def _upload_package(self, comm: Comm, msg: dict) -> None:
        error = self.packages.add(msg["hash"], msg["blob"])
        comm.reply(msg, ok=error is None, error=error)

    def _get_package(self, comm: Comm, msg: dict) -> None:
        comm.reply(msg, blob=self.packages.get(msg["hash"]))

    def _node_leaving(self, comm: Comm, msg: dict) -> None:
        comm.info["leaving"] = True

    def _shutdown_cluster(self, comm: Comm, msg: dict) -> None:
        comm.reply(msg, ok=True)
        asyncio.get_event_loop().call_later(0.01, self.stop)

    def _kv(self, comm: Comm, msg: dict) -> None:
        self._dirty = self._dirty or msg["op"] in ("kv_put", "kv_del")
        answer = self.kv.handle(msg)
        if "rid" in msg:  # a dashboard view is put without waiting for the answer
            comm.reply(msg, **answer)

    def _answer_query(self, comm: Comm, msg: dict) -> None:
        op = msg["op"]
        try:
            result = _QUERIES[op](self, msg, comm.info["id"])
        except Exception as e:  # the asker gets the error, not a timeout
            logger.exception("query %s failed", op)
            comm.reply(msg, error=f"{type(e).__name__}: {e}")
            return
        comm.reply(msg, result=result)

    def _answer_function_waiters(self, fid: bytes) -> None:
        blob = self.state.function_blob(fid)
        for comm, msg in self._function_waiters.pop(fid, ()):
            comm.reply(msg, blob=blob)

    def _query(self, op: str, msg: dict, src: str | None = None) -> Any:
        answer = _QUERIES.get(op)
        return None if answer is None else answer(self, msg, src)

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


def _graph(h: HeadServer, msg: dict, src: str | None) -> Any:
    """The futures DAG, for flowcore.visualize()."""
    from .export import DEFAULT_LIMIT, export_graph
    return export_graph(h.state, msg.get("roots"), src, msg.get("limit", DEFAULT_LIMIT))


def _explain(h: HeadServer, msg: dict, src: str | None) -> Any:
    from .explain import explain
    return explain(h.state, msg["oid"])


#: queries (requests carrying a ``rid``), answered with ``result``
_QUERIES: dict[str, Any] = {
    "graph": _graph,
    "explain": _explain,
    "history": lambda h, m, s: list(h.state.history),  # finished tasks, for timeline()
    "cluster_resources": lambda h, m, s: h.state.cluster_resources(),
    "available_resources": lambda h, m, s: h.state.available_resources(),
    "list_nodes": lambda h, m, s: h.state.list_nodes(),
    "list_tasks": lambda h, m, s: h.state.list_tasks(m.get("state"), m.get("limit", 10_000)),
    "list_objects": lambda h, m, s: h.state.list_objects(m.get("limit", 10_000)),
    "task_info": lambda h, m, s: h.state.task_info(m["tid"]),
    "event_log": lambda h, m, s: h.state.log.tail(m.get("n", 100)),
    "list_actors": lambda h, m, s: h.state.list_actors(m.get("state")),
    "get_actor": lambda h, m, s: h.state.get_actor(m["name"], m.get("namespace")),
    "list_placement_groups": lambda h, m, s: h.state.list_placement_groups(m.get("state")),
    "get_placement_group": lambda h, m, s: h.state.get_placement_group(m.get("name"),
                                                                       m.get("pgid")),
    "list_packages": lambda h, m, s: h.packages.listing(),
    "counts": lambda h, m, s: dict(h.state.counts, tasks=len(h.state.tasks),
                                   objects=len(h.state.objects)),
}
