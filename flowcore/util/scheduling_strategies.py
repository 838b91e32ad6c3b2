"""``flowcore.util.scheduling_strategies``: where Ray's
``ray.util.scheduling_strategies`` keeps its strategy classes, so
``from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy``
becomes ``from flowcore.util.scheduling_strategies import ...`` unchanged.
The classes are ``flowcore.NodeAffinitySchedulingStrategy`` and
``flowcore.PlacementGroupSchedulingStrategy``; the string strategies
``"DEFAULT"`` and ``"SPREAD"`` are passed as they are."""
from __future__ import annotations

from ..scheduling import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

__all__ = ["NodeAffinitySchedulingStrategy", "PlacementGroupSchedulingStrategy"]
