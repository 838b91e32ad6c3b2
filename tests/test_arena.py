"""Unit and property tests of the IO-free arena allocator."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from flowcore.objects.arena import Allocator


def test_allocations_are_aligned_and_accounted() -> None:
    a = Allocator(1024, alignment=64)
    x = a.allocate(1)
    y = a.allocate(100)
    z = a.allocate(0)  # zero size still takes one alignment unit
    assert (x, y, z) == (0, 64, 192)
    assert a.used == 64 + 128 + 64
    assert a.free_bytes == 1024 - a.used
    assert a.size_of(y) == 128
    a.check()


def test_returns_none_when_no_range_fits() -> None:
    a = Allocator(256)
    offs = [a.allocate(64) for _ in range(4)]
    assert a.allocate(1) is None
    a.free(offs[0])
    a.free(offs[2])
    assert a.free_bytes == 128
    assert a.largest_free() == 64
    assert a.allocate(65) is None  # fragmented: 128 free but not contiguous
    assert a.allocate(64) == 0  # best fit, lowest address first
    a.check()


def test_free_coalesces_neighbours_and_reports_size() -> None:
    a = Allocator(640)
    offs = [a.allocate(64) for _ in range(10)]
    assert a.free(offs[3]) == 64
    assert a.free(offs[5]) == 64
    assert a.free(offs[4]) == 64  # joins 3 and 5
    assert (192, 192) in a.free_ranges()
    assert a.largest_free() == 192
    a.check()


def test_best_fit_prefers_the_smallest_sufficient_range() -> None:
    a = Allocator(64 * 10)
    offs = [a.allocate(64) for _ in range(10)]
    for i in (1, 2, 3, 6, 8):  # free ranges: [1..3] (192 bytes), [6] and [8]
        a.free(offs[i])
    assert a.allocate(64) == offs[6]
    assert a.allocate(128) == offs[1]
    a.check()


def test_best_fit_peek_names_what_allocate_returns_without_allocating() -> None:
    a = Allocator(64 * 10)
    offs = [a.allocate(64) for _ in range(10)]
    for i in (1, 2, 6):
        a.free(offs[i])
    used = a.used
    assert a.best_fit(64) == offs[6] and a.best_fit(100) == offs[1]
    assert a.best_fit(64 * 3) is None
    assert a.used == used  # nothing allocated
    assert a.allocate(64) == offs[6] and a.allocate(100) == offs[1]
    a.check()


def test_free_of_unknown_offset_is_an_error() -> None:
    a = Allocator(256)
    off = a.allocate(10)
    with pytest.raises(KeyError):
        a.free(off + 64)
    a.free(off)
    with pytest.raises(KeyError):
        a.free(off)  # double free


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Allocator(100, alignment=48)
    with pytest.raises(ValueError):
        Allocator(-1)
    with pytest.raises(ValueError):
        Allocator(100).allocate(-1)
    assert Allocator(0).allocate(0) is None


def test_unaligned_capacity_tail_is_unusable_but_accounted() -> None:
    a = Allocator(100)
    assert a.allocate(64) == 0
    assert a.allocate(1) is None
    assert a.used + a.free_bytes == 100
    a.check()


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 4096),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 700)), max_size=80))
def test_random_alloc_free_never_overlaps(capacity: int, ops: list) -> None:
    a = Allocator(capacity, alignment=16)
    live: dict[int, int] = {}
    for is_alloc, n in ops:
        if is_alloc or not live:
            off = a.allocate(n)
            if off is None:
                assert a.largest_free() < a.rounded(n)
                continue
            assert off % 16 == 0
            assert off + a.rounded(n) <= capacity
            for o, s in live.items():  # no overlap with any live range
                assert off + a.rounded(n) <= o or o + s <= off
            live[off] = a.rounded(n)
        else:
            off = sorted(live)[n % len(live)]
            assert a.free(off) == live.pop(off)
        assert a.used + a.free_bytes == capacity
        assert a.used == sum(live.values())
        a.check()
    for off in list(live):
        a.free(off)
    assert a.used == 0
    assert a.free_ranges() == ([(0, capacity)] if capacity else [])
    assert a.largest_free() == capacity
