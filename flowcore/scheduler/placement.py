"""The head's placement index: which live node a ready task goes to, at a
cost that does not grow with the number of nodes.

``SchedulerState`` used to answer "where does this task run" by scanning
every node (fits? most free CPU?) for every task it placed, and "where may
it run ahead" (pipelining) by scanning them again; at 1000 nodes that scan
was nearly all of the head's time.  ``PlacementIndex`` keeps the live nodes
ordered instead, in binary heaps with lazy deletion:

* by free CPU, most first (ties: the node that joined first), one heap per
  *shape* of a request (the set of non-CPU resource names it asks for; a
  heap holds only the nodes whose totals have all of them), for the default
  placement: the first node in that order that fits is the node with the
  most free CPU among those that fit, exactly what the scan chose.  A node
  with less free CPU than the request ends the walk (no later one has more);
* by load (running tasks per CPU, least first, same ties), for the node a
  CPU-only task is sent to ahead of time when none fits now.

A node whose free resources or running set change is only marked *dirty*
(a set insert, called from ``NodeRecord.take``/``give`` and the transition
layer); before a query the dirty nodes get their new keys pushed, and stale
heap entries are dropped when they reach the top.  A heap is rebuilt when
stale entries outnumber live ones, so its size stays within a small factor
of the node count.

Two answers are cached and stay exact: whether a request could ever fit
some node (totals only change when nodes join or die), and "nothing fits
now" for a request (valid until some node's free resources grow: taking
resources never makes a node fit).

``check()`` compares every answer the index can give with a full scan of
the nodes (the head's ``validate`` mode runs it after every message).
"""
from __future__ import annotations

from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..resources import EPS

if TYPE_CHECKING:  # pragma: no cover
    from .records import NodeRecord


#: a node's place in the heaps as one int (ints compare several times faster
#: than tuples, and a heap operation is a dozen comparisons):
#: ``-(value * 2**80) << 20 | join order`` (value: free CPU, or minus the
#: load), exact for every value that is a multiple of 2**-80 (any float
#: from 2**-27 up: whole and fractional amounts alike) and the first 2**20
#: nodes to join; a heap falls back to (-value, join order, node id) tuples
#: for any other
_SCALE = float(1 << 80)
_SEQ_BITS = 20
_SEQ_MASK = (1 << _SEQ_BITS) - 1


def _int_key(free: float, seq: int) -> int | None:
    """The int key of a node with ``free`` CPUs and join order ``seq``, or
    None when the int would not order it exactly."""
    f = free * _SCALE
    try:
        i = int(f)
    except (OverflowError, ValueError):  # inf, nan
        return None
    if i != f or seq > _SEQ_MASK:
        return None
    return (-i << _SEQ_BITS) | seq


class _Heap:
    """Live nodes of one shape, ordered by (-free CPU, join order): int keys
    (``_int_key``) while every node's key is exact, else tuples."""
    __slots__ = ("names", "heap", "keys", "failed", "exact")

    def __init__(self, names: frozenset[str]):
        self.names = names
        self.heap: list = []
        self.keys: dict[str, Any] = {}  # node id -> its live entry's key
        #: request -> the index's growth stamp when nothing fitted it
        self.failed: dict[tuple, int] = {}
        self.exact = True  # int keys

    def holds(self, node: "NodeRecord") -> bool:
        return _holds(self.names, node)

    def key(self, free: float, seq: int, nid: str) -> Any:
        if self.exact:
            k = _int_key(free, seq)
            if k is not None:
                return k
            self.to_tuples()
        return (-free, seq, nid)

    def set(self, nid: str, free: float, seq: int) -> None:
        key: Any = None
        if self.exact:  # (``key``, inlined: this runs for every node changed)
            f = free * _SCALE
            try:
                i = int(f)
            except (OverflowError, ValueError):  # inf, nan
                i = None
            if i is not None and i == f and seq <= _SEQ_MASK:
                key = (-i << _SEQ_BITS) | seq
        if key is None:
            key = self.key(free, seq, nid)
        if self.keys.get(nid) != key:
            self.keys[nid] = key
            heappush(self.heap, key)
            if len(self.heap) > 2 * len(self.keys) + 32:
                self.rebuild()

    def drop(self, nid: str) -> None:
        self.keys.pop(nid, None)

    def to_tuples(self) -> None:
        """A key cannot be an exact int: every key becomes a tuple."""
        self.exact = False
        self.keys = {nid: (-_free_of(k), k & _SEQ_MASK, nid) for nid, k in self.keys.items()}
        self.rebuild()

    def rebuild(self) -> None:
        self.heap = list(self.keys.values())
        heapify(self.heap)


def _holds(names: frozenset[str], node: "NodeRecord") -> bool:
    """Whether ``node``'s totals have every resource in ``names``."""
    if not names:
        return True
    tot = node.total
    return all(tot.get(k, 0.0) > 0.0 for k in names)


def _free_of(key: int) -> float:
    """The free CPUs an int key was made of."""
    return -float(key >> _SEQ_BITS) / _SCALE


def spread_load(node: "NodeRecord") -> float:
    """A node's load as SPREAD ranks it: running tasks per CPU (per one CPU
    on a node with fewer)."""
    return len(node.running) / max(node.total.get("CPU", 0.0), 1.0)


class _SpreadHeap:
    """Live nodes of one shape in SPREAD's order: (load, when SPREAD last
    chose it, join order), least first."""
    __slots__ = ("names", "heap", "keys")

    def __init__(self, names: frozenset[str]):
        self.names = names
        self.heap: list[tuple[float, int, int, str]] = []
        self.keys: dict[str, tuple[float, int, int, str]] = {}  # node id -> live entry

    def set(self, nid: str, key: tuple[float, int, int, str]) -> None:
        if self.keys.get(nid) != key:
            self.keys[nid] = key
            heappush(self.heap, key)
            if len(self.heap) > 2 * len(self.keys) + 32:
                self.heap = list(self.keys.values())
                heapify(self.heap)


class PlacementIndex:
    """Live nodes indexed by free CPU per request shape and by load.

    ``nodes`` is the head's node table (read, never changed here)."""

    def __init__(self, nodes: Mapping[str, "NodeRecord"]):
        self.nodes = nodes
        self.order: dict[str, int] = {}  # node id -> join order (its place in ``nodes``)
        self._next = 0
        self._by_seq: list[str] = []  # join order -> node id
        self._dirty: set[str] = set()  # changed since the free-CPU heaps were updated
        self._load_dirty: set[str] = set()  # ... since the load heap was
        self._free: dict[frozenset[str], _Heap] = {frozenset(): _Heap(frozenset())}
        #: by load (running tasks per CPU), least first: ``_Heap`` keys of
        #: minus the load
        self._load = _Heap(frozenset())
        self.ahead_alone = False  # (see ``least_loaded``)
        #: SPREAD's order per request shape (made on the first SPREAD task
        #: of that shape), the nodes changed since, and when SPREAD last
        #: chose each node (its turn: ties go to the one chosen longest ago)
        self._spread: dict[frozenset[str], _SpreadHeap] = {}
        self._spread_dirty: set[str] = set()
        self._spread_last: dict[str, int] = {}
        self._spread_clock = 0
        self._ever: dict[tuple, bool] = {}  # request items -> could fit some node's totals
        self._by_request: dict[tuple, _Heap] = {}  # request items -> the heap of its shape
        self.grown = 0  # bumped whenever some node's free resources may have grown
        #: bumped whenever a placement that failed may now succeed: a node
        #: joined, left, got resources back or runs fewer tasks
        self.freed = 0
        # the nodes that grew, in order: grown == _grew_base + len(_grew)
        self._grew: list[str] = []
        self._grew_base = 0

    # ------------------------------------------------------------ membership
    def __len__(self) -> int:
        return len(self.order)

    def add(self, node: "NodeRecord") -> None:
        """``node`` joined (or its record was replaced by a re-registration:
        it keeps its place in the order)."""
        nid = node.node_id
        node.index = self
        if nid not in self.order:
            self.order[nid] = self._next
            self._by_seq.append(nid)
            self._next += 1
        self._ever.clear()
        self._grow(nid)
        for h in self._free.values():
            if not h.holds(node):
                h.drop(nid)
        for sh in self._spread.values():
            if not _holds(sh.names, node):
                sh.keys.pop(nid, None)
        self._dirty.add(nid)
        self._load_dirty.add(nid)
        self._spread_dirty.add(nid)

    def remove(self, nid: str) -> None:
        """``nid`` died (or left): it is no longer a candidate."""
        if self.order.pop(nid, None) is None:
            return
        node = self.nodes.get(nid)
        if node is not None and node.index is self:
            node.index = None
        self._dirty.discard(nid)
        self._load_dirty.discard(nid)
        self._spread_dirty.discard(nid)
        for h in self._free.values():
            h.drop(nid)
        for sh in self._spread.values():
            sh.keys.pop(nid, None)
        self._load.drop(nid)
        self._ever.clear()
        self.freed += 1  # (a soft node affinity to it falls back to any node)

    # ------------------------------------------------------------ changes
    def touch(self, node: "NodeRecord") -> None:
        """``node``'s free resources or running set changed."""
        self._dirty.add(node.node_id)
        self._load_dirty.add(node.node_id)
        if self._spread:
            self._spread_dirty.add(node.node_id)

    def ran_less(self, node: "NodeRecord") -> None:
        """A task left ``node``'s running set: its load went down."""
        self.freed += 1
        self._dirty.add(node.node_id)
        self._load_dirty.add(node.node_id)
        if self._spread:
            self._spread_dirty.add(node.node_id)

    def released(self, node: "NodeRecord") -> None:
        """A task left ``node``'s running set and gave its resources back
        (``ran_less`` and ``gave`` in one)."""
        self._grow(node.node_id)
        self._dirty.add(node.node_id)
        self._load_dirty.add(node.node_id)
        if self._spread:
            self._spread_dirty.add(node.node_id)

    def gave(self, node: "NodeRecord") -> None:
        """Resources came back on ``node``: what did not fit may fit now."""
        self._grow(node.node_id)
        self._dirty.add(node.node_id)
        self._load_dirty.add(node.node_id)

    def _grow(self, nid: str) -> None:
        self.grown += 1
        self.freed += 1
        grew = self._grew
        grew.append(nid)
        if len(grew) > 4096:
            del grew[:2048]
            self._grew_base += 2048

    def _grown_since(self, stamp: int) -> list[str] | None:
        """The nodes that grew since ``stamp`` (None: too many to be worth it,
        or forgotten)."""
        start = stamp - self._grew_base
        if start < 0 or self.grown - stamp > 16:
            return None
        return self._grew[start:]

    def _flush(self) -> None:
        dirty = self._dirty
        if not dirty:
            return
        order, nodes = self.order, self.nodes
        heaps = list(self._free.values())
        only = heaps[0].set if len(heaps) == 1 else None  # just the all-nodes heap
        for nid in dirty:
            seq = order.get(nid)
            if seq is None:
                continue
            node = nodes[nid]
            free = node.available.get("CPU", 0.0)
            if only is not None:
                only(nid, free, seq)
                continue
            for h in heaps:
                if nid in h.keys or h.holds(node):
                    h.set(nid, free, seq)
        dirty.clear()

    def _flush_load(self) -> None:
        dirty = self._load_dirty
        if not dirty:
            return
        order, nodes, h = self.order, self.nodes, self._load
        keys, heap = h.keys, h.heap
        for nid in dirty:
            seq = order.get(nid)
            if seq is None:
                continue
            node = nodes[nid]
            cpus = node.total.get("CPU", 0.0)
            if cpus > 0:
                load = len(node.running) / cpus
                if h.exact and seq <= _SEQ_MASK:
                    # (the int key of minus the load, inlined: _int_key)
                    f = load * _SCALE
                    i = int(f)
                    if i == f:
                        key = (i << _SEQ_BITS) | seq
                        if keys.get(nid) != key:
                            keys[nid] = key
                            heappush(heap, key)
                        continue
                h.set(nid, -load, seq)  # (least loaded first)
                keys, heap = h.keys, h.heap  # (set may have rebuilt them)
            else:
                h.drop(nid)
        dirty.clear()
        if len(heap) > 2 * len(keys) + 32:
            h.rebuild()

    def _heap(self, names: frozenset[str]) -> _Heap:
        h = self._free.get(names)
        if h is None:
            h = self._free[names] = _Heap(names)
            for nid, seq in self.order.items():
                node = self.nodes[nid]
                if h.holds(node):
                    h.keys[nid] = h.key(node.available.get("CPU", 0.0), seq, nid)
            h.rebuild()
        return h

    # ------------------------------------------------------------ queries
    def could_ever_fit(self, res: Mapping[str, float], key: tuple | None = None) -> bool:
        """Whether some live node's totals fit ``res`` (``key``: a hashable
        form of it, the task's shape, when the caller has one)."""
        if key is None:
            key = tuple(res.items())
        ok = self._ever.get(key)
        if ok is None:
            nodes = self.nodes
            ok = self._ever[key] = any(nodes[nid].could_ever_fit(res) for nid in self.order)
        return ok

    def most_free(self, res: Mapping[str, float],
                  key: tuple | None = None) -> "NodeRecord | None":
        """The live node with the most free CPU among those ``res`` fits now
        (ties: the one that joined first), or None.  ``key``: a hashable form
        of ``res`` (the task's shape) when the caller has one."""
        if len(self.order) == 1:  # one node (a local cluster): nothing to order
            node = self.nodes[next(iter(self.order))]
            return node if node.available.fits(res) else None
        if key is None:
            key = tuple(res.items())
        h = self._by_request.get(key)
        if h is None:
            names = frozenset(k for k, v in res.items() if v > EPS and k != "CPU")
            h = self._free.get(names) or self._heap(names)
            if len(self._by_request) > 1024:
                self._by_request.clear()
            self._by_request[key] = h
        stamp = h.failed.get(key)
        if stamp is not None:
            if stamp == self.grown:
                return None  # nothing fitted, and no node got resources back since
            grew = self._grown_since(stamp)
            if grew is not None:
                # nothing fitted then: only the nodes that grew since may now
                best, best_key = None, None
                order, nodes, names = self.order, self.nodes, h.names
                for nid in grew:
                    seq = order.get(nid)
                    if seq is None:
                        continue
                    node = nodes[nid]
                    if not node.available.fits(res) or (names and not h.holds(node)):
                        continue
                    rank = (node.available.get("CPU", 0.0), -seq)
                    if best_key is None or rank > best_key:
                        best, best_key = node, rank
                if best is None:
                    h.failed[key] = self.grown
                return best
        self._flush()
        need = res.get("CPU", 0.0) or 0.0
        heap, keys, nodes = h.heap, h.keys, self.nodes
        by_seq, exact = self._by_seq, h.exact
        popped = []
        found = None
        while heap:
            entry = heap[0]
            nid = by_seq[entry & _SEQ_MASK] if exact else entry[2]
            if keys.get(nid) != entry:
                heappop(heap)  # stale
                continue
            node = nodes[nid]
            if need and node.available.get("CPU", 0.0) < need - EPS:
                break  # no node further down has the CPU
            if node.fits(res):
                found = node
                break
            popped.append(heappop(heap))
        for e in popped:
            heappush(heap, e)
        if found is None:
            if len(h.failed) > 256:
                h.failed.clear()
            h.failed[key] = self.grown
        return found

    def least_loaded(self, res: Mapping[str, float], depth: float) -> "NodeRecord | None":
        """The node a CPU-only task ``res`` may be sent to ahead of time: the
        least loaded (running tasks per CPU, ties: joined first) whose totals
        fit it, if its load is below ``1 + depth``; else None.

        ``ahead_alone`` tells after a node was found whether it is surely
        the only node below that load (then one more task there may leave
        none: the caller need not ask again)."""
        if len(self.order) == 1:
            node = self.nodes[next(iter(self.order))]
            cpus = node.total.get("CPU", 0.0)
            if cpus > 0 and len(node.running) / cpus < 1.0 + depth \
                    and node.could_ever_fit(res):
                self.ahead_alone = True
                return node
            return None
        if self._load_dirty:
            self._flush_load()
        limit = 1.0 + depth
        h, nodes, by_seq = self._load, self.nodes, self._by_seq
        heap, keys, exact = h.heap, h.keys, h.exact
        popped = []
        found = None
        while heap:
            entry = heap[0]
            nid = by_seq[entry & _SEQ_MASK] if exact else entry[2]
            if keys.get(nid) != entry:
                heappop(heap)  # stale
                continue
            node = nodes[nid]
            if len(node.running) / node.total["CPU"] >= limit:
                break
            if node.could_ever_fit(res):
                found = node
                break
            popped.append(heappop(heap))
        if popped:
            for e in popped:
                heappush(heap, e)
            self.ahead_alone = False
        elif found is not None:
            # the top's two children are live entries at or past the limit:
            # every node below them is too (the heap's order)
            alone = True
            for i in (1, 2):
                if i < len(heap):
                    entry = heap[i]
                    nid = by_seq[entry & _SEQ_MASK] if exact else entry[2]
                    other = nodes.get(nid)
                    if keys.get(nid) != entry or other is None \
                            or len(other.running) / other.total["CPU"] < limit:
                        alone = False
                        break
            self.ahead_alone = alone
        return found

    def spread(self, res: Mapping[str, float]) -> "NodeRecord | None":
        """Where a SPREAD task ``res`` goes: among the live nodes it fits
        now, the least loaded (running tasks per CPU), ties to the node
        SPREAD chose longest ago (then the one that joined first); that node
        takes its turn.  None when no node fits."""
        node = self._spread_pick(res)
        if node is not None:
            self._spread_clock += 1
            self._spread_last[node.node_id] = self._spread_clock
            self._spread_dirty.add(node.node_id)
        return node

    def _spread_pick(self, res: Mapping[str, float]) -> "NodeRecord | None":
        if self.most_free(res) is None:
            return None  # nothing fits (the free-CPU heaps know at once)
        names = frozenset(k for k, v in res.items() if v > EPS and k != "CPU")
        sh = self._spread.get(names)
        order, nodes, last = self.order, self.nodes, self._spread_last
        if sh is None:
            sh = self._spread[names] = _SpreadHeap(names)
            for nid, seq in order.items():
                node = nodes[nid]
                if _holds(names, node):
                    sh.keys[nid] = (spread_load(node), last.get(nid, 0), seq, nid)
            sh.heap = list(sh.keys.values())
            heapify(sh.heap)
        dirty = self._spread_dirty
        if dirty:
            heaps = list(self._spread.values())
            for nid in dirty:
                at = order.get(nid)
                if at is None:
                    continue
                node = nodes[nid]
                key = (spread_load(node), last.get(nid, 0), at, nid)
                for h in heaps:
                    if nid in h.keys or _holds(h.names, node):
                        h.set(nid, key)
            dirty.clear()
        heap, keys = sh.heap, sh.keys
        popped = []
        found = None
        while heap:
            entry = heap[0]
            nid = entry[3]
            if keys.get(nid) != entry:
                heappop(heap)  # stale
                continue
            node = nodes[nid]
            if node.fits(res):
                found = node
                break
            popped.append(heappop(heap))
        for e in popped:
            heappush(heap, e)
        return found

    # ------------------------------------------------------------ checking
    def alive(self) -> Iterable["NodeRecord"]:
        """The live nodes, in join order."""
        nodes = self.nodes
        return (nodes[nid] for nid in self.order)

    def check(self, requests: Iterable[Mapping[str, float]] = (),
              depth: float = 1.0) -> list[str]:
        """What differs between the index and a full scan of the nodes, for
        its membership and for each of ``requests`` (empty when it agrees)."""
        problems: list[str] = []
        alive = [n for n in self.nodes.values() if n.alive]
        if [n.node_id for n in alive] != list(self.order):
            problems.append(f"placement index lists nodes {list(self.order)}, the live nodes "
                            f"are {[n.node_id for n in alive]}")
            return problems
        for res in requests:
            fitting = [n for n in alive if n.fits(res)]
            want = max(fitting, key=lambda n: n.available.get("CPU", 0.0)) if fitting else None
            got = self.most_free(res)
            if got is not want:
                problems.append(f"placement index chose {got and got.node_id} for {dict(res)}, "
                                f"a scan chooses {want and want.node_id}")
            last, order = self._spread_last, self.order
            want = min(fitting, key=lambda n: (spread_load(n), last.get(n.node_id, 0),
                                               order[n.node_id])) if fitting else None
            got = self._spread_pick(res)
            if got is not want:
                problems.append(f"placement index spreads {dict(res)} to "
                                f"{got and got.node_id}, a scan to {want and want.node_id}")
            ever = any(n.could_ever_fit(res) for n in alive)
            if self.could_ever_fit(res) != ever:
                problems.append(f"placement index says {dict(res)} could ever fit: "
                                f"{not ever}, a scan says {ever}")
            if any(k != "CPU" for k in res) or depth <= 0:
                continue
            best, best_load = None, None
            for n in alive:
                cpus = n.total.get("CPU", 0.0)
                if not n.could_ever_fit(res) or cpus <= 0:
                    continue
                load = len(n.running) / cpus
                if load < 1.0 + depth and (best_load is None or load < best_load):
                    best, best_load = n, load
            got = self.least_loaded(res, depth)
            if got is not best:
                problems.append(f"placement index sends {dict(res)} ahead to "
                                f"{got and got.node_id}, a scan to {best and best.node_id}")
        return problems
