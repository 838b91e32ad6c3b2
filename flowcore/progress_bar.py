"""``flowcore.progress()``: a progress bar that advances as refs complete."""
from __future__ import annotations

import threading
from typing import Any, Sequence

from .session import require_client
from .objects.ref import ObjectRef

__all__ = ["progress"]


def _check_refs(refs: Any) -> list[ObjectRef]:
    if isinstance(refs, ObjectRef):
        return [refs]
    if isinstance(refs, (list, tuple)):
        for i, r in enumerate(refs):
            if not isinstance(r, ObjectRef):
                raise TypeError(f"progress(): item {i} is {type(r).__name__}, not an ObjectRef")
        return list(refs)
    raise TypeError(f"progress() takes an ObjectRef or a list of ObjectRefs, got "
                    f"{type(refs).__name__}")


def progress(refs: ObjectRef | Sequence[ObjectRef], *, desc: str | None = None,
             **bar_options: Any) -> list[ObjectRef]:
    """Show a progress bar while ``refs`` complete; return them when all are done.

    The bar (``tqdm.auto``: text in a terminal, a widget in Jupyter)
    advances as each ref's task finishes, driven by completion callbacks,
    not by polling.  A ref counts as done when it failed too (the bar shows
    how many failed); ``flowcore.get`` on the returned refs gives the
    values or raises the errors.  Returns the list of refs (a single ref is
    returned as a one-element list).

    ``desc`` labels the bar; other keyword arguments go to ``tqdm`` (for
    example ``file=``, ``leave=``, ``disable=``).  Interrupting the wait
    (Ctrl-C) leaves the tasks running.
    """
    items = _check_refs(refs)
    if desc is not None and not isinstance(desc, str):
        raise TypeError(f"progress(desc=...) must be a string, got {type(desc).__name__}")
    if "total" in bar_options:
        raise TypeError("progress(): total is the number of refs; it cannot be set")
    require_client()
    from tqdm.auto import tqdm

    total = len(items)
    cond = threading.Condition()
    counts = {"done": 0, "failed": 0}

    def on_done(fut: Any) -> None:
        # runs on whichever thread resolved the future: count and wake the
        # caller, which alone touches the bar
        failed = fut.cancelled() or fut.exception() is not None
        with cond:
            counts["done"] += 1
            counts["failed"] += bool(failed)
            cond.notify_all()

    bar_options.setdefault("unit", "ref")
    bar = tqdm(total=total, desc=desc, **bar_options)
    try:
        for ref in items:
            ref.future().add_done_callback(on_done)
        shown = shown_failed = 0
        while shown < total:
            with cond:
                cond.wait_for(lambda: counts["done"] != shown)
                done, failed = counts["done"], counts["failed"]
            if failed != shown_failed:
                bar.set_postfix(failed=failed, refresh=False)
                shown_failed = failed
            bar.update(done - shown)
            shown = done
    finally:
        bar.close()
    return items
