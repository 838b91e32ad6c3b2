"""Token authentication: the HMAC challenge as pure functions, then real
sockets on 127.0.0.1 through ``comm.serve`` / ``comm.connect``.

Socket tests run in a fresh asyncio loop each, bounded by ``asyncio.wait_for``
and close every server, comm and raw socket they open.  Nothing waits on the
clock: progress is awaited through events (a log handler that signals, the
server-side connection handler finishing).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Awaitable, Callable

import msgpack
import pytest

from flowcore.exceptions import AuthenticationError
from flowcore.protocol import auth, frames
from flowcore.protocol.comm import Comm, connect, serve

TOKEN = b"correct horse battery staple"
OTHER = b"wrong token"


# ====================================================================== pure functions
def handshake(server_token: bytes, client_token: bytes) -> tuple[bytes | None, bool]:
    hello, snonce = auth.server_hello()
    got_snonce = auth.parse_server_hello(hello)
    assert got_snonce == snonce
    proof, cnonce = auth.client_proof(client_token, got_snonce)
    accepted = auth.check_client_proof(server_token, snonce, proof)
    sproof = auth.server_proof(server_token, cnonce, snonce)
    return accepted, auth.check_server_proof(client_token, cnonce, snonce, sproof)


def test_right_token_passes_both_ways() -> None:
    hello, snonce = auth.server_hello()
    assert len(hello) == auth.SERVER_HELLO and hello.startswith(auth.MAGIC)
    proof, cnonce = auth.client_proof(TOKEN, snonce)
    assert len(proof) == auth.CLIENT_PROOF and proof[:auth.NONCE] == cnonce
    assert auth.check_client_proof(TOKEN, snonce, proof) == cnonce
    sproof = auth.server_proof(TOKEN, cnonce, snonce)
    assert len(sproof) == auth.SERVER_PROOF and sproof[0] == 1
    assert auth.check_server_proof(TOKEN, cnonce, snonce, sproof) is True


def test_wrong_token_fails_in_both_directions() -> None:
    # server does not accept a client with the wrong token ...
    accepted, _ = handshake(TOKEN, OTHER)
    assert accepted is None
    # ... and a client does not accept a server with the wrong token
    _, server_ok = handshake(OTHER, TOKEN)
    assert server_ok is False
    assert handshake(TOKEN, TOKEN)[1] is True


def test_nonces_are_fresh() -> None:
    assert len({auth.server_hello()[1] for _ in range(20)}) == 20
    assert len({auth.client_proof(TOKEN, b"n" * 32)[1] for _ in range(20)}) == 20


@pytest.mark.parametrize("pos", [0, 1, 31, 32, 33, 50, 63])
def test_tampered_client_proof_is_refused(pos: int) -> None:
    _, snonce = auth.server_hello()
    proof, _ = auth.client_proof(TOKEN, snonce)
    bad = bytearray(proof)
    bad[pos] ^= 0x01
    assert auth.check_client_proof(TOKEN, snonce, bytes(bad)) is None


@pytest.mark.parametrize("pos", [1, 16, 32])
def test_tampered_server_proof_is_refused(pos: int) -> None:
    snonce, cnonce = os.urandom(32), os.urandom(32)
    sproof = bytearray(auth.server_proof(TOKEN, cnonce, snonce))
    sproof[pos] ^= 0x80
    assert auth.check_server_proof(TOKEN, cnonce, snonce, bytes(sproof)) is False


@pytest.mark.parametrize("data", [b"", b"x" * (auth.CLIENT_PROOF - 1),
                                  b"x" * (auth.CLIENT_PROOF + 1)])
def test_client_proof_of_wrong_length_is_refused(data: bytes) -> None:
    assert auth.check_client_proof(TOKEN, b"s" * 32, data) is None


def test_client_proof_is_bound_to_the_server_nonce() -> None:
    proof, _ = auth.client_proof(TOKEN, b"a" * 32)
    assert auth.check_client_proof(TOKEN, b"b" * 32, proof) is None  # no replay


def test_server_proof_checks() -> None:
    snonce, cnonce = os.urandom(32), os.urandom(32)
    good = auth.server_proof(TOKEN, cnonce, snonce)
    assert auth.check_server_proof(TOKEN, cnonce, snonce, good)
    # refusal, wrong status byte, wrong lengths, swapped nonces
    assert not auth.check_server_proof(TOKEN, cnonce, snonce, auth.REFUSAL)
    assert not auth.check_server_proof(TOKEN, cnonce, snonce, b"\x00" + good[1:])
    assert not auth.check_server_proof(TOKEN, cnonce, snonce, b"\x02" + good[1:])
    assert not auth.check_server_proof(TOKEN, cnonce, snonce, good[:-1])
    assert not auth.check_server_proof(TOKEN, cnonce, snonce, good + b"\x00")
    assert not auth.check_server_proof(TOKEN, cnonce, snonce, b"")
    assert not auth.check_server_proof(TOKEN, snonce, cnonce, good)
    # the client's own proof cannot be reflected back as the server's
    proof, c2 = auth.client_proof(TOKEN, snonce)
    assert not auth.check_server_proof(TOKEN, c2, snonce, b"\x01" + proof[auth.NONCE:])


@pytest.mark.parametrize("hello,match", [
    (b"", "greeting"),
    (b"FLOWCORE", "greeting"),
    (b"FLOWCORX" + b"\x01" + b"n" * 32, "greeting"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 13, "greeting"),
    (auth.MAGIC + b"\x01" + b"n" * 31, "greeting"),
    (auth.MAGIC + b"\x01" + b"n" * 33, "greeting"),
    (auth.MAGIC + b"\x02" + b"n" * 32, "version 2"),
    (auth.MAGIC + b"\x00" + b"n" * 32, "version 0"),
])
def test_bad_greeting_or_version_is_refused(hello: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        auth.parse_server_hello(hello)


def test_token_bytes() -> None:
    assert auth.token_bytes("abc") == b"abc"
    assert auth.token_bytes(b"raw") == b"raw"
    for bad in ("", None, 123):
        with pytest.raises(ValueError):
            auth.token_bytes(bad)  # type: ignore[arg-type]


# ====================================================================== the two sides as steps
def run_challenge(server: auth.ServerChallenge, client: auth.ClientChallenge) -> None:
    """Carry the bytes between the two sides as a link would."""
    proof = client.receive(server.hello)
    assert len(proof) == auth.CLIENT_PROOF and client.need == auth.SERVER_PROOF
    answer = server.answer(proof)
    assert client.receive(answer) == b""


def test_challenge_objects_pass_with_the_same_token() -> None:
    server, client = auth.ServerChallenge(TOKEN), auth.ClientChallenge(TOKEN, "peer:1")
    assert server.need == auth.CLIENT_PROOF and client.need == auth.SERVER_HELLO
    run_challenge(server, client)
    assert server.accepted and client.done and client.greeted and client.need == 0


def test_challenge_objects_refuse_either_wrong_side() -> None:
    server, client = auth.ServerChallenge(TOKEN), auth.ClientChallenge(OTHER, "peer:1")
    with pytest.raises(AuthenticationError, match="peer:1 refused the token"):
        run_challenge(server, client)
    assert not server.accepted and not client.done
    server, client = auth.ServerChallenge(OTHER), auth.ClientChallenge(TOKEN, "peer:2")
    proof = client.receive(server.hello)
    answer = server.answer(proof)
    assert answer == auth.REFUSAL  # the server refuses the client's proof first
    # a server that pretends to accept cannot prove it knows the client's token
    impostor = b"\x01" + answer[1:]
    with pytest.raises(AuthenticationError, match="peer:2 failed to prove"):
        client.receive(impostor)


def test_client_challenge_words_for_bad_greetings_and_hang_ups() -> None:
    with pytest.raises(AuthenticationError, match="not a flowcore server"):
        auth.ClientChallenge(TOKEN, "p").receive(b"HTTP/1.1 400 Bad" + bytes(25))
    with pytest.raises(AuthenticationError, match="requires TLS"):
        auth.ClientChallenge(TOKEN, "p").receive(auth.TLS_REQUIRED)
    client = auth.ClientChallenge(TOKEN, "p")
    assert "before greeting" in str(client.hung_up())
    assert "refused this process's certificate" in str(client.hung_up(tls=True))
    client.receive(auth.ServerChallenge(TOKEN).hello)
    assert "during authentication" in str(client.hung_up(tls=True))


# ====================================================================== sockets
def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Run one async test body in a fresh loop, bounded in time."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


class WarningRecorder(logging.Handler):
    """Collects warnings of ``flowcore.comm`` and wakes whoever waits for one."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    async def wait_for(self, n: int) -> None:
        while len(self.records) < n:
            self.changed.clear()
            await self.changed.wait()

    def texts(self) -> list[str]:
        return [r.getMessage() for r in self.records]


class EchoServer:
    """``serve`` with an echo handler; remembers every authenticated comm."""

    def __init__(self, token: bytes = TOKEN, limits: frames.Limits = frames.DEFAULT_LIMITS):
        self.token = token
        self.limits = limits
        self.comms: list[Comm] = []
        self.received: list[dict] = []
        self.frames: list[list[bytes]] = []
        self.ended: list[Comm] = []
        self.ended_changed = asyncio.Event()
        self.log = WarningRecorder()
        self.server: Any = None
        self.port = 0

    async def __aenter__(self) -> "EchoServer":
        logging.getLogger("flowcore.comm").addHandler(self.log)
        self.server, self.port = await serve(self.token, self._on_comm, "127.0.0.1", 0,
                                             name="test-server", limits=self.limits)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            self.server.close()
            for c in self.comms:
                c.close()
            await self.wait_ended(len(self.comms))
            await self.server.wait_closed()
        finally:
            logging.getLogger("flowcore.comm").removeHandler(self.log)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def _on_comm(self, comm: Comm) -> None:
        self.comms.append(comm)
        try:
            await comm.run(self._handle)
        finally:
            self.ended.append(comm)
            self.ended_changed.set()

    def _handle(self, comm: Comm, msg: dict, bufs: list) -> None:
        self.received.append(msg)
        self.frames.append([bytes(b) for b in bufs])
        if msg["op"] == "echo":
            comm.reply(msg, value=msg.get("value"), nframes=len(bufs))

    async def wait_ended(self, n: int) -> None:
        while len(self.ended) < n:
            self.ended_changed.clear()
            await self.ended_changed.wait()


class Client:
    """A connected comm with its reader running; closes cleanly."""

    def __init__(self, comm: Comm):
        self.comm = comm
        self.reader = asyncio.ensure_future(comm.run(lambda c, m, b: None))

    async def echo(self, value: Any) -> dict:
        return await self.comm.request({"op": "echo", "value": value})

    async def close(self) -> None:
        self.comm.close()
        await self.reader


async def good_round_trip(srv: EchoServer, value: Any = "hello") -> None:
    client = Client(await connect(srv.address, TOKEN))
    try:
        reply = await client.echo(value)
        assert reply["op"] == "reply" and reply["value"] == value
    finally:
        await client.close()


async def raw_authenticated(port: int, token: bytes = TOKEN
                            ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain socket that passes the challenge by hand (like a foreign client)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    snonce = auth.parse_server_hello(await reader.readexactly(auth.SERVER_HELLO))
    proof, cnonce = auth.client_proof(token, snonce)
    writer.write(proof)
    answer = await reader.readexactly(auth.SERVER_PROOF)
    assert auth.check_server_proof(token, cnonce, snonce, answer)
    return reader, writer


async def raw_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      msg: dict) -> dict:
    """Send one message as a batch on a raw socket and read one batch back."""
    writer.write(b"".join(frames.encode([msg])))
    (n,) = frames.PREFIX.unpack(await reader.readexactly(frames.PREFIX.size))
    (reply,), _ = frames.decode_body(await reader.readexactly(n))
    return reply


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


def test_right_token_round_trip_with_frames() -> None:
    async def body() -> None:
        async with EchoServer() as srv:
            client = Client(await connect(srv.address, TOKEN))
            try:
                assert (await client.echo([1, "two", b"three"]))["value"] == [1, "two", b"three"]
                client.comm.send_with_frames({"op": "blob"}, [b"abc", memoryview(b"de")])
                reply = await client.echo("after")  # same stream: blob came first
                assert reply["value"] == "after"
                blob = srv.received[1]
                assert blob["op"] == "blob" and blob["_frames"] == [0, 1]
                assert srv.frames[1] == [b"abc", b"de"]
            finally:
                await client.close()
            assert len(srv.comms) == 1 and srv.log.records == []
    run(body)


def test_connect_accepts_plain_host_port() -> None:
    async def body() -> None:
        async with EchoServer() as srv:
            client = Client(await connect(f"127.0.0.1:{srv.port}", TOKEN))
            try:
                assert (await client.echo(1))["value"] == 1
            finally:
                await client.close()
    run(body)


def test_wrong_token_is_refused_with_one_warning_and_server_keeps_serving() -> None:
    async def body() -> None:
        async with EchoServer() as srv:
            with pytest.raises(AuthenticationError, match="refused the token"):
                await connect(srv.address, OTHER)
            await srv.log.wait_for(1)
            await good_round_trip(srv)
            await good_round_trip(srv, value=2)
            assert len(srv.log.records) == 1
            (text,) = srv.log.texts()
            assert "refused connection" in text and "wrong or missing token" in text
            # the refused peer never got a Comm: nothing of it was decoded
            assert len(srv.comms) == 2
            assert [m["value"] for m in srv.received] == ["hello", 2]
    run(body)


def test_garbage_instead_of_a_proof_is_refused_without_decoding() -> None:
    async def body() -> None:
        async with EchoServer() as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            try:
                hello = await reader.readexactly(auth.SERVER_HELLO)
                assert hello.startswith(auth.MAGIC)
                # a msgpack batch where the proof should be: must not be decoded
                writer.write(b"".join(frames.encode([{"op": "echo", "value": 1}])).ljust(
                    auth.CLIENT_PROOF, b"\x00")[:auth.CLIENT_PROOF])
                assert await reader.readexactly(auth.SERVER_PROOF) == auth.REFUSAL
                assert await reader.read() == b""  # the server closed
            finally:
                await close_writer(writer)
            await srv.log.wait_for(1)
            await good_round_trip(srv)
            assert len(srv.comms) == 1 and len(srv.received) == 1
    run(body)


def test_peer_hanging_up_during_handshake_is_dropped_quietly() -> None:
    async def body() -> None:
        async with EchoServer() as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            await reader.readexactly(auth.SERVER_HELLO)
            writer.write(b"short")
            await close_writer(writer)
            await good_round_trip(srv)
            assert len(srv.comms) == 1
            assert srv.log.records == []
    run(body)


def _batch(header: bytes) -> bytes:
    meta = frames.NFRAMES.pack(1) + frames.FRAME_LEN.pack(len(header))
    return frames.PREFIX.pack(len(meta) + len(header)) + meta + header


MALFORMED_AFTER_AUTH = {
    "random bytes": random.Random(0).randbytes(64),
    "huge declared length": b"\xff" * 16,
    "body shorter than a frame table": frames.PREFIX.pack(3) + b"abc",
    "header not a list": _batch(msgpack.packb({"op": "echo"})),
    "message without op": _batch(msgpack.packb([{"value": 1}])),
    "op not a string": _batch(msgpack.packb([{"op": 1}])),
    "garbage msgpack": _batch(b"\xc1\xc1"),
    "frame lengths disagree": frames.PREFIX.pack(20) + frames.NFRAMES.pack(1)
    + frames.FRAME_LEN.pack(100) + b"\x90" * 8,
}


@pytest.mark.parametrize("data", list(MALFORMED_AFTER_AUTH.values()),
                         ids=list(MALFORMED_AFTER_AUTH))
def test_malformed_batch_after_auth_closes_connection_server_keeps_serving(data: bytes) -> None:
    async def body() -> None:
        async with EchoServer() as srv:
            reader, writer = await raw_authenticated(srv.port)
            try:
                # a well-formed message first: it is handled and answered
                reply = await raw_request(reader, writer, {"op": "echo", "rid": 1, "value": 7})
                assert reply == {"op": "reply", "rid": 1, "value": 7, "nframes": 0}
                writer.write(data)
                assert await reader.read() == b""  # the server hung up on us
            finally:
                await close_writer(writer)
            await srv.wait_ended(1)
            await srv.log.wait_for(1)
            assert "closing connection" in srv.log.texts()[0]
            assert [m["op"] for m in srv.received] == ["echo"]
            await good_round_trip(srv)
            assert len(srv.log.records) == 1
    run(body)


def test_oversized_batch_is_refused_by_limits() -> None:
    async def body() -> None:
        async with EchoServer(limits=frames.Limits(max_body=1024)) as srv:
            reader, writer = await raw_authenticated(srv.port)
            try:
                writer.write(b"".join(frames.encode([{"op": "big", "pad": "x" * 2000}])))
                assert await reader.read() == b""
            finally:
                await close_writer(writer)
            await srv.log.wait_for(1)
            assert "exceeds" in srv.log.texts()[0]
            assert srv.received == []
            await good_round_trip(srv)
    run(body)


# ---------------------------------------------------------------- fake servers
async def fake_server(script: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]
                      ) -> tuple[asyncio.AbstractServer, int, asyncio.Event]:
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
            await reader.read()  # until the client hangs up
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], done


async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Knows the protocol but not the token: a valid greeting, a made-up proof,
    then a well-formed batch the client must never decode."""
    hello, _ = auth.server_hello()
    writer.write(hello)
    await reader.readexactly(auth.CLIENT_PROOF)
    writer.write(b"\x01" + os.urandom(auth.DIGEST))
    writer.write(b"".join(frames.encode([{"op": "shutdown"}])))


async def wrong_token_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Runs the real server side of the challenge, with another token."""
    hello, snonce = auth.server_hello()
    writer.write(hello)
    data = await reader.readexactly(auth.CLIENT_PROOF)
    cnonce = data[:auth.NONCE]  # pretends to accept
    writer.write(auth.server_proof(OTHER, cnonce, snonce))


async def refuser(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    hello, _ = auth.server_hello()
    writer.write(hello)
    await reader.readexactly(auth.CLIENT_PROOF)
    writer.write(auth.REFUSAL)


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + b" " * 64)


async def future_version(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(auth.MAGIC + bytes([auth.VERSION + 1]) + os.urandom(auth.NONCE))


async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    hello, _ = auth.server_hello()
    writer.write(hello[:10])
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("script,match", [
    (impostor, "failed to prove"),
    (wrong_token_server, "failed to prove"),
    (refuser, "refused the token"),
    (http_server, "not a flowcore server"),
    (future_version, "wire version"),
    (hangs_up, "closed the connection"),
], ids=["impostor", "wrong-token-server", "refusal", "http", "version", "hang-up"])
def test_connect_raises_authentication_error_against_a_bad_server(script: Any,
                                                                  match: str) -> None:
    async def body() -> None:
        server, port, done = await fake_server(script)
        try:
            with pytest.raises(AuthenticationError, match=match):
                await connect(f"tcp://127.0.0.1:{port}", TOKEN, timeout=10)
            await done.wait()  # the fake server sees the client hang up
        finally:
            server.close()
            await server.wait_closed()
    run(body)


def test_connect_to_a_closed_port_is_a_connection_error() -> None:
    async def body() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectionError, match="cannot reach"):
            await connect(f"tcp://127.0.0.1:{port}", TOKEN, timeout=5)
    run(body)
