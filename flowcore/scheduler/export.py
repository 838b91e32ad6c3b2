"""Export of the head's futures DAG as plain data, for drawing.

``export_graph(state, roots, owner)`` reads the tables of a
``SchedulerState`` (no IO, no mutation) and returns
``{"nodes": [...], "edges": [...], "omitted": n}`` in the format
``flowcore.graph.draw.to_digraph`` takes:

* nodes ``{"id", "kind", "label", "state", "group"}``:

  - ``task``: a task the head still tracks; label = its function name,
    state = its ``TaskState`` name, group = the function id (hex), so the
    many siblings of one map collapse into one drawn node;
  - ``actor``: an actor (its creation task is drawn as the actor itself);
    label = the class name (and its name, if it has one), state = the
    actor's state (``PENDING``, ``ALIVE``, ``RESTARTING``, ``RECOVERING``, ``DEAD``),
    group = the class name;
  - ``actor_call``: a method call; label and group ``Class.method``;
  - ``object``: an object made by ``put`` (not by a task), or the
    serialised arguments of a task stored as an object of their own;
    state ``READY``/``PENDING``/``LOST`` (``ObjectState``).

* edges ``(src, dst, kind)``, pointing from a dependency to its user:
  ``"data"`` from the producer of each argument object to the task, call or
  actor that takes it; ``"order"`` from an actor to the first call of each
  caller, then between consecutive calls of that caller (calls from one
  caller run in submission order).

Ids are hex strings: task, call and actor nodes use the 16-byte task id
(an actor's id is the id of its creation task), object nodes the 20-byte
object id.  Finished tasks whose results nobody references any more are
pruned by the head, so they are absent; edges to them are absent too.
Refs nested inside arguments (in a list, say) are not dependencies and get
no edge.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from .. import ids
from ..graph.algorithms import ancestors

if TYPE_CHECKING:  # pragma: no cover
    from .actors import ActorRecord
    from .machine import SchedulerState
    from .records import TaskRecord

__all__ = ["export_graph", "DEFAULT_LIMIT"]

#: the most graph nodes one export returns (the oldest first)
DEFAULT_LIMIT = 20_000

_INDEX_0 = ids.object_id(b"", 0)  # the return-index suffix of a put object


class _View:
    """Graph nodes and their predecessors, computed on demand from the tables
    (so drawing the ancestors of one ref does not walk the whole DAG).

    Internally a node is named by bytes: a 16-byte task id (tasks, calls,
    and actors, whose id is their creation task's) or a 20-byte object id
    (objects); the export turns them into hex."""

    def __init__(self, state: "SchedulerState"):
        self.state = state
        self._preds: dict[bytes, list[tuple[bytes, str]]] = {}
        self._previous_call: dict[bytes, bytes] | None = None
        self.args_objects: set[bytes] = set()

    # ------------------------------------------------------------ identity
    def node_of_object(self, oid: Any) -> bytes | None:
        """The node that produces ``oid``, if the head still tracks it."""
        if not isinstance(oid, bytes) or len(oid) != ids.OBJECT_ID_SIZE:
            return None
        tid = oid[:ids.TASK_ID_SIZE]
        s = self.state
        if tid in s.tasks or tid in s.actors:
            return tid  # a task, or an actor (its creation task or its handle)
        if oid in s.objects and ids.index_of(oid) == 0:
            return oid  # made by put (or a task's arguments, stored)
        return None

    def _record(self, key: bytes) -> tuple[str, Any] | None:
        """("actor", ActorRecord), ("create", TaskRecord) for a creation task
        whose actor record is gone, or ("task", TaskRecord) (tasks and calls)."""
        s = self.state
        actor = s.actors.get(key)
        if actor is not None:
            return "actor", actor
        t = s.tasks.get(key)
        if t is None:
            return None
        return ("create", t) if t.kind == "create" else ("task", t)

    # ------------------------------------------------------------ edges
    def _previous_calls(self) -> dict[bytes, bytes]:
        """call -> the caller's previous call to the same actor, among the
        calls the head still has (a caller's task ids grow with each
        submission, so sorting them gives the submission order)."""
        if self._previous_call is None:
            chains: dict[tuple[bytes, str], list[bytes]] = {}
            for t in self.state.tasks.values():
                if t.kind == "call" and t.actor is not None:
                    chains.setdefault((t.actor, t.owner), []).append(t.tid)
            self._previous_call = {}
            for chain in chains.values():
                chain.sort()
                self._previous_call.update(zip(chain[1:], chain))
        return self._previous_call

    def preds(self, key: bytes) -> list[tuple[bytes, str]]:
        """``(predecessor, edge kind)`` of a node, without duplicates."""
        out = self._preds.get(key)
        if out is not None:
            return out
        found = self._record(key) if len(key) == ids.TASK_ID_SIZE else None
        if found is None:  # objects have no predecessors
            self._preds[key] = []
            return []
        kind, rec = found
        s = self.state
        tasks, actors, objects = s.tasks, s.actors, s.objects
        edges: list[tuple[bytes, str]] = []
        seen: set[bytes] = {key}
        args_dep = rec.args_dep
        for i, oid in enumerate(rec.deps):
            tid = oid[:ids.TASK_ID_SIZE]
            if tid in tasks or tid in actors:
                src = tid
            elif oid in objects and oid[ids.TASK_ID_SIZE:] == _INDEX_0:
                src = oid
                if i == args_dep:
                    self.args_objects.add(oid)
            else:
                continue  # freed: its producer is gone from the tables
            if src not in seen:
                seen.add(src)
                edges.append((src, "data"))
        if kind == "task" and rec.kind == "call":
            before = self._previous_calls().get(key)
            if before is not None:
                edges.append((before, "order"))
            elif rec.actor is not None and rec.actor in actors:
                edges.append((rec.actor, "order"))
        self._preds[key] = edges
        return edges

    # ------------------------------------------------------------ nodes
    def all_nodes(self, owner: str | None) -> dict[bytes, float]:
        """Every node (``owner`` None), or those ``owner`` submitted, each
        with the time it entered the head's tables."""
        s = self.state
        tasks, actors = s.tasks, s.actors
        out: dict[bytes, float] = {}
        for oid, obj in s.objects.items():
            if owner is not None and obj.owner != owner:
                continue
            tid = oid[:ids.TASK_ID_SIZE]
            if tid not in tasks and tid not in actors and ids.index_of(oid) == 0:
                out[oid] = obj.created
        for aid, actor in actors.items():
            if owner is None or actor.owner == owner:
                out[aid] = actor.created
        for tid, t in tasks.items():
            if owner is None or t.owner == owner:
                if t.kind != "create" or tid not in actors:  # else drawn as its actor
                    out[tid] = t.submitted
        return out

    def created(self, key: bytes) -> float:
        """When a node entered the head's tables (its dependencies did before)."""
        s = self.state
        if len(key) == ids.OBJECT_ID_SIZE:
            obj = s.objects.get(key)
            return obj.created if obj is not None else 0.0
        actor = s.actors.get(key)
        if actor is not None:
            return actor.created
        t = s.tasks.get(key)
        return t.submitted if t is not None else 0.0

    def describe(self, key: bytes) -> dict | None:
        """The export dict of a node, or None if it is gone."""
        node_id = key.hex()
        s = self.state
        if len(key) == ids.OBJECT_ID_SIZE:
            obj = s.objects.get(key)
            if obj is None:
                return None
            what = "args" if key in self.args_objects else "put"
            return {"id": node_id, "kind": "object", "label": f"{what}\n{_size(obj.size)}",
                    "state": str(obj.state), "group": what}
        found = self._record(key)
        if found is None:
            return None
        kind, rec = found
        if kind == "actor":
            actor: ActorRecord = rec
            label = actor.class_name if not actor.name else f"{actor.class_name}\n{actor.name!r}"
            return {"id": node_id, "kind": "actor", "label": label, "state": str(actor.state),
                    "group": actor.class_name}
        t: TaskRecord = rec
        if kind == "create":  # a creation task whose actor record is gone
            cls = t.name[:-len(".__init__")] if t.name.endswith(".__init__") else t.name
            done = t.state is not None and t.state.done
            return {"id": node_id, "kind": "actor", "label": cls,
                    "state": "DEAD" if done else "PENDING", "group": cls}
        if t.kind == "call":
            return {"id": node_id, "kind": "actor_call", "label": t.name, "state": str(t.state),
                    "group": t.name}
        return {"id": node_id, "kind": "task", "label": t.name, "state": str(t.state),
                "group": t.fid.hex()}


class _PredMapping(Mapping):
    """``node -> predecessors``, computed lazily, for the graph algorithms."""

    def __init__(self, view: _View):
        self.view = view

    def __getitem__(self, key: bytes) -> list[bytes]:
        return [src for src, _ in self.view.preds(key)]

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self.view.all_nodes(None)))

    def __len__(self) -> int:
        return len(self.view.all_nodes(None))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _others_present(state: "SchedulerState", owner: str) -> bool:
    """Whether anything in the tables was submitted by another client (only
    then can ``owner``'s nodes depend on nodes it does not own)."""
    return any(t.owner != owner for t in state.tasks.values()) or \
        any(a.owner != owner for a in state.actors.values()) or \
        any(o.owner != owner for o in state.objects.values())


def export_graph(state: "SchedulerState", roots: Iterable[bytes] | None = None,
                 owner: str | None = None, limit: int = DEFAULT_LIMIT) -> dict:
    """The futures DAG the head tracks, as ``{"nodes", "edges", "omitted"}``.

    With ``roots`` (object ids), only the nodes producing them and their
    ancestors; else with ``owner`` (a client id), the tasks, actors and puts
    that client submitted, plus the nodes they depend on; else everything.
    At most ``limit`` nodes, the oldest first (a node's dependencies are
    always older than it, so the kept part is closed under ancestors);
    ``omitted`` counts the rest.
    """
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"export_graph(limit={limit!r}): expected an int >= 0")
    view = _View(state)
    if roots is not None:
        start = list(dict.fromkeys(
            n for n in (view.node_of_object(oid) for oid in roots) if n is not None))
        times = {key: view.created(key) for key in start}
    else:
        times = view.all_nodes(owner)
        start = list(times)
    if roots is not None or (owner is not None and _others_present(state, owner)):
        for key in ancestors(_PredMapping(view), start):
            if key not in times:
                times[key] = view.created(key)

    # oldest first; at equal times, a client's ids grow with each submission
    ordered = sorted(times, key=lambda key: (times[key], key))
    omitted = max(len(ordered) - limit, 0)
    kept = ordered[:limit]
    keep = set(kept)
    # edges first: describing an object needs to know whether it is some
    # task's stored arguments
    edges = [(src.hex(), key.hex(), kind)
             for key in kept for src, kind in view.preds(key) if src in keep]
    nodes = [d for d in map(view.describe, kept) if d is not None]
    return {"nodes": nodes, "edges": edges, "omitted": omitted}
