"""In-process links for tests and examples: two queues joined back to back."""

from __future__ import annotations

import asyncio
import contextlib


class MemoryLink:
    """One end of an in-memory pipe. ``write`` blocks when the peer's queue is full."""

    transport = "memory"

    def __init__(self, inbox: asyncio.Queue[bytes], outbox: asyncio.Queue[bytes], address: str) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self.address = address
        self._closed = False
        self.peer: MemoryLink | None = None

    async def read(self) -> bytes:
        if self._closed:
            return b""
        data = await self._inbox.get()
        if not data:
            self._closed = True
        return data

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionError("link closed")
        if data:
            await self._outbox.put(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for queue in (self._outbox, self._inbox):
            try:
                queue.put_nowait(b"")  # EOF for the reader on either side
            except asyncio.QueueFull:
                _drain_one(queue)
                queue.put_nowait(b"")


def _drain_one(queue: asyncio.Queue[bytes]) -> None:
    with contextlib.suppress(asyncio.QueueEmpty):
        queue.get_nowait()


def memory_pipe(name_a: str = "a", name_b: str = "b", depth: int = 64) -> tuple[MemoryLink, MemoryLink]:
    """Two connected ends; ``depth`` chunks may be in flight each way before writers wait."""
    a_to_b: asyncio.Queue[bytes] = asyncio.Queue(depth)
    b_to_a: asyncio.Queue[bytes] = asyncio.Queue(depth)
    a = MemoryLink(inbox=b_to_a, outbox=a_to_b, address=f"mem-{name_b}")
    b = MemoryLink(inbox=a_to_b, outbox=b_to_a, address=f"mem-{name_a}")
    a.peer, b.peer = b, a
    return a, b
