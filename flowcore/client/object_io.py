"""``ObjectIO``: how a process reads and writes object values.

Held by its ``CoreClient`` as ``client.objects``.  It owns the process's
mapping of its node's store and the pins of store objects it keeps between
gets (``held``, see objects/held.py), and does put (inline, or written into
the store: mapped, or over the node connection in client mode), get and wait
(the ready table and the waiters stay the client's: its connections fill
them), the reads from the store, the adoption and the release of held pins,
prefetching, and ``ObjectRef.future()``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .. import ids
from ..exceptions import (FlowcoreError, GetTimeoutError, ObjectLostError, SerializationError,
                          ObjectStoreFullError)
from ..objects.held import HeldObjects
from ..objects.ref import ObjectRef
from ..objects.serialization import (NONE_BYTES, deserialize, read_layout, rebuilding_class,
                                     serialize)
from ..protocol.chunks import fetch_chunks
from ..protocol import messages
from .futures import Resolver

if TYPE_CHECKING:  # pragma: no cover
    from .core import CoreClient

logger = logging.getLogger("flowcore.client")

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


class ObjectIO:
    """The object values of one client's process (see the module docstring)."""

    def __init__(self, client: CoreClient):
        self.client = client
        # pins of store objects kept between gets while referenced here
        self.held = HeldObjects()
        self.mapping: Any = None  # objects.mapping.StoreMapping, made on first use
        self._resolver: Any = None  # completes futures off the IO thread (futures.py)

    def close(self) -> None:
        """Unmap the store (at the client's close)."""
        if self.mapping is not None:
            self.mapping.close()

    # ------------------------------------------------------------ put
    def put(self, value: Any) -> ObjectRef:
        """``flowcore.put``: store ``value`` (inline if small) owned here."""
        return self.put_serialized(serialize(value))

    def put_serialized(self, s: Any) -> ObjectRef:
        """``put`` of an already serialized value."""
        c = self.client
        oid = ids.object_id(c.ids.task_id(), 0)
        nested = list(s.contained_refs)
        if s.total_size <= INLINE_MAX or not c.has_store():
            data = s.to_bytes()
            msg = messages.put_inline(oid, data, nested)
            with c._lock:
                c.ready[oid] = messages.object_ready_inline(oid, data, nested=bool(nested))
        else:
            self.write_to_store(oid, s, hold=c.HOLDS)
            msg = messages.put_stored(oid, c.node_id, s.total_size, nested)
            with c._lock:
                c.ready[oid] = messages.object_ready_stored(oid, [c.node_id], s.total_size,
                                                            bool(nested))
        ref: ObjectRef[Any] = ObjectRef(oid, c, counted=True)
        c.send("head", msg)
        return ref

    def write_to_store(self, oid: bytes, s: Any, hold: bool = False) -> None:
        """Create, fill and seal ``oid`` in the local node's store.  ``hold``:
        keep it pinned (a held pin, see objects/held.py) from the seal on, so
        that the first get of it is local too."""
        c = self.client
        from ..objects.store import Location
        if c._dropped:  # refs dropped just now: their unpins go before the create
            c._wake_from_finaliser()  # (the node may wait for their memory)
        r = c.request("node", messages.create(oid, s.total_size))
        if "error" in r:
            if r.get("full"):
                raise ObjectStoreFullError(r["error"])
            raise FlowcoreError(f"cannot create object in the store: {r['error']}")
        if r.get("exists"):
            return  # a re-run whose result was already copied here
        if c.remote_store:
            self._upload(oid, s)
            return
        loc = Location.from_wire(r["loc"])
        try:
            view = self.store_mapping().writable(loc)
            s.write_to(view)
            del view
        except BaseException:
            c.send("node", messages.oid_op("abort", oid))
            raise
        seal = messages.oid_op("seal", oid)
        if hold:
            with c._lock:
                held = self.held.add(oid, loc, c.node_id) is not None
            if held:
                seal["pin"] = True  # the node pins it for us as it seals it
        c.send("node", seal)

    def _upload(self, oid: bytes, s: Any) -> None:
        """Fill the created object ``oid`` over the node connection (client
        mode): chunks with a bounded number unacknowledged, then seal."""
        c = self.client
        data = bytearray(s.total_size)
        s.write_to(memoryview(data))
        view = memoryview(data)

        async def upload() -> str | None:
            c._drain()  # after the messages queued before
            node = c.node
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
        error = asyncio.run_coroutine_threadsafe(upload(), c.loop).result()
        if error:
            raise FlowcoreError(f"cannot write object {oid.hex()} to node {c.node_id}: "
                                f"{error}")

    def _download(self, oid: bytes, size: int) -> bytearray:
        """Read the pinned object ``oid`` over the node connection (client mode)."""
        c = self.client

        async def download() -> bytearray:
            node = c.node
            if node is None:
                raise ConnectionError("no connection to the node")
            out = bytearray(size)

            def write(start: int, data: memoryview) -> None:
                out[start:start + len(data)] = data
            try:
                await fetch_chunks(node, oid, size, write, WIRE_CHUNK, WIRE_WINDOW)
            except ObjectLostError as e:
                raise ObjectLostError(f"object {oid.hex()} could not be read from node "
                                      f"{c.node_id}: {e}") from None
            return out
        return asyncio.run_coroutine_threadsafe(download(), c.loop).result()

    def store_mapping(self) -> Any:
        """This process's mapping of its node's store (made on first use)."""
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
        c = self.client
        new = []
        fresh = True
        with c._lock:
            for oid in oids:
                if oid in c.ready:
                    continue
                if oid in c.expected or oid in c.subscribed:
                    fresh = False
                    continue
                c.subscribed.add(oid)
                new.append(oid)
        if new:
            msg: dict[str, Any] = messages.oids("subscribe", new)
            if ack is not None:
                msg["ack"] = ack
            c.send("head", msg)
        return fresh and bool(new)

    def wait_ready(self, oids: list[bytes], num: int, timeout: float | None,
                   fail_fast: bool = False) -> set[bytes]:
        """Block until at least ``num`` of ``oids`` are ready or the timeout
        passes; returns the ready ones.  ``fail_fast``: return as soon as one
        of them is ready with an error (``get`` raises it at once)."""
        c = self.client
        if c._dpending:
            c._flush_direct(c._on_io_thread())  # before waiting for their answers
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
                        c._poke_reader()  # a thread reading actors' answers waits for it
            return cb

        cb_lock = threading.Lock()
        callbacks: dict[bytes, Callable[[], None]] = {}
        with c._lock:
            failed = False
            for oid in uniq:
                if oid in c.ready:
                    ready.add(oid)
                    failed = failed or (fail_fast and bool(c.ready[oid].get("error")))
                else:
                    missing.append(oid)
            if len(ready) >= num or not missing or failed:
                return ready
            if c.lost:
                raise FlowcoreError(c.lost_message())
            event = threading.Event()  # (made only when there is something to wait for)
            wake = threading.Event()  # event, or the head said some are pending
            for oid in missing:
                cb = callbacks[oid] = make_cb(oid)
                c.waiters.setdefault(oid, []).append(cb)
            # answers of direct actor calls among them: read by this thread
            reading = c._reads_answers(missing)
        # inside a task, the CPU is given back only when the get will really
        # block: objects the head already has ready arrive at once, so ask it
        # which are pending first (a subscription it acknowledges)
        token = None
        task = c._task_of_thread()
        if c.kind == "worker" and task is not None:
            token = next(c._ack_ids)
            c._acks[token] = lambda pending: wake.set()
        blocked = False
        try:
            if self._subscribe_missing(missing, ack=token) and token is not None:
                deadline = None if timeout is None else time.monotonic() + timeout
                c._wait_event(wake, timeout)
                if deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
            blocked = False if event.is_set() else c._set_blocked(True, task)
            warn_after = GET_WARN_AFTER if c.kind == "driver" else None
            wait = c._wait_reading if reading else c._wait_event
            if warn_after is not None and (timeout is None or timeout > warn_after):
                if not wait(event, warn_after):
                    self.warn_slow(missing, ready, warn_after)
                    wait(event, None if timeout is None else timeout - warn_after)
            else:
                wait(event, timeout)
        finally:
            if token is not None:
                c._acks.pop(token, None)
            if blocked:
                c._set_blocked(False, task)
            with c._lock:
                for oid, cb in callbacks.items():
                    lst = c.waiters.get(oid)
                    if lst and cb in lst:
                        lst.remove(cb)
                        if not lst:
                            del c.waiters[oid]
        with cb_lock:
            return set(ready)

    def _failed(self, oid: bytes) -> bool:
        """Whether ``oid`` is ready here holding an error."""
        c = self.client
        info = c.ready.get(oid)
        return info is not None and bool(info.get("error"))

    def warn_slow(self, missing: list[bytes], ready: set[bytes], waited: float) -> None:
        """One warning for a wait that goes on for long: why it is not ready."""
        c = self.client
        pending = [o for o in missing if o not in ready]
        if not pending:
            return
        try:
            why = c.query("explain", oid=pending[0])["text"]
        except Exception as e:  # noqa: BLE001 - the warning must not break the wait
            why = f"(could not ask the head: {e})"
        import warnings
        msg = (f"flowcore: still waiting after {waited:.0f} s for {len(pending)} object(s); "
               f"{pending[0].hex()[:12]}: {why}")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _why_not_ready(self, oid: bytes, waited: float | None) -> str:
        """For a get that timed out after ``waited`` s: where ``oid``'s task
        is as this client knows it and, after a wait of a second or more,
        the head's explanation (asked with a short timeout)."""
        c = self.client
        with c._lock:
            here = c.leases.where(ids.task_of(oid))
        parts = [here] if here else []
        if waited is not None and waited >= 1.0:
            try:
                r = c.request("head", {"op": "explain", "oid": oid}, timeout=2.0)
                text = (r.get("result") or {}).get("text") if "error" not in r else None
            except Exception:  # noqa: BLE001 - the error must not fail to be raised
                text = None
            if text:
                parts.append(f"the head says: {text}")
        return "".join(f"; {p}" for p in parts)

    # ------------------------------------------------------------ get
    def get_values(self, refs: list[ObjectRef], timeout: float | None) -> list[Any]:
        """``flowcore.get``: the values of ``refs``, waiting up to ``timeout``."""
        c = self.client
        oids = [r._id for r in refs]
        if not c._dpending:  # all ready (a put, a finished task): no waiting
            with c._lock:
                table = c.ready
                infos = [table.get(oid) for oid in oids]
            if None not in infos:
                return [self.value_of(info) for info in infos]  # type: ignore[arg-type]
        asked = timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        if len(oids) == 1 and (c._dconns or c._lease_conns) and c.kind != "worker":
            # the answer of a direct actor call or leased task: this thread reads it
            c._await_direct(oids[0], deadline,
                            GET_WARN_AFTER if c.kind == "driver" else None)
            info = c.ready.get(oids[0])
            if info is not None:  # (a failure raises here, as below)
                return [self.value_of(info)]
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        # the first failure among them is raised at once (Ray): the others
        # may wait for something that happens only once it is handled
        ready = self.wait_ready(oids, len(set(oids)), timeout, fail_fast=True)
        with c._lock:
            failed = next((oid for oid in oids if oid in ready and self._failed(oid)), None)
        if failed is not None and len(ready) < len(set(oids)):
            with c._lock:
                info = c.ready.get(failed)
            if info is not None:
                self.value_of(info)  # raises the failure
        if len(ready) < len(set(oids)):
            n = len(set(oids)) - len(ready)
            first = next(o for o in oids if o not in ready)
            raise GetTimeoutError(
                f"get() timed out after {asked}s: {n} of {len(set(oids))} object(s) not ready "
                f"(first: {first.hex()}{self._why_not_ready(first, asked)}); use "
                f"flowcore.wait() to poll, or a longer timeout")
        del deadline
        out = []
        for oid in oids:
            with c._lock:
                info = c.ready.get(oid)
            if info is None:  # dropped meanwhile by another thread
                self._subscribe_missing([oid])
                self.wait_ready([oid], 1, None)
                info = c.ready[oid]
            out.append(self.value_of(info))
        return out

    def value_of(self, info: dict) -> Any:
        """Deserialize an object from its ready notification; raise if it is an error."""
        inline = info.get("inline")
        if inline is not None:
            if inline == NONE_BYTES and not info.get("error"):
                return None  # (the commonest answer: no unpickling)
            value = self._deserialize(info, inline)
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
        try:
            if h.layout is None:
                h.layout = read_layout(buf)
            return deserialize(buf, h.layout)
        except Exception as exc:
            raise self._unreadable(info, exc) from exc

    def _unreadable(self, info: dict, exc: BaseException) -> SerializationError:
        """The error for an object whose bytes arrived but do not unpickle
        here: which task made it, and which class was being rebuilt."""
        c = self.client
        oid = info["oid"]
        what = f"object {oid.hex()}"
        if asyncio._get_running_loop() is None:  # may block: ask the head for the name
            try:
                t = c.query("task_info", tid=ids.task_of(oid)) or {}
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
        c = self.client
        from ..objects.store import Location
        oid = info["oid"]
        if c.node is None and c.failover.switch is not None:
            c.failover.await_switch()
        if not c.has_store():
            raise ObjectLostError(f"object {oid.hex()} lives in a node's store but this "
                                  f"process is not attached to a node")
        with c._lock:
            found = self.held.lookup(oid, c.node_id)
            # keep the pin this get takes while a reference to it lives here
            hold = c.HOLDS and not c.remote_store and (
                bool(c.HELD_UNREFERENCED) or oid in c.refcounts)
        if found is not None:  # pinned and mapped already: no round trip
            h, key = found
            return self._deserialize_held(info, h, self.store_mapping().readable(
                h.loc, self.held.on_release(h, key, c._wake_from_finaliser)))
        for attempt in range(6):
            req: dict[str, Any] = messages.oid_op("pin", oid)
            if hold:
                req["cache"] = True
            if c.node_id not in info.get("nodes", ()):
                # held elsewhere: our node pulls it from one of the holders first
                req["sources"] = [[n, a] for n, a in
                                  zip(info.get("nodes", ()), info.get("addrs", ()))]
                req["size"] = info["size"]
            try:
                r = c.request("node", req, timeout=None)
            except ConnectionError as e:  # our node died: wait for the next one, ask again
                if c.kind != "driver" or not c.failover.await_switch():
                    raise
                r = {"error": f"the node holding the pin went away: {e}"}
            if "error" not in r:
                break
            # the copies we knew of are gone (a node died): ask the head again;
            # it answers once the object is rebuilt from its lineage, or why not
            with c._lock:
                c.ready.pop(oid, None)
                c.subscribed.discard(oid)
            self._subscribe_missing([oid])
            if not self.wait_ready([oid], 1, 300.0):
                raise ObjectLostError(r["error"])
            with c._lock:
                info = c.ready.get(oid) or info
            if info.get("inline") is not None or info.get("error"):
                return self.value_of(info)
        else:
            raise ObjectLostError(r["error"])
        if c.remote_store:
            try:
                data = self._download(oid, info["size"])
            finally:
                c.send("node", messages.oids("unpin", [oid]))
            return self._deserialize(info, memoryview(data))
        return self._read_pinned(info, Location.from_wire(r["loc"]), hold)

    def _read_pinned(self, info: dict, loc: Any, hold: bool = True) -> Any:
        """Read ``info``'s object at ``loc``, pinned for this process.
        ``hold``: keep the pin (while referenced here, or as one of a
        worker's last reads) unless one is held already; else it goes with
        the last view."""
        c = self.client
        oid = info["oid"]
        extra: list[bytes] = []
        with c._lock:
            h = self.held.add(oid, loc, c.node_id) if hold and (
                c.HELD_UNREFERENCED or oid in c.refcounts) else None
            if h is not None:
                key = self.held.new_key(h)
                if c.HELD_UNREFERENCED:
                    extra = self.held.trim(c.HELD_UNREFERENCED)
        if extra:
            c.send("node", messages.oids("unpin", extra))
        if h is not None:
            return self._deserialize_held(info, h, self.store_mapping().readable(
                loc, self.held.on_release(h, key, c._wake_from_finaliser)))

        def release(oid: bytes = oid) -> None:  # a finaliser: no locks
            if not c.closed:
                c._unpins.append(oid)
                if len(c._unpins) == 1:
                    c._wake_from_finaliser()

        buf = self.store_mapping().readable(loc, release)
        return self._deserialize(info, buf)

    def adopt_pinned(self, deps: list[dict]) -> None:
        """(Reading thread) The arguments our node pinned for us as it sent
        a task (``pinned``: their locations) become held pins now, whether
        or not the task runs; one we already hold is unpinned at once."""
        c = self.client
        from ..objects.store import Location
        extra: list[bytes] = []
        adopted = 0
        with c._lock:
            for d in deps:
                wire = d.pop("pinned", None)
                if wire is None:
                    continue
                if not c.HOLDS or self.held.add(d["oid"], Location.from_wire(wire),
                                                c.node_id) is None:
                    extra.append(d["oid"])
                else:
                    adopted += 1
            if c.HELD_UNREFERENCED:  # (the task's own arguments are kept)
                extra += self.held.trim(max(c.HELD_UNREFERENCED, adopted))
        if extra:
            c.send("node", messages.oids("unpin", extra))

    def release_cached(self, msg: dict) -> None:
        """(Reading thread) The node needs the room of held pins: give back
        those no view uses now, the others as their last view goes; then
        answer (after the unpins, on the same connection)."""
        c = self.client
        unpins = []
        with c._lock:
            for oid in msg["oids"]:
                if self.held.drop(oid):
                    unpins.append(oid)
        if unpins:
            c.send("node", messages.oids("unpin", unpins))
        c.send("node", messages.reply(msg.get("rid")))

    def prefetch(self, oids: Iterable[bytes]) -> None:
        """Ask this process's node to pull ready objects held only elsewhere."""
        c = self.client
        if not c.has_store():
            return
        items = []
        with c._lock:
            for oid in oids:
                info = c.ready.get(oid)
                if info and info.get("inline") is None and info.get("nodes") \
                        and c.node_id not in info["nodes"]:
                    items.append([oid, info["size"],
                                  [[n, a] for n, a in zip(info["nodes"], info.get("addrs", ()))]])
        if items:
            c.send("node", {"op": "prefetch", "objects": items})

    def future_for(self, ref: ObjectRef) -> concurrent.futures.Future:
        """``ObjectRef.future()``: a future completed with the value."""
        c = self.client
        fut: concurrent.futures.Future = concurrent.futures.Future()
        oid = ref._id

        def resolve() -> None:
            def work() -> None:
                try:
                    with c._lock:
                        info = c.ready.get(oid)
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
            if c._on_io_thread() or c._reader_ident == threading.get_ident():
                if self._resolver is None:
                    self._resolver = Resolver()
                self._resolver.submit(work)
            else:
                work()

        def cancel_if_cancelled(f: concurrent.futures.Future, r: ObjectRef = ref) -> None:
            if f.cancelled():
                c.cancel(r, False, True)
        fut.add_done_callback(cancel_if_cancelled)
        with c._lock:
            if oid in c.ready:
                ready_now = True
            else:
                ready_now = False

                def resolve_holding(r: ObjectRef = ref) -> None:
                    resolve()  # the default keeps the ref alive until resolved
                c.waiters.setdefault(oid, []).append(resolve_holding)
        if ready_now:
            resolve()
        else:
            self._subscribe_missing([oid])
        return fut

