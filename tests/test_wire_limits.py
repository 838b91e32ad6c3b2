"""A bounded wire, with real sockets on 127.0.0.1: a lying length prefix
costs the head nothing, slow unauthenticated peers cost the bulk and actor
ports no thread and are cut off at the deadline, and the dashboard answers
garbage with 400."""
from __future__ import annotations

import os
import socket
import struct
import time

import psutil
import pytest

import flowcore
from flowcore.cluster import LocalCluster
from flowcore.protocol import auth, blocking, frames
from flowcore.protocol.comm import parse_address

SLOW_CLIENTS = 50


def authenticated(address: str, token: str) -> socket.socket:
    host, port = parse_address(address)
    s = socket.create_connection((host, port), timeout=10)
    blocking.client_handshake(s, token.encode(), address)
    return s


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def head_answers(cluster: LocalCluster) -> float:
    """Seconds a fresh authenticated client waits for the head's answer."""
    from flowcore.client.core import CoreClient
    t = time.monotonic()
    c = CoreClient(cluster.address, cluster.token.encode(), None)
    c.start()
    try:
        c.query("list_nodes")
    finally:
        c.close()
    return time.monotonic() - t


@pytest.mark.timeout(90)
def test_lying_length_prefix_costs_the_head_nothing():
    flowcore.shutdown()
    with LocalCluster() as cluster:
        cluster.start_head()
        head = psutil.Process(cluster.head.pid)
        head_answers(cluster)
        rss0 = head.memory_info().rss
        # 1. above the cap: cut off at once
        s = authenticated(cluster.address, cluster.token)
        s.sendall(frames.PREFIX.pack(1 << 31))
        assert closed_by_peer(s, 10.0)
        s.close()
        # 2. under the cap, then a hang-up: memory follows the bytes sent
        for _ in range(3):
            s = authenticated(cluster.address, cluster.token)
            s.sendall(frames.PREFIX.pack(200 << 20) + bytes(1 << 20))
            s.close()
        assert head_answers(cluster) < 5.0
        grown = head.memory_info().rss - rss0
        assert grown < 48 << 20, f"the head grew by {grown >> 20} MiB"


def _listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def _slow_clients(port: int) -> list[socket.socket]:
    out = []
    for _ in range(SLOW_CLIENTS):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        out.append(s)
    for s in out:
        try:
            s.sendall(b"x")  # a first byte of a proof that never completes
        except OSError:
            pass
    return out


def _check_slow_clients(pid: int, port: int, deadline: float) -> tuple[int, int]:
    """(threads added while SLOW_CLIENTS trickle, clients still open after the
    deadline); also asserts the port still admits a real client."""
    proc = psutil.Process(pid)
    before = proc.num_threads()
    clients = _slow_clients(port)
    try:
        for s in clients:  # keep trickling: a byte each, a second apart, twice
            try:
                s.sendall(b"y")
            except OSError:
                pass
        added = proc.num_threads() - before
        t_end = time.monotonic() + deadline + 10.0
        still_open = 0
        for s in clients:
            if not closed_by_peer(s, max(0.1, t_end - time.monotonic())):
                still_open += 1
    finally:
        for s in clients:
            s.close()
    return added, still_open


@pytest.mark.timeout(120)
def test_slow_unauthenticated_peers_hold_no_thread_on_bulk_and_actor_ports(monkeypatch):
    flowcore.shutdown()
    monkeypatch.setenv("FLOWCORE_AUTH_TIMEOUT", "3")
    flowcore.init(num_cpus=1)
    try:
        node = flowcore.nodes()[0]
        node_pid = node["pid"]
        msg_port = parse_address(node["address"])[1]
        (bulk_port,) = _listening_ports(node_pid) - {msg_port}
        added, still_open = _check_slow_clients(node_pid, bulk_port, 3.0)
        assert added < 5, f"the node started {added} threads for unauthenticated peers"
        assert still_open == 0

        @flowcore.remote
        class Echo:
            def pid(self):
                return os.getpid()

            def echo(self, x):
                return x
        echo = Echo.remote()
        actor_pid = flowcore.get(echo.pid.remote(), timeout=60)
        (actor_port,) = _listening_ports(actor_pid)
        added, still_open = _check_slow_clients(actor_pid, actor_port, 3.0)
        assert added < 5, f"the actor started {added} threads for unauthenticated peers"
        assert still_open == 0
        # the ports still admit real peers
        assert flowcore.get([echo.echo.remote(i) for i in range(5)], timeout=60) == list(range(5))
        s = socket.create_connection(("127.0.0.1", bulk_port), timeout=10)
        blocking.client_handshake(s, flowcore.session._cluster.token.encode(), "bulk")
        s.close()
    finally:
        flowcore.shutdown()


def test_wrong_token_is_refused_on_the_bulk_port():
    flowcore.shutdown()
    flowcore.init(num_cpus=1)
    try:
        node = flowcore.nodes()[0]
        (bulk_port,) = _listening_ports(node["pid"]) - {parse_address(node["address"])[1]}
        s = socket.create_connection(("127.0.0.1", bulk_port), timeout=10)
        with pytest.raises(flowcore.exceptions.AuthenticationError, match="refused"):
            blocking.client_handshake(s, b"not the token", "bulk")
        s.close()
    finally:
        flowcore.shutdown()


# ------------------------------------------------------------------ dashboard
@pytest.fixture(scope="module")
def dashboard():
    flowcore.shutdown()
    info = flowcore.init(num_cpus=1)
    token = open(os.path.join(info["session_dir"], "token")).read().strip()
    host, port = info["dashboard_url"][len("http://"):].rsplit(":", 1)
    yield host, int(port), token, info["address"]
    flowcore.shutdown()


def _raw(host, port, data: bytes) -> tuple[bytes, bool]:
    s = socket.create_connection((host, port), timeout=10)
    try:
        s.sendall(data)
        got = b""
        s.settimeout(10)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got, True
            got += chunk
    except socket.timeout:
        return got, False
    finally:
        s.close()


@pytest.mark.parametrize("garbage", [b"garbage\r\n", b"\x16\x03\x01\x02\x00\x01\x00\r\n",
                                     b"GARBAGE LINE\r\n\r\n", b"x" * 9000])
def test_dashboard_answers_garbage_with_400_and_closes(dashboard, garbage):
    host, port, _, _ = dashboard
    got, closed = _raw(host, port, garbage)
    assert got.startswith(b"HTTP/1.1 400 "), got[:100]
    assert closed


def test_dashboard_403_names_no_placeholder(dashboard):
    host, port, token, head = dashboard
    got, _ = _raw(host, port, (f"GET /static/..%2f__init__.py HTTP/1.0\r\nAuthorization: "
                               f"Bearer {token}\r\n\r\n").encode())
    status, _, rest = got.partition(b"\r\n")
    assert status.split()[1] == b"403", got[:200]
    body = rest.partition(b"\r\n\r\n")[2]
    assert b"%s" not in body and b"not in the static directory" in body
    assert f"X-Flowcore-Head: {head}".encode() in got


def test_dashboard_still_serves_after_garbage(dashboard):
    host, port, _, _ = dashboard
    got, _ = _raw(host, port, b"\r\nGET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 "), got[:100]


def test_sender_splits_batches_over_the_cap_and_keeps_frames_with_their_messages():
    from flowcore.exceptions import ProtocolError
    cap = 1 << 20
    blobs = [bytes([i]) * (300 << 10) for i in range(8)]   # 8 x 300 KiB
    msgs = [{"op": "chunk", "i": i, "_frames": [i]} for i in range(8)]
    msgs.insert(3, {"op": "small"})
    batches = frames.encode_batches(msgs, blobs, cap)
    assert len(batches) > 1
    seen = []
    for batch in batches:
        data = b"".join(bytes(b) for b in batch)
        assert len(data) - frames.PREFIX.size <= cap
        decoded, bufs = frames.decode(data, frames.Limits(max_body=cap))
        for m in decoded:
            if m["op"] == "chunk":
                (j,) = m["_frames"]
                assert bytes(bufs[j]) == blobs[m["i"]]
            seen.append(m.get("i", "small"))
    assert seen == [0, 1, 2, "small", 3, 4, 5, 6, 7]
    with pytest.raises(ProtocolError, match="FLOWCORE_MAX_MESSAGE_BYTES"):
        frames.encode_batches([{"op": "huge", "_frames": [0]}], [bytes(2 << 20)], cap)
