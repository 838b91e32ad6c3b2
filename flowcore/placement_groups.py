"""Placement groups: sets of resource bundles reserved together.

``placement_group(bundles, strategy)`` asks the head to reserve every bundle
at once (all or none); ``pg.ready()`` is an ``ObjectRef`` that becomes ready
when they are.  Tasks and actors run inside a bundle with
``.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))`` and
use the bundle's resources instead of the node's free pool.
"""
from __future__ import annotations

from typing import Any

from .session import current_client, require_client
from .placement_group_handle import STRATEGIES, PlacementGroup, check_bundles


def placement_group(bundles: list[dict[str, float]], strategy: str = "PACK", name: str = "",
                    lifetime: str | None = None) -> PlacementGroup:
    """Reserve ``bundles`` (a list of resource dicts such as ``{"CPU": 1}``)
    with ``strategy``: "PACK" (one node if possible, else as few as possible),
    "SPREAD" (distinct nodes if possible), "STRICT_PACK" (one node, or wait),
    "STRICT_SPREAD" (a distinct node per bundle, or wait).  Returns at once;
    ``ready()``/``wait()`` tell when the reservation is made.  The group is
    removed when its driver exits unless ``lifetime="detached"``."""
    if isinstance(bundles, tuple):
        bundles = list(bundles)
    problem = check_bundles(bundles, strategy)
    if problem is not None:
        kind = TypeError if not isinstance(bundles, list) else ValueError
        raise kind(f"placement_group(): {problem}")
    if not isinstance(name, str):
        raise TypeError(f"placement_group(name={name!r}): expected a string")
    if lifetime not in (None, "detached"):
        raise ValueError(f"placement_group(lifetime={lifetime!r}): expected None or 'detached'")
    client = require_client()
    pgid = client.ids.task_id()
    clean = [{k: float(v) for k, v in b.items()} for b in bundles]
    reply = client.request("head", {"op": "create_placement_group", "pgid": pgid,
                                    "bundles": clean, "strategy": strategy, "name": name,
                                    "lifetime": lifetime})
    if not reply.get("ok"):
        raise ValueError(f"placement_group(): {reply.get('error', 'refused by the head')}")
    return PlacementGroup(pgid, clean, strategy, name)


def remove_placement_group(placement_group: PlacementGroup) -> None:
    """Remove the group: its actors are killed, its tasks cancelled and its
    bundles' resources given back."""
    if not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"remove_placement_group() takes a PlacementGroup, got "
                        f"{type(placement_group).__name__}")
    client = require_client()
    r = client.request("head", {"op": "remove_placement_group", "pgid": placement_group.id})
    for aid in (r or {}).get("actors") or ():  # killed: later calls go through the head
        client.direct.pause(aid)


def _from_info(info: dict | None) -> PlacementGroup | None:
    if info is None:
        return None
    return PlacementGroup(info["pgid"], info["bundles"], info["strategy"], info["name"])


def get_placement_group(name: str) -> PlacementGroup:
    """The live placement group called ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"get_placement_group(name={name!r}): expected a non-empty string")
    pg = _from_info(require_client().query("get_placement_group", name=name))
    if pg is None:
        raise ValueError(f"no placement group named {name!r} exists (it was never created, or "
                         f"was removed); see flowcore.state.list_placement_groups()")
    return pg


def get_current_placement_group() -> PlacementGroup | None:
    """Inside a task or actor placed in a bundle: its group; else None."""
    client = current_client()
    task = getattr(client, "current_task", None) if client is not None else None
    key = (task or {}).get("bundle")
    if not key and task and task.get("actor"):  # a call: the group its actor was placed in
        key = getattr(client, "actor_bundle", None)
    if not key or client is None:
        return None
    return _from_info(client.query("get_placement_group", pgid=bytes.fromhex(key.split(":")[0])))


def placement_group_table(placement_group: PlacementGroup | None = None) -> dict[str, Any]:
    """Ray's table of placement groups: ``{id_hex: info}`` for every group
    the head knows, or the ``info`` of one group.  ``info`` has
    ``placement_group_id``, ``name``, ``strategy``, ``state``, ``bundles``
    (index -> resources) and ``bundles_to_node_id`` (index -> node id)."""
    if placement_group is not None and not isinstance(placement_group, PlacementGroup):
        raise TypeError(f"placement_group_table() takes a PlacementGroup or None, got "
                        f"{type(placement_group).__name__}")
    table = {}
    for row in require_client().query("list_placement_groups", state=None):
        table[row["placement_group_id"]] = {
            "placement_group_id": row["placement_group_id"], "name": row["name"],
            "strategy": row["strategy"], "state": row["state"],
            "bundles": dict(enumerate(row["bundles"])),
            "bundles_to_node_id": {int(k): v for k, v in row["bundles_to_node_id"].items()},
            "stats": {"cause": row.get("cause"), "feasible": row.get("feasible")}}
    if placement_group is None:
        return table
    return table.get(placement_group.id.hex(), {})


__all__ = ["PlacementGroup", "placement_group", "remove_placement_group", "get_placement_group",
           "get_current_placement_group", "placement_group_table", "STRATEGIES"]
