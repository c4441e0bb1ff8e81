"""TCP links to static peers (host:port) and a listener for incoming ones."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

from mesh.errors import UserError

READ_CHUNK = 65536


class TcpLink:
    """A connected TCP stream. ``write`` waits for the kernel buffer to drain."""

    transport = "tcp"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 transport: str = "tcp") -> None:
        self._reader = reader
        self._writer = writer
        self.transport = transport
        peer = writer.get_extra_info("peername")
        self.address = format_addr(peer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def read(self) -> bytes:
        try:
            return await self._reader.read(READ_CHUNK)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def write_nowait(self, data: bytes) -> None:
        """Hand bytes to the kernel now (buffered in order with ``write``), without waiting
        for the buffer to drain. The node uses it to forward before a commit; the
        session's flow-control window bounds how much that can queue."""
        if self._writer.is_closing():
            raise ConnectionError("link closed")
        self._writer.write(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()


def format_addr(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to a tuple; a clear UserError otherwise."""
    value = text.strip()
    host, sep, port_text = value.rpartition(":")
    if value.startswith("[") and "]" in value:
        host = value[1:value.index("]")]
        rest = value[value.index("]") + 1:]
        sep, port_text = (":", rest[1:]) if rest.startswith(":") else ("", "")
    if not sep:
        if default_port is None:
            raise UserError(f"{text!r} is not HOST:PORT")
        host, port_text = value, str(default_port)
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"{text!r}: port must be a number") from None
    if not 0 <= port <= 65535 or not host:
        raise UserError(f"{text!r} is not a valid HOST:PORT")
    return host, port


async def connect_tcp(host: str, port: int, timeout: float = 10.0) -> TcpLink:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    return TcpLink(reader, writer)


async def listen_tcp(
    host: str, port: int, on_link: Callable[[TcpLink], Awaitable[None]],
) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await on_link(TcpLink(reader, writer))

    return await asyncio.start_server(handle, host, port, reuse_address=True)
