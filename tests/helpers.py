"""Test helpers in the h11 style: sessions joined in memory, driven by hand, with a
dict-backed item source standing in for the store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mesh.envelope import Envelope, Receipt
from mesh.noise import generate_keypair
from mesh.routing import KIND_ENVELOPE, KIND_RECEIPT, KIND_TOMBSTONE, RoutingPolicy
from mesh.session import (
    EnvelopeReceived,
    LinkSession,
    ReceiptReceived,
    SessionConfig,
    SessionEvent,
)


@dataclass
class MemItem:
    id: bytes
    kind: str
    ts: int
    data: bytes | None
    expires_at: float
    hops_left: int = 0
    stamp_bits: int = 0
    local: bool = False
    size: int = 0


@dataclass
class MemorySource:
    """The least a node needs for the session: items by id, receipts purge envelopes."""

    items: dict[bytes, MemItem] = field(default_factory=dict)
    received_order: list[bytes] = field(default_factory=list)
    receipts: set[bytes] = field(default_factory=set)

    def sync_keys(self) -> list[tuple[int, bytes]]:
        return sorted((i.ts, i.id) for i in self.items.values())

    def get_item(self, item_id: bytes) -> MemItem | None:
        return self.items.get(item_id)

    def add_envelope(self, env: Envelope, now: float, *, local: bool = False) -> bool:
        if env.id in self.items:
            return False
        if env.receipt_hash in self.receipts:
            self.items[env.id] = MemItem(env.id, KIND_TOMBSTONE, env.created_min, None,
                                         env.dedup_until())
            return True
        hops = env.hops_left if local else RoutingPolicy.hops_to_store(env)
        self.items[env.id] = MemItem(
            env.id, KIND_ENVELOPE, env.created_min, env.with_mutable(hops_left=hops).to_bytes(),
            now + env.ttl_left_s, hops, env.stamp_bits, local, env.size)
        return True

    def add_receipt(self, receipt: Receipt, now: float) -> bool:
        if receipt.id in self.items:
            return False
        self.items[receipt.id] = MemItem(receipt.id, KIND_RECEIPT, receipt.issued_min,
                                         receipt.to_bytes(), receipt.keep_until(), size=20)
        self.receipts.add(receipt.answers)
        for item in list(self.items.values()):
            if item.kind == KIND_ENVELOPE and item.data is not None:
                env = Envelope.from_bytes(item.data)
                if env.receipt_hash == receipt.answers:
                    self.items[item.id] = MemItem(item.id, KIND_TOMBSTONE, item.ts, None,
                                                  env.dedup_until())
        return True

    def handle(self, session: LinkSession, event: SessionEvent, now: float) -> None:
        """What a node does with an arriving item: store it, then acknowledge."""
        if isinstance(event, EnvelopeReceived):
            self.received_order.append(event.envelope.id)
            self.add_envelope(event.envelope, now)
            session.acknowledge(event.envelope.id)
        elif isinstance(event, ReceiptReceived):
            self.received_order.append(event.receipt.id)
            self.add_receipt(event.receipt, now)
            session.acknowledge(event.receipt.id)


def make_envelope(i: int, *, created_min: int = 29_000_000, body_len: int = 60,
                  ttl_s: int = 86_400, hops: int = 8, receipt_secret: bytes | None = None,
                  ) -> Envelope:
    from mesh.envelope import KIND_DIRECT, receipt_hash
    secret = receipt_secret if receipt_secret is not None else i.to_bytes(16, "big")
    body = (i.to_bytes(8, "big") * (body_len // 8 + 1))[:body_len]
    return Envelope(kind=KIND_DIRECT, created_min=created_min + i % 1000, ttl_s=ttl_s,
                    receipt_hash=receipt_hash(secret), body=body, hops_left=hops,
                    ttl_left_s=ttl_s)


def session_pair(src_a: MemorySource, src_b: MemorySource, now: float,
                 config: SessionConfig | None = None) -> tuple[LinkSession, LinkSession]:
    a = LinkSession(initiator=True, static=generate_keypair(), source=src_a, now=now,
                    config=config, rng=os.urandom)
    b = LinkSession(initiator=False, static=generate_keypair(), source=src_b, now=now,
                    config=config, rng=os.urandom)
    return a, b


def drive(a: LinkSession, b: LinkSession, src_a: MemorySource, src_b: MemorySource,
          now: float, *, max_steps: int = 100_000, byte_budget: int | None = None,
          ) -> tuple[list[SessionEvent], list[SessionEvent]]:
    """Shuttle bytes until both sides are quiet; returns the events each side saw.

    ``byte_budget`` cuts the link (drops everything after) once that many bytes moved,
    to simulate a disconnect mid-transfer."""
    events_a: list[SessionEvent] = []
    events_b: list[SessionEvent] = []
    moved = 0
    for _ in range(max_steps):
        progressed = False
        for me, peer, src, log in ((a, b, src_a, events_a), (b, a, src_b, events_b)):
            while (event := me.next_event()) is not None:
                log.append(event)
                src.handle(me, event, now)
                progressed = True
            data = me.data_to_send(now)
            if data:
                if byte_budget is not None and moved + len(data) > byte_budget:
                    peer.receive_data(data[:byte_budget - moved], now)  # the cut lands mid-record
                    for side, src, log in ((a, src_a, events_a), (b, src_b, events_b)):
                        while (event := side.next_event()) is not None:
                            log.append(event)
                            src.handle(side, event, now)
                    return events_a, events_b
                moved += len(data)
                peer.receive_data(data, now)
                progressed = True
        if not progressed:
            return events_a, events_b
    raise AssertionError("sessions did not go quiet")
