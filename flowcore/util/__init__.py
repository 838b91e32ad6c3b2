"""``flowcore.util``: Ray's ``ray.util`` names, built on the public API, and
bridges to the tools users already have: ``flowcore.util.queue``,
``flowcore.util.multiprocessing``, ``flowcore.util.dask`` and
``flowcore.util.joblib``.

As in Ray, ``flowcore.util.placement_group`` etc. are the placement group
functions (their module ``flowcore.util.placement_group`` also holds them)
and ``flowcore.util.scheduling_strategies`` the strategy classes.

Other names and submodules load on first use, so importing ``flowcore.util``
pulls in no optional dependency (the Dask and joblib bridges need their extras:
``pip install 'flowcore[dask]'``, ``'flowcore[sklearn]'``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..actor import list_named_actors
    from ..api import get_node_ip_address
    from ..placement_groups import placement_group_table
    from .actor_pool import ActorPool

# (bound here, after the submodule of the same name, as Ray does: the
# attribute is the function, not the module)
from .placement_group import (get_current_placement_group, get_placement_group,  # noqa: E402
                              placement_group, remove_placement_group)

_LAZY = {
    "ActorPool": "flowcore.util.actor_pool",
    "get_node_ip_address": "flowcore.api",
    "list_named_actors": "flowcore.actor",
    "placement_group_table": "flowcore.placement_groups",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'flowcore.util' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ActorPool", "get_current_placement_group", "get_node_ip_address",
           "get_placement_group", "list_named_actors", "placement_group",
           "placement_group_table", "remove_placement_group"]
