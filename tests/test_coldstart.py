"""Start-up: what ``import flowcore`` and ``init()`` load before the cluster's
processes are launched, the dashboard's web stack loading on the first
connection, and start-up failures reported clearly without leftovers."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from flowcore.cluster import ClusterStartError, LocalCluster
from flowcore.dashboard import OnFirstConnection, listen

HEAVY = ("tornado", "pyarrow", "numpy", "asyncio", "ssl", "msgpack", "cloudpickle",
         "flowcore.api", "flowcore.client.core", "flowcore.objects.ref")
# the standard library's slower imports, loaded later (while the cluster boots)
PRE_LAUNCH_AVOIDED = ("logging", "inspect", "dataclasses", "hmac", "secrets", "json")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=60, check=True)
    return set(out.stdout.strip().splitlines()[-1].split())


def test_import_flowcore_and_reaching_init_stay_light():
    """``import flowcore`` and looking up ``flowcore.init`` load neither the
    client, the event loop, TLS nor the data libraries: ``init()`` launches the
    head and node first and imports those while they boot."""
    loaded = _modules_after("import flowcore\nflowcore.init\nflowcore.shutdown")
    assert "flowcore.session" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    # what init() needs before it launches the processes is just as light
    loaded = _modules_after("import flowcore\nflowcore.init\nimport flowcore.cluster")
    avoid = set(HEAVY) | set(PRE_LAUNCH_AVOIDED)
    assert not loaded & avoid, sorted(loaded & avoid)


def test_looking_up_the_core_api_before_init_stays_light():
    """``from flowcore import init, remote, get, put`` before ``init()`` (or a
    check that they exist) does not load the event loop, the client or the
    actor machinery, which ``init()`` would otherwise only load after
    launching the cluster."""
    loaded = _modules_after("import flowcore\n"
                            "for n in ('init', 'remote', 'get', 'put', 'wait', 'shutdown'):\n"
                            "    getattr(flowcore, n)")
    avoid = {"asyncio", "ssl", "tornado", "numpy", "pyarrow", "flowcore.actor",
             "flowcore.runtime_context", "flowcore.client.core", "flowcore.cluster"}
    assert "flowcore.api" in loaded
    assert not loaded & avoid, sorted(loaded & avoid)


def test_dashboard_starts_on_the_first_connection():
    """A fake dashboard: nothing is made until a client connects; then it is
    made once and handed the listening sockets, and the connection waiting in
    the backlog is the server's to accept."""
    made: list[list[socket.socket]] = []

    class Fake:
        async def start(self, sockets: list[socket.socket], url: str) -> str:
            made.append(sockets)
            return url

        async def stop(self) -> None:
            for s in made[0]:
                s.close()

    async def main() -> None:
        sockets, url = listen("127.0.0.1", 0)
        port = sockets[0].getsockname()[1]
        lazy = OnFirstConnection(sockets, url, Fake)
        await asyncio.sleep(0)
        assert lazy.dashboard is None and not made
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(200):  # the loop notices the pending connection
            if made:
                break
            await asyncio.sleep(0.01)
        assert made and made[0] is sockets and isinstance(lazy.dashboard, Fake)
        conn, _ = sockets[0].accept()  # still in the backlog, for the server
        conn.close()
        writer.close()
        await lazy.stop()
        assert all(s.fileno() == -1 for s in sockets)

    asyncio.run(asyncio.wait_for(main(), 30))


class _FailsToServe:
    async def start(self, sockets: list[socket.socket], url: str) -> str:
        raise OSError("cannot serve")


def _no_web_stack() -> None:
    raise RuntimeError("no web stack")


@pytest.mark.parametrize("make", [_no_web_stack, _FailsToServe], ids=["make", "start"])
def test_dashboard_that_fails_to_start_closes_its_port(make):
    async def main() -> None:
        sockets, url = listen("127.0.0.1", 0)
        port = sockets[0].getsockname()[1]
        lazy = OnFirstConnection(sockets, url, make)
        try:  # the waiting connection is reset when the port closes
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer = None
        for _ in range(200):
            if sockets[0].fileno() == -1:
                break
            await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()
        assert sockets[0].fileno() == -1 and lazy.dashboard is None
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await lazy.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def _log_says_dashboard(cluster: LocalCluster) -> bool:
    with open(os.path.join(cluster.session_dir, "logs", "head.log")) as f:
        return "(log in with the cluster token)" in f.read()


@pytest.mark.timeout(60)
def test_head_loads_its_dashboard_when_first_asked():
    with LocalCluster(nodes=1, cpus_per_node=1) as cluster:
        assert cluster.dashboard_url
        assert not _log_says_dashboard(cluster)  # nobody asked yet
        req = urllib.request.Request(cluster.dashboard_url + "/metrics",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
            assert b"flowcore_nodes_alive 1.0" in r.read()
        assert _log_says_dashboard(cluster)
        with pytest.raises(urllib.error.HTTPError) as e:  # still token-protected
            urllib.request.urlopen(cluster.dashboard_url + "/metrics", timeout=30)
        assert e.value.code == 401


@pytest.mark.timeout(60)
def test_node_start_failure_is_clear_and_leaves_no_process():
    cluster = LocalCluster()
    try:
        with pytest.raises(ClusterStartError) as e:
            cluster.start(resources={"CPU": 1.0})  # refused by the node's command line
        assert "exited with code 2 during start" in str(e.value)
        assert cluster.head is not None
    finally:
        cluster.close()
    assert cluster.head.poll() is not None
    assert not cluster.nodes
