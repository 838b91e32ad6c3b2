"""Leased workers on a TLS cluster: ready tasks go straight to a worker the
driver leases from its node over a TLS connection, written and read by the
driver's IO thread only; bursts, a loop of gets, a worker's crash and SPREAD
leases on both nodes work as over plain TCP; the leased worker's listener
speaks only TLS."""
from __future__ import annotations

import os
import pickle
import socket
import ssl
import time

import pytest

import flowcore
from flowcore.client.spread import is_spread
from flowcore.cluster import LocalCluster
from flowcore.context import require_client
from flowcore.protocol import auth, frames
from test_tls import make_ca_and_member

pytestmark = pytest.mark.timeout(120)
LEASED = "leased worker"


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    flowcore.shutdown()
    certs = make_ca_and_member(str(tmp_path_factory.mktemp("certs")), "cluster")
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_memory=64 << 20,
                           session_dir=str(tmp_path_factory.mktemp("tls-lease-session")),
                           tls=certs)
    try:
        flowcore.init(address=cluster.address, token=cluster.token, tls=certs)
        yield cluster
    finally:
        flowcore.shutdown()
        cluster.shutdown()


@pytest.fixture
def long_grace(monkeypatch):
    # leases are kept between the steps of a test however slow the machine
    import flowcore.client.leases as leases
    monkeypatch.setattr(leases, "GRACE", 30.0)


@flowcore.remote
def noop(x=None):
    return x


@flowcore.remote
def square(x):
    return x * x


def _leased(ref) -> bool:
    return any(LEASED in e["cause"] for e in flowcore.state.task_events(100_000)
               if e["task_id"] == ref.task_id)


def _warm() -> None:
    """Run tasks until one takes the leased path (a request can be declined
    while the pool's worker starts; it is asked again after a back-off)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ref = noop.remote()
        flowcore.get(ref, timeout=60)
        if _leased(ref):
            return
        time.sleep(0.02)
    raise AssertionError("no task took the leased path in 60 s")


def _leased_count() -> int:
    return require_client().query("counts").get("leased", 0)


def test_ready_tasks_run_on_a_leased_worker_over_tls(tls_cluster, long_grace):
    driver = require_client()
    _warm()
    # the connection to the leased worker is TLS, and nonblocking: only the
    # IO thread reads and writes it
    conns = list(driver._lease_conns.values())
    assert conns
    for conn in conns:
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.version().startswith("TLS")
        assert conn.tls and conn.link is None
    before, reads = _leased_count(), driver._reads
    refs = []
    for i in range(30):  # a loop of gets: each answer comes back through the IO thread
        ref = noop.remote(i)
        assert flowcore.get(ref, timeout=60) == i
        refs.append(ref)
    assert sum(_leased(r) for r in refs) >= 20
    assert _leased_count() - before >= 20  # the head's count of leased tasks
    # no calling thread read a connection (they are all TLS here)
    assert driver._reads == reads and not driver._unwatched


def test_a_burst_on_tls_leases_completes_with_correct_results(tls_cluster, long_grace):
    driver = require_client()
    _warm()
    sent, queued = driver.leases.sent, driver.leases.queued
    refs = [square.remote(i) for i in range(400)]
    assert flowcore.get(refs, timeout=90) == [i * i for i in range(400)]
    # the burst waited in the driver's queue and went to its leased worker
    # (the head hands part of it to the other node's free CPU: lease_spill)
    assert driver.leases.queued > queued and driver.leases.sent > sent
    assert sum(_leased(r) for r in refs) > 0
    # and a burst of futures awaited out of order
    refs = [square.remote(i) for i in range(200)]
    assert [flowcore.get(r, timeout=60) for r in reversed(refs)] == [
        i * i for i in reversed(range(200))]


def test_a_leased_worker_crash_under_tls_is_retried(tls_cluster, tmp_path, long_grace):
    marker = str(tmp_path / "crashed")

    @flowcore.remote(max_retries=1)
    def crash_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return "second attempt"
    _warm()
    ref = crash_once.remote(marker)
    assert flowcore.get(ref, timeout=60) == "second attempt"
    causes = [e["cause"] for e in flowcore.state.task_events(100_000)
              if e["task_id"] == ref.task_id]
    assert any(LEASED in c for c in causes) and any("worker died" in c for c in causes), causes

    @flowcore.remote(max_retries=0)
    def crash():
        os._exit(1)
    _warm()
    with pytest.raises(flowcore.exceptions.WorkerCrashedError):
        flowcore.get(crash.remote(), timeout=60)
    _warm()
    assert flowcore.get(noop.remote(3), timeout=60) == 3


class _Touch:
    """Unpickling this creates a file (what a decoded task blob would do)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_plaintext_connection_to_the_leased_worker_is_refused(tls_cluster, tmp_path,
                                                                long_grace):
    driver = require_client()
    _warm()
    held = driver.leases.all()
    assert held
    ls = held[0]
    marker = str(tmp_path / "unpickled")
    # a well-formed task for the live lease, with a function blob that
    # creates a file when unpickled, sent without TLS
    msg = {"op": "run_task", "tid": os.urandom(16), "fid": os.urandom(16), "name": "x",
           "args": None, "owner": driver.client_id, "lease": ls.lease,
           "fblob": pickle.dumps(_Touch(marker))}
    payload = b"".join(bytes(b) for b in frames.encode([msg]))
    host, port = ls.address[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as raw:
        raw.settimeout(20)
        try:
            raw.sendall(payload)
        except OSError:
            pass  # (hung up already)
        got = b""
        while True:
            try:
                chunk = raw.recv(4096)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            got += chunk
    assert auth.MAGIC not in got  # never greeted: the TLS handshake failed first
    assert not os.path.exists(marker)
    # the leased worker goes on serving its holder over TLS
    refs = [noop.remote(i) for i in range(10)]
    assert flowcore.get(refs, timeout=60) == list(range(10))
    assert not os.path.exists(marker)


@flowcore.remote(scheduling_strategy="SPREAD")
def where(i):
    return i, flowcore.get_runtime_context().get_node_id()


def test_spread_tasks_run_on_workers_leased_over_tls_from_both_nodes(tls_cluster, long_grace):
    driver = require_client()
    nodes = set(tls_cluster.node_ids())
    deadline = time.monotonic() + 60
    while {ls.node for ls in driver.leases.all() if is_spread(ls.key)} != nodes:
        assert time.monotonic() < deadline, [ls.node for ls in driver.leases.all()]
        flowcore.get([where.remote(i) for i in range(50)], timeout=60)
    sent = driver.leases.sent
    got = flowcore.get([where.remote(i) for i in range(300)], timeout=60)
    assert [i for i, _ in got] == list(range(300)) and {n for _, n in got} == nodes
    assert driver.leases.sent - sent > 100
    # the other node's lease requests went over TLS, and so did its worker's tasks
    for comm in driver._node_links.comms.values():
        assert comm.transport.get_extra_info("ssl_object") is not None
    for ls in driver.leases.all():
        assert isinstance(ls.conn.sock, ssl.SSLSocket)


@flowcore.remote
def child(i):
    return i


@flowcore.remote(num_cpus=0)
def nested_burst(n):
    from flowcore.context import current_client
    cl = current_client()
    refs = [child.remote(i) for i in range(n)]
    total = sum(flowcore.get(refs, timeout=60))
    return total, cl.tls is not None, cl.leases.sent, bool(cl._lease_conns)


def test_a_nested_burst_under_tls_goes_through_the_head(tls_cluster):
    """A worker's own client does not lease under TLS (it has no IO thread):
    its burst goes through the head and completes."""
    total, tls_on, sent, conns = flowcore.get(nested_burst.remote(200), timeout=90)
    assert total == 200 * 199 // 2 and tls_on
    assert sent == 0 and not conns
