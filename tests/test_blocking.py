"""The blocking transport over real sockets on 127.0.0.1: a client
``BlockingConn`` against a port whose admission thread hands over
``BlockingConn.accepted`` connections; batches both ways, large out-of-band
frames, the cap checked at the length prefix, wrong tokens, and the layering
rule that node/ reaches the transport through protocol/ only."""
from __future__ import annotations

import ast
import os
import queue
import select
import socket
from typing import Iterator

import pytest

import flowcore
from flowcore.exceptions import AuthenticationError, ProtocolError
from flowcore.protocol import blocking, frames
from flowcore.protocol.admission import Admission
from flowcore.protocol.blocking import BlockingConn

TOKEN = b"blocking transport token"
CAP = 2 << 20


@pytest.fixture
def port() -> Iterator[tuple[int, "queue.Queue[BlockingConn]"]]:
    """A listening port whose admitted peers arrive as BlockingConns (with a
    2 MiB cap) on the queue."""
    admitted: "queue.Queue[BlockingConn]" = queue.Queue()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    adm = Admission(sock, TOKEN, lambda s, peer: admitted.put(
        BlockingConn.accepted(s, peer, False, frames.Limits(max_body=CAP))), "test")
    try:
        yield sock.getsockname()[1], admitted
    finally:
        adm.close()
        sock.close()
        while not admitted.empty():
            admitted.get().close()


def read_batches(conn: BlockingConn, count: int, timeout: float = 20.0) -> list:
    out: list = []
    while len(out) < count:
        readable, _, _ = select.select([conn], [], [], timeout)
        assert readable, f"no batch within {timeout}s ({len(out)} of {count})"
        got = conn.read_available()
        assert got or not conn.closed, "the peer closed"
        out.extend(got)
    return out


def test_batches_travel_both_ways_with_large_frames(port) -> None:
    p, admitted = port
    client = BlockingConn(f"tcp://127.0.0.1:{p}", TOKEN, 20)
    server = admitted.get(timeout=20)
    try:
        assert server.sock.gettimeout() is None
        assert server.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client.write([{"op": "a", "i": 1}, {"op": "b", "i": 2}])
        client.write([{"op": "c", "i": 3}])
        got = read_batches(server, 2)
        assert [m["op"] for msgs, _ in got for m in msgs] == ["a", "b", "c"]
        # a body over frames.BIG_BODY, as a Comm sends one (out-of-band frames)
        blob = os.urandom(frames.BIG_BODY + 12345)
        data = b"".join(bytes(b) for b in frames.encode(
            [{"op": "blob", "_frames": [0]}], [blob]))
        server.sock.sendall(data)
        ((msgs, bufs),) = read_batches(client, 1)
        assert msgs[0]["op"] == "blob" and bytes(bufs[0]) == blob
        assert client.reader.idle and server.reader.idle
    finally:
        client.close()
        server.close()


def test_a_prefix_over_the_cap_is_refused_before_its_body(port) -> None:
    p, admitted = port
    client = BlockingConn(f"tcp://127.0.0.1:{p}", TOKEN, 20)
    server = admitted.get(timeout=20)
    try:
        client.sock.sendall(frames.PREFIX.pack(CAP + 1))
        select.select([server], [], [], 20)
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            server.read_available()
    finally:
        client.close()
        server.close()


def test_wrong_token_is_refused_and_nothing_is_admitted(port) -> None:
    p, admitted = port
    with pytest.raises(AuthenticationError, match="refused the token"):
        BlockingConn(f"tcp://127.0.0.1:{p}", b"not the token", 20)
    # the blocking challenge alone says the same
    with socket.create_connection(("127.0.0.1", p), timeout=20) as s:
        with pytest.raises(AuthenticationError, match="refused the token"):
            blocking.client_handshake(s, b"not the token", "test")
    client = BlockingConn(f"tcp://127.0.0.1:{p}", TOKEN, 20)
    try:
        server = admitted.get(timeout=20)  # only the good client got through
        assert admitted.empty()
        server.close()
    finally:
        client.close()


def test_a_server_that_hangs_up_before_greeting_is_named() -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    try:
        s = socket.create_connection(lsock.getsockname(), timeout=20)
        conn, _ = lsock.accept()
        conn.close()
        with s, pytest.raises(AuthenticationError, match="closed the connection before "
                                                         "greeting"):
            blocking.client_handshake(s, TOKEN, "somewhere:1")
    finally:
        lsock.close()


def test_node_package_imports_nothing_from_the_client_package() -> None:
    node_dir = os.path.join(os.path.dirname(flowcore.__file__), "node")
    offenders = []
    for name in sorted(os.listdir(node_dir)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(node_dir, name)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                if mod.startswith("..client") or mod.startswith("flowcore.client"):
                    offenders.append(f"{name}:{node.lineno} from {mod}")
            elif isinstance(node, ast.Import):
                offenders += [f"{name}:{node.lineno} import {a.name}" for a in node.names
                              if a.name.startswith("flowcore.client")]
    # the worker process's entry point starts the worker's client: that one
    # import is the worker's, not the transport's
    offenders = [o for o in offenders if not o.startswith("worker.py:")]
    assert offenders == []
