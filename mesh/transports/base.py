"""The small interface every transport implements: a reliable, ordered byte stream.

Borrowed from Reticulum's one good idea (pluggable interfaces) without its globals: a
transport only moves bytes between two nodes; the session above does the protocol.
"""

from __future__ import annotations

from typing import Protocol


class Link(Protocol):
    """One open byte stream to a peer."""

    #: Short medium name shown to users: "tcp", "lan", "ble", "memory", "bundle".
    transport: str
    #: Where the peer is, for logs and status (host:port, BLE address, "memory").
    address: str

    async def read(self) -> bytes:
        """Next chunk of bytes; ``b""`` once the peer closed or the link broke."""
        ...

    async def write(self, data: bytes) -> None:
        """Send bytes; waits while the medium is congested (this is the backpressure)."""
        ...

    def close(self) -> None:
        """Close now; idempotent; never raises."""
        ...
