"""Routing policy: what a node offers a peer, in which order, and how headers change per hop.

Kept apart from the session so the simulator can swap policies (epidemic,
spray-and-wait, Pigeon's default) while running the same session code. Pure: every
decision takes ``now`` and an item view; nothing here touches a store or a socket.

The default order follows DESIGN section 5: receipts first (they delete copies
everywhere and are tiny), then envelopes by proof-of-work stamp (higher first), then
newest first, because in a blackout the newest messages are the likeliest to still
matter and the oldest are the likeliest to have been delivered by another path.

No copy budget by default. Spray-and-wait's budget works because a holder whose copies
are spent hands the message only to its destination; a Pigeon relay cannot tell whom a
sealed envelope is for, so a spent copy must still be offered to every peer (only the
recipient, by opening it, finds out), which trades stored copies for airtime and, with
fewer carriers, loses delivery. The simulator measures it (``pigeon-budget`` in
``mesh/sim/policies.py``; figures in ``docs/simulation.md`` and
``docs/benchmarks/NOTES.md``). What limits a flood here is the hop limit, the lifetime,
and receipts, which delete copies wherever they reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mesh.envelope import (
    HEADER_LEN,
    MAX_HOPS,
    MUTABLE_LEN,
    Envelope,
    patch_mutable,
    ttl_s_of,
)

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
        """Rewrite the mutable header for this hop: remaining lifetime by our clock.

        Stored envelope bytes were checked when they arrived (or were sealed here), so the
        five bytes of ``hops_left`` and ``ttl_left_s`` are patched in place rather than
        parsing and re-encoding the whole envelope for every item sent on every link.
        """
        data = item.data
        assert data is not None and len(data) >= HEADER_LEN + MUTABLE_LEN
        ttl_left = max(0, min(ttl_s_of(data), int(item.expires_at - now)))
        return patch_mutable(data, hops_left=min(item.hops_left, MAX_HOPS), ttl_left_s=ttl_left)

    @staticmethod
    def hops_to_store(received: Envelope) -> int:
        """The hop budget a receiver keeps: one hop was just spent reaching it."""
        return max(0, received.hops_left - 1)
