"""An IO-free range allocator for the shared-memory arena.

Free ranges are kept twice: ordered by address (to coalesce neighbours on
free) and ordered by ``(size, start)`` (for best-fit lookup).  Both are
plain sorted lists searched with :mod:`bisect`, so lookups are O(log n) and
inserts/removals are a memmove of the list, which is fast for the few
thousand ranges an object store has.
"""
from __future__ import annotations

from bisect import bisect_left, insort


class Allocator:
    """Best-fit allocator of aligned ranges in ``[0, capacity)``."""

    def __init__(self, capacity: int, alignment: int = 64) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self._capacity = capacity
        self._alignment = alignment
        self._starts: list[int] = []            # free range starts, sorted
        self._free: dict[int, int] = {}         # free start -> size
        self._by_size: list[tuple[int, int]] = []  # (size, start), sorted
        self._allocated: dict[int, int] = {}    # allocated offset -> size
        self._used = 0
        if capacity:
            self._add_free(0, capacity)

    # -- queries -----------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def alignment(self) -> int:
        return self._alignment

    @property
    def used(self) -> int:
        """Bytes handed out (sizes rounded up to the alignment)."""
        return self._used

    @property
    def free_bytes(self) -> int:
        return self._capacity - self._used

    def largest_free(self) -> int:
        """Size of the largest free range (0 when full)."""
        return self._by_size[-1][0] if self._by_size else 0

    def rounded(self, size: int) -> int:
        """The number of bytes an allocation of ``size`` really takes."""
        a = self._alignment
        return max(a, (size + a - 1) // a * a)

    def best_fit(self, size: int) -> int | None:
        """The offset ``allocate(size)`` would return now (None: no room),
        without allocating."""
        i = bisect_left(self._by_size, (self.rounded(size), -1))
        return self._by_size[i][1] if i < len(self._by_size) else None

    def size_of(self, offset: int) -> int:
        """Allocated (rounded) size at ``offset``; KeyError if not allocated."""
        return self._allocated[offset]

    def free_ranges(self) -> list[tuple[int, int]]:
        """Free ``(start, size)`` ranges in address order (for tests/debug)."""
        return [(s, self._free[s]) for s in self._starts]

    def __len__(self) -> int:
        return len(self._allocated)

    # -- operations --------------------------------------------------------
    def allocate(self, size: int) -> int | None:
        """Return the offset of a new range of ``size`` bytes, or None."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        need = self.rounded(size)
        i = bisect_left(self._by_size, (need, -1))
        if i == len(self._by_size):
            return None
        have, start = self._by_size[i]
        self._remove_free(start, have, i)
        if have > need:
            self._add_free(start + need, have - need)
        self._allocated[start] = need
        self._used += need
        return start

    def free(self, offset: int) -> int:
        """Release the range at ``offset``; return its (rounded) size."""
        try:
            size = self._allocated.pop(offset)
        except KeyError:
            raise KeyError(f"offset {offset} is not allocated") from None
        self._used -= size
        start, end = offset, offset + size
        i = bisect_left(self._starts, offset)
        if i > 0:  # merge with the free range just below
            prev = self._starts[i - 1]
            psize = self._free[prev]
            if prev + psize == start:
                self._remove_free(prev, psize)
                start = prev
        nsize = self._free.get(end)
        if nsize is not None:  # merge with the free range just above
            self._remove_free(end, nsize)
            end += nsize
        self._add_free(start, end - start)
        return size

    # -- internals ---------------------------------------------------------
    def _add_free(self, start: int, size: int) -> None:
        insort(self._starts, start)
        self._free[start] = size
        insort(self._by_size, (size, start))

    def _remove_free(self, start: int, size: int, size_index: int | None = None) -> None:
        i = bisect_left(self._starts, start)
        del self._starts[i]
        del self._free[start]
        if size_index is None:
            size_index = bisect_left(self._by_size, (size, start))
        del self._by_size[size_index]

    def check(self) -> None:
        """Assert internal invariants (used by tests)."""
        assert self._starts == sorted(self._free)
        assert sorted(self._by_size) == self._by_size
        assert sorted((s, st) for st, s in self._free.items()) == self._by_size
        ranges = sorted([(s, n, "f") for s, n in self._free.items()]
                        + [(s, n, "a") for s, n in self._allocated.items()])
        pos = 0
        prev_kind = ""
        for s, n, kind in ranges:
            assert s == pos, f"gap or overlap at {pos}: next range starts at {s}"
            assert n > 0
            assert not (kind == "f" and prev_kind == "f"), "uncoalesced free ranges"
            pos, prev_kind = s + n, kind
        assert pos == self._capacity
        assert self._used == sum(self._allocated.values())
