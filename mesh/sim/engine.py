"""Discrete-event simulator: many nodes, one virtual clock, the real link protocol.

Every contact runs two real ``LinkSession`` objects: the Noise XX handshake, range-based
reconciliation, the transfer with its acks and flow-control window, live pushes and pings
all happen exactly as on a TCP or BLE link, with the routing policy plugged in the way
``mesh.node`` plugs it in. Only the world around them is simulated:

* the clock is virtual (seconds since the start, offset to a fixed wall-clock epoch so
  envelope timestamps look real);
* each node's store is a ``MemStore`` (the sync-set rules of ``mesh.store``, no disk);
* a link is a full-duplex pipe with ``bandwidth`` bytes per second in each direction.
  A direction pulls ``data_to_send`` only when it is idle, as a transport with a small
  send buffer would, so the session's own priority order decides what goes next; bytes
  are delivered in chunks of about one second of airtime, so the receiver sees progress
  (and keeps its idle timer fed) during a long transfer; when a contact ends mid-chunk
  the peer gets the prefix that had been transmitted by then;
* what a node does with arriving items mirrors ``Node._take_envelope`` /
  ``_take_receipt``: store with ``hops_to_store`` hops, acknowledge after storing,
  offer what is new on every other live link; the recipient keeps a tombstone and
  releases the receipt.

Sealing. Each message is sealed once, for real (``seal_direct``, Noise X), when it is
created, and the recipient opens it for real (``open_direct``) to recover the receipt
secret. What is replaced is the trial decryption every *other* node does on every
envelope it receives (it always fails for them): the engine knows which node each
envelope is for and skips the doomed attempt. That is one X25519 per envelope per hop
saved, and it changes no decision any node makes.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.envelope import DEFAULT_HOPS, Envelope, Receipt, minutes
from mesh.identity import Identity
from mesh.noise import KeyPair, generate_keypair
from mesh.sealing import open_direct, seal_direct
from mesh.session import (
    EnvelopeReceived,
    LinkClosed,
    LinkSession,
    ReceiptReceived,
    ReconcileCompleted,
    SessionConfig,
)
from mesh.sim.contacts import ContactEvent
from mesh.sim.load import MessageEvent
from mesh.sim.memstore import MemStore
from mesh.sim.policies import (
    INITIAL_COPIES,
    POLICY_NAMES,
    make_policy,
    split_copies,
)
from mesh.sim.report import SimStats
from mesh.store import ORIGIN_SELF, AddResult

__all__ = ["EPOCH", "SimConfig", "SimError", "Simulation", "run_simulation"]

log = logging.getLogger("pigeon.sim")

#: Wall-clock time of virtual t = 0 (2026-01-01 UTC): envelopes carry plausible minutes.
EPOCH = 1_767_225_600.0

_CONTACT, _MESSAGE, _CHUNK, _TIMER, _SERVICE, _SAMPLE, _SWEEP = range(7)


class SimError(RuntimeError):
    """The simulation itself went wrong (a bug, not bad input)."""


@dataclass(frozen=True)
class SimConfig:
    duration: float
    policy: str = "pigeon"
    bandwidth: int = 250_000
    buffer: int = 5_000_000
    seed: int = 1
    neighbour_share: float = 1.0
    session: SessionConfig = field(default_factory=SessionConfig)
    #: The ONE's BufferOccupancyReport snapshots every 5 s by default.
    occupancy_interval: float = 5.0
    #: How often every node sweeps expired items (``mesh.node`` does it every minute).
    sweep_interval: float = 60.0
    hops: int = DEFAULT_HOPS

    def check(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICY_NAMES)}")
        if not 0 < self.duration <= 10 * 365 * 86_400:
            raise ValueError("duration must be positive and at most ten years")
        if self.bandwidth <= 0 or self.buffer <= 0:
            raise ValueError("bandwidth and buffer must be positive")


@dataclass
class _Message:
    event: MessageEvent
    envelope_id: bytes
    size: int
    created: float
    delivered: float | None = None


class _Node:
    __slots__ = ("hops", "identity", "index", "link_key", "origin", "sides", "store")

    def __init__(self, index: int, identity: Identity, link_key: KeyPair, store: MemStore) -> None:
        self.index = index
        self.origin = str(index)  # how its neighbours' stores name it (per-neighbour quota)
        self.identity = identity
        self.link_key = link_key
        self.store = store
        #: Hops each held message took to get here (0 at its source), for hop counts.
        self.hops: dict[bytes, int] = {}
        self.sides: dict[int, _Side] = {}  # peer index -> our end of the live link


class _Side:
    """One end of a live link: our session plus the outgoing direction's state."""

    __slots__ = ("armed", "busy", "chunk_start", "link", "node", "out", "peer", "pos", "queued",
                 "session")

    def __init__(self, node: _Node, session: LinkSession, link: _Link) -> None:
        self.node = node
        self.session = session
        self.link = link
        self.peer: _Side | None = None
        self.out = b""  # bytes being transmitted in this direction
        self.pos = 0  # how many of them the peer has received
        self.busy = False
        self.chunk_start = 0.0
        self.armed: float | None = None  # the one timer entry in the queue that counts
        self.queued = False  # a service entry is in the queue


class _Link:
    __slots__ = ("a", "b", "up")

    def __init__(self) -> None:
        self.up = True
        self.a: _Side
        self.b: _Side


class Simulation:
    """One run. Build it, call ``run()``, read ``stats``. Deterministic in ``config.seed``."""

    def __init__(
        self, config: SimConfig, *, nodes: int, contacts: Sequence[ContactEvent],
        messages: Sequence[MessageEvent],
    ) -> None:
        config.check()
        self.config = config
        rng = random.Random(f"{config.seed}/keys")
        self._rand: Callable[[int], bytes] = rng.randbytes
        self._hop_rng = random.Random(f"{config.seed}/hops")
        self.nodes = [
            _Node(i, Identity.generate(f"node{i}", rng.randbytes), generate_keypair(rng.randbytes),
                  MemStore(quota_bytes=config.buffer, neighbour_share=config.neighbour_share))
            for i in range(nodes)
        ]
        self.stats = SimStats(nodes=nodes, duration=config.duration, policy=config.policy,
                              bandwidth=config.bandwidth, buffer=config.buffer)
        self._messages: dict[bytes, _Message] = {}
        #: Oracle for spray-and-wait: envelope id -> destination node.
        self._destinations: dict[bytes, int] = {}
        self._queue: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.now = 0.0
        self._chunk = max(512, min(65_536, config.bandwidth))
        for c in contacts:
            if c.b >= nodes:
                raise ValueError(f"contact with host {c.b}, but there are only {nodes} nodes")
            if c.time < config.duration:
                self._push(c.time, _CONTACT, c)
        for m in messages:
            if max(m.sender, m.recipient) >= nodes:
                raise ValueError(f"message {m.name} names a host beyond {nodes - 1}")
            if m.time < config.duration:
                self._push(m.time, _MESSAGE, m)
        self._push(0.0, _SAMPLE, None)
        self._push(config.sweep_interval, _SWEEP, None)

    # ---- the loop --------------------------------------------------------------------

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def run(self) -> SimStats:
        started, cpu_started = time.perf_counter(), time.process_time()
        queue, end = self._queue, self.config.duration
        handlers: dict[int, Callable[[Any], None]] = {
            _CONTACT: self._on_contact, _MESSAGE: self._on_message, _CHUNK: self._on_chunk,
            _TIMER: self._on_timer, _SERVICE: self._on_service, _SAMPLE: self._on_sample,
            _SWEEP: self._on_sweep,
        }
        events = 0
        while queue and queue[0][0] < end:
            at, _, kind, payload = heapq.heappop(queue)
            self.now = at
            handlers[kind](payload)
            events += 1
        self.now = end
        for node in self.nodes:  # contacts still up at the end are cut, as in The ONE
            for side in list(node.sides.values()):
                self._link_down(side.link)
        self.stats.events = events
        self.stats.runtime_s = time.perf_counter() - started
        self.stats.cpu_s = time.process_time() - cpu_started
        return self.stats

    @property
    def wall(self) -> float:
        return EPOCH + self.now

    # ---- contacts --------------------------------------------------------------------

    def _on_contact(self, c: ContactEvent) -> None:
        na, nb = self.nodes[c.a], self.nodes[c.b]
        existing = na.sides.get(c.b)
        if not c.up:
            if existing is not None:
                self._link_down(existing.link)
            return
        if existing is not None:
            return  # a second "up" for a live contact changes nothing
        self.stats.contacts += 1
        wall = self.wall
        na.store.sweep(wall)
        nb.store.sweep(wall)
        link = _Link()
        link.a = self._new_side(na, nb, link, initiator=True)
        link.b = self._new_side(nb, na, link, initiator=False)
        link.a.peer, link.b.peer = link.b, link.a
        na.sides[nb.index] = link.a
        nb.sides[na.index] = link.b
        self._service(link.a)

    def _new_side(self, node: _Node, peer: _Node, link: _Link, *, initiator: bool) -> _Side:
        policy = make_policy(self.config.policy, store=node.store, peer=peer.index,
                             destinations=self._destinations)
        session = LinkSession(initiator=initiator, static=node.link_key, source=node.store,
                              now=self.wall, policy=policy, config=self.config.session,
                              rng=self._rand)
        return _Side(node, session, link)

    def _link_down(self, link: _Link) -> None:
        if not link.up:
            return
        link.up = False
        partials = []
        for side in (link.a, link.b):
            if side.busy and side.peer is not None:
                # The peer got whatever was on the air before the contact ended.
                sent = int((self.now - side.chunk_start) * self.config.bandwidth)
                partials.append((side.peer, side.out[side.pos:side.pos + max(0, sent)]))
        for receiver, partial in partials:
            if partial and not receiver.session.closed:
                self.stats.wire_bytes += len(partial)
                receiver.session.receive_data(partial, self.wall)
                self._drain(receiver)
        for side in (link.a, link.b):
            side.busy = False
            if not side.session.closed:
                side.session.close("link lost")
            self._drain(side)
            peer = side.peer
            if peer is not None:
                side.node.sides.pop(peer.node.index, None)

    # ---- bytes on the air ------------------------------------------------------------

    def _service(self, side: _Side) -> None:
        """Handle events, start transmitting if idle, and keep the session's timer armed."""
        self._drain(side)
        if not side.link.up:
            return
        if not side.busy:
            data = side.session.data_to_send(self.wall)
            self._drain(side)
            if data:
                side.out, side.pos, side.busy = data, 0, True
                side.chunk_start = self.now
                self._push(self.now + min(len(data), self._chunk) / self.config.bandwidth,
                           _CHUNK, side)
        timer = side.session.get_timer()
        if timer is not None:
            at = max(timer - EPOCH, self.now)
            if side.armed is None or at < side.armed:
                side.armed = at
                self._push(at, _TIMER, (side, at))

    def _on_chunk(self, side: _Side) -> None:
        if not side.link.up or not side.busy:
            return
        chunk = side.out[side.pos:side.pos + self._chunk]
        side.pos += len(chunk)
        self.stats.wire_bytes += len(chunk)
        peer = side.peer
        assert peer is not None
        peer.session.receive_data(chunk, self.wall)
        if side.pos < len(side.out):
            side.chunk_start = self.now
            remaining = min(len(side.out) - side.pos, self._chunk)
            self._push(self.now + remaining / self.config.bandwidth, _CHUNK, side)
        else:
            side.busy, side.out = False, b""
        self._service(peer)
        self._service(side)

    def _on_timer(self, entry: tuple[_Side, float]) -> None:
        side, at = entry
        if side.armed != at:
            return  # superseded by an earlier entry
        side.armed = None
        if not side.link.up:
            return
        timer = side.session.get_timer()
        if timer is None:
            return
        if timer - EPOCH > self.now:
            self._service(side)  # re-arms at the later time
            return
        side.session.handle_timer(self.wall)
        self._service(side)

    def _on_service(self, side: _Side) -> None:
        side.queued = False
        if side.link.up:
            self._service(side)

    # ---- node behaviour --------------------------------------------------------------

    def _drain(self, side: _Side) -> None:
        session = side.session
        new_ids: list[bytes] = []
        closed = False
        while (event := session.next_event()) is not None:
            if isinstance(event, EnvelopeReceived):
                stored = self._take_envelope(side, event.envelope, new_ids)
                if not session.closed:
                    session.acknowledge(event.envelope.id, stored=stored)
            elif isinstance(event, ReceiptReceived):
                self._take_receipt(side.node, event.receipt, new_ids)
                if not session.closed:
                    session.acknowledge(event.receipt.id)
            elif isinstance(event, ReconcileCompleted):
                if side is side.link.a:
                    self.stats.reconcile_round_trips.append(event.round_trips)
            elif isinstance(event, LinkClosed):
                closed = True
                if event.error:
                    self.stats.link_errors += 1
                    log.debug("link %d-%d failed: %s", side.node.index,
                              side.peer.node.index if side.peer else -1, event.reason)
        if new_ids:
            self._offer(side.node, new_ids)
        if closed and side.link.up:
            self._link_down(side.link)

    def _offer(self, node: _Node, ids: list[bytes]) -> None:
        for other in node.sides.values():
            if not other.session.closed:
                other.session.offer(ids)
                if not other.busy and not other.queued:
                    other.queued = True  # serviced once the current event is done
                    self._push(self.now, _SERVICE, other)

    def _take_receipt(self, node: _Node, receipt: Receipt, new_ids: list[bytes]) -> None:
        is_new, purged = node.store.add_receipt(receipt, now=self.wall)
        if is_new:
            new_ids.append(receipt.id)
            self.stats.receipts_stored += 1
            self.stats.purged += len(purged)

    def _take_envelope(self, side: _Side, env: Envelope, new_ids: list[bytes]) -> bool:
        node, store = side.node, side.node.store
        eid = env.id
        if store.has(eid):
            return True
        msg = self._messages.get(eid)
        if msg is None:
            raise SimError("an envelope nobody created arrived")
        assert side.peer is not None
        sender = side.peer.node
        hops = sender.hops.get(eid, 0) + 1
        if msg.event.recipient == node.index:
            self._deliver(node, env, msg, hops, new_ids)
            return True
        if self.config.policy == "pigeon-budget" and sender.store.copies.get(eid, 1) <= 1:
            # A spent copy travels only to find its recipient; we are not it (we could
            # not open it), so it is declined, not kept (see mesh/sim/policies.py).
            self.stats.declined += 1
            return False
        result = store.add_envelope(env, now=self.wall, origin=sender.origin,
                                    hops_left=side.session.policy.hops_to_store(env))
        if result == AddResult.STORED:
            new_ids.append(eid)
            node.hops[eid] = hops
            self.stats.relayed += 1
            self.stats.envelope_bytes_relayed += env.size
            if self.config.policy in INITIAL_COPIES:
                split_copies(sender.store, store, eid)
            return True
        if result in (AddResult.DUPLICATE, AddResult.ANSWERED):
            return True
        self.stats.refused += 1
        return False

    def _deliver(self, node: _Node, env: Envelope, msg: _Message, hops: int,
                 new_ids: list[bytes]) -> None:
        """The recipient opens it for real, keeps a tombstone and releases the receipt."""
        opened = open_direct(node.identity, env)
        if opened is None:
            raise SimError(f"recipient could not open {msg.event.name}")
        wall = self.wall
        node.store.add_envelope(env, now=wall, origin=ORIGIN_SELF, local=True)
        node.store.delete_envelope(env.id, now=wall)
        receipt = Receipt(secret=opened.receipt_secret, issued_min=minutes(wall))
        self._take_receipt(node, receipt, new_ids)
        self.stats.relayed += 1
        self.stats.envelope_bytes_relayed += env.size
        if msg.delivered is None:
            msg.delivered = self.now
            self.stats.record_delivery(self.now - msg.created, hops, env.size, self.now)

    def _on_message(self, m: MessageEvent) -> None:
        sender, recipient = self.nodes[m.sender], self.nodes[m.recipient]
        wall = self.wall
        # Senders start a few hops low, as ``mesh.chat`` does, so a first copy looks relayed.
        hops = self.config.hops - self._hop_rng.randrange(4)
        env, _secret = seal_direct(sender.identity, recipient.identity.public, "x" * m.size,
                                   now=wall, ttl_s=m.ttl_s, hops=hops, rng=self._rand)
        self._messages[env.id] = _Message(m, env.id, env.size, self.now)
        self._destinations[env.id] = m.recipient
        sender.store.add_envelope(env, now=wall, origin=ORIGIN_SELF, local=True)
        sender.hops[env.id] = 0
        copies = INITIAL_COPIES.get(self.config.policy)
        if copies is not None:
            sender.store.copies[env.id] = copies
        self.stats.created += 1
        self.stats.created_bytes += env.size
        self._offer(sender, [env.id])

    def _on_sample(self, _: None) -> None:
        total = sum(min(100.0, 100.0 * n.store.envelope_bytes / self.config.buffer)
                    for n in self.nodes)
        self.stats.occupancy_samples.append(total / len(self.nodes))
        self._push(self.now + self.config.occupancy_interval, _SAMPLE, None)

    def _on_sweep(self, _: None) -> None:
        wall = self.wall
        for node in self.nodes:
            node.store.sweep(wall)
        self._push(self.now + self.config.sweep_interval, _SWEEP, None)


def run_simulation(
    config: SimConfig, *, nodes: int, contacts: Sequence[ContactEvent],
    messages: Sequence[MessageEvent],
) -> SimStats:
    return Simulation(config, nodes=nodes, contacts=contacts, messages=messages).run()
