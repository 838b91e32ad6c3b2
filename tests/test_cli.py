"""flowcore-scheduler / flowcore-worker as a user starts them, and jobs."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest

import flowcore

pytestmark = pytest.mark.timeout(120)
BIN = os.path.dirname(sys.executable)


def _cli(name):
    return os.path.join(BIN, name)


def _start_head(state_dir, *extra):
    p = subprocess.Popen([_cli("flowcore-scheduler"), "--port", "0", "--dashboard-port", "-1",
                          "--state-dir", str(state_dir), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("flowcore-scheduler: join nodes with:"):
            return p, line.split("flowcore-worker ")[1].split()[0], lines
    raise AssertionError("head did not start: " + "".join(lines))


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _start_node(address, state_dir, *extra):
    p = subprocess.Popen([_cli("flowcore-worker"), address, "--state-dir", str(state_dir),
                          "--num-cpus", "1", "--object-store-memory", str(64 << 20), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "joined" in line:
            return p
    raise AssertionError("node did not join: " + p.stdout.read() if p.stdout else "")


def test_head_writes_private_token_and_nodes_join_with_auto(tmp_path, monkeypatch):
    flowcore.shutdown()
    head, address, lines = _start_head(tmp_path)
    node = None
    try:
        token_file = tmp_path / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert any(str(token_file) in line for line in lines)
        assert (tmp_path / "address").read_text().strip() == address
        node = _start_node("auto", tmp_path)
        monkeypatch.setenv("FLOWCORE_STATE_DIR", str(tmp_path))
        flowcore.init(address="auto")
        assert [n["alive"] for n in flowcore.nodes()] == [True]

        @flowcore.remote
        def hello():
            return "hi from " + flowcore.get_runtime_context().get_node_id()
        assert flowcore.get(hello.remote(), timeout=60).startswith("hi from n-")
        flowcore.shutdown()
        # a clean stop of the node (SIGTERM) tells the head
        _stop(node)
        assert node.returncode == 0
        flowcore.init(address=address, token=token_file.read_text().strip())
        assert [n["alive"] for n in flowcore.nodes()] == [False]
        flowcore.shutdown()
    finally:
        flowcore.shutdown()
        _stop(*(p for p in (node, head) if p is not None))
    assert head.returncode == 0


def test_bad_input_gives_one_line_errors(tmp_path):
    head, address, _ = _start_head(tmp_path)
    try:
        wrong = subprocess.run([_cli("flowcore-worker"), address, "--token", "nope",
                                "--state-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 3 and "token" in wrong.stderr
        bad_json = subprocess.run([_cli("flowcore-worker"), address, "--resources", "{oops",
                                   "--state-dir", str(tmp_path)],
                                  capture_output=True, text=True, timeout=60)
        assert bad_json.returncode == 2 and "--resources" in bad_json.stderr
        negative = subprocess.run([_cli("flowcore-worker"), address, "--resources",
                                   '{"disk": -1}', "--state-dir", str(tmp_path)],
                                  capture_output=True, text=True, timeout=60)
        assert negative.returncode == 2 and ">= 0" in negative.stderr
        port = int(address.rsplit(":", 1)[1])
        busy = subprocess.run([_cli("flowcore-scheduler"), "--port", str(port),
                               "--dashboard-port", "-1", "--state-dir", str(tmp_path / "b")],
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1 and "--port" in busy.stderr
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        t = time.monotonic()
        unreachable = subprocess.run([_cli("flowcore-worker"), f"tcp://127.0.0.1:{dead_port}",
                                      "--token", "x", "--state-dir", str(tmp_path)],
                                     capture_output=True, text=True, timeout=60)
        assert unreachable.returncode == 1 and "cannot" in unreachable.stderr
        assert time.monotonic() - t < 15
    finally:
        _stop(head)


def test_driver_exit_cancels_its_work_but_not_others(tmp_path):
    from flowcore.cluster import LocalCluster
    flowcore.shutdown()
    cluster = LocalCluster(nodes=1, cpus_per_node=2, session_dir=str(tmp_path / "s"))
    try:
        flowcore.init(address=cluster.address, token=cluster.token)
        from flowcore.testing import Signal
        sig = Signal()
        mine = sig.wait_task.remote()
        sig.wait_for_waiters(1)
        other = tmp_path / "other.py"
        other.write_text(f"""
import flowcore, threading
flowcore.init(address={cluster.address!r}, token={cluster.token!r})
@flowcore.remote
def forever():
    threading.Event().wait()
refs = [forever.remote() for _ in range(3)]   # one runs, two wait for a CPU
ready, rest = flowcore.wait(refs, timeout=0.5)
print("SUBMITTED", flush=True)
import os
os._exit(0)   # the driver dies without cleaning up
""")
        out = subprocess.run([sys.executable, str(other)], capture_output=True, text=True,
                             timeout=60)
        assert "SUBMITTED" in out.stdout, out.stderr

        # the other driver's tasks were cancelled: its CPU comes back
        deadline = time.monotonic() + 30
        while flowcore.available_resources().get("CPU", 0) < 1:
            assert time.monotonic() < deadline, flowcore.state.list_tasks()
        states = [t["state"] for t in flowcore.state.list_tasks()]
        assert "RUNNING" in states  # ours is untouched
        sig.set()
        assert flowcore.get(mine, timeout=30) is True
    finally:
        flowcore.shutdown()
        cluster.shutdown()
