"""Drawing the futures DAG with Graphviz.

The input is a plain export of the graph (lists of dicts and tuples), so this
module knows nothing about the scheduler's classes.  ``graphviz`` (the Python
package) is imported inside the functions that need it, never at import time;
the ``dot`` program (or graphviz-pure, see :data:`RENDERERS`) is needed only
to render SVG/PNG/PDF, not to produce DOT; without one, :func:`write` writes
the DOT and says how to render it.

Big graphs stay drawable in two steps:

1. *Sibling collapsing*: nodes with the same ``group``, the same kind, the same
   predecessors and the same successors (edge kinds included) are drawn as one
   node, ``"f ×1000"``, with a count per state, once there are more than
   ``collapse_threshold`` of them.  Its colour is that of the least done state
   among them (see :data:`PROGRESS_ORDER`).
2. *Truncation*: if more than ``max_nodes`` nodes remain, the first
   ``max_nodes`` in topological order are drawn, plus one ``"… N more"`` node.
"""

from __future__ import annotations

import html
import os
import shutil
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..private_files import open_private
from .algorithms import CycleError, toposort

if TYPE_CHECKING:  # pragma: no cover
    import graphviz

__all__ = [
    "NODE_KINDS",
    "EDGE_KINDS",
    "STATES",
    "PALETTE",
    "STATE_COLORS",
    "PROGRESS_ORDER",
    "FORMATS",
    "to_digraph",
    "write",
]

NODE_KINDS = ("task", "actor", "actor_call", "object")
EDGE_KINDS = ("data", "order")

_TASK_STATES = (
    "WAITING_FOR_ARGS", "QUEUED", "INFEASIBLE", "RUNNING",
    "FINISHED", "FAILED", "CANCELLED", "LOST",
)
#: Known states per node kind, in lifecycle order (used for labels and legend).
STATES: dict[str, tuple[str, ...]] = {
    "task": _TASK_STATES,
    "actor_call": _TASK_STATES,
    "actor": ("PENDING", "ALIVE", "RESTARTING", "RECOVERING", "DEAD"),
    "object": ("PENDING", "READY", "LOST"),
}

#: Colour name -> (fill colour, font colour).  Chosen to stay legible with
#: black text, except the dark grey which takes white text.
PALETTE: dict[str, tuple[str, str]] = {
    "grey": ("#d9d9d9", "#000000"),
    "light blue": ("#a6cee3", "#000000"),
    "orange": ("#fdae61", "#000000"),
    "yellow": ("#ffe45c", "#000000"),
    "green": ("#8fd18f", "#000000"),
    "red": ("#ef5350", "#000000"),
    "dark grey": ("#616161", "#ffffff"),
    "purple": ("#b39ddb", "#000000"),
}
_UNKNOWN_COLOR = ("#ffffff", "#000000")

_TASK_COLORS = {
    "WAITING_FOR_ARGS": "grey",
    "QUEUED": "light blue",
    "INFEASIBLE": "orange",
    "RUNNING": "yellow",
    "FINISHED": "green",
    "FAILED": "red",
    "CANCELLED": "dark grey",
    "LOST": "purple",
}
#: Node kind -> state -> colour name in :data:`PALETTE`.
STATE_COLORS: dict[str, dict[str, str]] = {
    "task": _TASK_COLORS,
    "actor_call": _TASK_COLORS,
    "actor": {"PENDING": "light blue", "ALIVE": "green", "RESTARTING": "yellow",
              "RECOVERING": "yellow", "DEAD": "dark grey"},
    "object": {"PENDING": "grey", "READY": "green", "LOST": "purple"},
}

_TASK_PROGRESS = (
    "INFEASIBLE", "LOST", "WAITING_FOR_ARGS", "QUEUED", "RUNNING",
    "FAILED", "CANCELLED", "FINISHED",
)
#: Node kind -> states from least done to most done.  A collapsed node takes
#: the colour of its least done member.  States that block progress
#: (INFEASIBLE, LOST) count as the least done so they are not hidden by a
#: crowd of merely waiting siblings; unknown states count as less done still.
PROGRESS_ORDER: dict[str, tuple[str, ...]] = {
    "task": _TASK_PROGRESS,
    "actor_call": _TASK_PROGRESS,
    "actor": ("RESTARTING", "RECOVERING", "PENDING", "ALIVE", "DEAD"),
    "object": ("LOST", "PENDING", "READY"),
}

_SHAPES: dict[str, dict[str, str]] = {
    "task": {"shape": "box", "style": "filled"},
    "actor_call": {"shape": "box", "style": "rounded,filled"},
    "actor": {"shape": "doubleoctagon", "style": "filled"},
    "object": {
        "shape": "cylinder", "style": "filled", "fontsize": "8",
        "height": "0.25", "width": "0.4", "margin": "0.04,0.02",
    },
}
_SHAPE_WORDS = {
    "task": "box: task",
    "actor_call": "rounded box: actor call",
    "actor": "octagon: actor",
    "object": "cylinder: object",
}

#: Output formats accepted by :func:`write` -> format passed to Graphviz.
FORMATS = {"dot": "dot", "gv": "dot", "svg": "svg", "png": "png", "pdf": "pdf"}
_TEXT_FORMATS = {"dot", "gv"}

#: The Graphviz-compatible programs tried in turn to render SVG/PNG/PDF: the
#: system ``dot``, then ``graphviz-pure`` (a self-contained port of Graphviz's
#: ``dot`` command shipped as a wheel: ``pip install 'flowcore[graph]'``; it has
#: no PDF output).
RENDERERS = ("dot", "graphviz-pure")
_NO_PDF = {"graphviz-pure"}

_NO_RENDERER = (
    "Rendering {fmt!r} needs the Graphviz `dot` program or graphviz-pure, and neither was "
    "found, so the DOT source was written to {dot_path} instead. To get the picture: "
    "`pip install 'flowcore[graph]'` (graphviz-pure, no system install) or install Graphviz "
    "(`apt-get install graphviz`, `conda install graphviz`, `brew install graphviz`), then "
    "run again or render the file with `dot -T{fmt} {dot_path} -o {path}`."
)


def find_renderer(fmt: str = "svg") -> str | None:
    """Path of the first program of :data:`RENDERERS` that can render ``fmt``.

    Looked up on PATH and, for programs installed by pip, beside the running
    Python (a virtualenv's ``bin`` need not be on PATH).
    """
    import sys
    for name in RENDERERS:
        if fmt == "pdf" and name in _NO_PDF:
            continue
        found = shutil.which(name)
        if found is None:
            beside = os.path.join(os.path.dirname(sys.executable), name)
            if os.path.isfile(beside) and os.access(beside, os.X_OK):
                found = beside
        if found is not None:
            return found
    return None


def render(digraph: "graphviz.Digraph", fmt: str) -> bytes | None:
    """``digraph`` rendered to ``fmt`` bytes by :func:`find_renderer`'s program,
    or None when no renderer is installed (or the one found cannot be run)."""
    import subprocess
    exe = find_renderer(fmt)
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, f"-T{FORMATS[fmt]}"], input=digraph.source.encode("utf-8"),
                              capture_output=True, timeout=120)
    except (FileNotFoundError, PermissionError):
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(exe)} failed to render {fmt!r} (exit "
                           f"{done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


# --------------------------------------------------------------------------
# input normalisation


class _Node:
    __slots__ = ("id", "kind", "label", "state", "group")

    def __init__(self, raw: Mapping[str, Any]):
        try:
            self.id = raw["id"]
            self.kind = raw["kind"]
        except KeyError as exc:
            raise ValueError(f"graph node {raw!r} lacks the {exc.args[0]!r} field") from None
        if self.kind not in STATES:
            raise ValueError(
                f"graph node {self.id!r} has unknown kind {self.kind!r}; "
                f"expected one of {', '.join(NODE_KINDS)}"
            )
        label = raw.get("label")
        self.label = str(self.id) if label is None else str(label)
        state = raw.get("state")
        self.state = "UNKNOWN" if state is None else str(state)
        self.group = raw.get("group")


def _read_graph(nodes: Iterable[Mapping[str, Any]], edges: Iterable[Sequence[Any]]):
    by_id: dict[Any, _Node] = {}
    for raw in nodes:
        node = _Node(raw)
        if node.id in by_id:
            raise ValueError(f"graph node id {node.id!r} appears twice")
        by_id[node.id] = node
    edge_list: dict[tuple[Any, Any, str], None] = {}
    for edge in edges:
        if len(edge) == 3:
            src, dst, kind = edge
        elif len(edge) == 2:
            (src, dst), kind = edge, "data"
        else:
            raise ValueError(f"graph edge {edge!r} is not (src, dst, kind)")
        if kind not in EDGE_KINDS:
            raise ValueError(
                f"graph edge {edge!r} has unknown kind {kind!r}; "
                f"expected one of {', '.join(EDGE_KINDS)}"
            )
        for end in (src, dst):
            if end not in by_id:
                raise ValueError(f"graph edge {edge!r} refers to unknown node {end!r}")
        edge_list[(src, dst, kind)] = None
    return by_id, list(edge_list)


# --------------------------------------------------------------------------
# collapsing and truncation


def _collapse(by_id: dict[Any, _Node], edges: list, threshold: int) -> list[list[_Node]]:
    """Partition the nodes into drawn nodes (lists of members), in the order
    of each drawn node's first member."""
    preds: dict[Any, list] = {}
    succs: dict[Any, list] = {}
    for src, dst, kind in edges:
        succs.setdefault(src, []).append((dst, kind))
        preds.setdefault(dst, []).append((src, kind))
    sibling_sets: dict[tuple, list[_Node]] = {}
    keyed: list[tuple[_Node, tuple | None]] = []
    for node in by_id.values():
        if node.group is None:
            keyed.append((node, None))
            continue
        key = (
            node.group,
            node.kind,
            frozenset(preds.get(node.id, ())),
            frozenset(succs.get(node.id, ())),
        )
        sibling_sets.setdefault(key, []).append(node)
        keyed.append((node, key))
    limit = max(threshold, 1)
    drawn: list[list[_Node]] = []
    placed: set[tuple] = set()
    for node, siblings in keyed:
        if siblings is None or len(sibling_sets[siblings]) <= limit:
            drawn.append([node])
        elif siblings not in placed:
            placed.add(siblings)
            drawn.append(sibling_sets[siblings])
    return drawn


def _topological_positions(count: int, edges: Iterable[tuple[int, int, str]]) -> list[int]:
    deps: dict[int, list[int]] = {i: [] for i in range(count)}
    for src, dst, _ in edges:
        deps[dst].append(src)
    try:
        return toposort(deps)
    except CycleError:
        # A cyclic export is a bug elsewhere; still draw something useful.
        return list(range(count))


# --------------------------------------------------------------------------
# labels


def _esc(text: str) -> str:
    """Text made literal inside a DOT escString (backslashes, newlines)."""
    return text.replace("\\", "\\\\").replace("\r", "").replace("\n", "\\n")


def _color(kind: str, state: str) -> tuple[str, str]:
    name = STATE_COLORS[kind].get(state)
    return PALETTE[name] if name else _UNKNOWN_COLOR


def _least_done(kind: str, states: Iterable[str]) -> str:
    order = PROGRESS_ORDER[kind]
    rank = {state: i for i, state in enumerate(order)}
    return min(states, key=lambda s: rank.get(s, -1))


def _ordered_counts(kind: str, counts: Counter) -> list[tuple[str, int]]:
    known = STATES[kind]
    rank = {state: i for i, state in enumerate(known)}
    return sorted(counts.items(), key=lambda item: (rank.get(item[0], len(known)), item[0]))


def _summary(kind: str, counts: Counter) -> str:
    parts = [f"{state} {n}" for state, n in _ordered_counts(kind, counts)]
    lines = [", ".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
    return "\\n".join(_esc(line) for line in lines)


_LEGEND_COLUMNS = 4


def _graph_label(
    title: str | None,
    note: str | None,
    state_counts: dict[str, Counter],
    has_order: bool,
) -> str:
    """The graph's HTML label: title, a note, and the legend (states present
    with their counts, shapes, edge styles).  Being the graph label rather than
    a node, the legend never disturbs the layout of the DAG itself."""
    entries: list[str] = []
    categories = (
        ("", ("task", "actor_call")),
        ("actor ", ("actor",)),
        ("object ", ("object",)),
    )
    for prefix, members in categories:
        counts: Counter = Counter()
        for kind in members:
            counts.update(state_counts.get(kind, ()))
        for state, n in _ordered_counts(members[0], counts):
            fill, font = _color(members[0], state)
            # One chip per state, coloured like the nodes: a chip stays whole
            # however Graphviz stretches the table to the title's width.
            entries.append(
                f'<TD BGCOLOR="{fill}" BORDER="1">'
                f'<FONT COLOR="{font}">{html.escape(prefix + state)} {n}</FONT></TD>'
            )
    rows = [
        "<TR>" + "".join(entries[i:i + _LEGEND_COLUMNS]) + "</TR>"
        for i in range(0, len(entries), _LEGEND_COLUMNS)
    ]
    shapes = ", ".join(_SHAPE_WORDS[k] for k in NODE_KINDS if k in state_counts)
    edges_text = "solid edge: data" + ("; dashed edge: call order" if has_order else "")
    key = "; ".join(part for part in (shapes, edges_text) if part)
    legend = (
        '<TABLE ID="legend" BORDER="0" CELLBORDER="0" CELLSPACING="3" CELLPADDING="2">'
        + "".join(rows)
        + "</TABLE>"
    )
    outer = []
    if title:
        outer.append(f'<TR><TD><FONT POINT-SIZE="14">{html.escape(title)}</FONT></TD></TR>')
    if note:
        outer.append(f"<TR><TD>{html.escape(note)}</TD></TR>")
    if entries:
        outer.append(f"<TR><TD>{legend}</TD></TR>")
    outer.append(f'<TR><TD><FONT POINT-SIZE="9">{html.escape(key)}</FONT></TD></TR>')
    return (
        '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2">'
        + "".join(outer)
        + "</TABLE>>"
    )


# --------------------------------------------------------------------------
# public API


def to_digraph(
    nodes: Iterable[Mapping[str, Any]],
    edges: Iterable[Sequence[Any]],
    *,
    collapse_threshold: int = 8,
    max_nodes: int = 2000,
    title: str | None = None,
) -> "graphviz.Digraph":
    """Build a :class:`graphviz.Digraph` of an exported futures DAG.

    ``nodes`` are dicts ``{"id", "kind", "label", "state", "group"}`` (``kind``
    one of :data:`NODE_KINDS`; ``label``, ``state`` and ``group`` optional),
    ``edges`` are ``(src_id, dst_id, kind)`` with ``kind`` ``"data"`` (src's
    output feeds dst, drawn solid) or ``"order"`` (actor call order, drawn
    dashed).  Edges point from a dependency to its user.

    Siblings sharing group, kind, predecessors and successors are drawn as one
    node when there are more than ``collapse_threshold`` of them; if more than
    ``max_nodes`` drawn nodes remain, only the first ``max_nodes`` in
    topological order are drawn, plus a ``"… N more"`` node.  A legend lists
    the states present with their counts.  Raises ``ValueError`` for a
    malformed export (duplicate id, unknown kind, edge to an unknown node).
    """
    import graphviz

    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, not {max_nodes!r}")
    by_id, edge_list = _read_graph(nodes, edges)
    drawn = _collapse(by_id, edge_list, collapse_threshold)
    position = {member.id: i for i, group in enumerate(drawn) for member in group}
    drawn_edges = list(
        dict.fromkeys((position[src], position[dst], kind) for src, dst, kind in edge_list)
    )

    order = list(range(len(drawn)))
    hidden = 0
    if len(drawn) > max_nodes:
        order = _topological_positions(len(drawn), drawn_edges)[:max_nodes]
        hidden = len(drawn) - max_nodes
    shown = set(order)

    graph_attr = {
        "rankdir": "TB",
        "fontname": "Helvetica",
        "nodesep": "0.25",
        "ranksep": "0.45",
    }
    note = None
    if len(drawn) < len(by_id) or hidden:
        note = f"{len(by_id)} graph nodes drawn as {len(order) + (1 if hidden else 0)}"
    dot = graphviz.Digraph(
        name="flowcore",
        graph_attr=graph_attr,
        node_attr={"fontname": "Helvetica", "fontsize": "10", "height": "0.3"},
        edge_attr={"arrowsize": "0.6", "color": "#555555"},
    )

    # The legend counts the whole graph, hidden nodes included.
    state_counts: dict[str, Counter] = {}
    for node in by_id.values():
        state_counts.setdefault(node.kind, Counter())[node.state] += 1
    for i in order:
        members = drawn[i]
        first = members[0]
        kind = first.kind
        counts = Counter(member.state for member in members)
        attrs = dict(_SHAPES[kind])
        if len(members) == 1:
            state = first.state
            label = _esc(first.label)
            tooltip = f"{first.id} ({kind}, {state})"
        else:
            state = _least_done(kind, counts)
            label = f"{_esc(first.label)} ×{len(members)}\\n{_summary(kind, counts)}"
            tooltip = f"{len(members)} siblings of group {first.group!r} ({kind})"
            attrs["peripheries"] = "3" if kind == "actor" else "2"
        fill, font = _color(kind, state)
        dot.node(
            f"n{i}",
            label=graphviz.nohtml(label),
            fillcolor=fill,
            fontcolor=font,
            tooltip=graphviz.nohtml(_esc(tooltip)),
            **attrs,
        )

    for src, dst, kind in drawn_edges:
        if src in shown and dst in shown:
            if kind == "order":
                dot.edge(f"n{src}", f"n{dst}", style="dashed", color="#8c8c8c")
            else:
                dot.edge(f"n{src}", f"n{dst}")

    if hidden:
        hidden_members = sum(len(drawn[i]) for i in range(len(drawn)) if i not in shown)
        more = f"… {hidden} more"
        if hidden_members != hidden:
            more += f"\\n({hidden_members} graph nodes)"
        more += f"\\nnot drawn (max_nodes={max_nodes})"
        dot.node(
            "more", label=more, shape="note", style="filled",
            fillcolor="#ffffff", fontcolor="#000000",
        )
        feeders = dict.fromkeys(
            src for src, dst, _ in drawn_edges if src in shown and dst not in shown
        )
        for src in feeders:
            dot.edge(f"n{src}", "more", style="dotted", color="#8c8c8c")

    dot.graph_attr.update(
        label=_graph_label(
            title, note, state_counts, any(kind == "order" for _, _, kind in edge_list)
        ),
        labelloc="t",
        fontsize="10",
    )
    return dot


def write(digraph: "graphviz.Digraph", filename: str | os.PathLike, format: str | None = None) -> str:
    """Write ``digraph`` to ``filename`` and return the path written.

    The format comes from ``format`` or else the filename's extension: one of
    ``dot``/``gv`` (DOT text, needs no external program), ``svg``, ``png``,
    ``pdf`` (rendered by the Graphviz ``dot`` program or else graphviz-pure,
    piped: no intermediate file is left behind).  A filename without any
    extension gets ``.FORMAT`` appended.  When no renderer is installed the
    DOT source is written beside it (``name.dot``) with a ``RuntimeWarning``
    saying how to render it, and that path is returned.  ``ValueError`` for
    an unknown format.
    """
    path = os.fspath(filename)
    extension = os.path.splitext(path)[1][1:].lower()
    fmt = (format if format is not None else extension).lower().lstrip(".")
    if not fmt:
        raise ValueError(
            f"cannot tell the output format of {path!r}: pass format= or use a filename "
            f"ending in one of {', '.join('.' + f for f in FORMATS)}"
        )
    if fmt not in FORMATS:
        raise ValueError(f"unknown graph format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not extension:
        path = f"{path}.{fmt}"

    if fmt in _TEXT_FORMATS:
        source = digraph.source
        _write_file(path, source.encode("utf-8"))
        return path

    data = render(digraph, fmt)
    if data is None:
        import warnings
        dot_path = os.path.splitext(path)[0] + ".dot"
        _write_file(dot_path, digraph.source.encode("utf-8"))
        warnings.warn(_NO_RENDERER.format(fmt=fmt, dot_path=dot_path, path=path),
                      RuntimeWarning, stacklevel=2)
        return dot_path
    _write_file(path, data)
    return path


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` as a file private to this user (0600)."""
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "wb") as out:
        out.write(data)
