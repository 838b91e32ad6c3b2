"""A dataset's schema: the ``Schema`` value and reading it off a plan."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa

from .executor import execute
from .plan import InputSource, LogicalPlan


class Schema:
    """Column names and types of a dataset (``names``, ``types``,
    ``base_schema``: the ``pyarrow.Schema``)."""

    def __init__(self, base: pa.Schema) -> None:
        self.base_schema = base

    @property
    def names(self) -> list[str]:
        return list(self.base_schema.names)

    @property
    def types(self) -> list[pa.DataType]:
        return list(self.base_schema.types)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Schema) and self.base_schema.equals(other.base_schema)

    def __repr__(self) -> str:
        w = max([6] + [len(n) for n in self.names])
        lines = ["Column" + " " * (w - 5) + "Type", "-" * 6 + " " * (w - 5) + "----"]
        lines += [f"{n}{' ' * (w - len(n) + 1)}{t}" for n, t in zip(self.names, self.types)]
        return "\n".join(lines)


def plan_schema(plan: LogicalPlan, fetch_if_missing: bool = True,
                run: Callable[[], Iterator[Any]] | None = None) -> Schema | None:
    """The schema of ``plan``'s output: from the input's metadata when the
    plan has no operators, else from the first non-empty block it makes
    (``run`` starts the execution; default ``execute(plan)``)."""
    src = plan.source
    if isinstance(src, InputSource) and not plan.ops:
        for _, m in src.bundles:
            if m["schema"] is not None and len(m["schema"]):
                return Schema(m["schema"])
        return None
    if not fetch_if_missing:
        return None
    gen = run() if run is not None else execute(plan)
    fallback = None
    try:
        for b in gen:
            b.release()
            s = b.meta.get("schema")
            if s is not None and len(s):
                if b.num_rows:
                    return Schema(s)
                fallback = fallback or Schema(s)  # only empty blocks so far
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()
    return fallback
