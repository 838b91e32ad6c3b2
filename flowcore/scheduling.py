"""Scheduling strategies for ``@remote(scheduling_strategy=...)``.

* ``"DEFAULT"`` (or None): among the nodes that fit, the one holding the most
  bytes of the task's arguments, then the least loaded.
* ``"SPREAD"``: the least loaded node that fits, rotating among equals, so a
  burst of tasks lands on every node.
* ``NodeAffinitySchedulingStrategy(node_id, soft=False)``: that node; with
  ``soft=True`` another node when it does not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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


def is_valid(value: Any) -> bool:
    return value is None or value in ("DEFAULT", "SPREAD") or \
        isinstance(value, NodeAffinitySchedulingStrategy)


def encode(value: Any) -> Any:
    """The wire form: None, "SPREAD" or ["node", id, soft]."""
    if value is None or value == "DEFAULT":
        return None
    if value == "SPREAD":
        return "SPREAD"
    return ["node", value.node_id, value.soft]
