"""What the user guide and the observability page say, checked against what
flowcore does."""
from __future__ import annotations

import os
import re
import sys
import warnings

import pytest

import flowcore
from flowcore.exceptions import WorkerCrashedError

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def doc(name: str) -> str:
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return " ".join(f.read().split())  # line breaks as spaces


@pytest.fixture(scope="module")
def cluster():
    flowcore.shutdown()
    yield flowcore.init(num_cpus=1)
    flowcore.shutdown()


@flowcore.remote(max_retries=0)
def quits():
    sys.exit(3)


def test_sys_exit_in_a_task_is_caught_by_except_exception(cluster):
    caught = None
    try:
        flowcore.get(quits.remote(), timeout=60)
    except Exception as e:  # noqa: BLE001 - the claim under test
        caught = e
    # as in Ray: the worker process ended, reported as a crash (never a
    # SystemExit that would end the driver)
    assert isinstance(caught, WorkerCrashedError), repr(caught)
    assert "code 3" in str(caught)
    assert "`except Exception` catches it" in doc("user-guide.md")


@flowcore.remote(num_gpus=64)
def train():
    return 1


def test_infeasible_warning_is_the_documented_text(cluster):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = train.remote()
        flowcore.wait([ref], timeout=1.0)
        flowcore.get([], timeout=0)
    try:
        texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert texts, "no infeasible warning"
        real = texts[0]
        documented = re.search(r"`(task train cannot be placed: [^`]*)`",
                               doc("user-guide.md")).group(1)
        pattern = re.escape(documented).replace(r"'GPU':\ 1\.0", r"'GPU':\ [0-9.]+")
        assert re.fullmatch(pattern, real), (documented, real)
    finally:
        flowcore.cancel(ref)


def test_api_nodes_store_keys_are_the_documented_ones(cluster):
    from flowcore.objects.store import ObjectStore
    obs = doc("observability.md")
    import inspect
    source = inspect.getsource(ObjectStore.stats)
    for key in re.findall(r'"(\w+)":', source):
        assert f"`{key}`" in obs, key


def test_docs_no_longer_say_gpus_are_not_detected_or_fetch_local_does_nothing():
    for name in ("user-guide.md", "cli.md", "api.md"):
        text = doc(name)
        assert "not detected" not in text, name
        assert "has no effect" not in text or "fetch_local" not in text.split(
            "has no effect")[0][-200:], name
    assert "| `--worker-memory-limit` |" in doc("cli.md")  # in the flag table
