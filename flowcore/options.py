"""The one options table for ``@remote`` and ``.options()``.

Each option is declared once with its type check, default and whether it
applies to tasks, actors or both; every entry point validates through
``validate`` so the error for a bad key or value is the same everywhere and
lists what is valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .runtime_env import check as check_runtime_env
from .scheduling import is_valid as valid_strategy

TASK, ACTOR, BOTH = "task", "actor", "both"
METHOD = "method"  # an actor method: @flowcore.method(...), handle.m.options(...)


@dataclass(frozen=True)
class Option:
    name: str
    applies: str
    default: Any
    check: Callable[[Any], bool]
    expected: str
    also: tuple[str, ...] = ()  # further kinds it applies to (e.g. METHOD)

    def applies_to(self, kind: str) -> bool:
        return self.applies == kind or (self.applies == BOTH and kind in (TASK, ACTOR)) \
            or kind in self.also


def _nonneg_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v)


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _retries(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= -1


def _resources(v: Any) -> bool:
    if isinstance(v, dict) and "memory" in v:
        raise ValueError("resources={'memory': ...}: use the memory= option for memory")
    return v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and k not in ("CPU", "GPU") and _nonneg_number(x)
        for k, x in v.items()))


def _retry_exceptions(v: Any) -> bool:
    if isinstance(v, bool):
        return True
    return isinstance(v, (list, tuple)) and all(
        isinstance(e, type) and issubclass(e, BaseException) for e in v)


def _num_returns(v: Any) -> bool:
    return v in ("dynamic", "streaming") or (isinstance(v, int) and not isinstance(v, bool)
                                             and v >= 0)


def _concurrency_groups(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and k and _nonneg_int(n) and n >= 1 for k, n in v.items()))


def _strategy(v: Any) -> bool:
    return valid_strategy(v)


def _runtime_env(v: Any) -> bool:
    return check_runtime_env(v)  # raises an error naming the bad key or value


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("num_cpus", BOTH, None, lambda v: v is None or _nonneg_number(v),
           "a number >= 0"),
    Option("num_gpus", BOTH, 0, _nonneg_number, "a number >= 0"),
    # bytes of memory, a scheduling quantity (as in Ray): not a limit on the process
    Option("memory", BOTH, None, lambda v: v is None or _nonneg_number(v),
           "a number of bytes >= 0"),
    Option("resources", BOTH, None, _resources,
           "a dict of custom resource name -> number >= 0 (use num_cpus/num_gpus for CPU/GPU)"),
    Option("num_returns", TASK, 1, _num_returns,
           "an int >= 0, 'streaming' or 'dynamic' (for a generator function)", also=(METHOD,)),
    Option("max_calls", TASK, None, lambda v: v is None or _nonneg_int(v),
           "an int >= 0 (0: no limit; default: no limit, 1 for GPU tasks)"),
    Option("max_retries", TASK, 3, _retries, "an int >= 0, or -1 for unlimited"),
    Option("retry_exceptions", TASK, False, _retry_exceptions,
           "True/False or a list of exception classes", also=(METHOD,)),
    Option("name", BOTH, None, _opt_str, "a string", also=(METHOD,)),
    Option("namespace", ACTOR, None, _opt_str, "a string"),
    Option("get_if_exists", ACTOR, False, lambda v: isinstance(v, bool), "a bool"),
    Option("lifetime", ACTOR, None, lambda v: v in (None, "detached"), "None or 'detached'"),
    Option("max_restarts", ACTOR, 0, _retries, "an int >= 0, or -1 for unlimited"),
    Option("max_task_retries", ACTOR, 0, _retries, "an int >= 0, or -1 for unlimited",
           also=(METHOD,)),
    # None: 1 for a threaded actor, 1000 for an async one (Ray's defaults)
    Option("max_concurrency", ACTOR, None, lambda v: v is None or (_nonneg_int(v) and v >= 1),
           "an int >= 1"),
    Option("concurrency_groups", ACTOR, None, _concurrency_groups,
           "None or a dict of group name -> int >= 1 (calls of that group run at once)"),
    Option("max_pending_calls", ACTOR, -1, lambda v: isinstance(v, int) and not isinstance(
        v, bool) and (v == -1 or v >= 1), "an int >= 1, or -1 for no limit"),
    Option("concurrency_group", METHOD, None, lambda v: v is None or (isinstance(v, str)
                                                                      and bool(v)),
           "the name of one of the actor's concurrency_groups"),
    Option("scheduling_strategy", BOTH, None, lambda v: _strategy(v),
           "None, 'DEFAULT', 'SPREAD', NodeAffinitySchedulingStrategy(node_id, soft) or "
           "PlacementGroupSchedulingStrategy(placement_group, bundle_index)"),
    Option("runtime_env", BOTH, None, lambda v: _runtime_env(v),
           "None or a dict with keys working_dir, py_modules, env_vars"),
]}


def validate(kind: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Check ``options`` for a ``kind`` ("task" or "actor"); returns them.

    Raises ValueError for unknown keys or keys of the other kind, TypeError
    for ill-typed values; both messages list what is valid.
    """
    valid = sorted(n for n, o in OPTIONS.items() if o.applies_to(kind))
    for key, value in options.items():
        opt = OPTIONS.get(key)
        if opt is None or not opt.applies_to(kind):
            extra = ""
            if opt is not None:
                kinds = [TASK, ACTOR] if opt.applies == BOTH else [opt.applies]
                extra = f" ({key!r} applies to {'s and '.join(kinds + list(opt.also))}s only)"
            what = "an actor method" if kind == METHOD else \
                f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
            raise ValueError(f"{where}: unknown option {key!r}{extra}. Valid options for "
                             f"{what}: {', '.join(valid)}")
        try:
            ok = opt.check(value)
        except (TypeError, ValueError) as e:  # a check that names the problem itself
            raise type(e)(f"{where}: {e}") from None
        if not ok:
            raise TypeError(f"{where}: option {key}={value!r} is invalid: expected "
                            f"{opt.expected}")
    return options


def resolved(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options with defaults filled in for ``kind``."""
    out = {n: o.default for n, o in OPTIONS.items() if o.applies_to(kind)}
    out.update(options)
    return out


def resource_request(opts: dict[str, Any], default_cpus: float = 1.0) -> dict[str, float]:
    res: dict[str, float] = {}
    cpus = opts.get("num_cpus")
    res["CPU"] = float(default_cpus if cpus is None else cpus)
    if opts.get("num_gpus"):
        res["GPU"] = float(opts["num_gpus"])
    if opts.get("memory"):
        res["memory"] = float(opts["memory"])
    for k, v in (opts.get("resources") or {}).items():
        res[k] = float(v)
    return {k: v for k, v in res.items() if v}
