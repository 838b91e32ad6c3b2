"""``CoreClient``: one per process (driver or worker): its connections, what
it sends and receives, the references it holds, and the tasks it submits.

A daemon IO thread runs an asyncio/Tornado loop holding two connections: to
the head (submissions, reference counts, readiness notifications) and to the
local node (the object store).  API calls from any user thread hand messages
to the IO thread through a queue that is drained once per loop wake-up, so
bursts of calls travel as one batch.  ``get`` and ``wait`` block on an event
set by the notification that an object is ready: no polling.

The values of objects (put, get, wait, the store reads and writes, held
pins) are the client's ``objects`` component, ``client/object_io.py``.
"""
from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from .. import ids
from ..exceptions import FlowcoreError
from ..objects.ref import ObjectRef
from ..protocol import messages
from ..protocol.comm import Comm, connect
from ..protocol.tls import TLSConfig
from . import direct
from .actor_calls import ActorCallsMixin
from .failover import NODE_FAILOVER_WAIT, NodeFailover
from . import leases
from .leases import LeasesMixin
from .object_io import ObjectIO

logger = logging.getLogger("flowcore.client")

#: the ops a client takes from its head and from its node (protocol/messages.py)
HEAD_OPS = messages.ops_for(messages.CLIENT, messages.HEAD)
NODE_OPS = messages.ops_for(messages.CLIENT, messages.NODE)

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
class CoreClient(ActorCallsMixin, LeasesMixin):
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
        self.actor_bundle: str | None = None  # an actor's process: the bundle it was placed in
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
        # a driver whose node died moves to another one (failover.py)
        self.failover = NodeFailover(self)
        self.on_node_message: Callable[[dict], None] | None = None
        # acknowledged subscriptions awaited by a get inside a task: id -> callback
        self._acks: dict[int, Callable[[int], None]] = {}
        # the plain task this worker process runs (set by the worker): threads
        # the task starts do not see ``current_task``, yet a get blocked in
        # one of them gives the task's CPU back too; blocked gets per task id
        self.process_task: dict | None = None
        self._blocked_gets: dict[bytes, int] = {}
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
        # the values of objects: put, get, wait, the store and held pins (object_io.py)
        self.objects = ObjectIO(self)

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
            return  # a node connection already replaced (see failover.switch_node)
        if which == "node" and not self.closed and self.kind == "driver" \
                and await self.failover.switch_node(comm):
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
        self.objects.close()

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
            held = self.objects.held
            unpins = held.collect() if held.pending() else []
            for oid in decrefs:
                if oid in held and held.drop(oid):
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
            if dest == "node" and self.node is None and self.failover.switch is not None:
                await asyncio.shield(self.failover.switch)  # moving to another node
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

    def _subscribed(self, msg: dict) -> None:  # see ObjectIO._subscribe_missing(ack=)
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
            self.objects.adopt_pinned(msg["deps"])
        if msg["op"] == "release_cached":
            self.objects.release_cached(msg)
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

    # ------------------------------------------------------------ waiting (see object_io.py)
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

    # ------------------------------------------------------------ queries
    def query(self, op: str, **kw: Any) -> Any:
        r = self.request("head", dict(op=op, **kw))
        if "error" in r:
            raise FlowcoreError(f"the head could not answer {op!r}: {r['error']}")
        return r.get("result")
