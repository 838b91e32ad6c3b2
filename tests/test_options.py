"""The one options table: ``validate``, ``resolved`` and ``resource_request``."""
from __future__ import annotations

import math

import pytest

from flowcore import options as opts
from flowcore.options import ACTOR, BOTH, OPTIONS, TASK, resolved, resource_request, validate

TASK_KEYS = sorted(n for n, o in OPTIONS.items() if o.applies in (TASK, BOTH))
ACTOR_KEYS = sorted(n for n, o in OPTIONS.items() if o.applies in (ACTOR, BOTH))
ACTOR_ONLY = sorted(n for n, o in OPTIONS.items() if o.applies == ACTOR)
TASK_ONLY = sorted(n for n, o in OPTIONS.items() if o.applies == TASK)


def test_table_is_consistent() -> None:
    for name, o in OPTIONS.items():
        assert o.name == name
        assert o.applies in (TASK, ACTOR, BOTH)
        assert o.expected
        # every default passes its own check
        assert o.check(o.default), name
    assert {"num_cpus", "num_gpus", "resources", "num_returns", "max_retries",
            "retry_exceptions", "max_restarts", "max_concurrency"} <= set(OPTIONS)
    assert "max_restarts" in ACTOR_ONLY and "num_returns" in TASK_ONLY


def test_valid_options_pass_and_are_returned() -> None:
    o = {"num_cpus": 2, "num_gpus": 0.5, "resources": {"disk": 1}, "num_returns": 3,
         "max_retries": -1, "retry_exceptions": [ValueError, KeyError], "name": "n"}
    assert validate(TASK, o, "@remote(f)") is o
    a = {"num_cpus": 0, "max_restarts": 2, "max_task_retries": -1, "max_concurrency": 4,
         "namespace": "ns", "lifetime": "detached", "get_if_exists": True, "name": None}
    assert validate(ACTOR, a, "@remote(A)") is a
    assert validate(TASK, {}, "x") == {}


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as ei:
        validate(TASK, {"num_cpu": 1}, "@remote(f)")
    msg = str(ei.value)
    assert msg.startswith("@remote(f): unknown option 'num_cpu'")
    for key in TASK_KEYS:
        assert key in msg
    for key in ACTOR_ONLY:
        assert key not in msg.split("Valid options")[1]
    with pytest.raises(ValueError) as ei:
        validate(ACTOR, {"bogus": 1}, "A.options()")
    tail = str(ei.value).rsplit(": ", 1)[1]
    assert tail.split(", ") == ACTOR_KEYS


@pytest.mark.parametrize("key", ACTOR_ONLY)
def test_actor_only_keys_rejected_on_tasks_saying_they_apply_to_actors(key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}' applies to actors only") as ei:
        validate(TASK, {key: OPTIONS[key].default}, "f.options()")
    assert "f.options()" in str(ei.value) and "num_returns" in str(ei.value)


@pytest.mark.parametrize("key", TASK_ONLY)
def test_task_only_keys_rejected_on_actors(key: str) -> None:
    with pytest.raises(ValueError, match=f"'{key}' applies to tasks only"):
        validate(ACTOR, {key: OPTIONS[key].default}, "@remote(A)")


@pytest.mark.parametrize("kind,key,value", [
    (TASK, "num_cpus", "2"), (TASK, "num_cpus", -1), (TASK, "num_cpus", True),
    (TASK, "num_cpus", math.inf), (TASK, "num_cpus", math.nan), (TASK, "num_gpus", None),
    (TASK, "num_gpus", [1]), (TASK, "resources", {"CPU": 1}), (TASK, "resources", {"GPU": 1}),
    (TASK, "resources", {"disk": -1}), (TASK, "resources", {1: 1}), (TASK, "resources", [1]),
    (TASK, "resources", {"disk": "1"}), (TASK, "num_returns", 0), (TASK, "num_returns", 1.0),
    (TASK, "num_returns", True), (TASK, "max_retries", -2), (TASK, "max_retries", 1.5),
    (TASK, "retry_exceptions", "yes"), (TASK, "retry_exceptions", [ValueError()]),
    (TASK, "retry_exceptions", [int]), (TASK, "name", 3),
    (ACTOR, "max_concurrency", 0), (ACTOR, "max_concurrency", False),
    (ACTOR, "lifetime", "forever"), (ACTOR, "get_if_exists", 1),
    (ACTOR, "max_restarts", -5), (ACTOR, "namespace", b"ns"),
])
def test_wrong_types_are_rejected_with_what_was_expected(kind: str, key: str,
                                                          value: object) -> None:
    with pytest.raises(TypeError) as ei:
        validate(kind, {key: value}, "where")
    msg = str(ei.value)
    assert msg.startswith(f"where: option {key}=") and "is invalid" in msg
    assert OPTIONS[key].expected in msg


def test_first_bad_key_is_reported_even_among_good_ones() -> None:
    with pytest.raises(ValueError, match="'nope'"):
        validate(TASK, {"num_cpus": 1, "nope": 2}, "w")


def test_resolved_fills_defaults_for_the_kind() -> None:
    t = resolved(TASK, {"num_cpus": 2})
    assert set(t) == set(TASK_KEYS)
    assert t["num_cpus"] == 2 and t["num_returns"] == 1 and t["max_retries"] == 3
    assert t["retry_exceptions"] is False and t["num_gpus"] == 0
    a = resolved(ACTOR, {})
    assert set(a) == set(ACTOR_KEYS)
    assert a["max_restarts"] == 0 and a["max_concurrency"] is None  # 1 threaded, 1000 async
    # the caller's dict is not changed
    src = {"num_cpus": 1}
    resolved(TASK, src)
    assert src == {"num_cpus": 1}


@pytest.mark.parametrize("options,default,expected", [
    ({}, 1.0, {"CPU": 1.0}),
    ({"num_cpus": None}, 1.0, {"CPU": 1.0}),
    ({}, 0.0, {}),
    ({"num_cpus": 0}, 1.0, {}),
    ({"num_cpus": 2, "num_gpus": 1}, 1.0, {"CPU": 2.0, "GPU": 1.0}),
    ({"num_cpus": 0.5, "num_gpus": 0.25}, 1.0, {"CPU": 0.5, "GPU": 0.25}),
    ({"num_gpus": 0}, 1.0, {"CPU": 1.0}),
    ({"resources": {"disk": 2, "zero": 0}}, 1.0, {"CPU": 1.0, "disk": 2.0}),
    ({"resources": None}, 1.0, {"CPU": 1.0}),
])
def test_resource_request(options: dict, default: float, expected: dict) -> None:
    res = resource_request(options, default_cpus=default)
    assert res == expected
    assert all(isinstance(v, float) for v in res.values())


def test_resource_request_of_resolved_task_defaults() -> None:
    assert resource_request(resolved(TASK, {})) == {"CPU": 1.0}
    assert resource_request(resolved(TASK, validate(
        TASK, {"num_gpus": 2, "resources": {"fpga": 1}}, "w"))) == \
        {"CPU": 1.0, "GPU": 2.0, "fpga": 1.0}


def test_module_exports_kinds() -> None:
    assert (opts.TASK, opts.ACTOR, opts.BOTH) == ("task", "actor", "both")
