"""Role-checked dispatch: every receiver refuses (and logs) an op its sender's
role may not send, and keeps the connection; a handler that raises drops what
it queued.  Real connections on 127.0.0.1 throughout."""
from __future__ import annotations

import asyncio
import glob
import logging
import os
import queue
import secrets
import subprocess
import sys
import threading
import time

import pytest

import flowcore
from flowcore._version import __version__
from flowcore.client.core import CoreClient
from flowcore.protocol import messages
from flowcore.protocol.comm import Comm, connect, guarded, serve
from flowcore.scheduler.server import HeadServer


def _refused(caplog, op: str) -> bool:
    return any(f"refused op {op!r}" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ the head
def test_head_refuses_ops_outside_each_senders_role(caplog):
    """A node may not submit, a driver may not report a task done, a worker
    may not send a node's heartbeat: each is refused before SchedulerState
    sees it, and the same connection is answered right after."""
    caplog.set_level(logging.WARNING, logger="flowcore.protocol")

    async def scenario() -> None:
        token = secrets.token_bytes(16)
        head = HeadServer(token, "127.0.0.1", 0)
        address = await head.start()
        seen: list[str] = []
        handle = head.state.handle

        def recording(source: str, msg: dict) -> list:
            seen.append(msg["op"])
            return handle(source, msg)
        head.state.handle = recording  # type: ignore[method-assign]
        comms: list[Comm] = []
        try:
            node = await connect(address, token)
            driver = await connect(address, token)
            worker = await connect(address, token)
            comms += [node, driver, worker]
            for c in comms:
                asyncio.ensure_future(c.run(lambda *a: None))
            r = await node.request({"op": "register_node", "node_id": "n-test", "version":
                                    __version__, "address": "", "resources": {"CPU": 1}})
            assert r["ok"]
            await driver.request({"op": "register_client", "kind": "driver", "pid": 1})
            await worker.request({"op": "register_client", "kind": "worker", "pid": 2})
            tid = b"t" * 16
            node.send({"op": "submit", "tasks": [{"tid": tid, "fid": b"f" * 16, "nret": 1,
                                                  "deps": [], "name": "x"}]})
            driver.send({"op": "task_done", "tid": tid, "status": "ok", "results": [],
                         "retryable": False})
            worker.send({"op": "heartbeat", "stats": {"evil": True}})
            for c in comms:  # each connection is still served
                answer = await asyncio.wait_for(c.request({"op": "counts"}), 30)
                assert answer["result"]["tasks"] == 0
            assert not {"submit", "task_done", "heartbeat"} & set(seen), seen
            assert "evil" not in head.state.nodes["n-test"].info
        finally:
            for c in comms:
                c.close()
            head.stop()
    asyncio.run(scenario())
    for op in ("submit", "task_done", "heartbeat"):
        assert _refused(caplog, op), op


# ------------------------------------------------------------------ a fake head
class FakeHead:
    """A head that answers registrations and records what it is sent, on
    its own thread (so blocking clients and subprocesses can use it)."""

    def __init__(self, token: bytes | None = None) -> None:
        self.token = token or secrets.token_hex(16).encode()
        self.got: "queue.Queue[tuple[Comm, dict]]" = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, port = self.call(serve(self.token, self._on_comm, "127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{port}"
        self.comms: list[Comm] = []

    def call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _on_comm(self, comm: Comm) -> None:
        self.comms.append(comm)
        await comm.run(self._on_msg)

    def _on_msg(self, comm: Comm, msg: dict, frames: list) -> None:
        if msg["op"] in ("register_node", "register_client"):
            comm.reply(msg, ok=True, client_id="c1", node_id="n-fake", nodes=[], session_dir="",
                       version=__version__)
        self.got.put((comm, msg))

    def send(self, comm: Comm, msg: dict) -> None:
        self.loop.call_soon_threadsafe(comm.send, msg)

    def wait_for(self, op: str, timeout: float = 60.0) -> tuple[Comm, dict, list[str]]:
        """The next message with ``op`` (and the ops seen before it)."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            comm, msg = self.got.get(timeout=max(0.1, deadline - time.monotonic()))
            if msg["op"] == op:
                return comm, msg, before
            before.append(msg["op"])

    def close(self) -> None:
        async def _close() -> None:
            for c in self.comms:
                c.close()
            self.server.close()
        self.call(_close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ------------------------------------------------------------------ a node
@pytest.mark.timeout(180)
def test_node_refuses_ops_outside_each_senders_role(tmp_path):
    """The head may not send a node a client's op; a peer that did not
    register may not use the store; a driver may not register as a worker.
    Each refusal leaves the connection answering."""
    head = FakeHead()
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowcore.node.cli", head.address, "--token", head.token.decode(),
         "--num-cpus", "0", "--object-store-memory", str(64 << 20), "--state-dir",
         str(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        comm, reg, _ = head.wait_for("register_node")
        # from the head: a client's op (it would be answered), then a head op
        head.send(comm, {"op": "stats", "rid": 999})
        head.send(comm, {"op": "local_query", "tids": [b"q" * 16]})
        _, verdict, before = head.wait_for("local_verdict")
        assert verdict["started"] is False
        assert "reply" not in before, before  # the stats request was not answered

        async def on_port() -> None:
            peer = await connect(reg["address"], head.token)
            driver = await connect(reg["address"], head.token)
            try:
                for c in (peer, driver):
                    asyncio.ensure_future(c.run(lambda *a: None))
                create = peer.request({"op": "create", "oid": b"o" * 20, "size": 8})
                stats = await asyncio.wait_for(peer.request({"op": "stats"}), 30)
                assert "store" in stats and not create.done()
                await driver.request({"op": "register_client", "pid": os.getpid()})
                as_worker = driver.request({"op": "register_worker", "wid": "w-x", "pid": 1})
                stats = await asyncio.wait_for(driver.request({"op": "stats"}), 30)
                assert "store" in stats and not as_worker.done()
                create.cancel()
                as_worker.cancel()
            finally:
                peer.close()
                driver.close()
        asyncio.run(on_port())
        head.send(comm, {"op": "shutdown"})
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        head.close()
    text = (tmp_path / "node.log").read_text()
    for op, role in (("stats", "head"), ("create", "peer"), ("register_worker", "driver")):
        assert f"refused op {op!r} from {role}" in text, (op, text[-3000:])


# ------------------------------------------------------------------ a client
@pytest.mark.timeout(120)
def test_client_refuses_ops_outside_its_heads_and_nodes_roles(caplog):
    """A driver refuses from its head an op only a node sends a worker, and
    from its node an op only the head sends; a handler that raises has what
    it queued dropped."""
    caplog.set_level(logging.WARNING)
    head = FakeHead()
    node = FakeHead(head.token)  # the client's node, as far as the client can tell
    client = None
    try:
        client = CoreClient(head.address, head.token, node.address)
        got_node: list[dict] = []
        client.on_node_message = got_node.append
        client.start()
        hcomm, _, _ = head.wait_for("register_client")
        ncomm, _, _ = node.wait_for("register_client")
        acked = threading.Event()
        client._acks[7] = lambda pending: acked.set()

        def failing(msg: dict) -> None:
            client.send("head", {"op": "incref", "oids": [b"x" * 20]})
            raise RuntimeError("a handler failed half-way")
        client._head_ops["warning"] = failing
        head.send(hcomm, {"op": "exit"})        # node -> worker only
        head.send(hcomm, {"op": "warning", "text": "boom"})
        head.send(hcomm, {"op": "subscribed", "ack": 7, "pending": 0})
        assert acked.wait(30), "the head connection stopped being served"
        node.send(ncomm, {"op": "object_ready", "oid": b"y" * 20})  # head -> client only
        node.send(ncomm, {"op": "cancel", "tid": b"z" * 16})
        deadline = time.monotonic() + 30
        while not got_node and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m["op"] for m in got_node] == ["cancel"]
        client.send("head", {"op": "decref", "oids": [b"d" * 20]})
        _, _, before = head.wait_for("decref")
        assert "incref" not in before  # what the failing handler queued was dropped
    finally:
        if client is not None:
            client.close()
        head.close()
        node.close()
    assert _refused(caplog, "exit") and _refused(caplog, "object_ready")
    assert any("dropped 1 message" in r.getMessage() and "'warning'" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------ guarded
def test_a_raising_node_handler_sends_nothing_it_queued():
    async def scenario() -> None:
        token = secrets.token_bytes(16)
        got: list[str] = []
        received = asyncio.Event()

        def handler(comm: Comm, msg: dict, frames: list) -> None:
            comm.send({"op": "half"})
            if msg["op"] == "bad":
                raise ValueError("half a decision")
            comm.send({"op": "whole"})

        server, port = await serve(token, lambda c: c.run(
            lambda c, m, f: guarded("test", handler, c, m, f)), "127.0.0.1", 0)

        def on_msg(c: Comm, m: dict, f: list) -> None:
            got.append(m["op"])
            if m["op"] == "whole":
                received.set()
        comm = await connect(f"127.0.0.1:{port}", token)
        asyncio.ensure_future(comm.run(on_msg))
        try:
            comm.send({"op": "bad"})
            comm.send({"op": "good"})
            await asyncio.wait_for(received.wait(), 30)
            assert got == ["half", "whole"]
        finally:
            comm.close()
            server.close()
    asyncio.run(scenario())


# ------------------------------------------------------------------ an actor's listener
@flowcore.remote
class Echo:
    def echo(self, x):
        return x


@pytest.mark.timeout(180)
def test_actor_listener_refuses_ops_a_caller_may_not_send():
    from flowcore.context import require_client as _require_client
    flowcore.init(num_cpus=1)
    try:
        driver = _require_client()
        a = Echo.remote()

        def direct_calls() -> int:
            return driver.query("counts").get("direct_calls", 0)
        for _ in range(2000):  # the first calls go through the head while it connects
            before = direct_calls()
            assert flowcore.get(a.echo.remote(1), timeout=60) == 1
            if direct_calls() > before:
                break
        else:
            raise AssertionError("no call went directly to the actor")
        key = "actor:" + a._aid.hex()
        with driver._call_lock:
            driver._direct_write(key, {"op": "submit", "tasks": []})
        before = direct_calls()
        assert flowcore.get(a.echo.remote(2), timeout=60) == 2
        assert direct_calls() > before  # the same connection still takes calls
        assert key in driver._dconns
        logs = glob.glob(os.path.join(driver.session_dir, "logs", "worker-*.log"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any("refused op 'submit' from caller" in open(p).read() for p in logs):
                break
            time.sleep(0.1)
            logs = glob.glob(os.path.join(driver.session_dir, "logs", "worker-*.log"))
        else:
            raise AssertionError("the actor did not log the refusal")
    finally:
        flowcore.shutdown()
