"""The physical plan: how a logical plan's operators group into the
executor's stages (fused task stages, actor pools, barriers, limits),
where ``map_batches(batch_size=N)`` needs its input re-cut, and
``Dataset.explain()``'s description of it."""
from __future__ import annotations

from .context import DataContext
from .plan import InputSource, LimitOp, LogicalPlan, MapOp, ReadSource, UnionSource, ZipSource

__all__ = ["stages", "segments_with_tasks", "describe_stages", "one_task_plan", "stage_name"]


def one_task_plan(plan: LogicalPlan, ctx: DataContext) -> bool:
    """A small plan without pools or block-shaping operators runs as one task."""
    size = plan.input_size()
    return (size is not None and size <= ctx.small_plan_bytes and not plan.has_actors()
            and not plan.sets_blocks())


def stages(plan: LogicalPlan) -> list[tuple]:
    """The physical stages: ("task", ops, batch), ("actor", pre_ops, ops,
    batch, split_pre), ("limit", op), ("barrier", op); fused where possible.

    ``batch``: the rows a call's input must be a multiple of (an operator
    with ``map_batches(batch_size=N)`` inside), or None.  Such an operator
    starts a new stage when the rows reaching it in a task are not known
    from block metadata (after a read, a filter, a flat_map or another
    map_batches), so its input can be re-cut into multiples of N (for a
    pool's class, ``split_pre``: the pool runs the part before it first)."""
    out: list[tuple] = []
    raw = not isinstance(plan.source, (InputSource, UnionSource, ZipSource))
    pending: list[MapOp] = []
    actor: list[MapOp] | None = None
    pre: list[MapOp] = []
    batch: int | None = None
    split_pre = False

    def flush() -> None:
        nonlocal pending, raw, actor, pre, batch, split_pre
        if actor is not None:
            out.append(("actor", pre, actor, batch, split_pre))
            actor, pre, pending, split_pre = None, [], [], False
        elif pending or raw:
            out.append(("task", pending, batch))
            pending = []
        raw = False
        batch = None

    def rows_known() -> bool:
        """Rows reaching the next operator follow from the stage's input blocks."""
        return not raw and all(o.keeps_row_count for o in pre + (actor or []) + pending)

    for op in plan.ops:
        if isinstance(op, MapOp):
            cut = bool(op.exact_batch_size) and not rows_known()
            if op.is_actor:
                if actor is not None or (cut and batch):
                    flush()
                elif cut:  # the read and ``pending`` run as calls of their own on the pool
                    split_pre = True
                pre, actor, pending = pending, [op], []
            elif cut:
                flush()
                pending.append(op)
            elif actor is not None:
                actor.append(op)
            else:
                pending.append(op)
            if op.exact_batch_size:
                batch = op.exact_batch_size
            continue
        flush()
        out.append(("limit" if isinstance(op, LimitOp) else "barrier", op))
    flush()
    return out


def segments_with_tasks(plan: LogicalPlan, stages: list[tuple]) -> list[bool]:
    """For each stage: whether CPU tasks stream in its barrier-delimited
    segment (then an actor pool there must leave them a CPU)."""
    out = [False] * len(stages)
    seg: list[int] = []
    has = isinstance(plan.source, UnionSource)

    def close() -> None:
        for i in seg:
            out[i] = has
    for i, st in enumerate(stages):
        if st[0] == "barrier":
            close()
            seg, has = [], False
            continue
        seg.append(i)
        has = has or st[0] == "task"
    close()
    return out


def describe_stages(plan: LogicalPlan) -> str:
    """The physical stages ``plan`` runs as (``Dataset.explain()``)."""
    if one_task_plan(plan, DataContext.get_current()):
        return ("ExecutePlanInOneTask[" + " -> ".join([plan.source.name]
                                                      + [o.name for o in plan.ops]) + "]")
    lines = []
    for p in getattr(plan.source, "plans", []):
        lines += ["input: " + line for line in describe_stages(p).splitlines()]
    if getattr(plan.source, "plans", None):
        lines.append(plan.source.name)
    reads = isinstance(plan.source, ReadSource)
    for i, st in enumerate(stages(plan)):
        if st[0] == "task":
            line = stage_name(st[1], "ReadTask" if reads and i == 0 else "")
            line = f"TaskPoolMapOperator[{line}]"
        elif st[0] == "actor":
            pre = stage_name(st[1], "ReadTask" if reads and i == 0 else "") \
                if st[1] or (reads and i == 0) else ""
            if st[4]:
                line = (f"ActorPoolMapOperator[{pre}] (the pool's own calls) -> "
                        f"ActorPoolMapOperator[{stage_name(st[2])}]")
            else:
                line = f"ActorPoolMapOperator[{stage_name(st[1] + st[2])}]"
        else:
            line = st[1].name
        batch = st[2] if st[0] == "task" else st[3] if st[0] == "actor" else None
        if batch:
            line += f" (input re-cut to multiples of {batch} rows)"
        lines.append(line)
    return "\n".join(lines)


def stage_name(ops: list[MapOp], first: str = "") -> str:
    names = ([first] if first else []) + [o.name for o in ops]
    return "->".join(names) or "ReadBlocks"
