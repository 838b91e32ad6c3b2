"""Pure graph algorithms: exact results on known graphs, long chains, and
property tests on random graphs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcore.graph.algorithms import (
    CycleError,
    ancestors,
    dependents,
    descendants,
    find_cycle,
    toposort,
)

DIAMOND = {"d": ["b", "c"], "b": ["a"], "c": ["a"]}


def assert_is_cycle(deps, cycle):
    """``cycle``: each node depends on the next, the last on the first."""
    assert cycle, "expected a non-empty cycle"
    assert len(set(cycle)) == len(cycle), f"cycle repeats a node: {cycle}"
    for node, nxt in zip(cycle, cycle[1:] + cycle[:1]):
        assert nxt in list(deps.get(node, ())), f"{node!r} does not depend on {nxt!r}"


def assert_respects_edges(deps, order):
    position = {node: i for i, node in enumerate(order)}
    assert len(position) == len(order), "a node appears twice"
    for node, node_deps in deps.items():
        for dep in node_deps:
            assert position[dep] < position[node], f"{dep!r} must come before {node!r}"


# --------------------------------------------------------------------------
# toposort


def test_toposort_diamond_exact_order():
    assert toposort(DIAMOND) == ["a", "b", "c", "d"]


def test_toposort_includes_dependency_only_nodes():
    order = toposort({"x": ["only_a_dep"], "y": []})
    assert sorted(order) == ["only_a_dep", "x", "y"]
    assert order.index("only_a_dep") < order.index("x")


def test_toposort_waves_in_first_seen_order():
    deps = {"z": ["m", "n"], "m": ["p"], "n": [], "p": [], "q": []}
    # Ready first: dependency-free nodes in first-seen order (n, p, q),
    # then what they unblock.
    assert toposort(deps) == ["n", "p", "q", "m", "z"]


def test_toposort_is_deterministic_and_ignores_duplicate_deps():
    deps = {i: [j for j in range(i) if (i * j) % 3 == 1] * 2 for i in range(40)}
    first = toposort(deps)
    assert first == toposort(deps)
    assert_respects_edges(deps, first)
    assert sorted(first) == list(range(40))


def test_toposort_accepts_one_shot_iterators():
    deps = {"c": iter(["b"]), "b": (x for x in ["a"])}
    assert toposort(deps) == ["a", "b", "c"]


def test_toposort_empty():
    assert toposort({}) == []


def test_toposort_tuple_keys():
    deps = {("x", 1): [("x", 0)], ("x", 0): []}
    assert toposort(deps) == [("x", 0), ("x", 1)]


def test_toposort_raises_cycle_error_naming_the_cycle():
    deps = {"a": ["b"], "b": ["c"], "c": ["a"], "x": ["a"], "y": []}
    with pytest.raises(CycleError) as info:
        toposort(deps)
    err = info.value
    assert isinstance(err, ValueError)
    assert sorted(err.cycle) == ["a", "b", "c"]
    assert_is_cycle(deps, err.cycle)
    message = str(err)
    assert "cycle" in message
    for name in ("'a'", "'b'", "'c'"):
        assert name in message
    assert "'x'" not in message and "'y'" not in message


def test_toposort_self_dependency_is_a_cycle():
    with pytest.raises(CycleError) as info:
        toposort({"a": ["a"], "b": ["a"]})
    assert info.value.cycle == ["a"]


def test_toposort_cycle_behind_acyclic_part():
    deps = {"top": ["mid"], "mid": ["p"], "p": ["q"], "q": ["r"], "r": ["p"]}
    with pytest.raises(CycleError) as info:
        toposort(deps)
    assert sorted(info.value.cycle) == ["p", "q", "r"]
    assert_is_cycle(deps, info.value.cycle)


# --------------------------------------------------------------------------
# find_cycle


def test_find_cycle_none_on_dag():
    assert find_cycle(DIAMOND) is None
    assert find_cycle({}) is None


def test_find_cycle_two_node_cycle_exact():
    assert find_cycle({"a": ["b"], "b": ["a"]}) == ["a", "b"]


def test_find_cycle_self_loop():
    assert find_cycle({"a": [], "b": ["b"]}) == ["b"]


def test_find_cycle_ignores_acyclic_prefix():
    deps = {"s": ["t"], "t": ["u"], "u": ["v"], "v": ["t"]}
    cycle = find_cycle(deps)
    assert sorted(cycle) == ["t", "u", "v"]
    assert_is_cycle(deps, cycle)


# --------------------------------------------------------------------------
# ancestors / descendants / dependents


def test_ancestors_exact():
    assert ancestors(DIAMOND, ["d"]) == {"a", "b", "c"}
    assert ancestors(DIAMOND, ["b"]) == {"a"}
    assert ancestors(DIAMOND, ["a"]) == set()
    assert ancestors(DIAMOND, ["b", "c"]) == {"a"}


def test_ancestors_includes_a_key_that_another_key_depends_on():
    assert ancestors(DIAMOND, ["d", "b"]) == {"a", "b", "c"}


def test_ancestors_unknown_key_has_none():
    assert ancestors(DIAMOND, ["nope"]) == set()


def test_ancestors_with_cycle_terminates():
    assert ancestors({"a": ["b"], "b": ["a"]}, ["a"]) == {"a", "b"}


def test_descendants_exact():
    assert descendants(DIAMOND, ["a"]) == {"b", "c", "d"}
    assert descendants(DIAMOND, ["c"]) == {"d"}
    assert descendants(DIAMOND, ["d"]) == set()
    assert descendants(DIAMOND, ["nope"]) == set()


def test_single_string_key_is_rejected():
    with pytest.raises(TypeError, match=r"\['d'\]"):
        ancestors(DIAMOND, "d")
    with pytest.raises(TypeError):
        descendants(DIAMOND, "a")


def test_dependents_exact_and_covers_every_node():
    assert dependents(DIAMOND) == {"d": set(), "b": {"d"}, "c": {"d"}, "a": {"b", "c"}}
    assert list(dependents(DIAMOND)) == ["d", "b", "c", "a"]


# --------------------------------------------------------------------------
# long chains (no recursion)

CHAIN = 100_000


@pytest.fixture(scope="module")
def chain():
    return {i: [i - 1] for i in range(1, CHAIN)}


def test_chain_toposort(chain):
    assert toposort(chain) == list(range(CHAIN))


def test_chain_ancestors_and_descendants(chain):
    up = ancestors(chain, [CHAIN - 1])
    assert len(up) == CHAIN - 1 and 0 in up and CHAIN - 1 not in up
    down = descendants(chain, [0])
    assert len(down) == CHAIN - 1 and CHAIN - 1 in down and 0 not in down


def test_chain_dependents(chain):
    rev = dependents(chain)
    assert len(rev) == CHAIN
    assert rev[0] == {1} and rev[CHAIN - 1] == set()


def test_chain_find_cycle(chain):
    assert find_cycle(chain) is None
    closed = dict(chain)
    closed[0] = [CHAIN - 1]
    cycle = find_cycle(closed)
    assert len(cycle) == CHAIN
    assert_is_cycle(closed, cycle)
    with pytest.raises(CycleError):
        toposort(closed)


# --------------------------------------------------------------------------
# properties


@st.composite
def dags(draw, max_nodes=30):
    """A random DAG: node ``i`` may depend only on nodes ``j < i`` in a hidden
    order, then the labels are shuffled so that order is not the answer."""
    n = draw(st.integers(min_value=0, max_value=max_nodes))
    labels = draw(st.permutations(range(n)))
    deps = {}
    for i in range(n):
        chosen = draw(st.lists(st.integers(0, i - 1), max_size=4)) if i else []
        if chosen or draw(st.booleans()):
            deps[labels[i]] = [labels[j] for j in chosen]
    return deps


@st.composite
def digraphs(draw, max_nodes=12):
    n = draw(st.integers(min_value=1, max_value=max_nodes))
    edges = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=25))
    deps = {i: [] for i in range(n)}
    for src, dst in edges:
        deps[src].append(dst)
    return deps


def naive_ancestors(deps, key):
    result, frontier = set(), set(deps.get(key, ()))
    while frontier:
        result |= frontier
        frontier = {d for node in frontier for d in deps.get(node, ())} - result
    return result


def all_nodes(deps):
    return set(deps) | {d for ds in deps.values() for d in ds}


@settings(max_examples=200, deadline=None)
@given(dags())
def test_property_toposort_respects_every_edge(deps):
    order = toposort(deps)
    assert set(order) == all_nodes(deps)
    assert_respects_edges(deps, order)
    assert find_cycle(deps) is None
    assert order == toposort(deps)


@settings(max_examples=150, deadline=None)
@given(dags())
def test_property_ancestors_descendants_agree(deps):
    nodes = sorted(all_nodes(deps))
    rev = dependents(deps)
    for node in nodes:
        assert ancestors(deps, [node]) == naive_ancestors(deps, node)
        assert rev[node] == {user for user, ds in deps.items() if node in ds}
        for other in descendants(deps, [node]):
            assert node in ancestors(deps, [other])


@settings(max_examples=200, deadline=None)
@given(digraphs())
def test_property_cycle_iff_toposort_fails(deps):
    cycle = find_cycle(deps)
    if cycle is None:
        assert_respects_edges(deps, toposort(deps))
    else:
        assert_is_cycle(deps, cycle)
        with pytest.raises(CycleError) as info:
            toposort(deps)
        assert_is_cycle(deps, info.value.cycle)
