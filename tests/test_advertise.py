"""A node's advertised address: what peers pull objects from (--host for the
interface, --advertise-host for the address other machines use)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest

import flowcore
from flowcore.node.server import _local_address_towards

BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.timeout(120)


def _start_head(state_dir):
    p = subprocess.Popen([os.path.join(BIN, "flowcore-scheduler"), "--port", "0",
                          "--dashboard-port", "-1", "--state-dir", str(state_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("flowcore-scheduler: join nodes with:"):
            return p, line.split("flowcore-worker ")[1].split()[0]
    raise AssertionError("head did not start")


def _start_node(address, state_dir, *extra):
    p = subprocess.Popen([os.path.join(BIN, "flowcore-worker"), address, "--state-dir",
                          str(state_dir), "--num-cpus", "1", "--object-store-memory",
                          str(64 << 20), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "joined" in line:
            return p
    raise AssertionError("node did not join")


@flowcore.remote(resources={"a": 1})
def make():
    return np.arange(1 << 20, dtype=np.int64)  # 8 MiB: pulled over the bulk path


@flowcore.remote(resources={"b": 1})
def total(x):
    return int(x.sum())


def test_nodes_listening_everywhere_advertise_the_given_or_routed_address(tmp_path, monkeypatch):
    flowcore.shutdown()
    head, address = _start_head(tmp_path)
    procs = [head]
    try:
        procs.append(_start_node(address, tmp_path, "--host", "0.0.0.0", "--advertise-host",
                                 "127.0.0.2", "--resources", '{"a": 1}'))
        procs.append(_start_node(address, tmp_path, "--host", "0.0.0.0",
                                 "--resources", '{"b": 1}'))
        monkeypatch.setenv("FLOWCORE_CLIENT_MODE", "1")  # the driver pulls too
        flowcore.init(address=address, token=(tmp_path / "token").read_text().strip())
        by_res = {("a" if "a" in n["resources_total"] else "b"): n for n in flowcore.nodes()}
        assert by_res["a"]["address"].startswith("tcp://127.0.0.2:")
        routed = _local_address_towards("127.0.0.1")
        assert by_res["b"]["address"].startswith(f"tcp://{routed}:")
        listening = {c.laddr.ip for c in psutil.Process(by_res["a"]["pid"]).net_connections(
            kind="tcp") if c.status == psutil.CONN_LISTEN}
        assert listening == {"0.0.0.0"}
        ref = make.remote()
        assert flowcore.get(total.remote(ref), timeout=60) == (1 << 20) * ((1 << 20) - 1) // 2
        assert int(flowcore.get(ref, timeout=60)[-1]) == (1 << 20) - 1
    finally:
        flowcore.shutdown()
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
