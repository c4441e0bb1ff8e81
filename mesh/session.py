"""The sans-IO link session: Noise XX, then reconcile, then transfer, then live push.

Shaped like aioquic's connection: three inputs (``receive_data(data, now)``,
``handle_timer(now)`` and the command methods) and three outputs
(``data_to_send(now)``, ``next_event()``, ``get_timer()``). It never reads the clock and
never touches a socket or the disk: stored items are read through a ``SyncSource`` and
everything received leaves as an event. The runtime commits received items and only
then calls ``acknowledge``, so an Ack on the wire always means "on disk".

Any rule a peer breaks raises ``RemoteProtocolError`` internally; the session then sends
a ``Close`` (when it can), moves to CLOSED and emits ``LinkClosed(error=True)``. Nothing
a peer sends can make it raise to the caller.

Stream layout: the initiator's first record is ``MAGIC || version || Noise msg1``; every
record is ``u16 length || bytes`` (``wire.StreamFramer``); after the handshake each record
is one Noise transport message carrying one padded frame.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from mesh import wire
from mesh.envelope import Envelope, Receipt
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.noise import CipherState, HandshakeState, KeyPair
from mesh.reconcile import ReconcileMessage, Reconciler
from mesh.routing import KIND_RECEIPT, RoutingPolicy, SyncSource

PROLOGUE = b"pigeon-link/"
#: Each round is bounded by the frame cap; small (BLE-sized) frames need many rounds for
#: large differences (1 KiB frames: ~330 messages measured), so the cap is generous.
MAX_RECONCILE_ROUNDS = 1024
MAX_PEER_HAS = 1_000_000
#: Handshake records are small (XX with a Hello payload is under 200 bytes); a peer that
#: announces more before authenticating is not speaking Pigeon, so say so at once instead
#: of waiting for the handshake timeout.
MAX_HANDSHAKE_RECORD = 512
#: The smallest frame limit a peer may announce: one maximal envelope must fit in a frame.
MIN_PEER_FRAME = 17_000
#: Items offered while a reconciliation runs are remembered up to this many; beyond it
#: the next reconciliation (every reconnect) finds them anyway.
MAX_EARLY_OFFERS = 100_000


@dataclass(frozen=True)
class SessionConfig:
    handshake_timeout: float = 10.0
    #: Send a ping after this long without sending anything.
    ping_interval: float = 3.0
    #: Close after this long without receiving anything (a vanished peer).
    idle_timeout: float = 10.0
    #: Bytes of pushed items that may be unacknowledged at once (flow control).
    window_bytes: int = 512 * 1024
    #: Largest frame we send or accept; BLE links may lower it.
    max_frame: int = wire.MAX_FRAME
    reconcile_max_bytes: int = 60_000
    #: Hello feature flags; 1 = relays for others.
    features: int = 1


# ---- events -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HandshakeCompleted:
    """The Noise handshake finished; ``remote_key`` is the peer's link key (not its identity)."""

    remote_key: bytes
    handshake_hash: bytes


@dataclass(frozen=True, kw_only=True)
class ReconcileCompleted:
    """Both sides now know what to send. ``to_send``: ids we hold that the peer lacks (this
    side learned); ``wanted``: ids we asked the peer for."""

    to_send: int
    wanted: int
    round_trips: int


@dataclass(frozen=True, kw_only=True)
class TransferPlanned:
    """The peer announced how many items it is about to push."""

    count: int


@dataclass(frozen=True, kw_only=True)
class EnvelopeReceived:
    """An envelope arrived; the runtime must store it and then call ``acknowledge``."""

    envelope: Envelope


@dataclass(frozen=True, kw_only=True)
class ReceiptReceived:
    """A receipt arrived; the runtime must store it and then call ``acknowledge``."""

    receipt: Receipt


@dataclass(frozen=True, kw_only=True)
class ItemDropped:
    """An item was well-formed but refused before reaching the runtime (e.g. too old)."""

    item_id: bytes
    reason: str


@dataclass(frozen=True, kw_only=True)
class ItemsAcknowledged:
    """The peer committed these ids to its disk (``refused``: it dropped them on purpose)."""

    ids: tuple[bytes, ...]
    refused: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class SyncProgressed:
    """Counts since the link came up, for progress bars."""

    sent: int
    received: int
    to_send: int
    to_receive: int


@dataclass(frozen=True, kw_only=True)
class SyncCompleted:
    """Both directions drained after reconciliation; from now on only live pushes flow."""

    sent: int
    received: int


@dataclass(frozen=True, kw_only=True)
class LinkClosed:
    """The session is over. ``error``: the peer broke a rule (``reason`` says which) or timed out."""

    reason: str
    error: bool


SessionEvent = (
    HandshakeCompleted | ReconcileCompleted | TransferPlanned | EnvelopeReceived
    | ReceiptReceived | ItemDropped | ItemsAcknowledged | SyncProgressed | SyncCompleted
    | LinkClosed
)


class State(Enum):
    HANDSHAKE = "handshake"
    RECONCILING = "reconciling"
    TRANSFERRING = "transferring"
    LIVE = "live"
    CLOSED = "closed"


class LinkSession:
    """One link to one peer, over any reliable ordered byte stream."""

    def __init__(
        self, *, initiator: bool, static: KeyPair, source: SyncSource, now: float,
        policy: RoutingPolicy | None = None, config: SessionConfig | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.initiator = initiator
        self.config = config or SessionConfig()
        self.policy = policy or RoutingPolicy()
        self._source = source
        self._static = static
        self._rng = rng
        self.state = State.HANDSHAKE
        self._framer = wire.StreamFramer(max_record=MAX_HANDSHAKE_RECORD)
        self._out = bytearray()
        self._events: deque[SessionEvent] = deque()
        self._hs: HandshakeState | None = None
        self._send_cs: CipherState | None = None
        self._recv_cs: CipherState | None = None
        self._handshake_deadline = now + self.config.handshake_timeout
        self._last_received = now
        self._last_sent = now
        self._now = now
        self.remote_key: bytes | None = None
        self._frame_cap = self.config.max_frame
        # reconciliation
        self._reconciler: Reconciler | None = None
        self._early_offers: list[bytes] = []
        self.reconcile_rounds = 0
        # transfer
        self._queue: list[tuple[tuple[int, int, int], int, bytes]] = []
        self._queued: set[bytes] = set()
        self._seq = 0
        self._in_flight: dict[bytes, int] = {}
        self._in_flight_bytes = 0
        self._served: set[bytes] = set()
        self._peer_has: set[bytes] = set()
        self._pending_acks: list[bytes] = []
        self._pending_refused: list[bytes] = []
        self._awaiting_commit: set[bytes] = set()
        self._wants_seen = 0
        self._peer_idle_wants = -1
        self._idle_sent = False
        self._sync_done = False
        self._ping_nonce = 0
        self.sent_items = 0
        self.received_items = 0
        self._to_send = 0
        self._to_receive = 0
        self._progress_dirty = False
        self.bytes_sent = 0
        self.bytes_received = 0
        if initiator:
            preamble = wire.MAGIC + bytes([wire.PROTOCOL_VERSION])
            self._hs = HandshakeState(
                "XX", True, prologue=PROLOGUE + preamble, s=static, rng=rng,
            )
            self._emit_record(preamble + self._hs.write_message(b""))

    # ---- outputs -----------------------------------------------------------------

    def data_to_send(self, now: float) -> bytes:
        """Bytes for the transport; fills item frames up to the flow-control window."""
        self._now = now
        if self.state in (State.TRANSFERRING, State.LIVE):
            self._flush_acks()
            self._fill_items()
            self._maybe_idle()
            self._check_complete()
        data = bytes(self._out)
        self._out.clear()
        if data:
            self._last_sent = now
            self.bytes_sent += len(data)
        return data

    def next_event(self) -> SessionEvent | None:
        if self._progress_dirty:
            self._progress_dirty = False
            self._events.append(SyncProgressed(
                sent=self.sent_items, received=self.received_items,
                to_send=self._to_send, to_receive=self._to_receive,
            ))
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self.state == State.CLOSED:
            return None
        if self.state == State.HANDSHAKE:
            return self._handshake_deadline
        return min(self._last_sent + self.config.ping_interval,
                   self._last_received + self.config.idle_timeout)

    @property
    def closed(self) -> bool:
        return self.state == State.CLOSED

    # ---- inputs ------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        if self.state == State.CLOSED or not data:
            return
        self._now = now
        self._last_received = now
        self.bytes_received += len(data)
        try:
            for record in self._framer.feed(data):
                self._handle_record(record)
                if self.closed:
                    return
        except RemoteProtocolError as exc:
            self._fail(exc.reason)

    def handle_timer(self, now: float) -> None:
        self._now = now
        if self.state == State.CLOSED:
            return
        if self.state == State.HANDSHAKE:
            if now >= self._handshake_deadline:
                self._fail("handshake timed out")
            return
        if now >= self._last_received + self.config.idle_timeout:
            self._fail("peer silent")
            return
        if now >= self._last_sent + self.config.ping_interval:
            self._ping_nonce = (self._ping_nonce + 1) & 0xFFFFFFFF
            self._send_frame(wire.Ping(nonce=self._ping_nonce))
            self._last_sent = now

    # ---- commands ----------------------------------------------------------------

    def acknowledge(self, item_id: bytes, *, stored: bool = True) -> None:
        """The runtime has committed (``stored``) or deliberately dropped an item we received."""
        if item_id not in self._awaiting_commit:
            raise LocalProtocolError("acknowledging an item this link did not deliver")
        self._awaiting_commit.discard(item_id)
        (self._pending_acks if stored else self._pending_refused).append(item_id)

    def offer(self, item_ids: Iterable[bytes]) -> None:
        """Items that appeared locally after reconciliation: push them if the peer may lack them."""
        if self.state == State.CLOSED:
            return
        if self.state not in (State.TRANSFERRING, State.LIVE):
            # The reconciliation snapshot may predate them; queue them once it is done.
            room = MAX_EARLY_OFFERS - len(self._early_offers)
            self._early_offers.extend(list(item_ids)[:max(0, room)])
            return
        added = sum(self._enqueue(item_id) for item_id in item_ids)
        self._to_send += added
        self._progress_dirty = self._progress_dirty or bool(added)

    def close(self, reason: str = "closing") -> None:
        if self.state == State.CLOSED:
            return
        if self._send_cs is not None:
            self._send_frame(wire.Close(reason=reason))
        self.state = State.CLOSED
        self._events.append(LinkClosed(reason=reason, error=False))

    # ---- internals: records and handshake ------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.state == State.CLOSED:
            return
        if self._send_cs is not None:
            with contextlib.suppress(Exception):  # closing anyway; never raise from here
                self._send_frame(wire.Close(reason=reason))
        self.state = State.CLOSED
        self._events.append(LinkClosed(reason=reason, error=True))

    def _emit_record(self, record: bytes) -> None:
        self._out += wire.StreamFramer.encode(record)

    def _send_frame(self, frame: wire.Frame) -> None:
        assert self._send_cs is not None
        plaintext = wire.pad_plaintext(wire.encode_frame(frame))
        self._emit_record(self._send_cs.encrypt(plaintext))

    def _hello(self) -> bytes:
        return wire.encode_frame(wire.Hello(
            version=wire.PROTOCOL_VERSION, max_frame=self.config.max_frame,
            features=self.config.features,
        ))

    def _read_hello(self, payload: bytes) -> None:
        frame = wire.decode_frame(payload)
        if not isinstance(frame, wire.Hello):
            raise RemoteProtocolError("handshake payload is not a hello")
        if frame.version < wire.MIN_PROTOCOL_VERSION:
            raise RemoteProtocolError("peer protocol version below minimum")
        if frame.max_frame < MIN_PEER_FRAME:
            raise RemoteProtocolError("peer frame limit too small")
        self._frame_cap = min(self.config.max_frame, frame.max_frame)

    def _handle_record(self, record: bytes) -> None:
        if self.state != State.HANDSHAKE:
            assert self._recv_cs is not None
            frame = wire.unpad_plaintext(self._recv_cs.decrypt(record))
            if len(frame) > self.config.max_frame:
                raise RemoteProtocolError("frame larger than the limit we announced")
            self._handle_frame(wire.decode_frame(frame))
            return
        if self._hs is None:  # responder, first record: preamble + msg1
            if len(record) < 4 or record[:3] != wire.MAGIC:
                raise RemoteProtocolError("not a pigeon link")
            version = record[3]
            if version < wire.MIN_PROTOCOL_VERSION:
                raise RemoteProtocolError("peer protocol version below minimum")
            if version != wire.PROTOCOL_VERSION:
                raise RemoteProtocolError(f"unsupported protocol version {version}")
            self._hs = HandshakeState(
                "XX", False, prologue=PROLOGUE + record[:4], s=self._static, rng=self._rng,
            )
            if self._hs.read_message(record[4:]):
                raise RemoteProtocolError("first handshake message carries a payload")
            self._emit_record(self._hs.write_message(self._hello()))
            return
        if self.initiator:  # msg2
            self._read_hello(self._hs.read_message(record))
            self._emit_record(self._hs.write_message(self._hello()))
        else:  # msg3
            self._read_hello(self._hs.read_message(record))
        self._finish_handshake()

    def _finish_handshake(self) -> None:
        assert self._hs is not None and self._hs.complete
        remote = self._hs.remote_static
        if remote is None:
            raise RemoteProtocolError("peer presented no static key")
        if remote == self._static.public:
            raise RemoteProtocolError("connected to ourselves")
        self._send_cs, self._recv_cs = self._hs.split()
        self._framer.max_record = wire.MAX_NOISE_MESSAGE
        self.remote_key = remote
        self._events.append(HandshakeCompleted(
            remote_key=remote, handshake_hash=self._hs.handshake_hash,
        ))
        self._hs = None
        self.state = State.RECONCILING
        if self.initiator:
            self._reconciler = self._new_reconciler()
            self._send_frame(wire.Reconcile(message=self._reconciler.initiate()))
            self.reconcile_rounds = 1

    def _new_reconciler(self) -> Reconciler:
        limit = min(self.config.reconcile_max_bytes, self._frame_cap - 64)
        return Reconciler(self._source.sync_keys(), max_message_bytes=limit)

    # ---- internals: frames -------------------------------------------------------

    def _handle_frame(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Reconcile):
            self._on_reconcile(frame.message)
        elif isinstance(frame, wire.Items):
            self._on_items(frame)
        elif isinstance(frame, wire.Ack):
            self._on_ack(frame)
        elif isinstance(frame, wire.Want):
            self._require_transfer("want")
            self._wants_seen += 1
            self._to_send += sum(self._enqueue(item_id) for item_id in frame.ids)
            self._progress_dirty = True
            self._idle_sent = False
        elif isinstance(frame, wire.Plan):
            self._require_transfer("plan")
            self._to_receive += frame.count
            self._progress_dirty = True
            self._events.append(TransferPlanned(count=frame.count))
        elif isinstance(frame, wire.Idle):
            self._require_transfer("idle")
            self._peer_idle_wants = frame.wants_seen
            self._check_complete()
        elif isinstance(frame, wire.Ping):
            self._send_frame(wire.Pong(nonce=frame.nonce))
        elif isinstance(frame, wire.Pong):
            pass
        elif isinstance(frame, wire.Close):
            self.state = State.CLOSED
            self._events.append(LinkClosed(reason=f"peer closed: {frame.reason!r}", error=False))
        else:  # Hello after the handshake
            raise RemoteProtocolError("unexpected hello")

    def _require_transfer(self, what: str) -> None:
        if self.state not in (State.TRANSFERRING, State.LIVE):
            raise RemoteProtocolError(f"{what} before reconciliation finished")

    def _on_reconcile(self, message: ReconcileMessage) -> None:
        if self.state != State.RECONCILING:
            raise RemoteProtocolError("unsolicited reconcile message")
        if self._reconciler is None:
            if self.initiator:
                raise RemoteProtocolError("unsolicited reconcile message")
            self._reconciler = self._new_reconciler()
        if not message.ranges:
            self._reconcile_done()
            return
        if self.reconcile_rounds >= MAX_RECONCILE_ROUNDS:
            raise RemoteProtocolError("reconciliation did not converge")
        reply = self._reconciler.respond(message)
        if not self.initiator:
            self.reconcile_rounds += 1
        if reply is None:
            self._send_frame(wire.Reconcile(message=ReconcileMessage(())))
            self._reconcile_done()
            return
        if self.initiator:
            self.reconcile_rounds += 1
        self._send_frame(wire.Reconcile(message=reply))

    def _reconcile_done(self) -> None:
        assert self._reconciler is not None
        have, need = self._reconciler.have, self._reconciler.need
        self._reconciler = None
        self.state = State.TRANSFERRING
        for item_id in sorted(have):
            self._enqueue(item_id)
        for item_id in self._early_offers:
            self._enqueue(item_id)
        self._early_offers = []
        self._to_send = len(self._queued)
        self._send_frame(wire.Plan(count=len(self._queued), size=0))
        # Reconciliation leaves both sides knowing the whole difference, so each side
        # pushes what the other lacks and nobody needs to ask: no Want frames here (they
        # would cost 18 bytes per id, 1.8 MB for a newcomer to a 100k store). Want stays
        # in the protocol for pulls; a peer's Want is still served.
        self._events.append(ReconcileCompleted(
            to_send=len(self._queued), wanted=len(need), round_trips=self.reconcile_rounds,
        ))
        self._progress_dirty = True

    def _on_items(self, frame: wire.Items) -> None:
        self._require_transfer("items")
        for kind, data in frame.items:
            item: Envelope | Receipt = (
                Envelope.from_bytes(data) if kind == wire.ItemKind.ENVELOPE
                else Receipt.from_bytes(data)
            )
            item_id = item.id
            self._remember_peer_has(item_id)
            self._discard_queued(item_id)
            if item_id in self._awaiting_commit:
                continue  # pushed twice before we acknowledged: the first copy counts
            self.received_items += 1
            self._progress_dirty = True
            try:
                item.check_fresh(self._now)
            except RemoteProtocolError as exc:
                self._events.append(ItemDropped(item_id=item_id, reason=exc.reason))
                self._pending_refused.append(item_id)
                continue
            self._awaiting_commit.add(item_id)
            if isinstance(item, Envelope):
                self._events.append(EnvelopeReceived(envelope=item))
            else:
                self._events.append(ReceiptReceived(receipt=item))
        self._check_complete()

    def _on_ack(self, frame: wire.Ack) -> None:
        self._require_transfer("ack")
        acked: list[bytes] = []
        refused: list[bytes] = []
        for ids, bucket in ((frame.ids, acked), (frame.refused, refused)):
            for item_id in ids:
                size = self._in_flight.pop(item_id, None)
                if size is None:
                    continue  # acks for what we did not send are ignored, not trusted
                self._in_flight_bytes -= size
                self._remember_peer_has(item_id)
                bucket.append(item_id)
        if acked or refused:
            self._events.append(ItemsAcknowledged(ids=tuple(acked), refused=tuple(refused)))
            self._progress_dirty = True

    # ---- internals: transfer -----------------------------------------------------

    def _remember_peer_has(self, item_id: bytes) -> None:
        if len(self._peer_has) < MAX_PEER_HAS:
            self._peer_has.add(item_id)

    def _enqueue(self, item_id: bytes) -> bool:
        if (item_id in self._queued or item_id in self._peer_has or item_id in self._served
                or item_id in self._in_flight):
            return False
        item = self._source.get_item(item_id)
        if item is None or not self.policy.may_offer(item, self._now):
            return False
        self._seq += 1
        heapq.heappush(self._queue, (self.policy.priority(item), self._seq, item_id))
        self._queued.add(item_id)
        self._idle_sent = False
        return True

    def _discard_queued(self, item_id: bytes) -> None:
        self._queued.discard(item_id)  # the heap entry is skipped lazily

    def _fill_items(self) -> None:
        budget = self._frame_cap - wire.ITEMS_FRAME_OVERHEAD - 2
        batch: list[tuple[int, bytes]] = []
        used = 0
        while self._queue and self._in_flight_bytes < self.config.window_bytes:
            _, _, item_id = self._queue[0]
            if item_id not in self._queued:
                heapq.heappop(self._queue)
                continue
            item = self._source.get_item(item_id)
            if item is None or item_id in self._peer_has or not self.policy.may_offer(item, self._now):
                heapq.heappop(self._queue)
                self._queued.discard(item_id)
                continue
            if item.kind == KIND_RECEIPT:
                assert item.data is not None
                kind, data = wire.ItemKind.RECEIPT, item.data
            else:
                kind, data = wire.ItemKind.ENVELOPE, self.policy.outgoing_envelope(item, self._now)
            cost = wire.ITEM_OVERHEAD + len(data)
            if batch and (used + cost > budget or len(batch) >= wire.MAX_ITEMS_PER_FRAME):
                self._send_frame(wire.Items(items=tuple(batch)))
                batch, used = [], 0
            heapq.heappop(self._queue)
            self._queued.discard(item_id)
            batch.append((kind, data))
            used += cost
            self._in_flight[item_id] = len(data)
            self._in_flight_bytes += len(data)
            self._served.add(item_id)
            self.sent_items += 1
            self._progress_dirty = True
        if batch:
            self._send_frame(wire.Items(items=tuple(batch)))

    def _ids_per_frame(self) -> int:
        """Id lists (Want, Ack) stay within the frame size the peer announced."""
        return min(wire.MAX_IDS_PER_FRAME, (self._frame_cap - 2 * wire.IDS_FRAME_OVERHEAD)
                   // wire.ID_OVERHEAD)

    def _flush_acks(self) -> None:
        step = self._ids_per_frame() // 2
        while self._pending_acks or self._pending_refused:
            ids, self._pending_acks = self._pending_acks[:step], self._pending_acks[step:]
            refused, self._pending_refused = (
                self._pending_refused[:step], self._pending_refused[step:],
            )
            self._send_frame(wire.Ack(ids=tuple(ids), refused=tuple(refused)))

    def _maybe_idle(self) -> None:
        # Idle only ends the sync (TRANSFERRING -> LIVE); once live, one after every pushed
        # item would cost a padded record per message per direction for nothing.
        if self._sync_done or self._queued or self._in_flight or self._idle_sent:
            return
        self._idle_sent = True
        self._send_frame(wire.Idle(wants_seen=self._wants_seen))
        self._check_complete()

    def _check_complete(self) -> None:
        if self._sync_done or self.state != State.TRANSFERRING:
            return
        if not self._idle_sent or self._queued or self._in_flight:
            return
        if self._peer_idle_wants != 0 or self._awaiting_commit:
            return
        self._sync_done = True
        self.state = State.LIVE
        self._events.append(SyncCompleted(sent=self.sent_items, received=self.received_items))


__all__ = [
    "EnvelopeReceived", "HandshakeCompleted", "ItemDropped", "ItemsAcknowledged",
    "LinkClosed", "LinkSession", "ReceiptReceived", "ReconcileCompleted", "SessionConfig",
    "SessionEvent", "State", "SyncCompleted", "SyncProgressed", "TransferPlanned",
]
