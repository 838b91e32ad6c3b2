"""``flowcore.visualize()``: a picture of the futures DAG behind some refs."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from ..session import require_client
from ..objects.ref import ObjectRef

if TYPE_CHECKING:  # pragma: no cover
    import graphviz

__all__ = ["visualize"]


def _roots(refs: Any) -> list[bytes] | None:
    if refs is None:
        return None
    if isinstance(refs, ObjectRef):
        return [refs._id]
    if isinstance(refs, (list, tuple, set, frozenset)):
        out = []
        for i, r in enumerate(refs):
            if not isinstance(r, ObjectRef):
                raise TypeError(f"visualize(refs=...): item {i} is {type(r).__name__}, not an "
                                f"ObjectRef")
            out.append(r._id)
        return out
    raise TypeError(f"visualize(refs=...) takes an ObjectRef, a list of ObjectRefs or None "
                    f"(everything this program submitted), got {type(refs).__name__}")


def _output_format(filename: Any, format: Any) -> str | None:
    """The format ``draw.write`` will use, checked before asking the head."""
    from .draw import FORMATS
    if format is not None and not isinstance(format, str):
        raise TypeError(f"visualize(format=...) must be a string such as 'svg', got "
                        f"{type(format).__name__}")
    if filename is None:
        if format is not None:
            raise ValueError(f"visualize(format={format!r}) needs a filename= to write to; "
                             f"without one, the returned graphviz.Digraph shows inline in "
                             f"Jupyter or renders with .pipe(format=...)")
        return None
    if not isinstance(filename, (str, os.PathLike)):
        raise TypeError(f"visualize(filename=...) must be a path (str or os.PathLike), got "
                        f"{type(filename).__name__}")
    extension = os.path.splitext(os.fspath(filename))[1][1:].lower()
    fmt = (format if format is not None else extension).lower().lstrip(".")
    if not fmt:
        raise ValueError(f"visualize(filename={os.fspath(filename)!r}): cannot tell the format; "
                         f"pass format= or end the name in one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    if fmt not in FORMATS:
        raise ValueError(f"visualize(): unknown format {fmt!r}; expected one of "
                         f"{', '.join(FORMATS)}")
    return fmt


def visualize(refs: ObjectRef | Sequence[ObjectRef] | None = None,
              filename: str | os.PathLike | None = None,
              format: str | None = None) -> "graphviz.Digraph":
    """Draw the futures DAG behind ``refs`` as a ``graphviz.Digraph``.

    ``refs``: an ObjectRef or a list of them (their producing tasks and
    everything those depend on are drawn), or None for everything this
    program submitted that the head still tracks.  Boxes are tasks, rounded
    boxes actor calls, octagons actors, cylinders objects made by ``put``;
    the colour is the state (a legend lists the states with their counts).
    Solid edges carry data, dashed edges give actor call order.  Many
    sibling tasks of one function are drawn as one node ``f ×N``.

    Finished tasks whose results nobody references any more are pruned by
    the head, so they are not drawn: keep the refs to draw a finished graph.

    ``filename``: also write the picture there, ``.dot``/``.gv`` (DOT
    text), ``.svg``, ``.png`` or ``.pdf`` (rendered by the Graphviz ``dot``
    program, or graphviz-pure from ``pip install 'flowcore[graph]'``; with
    neither, the DOT source is written to the same name ending in ``.dot``
    and a ``RuntimeWarning`` says how to render it); ``format`` overrides the
    extension.  The returned Digraph
    displays inline in Jupyter.

    ``refs`` may also be an object with a ``__flowcore_graph__()`` method
    returning a ``graphviz.Digraph`` (a ``flowcore.data.Dataset`` draws its
    plan and executed operators this way); it is drawn instead.
    """
    from . import draw

    draw_self = None if isinstance(refs, ObjectRef) else getattr(refs, "__flowcore_graph__",
                                                                  None)
    if callable(draw_self):  # an object that draws itself (a flowcore.data Dataset: its plan)
        fmt = _output_format(filename, format)
        digraph = draw_self()
        if filename is not None:
            draw.write(digraph, filename, fmt)
        return digraph
    roots = _roots(refs)
    fmt = _output_format(filename, format)
    client = require_client()
    graph = client.query("graph", roots=roots)
    omitted = graph.get("omitted", 0)
    title = None
    if omitted:
        title = (f"the oldest {len(graph['nodes'])} graph nodes; {omitted} newer ones were "
                 f"not exported")
    digraph = draw.to_digraph(graph["nodes"], graph["edges"], title=title)
    if filename is not None:
        draw.write(digraph, filename, fmt)
    return digraph
