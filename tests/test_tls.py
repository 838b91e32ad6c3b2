"""TLS on every link: a LocalCluster of two nodes under mutual TLS, with
certificates made by the ``openssl`` CLI for this module; mismatches (plain
against TLS, either way; a certificate from another CA) fail fast with words;
the settings are checked before anything starts."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
import sys
import time

import numpy as np
import pytest

import flowcore
from flowcore.client.core import CoreClient
from flowcore.cluster import LocalCluster
from flowcore.exceptions import AuthenticationError
from flowcore.protocol import auth, tls
from flowcore.protocol.blocking import BlockingConn
from flowcore.protocol.comm import connect, serve

pytestmark = pytest.mark.timeout(120)
TOKEN = b"tls test token"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca_and_member(d: str, name: str) -> dict[str, str]:
    """A CA and one certificate it signed (IP SAN 127.0.0.1, usable as server
    and client certificate); returns the tls settings."""
    ca_key, ca_crt = os.path.join(d, f"{name}-ca.key"), os.path.join(d, f"{name}-ca.crt")
    key, csr, crt = (os.path.join(d, f"{name}.{e}") for e in ("key", "csr", "crt"))
    ext = os.path.join(d, f"{name}.ext")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "2",
             "-subj", f"/CN={name} CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={name} member")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
             "-out", crt, "-days", "2", "-extfile", ext)
    return {"cert": crt, "key": key, "ca": ca_crt}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("certs"))
    good = make_ca_and_member(d, "cluster")
    other = make_ca_and_member(d, "other")
    return {"good": good, "other": other,
            # signed by another CA but trusting the cluster's CA
            "foreign": {"cert": other["cert"], "key": other["key"], "ca": good["ca"]}}


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    flowcore.shutdown()
    cluster = LocalCluster(nodes=2, cpus_per_node=1, object_store_memory=64 << 20,
                           session_dir=str(tmp_path_factory.mktemp("tls-session")),
                           tls=certs["good"])
    try:
        flowcore.init(address=cluster.address, token=cluster.token, tls=certs["good"])
        yield cluster
    finally:
        flowcore.shutdown()
        cluster.shutdown()


def _hostport(address: str) -> tuple[str, int]:
    host, port = address[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


def _client_error(cluster: LocalCluster, tls_setting) -> AuthenticationError:
    cfg = tls.resolve(tls_setting)
    client = CoreClient(cluster.address, cluster.token.encode(), None, tls=cfg)
    try:
        with pytest.raises(AuthenticationError) as err:
            client.start(timeout=20)
    finally:
        client.close()
    return err.value


# ====================================================================== a TLS cluster
@flowcore.remote
def make(n):
    return np.arange(n, dtype=np.float64)


@flowcore.remote
def summed(x):
    return float(x.sum()), flowcore.get_runtime_context().get_node_id()


@flowcore.remote
def links():
    """How this worker process talks to its node and to the head."""
    from flowcore.objects.ref import current_client
    c = current_client()
    return {k: (type(conn.sock).__name__, conn.sock.version()
                if isinstance(conn.sock, ssl.SSLSocket) else None)
            for k, conn in c.conns.items()}


def test_tasks_and_object_pulls_between_nodes_run_over_tls(tls_cluster):
    a, b = tls_cluster.node_ids()
    on = {n: flowcore.NodeAffinitySchedulingStrategy(n) for n in (a, b)}
    ref = make.options(scheduling_strategy=on[a]).remote(2_000_000)   # 16 MB in a's store
    total, where = flowcore.get(summed.options(scheduling_strategy=on[b]).remote(ref),
                                timeout=60)
    assert where == b and total == float(np.arange(2_000_000).sum())
    rows = [o for o in flowcore.state.list_objects() if o["object_id"] == ref.hex()]
    assert set(rows[0]["nodes"]) == {a, b}   # b pulled a copy from a, node to node
    assert flowcore.get(ref, timeout=60)[-1] == 1_999_999.0
    # worker processes reach their node and the head over TLS too
    for n in (a, b):
        seen = flowcore.get(links.options(scheduling_strategy=on[n]).remote(), timeout=60)
        assert set(seen) == {"node", "head"}
        for kind, version in seen.values():
            assert kind == "SSLSocket" and version.startswith("TLS"), seen


def test_every_listener_speaks_only_tls(tls_cluster, certs):
    from flowcore.context import require_client
    driver = require_client()
    assert driver.head is not None and driver.node is not None
    for comm in (driver.head, driver.node):
        assert comm.transport.get_extra_info("ssl_object") is not None
    ctx = tls.resolve(certs["good"]).client_context()
    for address in [tls_cluster.address, *(n.address for n in tls_cluster.nodes)]:
        host, port = _hostport(address)
        # plaintext is never answered with a flowcore greeting: the TLS
        # handshake fails and the server hangs up
        with socket.create_connection((host, port), timeout=20) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(200))
            got = b""
            while True:
                try:
                    chunk = raw.recv(4096)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
            assert auth.MAGIC not in got
        # a TLS client with the cluster's certificate gets the greeting inside TLS
        with socket.create_connection((host, port), timeout=20) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                assert s.version() in ("TLSv1.2", "TLSv1.3")
                hello = b""
                while len(hello) < auth.SERVER_HELLO:
                    hello += s.recv(auth.SERVER_HELLO - len(hello))
                assert auth.parse_server_hello(hello)


@flowcore.remote
class Echo:
    def echo(self, x):
        return x


def test_direct_actor_calls_run_over_tls(tls_cluster, certs):
    from flowcore.context import require_client
    driver = require_client()
    a = Echo.remote()

    def direct_calls():
        return driver.query("counts").get("direct_calls", 0)
    for _ in range(2000):  # the first calls go through the head while it connects
        before = direct_calls()
        assert flowcore.get(a.echo.remote(1), timeout=60) == 1
        if direct_calls() > before:
            break
    else:
        raise AssertionError("no call went directly to the actor")
    conn = driver._dconns["actor:" + a._aid.hex()]
    assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.version().startswith("TLS")
    r = driver.request("head", {"op": "actor_direct", "aid": a._aid})
    host, port = _hostport(r["address"])
    with socket.create_connection((host, port), timeout=20) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(200))
        got = b""
        while True:
            try:
                chunk = raw.recv(4096)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            got += chunk
        assert auth.MAGIC not in got
    assert flowcore.get(a.echo.remote(2), timeout=60) == 2


# ====================================================================== mismatches
def test_plain_client_against_tls_cluster_fails_fast_naming_tls(tls_cluster):
    t = time.monotonic()
    err = _client_error(tls_cluster, False)
    assert time.monotonic() - t < 9
    assert "requires TLS" in str(err) and "FLOWCORE_TLS_CERT" in str(err)
    # the blocking client of worker processes says the same
    with pytest.raises(AuthenticationError, match="requires TLS"):
        BlockingConn(tls_cluster.nodes[0].address, tls_cluster.token.encode(), 20)


def test_certificate_from_another_ca_is_refused_both_ways(tls_cluster, certs):
    # the client does not trust the cluster's CA: it refuses the server
    err = _client_error(tls_cluster, certs["other"])
    assert "not signed by this process's CA" in str(err) and "--tls-ca" in str(err)
    # the client trusts the cluster's CA but its own certificate is foreign:
    # the server refuses it
    err = _client_error(tls_cluster, certs["foreign"])
    assert "refused this process's certificate" in str(err)
    for which in ("other", "foreign"):
        with pytest.raises(AuthenticationError, match="certificate"):
            BlockingConn(tls_cluster.nodes[0].address, tls_cluster.token.encode(), 20,
                         tls.resolve(certs[which]))
    # the head keeps serving its own
    assert flowcore.get(summed.remote(np.ones(3)), timeout=60)[0] == 3.0


def test_tls_client_against_plain_server_says_so(certs, caplog):
    cfg = tls.resolve(certs["good"])

    async def run() -> tuple[str, str]:
        closed = asyncio.Event()

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "TLS handshake" in record.getMessage():
                    closed.set()
        handler = Watch()
        logging.getLogger("flowcore.comm").addHandler(handler)
        server, port = await serve(TOKEN, lambda c: None, name="plain")
        try:
            with pytest.raises(AuthenticationError) as err:
                await connect(f"tcp://127.0.0.1:{port}", TOKEN, tls=cfg)
            await asyncio.wait_for(closed.wait(), 20)
            # and the blocking client, in a thread so the server keeps running
            loop = asyncio.get_running_loop()
            blocking = await loop.run_in_executor(None, _blocking_error, port, cfg)
        finally:
            server.close()
            logging.getLogger("flowcore.comm").removeHandler(handler)
        return str(err.value), blocking

    with caplog.at_level(logging.WARNING, logger="flowcore.comm"):
        message, blocking = asyncio.run(asyncio.wait_for(run(), 60))
    assert "does not speak TLS" in message and "--tls-cert" in message
    assert "does not speak TLS" in blocking
    assert "starts a TLS handshake, and this server runs without TLS" in caplog.text


def _blocking_error(port: int, cfg: tls.TLSConfig) -> str:
    try:
        BlockingConn(f"tcp://127.0.0.1:{port}", TOKEN, 20, cfg)
    except AuthenticationError as e:
        return str(e)
    return "connected"


def test_plain_links_stay_plain():
    async def run() -> None:
        server, port = await serve(TOKEN, lambda c: None)
        try:
            comm = await connect(f"tcp://127.0.0.1:{port}", TOKEN)
            assert comm.transport.get_extra_info("ssl_object") is None
            comm.close()
        finally:
            server.close()
    asyncio.run(asyncio.wait_for(run(), 30))


# ====================================================================== settings
def test_settings_are_checked_with_clear_errors(certs, tmp_path, monkeypatch):
    good = certs["good"]
    with pytest.raises(ValueError, match=r"missing tls\['ca'\]"):
        tls.resolve({"cert": good["cert"], "key": good["key"]})
    with pytest.raises(ValueError, match="unknown key"):
        tls.resolve({**good, "verify": False})
    with pytest.raises(TypeError, match="expected a dict"):
        tls.resolve("yes")
    with pytest.raises(ValueError, match=r"cannot read tls\['key'\]"):
        tls.resolve({**good, "key": str(tmp_path / "absent.key")})
    with pytest.raises(ValueError, match="not a PEM certificate and its matching private key"):
        tls.resolve({**good, "key": certs["other"]["key"]})
    with pytest.raises(ValueError, match="not a PEM CA certificate"):
        tls.resolve({**good, "ca": good["key"]})
    with pytest.raises(ValueError, match=r"LocalCluster\(tls=...\)"):  # before any start
        LocalCluster(nodes=1, tls={"cert": good["cert"]})
    assert tls.resolve(False) is None
    for var in tls.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert tls.resolve(None) is None
    monkeypatch.setenv("FLOWCORE_TLS_CERT", good["cert"])
    with pytest.raises(ValueError, match="missing FLOWCORE_TLS_KEY and FLOWCORE_TLS_CA"):
        tls.resolve(None)
    monkeypatch.setenv("FLOWCORE_TLS_KEY", good["key"])
    monkeypatch.setenv("FLOWCORE_TLS_CA", good["ca"])
    cfg = tls.resolve(None)
    assert cfg is not None and cfg.env() == {"FLOWCORE_TLS_CERT": good["cert"],
                                             "FLOWCORE_TLS_KEY": good["key"],
                                             "FLOWCORE_TLS_CA": good["ca"]}


def _run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in tls.ENV_VARS}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.mark.parametrize("module,extra", [
    ("flowcore.scheduler.cli", ["--port", "0", "--dashboard-port", "-1"]),
    ("flowcore.node.cli", ["tcp://127.0.0.1:1", "--token", "t"]),
])
def test_cli_refuses_partial_or_bad_tls_flags(certs, tmp_path, module, extra):
    good = certs["good"]
    base = [*extra, "--state-dir", str(tmp_path)]
    partial = _run_cli(module, *base, "--tls-cert", good["cert"])
    assert partial.returncode == 2
    assert partial.stderr.strip().count("\n") == 0
    assert "missing --tls-key and --tls-ca" in partial.stderr
    unreadable = _run_cli(module, *base, "--tls-cert", good["cert"], "--tls-key", good["key"],
                          "--tls-ca", str(tmp_path / "nope.crt"))
    assert unreadable.returncode == 2 and "cannot read --tls-ca" in unreadable.stderr
    invalid = _run_cli(module, *base, "--tls-cert", good["key"], "--tls-key", good["key"],
                       "--tls-ca", good["ca"])
    assert invalid.returncode == 2 and "not a PEM certificate" in invalid.stderr
    assert invalid.stderr.strip().count("\n") == 0


def test_cli_head_with_flags_and_node_with_environment(certs, tmp_path):
    good = certs["good"]
    env = {k: v for k, v in os.environ.items() if k not in tls.ENV_VARS}
    head = subprocess.Popen(
        [sys.executable, "-m", "flowcore.scheduler.cli", "--port", "0", "--dashboard-port",
         "-1", "--state-dir", str(tmp_path), "--tls-cert", good["cert"], "--tls-key",
         good["key"], "--tls-ca", good["ca"]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    node = None
    try:
        assert head.stdout is not None
        for line in head.stdout:
            if "join nodes with" in line:
                break
        assert "--tls-ca" in line
        address = line.split("flowcore-worker ")[1].split()[0]
        node = subprocess.Popen(
            [sys.executable, "-m", "flowcore.node.cli", address, "--state-dir", str(tmp_path),
             "--num-cpus", "1", "--object-store-memory", str(64 << 20)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**env, **tls.resolve(good).env()})
        assert node.stdout is not None
        out = []
        for line in node.stdout:
            out.append(line)
            if "joined" in line:
                break
        assert "joined" in out[-1], "".join(out)
    finally:
        for p in (node, head):
            if p is not None and p.poll() is None:
                p.terminate()
        for p in (node, head):
            if p is not None:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def test_embedded_cluster_takes_tls_from_the_environment(certs, tmp_path):
    """A driver with FLOWCORE_TLS_* set and a plain init(): its embedded head,
    node and workers all run under TLS."""
    script = (
        "import flowcore, ssl\n"
        "from flowcore.context import require_client\n"
        f"flowcore.init(num_cpus=1, object_store_memory={64 << 20},\n"
        f"              session_dir={str(tmp_path)!r})\n"
        "@flowcore.remote\n"
        "def worker_link():\n"
        "    from flowcore.objects.ref import current_client\n"
        "    return type(current_client().conns['head'].sock).__name__\n"
        "c = require_client()\n"
        "print(flowcore.get(worker_link.remote(), timeout=60),\n"
        "      c.head.transport.get_extra_info('ssl_object') is not None, flush=True)\n"
        "flowcore.shutdown()\n")
    env = {**{k: v for k, v in os.environ.items() if k not in tls.ENV_VARS},
           **tls.resolve(certs["good"]).env(), "FLOWCORE_QUIET": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=90, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SSLSocket", "True"]
    assert "requires TLS" not in open(os.path.join(tmp_path, "logs", "head.log")).read()
