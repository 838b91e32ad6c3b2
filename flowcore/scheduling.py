"""Scheduling strategies for ``@remote(scheduling_strategy=...)``.

* ``"DEFAULT"`` (or None): among the nodes that fit, the one holding the most
  bytes of the task's arguments, then the least loaded.
* ``"SPREAD"``: the least loaded node that fits, rotating among equals, so a
  burst of tasks lands on every node.
* ``NodeAffinitySchedulingStrategy(node_id, soft=False)``: that node; with
  ``soft=True`` another node when it does not fit.
* ``PlacementGroupSchedulingStrategy(pg, bundle_index=-1, capture=False)``:
  inside a bundle of a placement group (any bundle for -1), using the
  bundle's resources; with ``placement_group_capture_child_tasks=True``,
  tasks it submits without a strategy go into the same group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .placement_group_handle import PlacementGroup

if TYPE_CHECKING:
    from .client.core import CoreClient


@dataclass(frozen=True)
class NodeAffinitySchedulingStrategy:
    node_id: str
    soft: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise TypeError("NodeAffinitySchedulingStrategy(node_id=...): expected a node id "
                            "string (see flowcore.nodes())")
        if not isinstance(self.soft, bool):
            raise TypeError("NodeAffinitySchedulingStrategy(soft=...): expected a bool")


@dataclass(frozen=True)
class PlacementGroupSchedulingStrategy:
    placement_group: PlacementGroup | None
    placement_group_bundle_index: int = -1
    placement_group_capture_child_tasks: bool = False

    def __post_init__(self) -> None:
        pg = self.placement_group
        if pg is not None and not isinstance(pg, PlacementGroup):
            raise TypeError(f"PlacementGroupSchedulingStrategy(placement_group=...): expected "
                            f"a PlacementGroup (from flowcore.placement_group()), got "
                            f"{type(pg).__name__}")
        i = self.placement_group_bundle_index
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"PlacementGroupSchedulingStrategy(placement_group_bundle_index="
                            f"{i!r}): expected an int (-1 for any bundle)")
        if pg is not None and not -1 <= i < pg.bundle_count:
            raise ValueError(f"placement_group_bundle_index={i} is out of range: the group has "
                             f"{pg.bundle_count} bundle(s); use 0..{pg.bundle_count - 1}, or "
                             f"-1 for any bundle")
        if not isinstance(self.placement_group_capture_child_tasks, bool):
            raise TypeError("PlacementGroupSchedulingStrategy("
                            "placement_group_capture_child_tasks=...): expected a bool")


def is_valid(value: Any) -> bool:
    return value is None or value in ("DEFAULT", "SPREAD") or \
        isinstance(value, (NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy))


def encode(value: Any) -> Any:
    """The wire form: None, "SPREAD", ["node", id, soft] or
    ["pg", group id, bundle index, capture]."""
    if value is None or value == "DEFAULT":
        return None
    if value == "SPREAD":
        return "SPREAD"
    if isinstance(value, PlacementGroupSchedulingStrategy):
        if value.placement_group is None:
            return None
        return ["pg", value.placement_group.id, value.placement_group_bundle_index,
                value.placement_group_capture_child_tasks]
    return ["node", value.node_id, value.soft]


def for_submit(client: CoreClient, value: Any, res: dict[str, float], what: str) -> Any:
    """The wire strategy of a task or actor about to be submitted.  A request
    that no bundle it may use could hold is refused here, naming the bundle;
    with no strategy given, a task running in a group that captures child
    tasks passes its group on."""
    if value is None:
        task = getattr(client, "current_task", None) or {}
        if task.get("pg_capture"):
            return ["pg", task["pg_capture"], -1, True]
        return None
    if isinstance(value, PlacementGroupSchedulingStrategy) and value.placement_group is not None:
        specs = value.placement_group.bundle_specs
        i = value.placement_group_bundle_index
        cands = specs if i == -1 else [specs[i]]
        if not any(all(b.get(k, 0.0) >= v - 1e-9 for k, v in res.items() if v) for b in cands):
            where = "any bundle" if i == -1 else f"bundle {i}"
            raise ValueError(f"{what} asks for {res}, more than {where} of its placement group "
                             f"holds ({cands}); ask for less (num_cpus=, num_gpus=, "
                             f"resources=) or make the bundle larger")
    return encode(value)
