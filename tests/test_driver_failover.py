"""The driver outlives its node: with the node it was attached to killed, it
carries on through another node, its lost results are rebuilt by lineage,
and in client mode it attaches again to a node on its host once there is
one.  A dead head is named, with the grace waited and what to do."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import flowcore
from flowcore import context
from flowcore.cluster import LocalCluster

pytestmark = pytest.mark.timeout(150)
REAL_HOST = socket.gethostname()


@flowcore.remote(max_retries=3)
def square(i):
    return i * i


@flowcore.remote(max_retries=3)
def block(i):
    return np.full(1 << 18, i, dtype=np.int64)  # 2 MiB: lives in a node's store


def _wait_for(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_driver_moves_to_another_local_node(monkeypatch):
    flowcore.shutdown()
    with LocalCluster(nodes=3, cpus_per_node=1) as cluster:
        flowcore.init(address=cluster.address, token=cluster.token)
        try:
            mine = flowcore.get_runtime_context().get_node_id()
            small = [square.remote(i) for i in range(60)]
            big = [block.remote(i) for i in range(30)]
            assert flowcore.get(small[:5], timeout=60) == [0, 1, 4, 9, 16]
            # read once through this node: held here (objects/held.py), which
            # must not outlive the node (its copy is gone or rebuilt)
            assert int(flowcore.get(big[0], timeout=60)[0]) == 0
            assert big[0].binary() in context.current_client().objects.held
            kept = flowcore.put(np.arange(1 << 17))  # 1 MiB put on the doomed node: no lineage
            cluster.kill_node(mine)
            assert flowcore.get(small, timeout=90) == [i * i for i in range(60)]
            assert [int(a[0]) for a in flowcore.get(big, timeout=90)] == list(range(30))
            held = context.current_client().objects.held
            assert held.lookup(big[0].binary(), mine) is None  # forgotten with the node
            assert flowcore.get_runtime_context().get_node_id() != mine
            # the new node is on this host: mapped
            assert not context.current_client().remote_store
            ref = flowcore.put(np.arange(1 << 20))
            assert int(flowcore.get(ref, timeout=60)[-1]) == (1 << 20) - 1
            # a put has no lineage: it survives only where another copy exists
            try:
                assert int(flowcore.get(kept, timeout=30)[-1]) == (1 << 17) - 1
            except flowcore.exceptions.ObjectLostError as e:
                assert "put(), which cannot be re-run" in str(e)
        finally:
            flowcore.shutdown()


def test_driver_goes_client_mode_then_attaches_to_a_node_on_its_host(monkeypatch):
    flowcore.shutdown()
    with LocalCluster(nodes=2, cpus_per_node=1) as cluster:
        flowcore.init(address=cluster.address, token=cluster.token)
        try:
            mine = flowcore.get_runtime_context().get_node_id()
            big = [block.remote(i) for i in range(20)]
            flowcore.wait(big, num_returns=20, timeout=60)
            # from now on the other nodes look like other machines to this driver
            monkeypatch.setattr(socket, "gethostname", lambda: "driver-host")
            cluster.kill_node(mine)
            assert [int(a[0]) for a in flowcore.get(big, timeout=90)] == list(range(20))
            assert context.current_client().remote_store, \
                "expected client mode through the other node"
            ref = flowcore.put(np.arange(1 << 20))            # uploaded over the wire
            assert int(flowcore.get(ref, timeout=60)[-1]) == (1 << 20) - 1
            assert flowcore.get(square.remote(12), timeout=60) == 144
            # a node starts on the driver's host: it attaches to it
            new = cluster.add_node(num_cpus=1)
            monkeypatch.setattr(socket, "gethostname", lambda: REAL_HOST)
            _wait_for(lambda: not context.current_client().remote_store,
                      "did not attach to a local node")
            assert flowcore.get_runtime_context().get_node_id() in (new, *cluster.node_ids())
            ref2 = flowcore.put(np.arange(1 << 20))
            assert int(flowcore.get(ref2, timeout=60).sum()) == (1 << 20) * ((1 << 20) - 1) // 2
            assert int(flowcore.get(ref, timeout=60)[-1]) == (1 << 20) - 1
        finally:
            flowcore.shutdown()


DEAD_HEAD = r'''
import os, signal, sys, time, flowcore
from flowcore import session
from flowcore.cluster import LocalCluster

@flowcore.remote
def slow():
    time.sleep(300)

if sys.argv[1] == "embedded":
    flowcore.init(num_cpus=1)
    head_pid = session._cluster.head.pid
else:
    cluster = LocalCluster(nodes=1, cpus_per_node=1)
    flowcore.init(address=cluster.address, token=cluster.token)
    head_pid = cluster.head.pid
ref = slow.remote()
os.kill(head_pid, signal.SIGKILL)
t = time.monotonic()
try:
    flowcore.get(ref, timeout=60)
except flowcore.exceptions.FlowcoreError as e:
    print("GET:", e)
print("WAITED:", round(time.monotonic() - t, 1))
try:
    flowcore.get(slow.remote(), timeout=10)
except flowcore.exceptions.FlowcoreError as e:
    print("AGAIN:", e)
flowcore.shutdown()
if sys.argv[1] != "embedded":
    cluster.close()
print("END")
'''


def _dead_head(kind: str, tmp_path) -> tuple[dict, str]:
    env = dict(os.environ, FLOWCORE_HEAD_GRACE="2", FLOWCORE_QUIET="1", PYTHONWARNINGS="always")
    done = subprocess.run([sys.executable, "-c", DEAD_HEAD, kind], capture_output=True,
                          text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("END")
    for noise in ("Task was destroyed", "Traceback", "was never retrieved", "Exception in"):
        assert noise not in done.stderr, done.stderr
    return dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line), \
        done.stderr


def test_a_dead_head_is_named_with_the_grace_and_what_to_do(tmp_path):
    lines, _ = _dead_head("address", tmp_path)
    for key in ("GET", "AGAIN"):
        message = lines[key]
        assert "lost the connection to the head at tcp://127.0.0.1:" in message
        assert "within the 2 s grace (FLOWCORE_HEAD_GRACE)" in message
        assert "head's log" in message and "flowcore.init() again" in message
    assert float(lines["WAITED"]) >= 2.0


def test_a_dead_embedded_head_is_reported_at_once(tmp_path):
    lines, _ = _dead_head("embedded", tmp_path)
    for key in ("GET", "AGAIN"):
        message = lines[key]
        assert "the head of the local cluster flowcore.init() started (pid " in message
        assert "did not wait for it" in message and "logs/head.log" in message
        assert "flowcore.init() again" in message
    assert float(lines["WAITED"]) < 2.0
