"""``Resources``: amounts of named resources (``CPU``, ``GPU``, ``memory``,
custom ones) and the arithmetic every account of them needs.

A node's free resources, a placement-group bundle's free share and a task's
request are all a mapping of resource name to amount.  ``Resources`` is that
mapping (a ``dict`` subclass, so it reads, compares and serialises like one)
with the four operations an account needs:

* ``fits(request)``: is there enough left for ``request`` now;
* ``could_ever_fit(request)``: called on a total, could ``request`` ever fit;
* ``take(request)`` / ``give(request)``: subtract / add a request.

Amounts are floats: fractions of a CPU or GPU add up with rounding errors,
so a comparison allows ``EPS`` (here and nowhere else).  A request's zero
amounts are ignored; a name the account does not have counts as 0.  This is
a leaf module: it imports nothing from flowcore.

Requests are plain mappings (the ``res`` of a task spec as it comes off the
wire); only accounts need to be ``Resources``, so nothing is converted on
the hot path.
"""
from __future__ import annotations

from typing import Mapping

#: slack allowed when comparing amounts (float sums of fractions)
EPS = 1e-9


class Resources(dict[str, float]):
    """An account of resource amounts (name -> float), updated in place."""

    __slots__ = ()

    def fits(self, request: Mapping[str, float]) -> bool:
        """Whether every amount in ``request`` is free here (within ``EPS``)."""
        get = self.get
        for k, v in request.items():
            if v and get(k, 0.0) < v - EPS:
                return False
        return True

    def could_ever_fit(self, request: Mapping[str, float]) -> bool:
        """Called on a total: whether ``request`` fits it when nothing else runs."""
        return self.fits(request)

    def take(self, request: Mapping[str, float]) -> None:
        """Subtract ``request`` (an account may go negative: oversubscription
        is the caller's decision, e.g. a worker taking back its CPU)."""
        get = self.get
        for k, v in request.items():
            if v:
                self[k] = get(k, 0.0) - v

    def give(self, request: Mapping[str, float]) -> None:
        """Add ``request`` back."""
        get = self.get
        for k, v in request.items():
            if v:
                self[k] = get(k, 0.0) + v

    def copy(self) -> "Resources":
        return Resources(self)

    def __repr__(self) -> str:
        return f"Resources({dict.__repr__(self)})"
