"""``flowcore.util.placement_group``: where Ray's ``ray.util.placement_group``
keeps the placement group functions, so
``from ray.util.placement_group import placement_group`` becomes
``from flowcore.util.placement_group import placement_group`` unchanged.
They are the functions of ``flowcore.placement_groups`` (also exported as
``flowcore.placement_group`` etc.)."""
from __future__ import annotations

from ..placement_group_handle import PlacementGroup
from ..placement_groups import (get_current_placement_group, get_placement_group,
                                placement_group, placement_group_table,
                                remove_placement_group)

__all__ = ["PlacementGroup", "get_current_placement_group", "get_placement_group",
           "placement_group", "placement_group_table", "remove_placement_group"]
