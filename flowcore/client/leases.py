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
  registration that may still be on its way;
* otherwise the task goes the old way (local-first, or the head), and, when
  this shape has no lease request open, one is asked for on the IO thread;
  a declined request is asked again only after a short back-off.

The worker's answer (``call_result``: the inline returns; larger ones come
from the head as ``object_ready``) is read by the IO thread.  A lease idle
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
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import ids
from ..exceptions import ProtocolError
from ..protocol import frames, messages
from ..protocol.blocking import BlockingConn
from . import direct

logger = logging.getLogger("flowcore.client")

#: FLOWCORE_LEASES=0 sends ready tasks the old way (local-first / the head)
ENABLED = os.environ.get("FLOWCORE_LEASES", "1") not in ("0", "")
#: tasks written to one leased worker and not answered yet, at most (1, as
#: Ray: a task never waits behind another on a worker while a CPU may be free)
PIPELINE = int(os.environ.get("FLOWCORE_LEASE_PIPELINE", "1"))
#: leases of one shape held at once, at most
MAX_LEASES = int(os.environ.get("FLOWCORE_LEASES_PER_SHAPE", "8"))
#: tasks go to leased workers while their submitter has at most this many
#: unfinished (a burst beyond is spread by the head, as local-first does)
INFLIGHT = int(os.environ.get("FLOWCORE_LEASE_INFLIGHT", "2"))
#: seconds a lease with nothing to do is kept before it is returned
GRACE = float(os.environ.get("FLOWCORE_LEASE_GRACE", "0.5"))
#: seconds before asking again for a shape whose lease was declined
BACKOFF = 0.05

#: the ops a lease holder takes on its connection to a leased worker
WORKER_OPS = messages.ops_for(messages.CALLER, messages.ACTOR)


class ClientLease:
    __slots__ = ("lease", "node", "wid", "address", "key", "conn", "inflight", "revoked",
                 "idle_since", "gone")

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


def shape_of(spec: dict) -> tuple | None:
    """The lease shape of ``spec`` (its resources and runtime_env), or None
    when it may not go to a leased worker."""
    if spec.get("actor") is not None or spec.get("kind", "task") != "task" \
            or spec.get("strategy") is not None or spec.get("nested"):
        return None
    xopts = spec.get("xopts")
    if xopts and (xopts.get("gen") or xopts.get("max_calls")):
        return None
    res = spec.get("res") or {}
    if res.get("GPU"):
        return None
    renv = spec.get("renv")
    return tuple(sorted(res.items())), (renv or {}).get("key")


class LeaseTable:
    """The leases one client holds (no IO; callers hold the client's lock)."""

    def __init__(self) -> None:
        self.shapes: dict[tuple, list[ClientLease]] = {}
        self.by_tid: dict[bytes, ClientLease] = {}
        self.asking: set[tuple] = set()
        self.ask_after: dict[tuple, float] = {}
        self.sent = 0   # tasks sent to leased workers (for tests and views)

    def pick(self, key: tuple) -> ClientLease | None:
        best = None
        for ls in self.shapes.get(key, ()):
            if ls.revoked or ls.gone or len(ls.inflight) >= PIPELINE:
                continue
            if best is None or len(ls.inflight) < len(best.inflight):
                best = ls
        return best

    def wants(self, key: tuple, now: float) -> bool:
        """Whether to ask for another lease of shape ``key`` now."""
        if key in self.asking or now < self.ask_after.get(key, 0.0):
            return False
        held = [ls for ls in self.shapes.get(key, ()) if not ls.revoked]
        return len(held) < MAX_LEASES

    def add(self, ls: ClientLease) -> None:
        self.shapes.setdefault(ls.key, []).append(ls)

    def remove(self, ls: ClientLease) -> None:
        ls.gone = True
        held = self.shapes.get(ls.key)
        if held is not None and ls in held:
            held.remove(ls)
            if not held:
                del self.shapes[ls.key]

    def answered(self, tid: bytes) -> ClientLease | None:
        ls = self.by_tid.pop(tid, None)
        if ls is not None and ls.inflight.pop(tid, None) is not None and not ls.inflight:
            ls.idle_since = time.monotonic()
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
    _lock: threading.Lock
    _call_lock: threading.Lock
    if TYPE_CHECKING:  # pragma: no cover
        def _close_watched(self, conn: Any) -> None: ...
        def send(self, dest: str, msg: dict) -> None: ...
        def _object_ready(self, msg: dict) -> None: ...
        def _on_io_thread(self) -> bool: ...
        def _local_run(self, spec: dict) -> dict | None: ...
        def _direct_send(self, conn: Any, data: bytes, io_thread: bool) -> None: ...

    def _leases_init(self) -> None:
        self.leases = LeaseTable()
        self._lease_conns: dict[str, Any] = {}   # worker address -> BlockingConn
        self._fn_blobs: dict[bytes, bytes] = {}   # fid -> pickled function
        self._lease_timer: Any = None

    # ------------------------------------------------------------ routing
    def _lease_submit(self, spec: dict) -> bool:
        """Send ``spec`` to a leased worker (True), or leave it to the old
        path (False), asking for a lease of its shape when there is none."""
        key = shape_of(spec)
        if key is None or spec.get("fid") not in self._fn_blobs \
                or self.pending_tasks > INFLIGHT or self.tls is not None:
            return False  # (a TLS socket is written by the IO thread only: no lease)
        run = self._local_run(spec)
        if run is None:
            return False
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
                    tid = spec["tid"]
                    ls.inflight[tid] = spec.get("nret", 1)
                    self.leases.by_tid[tid] = ls
                    self.leases.sent += 1
            if ls is not None:
                run["op"], run["lease"] = "run_task", ls.lease
                fid = spec["fid"]
                if fid not in ls.conn.fids:
                    ls.conn.fids.add(fid)
                    run["fblob"] = self._fn_blobs[fid]
                self._direct_send(ls.conn, b"".join(bytes(b) for b in frames.encode([run])),
                                  self._on_io_thread())
                # queued under the same lock as a refusal's hand-back (so
                # the head never hears of the hand-back first)
                self.send("head", messages.submit(dict(spec, lease=[ls.node, ls.wid])))
        return ls, ask

    # ------------------------------------------------------------ getting one
    def _lease_ask(self, key: tuple, res: dict, wait: bool = False) -> bool:
        """Ask the node for a lease of shape ``key`` (on the IO thread); with
        ``wait``, block until it answers: True when one was granted."""
        async def ask() -> bool:
            ls = None
            try:
                node = self.node
                if node is None or self.closed:
                    raise ConnectionError("no connection to the node")
                r = await node.request({"op": "lease_request", "res": res, "env": key[1]})
                if not r.get("lease"):
                    with self._lock:
                        self.leases.ask_after[key] = time.monotonic() + BACKOFF
                    return False
                conn: Any = self._lease_conns.get(r["address"])
                if conn is None or conn.closed:
                    conn = await self.loop.run_in_executor(
                        None, BlockingConn, r["address"], self.token, 5.0, self.tls)
                    conn.wbuf = bytearray()
                    conn.writing = False
                    conn.fids = set()
                    if self.closed:
                        conn.close()
                        return False
                    self._lease_conns[r["address"]] = conn
                    self.loop.add_reader(conn.sock.fileno(), self._lease_readable, conn)
                ls = ClientLease(r, key, conn)
                with self._lock:
                    self.leases.add(ls)
                self._arm_lease_timer()
                return True
            except Exception as e:  # noqa: BLE001 - tasks keep going the old way
                logger.debug("no lease for %s: %s", key, e)
                with self._lock:
                    self.leases.ask_after[key] = time.monotonic() + 1.0
                return False
            finally:
                with self._lock:
                    self.leases.asking.discard(key)
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

    # ------------------------------------------------------------ answers
    def _lease_readable(self, conn: Any) -> None:
        """(IO thread) Answers from a leased worker; or its connection closed."""
        try:
            batches = conn.read_available()
        except (OSError, ProtocolError) as e:
            logger.info("connection to leased worker %s failed: %s", conn.address, e)
            batches, conn.closed = [], True
        unrun: list[bytes] = []
        for msgs, _ in batches:
            for m in msgs:
                op = m["op"]
                if op not in WORKER_OPS:
                    messages.refuse("lease holder", messages.ACTOR, op, conn.address)
                    continue
                for info in direct.result_infos(m):
                    self._object_ready(info)
                with self._lock:
                    ls = self.leases.answered(m["tid"])
                if op == "lease_refused":
                    unrun.append(m["tid"])
                    if ls is not None:
                        ls.revoked = True
                if ls is not None and not ls.inflight and (
                        ls.revoked or self.pending_tasks > INFLIGHT):
                    # asked back, or a burst goes through the head (whose
                    # tasks would wait for the lease's resources)
                    self._lease_return(ls)
        if unrun:
            with self._call_lock:
                self.send("head", {"op": "lease_unrun", "tids": unrun})
        if conn.closed:
            self._lease_conn_lost(conn)

    def _lease_conn_lost(self, conn: Any) -> None:
        """(IO thread) A leased worker's connection closed (it died, or its
        node did): its leases are gone; the head tells the outcome of the
        tasks it had not answered."""
        self._close_watched(conn)
        address = conn.address
        if self._lease_conns.get(address) is conn:
            del self._lease_conns[address]
        oids = []
        with self._call_lock:  # a task written just now has its submission queued
            with self._lock:
                for ls in self.leases.all():
                    if ls.conn is not conn:
                        continue
                    self.leases.remove(ls)
                    for tid, n in ls.inflight.items():
                        self.leases.by_tid.pop(tid, None)
                        oids += [o for o in (ids.object_id(tid, i) for i in range(n))
                                 if o in self.expected and o not in self.ready]
                    ls.inflight.clear()
                self.subscribed.update(oids)
            if oids and not self.closed:
                self.send("head", messages.oids("subscribe", oids))

    # ------------------------------------------------------------ giving back
    def _lease_return(self, ls: ClientLease) -> None:
        """(IO thread) Give ``ls`` back to its node (nothing is in flight on it)."""
        with self._lock:
            if ls.gone:
                return
            self.leases.remove(ls)
        node = self.node
        if node is not None and not node.closed and ls.node == self.node_id:
            node.send({"op": "lease_return", "lease": ls.lease})

    def _lease_revoked(self, msg: dict) -> None:
        """(IO thread) The node wants a lease back: no more tasks go to it;
        it is returned once those sent are answered."""
        with self._lock:
            ls = next((x for x in self.leases.all() if x.lease == msg["lease"]), None)
            if ls is None:
                return
            ls.revoked = True
            idle = not ls.inflight
        if idle:
            self._lease_return(ls)

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
        for conn in list(self._lease_conns.values()):
            try:
                self.loop.remove_reader(conn.sock.fileno())
            except (ValueError, OSError):
                pass
            conn.close()
        self._lease_conns.clear()


__all__ = ["LeasesMixin", "LeaseTable", "ClientLease", "shape_of", "ENABLED"]
