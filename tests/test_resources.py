"""Unit tests of the ``Resources`` value type (``flowcore.resources``)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from flowcore.resources import EPS, Resources


def test_fits_compares_each_requested_amount() -> None:
    free = Resources({"CPU": 2.0, "GPU": 1.0, "memory": 4e9})
    assert free.fits({"CPU": 2.0})
    assert free.fits({"CPU": 1.0, "GPU": 1.0, "memory": 4e9})
    assert not free.fits({"CPU": 2.5})
    assert not free.fits({"memory": 4e9 + 1})
    assert not free.fits({"TPU": 1.0})        # a resource the account lacks counts as 0
    assert free.fits({"TPU": 0.0, "CPU": 0})  # zero amounts ask for nothing
    assert free.fits({})


def test_fits_allows_float_slack_of_fractional_sums() -> None:
    free = Resources({"CPU": 1.0})
    for _ in range(10):
        free.take({"CPU": 0.1})
    for _ in range(10):
        free.give({"CPU": 0.1})
    assert free.fits({"CPU": 1.0})
    third = Resources({"GPU": 1.0})
    third.take({"GPU": 1 / 3})
    third.take({"GPU": 1 / 3})
    assert third.fits({"GPU": 1 / 3})
    assert not Resources({"CPU": 1.0 - 10 * EPS}).fits({"CPU": 1.0})


def test_take_and_give_update_in_place_and_may_go_negative() -> None:
    free = Resources({"CPU": 1.0})
    free.take({"CPU": 2.0, "GPU": 0.5, "disk": 0})
    assert free == {"CPU": -1.0, "GPU": -0.5}   # oversubscribed; a zero amount adds no key
    assert not free.fits({"CPU": 0.5})
    free.give({"CPU": 2.0, "GPU": 0.5})
    assert free == {"CPU": 1.0, "GPU": 0.0}


def test_could_ever_fit_is_against_the_total() -> None:
    total = Resources({"CPU": 4.0, "GPU": 2.0})
    assert total.could_ever_fit({"CPU": 4.0, "GPU": 2.0})
    assert not total.could_ever_fit({"GPU": 3.0})
    assert not total.could_ever_fit({"fpga": 1.0})


def test_it_reads_and_serialises_like_a_dict() -> None:
    r = Resources({"CPU": 1.0})
    assert isinstance(r, dict) and dict(r) == {"CPU": 1.0}
    assert json.loads(json.dumps(r)) == {"CPU": 1.0}
    c = r.copy()
    c.take({"CPU": 1.0})
    assert isinstance(c, Resources) and r["CPU"] == 1.0
    assert "Resources(" in repr(r)


amounts = st.dictionaries(st.sampled_from(["CPU", "GPU", "memory", "x"]),
                          st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 1e9 / 3]), max_size=4)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(amounts, max_size=30))
def test_taking_then_giving_back_restores_what_fits(reqs: list) -> None:
    total = Resources({"CPU": 8.0, "GPU": 2.0, "memory": 16e9, "x": 1.0})
    free = total.copy()
    taken = []
    for r in reqs:
        if free.fits(r):
            free.take(r)
            taken.append(r)
    for r in reversed(taken):
        free.give(r)
    for k in total:
        assert free[k] == pytest.approx(total[k], abs=1e-6)
    assert free.fits(total)
