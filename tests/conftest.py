"""Shared fixtures.  Cluster tests start real head/node/worker processes on
127.0.0.1 with free ports and a private session directory under tmp."""
from __future__ import annotations

import os
import glob

import psutil
import pytest


def _shm_segments() -> set[str]:
    return set(glob.glob("/dev/shm/flowcore-*"))


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def _validate_head_books(monkeypatch):
    """Every head state machine a test builds in-process checks its books
    after each message (resources, running sets, refcounts, holders)."""
    from flowcore.scheduler.machine import SchedulerState
    monkeypatch.setattr(SchedulerState, "validate_default", True)
    yield


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers():
    """The whole run leaves no flowcore process or shared memory behind."""
    before_shm = _shm_segments()
    yield
    import flowcore
    flowcore.shutdown()
    leftover = []
    for pid in _children():
        try:
            p = psutil.Process(pid)
            if any("flowcore" in part for part in p.cmdline()):
                leftover.append((pid, p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    from flowcore.objects.store import _arena_pid
    # a segment is left behind when the process that made it is gone but the
    # file is not (segments of live processes belong to other programs)
    new_shm = {s for s in _shm_segments() - before_shm
               if not psutil.pid_exists(_arena_pid(s) or 0)}
    assert not leftover, f"flowcore processes left running: {leftover}"
    assert not new_shm, f"shared memory left behind: {new_shm}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local cluster (head + one 2-CPU node) shared by a test module."""
    import flowcore
    flowcore.shutdown()
    session = str(tmp_path_factory.mktemp("session"))
    info = flowcore.init(num_cpus=2, resources={"custom": 2}, num_gpus=2,
                         object_store_memory=256 << 20, session_dir=session)
    yield info
    flowcore.shutdown()
    from flowcore.objects.store import _arena_pid
    # (a segment of a live process with the same session name belongs to
    # another test run on this machine)
    assert not [s for s in _shm_segments() if f"flowcore-{os.path.basename(session)}-" in s
                and not psutil.pid_exists(_arena_pid(s) or 0)]


@pytest.fixture
def fresh_cluster(tmp_path):
    """A private cluster per test, for tests that break things."""
    import flowcore
    flowcore.shutdown()
    clusters = []

    def start(**kw):
        kw.setdefault("num_cpus", 2)
        kw.setdefault("object_store_memory", 128 << 20)
        info = flowcore.init(session_dir=str(tmp_path / f"s{len(clusters)}"), **kw)
        clusters.append(info)
        return info

    yield start
    flowcore.shutdown()


@pytest.fixture
def private_cluster(tmp_path):
    """``start(nodes, **options)``: a LocalCluster of its own with this
    process connected as its driver; everything is stopped afterwards."""
    import flowcore
    from flowcore.cluster import LocalCluster
    flowcore.shutdown()
    started = []

    def start(nodes: int = 2, **options):
        options.setdefault("cpus_per_node", 1)
        options.setdefault("object_store_memory", 128 << 20)
        cluster = LocalCluster(nodes=nodes, session_dir=str(tmp_path / f"c{len(started)}"),
                               **options)
        started.append(cluster)
        flowcore.init(address=cluster.address, token=cluster.token)
        return cluster

    yield start
    flowcore.shutdown()
    for cluster in started:
        cluster.shutdown()


# ---------------------------------------------------------------------- browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through Playwright (never `playwright install`).
    Under CI=true a missing browser fails the test instead of skipping it."""
    ci = os.environ.get("CI", "").lower() == "true"

    def unavailable(why: str) -> None:
        if ci:
            pytest.fail(f"browser test cannot run under CI: {why}")
        pytest.skip(why)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
