"""The worker's client pump (client/inline.py) on real sockets, when the
handling of a lost connection pumps (a head reconnection reads every
connection while it waits for the head's reply): what that nested round
read is seen by the waiting thread at once, and the outer round reads no
connection the nested one emptied.  Both once left a leased task unrun
after a head restart (the worker sat in select, or in a blocking read)."""
from __future__ import annotations

import socket
import threading
from typing import Callable

import pytest

from flowcore.client.inline import InlineClient
from flowcore.protocol import frames
from flowcore.protocol.blocking import BlockingConn

pytestmark = pytest.mark.timeout(60)


def _pair() -> tuple[socket.socket, socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    peer = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    return peer, accepted


def _returns(client: InlineClient, pred: Callable[[], bool]) -> bool:
    """Whether ``_wait_until(pred)`` (no timeout) returns, as a run loop
    waits; bounded by an event, not a sleep (a stuck loop is woken after)."""
    done = threading.Event()

    def run_loop() -> None:
        client._wait_until(pred, None)
        done.set()
    t = threading.Thread(target=run_loop, daemon=True)
    t.start()
    returned = done.wait(30)
    if not returned:
        client.close()  # (wakes a loop stuck in select; a stuck read ends with the sockets)
    return returned


def test_what_a_nested_round_delivered_ends_the_wait():
    """A write found the head gone; its loss handling pumped and queued the
    task the run loop waits for: no select after it."""
    client = InlineClient("127.0.0.1:1", b"t", "127.0.0.1:1", wid="w-test")
    quiet_peer, quiet = _pair()      # an open connection with nothing to read
    dead_peer, dead = _pair()
    tasks: list[str] = []
    try:
        client.conns["caller:1"] = BlockingConn.accepted(quiet, "peer", False)
        lost = BlockingConn.accepted(dead, "peer", False)
        lost.closed = True           # a write found the peer gone
        client.conns["head"] = lost

        def conn_lost(conn: BlockingConn, which: str) -> None:
            conn.reported = True  # type: ignore[attr-defined]
            client.pump(0)            # as the reconnection's wait for the reply does
            tasks.append("run_task")  # what it read meanwhile
        client._conn_lost = conn_lost  # type: ignore[method-assign]
        assert _returns(client, lambda: bool(tasks)), \
            "the run loop blocked in select with its task queued"
    finally:
        client.close()
        client.loop.close()
        quiet_peer.close()
        dead_peer.close()


def test_a_connection_emptied_by_a_nested_round_is_not_read_again():
    """One select reports the head's end and a caller's message; handling
    the head's end pumps and reads the message: the outer round must not
    read that caller's (blocking) socket again."""
    client = InlineClient("127.0.0.1:1", b"t", "127.0.0.1:1", wid="w-test")
    head_peer, head = _pair()
    caller_peer, caller = _pair()
    seen: list[str] = []
    try:
        client.conns["head"] = BlockingConn.accepted(head, "peer", False)
        client.conns["caller:1"] = BlockingConn.accepted(caller, "peer", False)
        head_peer.close()  # the head went away
        caller_peer.sendall(b"".join(bytes(b) for b in frames.encode([{"op": "not_a_call"}])))

        def conn_lost(conn: BlockingConn, which: str) -> None:
            conn.reported = True  # type: ignore[attr-defined]
            seen.append(which)
            client.pump(0)  # reads (and refuses) the caller's message
        client._conn_lost = conn_lost  # type: ignore[method-assign]
        assert _returns(client, lambda: bool(seen)), \
            "the outer round blocked reading a socket the nested round emptied"
        assert seen == ["head"]
    finally:
        client.close()
        client.loop.close()
        caller_peer.close()
