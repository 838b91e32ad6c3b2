"""``CoreClient``: one per process (driver or worker).

A daemon IO thread runs an asyncio/Tornado loop holding two connections: to
the head (submissions, reference counts, readiness notifications) and to the
local node (the object store).  API calls from any user thread hand messages
to the IO thread through a queue that is drained once per loop wake-up, so
bursts of calls travel as one batch.  ``get`` and ``wait`` block on an event
set by the notification that an object is ready: no polling.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from .. import ids
from ..exceptions import (FlowcoreError, GetTimeoutError, ObjectLostError, SerializationError,
                          ObjectStoreFullError)
from ..objects.ref import ObjectRef
from ..objects.serialization import deserialize
from ..protocol.chunks import fetch_chunks
from ..protocol import messages
from ..protocol.comm import Comm, connect
from ..protocol.tls import TLSConfig
from . import direct
from .actor_calls import ActorCallsMixin
from .failover import NODE_FAILOVER_WAIT, NodeFailoverMixin
from . import leases
from .leases import LeasesMixin
from .futures import Resolver
from ..objects.held import HeldObjects

logger = logging.getLogger("flowcore.client")

#: the ops a client takes from its head and from its node (protocol/messages.py)
HEAD_OPS = messages.ops_for(messages.CLIENT, messages.HEAD)
NODE_OPS = messages.ops_for(messages.CLIENT, messages.NODE)

#: objects up to this size travel inline in messages; larger go to the store
INLINE_MAX = messages.INLINE_MAX
#: a driver's get()/wait() that waits longer than this (seconds) warns once,
#: with the head's explanation of why (FLOWCORE_GET_WARN_AFTER; 0 or less: never)
GET_WARN_AFTER: float | None = float(os.environ.get("FLOWCORE_GET_WARN_AFTER", "60")) or None
if GET_WARN_AFTER is not None and GET_WARN_AFTER <= 0:
    GET_WARN_AFTER = None
#: client mode: objects move over the node connection in chunks of this
#: many bytes, with at most WIRE_WINDOW chunks unanswered
WIRE_CHUNK = 4 << 20
WIRE_WINDOW = 8
#: tasks whose arguments are all on this process's node are offered to that
#: node first (FLOWCORE_LOCAL_FIRST=0 sends every task through the head)
LOCAL_FIRST = os.environ.get("FLOWCORE_LOCAL_FIRST", "1") not in ("0", "")
#: ... while this client has at most this many unfinished tasks
LOCAL_FIRST_INFLIGHT = int(os.environ.get("FLOWCORE_LOCAL_FIRST_INFLIGHT", "2"))
#: seconds a side report (a direct actor call's record for the head, decrefs)
#: may wait for the IO thread's next round instead of waking it at once, so
#: calls in a row reach the head in batches (FLOWCORE_SIDE_FLUSH_MS)
SIDE_FLUSH = float(os.environ.get("FLOWCORE_SIDE_FLUSH_MS", "2")) / 1000
#: more unfinished submissions than this from one client block .remote()
MAX_PENDING_TASKS = 200_000
#: seconds a client keeps trying to reconnect when it loses the head (a head
#: restarted at the same address with its state directory takes it back)
HEAD_GRACE = float(os.environ.get("FLOWCORE_HEAD_GRACE", "30"))
class CoreClient(ActorCallsMixin, LeasesMixin, NodeFailoverMixin):
    #: keep the pins of store objects between gets while referenced (see
    #: objects/held.py)
    HOLDS = True
    #: a worker also keeps the pins of the objects it read without a
    #: reference (its tasks' arguments), this many at most
    HELD_UNREFERENCED = 0

    def __init__(self, head_address: str, token: bytes, node_address: str | None,
                 kind: str = "driver", wid: str | None = None, remote_store: bool = False,
                 tls: TLSConfig | None = None):
        self.head_address = head_address
        self.token = token
        self.tls = tls  # a protocol.tls.TLSConfig, or None for plain TCP
        self.node_address = node_address
        # the node is on another host (or its shared memory is out of reach):
        # objects travel over the connection instead of through a mapping
        self.remote_store = remote_store
        self.kind = kind
        self.wid = wid
        self.client_id = ""
        self.node_id = ""
        self.session_dir = ""
        self.dashboard_url: str | None = None
        self.job: list[str] | None = None  # [job id, namespace]: see runtime_context
        # tasks whose yielded values this client reads (ObjectRefGenerator)
        self.streams: set[bytes] = set()
        self.ids = ids.IdSource()
        self.loop = asyncio.new_event_loop()
        self.head: Comm | None = None
        self.node: Comm | None = None
        self._lock = threading.Lock()
        self._outbox: deque[tuple[str, dict]] = deque()
        # while a handler of an incoming message runs: what it sends, held
        # until it returns (dropped if it raises); see _guarded
        self._staged: list[tuple[str, dict]] | None = None
        self._staging_thread = 0
        self._head_ops: dict[str, Callable[[dict], None]] = {
            "object_ready": self._object_ready, "subscribed": self._subscribed,
            "warning": self._warning, "log": self._log}
        self._wake_pending = False
        # side reports (``send(lazy=True)``): while ``_tick_armed``, the IO
        # thread drains every SIDE_FLUSH seconds and nobody wakes it for them;
        # ``_lazy_seen``: one came since the last round (keeps the rounds going)
        self._tick_armed = False
        self._lazy_seen = False
        self._tick: asyncio.TimerHandle | None = None
        # Filled from finalisers (ObjectRef.__del__, store view release), which
        # may run inside a locked section of this same thread during garbage
        # collection: so they take no lock, only append, and the IO thread
        # turns them into messages on its next drain.
        self._dropped: deque[bytes] = deque()
        self._unpins: deque[bytes] = deque()
        # pins of store objects kept between gets while referenced here
        self.held = HeldObjects()
        self.refcounts: dict[bytes, int] = {}
        self.ready: dict[bytes, dict] = {}
        self.waiters: dict[bytes, list[Callable[[], None]]] = {}
        self.subscribed: set[bytes] = set()
        self.expected: set[bytes] = set()   # results of this client's own tasks/puts
        self.registered_functions: set[bytes] = set()
        # runtime_env: the job's descriptor (inside a task: the running task's)
        self.runtime_env: dict | None = None
        self.packager: Any = None
        self.pending_tasks = 0
        self._pending_cv = threading.Condition(self._lock)
        self.mapping: Any = None
        self.closed = False
        self.log_to_driver = True  # print what workers print (init(log_to_driver=False))
        self.lost: str | None = None  # "head"/"node" once that connection is gone
        self.actor_id: bytes | None = None  # the actor this process hosts, if any
        # while the head is away: messages for it wait here (see _reconnect_head)
        self._reconnecting: asyncio.Future | None = None
        self._held: list[dict] = []
        # seconds to wait for a lost head to come back (0: the head of an embedded
        # cluster, which nothing restarts; then embedded_head_pid is its pid)
        self.head_grace = HEAD_GRACE
        self.embedded_head_pid: int | None = None
        # a driver whose node died: set while it moves to another one
        self._node_switch: asyncio.Future | None = None
        self._reattaching: asyncio.Future | None = None
        self.on_node_message: Callable[[dict], None] | None = None
        # acknowledged subscriptions awaited by a get inside a task: id -> callback
        self._acks: dict[int, Callable[[int], None]] = {}
        # the plain task this worker process runs (set by the worker): threads
        # the task starts do not see ``current_task``, yet a get blocked in
        # one of them gives the task's CPU back too; blocked gets per task id
        self.process_task: dict | None = None
        self._blocked_gets: dict[bytes, int] = {}
        self._resolver: Any = None  # completes futures off the IO thread (futures.py)
        self._ack_ids = itertools.count(1)
        # direct actor calls: one link per actor called, and (IO thread) the
        # connections to actors' processes by link key
        self.direct = direct.DirectCalls()
        self._dconns: dict[str, Any] = {}   # protocol.blocking.BlockingConn
        self._call_lock = threading.Lock()
        self._dpending: dict[str, list[dict]] = {}  # direct calls not written yet
        self._leases_init()  # workers leased from our node (client/leases.py)
        # a thread waiting for direct calls' answers reads them itself (see
        # actor_calls._wait_reading): it holds _dreader meanwhile
        self._dreader = threading.Lock()
        self._reader_ident: int | None = None
        self._reader_pipe: tuple[int, int] | None = None
        self._readers_waiting = 0
        self._unwatched: set[Any] = set()  # connections the IO thread left to that thread
        self._reader_conns: list[Any] = []  # those the reading thread selects on
        self._reads = 0                     # reads by waiting threads (a counter)
        self._reads_seen_before = 0         # ... as the IO thread's last round saw it
        self.on_disconnect: Callable[[str], None] | None = None
        self._task_var: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
            "flowcore_current_task", default=None)
        self._thread = threading.Thread(target=self._run_loop, name="flowcore-io", daemon=True)

    @property
    def current_task(self) -> dict | None:
        """The task running in this thread / coroutine (workers only)."""
        return self._task_var.get()

    @current_task.setter
    def current_task(self, task: dict | None) -> None:
        self._task_var.set(task)

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._connect(), self.loop)
        fut.result(timeout)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _connect_node(self) -> tuple[Comm, dict]:
        node = await connect(self.node_address or "", self.token, tls=self.tls)
        asyncio.ensure_future(self._read(node, "node"))
        r = await node.request({"op": "register_client", "pid": os.getpid()})
        return node, r

    async def _connect(self) -> None:
        # the node and the head are reached at the same time
        node_task = asyncio.ensure_future(self._connect_node()) if self.node_address else None
        self.head = await connect(self.head_address, self.token, tls=self.tls)
        asyncio.ensure_future(self._read(self.head, "head"))
        reply = await self.head.request({"op": "register_client", "kind": self.kind,
                                         "pid": os.getpid(), "wid": self.wid})
        self.client_id = reply["client_id"]
        self.session_dir = reply.get("session_dir") or ""
        self.dashboard_url = reply.get("dashboard_url")
        if node_task is not None:
            self.node, r = await node_task
            self.node_id = r["node_id"]

    async def _read(self, comm: Comm, which: str) -> None:
        await comm.run(self._on_head_message if which == "head" else self._on_node_msg)
        if which == "head" and comm is not self.head:
            return  # a connection already replaced (or a failed reconnection attempt)
        if which == "node" and comm is not self.node:
            return  # a node connection already replaced (see _switch_node)
        if which == "node" and not self.closed and self.kind == "driver" \
                and await self._switch_node(comm):
            return
        if which == "head" and not self.closed and self.head_grace > 0 \
                and await self._reconnect_head():
            return
        if not self.closed:
            if self.lost is None:
                self._fail_all_waiters(which)
                logger.warning("%s", self.lost_message())
            else:
                self._fail_all_waiters(which)
            if self.on_disconnect is not None:
                self.on_disconnect(which)

    def rejoin_message(self, unsent: Iterable[dict] = ()) -> dict:
        """The registration sent to a restarted head: the previous client id,
        the refs held here, the small values already received, this client's
        unfinished tasks (their results), and what it waits for.  ``unsent``:
        messages for the head not sent yet (their tasks are not unfinished:
        the head will get them after this message)."""
        later = {spec["tid"] for m in unsent if m.get("op") == "submit" for spec in m["tasks"]}
        with self._lock:
            # refs to the results of unsent tasks are counted when they arrive
            refs = [oid for oid in self.refcounts if ids.task_of(oid) not in later]
            values = [[oid, m["inline"], bool(m.get("error"))] for oid, m in self.ready.items()
                      if m.get("inline") is not None and oid in self.refcounts]
            unfinished = [oid for oid in self.expected
                          if oid not in self.ready and ids.task_of(oid) not in later]
            subscribed = [oid for oid in set(self.waiters) | self.subscribed
                          if oid not in self.ready]
        return {"op": "register_client", "kind": self.kind, "pid": os.getpid(),
                "wid": self.wid, "previous_id": self.client_id, "actor": self.actor_id,
                "refs": refs, "values": values, "unfinished": unfinished,
                "subscribed": subscribed}

    async def _reconnect_head(self) -> bool:
        """The head went away: try to register again with a head at the same
        address for ``HEAD_GRACE`` seconds; True once back."""
        logger.warning("lost the connection to the head at %s; reconnecting for up to %.0f s",
                       self.head_address, self.head_grace)
        self.head = None
        done = self._reconnecting = self.loop.create_future()
        deadline = time.monotonic() + self.head_grace
        delay = 0.05
        ok = False
        while not self.closed and time.monotonic() < deadline:
            await asyncio.sleep(delay)  # back off between attempts
            delay = min(delay * 2, 1.0)
            try:
                comm = await connect(self.head_address, self.token,
                                     timeout=max(0.1, min(5.0, deadline - time.monotonic())),
                                     tls=self.tls)
            except Exception as e:  # noqa: BLE001 - keep trying until the grace ends
                logger.debug("head not back yet: %s", e)
                continue
            self._drain()  # settle dropped refs before reporting what is held
            asyncio.ensure_future(self._read(comm, "head"))
            try:
                reply = await comm.request(self.rejoin_message(self._held))
            except Exception as e:  # noqa: BLE001
                logger.debug("re-registration failed: %s", e)
                comm.close()
                continue
            # only now: messages queued meanwhile keep their order behind the held ones
            self.head = comm
            self.client_id = reply["client_id"]
            # a head that lost its last moments may not have every function:
            # the next call of each sends it again
            self.registered_functions.clear()
            held, self._held = self._held, []
            for m in held:
                comm.send(m)
            logger.warning("reconnected to the head at %s as %s", self.head_address,
                           self.client_id)
            ok = True
            break
        self._reconnecting = None
        if not done.done():
            done.set_result(ok)
        return ok

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        async def _close() -> None:
            self._drain()
            await asyncio.sleep(0)
            for c in (self.head, self.node):
                if c is not None:
                    c.close()
            self._flush_direct(True)
            for c in list(self._dconns.values()):
                for remove in (self.loop.remove_reader, self.loop.remove_writer):
                    try:
                        remove(c.sock.fileno())
                    except (ValueError, OSError):
                        pass
                c.close()
            self._dconns.clear()
            self._leases_close()
            # end what still runs on this loop (readers, a head reconnection, a node
            # switch), so none is destroyed pending when the loop stops
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            if rest:
                await asyncio.wait(rest, timeout=2.0)

        try:
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(5)
        except Exception:
            pass
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
            if not self._thread.is_alive():
                self.loop.close()
        self._close_reader_pipe()
        if self.mapping is not None:
            self.mapping.close()

    # ------------------------------------------------------------ sending
    def send(self, dest: str, msg: dict, lazy: bool = False) -> None:
        """Queue ``msg`` for ``dest`` ("head" or "node"); thread-safe.
        ``lazy``: a side report that may wait up to ``SIDE_FLUSH`` seconds
        for the IO thread's next round (it keeps its place in the queue:
        whatever is sent after it leaves after it)."""
        staged = self._staged
        if staged is not None and threading.get_ident() == self._staging_thread:
            staged.append((dest, msg))
            return
        with self._lock:
            self._outbox.append((dest, msg))
            if self._wake_pending:
                return
            if lazy:
                self._lazy_seen = True
                if self._tick_armed:
                    return  # the next round takes it
                self._tick_armed = True  # _drain starts the rounds
            self._wake_pending = True
        if threading.current_thread() is self._thread:
            self.loop.call_soon(self._drain)
        else:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # loop closed at exit
                pass

    def _take_outgoing(self) -> list[tuple[str, dict]]:
        """Everything queued for sending, in order: messages, then the
        decrefs and unpins recorded by finalisers."""
        decrefs: list[bytes] = []
        with self._lock:
            self._wake_pending = False
            items = list(self._outbox)
            self._outbox.clear()
            dropped = self._dropped
            while dropped:
                oid = dropped.popleft()
                n = self.refcounts.get(oid, 0) - 1
                if n > 0:
                    self.refcounts[oid] = n
                    continue
                self.refcounts.pop(oid, None)
                self.ready.pop(oid, None)
                self.subscribed.discard(oid)
                if oid in self.expected:  # dropped before its task finished
                    self.expected.discard(oid)
                    self._task_settled(oid)
                    self.direct.dropped(oid)
                decrefs.append(oid)
            unpins = self.held.collect() if self.held.pending() else []
            for oid in decrefs:
                if oid in self.held and self.held.drop(oid):
                    unpins.append(oid)
        while self._unpins:
            unpins.append(self._unpins.popleft())
        if decrefs:
            items.append(("head", messages.oids("decref", decrefs)))
        if unpins:
            items.append(("node", messages.oids("unpin", unpins)))
        return items

    def _drain(self) -> None:
        for dest, msg in self._take_outgoing():
            if dest == "call":  # (only an InlineClient routes calls when sending)
                for dest, msg in self._route_call(msg):
                    self._send_now(dest, msg)
            else:
                self._send_now(dest, msg)
        if self._dpending:
            self._flush_direct(True)
        if self._tick_armed and self._tick is None and not self.closed:
            self._tick = self.loop.call_later(SIDE_FLUSH, self._side_round)

    def _side_round(self) -> None:
        """(IO thread) Send the side reports queued since the last round, and
        watch again the actors' connections a calling thread no longer reads;
        the rounds stop after one that found neither to do (a later side
        report wakes this thread again)."""
        self._tick = None
        if self._unwatched:
            self._rewatch()
        with self._lock:
            # (a thread waiting in get reads the connections left to it: no
            # rounds for them until it leaves, see _wait_reading)
            if not self._lazy_seen and not (self._unwatched and self._reader_ident is None):
                self._tick_armed = False
            self._lazy_seen = False
        self._drain()

    def _arm_rounds(self) -> None:
        """(IO thread) Make sure a round comes."""
        with self._lock:
            self._tick_armed = True
        if self._tick is None and not self.closed:
            self._tick = self.loop.call_later(SIDE_FLUSH, self._side_round)

    def _wake_lazily(self) -> None:
        """A finaliser queued a decref or an unpin (no locks here): the next
        round sends it, or wake the IO thread when no round is coming.  (If a
        round is disarming concurrently, it drains after it disarmed, so it
        still sees what was queued before this read.)"""
        self._lazy_seen = True
        if not self._tick_armed:
            self._wake_from_finaliser()

    def _send_now(self, dest: str, msg: dict) -> None:
        c = self.head if dest == "head" else self.node
        if c is not None:
            c.send(msg)
        elif dest == "head" and self._reconnecting is not None:
            self._held.append(msg)  # sent once the head is back

    def _wake_from_finaliser(self) -> None:
        try:
            if threading.current_thread() is self._thread:
                self.loop.call_soon(self._drain)
            else:
                self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed at exit
            pass

    def request(self, dest: str, msg: dict, timeout: float | None = 60.0) -> dict:
        """Blocking request/reply from a user thread."""
        async def _req() -> dict:
            if dest == "head" and self.head is None and self._reconnecting is not None:
                await asyncio.shield(self._reconnecting)  # the head is restarting
            if dest == "node" and self.node is None and self._node_switch is not None:
                await asyncio.shield(self._node_switch)  # moving to another node
            self._drain()  # keep order with messages queued before
            c = self.head if dest == "head" else self.node
            if c is None:
                raise ConnectionError(f"no connection to the {dest}")
            return await c.request(msg)
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking request from the IO thread")
        return asyncio.run_coroutine_threadsafe(_req(), self.loop).result(timeout)

    # ------------------------------------------------------------ receiving
    def _on_head_message(self, comm: Comm, msg: dict, frames: list) -> None:
        handler = self._head_ops.get(msg["op"])
        if handler is None:
            messages.refuse("client", messages.HEAD, msg["op"], "head")
            return
        self._guarded(handler, msg)

    def _guarded(self, handler: Callable[[dict], None], msg: dict) -> None:
        """Run the handler of an incoming message; what it sends goes out only
        if it returns: if it raises, that is dropped and the error logged
        with the op."""
        if self._staged is not None and threading.get_ident() == self._staging_thread:
            handler(msg)  # inside another handler: that one holds the output
            return
        staged: list[tuple[str, dict]] = []
        self._staging_thread = threading.get_ident()
        self._staged = staged
        try:
            handler(msg)
        except Exception:
            logger.exception("error handling %r (dropped %d message(s) it queued)",
                             msg.get("op"), len(staged))
            staged = []
        finally:
            self._staged = None
        for dest, m in staged:
            self.send(dest, m)

    def _subscribed(self, msg: dict) -> None:  # see _subscribe_missing(ack=)
        ack = msg.get("ack")
        cb = self._acks.pop(ack, None) if ack is not None else None
        if cb is not None:
            cb(msg.get("pending", 0))

    def _warning(self, msg: dict) -> None:
        import warnings
        warnings.warn(msg.get("text", ""), RuntimeWarning, stacklevel=1)

    def _log(self, msg: dict) -> None:
        if self.log_to_driver:
            import sys
            out = sys.stderr if msg.get("stream") == "stderr" else sys.stdout
            prefix = f"({msg.get('name', '?')} pid={msg.get('pid')}) "
            try:
                out.write("".join(prefix + line + "\n" for line in msg.get("lines", ())))
                out.flush()
            except (OSError, ValueError):
                pass

    def _on_node_msg(self, comm: Comm, msg: dict, frames: list) -> None:
        if msg["op"] not in NODE_OPS:
            messages.refuse("client", messages.NODE, msg["op"], "node")
            return
        if msg["op"] == "run_task" and msg.get("deps"):
            self._adopt_pinned(msg["deps"])
        if msg["op"] == "release_cached":
            self._release_cached(msg)
        elif msg["op"] == "lease_revoke" and self.LEASES:
            self._lease_revoked(msg)
        elif self.on_node_message is not None:
            self._guarded(self.on_node_message, msg)

    def _object_ready(self, msg: dict) -> None:
        oid = msg["oid"]
        with self._lock:
            if oid not in self.refcounts and oid not in self.waiters \
                    and ids.task_of(oid) not in self.streams:
                return  # nobody here cares any more
            prev = self.ready.get(oid)
            if prev is not None and (prev.get("via_direct") or msg.get("via_direct")):
                return  # a direct call's outcome: the first one to arrive stands
            self.ready[oid] = msg
            if oid in self.expected:
                self.expected.discard(oid)
                self._task_settled(oid)
            callbacks = self.waiters.pop(oid, ())
        for cb in callbacks:
            cb()

    def _task_settled(self, oid: bytes) -> None:
        """One of this client's tasks no longer counts as pending (call with
        the lock held)."""
        if ids.index_of(oid) == 0 and self.pending_tasks > 0:
            self.pending_tasks -= 1
            if self.pending_tasks < MAX_PENDING_TASKS:
                self._pending_cv.notify_all()

    def lost_message(self) -> str:
        """Why this process cannot go on, and what to do (``self.lost`` set)."""
        if self.lost == "head" and self.embedded_head_pid is not None:
            return (f"the head of the local cluster flowcore.init() started (pid "
                    f"{self.embedded_head_pid}, {self.head_address}) stopped: the cluster is "
                    f"gone, and as nothing restarts it the driver did not wait for it. Check "
                    f"why in its log, {self.session_dir}/logs/head.log, then call "
                    f"flowcore.shutdown() and flowcore.init() again")
        if self.lost == "head":
            log = (f" (for flowcore.init() without an address: "
                   f"{self.session_dir}/logs/head.log)" if self.session_dir else "")
            return (f"lost the connection to the head at {self.head_address}, and it did not "
                    f"come back within the {self.head_grace:g} s grace (FLOWCORE_HEAD_GRACE): the "
                    f"cluster is gone. Check why it stopped in the head's log{log}, then call "
                    f"flowcore.shutdown() and flowcore.init() again (a head restarted at the "
                    f"same address with the same state directory is rejoined within the "
                    f"grace)")
        return (f"lost the connection to this process's node {self.node_id} at "
                f"{self.node_address}, and no other node could be used within "
                f"{NODE_FAILOVER_WAIT:g} s: call flowcore.shutdown() and flowcore.init() again "
                f"once a node runs")

    def _fail_all_waiters(self, which: str) -> None:
        from ..objects.serialization import serialize
        if which == "node" and (self.head is None or self._reconnecting is not None):
            which = "head"  # the node went with its head: the head is the cause
        self.lost = self.lost or which
        payload = serialize(FlowcoreError(self.lost_message())).to_bytes()
        with self._lock:
            pending = list(self.waiters.items())
            self.waiters.clear()
            for oid, _ in pending:
                self.ready[oid] = messages.object_ready_inline(oid, payload, error=True)
        for _, cbs in pending:
            for cb in cbs:
                cb()

    # ------------------------------------------------------------ references
    def add_local_ref(self, oid: bytes, counted: bool = False) -> None:
        """A new ObjectRef instance exists in this process.  ``counted`` means
        the head already counts this client as a holder (own submit/put)."""
        with self._lock:
            n = self.refcounts.get(oid, 0)
            self.refcounts[oid] = n + 1
            if n or counted:
                return
        self.send("head", messages.oids("incref", [oid]))

    def remove_local_ref(self, oid: bytes) -> None:
        """An ObjectRef instance was dropped (called from ``__del__``: no locks)."""
        if self.closed:
            return
        self._dropped.append(oid)
        if len(self._dropped) == 1:
            self._wake_lazily()

    # ------------------------------------------------------------ functions
    def ensure_function(self, fid: bytes, blob_factory: Callable[[], bytes], name: str) -> None:
        if fid in self.registered_functions:
            return
        self.registered_functions.add(fid)
        blob = blob_factory()
        self._fn_blobs[fid] = blob  # sent along with its first task to a leased worker
        self.send("head", messages.register_function(fid, blob, name))

    def fetch_function(self, fid: bytes) -> bytes:
        r = self.request("head", {"op": "get_function", "fid": fid})
        if r.get("blob") is None:
            raise FlowcoreError(f"function {fid.hex()} is unknown to the head")
        return r["blob"]

    # ------------------------------------------------------------ tasks
    def submit(self, spec: dict) -> list[ObjectRef]:
        """Submit one task spec (``tid`` filled here); returns its return refs."""
        nret = spec.get("nret", 1)
        tid = spec["tid"]
        oids = [ids.object_id(tid, i) for i in range(nret)]
        with self._lock:
            while self.pending_tasks >= MAX_PENDING_TASKS:
                self._wait_pending_room()
            self.pending_tasks += 1
            pending = self.pending_tasks
            self.expected.update(oids)
        task = self.current_task
        if task is not None and "parent" not in spec:
            spec["parent"] = task["tid"]  # for recursive cancellation
        refs: list[ObjectRef[Any]] = [ObjectRef(oid, self, counted=True) for oid in oids]
        if spec.get("actor") is not None and direct.ENABLED and not self.remote_store:
            self._prepare_direct(spec["actor"])
            self._submit_call(spec)
            return refs
        if leases.ENABLED and self.LEASES and not self.remote_store and self.has_store() \
                and not self._head_away() and self._lease_submit(spec):
            return refs
        # only the first few unfinished tasks are offered to our node: a burst
        # beyond them would mostly be declined (an extra message each) and is
        # better spread by the head
        run = self._local_run(spec) if LOCAL_FIRST and pending <= LOCAL_FIRST_INFLIGHT \
            and not self.remote_store and self.has_store() and not self._head_away() else None
        if run is not None:
            # local-first: our node starts it at once if it fits there; the
            # head records it and places it only if the node declines
            self.send("node", messages.submit_local(run))
            spec = dict(spec, local=self.node_id)
        self.send("head", messages.submit(spec))
        return refs

    def _head_away(self) -> bool:
        """Reconnecting to a restarting head (its submissions wait; no
        local start, whose verdict would have no head to go to)."""
        return self._reconnecting is not None

    def _local_run(self, spec: dict) -> dict | None:
        """The node's ``run_task`` message for ``spec`` when it may start on
        this process's node: a plain task, no strategy naming another place,
        every argument ready and inline or in this node's store, and no ref
        nested in them (the worker would look it up at the head, which may
        not have its submission yet: the head path holds it until the task
        has finished)."""
        strategy = spec.get("strategy")
        if spec.get("nested"):
            return None
        if spec.get("kind", "task") != "task" or spec.get("actor") is not None or (
                (spec.get("xopts") or {}).get("gen")) or (
                strategy is not None and not (
                    isinstance(strategy, (list, tuple)) and strategy[0] == "node"
                    and strategy[1] == self.node_id)):
            return None
        deps = []
        ready = self.ready
        for oid in spec.get("deps") or ():
            info = ready.get(oid)
            if info is None or info.get("error") or info.get("nested") or (
                    info.get("inline") is None and self.node_id not in info.get("nodes", ())):
                return None
            deps.append(info)
        run = {"tid": spec["tid"], "fid": spec["fid"], "name": spec.get("name", "?"),
               "args": spec.get("args"), "args_dep": spec.get("args_dep"), "deps": deps,
               "nret": spec.get("nret", 1), "res": spec.get("res") or {},
               "retry_exc": spec.get("retry_exc", False), "owner": self.client_id,
               "attempt": 1}
        if spec.get("renv") is not None:
            run["renv"] = spec["renv"]
        if spec.get("job") is not None:
            run["job"] = spec["job"]
        if spec.get("xopts") is not None:
            run["xopts"] = spec["xopts"]
        return run

    def _wait_pending_room(self) -> None:
        """Block a submitter until fewer tasks are pending (lock held)."""
        self._pending_cv.wait()

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None:
        self.send("head", messages.cancel_object(ref._id, force, recursive))

    # ------------------------------------------------------------ put
    def put(self, value: Any) -> ObjectRef:
        from ..objects.serialization import serialize
        return self.put_serialized(serialize(value))

    def put_serialized(self, s: Any) -> ObjectRef:
        oid = ids.object_id(self.ids.task_id(), 0)
        nested = list(s.contained_refs)
        if s.total_size <= INLINE_MAX or not self.has_store():
            data = s.to_bytes()
            msg = messages.put_inline(oid, data, nested)
            with self._lock:
                self.ready[oid] = messages.object_ready_inline(oid, data, nested=bool(nested))
        else:
            self.write_to_store(oid, s, hold=self.HOLDS)
            msg = messages.put_stored(oid, self.node_id, s.total_size, nested)
            with self._lock:
                self.ready[oid] = messages.object_ready_stored(oid, [self.node_id], s.total_size,
                                                               bool(nested))
        ref: ObjectRef[Any] = ObjectRef(oid, self, counted=True)
        self.send("head", msg)
        return ref

    def write_to_store(self, oid: bytes, s: Any, hold: bool = False) -> None:
        """Create, fill and seal ``oid`` in the local node's store.  ``hold``:
        keep it pinned (a held pin, see objects/held.py) from the seal on, so
        that the first get of it is local too."""
        from ..objects.store import Location
        if self._dropped:  # refs dropped just now: their unpins go before the create
            self._wake_from_finaliser()  # (the node may wait for their memory)
        r = self.request("node", messages.create(oid, s.total_size))
        if "error" in r:
            if r.get("full"):
                raise ObjectStoreFullError(r["error"])
            raise FlowcoreError(f"cannot create object in the store: {r['error']}")
        if r.get("exists"):
            return  # a re-run whose result was already copied here
        if self.remote_store:
            self._upload(oid, s)
            return
        loc = Location.from_wire(r["loc"])
        try:
            view = self._mapping().writable(loc)
            s.write_to(view)
            del view
        except BaseException:
            self.send("node", messages.oid_op("abort", oid))
            raise
        seal = messages.oid_op("seal", oid)
        if hold:
            with self._lock:
                held = self.held.add(oid, loc, self.node_id) is not None
            if held:
                seal["pin"] = True  # the node pins it for us as it seals it
        self.send("node", seal)

    def _upload(self, oid: bytes, s: Any) -> None:
        """Fill the created object ``oid`` over the node connection (client
        mode): chunks with a bounded number unacknowledged, then seal."""
        data = bytearray(s.total_size)
        s.write_to(memoryview(data))
        view = memoryview(data)

        async def upload() -> str | None:
            self._drain()  # after the messages queued before
            node = self.node
            if node is None:
                raise ConnectionError("no connection to the node")
            pending: deque[asyncio.Future] = deque()
            error = None
            for start in range(0, len(view), WIRE_CHUNK):
                if len(pending) >= WIRE_WINDOW:
                    error = error or (await pending.popleft()).get("error")
                fut = node.request({"op": "write_chunk", "oid": oid, "start": start},
                                   [view[start:start + WIRE_CHUNK]])
                pending.append(fut)
            while pending:
                error = error or (await pending.popleft()).get("error")
            node.send(messages.oid_op("abort" if error else "seal", oid))
            return error
        error = asyncio.run_coroutine_threadsafe(upload(), self.loop).result()
        if error:
            raise FlowcoreError(f"cannot write object {oid.hex()} to node {self.node_id}: "
                                f"{error}")

    def _download(self, oid: bytes, size: int) -> bytearray:
        """Read the pinned object ``oid`` over the node connection (client mode)."""
        async def download() -> bytearray:
            node = self.node
            if node is None:
                raise ConnectionError("no connection to the node")
            out = bytearray(size)

            def write(start: int, data: memoryview) -> None:
                out[start:start + len(data)] = data
            try:
                await fetch_chunks(node, oid, size, write, WIRE_CHUNK, WIRE_WINDOW)
            except ObjectLostError as e:
                raise ObjectLostError(f"object {oid.hex()} could not be read from node "
                                      f"{self.node_id}: {e}") from None
            return out
        return asyncio.run_coroutine_threadsafe(download(), self.loop).result()

    def _close_watched(self, conn: Any) -> None:
        """(IO thread) Stop watching a direct connection (to an actor or a
        leased worker) and close it."""
        for remove in (self.loop.remove_reader, self.loop.remove_writer):
            try:
                remove(conn.sock.fileno())
            except (ValueError, OSError):
                pass
        conn.close()

    def takes_direct_calls(self) -> bool:
        """Whether this process's actors listen for direct calls
        (``FLOWCORE_DIRECT_ACTOR_CALLS``)."""
        return direct.ENABLED

    def has_store(self) -> bool:
        """Whether this process can keep objects in a node's store (its own
        host's, mapped; or, in client mode, a node's over the connection)."""
        return self.node is not None

    def _mapping(self) -> Any:
        if self.mapping is None:
            from ..objects.mapping import StoreMapping
            self.mapping = StoreMapping()
        return self.mapping

    # ------------------------------------------------------------ get / wait
    def _subscribe_missing(self, oids: Iterable[bytes], ack: int | None = None) -> bool:
        """Ask the head to notify us for objects we are not already told
        about.  ``ack``: the head also answers ``subscribed`` with how many of
        them are still pending (after the readiness of the others).  True
        when every one of ``oids`` was asked for now (none was already
        awaited: a result of our own task, or an earlier subscription)."""
        new = []
        fresh = True
        with self._lock:
            for oid in oids:
                if oid in self.ready:
                    continue
                if oid in self.expected or oid in self.subscribed:
                    fresh = False
                    continue
                self.subscribed.add(oid)
                new.append(oid)
        if new:
            msg: dict[str, Any] = messages.oids("subscribe", new)
            if ack is not None:
                msg["ack"] = ack
            self.send("head", msg)
        return fresh and bool(new)

    def wait_ready(self, oids: list[bytes], num: int, timeout: float | None,
                   fail_fast: bool = False) -> set[bytes]:
        """Block until at least ``num`` of ``oids`` are ready or the timeout
        passes; returns the ready ones.  ``fail_fast``: return as soon as one
        of them is ready with an error (``get`` raises it at once)."""
        if self._dpending:
            self._flush_direct(self._on_io_thread())  # before waiting for their answers
        state = {"count": 0}
        ready: set[bytes] = set()
        missing: list[bytes] = []
        uniq = list(dict.fromkeys(oids))

        def make_cb(oid: bytes) -> Callable[[], None]:
            def cb() -> None:
                with cb_lock:
                    ready.add(oid)
                    if len(ready) >= num or (fail_fast and self._failed(oid)):
                        event.set()
                        wake.set()
                        self._poke_reader()  # a thread reading actors' answers waits for it
            return cb

        cb_lock = threading.Lock()
        callbacks: dict[bytes, Callable[[], None]] = {}
        with self._lock:
            failed = False
            for oid in uniq:
                if oid in self.ready:
                    ready.add(oid)
                    failed = failed or (fail_fast and bool(self.ready[oid].get("error")))
                else:
                    missing.append(oid)
            if len(ready) >= num or not missing or failed:
                return ready
            if self.lost:
                raise FlowcoreError(self.lost_message())
            event = threading.Event()  # (made only when there is something to wait for)
            wake = threading.Event()  # event, or the head said some are pending
            for oid in missing:
                cb = callbacks[oid] = make_cb(oid)
                self.waiters.setdefault(oid, []).append(cb)
            # answers of direct actor calls among them: read by this thread
            reading = self._reads_answers(missing)
        # inside a task, the CPU is given back only when the get will really
        # block: objects the head already has ready arrive at once, so ask it
        # which are pending first (a subscription it acknowledges)
        token = None
        task = self._task_of_thread()
        if self.kind == "worker" and task is not None:
            token = next(self._ack_ids)
            self._acks[token] = lambda pending: wake.set()
        blocked = False
        try:
            if self._subscribe_missing(missing, ack=token) and token is not None:
                deadline = None if timeout is None else time.monotonic() + timeout
                self._wait_event(wake, timeout)
                if deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
            blocked = False if event.is_set() else self._set_blocked(True, task)
            warn_after = GET_WARN_AFTER if self.kind == "driver" else None
            wait = self._wait_reading if reading else self._wait_event
            if warn_after is not None and (timeout is None or timeout > warn_after):
                if not wait(event, warn_after):
                    self._warn_slow(missing, ready, warn_after)
                    wait(event, None if timeout is None else timeout - warn_after)
            else:
                wait(event, timeout)
        finally:
            if token is not None:
                self._acks.pop(token, None)
            if blocked:
                self._set_blocked(False, task)
            with self._lock:
                for oid, cb in callbacks.items():
                    lst = self.waiters.get(oid)
                    if lst and cb in lst:
                        lst.remove(cb)
                        if not lst:
                            del self.waiters[oid]
        with cb_lock:
            return set(ready)

    def _failed(self, oid: bytes) -> bool:
        """Whether ``oid`` is ready here holding an error."""
        info = self.ready.get(oid)
        return info is not None and bool(info.get("error"))

    def _warn_slow(self, missing: list[bytes], ready: set[bytes], waited: float) -> None:
        """One warning for a wait that goes on for long: why it is not ready."""
        pending = [o for o in missing if o not in ready]
        if not pending:
            return
        try:
            why = self.query("explain", oid=pending[0])["text"]
        except Exception as e:  # noqa: BLE001 - the warning must not break the wait
            why = f"(could not ask the head: {e})"
        import warnings
        msg = (f"flowcore: still waiting after {waited:.0f} s for {len(pending)} object(s); "
               f"{pending[0].hex()[:12]}: {why}")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _wait_event(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    def _on_io_thread(self) -> bool:
        """True on the thread that dispatches incoming messages."""
        return threading.current_thread() is self._thread

    def _task_of_thread(self) -> dict | None:
        """The task this thread runs: its own, or the process's plain task
        for a thread that task started."""
        return self.current_task or self.process_task

    def _set_blocked(self, blocked: bool, task: dict | None = None) -> bool:
        task = task or self.current_task
        if task is None or self.kind != "worker":
            return False
        tid = task["tid"]
        with self._lock:  # several threads of one task: the first blocks, the last unblocks
            n = self._blocked_gets.get(tid, 0) + (1 if blocked else -1)
            if n > 0:
                self._blocked_gets[tid] = n
            else:
                self._blocked_gets.pop(tid, None)
            if n != (1 if blocked else 0):
                return True
        op = "task_blocked" if blocked else "task_unblocked"
        lease = getattr(self, "worker_lease", None)
        if blocked and lease is not None:
            lease.blocked(task)  # no leased task waits behind one blocked in get
        self.send("node", messages.worker_blocked(blocked))
        self.send("head", {"op": op, "tid": task["tid"]})
        return True

    def get_values(self, refs: list[ObjectRef], timeout: float | None) -> list[Any]:
        oids = [r._id for r in refs]
        if not self._dpending:  # all ready (a put, a finished task): no waiting
            with self._lock:
                table = self.ready
                infos = [table.get(oid) for oid in oids]
            if None not in infos:
                return [self.value_of(info) for info in infos]  # type: ignore[arg-type]
        deadline = None if timeout is None else time.monotonic() + timeout
        if len(oids) == 1 and (self._dconns or self._lease_conns) and self.kind != "worker":
            # the answer of a direct actor call or leased task: this thread reads it
            self._await_direct(oids[0], deadline,
                               GET_WARN_AFTER if self.kind == "driver" else None)
            info = self.ready.get(oids[0])
            if info is not None:  # (a failure raises here, as below)
                return [self.value_of(info)]
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        # the first failure among them is raised at once (Ray): the others
        # may wait for something that happens only once it is handled
        ready = self.wait_ready(oids, len(set(oids)), timeout, fail_fast=True)
        with self._lock:
            failed = next((oid for oid in oids if oid in ready and self._failed(oid)), None)
        if failed is not None and len(ready) < len(set(oids)):
            with self._lock:
                info = self.ready.get(failed)
            if info is not None:
                self.value_of(info)  # raises the failure
        if len(ready) < len(set(oids)):
            n = len(set(oids)) - len(ready)
            raise GetTimeoutError(
                f"get() timed out after {timeout}s: {n} of {len(set(oids))} object(s) not ready "
                f"(first: {next(o for o in oids if o not in ready).hex()}); use "
                f"flowcore.wait() to poll, or a longer timeout")
        del deadline
        out = []
        for oid in oids:
            with self._lock:
                info = self.ready.get(oid)
            if info is None:  # dropped meanwhile by another thread
                self._subscribe_missing([oid])
                self.wait_ready([oid], 1, None)
                info = self.ready[oid]
            out.append(self.value_of(info))
        return out

    def value_of(self, info: dict) -> Any:
        """Deserialize an object from its ready notification; raise if it is an error."""
        if info.get("inline") is not None:
            value = self._deserialize(info, info["inline"])
        else:
            value = self._read_from_store(info)
        if info.get("error"):
            if isinstance(value, BaseException):
                raise value
            raise FlowcoreError(f"remote error: {value!r}")
        return value

    def _deserialize(self, info: dict, buf: Any) -> Any:
        """``deserialize(buf)``; a failure names the task and the class."""
        try:
            return deserialize(buf)
        except Exception as exc:
            raise self._unreadable(info, exc) from exc

    def _deserialize_held(self, info: dict, h: Any, buf: Any) -> Any:
        """``_deserialize`` of a held object's bytes: their layout header is
        read once (the bytes do not change while the pin is held)."""
        from ..objects.serialization import deserialize, read_layout
        try:
            if h.layout is None:
                h.layout = read_layout(buf)
            return deserialize(buf, h.layout)
        except Exception as exc:
            raise self._unreadable(info, exc) from exc

    def _unreadable(self, info: dict, exc: BaseException) -> SerializationError:
        """The error for an object whose bytes arrived but do not unpickle
        here: which task made it, and which class was being rebuilt."""
        from .. import ids
        from ..objects.serialization import rebuilding_class
        oid = info["oid"]
        what = f"object {oid.hex()}"
        if asyncio._get_running_loop() is None:  # may block: ask the head for the name
            try:
                t = self.query("task_info", tid=ids.task_of(oid)) or {}
                if t.get("name"):
                    what = f"the result of task {t['name']} ({what})"
            except Exception:  # noqa: BLE001 - the name is a nicety
                pass
        cls = ""
        if info.get("inline") is not None:
            cls = rebuilding_class(info["inline"])
        where = f" while rebuilding {cls}" if cls else ""
        return SerializationError(
            f"{what} could not be deserialized in this process{where}: "
            f"{type(exc).__name__}: {exc}. Hint: its class must be importable here (the same "
            f"module on sys.path, the same library versions) and its __reduce__/__setstate__ "
            f"must work outside the task")

    def _read_from_store(self, info: dict) -> Any:
        from ..objects.store import Location
        oid = info["oid"]
        if self.node is None and self._node_switch is not None:
            self._await_node_switch()
        if not self.has_store():
            raise ObjectLostError(f"object {oid.hex()} lives in a node's store but this "
                                  f"process is not attached to a node")
        with self._lock:
            found = self.held.lookup(oid, self.node_id)
            # keep the pin this get takes while a reference to it lives here
            hold = self.HOLDS and not self.remote_store and (
                bool(self.HELD_UNREFERENCED) or oid in self.refcounts)
        if found is not None:  # pinned and mapped already: no round trip
            h, key = found
            return self._deserialize_held(info, h, self._mapping().readable(
                h.loc, self.held.on_release(h, key, self._wake_from_finaliser)))
        for attempt in range(6):
            req: dict[str, Any] = messages.oid_op("pin", oid)
            if hold:
                req["cache"] = True
            if self.node_id not in info.get("nodes", ()):
                # held elsewhere: our node pulls it from one of the holders first
                req["sources"] = [[n, a] for n, a in
                                  zip(info.get("nodes", ()), info.get("addrs", ()))]
                req["size"] = info["size"]
            try:
                r = self.request("node", req, timeout=None)
            except ConnectionError as e:  # our node died: wait for the next one, ask again
                if self.kind != "driver" or not self._await_node_switch():
                    raise
                r = {"error": f"the node holding the pin went away: {e}"}
            if "error" not in r:
                break
            # the copies we knew of are gone (a node died): ask the head again;
            # it answers once the object is rebuilt from its lineage, or why not
            with self._lock:
                self.ready.pop(oid, None)
                self.subscribed.discard(oid)
            self._subscribe_missing([oid])
            if not self.wait_ready([oid], 1, 300.0):
                raise ObjectLostError(r["error"])
            with self._lock:
                info = self.ready.get(oid) or info
            if info.get("inline") is not None or info.get("error"):
                return self.value_of(info)
        else:
            raise ObjectLostError(r["error"])
        if self.remote_store:
            try:
                data = self._download(oid, info["size"])
            finally:
                self.send("node", messages.oids("unpin", [oid]))
            return self._deserialize(info, memoryview(data))
        return self._read_pinned(info, Location.from_wire(r["loc"]), hold)

    def _read_pinned(self, info: dict, loc: Any, hold: bool = True) -> Any:
        """Read ``info``'s object at ``loc``, pinned for this process.
        ``hold``: keep the pin (while referenced here, or as one of a
        worker's last reads) unless one is held already; else it goes with
        the last view."""
        oid = info["oid"]
        extra: list[bytes] = []
        with self._lock:
            h = self.held.add(oid, loc, self.node_id) if hold and (
                self.HELD_UNREFERENCED or oid in self.refcounts) else None
            if h is not None:
                key = self.held.new_key(h)
                if self.HELD_UNREFERENCED:
                    extra = self.held.trim(self.HELD_UNREFERENCED)
        if extra:
            self.send("node", messages.oids("unpin", extra))
        if h is not None:
            return self._deserialize_held(info, h, self._mapping().readable(
                loc, self.held.on_release(h, key, self._wake_from_finaliser)))

        def release(oid: bytes = oid) -> None:  # a finaliser: no locks
            if not self.closed:
                self._unpins.append(oid)
                if len(self._unpins) == 1:
                    self._wake_from_finaliser()

        buf = self._mapping().readable(loc, release)
        return self._deserialize(info, buf)

    def _adopt_pinned(self, deps: list[dict]) -> None:
        """(Reading thread) The arguments our node pinned for us as it sent
        a task (``pinned``: their locations) become held pins now, whether
        or not the task runs; one we already hold is unpinned at once."""
        from ..objects.store import Location
        extra: list[bytes] = []
        adopted = 0
        with self._lock:
            for d in deps:
                wire = d.pop("pinned", None)
                if wire is None:
                    continue
                if not self.HOLDS or self.held.add(d["oid"], Location.from_wire(wire),
                                                   self.node_id) is None:
                    extra.append(d["oid"])
                else:
                    adopted += 1
            if self.HELD_UNREFERENCED:  # (the task's own arguments are kept)
                extra += self.held.trim(max(self.HELD_UNREFERENCED, adopted))
        if extra:
            self.send("node", messages.oids("unpin", extra))

    def _release_cached(self, msg: dict) -> None:
        """(Reading thread) The node needs the room of held pins: give back
        those no view uses now, the others as their last view goes; then
        answer (after the unpins, on the same connection)."""
        unpins = []
        with self._lock:
            for oid in msg["oids"]:
                if self.held.drop(oid):
                    unpins.append(oid)
        if unpins:
            self.send("node", messages.oids("unpin", unpins))
        self.send("node", messages.reply(msg.get("rid")))

    def prefetch(self, oids: Iterable[bytes]) -> None:
        """Ask this process's node to pull ready objects held only elsewhere."""
        if not self.has_store():
            return
        items = []
        with self._lock:
            for oid in oids:
                info = self.ready.get(oid)
                if info and info.get("inline") is None and info.get("nodes") \
                        and self.node_id not in info["nodes"]:
                    items.append([oid, info["size"],
                                  [[n, a] for n, a in zip(info["nodes"], info.get("addrs", ()))]])
        if items:
            self.send("node", {"op": "prefetch", "objects": items})

    def future_for(self, ref: ObjectRef) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        oid = ref._id

        def resolve() -> None:
            def work() -> None:
                try:
                    with self._lock:
                        info = self.ready.get(oid)
                    if info is None:
                        raise ObjectLostError(f"object {oid.hex()} was freed")
                    value = self.value_of(info)
                    if not fut.cancelled():
                        fut.set_result(value)
                except BaseException as e:  # noqa: BLE001 - the future carries it
                    if not fut.cancelled():
                        fut.set_exception(e)
            # values may need a blocking store request, and user callbacks
            # run: never on the IO thread, nor on a thread reading answers
            if self._on_io_thread() or self._reader_ident == threading.get_ident():
                if self._resolver is None:
                    self._resolver = Resolver()
                self._resolver.submit(work)
            else:
                work()

        def cancel_if_cancelled(f: concurrent.futures.Future, r: ObjectRef = ref) -> None:
            if f.cancelled():
                self.cancel(r, False, True)
        fut.add_done_callback(cancel_if_cancelled)
        with self._lock:
            if oid in self.ready:
                ready_now = True
            else:
                ready_now = False

                def resolve_holding(r: ObjectRef = ref) -> None:
                    resolve()  # the default keeps the ref alive until resolved
                self.waiters.setdefault(oid, []).append(resolve_holding)
        if ready_now:
            resolve()
        else:
            self._subscribe_missing([oid])
        return fut

    # ------------------------------------------------------------ queries
    def query(self, op: str, **kw: Any) -> Any:
        r = self.request("head", dict(op=op, **kw))
        if "error" in r:
            raise FlowcoreError(f"the head could not answer {op!r}: {r['error']}")
        return r.get("result")
