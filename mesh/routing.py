"""Routing policy: what a node offers a peer, in which order, and how headers change per hop.

Kept apart from the session so the simulator can swap policies (epidemic,
spray-and-wait, Pigeon's default) while running the same session code. Pure: every
decision takes ``now`` and an item view; nothing here touches a store or a socket.

The default order follows DESIGN section 5: receipts first (they delete copies
everywhere and are tiny), then envelopes by proof-of-work stamp (higher first), then
newest first, because in a blackout the newest messages are the likeliest to still
matter and the oldest are the likeliest to have been delivered by another path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mesh.envelope import MAX_HOPS, Envelope

KIND_ENVELOPE = "envelope"
KIND_RECEIPT = "receipt"
KIND_TOMBSTONE = "tombstone"


class ItemView(Protocol):
    """What the session needs to know about one stored item (the store's row satisfies it)."""

    @property
    def id(self) -> bytes: ...
    @property
    def kind(self) -> str: ...
    @property
    def ts(self) -> int: ...
    @property
    def data(self) -> bytes | None: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def hops_left(self) -> int: ...
    @property
    def stamp_bits(self) -> int: ...
    @property
    def local(self) -> bool: ...
    @property
    def size(self) -> int: ...


class SyncSource(Protocol):
    """Read access to the items a node holds, as the session needs it."""

    def sync_keys(self) -> list[tuple[int, bytes]]: ...
    def get_item(self, item_id: bytes) -> ItemView | None: ...


@dataclass(frozen=True)
class RoutingPolicy:
    """Pigeon's default policy: flood within hop and lifetime limits, receipts first."""

    name: str = "pigeon"

    def may_offer(self, item: ItemView, now: float) -> bool:
        """Tombstones are never sent; envelopes need hops and lifetime left."""
        if item.kind == KIND_RECEIPT:
            return item.data is not None and item.expires_at > now
        if item.kind != KIND_ENVELOPE or item.data is None:
            return False
        if item.expires_at - now < 1:
            return False
        return item.local or item.hops_left > 0

    def priority(self, item: ItemView) -> tuple[int, int, int]:
        """Sort key, smallest first."""
        if item.kind == KIND_RECEIPT:
            return (0, 0, -item.ts)
        return (1, -item.stamp_bits, -item.ts)

    def outgoing_envelope(self, item: ItemView, now: float) -> bytes:
        """Rewrite the mutable header for this hop: remaining lifetime by our clock."""
        assert item.data is not None
        env = Envelope.from_bytes(item.data)
        ttl_left = max(0, min(env.ttl_s, int(item.expires_at - now)))
        return env.with_mutable(hops_left=min(item.hops_left, MAX_HOPS), ttl_left_s=ttl_left).to_bytes()

    @staticmethod
    def hops_to_store(received: Envelope) -> int:
        """The hop budget a receiver keeps: one hop was just spent reaching it."""
        return max(0, received.hops_left - 1)
