"""Leased workers, the submitter's side (a mixin of ``CoreClient``).

A ready task (a plain task, default strategy, every argument inline or in
this process's node's store, none failed, no ref nested in them, no GPU)
goes straight to a worker this client leases from its node:

* the client keeps, per resource shape (the task's ``res`` and
  runtime_env), the leases its node granted (``lease_request``, answered
  by ``node/leases.py``), each with one authenticated connection to the
  worker (``protocol.blocking.BlockingConn``: TLS, then the token
  challenge);
* a task of a shape with a lease that has fewer than ``PIPELINE`` tasks
  unanswered is written to that worker's socket by the submitting thread
  itself, and submitted to the head marked ``lease=[node, worker]`` (the
  head records it running there without placing it:
  ``scheduler/leases.py``); the first task of a function on a connection
  carries the pickled function, so the worker never asks the head for a
  registration that may still be on its way.  Under TLS the submitting
  thread only appends the task to that connection's buffer and the IO
  thread writes it (one wake-up, one write for what joined meanwhile): an
  SSL connection is read and written by the IO thread alone;
* a burst (more than ``INFLIGHT`` tasks of ours unfinished) waits in this
  client's own queue of its shape while every lease of the shape is busy
  (Ray's owner-side queue): each queued task is submitted to the head
  marked ``lease_q=node`` (recorded QUEUED at its owner, not placed), and
  the IO thread sends the next one to a lease the moment that lease's
  answer comes, reporting ``lease_start`` (submissions and starts are side
  reports, batched); while tasks are queued, more leases of the shape are
  asked for, up to what the node grants;
* a queue with no lease left to serve it (a request declined, the node
  asking its leases back, the worker or the node gone) is handed to the
  head (``lease_unrun``), which places those tasks like any other, so a
  burst never keeps CPUs from work the head placed; a cancel of a task
  still queued here comes from the head as ``lease_cancel`` and drops it;
* otherwise the task goes the old way (local-first, or the head), and, when
  this shape has no lease request open, one is asked for on the IO thread;
  a declined request is asked again only after a short back-off.

The worker's answer (``call_result``: the inline returns; larger ones come
from the head as ``object_ready``) is read by the IO thread, or over plain
TCP by a thread waiting for it (actor_calls, the reading thread).  A lease idle
for ``GRACE`` seconds is returned; one the node asks back (``lease_revoke``:
tasks the head placed there wait for room) is returned as soon as its
tasks are answered.  A lost connection to a leased worker drops its leases;
the outcome of the tasks it had not answered is asked of the head, which
retries them (the node reports the worker's death) or has their results.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import ids
from ..exceptions import ProtocolError
from ..protocol import frames, messages
from ..protocol.blocking import BlockingConn
from . import direct, spread

logger = logging.getLogger("flowcore.client")

#: FLOWCORE_LEASES=0 sends ready tasks the old way (local-first / the head)
ENABLED = os.environ.get("FLOWCORE_LEASES", "1") not in ("0", "")
#: tasks written to one leased worker and not answered yet, at most.  More
#: than one only while tasks wait in this client's queue (a burst: an idle
#: lease is always picked first); the worker reads them in one wakeup and
#: hands back those not started when the task it runs blocks in get, so no
#: task waits behind a task that waits for it
PIPELINE = int(os.environ.get("FLOWCORE_LEASE_PIPELINE", "16"))
#: seconds: a task goes behind others on a worker only when each of those is
#: of a function seen to take less than this, and the oldest was written
#: less than twice this ago (a task never waits long behind a long one)
SHORT = float(os.environ.get("FLOWCORE_LEASE_SHORT_MS", "25")) / 1000
#: leases of one shape held at once, at most
MAX_LEASES = int(os.environ.get("FLOWCORE_LEASES_PER_SHAPE", "8"))
#: a submitter with more than this many tasks unfinished is in a burst: its
#: tasks wait in its own queue for its leased workers (FLOWCORE_LEASE_QUEUE=0:
#: a burst goes through the head instead)
INFLIGHT = int(os.environ.get("FLOWCORE_LEASE_INFLIGHT", "2"))
QUEUE = os.environ.get("FLOWCORE_LEASE_QUEUE", "1") not in ("0", "")
#: seconds a lease with nothing to do is kept before it is returned
GRACE = float(os.environ.get("FLOWCORE_LEASE_GRACE", "0.5"))
#: seconds before asking again for a shape whose lease was declined
BACKOFF = 0.05

#: the ops a lease holder takes on its connection to a leased worker
WORKER_OPS = messages.ops_for(messages.CALLER, messages.ACTOR)


class ClientLease:
    __slots__ = ("lease", "node", "wid", "address", "key", "conn", "inflight", "revoked",
                 "idle_since", "gone", "held_back", "meta", "last_answer")

    def __init__(self, reply: dict, key: tuple, conn: Any):
        self.lease: bytes = reply["lease"]
        self.node: str = reply["node"]
        self.wid: str = reply["wid"]
        self.address: str = reply["address"]
        self.key = key
        self.conn = conn
        self.inflight: dict[bytes, int] = {}   # tid -> number of returns
        self.revoked = False
        self.idle_since = time.monotonic()
        self.gone = False
        # its running task blocks in get (its worker handed back the tasks
        # queued behind it): nothing more goes to it until it is answered
        self.held_back = False
        self.meta: dict[bytes, tuple[bytes, float]] = {}  # tid -> (fid, when written)
        self.last_answer = 0.0


def shape_of(spec: dict) -> tuple | None:
    """The lease shape of ``spec`` (its resources and runtime_env), or None
    when it may not go to a leased worker."""
    strategy = spec.get("strategy")
    if spec.get("actor") is not None or spec.get("kind", "task") != "task" \
            or (strategy is not None and strategy != spread.SPREAD) or spec.get("nested"):
        return None
    xopts = spec.get("xopts")
    if xopts and (xopts.get("gen") or xopts.get("max_calls")):
        return None
    res = spec.get("res") or {}
    if res.get("GPU"):
        return None
    renv = spec.get("renv")
    if strategy is not None:  # SPREAD: leases on several nodes (client/spread.py)
        return spread.spread_key(tuple(sorted(res.items())), (renv or {}).get("key"))
    return tuple(sorted(res.items())), (renv or {}).get("key")


class LeaseTable:
    """The leases one client holds (no IO; callers hold the client's lock)."""

    def __init__(self) -> None:
        self.shapes: dict[tuple, list[ClientLease]] = {}
        self.by_tid: dict[bytes, ClientLease] = {}
        self.asking: set[tuple] = set()
        self.ask_after: dict[tuple, float] = {}
        self.sent = 0   # tasks sent to leased workers (for tests and views)
        # the owner-side queues: shape -> (spec, run) of tasks waiting for a
        # lease of that shape to be free
        self.queues: dict[tuple, deque[tuple[dict, dict]]] = {}
        self.queued = 0   # tasks that waited in those queues (for tests and views)
        # shapes whose last lease request the node declined while we held
        # leases of them: their leases take tasks behind others (PIPELINE)
        self.saturated: set[tuple] = set()
        # seconds each function's tasks took on leased workers lately (a
        # moving average of answer times): who may wait behind whom
        self.run_s: dict[bytes, float] = {}
        # leases the node asked back before their grant reached this table
        # (``lease_revoke`` read before the lease was added): added revoked
        self.revoked_early: dict[bytes, None] = {}
        # SPREAD shapes: which node gets the next lease request and task
        self.spread = spread.SpreadPlan()

    def usable(self, key: tuple) -> bool:
        """Whether a lease of shape ``key`` may take tasks (now or once free)."""
        return any(not ls.revoked and not ls.gone and not (ls.held_back and ls.inflight)
                   for ls in self.shapes.get(key, ()))

    def take(self, ls: "ClientLease", spec: dict) -> None:
        """``spec`` goes to ``ls`` now."""
        tid = spec["tid"]
        ls.inflight[tid] = spec.get("nret", 1)
        ls.meta[tid] = (spec["fid"], time.monotonic())
        self.by_tid[tid] = ls
        self.sent += 1

    def where(self, tid: bytes) -> str | None:
        """Where task ``tid`` is as this client knows it (sent to a leased
        worker, or queued here for one), for an error message; None when
        it is in neither place."""
        ls = self.by_tid.get(tid)
        if ls is not None:
            _, written = ls.meta.get(tid, (b"", time.monotonic()))
            state = "closed" if ls.conn.closed else "open"
            return (f"sent {time.monotonic() - written:.1f} s ago to leased worker {ls.wid} of "
                    f"node {ls.node} at {ls.address} ({len(ls.inflight)} task(s) unanswered "
                    f"there, connection {state}{', lease asked back' if ls.revoked else ''}); "
                    f"its answer has not come")
        for q in self.queues.values():
            if any(spec["tid"] == tid for spec, _ in q):
                return (f"queued here for a free leased worker of its shape "
                        f"({len(q)} task(s) queued)")
        return None

    def unqueue(self, key: tuple) -> list[bytes]:
        """Empty the queue of shape ``key``: the ids of the tasks it held."""
        q = self.queues.pop(key, None)
        return [spec["tid"] for spec, _ in q] if q else []

    def drop(self, tid: bytes) -> bool:
        """Remove queued task ``tid`` (cancelled): True when it was here."""
        for key, q in self.queues.items():
            for item in q:
                if item[0]["tid"] == tid:
                    q.remove(item)
                    if not q:
                        del self.queues[key]
                    return True
        return False

    def drop_many(self, tids: list[bytes]) -> list[bytes]:
        """Remove the queued tasks among ``tids``: the ids of those removed."""
        want, out = set(tids), []
        for key in list(self.queues):
            q = self.queues[key]
            keep: deque[tuple[dict, dict]] = deque()
            for item in q:
                if item[0]["tid"] in want:
                    out.append(item[0]["tid"])
                else:
                    keep.append(item)
            if keep:
                self.queues[key] = keep
            else:
                del self.queues[key]
        return out

    def pick(self, key: tuple) -> ClientLease | None:
        """A lease of shape ``key`` to write a task to now: an idle one; a
        busy one with room (behind its tasks) only once the node declined
        another lease of the shape (a task never waits behind another on a
        worker while the node may have a CPU for it)."""
        best = None
        deep = key in self.saturated
        if spread.is_spread(key):
            return self._pick_spread(key, deep)
        for ls in self.shapes.get(key, ()):
            if ls.revoked or ls.gone or (ls.held_back and ls.inflight):
                continue
            n = len(ls.inflight)
            if not n:
                return ls
            if deep and n < PIPELINE and (best is None or n < len(best.inflight)) \
                    and self._short(ls):
                best = ls
        return best

    def _pick_spread(self, key: tuple, deep: bool) -> ClientLease | None:
        """``pick`` for a SPREAD shape: an idle lease, else (once a node
        declined another) one with room behind short tasks, in turn over the
        nodes (the one whose node took a task longest ago)."""
        usable = [ls for ls in self.shapes.get(key, ())
                  if not (ls.revoked or ls.gone or (ls.held_back and ls.inflight))]
        idle = [ls for ls in usable if not ls.inflight]
        if not idle and deep:
            idle = [ls for ls in usable if len(ls.inflight) < PIPELINE and self._short(ls)]
        plan = self.spread
        now = time.monotonic()
        if idle and len(usable) < MAX_LEASES and not plan.covered(key, usable, now):
            # leases on some nodes are still coming: no node runs ahead of them
            idle = [ls for ls in idle if plan.may_take(key, ls.node, now)]
        ls = plan.pick(idle)
        if ls is not None:
            self.spread.took(ls.node)
        return ls

    def _short(self, ls: "ClientLease") -> bool:
        """Whether every task in flight on ``ls`` is expected to end soon."""
        run_s = self.run_s
        oldest = time.monotonic()
        for fid, at in ls.meta.values():
            if run_s.get(fid, SHORT) >= SHORT:
                return False
            oldest = min(oldest, at)
        return time.monotonic() - oldest < 2 * SHORT

    def wants(self, key: tuple, now: float) -> bool:
        """Whether to ask for another lease of shape ``key`` now."""
        if key in self.asking or now < self.ask_after.get(key, 0.0):
            return False
        held = [ls for ls in self.shapes.get(key, ()) if not ls.revoked]
        return len(held) < MAX_LEASES

    def add(self, ls: ClientLease) -> None:
        """Hold ``ls``; it comes in revoked when its node asked it back
        before it was added (its caller returns it at once)."""
        if self.revoked_early.pop(ls.lease, 0) is None:
            ls.revoked = True
        self.shapes.setdefault(ls.key, []).append(ls)

    def revoke(self, lease: bytes) -> ClientLease | None:
        """The node asks lease ``lease`` back: the lease, now revoked; or
        None when it is not held (yet: its grant may still be on its way
        here, so the request is kept for ``add``)."""
        for ls in self.all():
            if ls.lease == lease:
                ls.revoked = True
                self._unsaturate(ls.key)
                return ls
        self.revoked_early[lease] = None
        while len(self.revoked_early) > 256:  # (grants that never came)
            del self.revoked_early[next(iter(self.revoked_early))]
        return None

    def remove(self, ls: ClientLease) -> None:
        ls.gone = True
        held = self.shapes.get(ls.key)
        if held is not None and ls in held:
            held.remove(ls)
            if not held:
                del self.shapes[ls.key]
        self._unsaturate(ls.key)
        self.saturated.discard(ls.key)  # (ask again before writing behind others)

    def _unsaturate(self, key: tuple) -> None:
        """No lease of shape ``key`` is left to take tasks (revoked, gone):
        the back-off of a request declined while we held some (saturated)
        has lost its reason, so the shape's next task asks at once (else a
        burst right after a revoke, as after a nested burst, goes through
        the head for the rest of that back-off)."""
        if key in self.saturated and not self.usable(key):
            self.saturated.discard(key)
            self.ask_after.pop(key, None)

    def answered(self, tid: bytes) -> ClientLease | None:
        ls = self.by_tid.pop(tid, None)
        if ls is None:
            return None
        meta = ls.meta.pop(tid, None)
        if meta is not None:
            now = time.monotonic()
            took = now - max(meta[1], ls.last_answer)  # (behind others: since the last answer)
            ls.last_answer = now
            old = self.run_s.get(meta[0])
            self.run_s[meta[0]] = took if old is None else 0.7 * old + 0.3 * took
            if len(self.run_s) > 4096:
                self.run_s.clear()
        if ls.inflight.pop(tid, None) is not None and not ls.inflight:
            ls.idle_since = time.monotonic()
            ls.held_back = False
        return ls

    def all(self) -> list[ClientLease]:
        return [ls for held in self.shapes.values() for ls in held]


class LeasesMixin:
    """The IO of leased workers for ``CoreClient`` (which has an IO thread)."""

    #: an InlineClient (a worker process, no IO thread) sends no task to a lease
    LEASES = True

    # provided by CoreClient
    token: bytes
    tls: Any
    loop: asyncio.AbstractEventLoop
    node: Any
    node_id: str
    closed: bool
    ready: dict[bytes, dict]
    subscribed: set[bytes]
    expected: set[bytes]
    pending_tasks: int
    _head_ops: dict
    _lock: threading.Lock
    _call_lock: threading.Lock
    _dreader: threading.Lock
    _unwatched: set[Any]
    if TYPE_CHECKING:  # pragma: no cover
        def _unwatch(self, conn: Any) -> None: ...
        def _close_watched(self, conn: Any) -> None: ...
        def send(self, dest: str, msg: dict, lazy: bool = False) -> None: ...
        def _object_ready(self, msg: dict) -> None: ...
        def _on_io_thread(self) -> bool: ...
        def _local_run(self, spec: dict) -> dict | None: ...
        def _direct_send(self, conn: Any, data: bytes, io_thread: bool) -> None: ...

    def _leases_init(self) -> None:
        self.leases = LeaseTable()
        self._lease_conns: dict[str, Any] = {}   # worker address -> BlockingConn
        self._fn_blobs: dict[bytes, bytes] = {}   # fid -> pickled function
        self._lease_timer: Any = None
        self._head_ops["lease_cancel"] = self._lease_cancel
        # SPREAD leases on other nodes: one connection per node (client/spread.py)
        self._node_links = spread.NodeLinks(self, self.leases.spread, self._lease_revoked,
                                            self._spread_node_lost)
        self._head_ops["lease_spill"] = self._lease_spill

    # ------------------------------------------------------------ routing
    def _lease_submit(self, spec: dict) -> bool:
        """Send ``spec`` to a leased worker (True), or leave it to the old
        path (False), asking for a lease of its shape when there is none."""
        key = shape_of(spec)
        if key is None or spec.get("fid") not in self._fn_blobs \
                or (self.pending_tasks > INFLIGHT and not QUEUE):
            return False
        if len(key) > 2:  # SPREAD: to a worker on any node, every argument inline
            run = self._local_run(dict(spec, strategy=None)) \
                if spread.spread_ready(spec, self.ready) else None
        else:
            run = self._local_run(spec)
        if run is None:
            return False
        if self.pending_tasks > 1 and QUEUE:
            # others of ours are unfinished: to a free lease, or queued here
            # for the next one of this shape that frees
            return self._lease_enqueue(spec, key, run)
        for attempt in (0, 1):
            sent, ask = self._lease_send(spec, key, run)
            if sent is not None:
                return True
            if not ask:
                return False
            if self.pending_tasks > 1:
                # other tasks of ours are unfinished (a burst, or other
                # threads): no new lease, which the burst's tasks placed by
                # the head would soon call back
                with self._lock:
                    self.leases.asking.discard(key)
                return False
            if attempt or self._on_io_thread():
                self._lease_ask(key, dict(spec.get("res") or {}))
                return False
            # no lease of this shape: ask for one and wait for the answer
            # (one node round trip), rather than racing the task the old
            # way against the lease for the same resources
            if not self._lease_ask(key, dict(spec.get("res") or {}), wait=True):
                return False
        return False

    def _lease_send(self, spec: dict, key: tuple, run: dict) -> tuple[Any, bool]:
        """Write ``run`` to a lease of shape ``key`` with room; returns that
        lease (None if none has room) and whether to ask for another."""
        ask = False
        with self._call_lock:
            with self._lock:
                ls = self.leases.pick(key)
                if ls is None:
                    if self.leases.wants(key, time.monotonic()):
                        self.leases.asking.add(key)
                        ask = True
                else:
                    self.leases.take(ls, spec)
            if ls is not None:
                self._lease_write(ls, spec, run, self._on_io_thread())
                # queued under the same lock as a refusal's hand-back (so
                # the head never hears of the hand-back first)
                self.send("head", messages.submit(dict(spec, lease=[ls.node, ls.wid])),
                          lazy=True)  # (a side report: the head takes an early task_done)
        return ls, ask

    def _lease_prepare(self, ls: ClientLease, spec: dict, run: dict) -> dict:
        """``run`` as the ``run_task`` message for leased worker ``ls``."""
        run["op"], run["lease"] = "run_task", ls.lease
        fid = spec["fid"]
        if fid not in ls.conn.fids:
            ls.conn.fids.add(fid)
            run["fblob"] = self._fn_blobs[fid]
        return messages.lean_run_task(run)  # (the worker puts the defaults back)

    def _lease_write(self, ls: ClientLease, spec: dict, run: dict, io_thread: bool) -> None:
        """Write task ``run`` to leased worker ``ls`` (``_call_lock`` held)."""
        self._lease_out(ls.conn, b"".join(bytes(b) for b in frames.encode(
            [self._lease_prepare(ls, spec, run)])), io_thread)

    def _lease_out(self, conn: Any, data: bytes, io_thread: bool) -> None:
        """Send ``data`` to a leased worker (``_call_lock`` held).  Plain
        TCP: written by this thread, without blocking (``_direct_send``).
        TLS: an SSL socket is used by the IO thread only (no thread reads
        it while another writes it): ``data`` joins what waits for that
        thread's next write to this worker, and the IO thread is woken once
        for all of it (a burst submitted meanwhile leaves in one write)."""
        if not conn.tls:
            self._direct_send(conn, data, io_thread)
            return
        if conn.closed:
            return  # the worker is gone: its reader handles the loss
        conn.wbuf += data
        if conn.writing:
            return  # a writer callback sends it when the socket takes more
        if io_thread:
            self._tls_write(conn)
        elif not conn.flushing:
            conn.flushing = True
            try:
                self.loop.call_soon_threadsafe(self._tls_flush, conn)
            except RuntimeError:  # the loop is closed: shutting down
                pass

    def _tls_flush(self, conn: Any) -> None:
        """(IO thread) Write what user threads queued for a TLS leased worker."""
        with self._call_lock:
            conn.flushing = False
            if not conn.writing:
                self._tls_write(conn)

    def _tls_write(self, conn: Any) -> None:
        """(IO thread, ``_call_lock`` held) Write ``conn.wbuf`` on a TLS
        connection without blocking; what the socket does not take now waits
        for it to be writable.  (An SSL write left unfinished is retried with
        the same bytes at the front of the buffer, which only grows
        meanwhile: what OpenSSL requires of a retry.)"""
        wbuf = conn.wbuf
        if not wbuf or conn.closed:
            return
        try:
            n = conn.sock.send(wbuf)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            n = 0
        except OSError as e:  # the worker is gone: its reader notices
            logger.info("write to leased worker at %s failed: %s", conn.address, e)
            conn.closed = True
            wbuf.clear()
            return
        del wbuf[:n]
        if wbuf and not conn.writing:
            conn.writing = True
            self.loop.add_writer(conn.sock.fileno(), self._tls_writable, conn)

    def _tls_writable(self, conn: Any) -> None:
        """(IO thread) A TLS leased worker's socket takes more: send what waits."""
        with self._call_lock:
            self._tls_write(conn)
            if not conn.wbuf or conn.closed:
                conn.writing = False
                try:
                    self.loop.remove_writer(conn.sock.fileno())
                except (ValueError, OSError):
                    pass

    def _lease_waits(self, key: tuple) -> bool:
        """Whether a burst of shape ``key`` keeps queuing here though no
        lease of it is held or asked for (a worker's client waits for a
        retry, client/worker_leases.py)."""
        return False

    # ------------------------------------------------------------ bursts
    def _lease_enqueue(self, spec: dict, key: tuple, run: dict) -> bool:
        """(a burst) Write ``spec`` to a free lease of its shape, or queue it
        here for the next lease that frees; False when no lease of the shape
        is held or coming (the old path takes it)."""
        ask = retry = False
        with self._call_lock:
            with self._lock:
                table = self.leases
                q = table.queues.get(key)
                ls = None if q else table.pick(key)
                if ls is None:
                    if table.wants(key, time.monotonic()):
                        table.asking.add(key)
                        ask = True
                    elif not table.usable(key) and key not in table.asking \
                            and not self._lease_waits(key):
                        return False  # declined lately: the old path
                    if q is None:
                        q = table.queues[key] = deque()
                        # a lease of the shape is held that takes no task now
                        # (a SPREAD one whose node ran ahead of the others)
                        # and no request is out (a back-off): ask once it ends
                        retry = not ask and key not in table.asking
                    q.append((spec, run))
                    table.queued += 1
                else:
                    table.take(ls, spec)
            if ls is not None:
                busy = len(ls.inflight) - 1  # written behind these on that worker
                self._lease_write(ls, spec, run, self._on_io_thread())
                self.send("head", messages.submit(dict(spec, lease=[ls.node, ls.wid, busy])),
                          lazy=True)
            else:
                # before any lease_start of it (the IO thread takes the
                # queue under this same lock)
                self.send("head", messages.submit(dict(spec, lease_q=self.node_id)), lazy=True)
        if ask:
            self._lease_ask(key, dict(spec.get("res") or {}))
        elif retry:
            self._lease_retry_soon(key)
        return True

    def _lease_retry_soon(self, key: tuple) -> None:
        """(any thread) ``_lease_retry`` on the IO thread."""
        try:
            self.loop.call_soon_threadsafe(self._lease_retry, key)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _lease_pump(self, key: tuple, io_thread: bool = True) -> None:
        """Send queued tasks of shape ``key`` to its leases with room, and
        tell the head where they went (one report per lease)."""
        starts: dict[ClientLease, list[bytes]] = {}
        runs: dict[ClientLease, list[dict]] = {}
        busy: dict[ClientLease, int] = {}
        ask = False
        with self._call_lock:
            while True:
                with self._lock:
                    q = self.leases.queues.get(key)
                    if not q:
                        break
                    ls = self.leases.pick(key)
                    if ls is None:
                        if self.leases.wants(key, time.monotonic()):
                            self.leases.asking.add(key)
                            ask = True
                        break
                    spec, run = q.popleft()
                    if not q:
                        del self.leases.queues[key]
                    if ls not in busy:
                        busy[ls] = len(ls.inflight)
                    self.leases.take(ls, spec)
                runs.setdefault(ls, []).append(self._lease_prepare(ls, spec, run))
                starts.setdefault(ls, []).append(spec["tid"])
            for ls, msgs in runs.items():  # one write per worker
                self._lease_out(ls.conn, b"".join(
                    bytes(b) for batch in frames.encode_batches(msgs) for b in batch), io_thread)
            for ls, tids in starts.items():
                self.send("head", {"op": "lease_start", "lease": [ls.node, ls.wid],
                                   "tids": tids, "busy": busy[ls]}, lazy=True)
        if ask:
            self._lease_ask(key, dict(key[0]))

    def _lease_hand_back(self, key: tuple) -> None:
        """No lease left for shape ``key``: its queued tasks go to the head,
        which places them."""
        with self._call_lock:
            with self._lock:
                if self.leases.usable(key):
                    return
                tids = self.leases.unqueue(key)
            if tids and not self.closed:
                self.send("head", {"op": "lease_unrun", "tids": tids})

    def _lease_spill(self, msg: dict) -> None:
        """(IO thread) Another node has room for tasks queued here: those not
        sent yet go to the head, which places them there."""
        with self._call_lock:
            with self._lock:
                tids = self.leases.drop_many(msg["tids"])
            if tids and not self.closed:
                self.send("head", {"op": "lease_unrun", "tids": tids})

    def _lease_cancel(self, msg: dict) -> None:
        """(IO thread) The head cancelled a task queued here: never send it
        (its outcome, cancelled, comes from the head)."""
        with self._call_lock:
            with self._lock:
                self.leases.drop(msg["tid"])

    # ------------------------------------------------------------ getting one
    def _lease_ask(self, key: tuple, res: dict, wait: bool = False) -> bool:
        """Ask the node for a lease of shape ``key`` (on the IO thread); with
        ``wait``, block until it answers: True when one was granted."""
        async def obtain() -> bool:
            if spread.is_spread(key):
                with self._lock:
                    held = list(self.leases.shapes.get(key, ()))
                r = await self._node_links.request(key, res, held)
            else:
                node = self.node
                if node is None or self.closed:
                    raise ConnectionError("no connection to the node")
                r = await node.request({"op": "lease_request", "res": res, "env": key[1]})
            if not r.get("lease"):
                with self._lock:
                    if self.leases.usable(key):
                        # the node has no more for us: our leases take tasks
                        # behind others; ask again less often
                        self.leases.saturated.add(key)
                        self.leases.ask_after[key] = time.monotonic() + BACKOFF * 4
                    else:
                        self.leases.ask_after[key] = time.monotonic() + BACKOFF
                return False
            conn: Any = self._lease_conns.get(r["address"])
            if conn is None or conn.closed:
                conn = await self.loop.run_in_executor(
                    None, BlockingConn, r["address"], self.token, 5.0, self.tls)
                conn.wbuf = bytearray()
                conn.writing = False
                conn.flushing = False  # (TLS) a write by the IO thread is on its way
                conn.fids = set()
                conn.link = None  # (not an actor's: see actor_calls, the reading thread)
                # plain TCP: read by two threads; TLS: by the IO thread only,
                # which never blocks on it (a partial record waits for the rest)
                conn.sock.setblocking(False)
                if self.closed:
                    conn.close()
                    return False
                self._lease_conns[r["address"]] = conn
                self.loop.add_reader(conn.sock.fileno(), self._lease_readable, conn)
            ls = ClientLease(r, key, conn)
            with self._lock:
                self.leases.add(ls)
                self.leases.saturated.discard(key)
            if ls.revoked:
                # asked back while its grant was on its way: give it back now
                # (it would sit idle until the grace while the node waits)
                self._lease_return(ls)
                return False
            self._arm_lease_timer()
            return True

        async def ask() -> bool:
            granted = False
            try:
                granted = await obtain()
            except Exception as e:  # noqa: BLE001 - tasks keep going the old way
                logger.debug("no lease for %s: %s", key, e)
                with self._lock:
                    self.leases.ask_after[key] = time.monotonic() + 1.0
            finally:
                with self._lock:
                    self.leases.asking.discard(key)
            self._lease_pump(key)  # tasks queued meanwhile: to the new lease, or behind others
            if not granted:
                self._lease_hand_back(key)  # (only if no lease of the shape is left)
                self._lease_retry(key)
            return granted
        try:
            fut = asyncio.run_coroutine_threadsafe(ask(), self.loop)
        except RuntimeError:  # the loop is closed: shutting down
            self.leases.asking.discard(key)
            return False
        if not wait:
            return False
        try:
            return fut.result(2.0)
        except Exception:  # noqa: BLE001 - a slow node: the old way this time
            return False

    def _lease_retry(self, key: tuple) -> None:
        """(IO thread) A lease request of shape ``key`` was declined while
        tasks of the shape wait here for the leases held (all busy): ask
        again once the back-off ends.  Nothing else may: the leases' tasks
        may run long (or wait for the queued ones) and the submitter may be
        blocked in submission back-pressure."""
        with self._lock:
            if self.closed or key not in self.leases.queues or key in self.leases.asking:
                return
            delay = self.leases.ask_after.get(key, 0.0) - time.monotonic()
        self.loop.call_later(max(delay, 0.0) + 0.001, self._lease_pump, key)

    # ------------------------------------------------------------ answers
    def _lease_readable(self, conn: Any) -> None:
        """(IO thread) Answers from a leased worker; or its connection closed.
        A thread waiting for one of them reads a plain connection itself (see
        actor_calls, the reading thread): then leave it to that thread.  A
        TLS connection is read here only."""
        if conn.tls:
            self._lease_after(conn, *self._lease_answers(conn))
            if conn.wbuf and not conn.writing and not conn.closed:
                with self._call_lock:  # (a write that wanted a read first)
                    self._tls_write(conn)
            return
        if not self._dreader.acquire(blocking=False):
            self._unwatch(conn)
            return
        try:
            later = self._lease_answers(conn)
        finally:
            self._dreader.release()
        self._lease_after(conn, *later)

    def _lease_answers(self, conn: Any) -> tuple[list, set, list]:
        """Read and handle the answers on leased worker connection ``conn``
        (``_dreader`` held, or a TLS connection on the IO thread): what
        waits for them is woken and the leases freed here, on the reading
        thread; returns what is left for the IO
        thread (tasks to hand back, shapes to pump, leases to return)."""
        try:
            batches = conn.read_available()
        except (OSError, ProtocolError) as e:
            logger.info("connection to leased worker %s failed: %s", conn.address, e)
            batches, conn.closed = [], True
        unrun: list[bytes] = []
        freed: set[tuple] = set()
        returns: list[ClientLease] = []
        for msgs, _ in batches:
            for m in msgs:
                op = m["op"]
                if op not in WORKER_OPS:
                    messages.refuse("lease holder", messages.ACTOR, op, conn.address)
                    continue
                for info in direct.result_infos(m):
                    self._object_ready(info)
                if op == "lease_handback":
                    # its running task blocks in get: the tasks behind it
                    # there go to the head (which places them elsewhere)
                    with self._lock:
                        for tid in m["tids"]:
                            if self.leases.answered(tid) is not None:
                                unrun.append(tid)
                        for held in self.leases.all():
                            if held.lease == m["lease"]:
                                held.held_back = bool(held.inflight)
                                freed.add(held.key)  # (its queue: another lease, or the head)
                    continue
                with self._lock:
                    ls = self.leases.answered(m["tid"])
                    if op == "lease_refused":
                        unrun.append(m["tid"])
                        if ls is not None:
                            ls.revoked = True
                    if ls is None:
                        continue
                    if ls.revoked:
                        if not ls.inflight:
                            returns.append(ls)  # asked back: once its tasks are answered
                        freed.add(ls.key)
                    elif ls.key in self.leases.queues:
                        freed.add(ls.key)
        return unrun, freed, returns

    def _lease_after(self, conn: Any, unrun: list, freed: set, returns: list) -> None:
        """(IO thread) What answers read on ``conn`` leave to do."""
        for ls in returns:
            self._lease_return(ls)
        if unrun:
            with self._call_lock:
                self.send("head", {"op": "lease_unrun", "tids": unrun})
        for key in freed:
            self._lease_pump(key)
            self._lease_hand_back(key)  # (only when no lease of the shape is left)
        if conn.closed:
            self._lease_conn_lost(conn)

    def _lease_unanswered(self, ls: ClientLease) -> list[bytes]:
        """(lock held) Forget the tasks ``ls`` has not answered: the results
        of theirs still awaited here (to ask the head about)."""
        oids: list[bytes] = []
        for tid, n in ls.inflight.items():
            self.leases.by_tid.pop(tid, None)
            ls.meta.pop(tid, None)
            oids += [o for o in (ids.object_id(tid, i) for i in range(n))
                     if o in self.expected and o not in self.ready]
        ls.inflight.clear()
        return oids

    def _lease_conn_lost(self, conn: Any) -> None:
        """(IO thread) A leased worker's connection closed (it died, or its
        node did): its leases are gone; the head tells the outcome of the
        tasks it had not answered."""
        self._unwatched.discard(conn)
        self._close_watched(conn)
        address = conn.address
        if self._lease_conns.get(address) is conn:
            del self._lease_conns[address]
        oids = []
        keys = set()
        with self._call_lock:  # a task written just now has its submission queued
            with self._lock:
                for ls in self.leases.all():
                    if ls.conn is not conn:
                        continue
                    keys.add(ls.key)
                    self.leases.remove(ls)
                    oids += self._lease_unanswered(ls)
                self.subscribed.update(oids)
            if oids and not self.closed:
                self.send("head", messages.oids("subscribe", oids))
        for key in keys:  # tasks queued for that worker: another lease, or the head
            self._lease_hand_back(key)

    # ------------------------------------------------------------ giving back
    def _lease_return(self, ls: ClientLease) -> None:
        """(IO thread) Give ``ls`` back to its node (nothing is in flight on it)."""
        with self._lock:
            if ls.gone:
                return
            self.leases.remove(ls)
        node = self.node
        if ls.node != self.node_id:  # (a SPREAD lease on another node)
            self._node_links.send(ls.node, {"op": "lease_return", "lease": ls.lease,
                                            "idle": True})
        elif node is not None and not node.closed:
            # (every task sent on it was answered: its worker goes back to the pool now)
            node.send({"op": "lease_return", "lease": ls.lease, "idle": True})

    def _spread_node_lost(self, node: str) -> None:
        """(IO thread) Our connection to another node closed: it ended our
        leases there (or died with them); no more tasks go to them."""
        with self._lock:
            gone = [ls.lease for ls in self.leases.all() if ls.node == node]
        for lease in gone:
            self._lease_revoked({"lease": lease})

    def _lease_revoked(self, msg: dict) -> None:
        """(IO thread) The node wants a lease back: no more tasks go to it;
        it is returned once those sent are answered."""
        with self._lock:
            ls = self.leases.revoke(msg["lease"])
            if ls is None:
                return  # (not added yet: it is returned as it is added)
            idle = not ls.inflight
        if idle:
            self._lease_return(ls)
        # no lease of the shape left: its queued tasks go to the head, which
        # places them fairly with the work the node asked its leases back for
        self._lease_hand_back(ls.key)

    def _arm_lease_timer(self) -> None:
        if self._lease_timer is None and not self.closed:
            self._lease_timer = self.loop.call_later(GRACE / 2, self._lease_tick)

    def _lease_tick(self) -> None:
        """(IO thread) Return the leases idle for longer than ``GRACE``."""
        self._lease_timer = None
        now = time.monotonic()
        with self._lock:
            held = self.leases.all()
            idle = [ls for ls in held if not ls.inflight and now - ls.idle_since >= GRACE]
        for ls in idle:
            self._lease_return(ls)
        if len(idle) < len(held):
            self._arm_lease_timer()

    def _leases_close(self) -> None:
        """(IO thread, at close) The node ends our leases when our connection
        to it closes; the workers' connections are closed here."""
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        self.leases.queues.clear()  # (the head cancels a closing driver's tasks)
        for conn in list(self._lease_conns.values()):
            for remove in (self.loop.remove_reader, self.loop.remove_writer):
                try:
                    remove(conn.sock.fileno())
                except (ValueError, OSError):
                    pass
            conn.close()
        self._lease_conns.clear()
        self._node_links.close()


__all__ = ["LeasesMixin", "LeaseTable", "ClientLease", "shape_of", "ENABLED"]
