"""Object transfer between nodes over the bulk path (a raw authenticated
socket per pull, sendfile on the serving side): large objects arrive intact,
concurrent pulls fetch once, the bulk port refuses unauthenticated peers
without reading their bytes, a source that dies mid-pull fails the pull
cleanly, and a TLS cluster uses the same path inside TLS."""
from __future__ import annotations

import hashlib
import os
import pickle
import signal
import socket
import threading
import time

import numpy as np
import pytest

import flowcore
from flowcore.cluster import LocalCluster
from flowcore.exceptions import ObjectLostError
from flowcore.node import bulk
from flowcore.node.transfer import BULK_MIN, CHUNK, bulk_ranges, pick_path
from flowcore.protocol import auth, blocking

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    flowcore.shutdown()
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_memory=384 << 20,
                           session_dir=str(tmp_path_factory.mktemp("xfer")))
    flowcore.init(address=cluster.address, token=cluster.token)
    yield cluster
    flowcore.shutdown()
    cluster.shutdown()


def node_transfer_stats() -> dict:
    """Transfer counters of the node the driver is attached to (node a)."""
    return flowcore.context.current_client().request("node", {"op": "stats"})["transfer"]


def node_store_stats() -> dict:
    return flowcore.context.current_client().request("node", {"op": "stats"})["store"]


@flowcore.remote
def random_array(nbytes, seed):
    a = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return a


@flowcore.remote
def digest(a):
    return hashlib.sha256(memoryview(a)).hexdigest(), flowcore.get_runtime_context().get_node_id()


def on(node_id, fn):
    return fn.options(scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(node_id))


# ====================================================================== pure parts
def test_path_choice_and_ranges():
    assert pick_path(BULK_MIN, 40000) == "bulk"
    assert pick_path(BULK_MIN - 1, 40000) == "chunks"
    assert pick_path(100 * MiB, 0) == "chunks"
    assert pick_path(100 * MiB, None) == "chunks"
    for size in (CHUNK, CHUNK + 1, 100 * MiB + 7, 64 * MiB):
        for streams in (1, 2, 3):
            rs = bulk_ranges(size, streams)
            assert rs[0][0] == 0 and rs[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(rs, rs[1:]))
            assert all(s % 4096 == 0 for s, _ in rs)
            assert 1 <= len(rs) <= streams
    assert bulk_ranges(CHUNK, 2) == [(0, CHUNK)]  # one chunk: one stream


def _fake_source(token: bytes, send: int, announce: int) -> tuple[socket.socket, threading.Thread]:
    """A bulk server that authenticates, announces ``announce`` bytes, sends
    ``send`` of them and hangs up."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def run():
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(20)
            if not blocking.server_handshake(conn, token):
                return
            _, n, _, _ = bulk.REQUEST.unpack(blocking.recv_exact(conn, bulk.REQUEST.size))
            blocking.recv_exact(conn, n)
            conn.sendall(bulk.ANSWER.pack(1, announce) + bytes(send))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lsock, t


def test_receive_reports_a_source_that_hangs_up_mid_object():
    lsock, t = _fake_source(b"tok", send=3 * MiB, announce=8 * MiB)
    dest = memoryview(bytearray(8 * MiB))
    port = lsock.getsockname()[1]
    try:
        with socket.socket() as s, pytest.raises(ConnectionError, match=r"after \d+ of 8388608"):
            bulk.receive(s, f"tcp://127.0.0.1:{port}", port, b"tok", None, b"x" * 20, 0, dest)
    finally:
        t.join(20)
        lsock.close()


def test_receive_with_a_wrong_token_is_refused():
    lsock, t = _fake_source(b"right", send=0, announce=0)
    port = lsock.getsockname()[1]
    try:
        with socket.socket() as s, pytest.raises(flowcore.exceptions.AuthenticationError):
            bulk.receive(s, f"tcp://127.0.0.1:{port}", port, b"wrong", None, b"x", 0,
                         memoryview(bytearray(10)))
    finally:
        t.join(20)
        lsock.close()


# ====================================================================== a cluster
def test_large_object_moves_intact_over_the_bulk_path(two_nodes):
    a, b = two_nodes.node_ids()
    before = node_transfer_stats()
    ref = on(b, random_array).remote(64 * MiB + 12345, 7)
    want, where = flowcore.get(on(b, digest).remote(ref), timeout=60)
    assert where == b
    got, where = flowcore.get(on(a, digest).remote(ref), timeout=60)  # pulled to a
    assert where == a and got == want
    after = node_transfer_stats()
    assert after["bulk_pulls"] == before["bulk_pulls"] + 1
    assert after["chunk_pulls"] == before["chunk_pulls"]
    assert after["bytes_in"] - before["bytes_in"] >= 64 * MiB + 12345
    arr = flowcore.get(ref, timeout=60)  # the driver reads a's copy
    assert hashlib.sha256(memoryview(arr)).hexdigest() == want
    assert node_transfer_stats()["bulk_pulls"] == after["bulk_pulls"]
    assert node_store_stats()["num_unsealed"] == 0


def test_small_objects_still_go_in_chunks(two_nodes):
    a, b = two_nodes.node_ids()
    before = node_transfer_stats()
    ref = on(b, random_array).remote(BULK_MIN // 2, 3)
    want, _ = flowcore.get(on(b, digest).remote(ref), timeout=60)
    assert flowcore.get(on(a, digest).remote(ref), timeout=60) == (want, a)
    after = node_transfer_stats()
    assert after["chunk_pulls"] == before["chunk_pulls"] + 1
    assert after["bulk_pulls"] == before["bulk_pulls"]


def test_concurrent_pulls_of_one_object_fetch_once(two_nodes):
    a, b = two_nodes.node_ids()
    size = 32 * MiB
    ref = on(b, random_array).remote(size, 11)
    want, _ = flowcore.get(on(b, digest).remote(ref), timeout=60)
    before = node_transfer_stats()
    refs = [on(a, digest).remote(ref) for _ in range(4)]
    outs = flowcore.get(refs, timeout=60)
    assert arr_ok(flowcore.get(ref, timeout=60), want)
    assert all(o == (want, a) for o in outs)
    after = node_transfer_stats()
    assert after["bulk_pulls"] == before["bulk_pulls"] + 1
    # one object's worth (its bytes plus the serialisation header), not four
    assert size <= after["bytes_in"] - before["bytes_in"] < size + 64 * 1024


def arr_ok(arr, want: str) -> bool:
    return hashlib.sha256(memoryview(arr)).hexdigest() == want


def test_bulk_port_refuses_unauthenticated_peers_without_reading_them(two_nodes, tmp_path):
    port = node_transfer_stats()["bulk_port"]
    assert port
    refused = node_transfer_stats()["bulk_refused"]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    payload = pickle.dumps(Evil())
    for attempt in (payload + bytes(64), bulk.REQUEST.pack(1, 20, 0, 1 << 20) + bytes(100)):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.settimeout(20)
            hello = blocking.recv_exact(s, auth.SERVER_HELLO)
            assert auth.parse_server_hello(hello)  # a greeting, then nothing before a proof
            s.sendall(attempt)
            rest = b""
            while True:
                try:
                    chunk = s.recv(1 << 16)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                rest += chunk
            assert rest in (auth.REFUSAL, b"")  # refused and closed: no object bytes
    assert not marker.exists()
    deadline = time.monotonic() + 30
    while node_transfer_stats()["bulk_refused"] < refused + 2:
        assert time.monotonic() < deadline, node_transfer_stats()
    # and the port goes on serving authenticated pulls
    a, b = two_nodes.node_ids()
    before = node_transfer_stats()["bulk_pulls"]
    ref = on(b, random_array).remote(8 * MiB, 5)
    want, _ = flowcore.get(on(b, digest).remote(ref), timeout=60)
    assert flowcore.get(on(a, digest).remote(ref), timeout=60) == (want, a)
    assert node_transfer_stats()["bulk_pulls"] == before + 1


def test_source_killed_mid_pull_fails_cleanly(private_cluster):
    """The source stops (SIGSTOP) while a pull from it is under way, then is
    killed: the puller does not hang, aborts its partial copy, says why, and
    the object is rebuilt from lineage."""
    cluster = private_cluster(2, object_store_memory=256 << 20)
    a, b = cluster.node_ids()
    prefer_b = random_array.options(
        scheduling_strategy=flowcore.NodeAffinitySchedulingStrategy(b, soft=True))
    # a has already pulled from b (message connection and bulk port known)
    warm = on(b, random_array).remote(BULK_MIN, 1)
    flowcore.get(on(a, digest).remote(warm), timeout=60)
    base = node_transfer_stats()
    ref = prefer_b.remote(64 * MiB, 9)
    want, where = flowcore.get(on(b, digest).remote(ref), timeout=60)
    assert where == b
    proc = next(n.proc for n in cluster.nodes if n.node_id == b)
    os.kill(proc.pid, signal.SIGSTOP)  # frozen: its kernel still accepts connections
    out: dict = {}

    def driver_get():
        try:
            out["value"] = flowcore.get(ref, timeout=90)
        except Exception as e:  # noqa: BLE001 - examined below
            out["error"] = e
    t = threading.Thread(target=driver_get, daemon=True)
    try:
        t.start()
        deadline = time.monotonic() + 30
        while node_transfer_stats()["pulling"] == 0:  # a's pull from b has started
            assert time.monotonic() < deadline and t.is_alive()
    finally:
        cluster.kill_node(b)
    t.join(100)
    assert not t.is_alive(), "the pull hung after its source died"
    if "error" in out:  # a clean failure is acceptable; a hang is not
        assert isinstance(out["error"], ObjectLostError), out["error"]
    else:
        assert arr_ok(out["value"], want)  # rebuilt from lineage on a
    st = node_transfer_stats()
    assert st["pulling"] == 0 and st["bulk_pulls"] == base["bulk_pulls"]  # it failed
    assert node_store_stats()["num_unsealed"] == 0  # the partial copy was aborted


# ====================================================================== TLS
def test_tls_cluster_transfers_over_the_bulk_path(tmp_path):
    from test_tls import make_ca_and_member
    certs = make_ca_and_member(str(tmp_path), "xfer")
    flowcore.shutdown()
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_memory=128 << 20,
                           session_dir=str(tmp_path / "session"), tls=certs)
    try:
        flowcore.init(address=cluster.address, token=cluster.token, tls=certs)
        a, b = cluster.node_ids()
        ref = on(b, random_array).remote(24 * MiB + 3, 21)
        want, _ = flowcore.get(on(b, digest).remote(ref), timeout=60)
        assert flowcore.get(on(a, digest).remote(ref), timeout=60) == (want, a)
        st = node_transfer_stats()
        assert st["bulk_pulls"] == 1 and st["chunk_pulls"] == 0
        # the bulk port speaks only TLS: a plain client gets no greeting
        with socket.create_connection(("127.0.0.1", st["bulk_port"]), timeout=20) as s:
            s.settimeout(20)
            s.sendall(bytes(64) + b"\n" * 300)
            got = b""
            while True:
                try:
                    chunk = s.recv(4096)
                except (ConnectionResetError, socket.timeout):
                    break
                if not chunk:
                    break
                got += chunk
            assert auth.MAGIC not in got
    finally:
        flowcore.shutdown()
        cluster.shutdown()


# ============================================== a pull that beats the writer's seal
def test_a_pull_of_an_object_still_being_written_waits_for_its_seal(tmp_path):
    """The writer's seal goes to its node and the head's news that the object
    is ready to the reader on another connection, so a peer's pull can reach
    the source before the seal: the source serves it once sealed (the bulk
    path and the chunked one), and answers at once when the writer aborts."""
    import asyncio
    import types
    import uuid

    from flowcore.node.transfer import Transfers
    from flowcore.objects.store import ObjectStore

    loop = asyncio.new_event_loop()
    store = ObjectStore(f"t{uuid.uuid4().hex[:10]}", "n-src", 16 * MiB, str(tmp_path / "spill"))
    node = types.SimpleNamespace(store=store, token=b"tok", tls=None)
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()

    def on_loop(fn, *args):
        done = threading.Event()
        out = []
        loop.call_soon_threadsafe(lambda: (out.append(fn(*args)), done.set()))
        assert done.wait(10)
        return out[0]

    async def start_transfers():
        x = Transfers(node)
        x.start("127.0.0.1")
        return x
    xfer = asyncio.run_coroutine_threadsafe(start_transfers(), loop).result(10)
    port = xfer.bulk_server.port
    data = np.random.default_rng(3).integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes()
    try:
        oid = b"w" * 20
        on_loop(store.create, oid, len(data), "writer")
        got: dict = {}

        def pull():
            dest = memoryview(bytearray(len(data)))
            with socket.socket() as s:
                try:
                    got["n"] = bulk.receive(s, "tcp://127.0.0.1:1", port, b"tok", None, oid, 0,
                                            dest)
                    got["bytes"] = bytes(dest)
                except Exception as e:  # noqa: BLE001 - checked below
                    got["error"] = e
        puller = threading.Thread(target=pull)
        puller.start()
        deadline = time.monotonic() + 10
        while not on_loop(lambda: bool(xfer._seal_waiters.get(oid))):
            assert time.monotonic() < deadline, f"the pull never waited: {got}"
            time.sleep(0.01)
        assert "n" not in got and "error" not in got  # not answered before the seal

        def write_and_seal():
            store.write_chunk(oid, 0, data)
            store.seal(oid)
            xfer.sealed(oid)
        on_loop(write_and_seal)
        puller.join(10)
        assert got.get("n") == len(data) and got["bytes"] == data, got

        # the chunked path waits too
        oid2 = b"c" * 20
        on_loop(store.create, oid2, 100, "writer")
        replies: list = []
        comm = types.SimpleNamespace(
            closed=False, reply=lambda m, **kw: replies.append(kw),
            send_with_frames=lambda m, frames: replies.append(bytes(frames[0])))
        on_loop(xfer.serve_chunk, comm, {"oid": oid2, "start": 0, "length": 100})
        assert replies == []

        def seal2():
            store.write_chunk(oid2, 0, b"z" * 100)
            store.seal(oid2)
            xfer.sealed(oid2)
        on_loop(seal2)
        deadline = time.monotonic() + 10
        while not replies:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert replies == [b"z" * 100]

        # a writer that gives up: the waiting pull is answered (not found)
        oid3 = b"a" * 20
        on_loop(store.create, oid3, 100, "writer")
        replies.clear()
        on_loop(xfer.serve_chunk, comm, {"oid": oid3, "start": 0, "length": 100})
        on_loop(store.abort, oid3)
        deadline = time.monotonic() + 10
        while not replies:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "error" in replies[0] and "KeyError" in replies[0]["error"]
    finally:
        on_loop(xfer.bulk_server.close)
        xfer._threads.shutdown(wait=True)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()
        store.close()
