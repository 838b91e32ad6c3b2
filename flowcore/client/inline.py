"""``InlineClient``: the client of a worker process, without an IO thread.

A worker spends its life waiting for a task, running it, and reporting.  With
an IO thread, every task costs two thread hand-offs (and on a virtual machine
each wake-up of another thread or process is expensive).  Here the thread
that waits does the IO itself: the worker's main thread reads its sockets
while idle or while a task blocks in ``get``, and flushes what it queued
right before it blocks.  If user code calls the API from other threads,
whichever thread needs to wait takes the "pump" and reads for everybody
(leader/followers); threads that queue a message while another thread is
blocked in ``select`` wake it through a pipe.

Messages from the node that must interrupt running user code (``cancel``)
come with SIGUSR1, whose handler reads the socket if nobody else is.
"""
from __future__ import annotations

import itertools
import logging
import os
import select
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, cast

from ..exceptions import AuthenticationError, ProtocolError
from ..protocol import messages
from ..protocol.blocking import BlockingConn
from . import core
from .core import CoreClient
from .worker_leases import WorkerLeasesMixin

if TYPE_CHECKING:
    from ..protocol.tls import TLSConfig

logger = logging.getLogger("flowcore.client")

#: the outbox destination of side reports for the head (``send(lazy=True)``)
LAZY_HEAD = "head~"
#: the ops an actor's process takes on a caller's connection
CALLER_OPS = messages.ops_for(messages.ACTOR, messages.CALLER)
#: how often (in SIDE_FLUSH periods) the flusher thread looks for side
#: reports held while a call runs (see InlineClient._flusher_loop)
FLUSHER_EVERY = 5


class InlineClient(WorkerLeasesMixin, CoreClient):
    """A CoreClient whose waiting threads do the IO themselves."""

    LEASES = True  # (bursts only, read by the pumping thread: client/worker_leases.py)
    #: the pins of the last objects this worker read stay held (its next
    #: task on the same argument reads it without asking the node); given
    #: back when the node asks, which a busy worker answers once it waits
    HELD_UNREFERENCED = int(os.environ.get("FLOWCORE_WORKER_HELD", "4"))

    def __init__(self, head_address: str, token: bytes, node_address: str, *, wid: str,
                 tls: "TLSConfig | None" = None):
        super().__init__(head_address, token, node_address, kind="worker", wid=wid, tls=tls)
        self.conns: dict[str, BlockingConn] = {}
        self._pump = threading.Lock()
        self._pump_owner: int | None = None
        self._cv = threading.Condition()
        self._followers = 0  # threads waiting on _cv (none: nobody to notify)
        self._rid = itertools.count(1)
        self._replies: dict[int, dict | None] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._in_select = False
        self._pumps = 0  # pump rounds begun (a nested one makes an outer round's select stale)
        self._reconnecting_head = False
        # connections opened by other threads, taken into ``conns`` by the
        # thread holding the pump: (key, conn)
        self._new_conns: list[tuple[str, BlockingConn]] = []
        self._callers = itertools.count(1)
        self.listener: Any = None  # the actor's listener for direct calls
        self.worker_lease: Any = None  # node.leases.WorkerLease of a pool worker
        self._pushed_fns: dict[bytes, bytes] = {}
        # set when a cancel for the running task was read; the main thread
        # raises KeyboardInterrupt at a safe point (never mid-dispatch)
        self.interrupt_main = False
        self._sigusr1 = False  # a SIGUSR1 came: its handler reads the node
        # side reports for the head held by _flush, and until when at most
        self._held_head: list[dict] = []
        self._held_until = 0.0
        self._head_written = 0.0  # when something was last written to the head
        # held side reports are written under _wlock, by the pump's holder
        # (_flush) or, while the pump's holder runs a task, by the flusher
        # thread once due (see _hold_while_running)
        self._wlock = threading.RLock()
        self._flusher: threading.Thread | None = None
        self._flusher_wake = threading.Event()
        self._flusher_armed = False
        self._worker_leases_init()

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> None:
        # before the node knows us: a cancel's SIGUSR1 must never find the
        # default action (which ends the process)
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        self.conns["node"] = BlockingConn(self.node_address or "", self.token, timeout,
                                          self.tls)
        self.conns["head"] = BlockingConn(self.head_address, self.token, timeout, self.tls)
        r = self.request("node", {"op": "register_worker", "wid": self.wid, "pid": os.getpid()},
                         timeout)
        self.node_id = r["node_id"]
        if r.get("arena"):  # mapped now, while idle, rather than on the first read
            self.objects.store_mapping().premap(r["arena"])
        r = self.request("head", {"op": "register_client", "kind": "worker", "pid": os.getpid(),
                                  "wid": self.wid}, timeout)
        self.client_id = r["client_id"]
        self.session_dir = r.get("session_dir") or ""

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._flush(force=True)
        except OSError:
            pass
        self.closed = True
        self._flusher_wake.set()  # the flusher thread, if any, ends
        self._keeper_wake.set()  # and the lease keeper
        if self.listener is not None:
            self.listener.close()
        self._adopt_conns()
        for c in self.conns.values():
            c.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.objects.close()

    # ------------------------------------------------------------ sending
    def send(self, dest: str, msg: dict, lazy: bool = False) -> None:
        if lazy:  # a side report for the head: may wait up to SIDE_FLUSH (see _flush)
            dest = LAZY_HEAD
        staged = self._staged  # a handler of an incoming message is running
        if staged is not None and threading.get_ident() == self._staging_thread:
            staged.append((dest, msg))
            return
        with self._lock:
            self._outbox.append((dest, msg))
        if self._in_select and self._pump_owner != threading.get_ident():
            self._wake()

    def answer_now(self, dest: str, msg: dict) -> None:
        """Write a direct call's answer on its caller's connection now, from
        the thread that ran the call (a sync actor's main thread), when
        nothing is queued before it and the connection is plain TCP (a TLS
        one is used by the pump's thread only); else queue it."""
        conn = self.conns.get(dest)
        staged = self._staged is not None and threading.get_ident() == self._staging_thread
        if conn is None or conn.tls or staged or self._outbox or self._new_conns:
            self.send(dest, msg)
            return
        with self._wlock:
            conn.write([msg])

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _wake_from_finaliser(self) -> None:
        if self._in_select and self._pump_owner != threading.get_ident():
            self._wake()

    def _flush(self, force: bool = False) -> None:
        """Write what is queued.  Side reports for the head (an actor's
        reports of calls it answered directly) go at once after a quiet
        spell; within SIDE_FLUSH seconds of the last write to the head (calls
        in a row), they wait while this thread waits for input and nothing
        else goes to the head, up to SIDE_FLUSH seconds after the first of
        them (``force``: not at all), so the head takes them in batches; they
        never wait longer while the thread runs a task (the flusher thread
        sends them then, see _hold_while_running)."""
        with self._wlock:
            self._flush_locked(force)

    def _flush_locked(self, force: bool) -> None:
        if self._new_conns:
            self._adopt_conns()
        items = self._take_outgoing()
        held = self._held_head
        if not items and not (held and (force or time.monotonic() >= self._held_until)):
            return
        # the head first: a direct call's submission leaves before the call itself
        by_dest: dict[str, list[dict]] = {"head": held}
        urgent = force
        for dest, msg in items:
            if dest == "call":
                for d, m in self._route_call(msg):
                    by_dest.setdefault(d, []).append(m)
                    urgent = urgent or d == "head"
            elif dest == LAZY_HEAD:
                if not held:
                    self._held_until = time.monotonic() + core.SIDE_FLUSH
                held.append(msg)
            else:
                by_dest.setdefault(dest, []).append(msg)
                urgent = urgent or dest == "head"
        self._held_head = []
        now = time.monotonic()
        if held and not urgent and now < self._held_until \
                and now - self._head_written < core.SIDE_FLUSH:
            self._held_head = by_dest.pop("head")  # only side reports: they wait
        elif by_dest["head"]:
            self._head_written = now
        for dest, msgs in by_dest.items():
            conn = self.conns.get(dest)
            if conn is not None:
                conn.write(msgs)

    def _hold_while_running(self) -> None:
        """The pump's holder leaves it (to run a task, which may be long)
        while side reports are held: the flusher thread sends them once due
        if no flush does first (see _flusher_loop).  (It used to send them
        right away: a head write, and a wake-up of the head, before every
        call of a caller making calls one after another.)"""
        if self._flusher_armed or self.closed:
            return
        self._flusher_armed = True
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flusher_loop, daemon=True,
                                             name="flowcore-side-reports")
            self._flusher.start()
        self._flusher_wake.set()

    def _flusher_loop(self) -> None:
        """While armed, look every ``FLUSHER_EVERY`` x SIDE_FLUSH: send the
        held reports that are due if no thread is in the pump (the thread
        in it sends them itself).  Seldom rather than at each batch's
        deadline: in calls one after another the pump's thread is there at
        the deadline, and each wake-up of this thread costs the process
        context switches; a call that runs long has its predecessors'
        reports sent within that period."""
        wake = self._flusher_wake
        period = FLUSHER_EVERY * core.SIDE_FLUSH
        while True:
            wake.wait()
            wake.clear()
            while not self.closed:
                time.sleep(period)
                if self._held_head and not self._pump.locked():
                    self._send_held()
                if self._held_head:
                    continue
                self._flusher_armed = False
                # (then look again: a thread that left the pump meanwhile saw
                # it armed and did not wake it)
                if not self._held_head or self._pump.locked():
                    break
                self._flusher_armed = True
            if self.closed:
                return

    def _send_held(self) -> None:
        """(flusher thread) Write the held side reports that are due."""
        with self._wlock:
            held = self._held_head
            conn = self.conns.get("head")
            if not held or self.closed or self._reconnecting_head or conn is None \
                    or conn.closed or time.monotonic() < self._held_until:
                return
            self._held_head = []
            conn.write(held)
            if conn.closed:  # the head is gone: they go with the rejoin message
                self._held_head = held + self._held_head
            else:
                self._head_written = time.monotonic()

    # ------------------------------------------------------------ direct actor calls
    def _adopt_conns(self) -> None:
        with self._lock:
            new, self._new_conns = self._new_conns, []
        for key, conn in new:
            old = self.conns.get(key)
            self.conns[key] = conn
            if old is not None:
                old.close()  # an older process's: ask the head about calls it left
                link = self.direct.by_key.get(key)
                if link is not None:
                    self._direct_lost(link, current=False)

    def add_caller(self, conn: BlockingConn) -> None:
        """An authenticated caller connected to the actor this process hosts
        (called by the listener's threads)."""
        with self._lock:
            self._new_conns.append((f"caller:{next(self._callers)}", conn))
        self._wake()

    def _prepare_direct(self, aid: bytes) -> None:
        """Look the actor up and connect, on the caller's thread (no IO
        thread here); until that works, calls go through the head."""
        with self._lock:
            link = self.direct.link(aid)
            if not link.wants_lookup(time.monotonic()):
                return
            link.looking = True
        try:
            r = self.request("head", {"op": "actor_direct", "aid": aid}, 10.0)
            if not r.get("address"):
                self.direct.no_address(link)
                return
            conn = BlockingConn(r["address"], self.token, 5.0, self.tls)
            with self._lock:
                self._new_conns.append((link.key, conn))
                self.direct.connected(link, r)
        except Exception as e:  # noqa: BLE001 - calls keep going through the head
            logger.debug("no direct connection to actor %s: %s", aid.hex(), e)
            self.direct.no_address(link, 1.0)
        finally:
            link.looking = False

    def _submit_call(self, spec: dict) -> None:
        # routed when the outbox is flushed, by the thread holding the pump
        self.send("call", messages.submit(spec))

    def _start_lookup(self, link: Any) -> None:
        link.looking = False  # the next call's thread looks it up (_prepare_direct)

    def request(self, dest: str, msg: dict, timeout: float | None = 60.0) -> dict:
        rid = next(self._rid)
        msg["rid"] = rid
        self._replies[rid] = None
        self.send(dest, msg)
        if not self._wait_until(lambda: self._replies.get(rid) is not None, timeout):
            self._replies.pop(rid, None)
            raise TimeoutError(f"no reply from the {dest} to {msg['op']!r} in {timeout}s")
        return self._replies.pop(rid)  # type: ignore[return-value]

    def _wait_pending_room(self) -> None:
        from . import core
        self._lock.release()
        try:
            self._wait_until(lambda: self.pending_tasks < core.MAX_PENDING_TASKS, None)
        finally:
            self._lock.acquire()

    # ------------------------------------------------------------ waiting = pumping
    def _wait_event(self, event: threading.Event, timeout: float | None) -> bool:
        return self._wait_until(event.is_set, timeout)

    def _head_away(self) -> bool:
        return self._reconnecting_head

    def _reads_answers(self, missing: list[bytes]) -> bool:
        return False  # the waiting thread pumps every connection anyway

    def has_store(self) -> bool:
        return "node" in self.conns

    def _on_io_thread(self) -> bool:
        return self._pump_owner == threading.get_ident()

    def _wait_until(self, pred: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        while not pred():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self._pump_owner != me and self._pump.acquire(blocking=False):
                self._pump_owner = me
                try:
                    while not pred():
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            break
                        self.pump(left)
                        self._check_interrupt()
                finally:
                    self._pump_owner = None
                    self._pump.release()
                    if self._followers:
                        with self._cv:
                            self._cv.notify_all()
                if self._held_head:  # this thread may run a task next, for long:
                    self._hold_while_running()  # they go on time anyway
            elif self._pump_owner == me:  # nested wait inside a dispatched message
                self.pump(left)
            else:
                with self._cv:
                    self._followers += 1
                    try:
                        if not pred() and self._pump_owner is not None:
                            self._cv.wait(left)
                    finally:
                        self._followers -= 1
        return True

    def pump(self, timeout: float | None) -> None:
        """Flush, then wait for input (at most ``timeout``) and dispatch it."""
        self._pumps += 1
        me = self._pumps
        self._flush()
        for which, c in list(self.conns.items()):
            if c.closed and not self.closed and not getattr(c, "reported", False):
                self._conn_lost(c, which)  # a write found the peer gone
        if self._pumps != me:
            # handling it pumped (a head reconnection reads every connection
            # while it waits for the head's reply) and may have dispatched
            # what the caller waits for: back to the caller to look, rather
            # than block in select for input that may never come
            return
        fds = [c for c in self.conns.values() if not c.closed] + [self._wake_r]
        self._in_select = True
        try:
            if self._outbox or self._dropped or self._unpins or self.objects.held.pending():
                timeout = 0  # something was queued meanwhile: go round again soon
            elif self._held_head:  # wake up to send the held side reports in time
                left = max(0.0, self._held_until - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            if self._lease_timers:  # (and to run the lease timers)
                due = self.next_timer()
                timeout = due if timeout is None or due is None else min(timeout, due)
            readable, _, _ = select.select(fds, [], [], timeout)
        finally:
            self._in_select = False
        for r in readable:
            if self._pumps != me:
                # a connection's loss was handled by pumping (see above): the
                # rest of this select's answer is stale (a blocking socket
                # read empty meanwhile would block) and the caller must look
                break
            if r == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
                continue
            self._read_conn(cast(BlockingConn, r))
        if self._lease_timers:
            self.run_timers()
        if self._followers:  # (they count themselves under _cv before checking)
            with self._cv:
                self._cv.notify_all()

    def _read_conn(self, conn: BlockingConn) -> None:
        which = next((k for k, c in self.conns.items() if c is conn), "?")
        if which.startswith(("caller:", "actor:")):
            self._read_direct_conn(conn, which)
            return
        if which.startswith("lease:"):
            self.read_lease_conn(conn)
            return
        try:
            batches = conn.read_available()
        except (OSError, ProtocolError) as e:
            logger.error("connection to the %s failed: %s", which, e)
            batches = []
            conn.closed = True
        for msgs, bufs in batches:
            for msg in msgs:
                if msg["op"] == "reply":
                    rid = msg.get("rid")
                    if rid in self._replies:
                        self._replies[rid] = msg
                    elif self._reply_cbs:
                        self._on_reply(msg)
                elif which == "head" and msg["op"] != "run_task":
                    self._on_head_message(None, msg, bufs)  # type: ignore[arg-type]
                else:
                    self._on_node_msg(None, msg, bufs)  # type: ignore[arg-type]
        if conn.closed and not self.closed:
            self._conn_lost(conn, which)

    def _read_direct_conn(self, conn: BlockingConn, which: str) -> None:
        """A caller's connection to the actor hosted here (calls), or this
        process's connection to an actor it calls (answers)."""
        try:
            batches = conn.read_available()
        except (OSError, ProtocolError) as e:
            logger.info("direct connection %s failed: %s", which, e)
            batches = []
            conn.closed = True
        for msgs, bufs in batches:
            for msg in msgs:
                if which.startswith("actor:"):
                    self._direct_message(msg)
                elif msg["op"] not in CALLER_OPS:
                    messages.refuse("actor", messages.CALLER, msg["op"], which)
                elif msg["op"] == "lease_end":  # its holder's task ended
                    if self.worker_lease is not None:
                        self.worker_lease.end(msg)
                elif msg.get("lease") is not None:
                    self._leased_task(conn, which, messages.with_run_defaults(msg), bufs)
                elif msg.get("actor") == self.actor_id and self.actor_id is not None:
                    msg["reply_conn"] = which  # answered on this connection
                    messages.with_run_defaults(msg)  # (the keys its caller left out)
                    self._on_node_msg(None, msg, bufs)  # type: ignore[arg-type]
                else:
                    logger.warning("a call for actor %s reached actor %s: dropped",
                                   (msg.get("actor") or b"").hex(), (self.actor_id or b"").hex())
        if conn.closed and not self.closed:
            self._conn_lost(conn, which)

    def _leased_task(self, conn: BlockingConn, which: str, msg: dict, bufs: list) -> None:
        """A task from the holder of this worker's lease (or of a lease
        that has ended: refused, not run)."""
        lease = self.worker_lease
        if lease is None or not lease.accepts(msg):
            conn.write([{"op": "lease_refused", "tid": msg.get("tid"), "lease": msg["lease"]}])
            return
        blob = msg.pop("fblob", None)
        if blob is not None:
            self._pushed_fns[msg["fid"]] = blob
        msg["reply_conn"] = which  # answered on this connection
        if lease.holds_back(msg):
            return  # the task running here waits in get: not behind it
        self._on_node_msg(None, msg, bufs)  # type: ignore[arg-type]

    def fetch_function(self, fid: bytes) -> bytes:
        blob = self._pushed_fns.pop(fid, None)  # sent along by a lease holder
        if blob is None:
            blob = super().fetch_function(fid)
            # the head has it: a task of it submitted from here need not send it again
            self.registered_functions.add(fid)
        self._fn_blobs[fid] = blob  # (pushed along to the workers this one leases)
        return blob

    def _conn_lost(self, conn: BlockingConn, which: str) -> None:
        conn.reported = True  # type: ignore[attr-defined]
        if conn is not self.conns.get(which):
            return  # an attempt already replaced
        if which.startswith("lease:"):
            self._lease_readable_lost(conn)
            return
        if which.startswith(("caller:", "actor:")):
            del self.conns[which]
            conn.close()
            link = self.direct.by_key.get(which)
            if link is not None:
                self._direct_lost(link)
            return
        if which == "head" and self._reconnecting_head:
            return  # the reconnection in progress notices
        if which == "head" and core.HEAD_GRACE > 0 and self._reconnect_head_blocking():
            return
        logger.warning("lost the connection to the %s", which)
        self._fail_all_waiters(which)
        if self.on_disconnect is not None:
            self.on_disconnect(which)

    def _reconnect_head_blocking(self) -> bool:
        """Like ``CoreClient._reconnect_head``, on the thread holding the pump:
        messages queued meanwhile stay in the outbox until the head is back."""
        logger.warning("lost the connection to the head at %s; reconnecting for up to %.0f s",
                       self.head_address, core.HEAD_GRACE)
        self._reconnecting_head = True
        deadline = time.monotonic() + core.HEAD_GRACE
        delay = 0.05
        try:
            while not self.closed and time.monotonic() < deadline:
                time.sleep(delay)  # back off between attempts
                delay = min(delay * 2, 1.0)
                try:
                    conn = BlockingConn(self.head_address, self.token,
                                        max(0.1, min(5.0, deadline - time.monotonic())),
                                        self.tls)
                except (OSError, AuthenticationError) as e:
                    logger.debug("head not back yet: %s", e)
                    continue
                self.conns["head"] = conn
                rid = next(self._rid)
                with self._lock:
                    unsent = self._held_head + [m for d, m in self._outbox
                                                if d in ("head", "call", LAZY_HEAD)]
                msg = self.rejoin_message(unsent)
                msg["rid"] = rid
                self._replies[rid] = None
                conn.write([msg])  # before anything queued: it names this client
                got = self._wait_until(lambda: self._replies.get(rid) is not None
                                       or conn.closed, max(0.1, deadline - time.monotonic()))
                reply = self._replies.pop(rid, None)
                if not got or reply is None:
                    conn.close()
                    continue
                self.client_id = reply["client_id"]
                self.registered_functions.clear()
                logger.warning("reconnected to the head at %s as %s", self.head_address,
                               self.client_id)
                return True
            return False
        finally:
            self._reconnecting_head = False

    def _check_interrupt(self) -> None:
        if self.interrupt_main and threading.current_thread() is threading.main_thread():
            self.interrupt_main = False
            raise KeyboardInterrupt("cancelled")

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        """The node has something urgent (a cancel): read it now unless a
        thread is already reading, then interrupt the task if asked to."""
        self._sigusr1 = True
        if self._pump.acquire(blocking=False):
            self._pump_owner = threading.get_ident()
            try:
                # (again while one came meanwhile: its handler, run inside
                # this one, found the pump held and left the reading here)
                while self._sigusr1:
                    self._sigusr1 = False
                    self.pump(0)
                    self._flush()  # what handling it queued (a cancelled task's end)
            finally:
                self._pump_owner = None
                self._pump.release()
        self._check_interrupt()
