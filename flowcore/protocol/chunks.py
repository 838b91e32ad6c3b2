"""Reading an object from a node in chunks over a message connection: the
``fetch_chunk`` requests, several in flight, answered with the bytes as an
out-of-band frame.  Used by nodes pulling from each other (the chunked path)
and by client-mode drivers reading from their node."""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

from ..exceptions import ObjectLostError
from .comm import Comm

CHUNK = 4 << 20       # bytes per request
WINDOW = 8            # requests in flight


async def fetch_chunks(comm: Comm, oid: bytes, size: int,
                       write: Callable[[int, memoryview], None],
                       chunk: int = CHUNK, window: int = WINDOW) -> None:
    """Read ``size`` bytes of ``oid`` from the peer, calling ``write(offset,
    data)`` for each chunk in order; ``ObjectLostError`` if the peer cannot."""
    pending: deque[tuple[int, asyncio.Future]] = deque()
    offset = 0
    while offset < size or pending:
        while offset < size and len(pending) < window:
            n = min(chunk, size - offset)
            pending.append((offset, comm.request(
                {"op": "fetch_chunk", "oid": oid, "start": offset, "length": n})))
            offset += n
        start, fut = pending.popleft()
        reply = await fut
        if "error" in reply:
            raise ObjectLostError(reply["error"])
        write(start, reply["_data"][0])
