"""Leased workers for a worker's own client (a mixin of ``InlineClient``).

A task that submits a burst (more than ``leases.INFLIGHT`` of its tasks
unfinished) queues them in its own client, as the driver does
(``client/leases.py``: the head records each one QUEUED at its owner, then
``lease_start`` and the batched reports), and pushes them to workers it
leases from its node.  A worker's process has no IO thread, so what the
driver's IO thread does is done here by whichever thread pumps the
connections (``InlineClient.pump``):

* a lease request is written at once (the submitting thread flushes it) and
  its reply handled by the pump when it comes (``_reply_cbs``); the
  connection to the granted worker joins the pumped ones (``lease:ADDR``),
  so its answers are read while the task waits in ``get``/``wait``, and,
  every ``PUMP_EVERY`` submissions, by the submitting thread itself (the
  leased workers start on the burst before the task blocks);
* the grace and back-off timers run in the pump (``_lease_timers``), and,
  while the task runs user code and nobody pumps, on a keeper thread that
  takes the pump when it is free (``_keeper_loop``): an idle lease is
  returned within ``GRACE`` even when the task never waits again;
* a request the node declines keeps the burst queued while a retry is due
  (``DECLINED_WAIT`` at most, a retry as soon as the task blocks in get and
  gives its CPU back, or one of its tasks ends); after that the queue goes
  to the head (``lease_unrun``) as on the driver;
* when the task ends (``task_ended``, from the worker's run loop) nothing of
  its leases outlives it: its queued tasks go to the head (which places
  them; their results reach whoever holds their refs, as for any task the
  head runs), an idle lease is returned to the node, and a lease with tasks
  still running is ended on the worker's own connection (``lease_end``,
  after the tasks written to it, so none is refused unseen): that worker
  runs what it was sent and gives itself back to its node.

A task blocked in ``get`` keeps the leases whose workers run its children:
they are busy, not idle.  Short bursts (up to ``INFLIGHT`` tasks, as each
recursive ``fib`` call makes) keep going through local-first and the head,
whose children-first placement lends a blocked parent's CPU to them.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..protocol import frames, messages
from ..protocol.blocking import BlockingConn
from . import leases
from .leases import ClientLease

logger = logging.getLogger("flowcore.client")

#: a worker's task leases workers only for bursts of more than this many
#: unfinished tasks (FLOWCORE_WORKER_LEASES=0: never)
ENABLED = os.environ.get("FLOWCORE_WORKER_LEASES", "1") not in ("0", "")
#: submissions between two reads of the leased workers' answers by the
#: submitting thread
PUMP_EVERY = int(os.environ.get("FLOWCORE_WORKER_LEASE_PUMP_EVERY", "16"))
#: seconds a burst stays queued at its owner with no lease granted (requests
#: declined) before it goes to the head
DECLINED_WAIT = float(os.environ.get("FLOWCORE_WORKER_LEASE_WAIT_MS", "100")) / 1000


class WorkerLeasesMixin:
    """The IO of leased workers for ``InlineClient`` (no IO thread)."""

    if TYPE_CHECKING:  # pragma: no cover
        leases: leases.LeaseTable
        conns: dict[str, BlockingConn]
        closed: bool
        node_id: str
        token: bytes
        tls: Any
        pending_tasks: int
        expected: set[bytes]
        ready: dict[bytes, dict]
        subscribed: set[bytes]
        actor_id: bytes | None
        _lease_conns: dict[str, Any]
        _fn_blobs: dict[bytes, bytes]
        _lock: threading.Lock
        _call_lock: threading.Lock
        _pump: threading.Lock
        _pump_owner: int | None
        _cv: threading.Condition
        _rid: Any
        def send(self, dest: str, msg: dict, lazy: bool = False) -> None: ...
        def pump(self, timeout: float | None) -> None: ...
        def _flush(self, force: bool = False) -> None: ...
        def _lease_pump(self, key: tuple, io_thread: bool = True) -> None: ...
        def _lease_hand_back(self, key: tuple) -> None: ...
        def _lease_readable(self, conn: Any) -> None: ...
        def _lease_conn_lost(self, conn: Any) -> None: ...
        def _lease_unanswered(self, ls: ClientLease) -> list[bytes]: ...
        def _wake_from_finaliser(self) -> None: ...
        def _wait_until(self, pred: Callable[[], bool], timeout: float | None) -> bool: ...

    def _worker_leases_init(self) -> None:
        self._reply_cbs: dict[int, Callable[[dict], None]] = {}
        self._lease_timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._tick_armed = False
        self._keeper: threading.Thread | None = None
        self._keeper_wake = threading.Event()
        self._submitted_since_pump = 0
        # shape -> when its first request was declined with tasks queued and
        # no lease held (the burst waits DECLINED_WAIT for one at most)
        self._declined_at: dict[tuple, float] = {}
        # leases of ended tasks with tasks still out on them (ended on the
        # worker's connection): read until answered
        self._ended_leases: list[ClientLease] = []

    # ------------------------------------------------------------ routing
    def _lease_submit(self, spec: dict) -> bool:
        if not ENABLED or self.pending_tasks <= leases.INFLIGHT or not leases.QUEUE \
                or self.actor_id is not None or self.tls is not None:
            # (a short burst: local-first and the head, children first.  Under
            # TLS: no leases here.  This process has no IO thread: the thread
            # submitting would write an SSL socket while the pump's holder
            # may be reading it, which an SSL connection does not allow)
            return False
        if not super()._lease_submit(spec):  # type: ignore[misc]
            return False
        self._submitted_since_pump += 1
        if self._submitted_since_pump >= PUMP_EVERY:
            self._pump_now()
        return True

    def _pump_now(self) -> None:
        """(a thread running user code) Read the leased workers' answers and
        write what is queued for them, if no other thread pumps."""
        self._submitted_since_pump = 0
        self._pump_if_free(timers=False)

    def _pump_if_free(self, timers: bool) -> bool:
        """Take the pump if no other thread holds it, run the due lease
        timers (``timers``) and one round of reading and writing, give it
        back and wake the threads waiting for it; False if it was held."""
        if not self._pump.acquire(blocking=False):
            return False
        self._pump_owner = threading.get_ident()
        try:
            if timers and not self.closed:
                self.run_timers()
            if not timers or not self.closed:
                self.pump(0)
        finally:
            self._pump_owner = None
            self._pump.release()
            with self._cv:
                self._cv.notify_all()
        return True

    def _direct_send(self, conn: Any, data: bytes, io_thread: bool) -> None:
        """Write to a leased worker (``_call_lock`` held): a blocking write
        (the worker reads its connection whenever it waits)."""
        if conn.closed:
            return
        try:
            conn.sock.sendall(data)
        except OSError as e:  # the worker is gone: the pump notices
            logger.info("write to leased worker at %s failed: %s", conn.address, e)
            conn.closed = True

    # ------------------------------------------------------------ getting one
    def _lease_ask(self, key: tuple, res: dict, wait: bool = False) -> bool:
        """Ask the node for a lease of shape ``key``; its reply is handled
        by the pump (never waited for here)."""
        rid = next(self._rid)
        self._reply_cbs[rid] = lambda r: self._lease_granted(key, r)
        self.send("node", {"op": "lease_request", "res": res, "env": key[1], "rid": rid})
        if self._pump_owner != threading.get_ident():
            self._flush_soon()
        return False

    def _flush_soon(self) -> None:
        """Write the outbox now if no thread holds the pump (one that does
        writes it when it goes round)."""
        if self._pump.acquire(blocking=False):
            self._pump_owner = threading.get_ident()
            try:
                self._flush()
            finally:
                self._pump_owner = None
                self._pump.release()
                with self._cv:
                    self._cv.notify_all()

    def _on_reply(self, msg: dict) -> bool:
        """(the pump) A reply handled by a callback: True when it was one."""
        cb = self._reply_cbs.pop(msg.get("rid"), None)  # type: ignore[arg-type]
        if cb is None:
            return False
        try:
            cb(msg)
        except Exception:  # noqa: BLE001 - a lease is an optimisation
            logger.exception("handling a lease reply failed")
        return True

    def _lease_granted(self, key: tuple, r: dict) -> None:
        """(the pump) The node answered a lease request of shape ``key``."""
        with self._lock:
            self.leases.asking.discard(key)
        conn = None
        if r.get("lease") and not self.closed:
            try:
                conn = self._lease_conns.get(r["address"])
                if conn is None or conn.closed:
                    conn = BlockingConn(r["address"], self.token, 5.0, self.tls)
                    conn.fids = set()  # type: ignore[attr-defined]
                    self._lease_conns[r["address"]] = conn
                    self.conns[f"lease:{r['address']}"] = conn
            except Exception as e:  # noqa: BLE001 - the queue goes on without it
                logger.debug("cannot reach leased worker %s: %s", r.get("address"), e)
                self.send("node", {"op": "lease_return", "lease": r["lease"]})
                conn = None
        if conn is None:
            self._lease_declined(key)
            return
        ls = ClientLease(r, key, conn)
        with self._lock:
            self.leases.add(ls)
            self.leases.saturated.discard(key)
            wanted = key in self.leases.queues
        self._declined_at.pop(key, None)
        if not wanted:  # (the burst ended meanwhile): back at once
            self._lease_return(ls)
            return
        self._arm_lease_timer()
        self._lease_pump(key)

    def _lease_declined(self, key: tuple) -> None:
        now = time.monotonic()
        with self._lock:
            table = self.leases
            if table.usable(key):
                # our leases take tasks behind others; ask again less often
                table.saturated.add(key)
                table.ask_after[key] = now + leases.BACKOFF * 4
            else:
                table.ask_after[key] = now + leases.BACKOFF
            queued = key in table.queues
            first = self._declined_at.setdefault(key, now) if queued else now
        self._lease_pump(key)  # (behind others, if saturated)
        if queued and now - first < DECLINED_WAIT:
            # the task may block in get soon (its CPU then frees): keep the
            # burst here and ask again shortly
            self._call_later(leases.BACKOFF, lambda: self._lease_retry_now(key))
            return
        self._declined_at.pop(key, None)
        self._lease_hand_back(key)  # (only when no lease of the shape is left)
        self._lease_retry(key)

    def _lease_retry_now(self, key: tuple) -> None:
        """(the pump) Ask again for shape ``key`` if tasks still wait for it."""
        with self._lock:
            table = self.leases
            if self.closed or key not in table.queues or key in table.asking:
                return
            if len([x for x in table.shapes.get(key, ()) if not x.revoked]) >= leases.MAX_LEASES:
                return
            table.asking.add(key)
        self._lease_ask(key, dict(key[0]))

    def lease_chances(self, blocked: bool = False) -> None:
        """A CPU may have freed (one of this task's tasks ended): ask now for
        the shapes whose burst waits with no lease; ``blocked``: this task
        blocks in get and gave its own CPU back: for every shape with tasks
        queued, back-off or not."""
        with self._lock:
            table = self.leases
            if blocked:
                keys = [k for k in table.queues if k not in table.asking and len(
                    [x for x in table.shapes.get(k, ()) if not x.revoked]) < leases.MAX_LEASES]
            else:
                keys = [k for k in table.queues if k not in table.asking
                        and not table.usable(k) and k in self._declined_at]
            for k in keys:
                table.asking.add(k)
        for k in keys:
            self._lease_ask(k, dict(k[0]))

    def _lease_retry_soon(self, key: tuple) -> None:
        self._lease_retry(key)  # (its timer runs in the pump)

    def _lease_retry(self, key: tuple) -> None:
        with self._lock:
            if self.closed or key not in self.leases.queues or key in self.leases.asking:
                return
            delay = self.leases.ask_after.get(key, 0.0) - time.monotonic()
        self._call_later(max(delay, 0.0) + 0.001, lambda: self._lease_pump(key))

    def _lease_waits(self, key: tuple) -> bool:
        """(``_call_lock`` and ``_lock`` held) A burst of shape ``key`` with
        no lease, none asked for (a request was declined lately): it queues
        here while a retry is due, ``DECLINED_WAIT`` at most."""
        if key in self._declined_at:
            return True
        self._declined_at[key] = time.monotonic()
        delay = self.leases.ask_after.get(key, 0.0) - time.monotonic()
        heapq.heappush(self._lease_timers, (time.monotonic() + max(delay, 0.0),
                                            next(self._timer_seq),
                                            lambda: self._lease_retry_now(key)))
        self._keeper_start()
        self._wake_from_finaliser()
        return True

    def _set_blocked(self, blocked: bool, task: dict | None = None) -> bool:
        if not blocked and self.leases.shapes:
            # the task runs again and takes its CPU back: first the leases
            # with nothing to do go back (the node is not overdrawn, and does
            # not ask every holder's leases back)
            with self._lock:
                idle = [ls for ls in self.leases.all() if not ls.inflight
                        and ls.key not in self.leases.queues]
            for ls in idle:
                self._lease_return(ls)
        changed = super()._set_blocked(blocked, task)  # type: ignore[misc]
        if blocked and changed and self.leases.queues:
            self.lease_chances(True)  # (after worker_blocked: the node has our CPU back)
        return changed

    def _object_ready(self, msg: dict) -> None:
        super()._object_ready(msg)  # type: ignore[misc]
        if self._declined_at:
            self.lease_chances()  # one of our tasks ended: its CPU may be free

    # ------------------------------------------------------------ timers
    def _call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._lease_timers, (time.monotonic() + delay,
                                                next(self._timer_seq), fn))
        self._keeper_start()
        self._wake_from_finaliser()  # (a thread in select recomputes its timeout)

    def next_timer(self) -> float | None:
        """Seconds until the next lease timer is due (None: none)."""
        timers = self._lease_timers
        return max(0.0, timers[0][0] - time.monotonic()) if timers else None

    def run_timers(self) -> None:
        """(the pump) Run the lease timers that are due."""
        timers = self._lease_timers
        while timers:
            now = time.monotonic()
            with self._lock:
                if not timers or timers[0][0] > now:
                    return
                fn = heapq.heappop(timers)[2]
            try:
                fn()
            except Exception:  # noqa: BLE001 - one timer must not stop the others
                logger.exception("lease timer failed")

    def _arm_lease_timer(self) -> None:
        if not self._tick_armed and not self.closed:
            self._tick_armed = True
            self._call_later(leases.GRACE / 2, self._lease_tick)

    def _lease_tick(self) -> None:
        self._tick_armed = False
        super()._lease_tick()  # type: ignore[misc]

    def _keeper_start(self) -> None:
        if self._keeper is None and not self.closed:
            self._keeper = threading.Thread(target=self._keeper_loop, daemon=True,
                                            name="flowcore-leases")
            self._keeper.start()
        self._keeper_wake.set()

    def _keeper_loop(self) -> None:
        """Run the lease timers while no thread pumps (the task runs user
        code): each due timer is run by this thread, holding the pump."""
        while not self.closed:
            left = self.next_timer()
            if left is None:
                self._keeper_wake.wait()
                self._keeper_wake.clear()
                continue
            if left > 0:
                self._keeper_wake.wait(left)
                self._keeper_wake.clear()
                continue
            if not self._pump_if_free(timers=True):
                # the pump's holder runs them; look again a little later
                self._keeper_wake.wait(leases.BACKOFF)
                self._keeper_wake.clear()

    # ------------------------------------------------------------ answers, losses
    def read_lease_conn(self, conn: BlockingConn) -> None:
        """(the pump) A leased worker's connection is readable."""
        self._lease_readable(conn)
        with self._lock:
            waiting = bool(self._declined_at)
        if waiting:
            self.lease_chances()

    def _lease_readable_lost(self, conn: Any) -> None:
        """(the pump) A leased worker's connection closed: as on the driver;
        and the tasks of ended tasks' leases on it are asked of the head too."""
        oids = []
        with self._lock:
            for ls in self._ended_leases:
                if ls.conn is not conn:
                    continue
                oids += self._lease_unanswered(ls)
            self.subscribed.update(oids)
        if oids and not self.closed:
            self.send("head", messages.oids("subscribe", oids))
        self._lease_conn_lost(conn)

    def _close_watched(self, conn: Any) -> None:
        for which, c in list(self.conns.items()):
            if c is conn:
                del self.conns[which]
        conn.close()

    def _lease_return(self, ls: ClientLease) -> None:
        with self._lock:
            if ls.gone:
                return
            self.leases.remove(ls)
        if ls.node == self.node_id and not self.closed:
            self.send("node", {"op": "lease_return", "lease": ls.lease, "idle": True})
        self._forget_conn(ls)

    def _forget_conn(self, ls: ClientLease) -> None:
        """Close the connection to ``ls``'s worker once no lease of ours uses it
        and nothing sent on it waits for an answer."""
        conn = ls.conn
        with self._lock:
            used = any(x.conn is conn for x in self.leases.all()) or ls.inflight
        if not used:
            self._lease_conns.pop(conn.address, None)
            self._close_watched(conn)

    # ------------------------------------------------------------ the task's end
    def task_ended(self) -> None:
        """(the worker's run loop, when a task ends) None of its leases
        outlives it: its queued tasks go to the head, idle leases back to the
        node, and busy ones end on their worker's connection after the tasks
        written there."""
        if self.leases.asking:
            # a request still out would grant a lease after the task ended,
            # read only once this process waits again (it may run another
            # task first): its reply is awaited here (a node round trip)
            try:
                self._wait_until(lambda: not self.leases.asking or self.closed, 2.0)
            except KeyboardInterrupt:  # (a late cancel: nothing to interrupt)
                pass
        with self._lock:
            table = self.leases
            if not table.shapes and not table.queues and not table.asking:
                table.ask_after.clear()
                table.saturated.clear()
                self._declined_at.clear()
                return
            keys = list(table.queues)
            tids = [t for k in keys for t in table.unqueue(k)]
            held = table.all()
            self._declined_at.clear()
            table.ask_after.clear()  # (the next task's burst asks at once)
            table.saturated.clear()
        busy = False
        with self._call_lock:
            if tids and not self.closed:
                self.send("head", {"op": "lease_unrun", "tids": tids})
            for ls in held:
                if not ls.inflight:
                    self._lease_return(ls)
                    continue
                busy = True
                with self._lock:
                    self.leases.remove(ls)
                self._ended_leases.append(ls)
                if not ls.conn.closed:
                    self._direct_send(ls.conn, _end_frame(ls.lease), False)
        self._flush_soon()
        if busy:
            self._call_later(leases.BACKOFF, self._drain)

    def _drain(self) -> None:
        """(a timer) Tasks of an ended task are still out on leased workers:
        their answers (or hand-backs, which go to the head) are read on time
        even if this process runs another task meanwhile (the keeper thread
        pumps while it does)."""
        with self._lock:
            self._ended_leases = [ls for ls in self._ended_leases
                                  if ls.inflight and not ls.conn.closed]
            more = bool(self._ended_leases)
        if more and not self.closed:
            self._call_later(leases.BACKOFF, self._drain)


def _end_frame(lease: bytes) -> bytes:
    return b"".join(bytes(b) for b in frames.encode([{"op": "lease_end", "lease": lease}]))


__all__ = ["WorkerLeasesMixin", "ENABLED"]
