"""Head restart: the head is SIGKILLed and started again at the same port with
the same state directory; nodes, the driver and actor processes reconnect,
and what the persisted tables and the surviving processes hold comes back."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

import flowcore
from flowcore import context
from flowcore.exceptions import ObjectLostError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def restart_env(monkeypatch):
    # a short recovery window, so anything not reported settles quickly
    monkeypatch.setenv("FLOWCORE_HEAD_RECOVERY", "20")
    monkeypatch.setenv("FLOWCORE_HEAD_GRACE", "60")


@flowcore.remote
class Counter:
    def __init__(self, start):
        self.n = start

    def add(self, k):
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()


@flowcore.remote
def total(a):
    return float(a.sum())


@flowcore.remote
def square(x):
    return x * x


def _wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the head may still be coming back
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling cluster state with a deadline


def test_head_restart_keeps_nodes_actors_objects_functions(private_cluster, restart_env):
    cluster = private_cluster(2)
    node_ids = set(cluster.node_ids())
    before = flowcore.get(square.remote(7))  # registers square before the restart
    assert before == 49
    counter = Counter.options(name="keeper", lifetime="detached").remote(10)
    assert flowcore.get(counter.add.remote(5)) == 15
    actor_pid = flowcore.get(counter.pid.remote())
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB: lives in a node's store
    ref = flowcore.put(big)
    # the tables are written within a flush interval: wait until the actor is on disk
    state_file = os.path.join(cluster.session_dir,
                              f"head-{cluster.address.rsplit(':', 1)[1]}", "tables.msgpack")
    _wait_for(lambda: os.path.exists(state_file) and b"keeper" in open(state_file, "rb").read(),
              10, "the actor in the persisted tables")

    cluster.kill_head()
    # once the driver knows the head is away, what it submits is kept and sent
    # when the head is back (a message written in the instant of the crash is lost)
    _wait_for(lambda: context.current_client()._reconnecting is not None, 30,
              "the driver to notice")
    during = square.remote(4)
    cluster.restart_head()

    # nodes come back
    _wait_for(lambda: {n["node_id"] for n in flowcore.nodes() if n["alive"]} == node_ids,
              60, "both nodes to re-register")
    assert flowcore.get(during, timeout=60) == 16
    # the detached named actor is the same process, with its state
    again = _wait_for(lambda: flowcore.get_actor("keeper"), 60, "the named actor")
    assert flowcore.get(again.add.remote(1), timeout=60) == 16
    assert flowcore.get(again.pid.remote(), timeout=60) == actor_pid
    # the old handle works too
    assert flowcore.get(counter.add.remote(1), timeout=60) == 17
    # the put object is still readable, here and by a task on any node
    np.testing.assert_array_equal(flowcore.get(ref, timeout=60), big)
    assert flowcore.get(total.remote(ref), timeout=60) == float(big.sum())
    # a function registered before the restart is known to the new head
    # (persisted; the driver would also send it again on its next call)...
    fid, blob = square._identity()
    assert context.current_client().fetch_function(fid) == blob
    # ... and runs after it, and new ones run
    assert flowcore.get(square.remote(9), timeout=60) == 81

    @flowcore.remote
    def brand_new():
        return "new"
    assert flowcore.get(brand_new.remote(), timeout=60) == "new"
    actors = {a["name"]: a for a in flowcore.state.list_actors()}
    assert actors["keeper"]["state"] == "ALIVE"
    assert actors["keeper"]["restarts"] == 0
    flowcore.kill(again)


def test_task_running_at_the_crash_fails_naming_the_restart(private_cluster, restart_env):
    from flowcore.testing import Signal
    cluster = private_cluster(1)
    sig = Signal()

    @flowcore.remote
    def blocked(s):
        s.wait()
        return 1

    ref = blocked.remote(sig)
    sig.wait_for_waiters(1, timeout=30)
    cluster.kill_head()
    cluster.restart_head()
    with pytest.raises(ObjectLostError, match="head restart") as info:
        flowcore.get(ref, timeout=60)
    assert info.value.reason == "head_restart"
    sig.set()
    assert flowcore.get(square.remote(3), timeout=60) == 9


def test_detached_actor_whose_node_died_restarts_from_its_spec(private_cluster, restart_env,
                                                               monkeypatch):
    from flowcore.scheduling import NodeAffinitySchedulingStrategy
    cluster = private_cluster(2)
    # stays up: the driver reads its store through it
    drivers_node = context.current_client().node_id
    victim = next(n for n in cluster.node_ids() if n != drivers_node)
    counter = Counter.options(name="mover", lifetime="detached", max_restarts=1,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(victim)
                              ).remote(100)
    assert flowcore.get(counter.add.remote(1)) == 101
    info = {a["name"]: a for a in flowcore.state.list_actors()}["mover"]
    assert info["node_id"] == victim
    state_file = os.path.join(cluster.session_dir,
                              f"head-{cluster.address.rsplit(':', 1)[1]}", "tables.msgpack")
    _wait_for(lambda: b"mover" in open(state_file, "rb").read(), 10, "the persisted actor")

    cluster.kill_head()
    cluster.kill_node(info["node_id"])  # gone while the head is away
    monkeypatch.setenv("FLOWCORE_HEAD_RECOVERY", "3")  # it will not come back: settle soon
    cluster.restart_head()

    survivor = drivers_node
    _wait_for(lambda: {a["name"]: a for a in flowcore.state.list_actors()}["mover"]["state"]
              == "ALIVE", 60, "the actor to restart")
    moved = flowcore.get_actor("mover")
    assert flowcore.get(moved.add.remote(1), timeout=60) == 101  # constructor ran again
    after = {a["name"]: a for a in flowcore.state.list_actors()}["mover"]
    assert after["node_id"] == survivor and after["restarts"] == 1
    assert after["pid"] != info["pid"]
    flowcore.kill(moved)


@pytest.mark.timeout(60)
def test_clean_stop_removes_the_persisted_tables(tmp_path):
    from flowcore.cluster import LocalCluster
    with LocalCluster(nodes=1, cpus_per_node=1, object_store_memory=64 << 20,
                      session_dir=str(tmp_path / "s")) as cluster:
        port = cluster.address.rsplit(":", 1)[1]
        path = os.path.join(cluster.session_dir, f"head-{port}")
        _wait_for(lambda: os.path.exists(os.path.join(path, "tables.msgpack")), 10,
                  "the tables to be written")
    assert not os.path.exists(path)


@pytest.mark.timeout(90)
def test_cli_head_killed_and_restarted_keeps_its_token_and_nodes(tmp_path):
    """``flowcore-scheduler`` as a user runs it: SIGKILL, then the same command."""
    import socket
    import subprocess
    import sys
    bindir = os.path.dirname(sys.executable)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tmp_path / "state"
    cmd = [os.path.join(bindir, "flowcore-scheduler"), "--port", str(port),
           "--dashboard-port", "-1", "--state-dir", str(state),
           "--log-file", str(tmp_path / "head.log")]
    procs = []

    def start(argv):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        head = start(cmd)
        tables = state / f"head-{port}" / "tables.msgpack"
        _wait_for(lambda: tables.exists() and (state / "token").exists(), 30, "the head")
        token = (state / "token").read_text()
        node = start([os.path.join(bindir, "flowcore-worker"), f"tcp://127.0.0.1:{port}",
                      "--token-file", str(state / "token"), "--state-dir", str(state),
                      "--num-cpus", "1", "--object-store-memory", str(64 << 20),
                      "--log-file", str(tmp_path / "node.log")])
        _wait_for(lambda: b"n-" in tables.read_bytes(), 30, "the node in the tables")
        head.kill()
        head.wait(10)
        head = start(cmd)
        _wait_for(lambda: "recovery after the head restart ended: every node"
                  in (tmp_path / "head.log").read_text(), 60, "the node to come back")
        assert (state / "token").read_text() == token  # reused, not regenerated
        assert node.poll() is None
        head.terminate()
        head.wait(20)
        node.wait(20)  # a clean stop stops the node ...
        assert not (state / f"head-{port}").exists()  # ... and forgets the tables
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)


@pytest.mark.timeout(240)
def test_tls_head_restart_takes_back_the_driver_and_an_actor_process(tmp_path, restart_env):
    """Under TLS, the driver and a worker process reconnect to the restarted
    head with their TLS settings (a plain reconnection would be refused)."""
    from test_tls import make_ca_and_member
    from flowcore.cluster import LocalCluster
    certs = make_ca_and_member(str(tmp_path), "restart")
    flowcore.shutdown()
    cluster = LocalCluster(nodes=1, cpus_per_node=1, object_store_memory=64 << 20,
                           session_dir=str(tmp_path / "session"), tls=certs)
    try:
        flowcore.init(address=cluster.address, token=cluster.token, tls=certs)
        counter = Counter.options(name="tls-keeper", lifetime="detached").remote(10)
        assert flowcore.get(counter.add.remote(5), timeout=60) == 15
        actor_pid = flowcore.get(counter.pid.remote(), timeout=60)
        state_file = os.path.join(cluster.session_dir,
                                  f"head-{cluster.address.rsplit(':', 1)[1]}",
                                  "tables.msgpack")
        _wait_for(lambda: os.path.exists(state_file)
                  and b"tls-keeper" in open(state_file, "rb").read(),
                  10, "the actor in the persisted tables")
        cluster.kill_head()
        cluster.restart_head()
        # the same actor process answers, and reports to the new head
        assert flowcore.get(counter.add.remote(1), timeout=90) == 16
        assert flowcore.get(counter.pid.remote(), timeout=60) == actor_pid
        assert flowcore.get(square.remote(4), timeout=60) == 16
    finally:
        flowcore.shutdown()
        cluster.shutdown()
