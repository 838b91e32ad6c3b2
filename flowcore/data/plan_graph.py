"""A dataset's plan as a graph: ``flowcore.visualize(ds)``.

Three clusters: the logical plan (the source, nested inputs of a union or
zip, then each operator in order), the physical operators of the latest
execution (fused stages with their tasks, actors, blocks, rows, bytes and
wall time, dashed edges from each logical operator to the stage that ran
it), and, for a materialized dataset, the futures DAG of its blocks (the
tasks that made them, named after their operators).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import graphviz

import flowcore

from .plan import InputSource, LogicalPlan, ReadSource
from .stats import DatasetStats, OpStats

if TYPE_CHECKING:  # pragma: no cover
    from .dataset import Dataset

__all__ = ["plan_digraph"]

_LOGICAL = {"shape": "box", "style": "rounded,filled", "fillcolor": "#e8f0fe",
            "color": "#4a6fa5"}
_PHYSICAL = {"shape": "box", "style": "filled", "fillcolor": "#e6f4ea", "color": "#3c8a50"}


def _source_label(src: Any) -> str:
    if isinstance(src, InputSource):
        rows = sum(m["num_rows"] for _, m in src.bundles)
        return f"{src.name}\\n{len(src.bundles)} blocks, {rows} rows"
    if isinstance(src, ReadSource):
        rows = [t.num_rows for t in src.tasks]
        n = sum(rows) if all(r is not None for r in rows) else "?"  # type: ignore[misc]
        return f"{src.name}\\n{len(src.tasks)} read tasks, {n} rows"
    return src.name


class _Builder:
    def __init__(self) -> None:
        self.count = 0
        self.nodes: list[tuple[str, int]] = []   # (node id, id() of the source/operator)
        self.edges: list[tuple[str, str]] = []

    def add(self, g: graphviz.Digraph, obj: Any, label: str) -> str:
        self.count += 1
        nid = f"op{self.count}"
        g.node(nid, label=label, **_LOGICAL)
        self.nodes.append((nid, id(obj)))
        return nid

    def edge(self, g: graphviz.Digraph, a: str, b: str) -> None:
        g.edge(a, b)
        self.edges.append((a, b))

    def plan(self, g: graphviz.Digraph, plan: LogicalPlan) -> str:
        """Draw ``plan`` into ``g``; the id of its last node."""
        src = plan.source
        nested = getattr(src, "plans", None)
        if nested:
            tails: list[str] = []
            for p in nested:
                with g.subgraph(name=f"cluster_in{self.count}_{len(tails)}") as sub:
                    sub.attr(label=f"input {len(tails)}", style="dashed", color="#9aa0a6")
                    tails.append(self.plan(sub, p))
            last = self.add(g, src, f"{src.name}[{len(nested)} inputs]")
            for t in tails:
                self.edge(g, t, last)
        else:
            last = self.add(g, src, _source_label(src))
        for op in plan.ops:
            nid = self.add(g, op, op.name)
            self.edge(g, last, nid)
            last = nid
        return last


def _stat_label(s: OpStats) -> str:
    parts = [f"{s.tasks} tasks"] + ([f"{s.actors} actors"] if s.actors else [])
    return (f"{s.name}\\n{', '.join(parts)}, {s.blocks} blocks\\n"
            f"rows: {s.rows}, bytes: {s.bytes}\\nwall: {s.wall_s:.3f}s")


def _physical(dot: graphviz.Digraph, b: _Builder, ops: list[OpStats]) -> None:
    """The executed operators, each linked to the logical ones it ran;
    their edges follow the plan's."""
    where: dict[int, int] = {}
    for k, s in enumerate(ops):
        for obj in s.logical:
            where.setdefault(obj, k)
    ran = {nid: where[obj] for nid, obj in b.nodes if obj in where}
    with dot.subgraph(name="cluster_physical") as g:
        g.attr(label="executed operators (latest run)", color="#3c8a50")
        for k, s in enumerate(ops):
            g.node(f"x{k}", label=_stat_label(s), **_PHYSICAL)
        # the physical edges follow the plan's, through logical nodes that
        # ran in no stage of their own (a union, an input already in the store)
        succ: dict[str, list[str]] = {}
        for a, c in b.edges:
            succ.setdefault(a, []).append(c)

        def reached(n: str) -> set[int]:
            out: set[int] = set()
            for c in succ.get(n, []):
                out |= {ran[c]} if c in ran else reached(c)
            return out
        done = set()
        for a, ka in ran.items():
            for kc in sorted(reached(a)):
                if kc != ka and (ka, kc) not in done:
                    done.add((ka, kc))
                    g.edge(f"x{ka}", f"x{kc}")
    for nid, k in ran.items():
        dot.edge(nid, f"x{k}", style="dashed", color="#9aa0a6", arrowhead="none",
                 constraint="false")


def plan_digraph(ds: "Dataset") -> graphviz.Digraph:
    """The graph ``flowcore.visualize(ds)`` returns."""
    dot = graphviz.Digraph(name="dataset", graph_attr={
        "rankdir": "TB", "fontname": "Helvetica", "fontsize": "10", "compound": "true",
        "label": "Dataset plan", "labelloc": "t"},
        node_attr={"fontname": "Helvetica", "fontsize": "10"},
        edge_attr={"arrowsize": "0.6", "color": "#555555"})
    b = _Builder()
    with dot.subgraph(name="cluster_logical") as g:
        g.attr(label="logical plan", color="#4a6fa5")
        made_from = getattr(ds, "_made_from", None)
        if made_from is not None:  # a materialized dataset: the plan that made its blocks
            tail = b.plan(g, made_from)
            first = b.count + 1
            b.plan(g, ds._plan)
            b.edge(g, tail, f"op{first}")
        else:
            b.plan(g, ds._plan)
    stats: DatasetStats | None = ds._last_stats
    if stats is not None and stats.ops:
        _physical(dot, b, stats.ops)
    else:
        dot.node("notrun", label="not executed yet: the counts appear after consumption",
                 shape="note")
    src = ds._plan.source
    if isinstance(src, InputSource) and not ds._plan.ops and src.bundles:
        blocks = flowcore.visualize([r for r, _ in src.bundles])
        blocks.name = "cluster_blocks"
        blocks.graph_attr.update(label="tasks that made the blocks", color="#9aa0a6")
        dot.subgraph(blocks)
    return dot
