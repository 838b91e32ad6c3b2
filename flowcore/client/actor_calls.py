"""The caller's side of direct actor calls, with IO (a mixin of ``CoreClient``).

The routing decisions live in ``client/direct.py`` (no IO); this module
writes calls to actors' sockets (from the calling thread when nothing is
unanswered, else batched for the IO thread), reads their answers, looks
actors' addresses up at the head and hands unanswered calls of a lost
connection back to the head.

Answers are read by the thread that waits for them, when it can: a thread
whose ``get``/``wait`` waits for the answer of a direct call becomes the
*reader* (one at a time, ``_dreader``) and blocks in ``select`` on the
actors' connections itself, so an answer wakes that thread alone, not the
IO thread and then it.  Otherwise (nobody waits: futures, ``await``,
fire-and-forget calls) the IO thread reads them.  Both watch a connection
until the IO thread, finding the reader busy when the connection becomes
readable, stops watching it (``_unwatched``); it watches it again on its
next round (``core.SIDE_FLUSH``) once no thread reads, or at once when a
reader leaves while other threads wait.  Whatever reads a connection holds
``_dreader`` meanwhile.  TLS connections (to actors and to leased workers)
are read and written by the IO thread only.
"""
from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .. import ids
from ..exceptions import ProtocolError
from ..protocol import frames, messages
from ..protocol.blocking import BlockingConn
from . import direct
from .direct import ActorLink

if TYPE_CHECKING:  # pragma: no cover
    from .object_io import ObjectIO

logger = logging.getLogger("flowcore.client")

#: the ops a caller takes on its connection to an actor
ACTOR_OPS = messages.ops_for(messages.CALLER, messages.ACTOR)
#: the flags of the zero-wait peek for an idle connection's EOF (as a plain
#: int: or-ing the enum members costs more than the peek itself)
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
#: the flag of a write that never blocks
_NO_WAIT = int(socket.MSG_DONTWAIT)


class ActorCallsMixin:
    # provided by CoreClient
    token: bytes
    tls: Any
    client_id: str
    loop: asyncio.AbstractEventLoop
    head: Any
    closed: bool
    ready: dict[bytes, dict]
    subscribed: set[bytes]
    expected: set[bytes]
    waiters: dict[bytes, list[Callable[[], None]]]
    lost: str | None
    direct: direct.DirectCalls
    objects: "ObjectIO"
    _lock: threading.Lock
    _call_lock: threading.Lock
    _dconns: dict[str, Any]
    _dpending: dict[str, list[dict]]
    _dreader: threading.Lock
    _reader_ident: int | None
    _reader_pipe: tuple[int, int] | None
    _readers_waiting: int
    _unwatched: set[Any]
    _reader_conns: list[Any]
    _reads: int
    _reads_seen_before: int
    _tick_armed: bool
    _lease_conns: dict[str, Any]
    leases: Any  # client.leases.LeaseTable
    if TYPE_CHECKING:  # pragma: no cover
        def _lease_answers(self, conn: Any) -> tuple[list, set, list]: ...
        def _lease_after(self, conn: Any, unrun: list, freed: set, returns: list) -> None: ...
        def _lease_conn_lost(self, conn: Any) -> None: ...
        def _lease_readable(self, conn: Any) -> None: ...
        def _close_watched(self, conn: Any) -> None: ...
        def send(self, dest: str, msg: dict, lazy: bool = False) -> None: ...
        def _arm_rounds(self) -> None: ...
        def _wake_from_finaliser(self) -> None: ...
        def _object_ready(self, msg: dict) -> None: ...
        def _head_away(self) -> bool: ...
        def _on_io_thread(self) -> bool: ...

    def _submit_call(self, spec: dict) -> None:
        """Send an actor call: a direct one is written to the actor's socket
        by the calling thread itself (no hand-off to the IO thread), its
        record queued for the head."""
        with self._call_lock:  # one decision and write at a time: calls keep their order
            routes = self._route_call(messages.submit(spec))
            for dest, msg in routes:  # the call queued before its record wakes the IO thread
                if dest != "head":
                    self._direct_write(dest, msg)
            for dest, msg in routes:  # a direct call's record is a side report
                if dest == "head":
                    self.send("head", msg, lazy=len(routes) > 1)

    def _route_call(self, msg: dict) -> list[tuple[str, dict]]:
        """An actor call's way out: straight to the actor and recorded at the
        head, or through the head."""
        spec = msg["tasks"][0]
        link = self.direct.link(spec["actor"])
        run = None
        lookup = False
        if link.open and self._peer_closed(link):
            with self._lock:  # its process is gone (EOF not read yet): via the head
                self.direct.no_address(link)
        with self._lock:
            if not self._head_away():
                run = self.direct.route(link, spec, self.ready, self.expected, self.client_id)
            if run is None:
                self.direct.sent_to_head(link, spec["tid"])
                if direct.ENABLED and link.wants_lookup(time.monotonic()):
                    link.looking = lookup = True
            else:
                self.direct.sent_direct(link, spec)
        if run is None:
            if lookup:
                self._start_lookup(link)
            return [("head", msg)]
        return [("head", messages.submit(dict(spec, direct_epoch=link.epoch))),
                (link.key, run)]

    def _peer_closed(self, link: ActorLink) -> bool:
        """Whether the actor's end of an idle connection has closed (its
        process died; the head may already have failed the call that saw it,
        before anybody read the EOF).  A zero-wait peek, plain TCP only."""
        conn = self._dconns.get(link.key)
        if conn is None or self.tls is not None:
            return False
        try:
            return conn.sock.recv(1, _PEEK_NOW) == b""
        except (BlockingIOError, InterruptedError):
            return False  # open, nothing to read
        except OSError:
            return True

    def _prepare_direct(self, aid: bytes) -> None:
        """Before an actor call is routed (the caller's thread)."""

    def _direct_write(self, key: str, msg: dict) -> None:
        """Send or queue a direct call (``_call_lock`` held).  A call to an
        actor with no other call of ours unanswered is written at once, by
        this thread; behind unanswered ones it is queued and leaves with the
        next flush (this thread waiting for a result, the IO thread sending
        the calls' records, or a full batch), so a burst travels in few
        writes.  No thread ever blocks writing to an actor (see
        ``_direct_send``), so the IO thread always gets to read answers."""
        link = self.direct.by_key.get(key)
        pending = self._dpending.setdefault(key, [])
        pending.append(msg)
        if (link is not None and len(link.inflight) <= 1) or len(pending) >= 64:
            self._flush_direct_locked(self._on_io_thread())

    def _flush_direct(self, io_thread: bool) -> None:
        with self._call_lock:
            self._flush_direct_locked(io_thread)

    def _flush_direct_locked(self, io_thread: bool) -> None:
        pending, self._dpending = self._dpending, {}
        for key, msgs in pending.items():
            conn = self._dconns.get(key)
            if conn is None:
                continue  # closed since: its process is gone; the head fails them
            if conn.tls:  # a TLS socket is written by the IO thread only
                if io_thread:
                    conn.write(msgs)
                else:
                    self._dpending[key] = msgs
                    self._wake_from_finaliser()
                continue
            self._direct_send(conn, b"".join(bytes(b) for b in frames.encode(msgs)), io_thread)

    def _direct_send(self, conn: Any, data: bytes, io_thread: bool) -> None:
        """Write without blocking (``_call_lock`` held); what the socket does
        not take now waits in ``conn.wbuf`` for the IO thread to send when
        the socket is writable again."""
        wbuf = conn.wbuf
        if not wbuf:
            try:
                n = conn.sock.send(data, _NO_WAIT)
            except BlockingIOError:
                n = 0
            except OSError as e:  # the actor is gone: its reader notices
                logger.info("write to actor at %s failed: %s", conn.address, e)
                conn.closed = True
                return
            if n == len(data):
                return
            data = data[n:]
        wbuf += data
        if not conn.writing:
            conn.writing = True
            if io_thread:
                self._arm_writer(conn)
            else:
                self.loop.call_soon_threadsafe(self._arm_writer, conn)

    def _arm_writer(self, conn: Any) -> None:
        if not conn.closed:
            self.loop.add_writer(conn.sock.fileno(), self._direct_writable, conn)

    def _direct_writable(self, conn: Any) -> None:
        """(IO thread) The actor's socket takes more: send what waits."""
        with self._call_lock:
            wbuf = conn.wbuf
            try:
                n = conn.sock.send(wbuf, _NO_WAIT) if wbuf else 0
            except BlockingIOError:
                return
            except OSError:
                conn.closed = True
                n = len(wbuf)
            del wbuf[:n]
            if not wbuf:
                conn.writing = False
                try:
                    self.loop.remove_writer(conn.sock.fileno())
                except (ValueError, OSError):
                    pass

    def _start_lookup(self, link: ActorLink) -> None:
        """Ask the head where the actor listens and connect (on the IO thread)."""

        async def lookup() -> None:
            try:
                head = self.head
                if head is None:
                    raise ConnectionError("no connection to the head")
                r = await head.request({"op": "actor_direct", "aid": link.aid})
                if not r.get("address"):
                    self.direct.no_address(link)
                    return
                conn: Any = await self.loop.run_in_executor(  # (gains wbuf and writing)
                    None, BlockingConn, r["address"], self.token, 5.0, self.tls)
                conn.wbuf = bytearray()   # what the socket did not take yet
                conn.writing = False      # a writer callback is armed
                conn.link = link
                conn.dropping = False     # its end is being handled
                if not conn.tls:  # read by two threads (see above): never blocks
                    conn.sock.setblocking(False)
                if self.closed:
                    conn.close()
                    return
                old = self._dconns.get(link.key)
                self._dconns[link.key] = conn
                self.loop.add_reader(conn.sock.fileno(), self._direct_readable, conn, link)
                if old is not None:
                    self._direct_readable(old, link, drop=True)  # an older process's
                with self._lock:
                    self.direct.connected(link, r)
            except Exception as e:  # noqa: BLE001 - calls keep going through the head
                logger.debug("no direct connection to actor %s: %s", link.aid.hex(), e)
                self.direct.no_address(link, 1.0)
            finally:
                link.looking = False
        try:
            asyncio.run_coroutine_threadsafe(lookup(), self.loop)
        except RuntimeError:  # the loop is closed: shutting down
            link.looking = False

    def _direct_readable(self, conn: Any, link: ActorLink, drop: bool = False) -> None:
        """(IO thread) Answers from an actor; or its connection closed."""
        if not drop:
            if conn.tls:
                self._read_answers(conn)
            elif not self._dreader.acquire(blocking=False):
                self._unwatch(conn)  # a waiting thread reads it now
                return
            else:
                try:
                    self._read_answers(conn)
                finally:
                    self._dreader.release()
            if not conn.closed:
                return
        if conn.dropping:
            return
        conn.dropping = True
        self._unwatched.discard(conn)
        self._close_watched(conn)
        current = self._dconns.get(link.key) is conn
        if current:
            del self._dconns[link.key]
        self._direct_lost(link, current)

    def _read_answers(self, conn: Any) -> None:
        """Read and handle what an actor's connection has (``_dreader`` held,
        or a TLS connection on the IO thread)."""
        try:
            batches = conn.read_available()
        except (OSError, ProtocolError) as e:
            logger.info("direct connection to actor %s failed: %s", conn.link.aid.hex(), e)
            batches, conn.closed = [], True
        for msgs, _ in batches:
            for m in msgs:
                self._direct_message(m)

    # ------------------------------------------------------------ the reading thread
    def _reads_answers(self, missing: list[bytes]) -> bool:
        """Whether a thread waiting for ``missing`` should read actors'
        answers itself: one of them is the answer of a direct call in flight
        on a plain connection (``_lock`` held)."""
        if not self._dconns and not self._lease_conns:
            return False
        by_tid = self.leases.by_tid
        if by_tid and self.tls is None and any(ids.task_of(o) in by_tid for o in missing):
            return True  # (a leased worker's connection, plain TCP like every link here)
        tids = None
        for link in self.direct.links.values():
            if link.inflight:
                if tids is None:
                    tids = {ids.task_of(o) for o in missing}
                if not tids.isdisjoint(link.inflight):
                    conn = self._dconns.get(link.key)
                    if conn is not None and not conn.tls:
                        return True
        return False

    def _wait_reading(self, event: threading.Event, timeout: float | None) -> bool:
        """Wait for ``event`` reading the actors' connections on this thread
        (another thread reads them already: just wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self._read_while_waiting(event.is_set, deadline)
        if done is not None:
            return done
        # another thread reads, or no connection to read (closed): the
        # answer comes through it, or through the head
        return event.wait(None if deadline is None
                          else max(0.0, deadline - time.monotonic()))

    def _read_while_waiting(self, done: Callable[[], bool],
                            deadline: float | None) -> bool | None:
        """Read the actors' connections on this thread until ``done()``
        (True) or the deadline (False); None when another thread reads them
        or none is left to read."""
        with self._lock:
            self._readers_waiting += 1
        try:
            if not self._dreader.acquire(blocking=False):
                return None
            try:
                return self._read_until(done, deadline)
            finally:
                self._reader_ident = None
                self._dreader.release()
                if self._unwatched:
                    if self._readers_waiting > 1:
                        # others wait for answers this thread no longer reads
                        self._call_io(self._rewatch, True)
                    elif not self._tick_armed:  # a round watches them again
                        self._call_io(self._arm_rounds)
        finally:
            with self._lock:
                self._readers_waiting -= 1

    def _await_direct(self, oid: bytes, deadline: float | None,
                      warn_after: float | None) -> None:
        """``get`` of one ref that is the answer of a direct call in flight
        on a plain connection: read it on this thread, with none of the
        general wait's bookkeeping (events, callbacks, subscriptions).
        Returns when it is ready, at the deadline, or when this thread cannot
        read it (another one reads, the connection closed): the general wait
        then takes over.  A driver still warns after ``warn_after``."""
        tid = ids.task_of(oid)
        poke = self._poke_reader  # the answer may come another way (the head)
        with self._lock:
            if oid in self.ready or self.lost:
                return
            ls = self.leases.by_tid.get(tid)
            if ls is not None:  # a task on a leased worker
                conn = ls.conn
            else:
                for link in self.direct.links.values():
                    if tid in link.inflight:
                        break
                else:
                    return
                conn = self._dconns.get(link.key)
            if conn is None or conn.tls or conn.closed:
                return
            self.waiters.setdefault(oid, []).append(poke)
        ready = self.ready
        try:
            if self._dpending:
                self._flush_direct(False)
            if warn_after is not None and (deadline is None
                                           or deadline - time.monotonic() > warn_after):
                if self._read_while_waiting(lambda: oid in ready,
                                            time.monotonic() + warn_after) is not False:
                    return
                self.objects.warn_slow([oid], set(), warn_after)
            self._read_while_waiting(lambda: oid in ready, deadline)
        finally:
            with self._lock:
                lst = self.waiters.get(oid)
                if lst and poke in lst:
                    lst.remove(poke)
                    if not lst:
                        del self.waiters[oid]

    def _read_until(self, done: Callable[[], bool], deadline: float | None) -> bool | None:
        """Read until ``done()`` (True) or the deadline (False); None when
        there is no connection left to read."""
        if self._reader_pipe is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._reader_pipe = (r, w)
        pipe_r = self._reader_pipe[0]
        self._reader_ident = threading.get_ident()
        while not done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            conns = [c for c in list(self._dconns.values()) if not c.closed and not c.tls]
            if self._lease_conns and self.tls is None:  # leased workers' (plain TCP)
                conns += [c for c in list(self._lease_conns.values()) if not c.closed]
            self._reader_conns = conns
            if not conns:
                return None
            try:
                readable, _, _ = select.select(conns + [pipe_r], [], [], left)
            except (OSError, ValueError):  # one closed meanwhile: look again
                readable = []
            for c in readable:
                if c is pipe_r:
                    try:
                        os.read(pipe_r, 4096)
                    except OSError:
                        pass
                    continue
                if c.closed:
                    continue
                self._reads += 1
                if c.link is None:  # a leased worker's
                    later = self._lease_answers(c)
                    if c.closed or any(later):  # the rest is the IO thread's
                        self._call_io(self._lease_after, c, *later)
                    continue
                self._read_answers(c)
                if c.closed:  # its end is handled by the IO thread
                    self._call_io(self._direct_readable, c, c.link, True)
        return True

    def _poke_reader(self) -> None:
        """Wake the reading thread (its event was set by another thread, or a
        connection it should read was added)."""
        ident = self._reader_ident
        if ident is not None and ident != threading.get_ident() and self._reader_pipe:
            try:
                os.write(self._reader_pipe[1], b"x")
            except OSError:
                pass

    def _call_io(self, fn: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _unwatch(self, conn: Any) -> None:
        """(IO thread) Leave ``conn`` to the reading thread until a round."""
        try:
            self.loop.remove_reader(conn.sock.fileno())
        except (ValueError, OSError):
            pass
        self._unwatched.add(conn)
        if conn not in self._reader_conns:
            self._poke_reader()  # it does not know this connection yet
        self._arm_rounds()

    def _rewatch(self, now: bool = False) -> None:
        """(IO thread) Watch again the connections no thread reads now (on a
        round: unless a thread read some since the last round, as a thread
        making calls one after another does between its gets)."""
        if not now:
            reads = self._reads
            if reads != self._reads_seen_before:
                self._reads_seen_before = reads
                return
        if not self._unwatched or not self._dreader.acquire(blocking=False):
            return  # a thread reads them
        try:
            conns = list(self._unwatched)
            self._unwatched.clear()
        finally:
            self._dreader.release()
        for conn in conns:
            if conn.link is None:  # a leased worker's
                if conn.closed:
                    self._lease_conn_lost(conn)
                elif self._lease_conns.get(conn.address) is conn:
                    leased: Any = conn
                    self.loop.add_reader(leased.sock.fileno(), self._lease_readable, leased)
                continue
            if conn.closed:
                self._direct_readable(conn, conn.link, drop=True)
            elif self._dconns.get(conn.link.key) is conn:
                watched: Any = conn
                self.loop.add_reader(watched.sock.fileno(), self._direct_readable, watched,
                                     watched.link)

    def _close_reader_pipe(self) -> None:
        pipe, self._reader_pipe = self._reader_pipe, None
        for fd in pipe or ():
            try:
                os.close(fd)
            except OSError:
                pass

    def _direct_message(self, msg: dict) -> None:
        if msg["op"] not in ACTOR_OPS:
            messages.refuse("caller", messages.ACTOR, msg["op"], "actor")
            return
        link = self.direct.links.get(msg.get("actor") or b"")
        for info in direct.result_infos(msg):
            self._object_ready(info)
        with self._lock:
            if link is not None:
                self.direct.answered(link, msg["tid"])
            else:
                for lk in self.direct.links.values():
                    self.direct.answered(lk, msg["tid"])

    def _direct_lost(self, link: ActorLink, current: bool = True) -> None:
        """The actor's connection closed: the head tells the outcome of the
        calls it had not answered yet.  Under ``_call_lock``: a call written
        to the actor just now has its record queued for the head (by
        ``_submit_call``) before this asks about it, or the head would not
        know it yet and answer that it does not exist."""
        with self._call_lock:
            with self._lock:
                oids = [o for o in self.direct.lost(link, current)
                        if o in self.expected and o not in self.ready]
                self.subscribed.update(oids)
            if oids and not self.closed:
                self.send("head", messages.oids("subscribe", oids))

