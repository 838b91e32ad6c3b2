"""Pure graph algorithms over a dependency mapping.

Every function here takes ``deps: Mapping[K, Iterable[K]]``, which maps a node
to the nodes it depends on.  A node that appears only as a dependency (never as
a key) is a node too, with no dependencies of its own.  Keys only need to be
hashable; nothing here looks inside them.

All traversals are iterative (explicit stacks and queues), so a chain of
100,000 nodes is fine: there is no recursion limit to hit.  Each node's
dependency iterable is iterated at most once per call, so the values may be
one-shot iterators.  Results are deterministic for a deterministic input:
ties are broken by the order in which nodes are first seen (keys in mapping
order, each key's dependencies in their given order).
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Iterable, Mapping, TypeVar

import toolz

__all__ = [
    "CycleError",
    "toposort",
    "find_cycle",
    "ancestors",
    "descendants",
    "dependents",
]

K = TypeVar("K", bound=Hashable)


class CycleError(ValueError):
    """The dependency mapping has a cycle.

    ``cycle`` lists the nodes on one cycle such that each node depends on the
    next one and the last depends on the first (a self-dependency is a cycle
    of one node).
    """

    def __init__(self, cycle: Iterable[Hashable]):
        self.cycle = list(cycle)
        ring = " -> ".join(repr(node) for node in self.cycle + self.cycle[:1])
        super().__init__(f"dependency cycle: {ring} (each node depends on the next)")


def _adjacency(deps: Mapping[K, Iterable[K]]) -> dict[K, list[K]]:
    """Every node, in first-seen order, mapped to its distinct dependencies."""
    adj: dict[K, list[K]] = {}
    for key, key_deps in deps.items():
        # Assigning to a key that was first seen as a dependency keeps its
        # original position in the dict, so the order stays "first seen".
        adj[key] = own = list(toolz.unique(key_deps))
        for dep in own:
            if dep not in adj:
                adj[dep] = []
    return adj


def _reverse(adj: Mapping[K, list[K]]) -> dict[K, list[K]]:
    rev: dict[K, list[K]] = {node: [] for node in adj}
    for node, node_deps in adj.items():
        for dep in node_deps:
            rev[dep].append(node)
    return rev


def _check_keys(keys: Iterable[K]) -> list[K]:
    if isinstance(keys, (str, bytes)):
        raise TypeError(
            f"keys must be an iterable of graph keys, not a single {type(keys).__name__}; "
            f"pass [{keys!r}] for one key"
        )
    return list(toolz.unique(keys))


def toposort(deps: Mapping[K, Iterable[K]]) -> list[K]:
    """All nodes, each one after everything it depends on.

    Kahn's algorithm with a FIFO of ready nodes, so the order comes out in
    waves (all dependency-free nodes first, in first-seen order, then what they
    unblock, ...).  Raises :class:`CycleError` naming one cycle if there is
    any.
    """
    adj = _adjacency(deps)
    rev = _reverse(adj)
    missing = {node: len(node_deps) for node, node_deps in adj.items()}
    ready = deque(node for node, count in missing.items() if count == 0)
    order: list[K] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for user in rev[node]:
            missing[user] -= 1
            if missing[user] == 0:
                ready.append(user)
    if len(order) != len(adj):
        stuck = {node: adj[node] for node, count in missing.items() if count > 0}
        cycle = find_cycle(stuck)
        # Every node left over waits on a cycle or on another stuck node, and
        # following stuck dependencies from any of them must close a loop.
        assert cycle is not None
        raise CycleError(cycle)
    return order


def find_cycle(deps: Mapping[K, Iterable[K]]) -> list[K] | None:
    """One cycle as a list (each node depends on the next, the last on the
    first), or ``None`` if the mapping is acyclic."""
    adj = _adjacency(deps)
    ON_PATH, DONE = 1, 2
    state: dict[K, int] = {}
    for root in adj:
        if root in state:
            continue
        path = [root]
        position = {root: 0}
        pending = [iter(adj[root])]
        state[root] = ON_PATH
        while pending:
            for dep in pending[-1]:
                seen = state.get(dep)
                if seen is None:
                    state[dep] = ON_PATH
                    position[dep] = len(path)
                    path.append(dep)
                    pending.append(iter(adj[dep]))
                    break
                if seen == ON_PATH:
                    return path[position[dep]:]
            else:
                node = path.pop()
                pending.pop()
                del position[node]
                state[node] = DONE
    return None


def _reach(step: Mapping[K, Iterable[K]], keys: Iterable[K]) -> set[K]:
    """Nodes reachable from ``keys`` by one or more steps."""
    seen: set[K] = set()
    stack: list[K] = []
    for key in _check_keys(keys):
        stack.extend(step.get(key, ()))
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(step.get(node, ()))
    return seen


def ancestors(deps: Mapping[K, Iterable[K]], keys: Iterable[K]) -> set[K]:
    """Everything the ``keys`` transitively depend on.

    A key is in the result only if another key (or itself, through a cycle)
    depends on it.  Keys unknown to ``deps`` have no dependencies.
    """
    return _reach(deps, keys)


def descendants(deps: Mapping[K, Iterable[K]], keys: Iterable[K]) -> set[K]:
    """Everything that transitively depends on any of the ``keys``.

    A key is in the result only if it depends on another key (or on itself,
    through a cycle).  Keys unknown to ``deps`` have no dependents.
    """
    return _reach(_reverse(_adjacency(deps)), keys)


def dependents(deps: Mapping[K, Iterable[K]]) -> dict[K, set[K]]:
    """The reverse edges: every node mapped to the set of nodes that depend on
    it directly (an empty set for nodes nothing depends on)."""
    return {node: set(users) for node, users in _reverse(_adjacency(deps)).items()}
