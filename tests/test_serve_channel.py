"""The proxy <-> replica HTTP channel authenticates both ends before either
unpickles a frame, and caps frame sizes."""
import asyncio
import os
import pickle
import struct

import pytest

from flowcore.serve import channel


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _echo_http(payload):
    scope, body = pickle.loads(payload)
    return channel.ANS_HTTP, pickle.dumps(("full", 200, [], body))


_echo = {channel.OP_HTTP: _echo_http}


def test_channel_round_trip_with_the_right_secret():
    async def main():
        secret = os.urandom(32)
        server, addr = await channel.serve(_echo, "127.0.0.1", secret)
        ch = channel.Channel(addr, secret)
        try:
            return await ch.call({"path": "/"}, b"hello")
        finally:
            ch.close()
            server.close()
            await server.wait_closed()
    assert run(main()) == ("full", 200, [], b"hello")


def test_proxy_refuses_a_peer_that_does_not_know_the_secret():
    """A process squatting on a replica's old port cannot feed the proxy
    pickles: it must prove the secret before the proxy reads an answer."""
    unpickled = []

    async def impostor(reader, writer):
        writer.write(os.urandom(16))
        await reader.readexactly(48)
        # claims success but cannot prove the secret; then offers a pickle
        writer.write(b"\x01" + os.urandom(32))
        data = pickle.dumps(("full", 200, [], b"evil"))
        writer.write(struct.pack("!IQB", len(data), 0, channel.ANS_HTTP) + data)
        await writer.drain()

    async def main():
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()[:2]
        ch = channel.Channel(addr, os.urandom(32))
        try:
            with pytest.raises(channel.ChannelClosed, match="secret|not the replica"):
                unpickled.append(await ch.call({"path": "/"}, b"x"))
        finally:
            ch.close()
            server.close()
            await server.wait_closed()
    run(main())
    assert unpickled == []


def test_replica_refuses_a_wrong_secret_and_oversized_frames():
    async def main():
        secret = os.urandom(32)
        server, addr = await channel.serve(_echo, "127.0.0.1", secret)
        try:
            # wrong secret: refused with 0 and closed
            r, w = await asyncio.open_connection(*addr)
            await r.readexactly(16)
            w.write(os.urandom(48))
            assert await r.readexactly(1) == b"\x00"
            assert await r.read() == b""
            w.close()
            # right secret, then a length prefix over the cap: closed, nothing read
            r, w = await asyncio.open_connection(*addr)
            nonce = await r.readexactly(16)
            mine = os.urandom(16)
            w.write(channel._proof(secret, b"proxy", nonce) + mine)
            assert await r.readexactly(1) == b"\x01"
            assert await r.readexactly(32) == channel._proof(secret, b"replica", mine)
            w.write(struct.pack("!IQB", channel.MAX_FRAME + 1, 0, channel.OP_HTTP))
            assert await r.read() == b""
            w.close()
        finally:
            server.close()
            await server.wait_closed()
    run(main())
