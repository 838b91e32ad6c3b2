"""The placement group handle: a value naming a reserved set of bundles.

``PlacementGroup`` is what ``placement_group()`` returns, what
``PlacementGroupSchedulingStrategy`` holds and what the head serialises as
the value of ``pg.ready()``; ``check_bundles`` and ``STRATEGIES`` are the
rules of a group's definition, shared by the driver (which refuses bad input
at once) and the head.  This module sits low: the head, the scheduling
strategies and the user-facing ``flowcore.placement_groups`` all build on it.
"""
from __future__ import annotations

from typing import Any

from . import ids
from .context import require_client
from .exceptions import PlacementGroupError
from .objects.ref import ObjectRef

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def check_bundles(bundles: Any, strategy: Any) -> str | None:
    """What is wrong with a group's definition, or None (used by both sides)."""
    if strategy not in STRATEGIES:
        return (f"strategy={strategy!r} is not a placement strategy: use one of "
                f"{', '.join(STRATEGIES)}")
    if not isinstance(bundles, (list, tuple)) or not bundles:
        return "bundles must be a non-empty list of resource dicts, e.g. [{'CPU': 1}]"
    for i, b in enumerate(bundles):
        if not isinstance(b, dict) or not b:
            return (f"bundle {i} is {b!r}: each bundle must be a non-empty dict of resource "
                    f"name -> amount, e.g. {{'CPU': 1}}")
        for k, v in b.items():
            if not isinstance(k, str) or not k:
                return f"bundle {i}: resource names must be non-empty strings, got {k!r}"
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 \
                    or v == float("inf"):
                return f"bundle {i}: {k}={v!r} is invalid: amounts must be finite numbers >= 0"
        if not any(v > 0 for v in b.values()):
            return f"bundle {i} is {b!r}: a bundle must ask for some resource (an amount > 0)"
    return None


class PlacementGroup:
    """A handle to a placement group.  Serialisable: pass it to tasks."""

    def __init__(self, id: bytes, bundles: list[dict[str, float]], strategy: str = "PACK",
                 name: str = ""):
        self.id = bytes(id)
        self._bundles = [dict(b) for b in bundles]
        self.strategy = strategy
        self.name = name

    @property
    def bundle_specs(self) -> list[dict[str, float]]:
        """The bundles, in order (copies)."""
        return [dict(b) for b in self._bundles]

    @property
    def bundle_count(self) -> int:
        return len(self._bundles)

    def ready(self) -> ObjectRef:
        """An ObjectRef that becomes ready (its value: this group) once every
        bundle is reserved; use it with ``get`` or ``wait``.  It holds a
        ``PlacementGroupError`` if the group is removed before that."""
        return ObjectRef(ids.object_id(self.id, 0))

    def wait(self, timeout_seconds: float = 30) -> bool:
        """Block until every bundle is reserved (True) or ``timeout_seconds``
        pass (False)."""
        client = require_client()
        ref = self.ready()
        ready = client.objects.wait_ready([ref._id], 1, timeout_seconds)
        if ref._id not in ready:
            return False
        client.objects.prefetch(ready)
        try:
            client.objects.get_values([ref], None)
        except PlacementGroupError:
            return False
        return True

    def __reduce__(self) -> Any:
        return (PlacementGroup, (self.id, self._bundles, self.strategy, self.name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlacementGroup) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        name = f", name={self.name!r}" if self.name else ""
        return f"PlacementGroup({self.id.hex()}, {self.strategy}, {self._bundles}{name})"


__all__ = ["PlacementGroup", "STRATEGIES", "check_bundles"]
