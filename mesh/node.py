"""The asyncio node runtime: owns the store, the links and their sessions.

It repeats aioquic's rhythm for every link: feed the session what the transport read,
drain the session's events (storing what arrived, in one transaction per batch, and only
then acknowledging), write what the session wants to send, re-arm its one timer.
Everything protocol-shaped lives in ``mesh.session``; this file only moves bytes, commits
rows and tells the outside world (CLI, TUI, control socket) what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh import api, chat, sealing
from mesh.dialer import DUPLICATE_REASON, DiscoveredDialer, LinkObserver
from mesh.envelope import DEFAULT_TTL_S, Envelope, Receipt, minutes
from mesh.errors import UserError
from mesh.identity import Identity, PublicIdentity
from mesh.noise import KeyPair, generate_keypair
from mesh.routing import RoutingPolicy
from mesh.session import (
    EnvelopeReceived,
    HandshakeCompleted,
    ItemDropped,
    ItemsAcknowledged,
    LinkClosed,
    LinkSession,
    ReceiptReceived,
    ReconcileCompleted,
    SessionConfig,
    State,
    SyncCompleted,
    SyncProgressed,
    TransferPlanned,
)
from mesh.store import AddResult, Store
from mesh.store_app import Contact, InboxKind
from mesh.transports.base import Link
from mesh.transports.tcp import connect_tcp, listen_tcp

log = logging.getLogger("pigeon.node")

LINK_KEY_LIFETIME_S = 3600.0
SWEEP_INTERVAL_S = 60.0
ITEM_LOG_LINES = 20
#: Sync progress reaches subscribers at most this often per link (the final state of a
#: sync, and connects and disconnects, go out at once).
PROGRESS_EVENT_S = 0.25


def short(item_id: bytes) -> str:
    """Message ids in logs: enough to correlate, never key material."""
    return item_id.hex()[:12]


@dataclass
class NodeConfig:
    listen: list[tuple[str, int]] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    session: SessionConfig = field(default_factory=SessionConfig)
    max_links: int = 32
    #: Fall back to a free port when a listen port is taken (chat windows beside a relay
    #: or another profile on the same laptop; LAN discovery announces the real port).
    listen_any_port_if_busy: bool = False
    #: Links still in the Noise handshake at once; the rest wait their turn by being refused,
    #: so half-open connections cannot crowd out real peers.
    max_handshakes: int = 8
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    ttl_s: int = DEFAULT_TTL_S
    hops: int | None = None


class _LinkRunner:
    """Drives one session over one link."""

    def __init__(self, node: Node, link: Link, session: LinkSession, *, local_key: bytes,
                 observer: LinkObserver | None = None) -> None:
        self.node = node
        self.link = link
        self.session = session
        #: Our link public key on this link (it rotates hourly, so it is per link).
        self.local_key = local_key
        self.remote_key: bytes | None = None
        self.handshake_hash = b""
        #: Told once how the handshake and the link ended (the LAN dialer uses it).
        self.observer = observer
        self.closed_event: LinkClosed | None = None
        self.wake = asyncio.Event()
        self.connected_at = node.clock()
        self.peer_key: str = ""
        #: Per-item log lines are capped per link (a flood must not become a log flood);
        #: the rest are summed up when the sync completes or the link closes.
        self.item_log_budget = ITEM_LOG_LINES
        #: A progress event is scheduled (``Node._publish_progress``).
        self.progress_due = False
        self.stored = 0
        self.refused = 0
        #: Who fills which quota share: the peer's network address (host, not port), which
        #: survives the peer rotating its link key; link keys would give a flooder a fresh
        #: share on every reconnect.
        # (A BLE address has no port: its colons are part of it.)
        host = (link.address.rsplit(":", 1)[0]
                if ":" in link.address and link.transport != "ble" else link.address)
        self.origin = f"{link.transport}:{host}"

    async def run(self) -> None:
        reader = asyncio.create_task(self._read_loop())
        try:
            while not self.session.closed:
                await self._pump()
                if self.session.closed:
                    break
                timer = self.session.get_timer()
                delay = 1.0 if timer is None else max(0.0, timer - self.node.clock())
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=delay)
                except TimeoutError:
                    self.session.handle_timer(self.node.clock())
            await self._pump()  # flush a Close frame, deliver the LinkClosed event
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            self.link.close()
            self.node._runner_done(self)

    async def _read_loop(self) -> None:
        while True:
            data = await self.link.read()
            if not data:
                if not self.session.closed:
                    self.session.close("link lost")
                self.wake.set()
                return
            self.session.receive_data(data, self.node.clock())
            self.wake.set()

    async def _pump(self) -> None:
        for _ in range(10_000):
            self.node._drain_events(self)
            data = self.session.data_to_send(self.node.clock())
            if not data:
                return
            try:
                await self.link.write(data)
            except (ConnectionError, OSError):
                if not self.session.closed:
                    self.session.close("write failed")
                self.node._drain_events(self)
                return


    def flush_nowait(self) -> None:
        """``_pump``'s write without waiting, for a link that has ``write_nowait``: hand
        what the session has to send to the kernel now (``Node._forward_now``)."""
        data = self.session.data_to_send(self.node.clock())
        if not data:
            return
        try:
            self.link.write_nowait(data)  # type: ignore[attr-defined]
        except (ConnectionError, OSError):
            self.session.close("write failed")
        self.wake.set()


def _log_ids(template: str, msg_ids: list[str]) -> None:
    """One log line per message, or one for a whole batch (a burst of 1,000 sends logged
    line by line cost more CPU than storing it)."""
    if len(msg_ids) <= 3:
        for msg_id in msg_ids:
            log.info(template, msg_id[:12])
    else:
        log.info(template, f"{len(msg_ids)} messages ({msg_ids[0][:12]} .. {msg_ids[-1][:12]})")


def _link_rank(runner: _LinkRunner) -> tuple[bytes, bytes]:
    initiator_key = runner.local_key if runner.session.initiator else runner.remote_key
    return (initiator_key or b"", runner.handshake_hash)


class Node:
    """A Pigeon node. The public methods are the API the CLI and the TUI use."""

    def __init__(
        self, identity: Identity, store: Store, config: NodeConfig | None = None, *,
        clock: Callable[[], float] = time.time, policy: RoutingPolicy | None = None,
    ) -> None:
        self.identity = identity
        self.store = store
        self.config = config or NodeConfig()
        self.clock = clock
        self.policy = policy or RoutingPolicy()
        self._link_key: KeyPair = generate_keypair()
        self._link_key_born = clock()
        self._runners: set[_LinkRunner] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._subscribers: list[asyncio.Queue[api.NodeEvent]] = []
        self._started_at = clock()
        self._stopping = False
        self.listening: list[str] = []
        self._dialer: DiscoveredDialer | None = None
        #: Sends waiting for the next group commit (see ``send_grouped``).
        self._send_queue: list[tuple[chat.SealedMessage, asyncio.Future[str]]] = []
        #: What each optional transport is doing, for ``status`` ("ble": "off: no adapter").
        self._transport_status: dict[str, str | Callable[[], str]] = {}

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        for host, port in self.config.listen:
            try:
                server = await listen_tcp(host, port, self._accept_tcp)
            except OSError:
                if not self.config.listen_any_port_if_busy:
                    raise
                log.info("port %s is busy; listening on a free port instead", port)
                server = await listen_tcp(host, 0, self._accept_tcp)
            self._servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                self.listening.append(f"{name[0]}:{name[1]}")
                log.info("listening on %s:%s", name[0], name[1])
        for host, port in self.config.peers:
            self._spawn(self._dial_forever(host, port))
        self._spawn(self._housekeeping())

    async def stop(self) -> None:
        self._stopping = True
        for server in self._servers:
            server.close()
        for runner in list(self._runners):
            runner.session.close("node shutting down")
            runner.wake.set()
        deadline = time.monotonic() + 2.0
        while self._runners and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- links -----------------------------------------------------------------------

    def add_link(self, link: Link, *, initiator: bool,
                 observer: LinkObserver | None = None) -> asyncio.Task[Any] | None:
        """Run a session over an already-open link; returns the task, or None if refused
        (then ``observer`` is never called)."""
        if self._stopping or len(self._runners) >= self.config.max_links:
            log.warning("refused link from %s: too many links", link.address)
            link.close()
            return None
        handshaking = sum(1 for r in self._runners if r.session.state == State.HANDSHAKE)
        if handshaking >= self.config.max_handshakes:
            log.warning("refused link from %s: too many handshakes in progress", link.address)
            link.close()
            return None
        now = self.clock()
        if now - self._link_key_born > LINK_KEY_LIFETIME_S:
            self._link_key, self._link_key_born = generate_keypair(), now
        session = LinkSession(
            initiator=initiator, static=self._link_key, source=self.store, now=now,
            policy=self.policy, config=self.config.session,
        )
        runner = _LinkRunner(self, link, session, local_key=self._link_key.public,
                             observer=observer)
        self._runners.add(runner)
        return self._spawn(runner.run())

    async def _accept_tcp(self, link: Link) -> None:
        task = self.add_link(link, initiator=False)
        if task is not None:
            with contextlib.suppress(BaseException):
                await task

    async def _dial_forever(self, host: str, port: int) -> None:
        backoff = self.config.backoff_initial_s
        while not self._stopping:
            started = self.clock()
            try:
                link = await connect_tcp(host, port)
            except (OSError, TimeoutError) as exc:
                log.debug("dial %s:%s failed: %s", host, port, exc)
            else:
                task = self.add_link(link, initiator=True)
                if task is not None:
                    with contextlib.suppress(BaseException):
                        await task
                if self.clock() - started > 30:
                    backoff = self.config.backoff_initial_s
            if self._stopping:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.config.backoff_max_s)

    def _runner_done(self, runner: _LinkRunner) -> None:
        self._runners.discard(runner)
        if runner.observer is not None:
            closed = runner.closed_event
            runner.observer.link_closed(
                handshaken=runner.remote_key is not None,
                error=closed.error if closed else False,
                reason=closed.reason if closed else "link ended")

    def connect_discovered(self, host: str, port: int, transport: str = "lan") -> None:
        """A discovery hint (mDNS): dial it within the dialer's bounds (see ``mesh.dialer``)."""
        if self._stopping:
            return
        if self._dialer is None:
            self._dialer = DiscoveredDialer(self)
            self._spawn(self._dialer.run())
        self._dialer.note(host, port, transport)

    def forget_discovered(self, host: str, port: int) -> None:
        """The hinted service said goodbye; an open link to it stays until it fails."""
        if self._dialer is not None:
            self._dialer.forget(host, port)

    def set_transport_status(self, name: str, status: str | Callable[[], str]) -> None:
        """A transport reports its state (a callable is read at each ``status()``)."""
        self._transport_status[name] = status

    def has_link_to(self, remote_key: bytes) -> bool:
        return any(r.remote_key == remote_key and not r.session.closed for r in self._runners)

    def _close_duplicate(self, new: _LinkRunner) -> None:
        """Keep exactly one link per pair of link keys.

        Two nodes that discover each other at once both dial. Each side sees both links
        complete and closes the same one without talking about it: it keeps the link whose
        initiator has the smaller link key (both sides know both keys and who initiated),
        then the smaller handshake hash if one node dialed twice (over IPv4 and IPv6).
        """
        for other in list(self._runners):
            if other is new or other.session.closed or other.remote_key != new.remote_key:
                continue
            loser = max(new, other, key=_link_rank)
            log.info("duplicate link to %s: closing the one via %s %s", new.peer_key,
                     loser.link.transport, loser.link.address)
            loser.session.close(DUPLICATE_REASON)
            loser.wake.set()
            return

    # ---- session events --------------------------------------------------------------

    def _drain_events(self, runner: _LinkRunner) -> None:
        session = runner.session
        received: list[EnvelopeReceived | ReceiptReceived] = []
        while (event := session.next_event()) is not None:
            if isinstance(event, EnvelopeReceived | ReceiptReceived):
                received.append(event)
            elif isinstance(event, ItemsAcknowledged):
                self._on_acknowledged(runner, event)
            elif isinstance(event, HandshakeCompleted):
                runner.peer_key = event.remote_key.hex()[:16]
                runner.remote_key, runner.handshake_hash = event.remote_key, event.handshake_hash
                if runner.observer is not None:
                    runner.observer.handshake_completed(event.remote_key)
                self._close_duplicate(runner)
                log.info("peer connected %s via %s %s", runner.peer_key,
                         runner.link.transport, runner.link.address)
                self._publish(api.PeerChanged(peer=api.to_dict(self._peer_info(runner)),
                                              connected=True))
            elif isinstance(event, ReconcileCompleted):
                log.info("reconciled with %s in %d round trips: %d to send, %d wanted",
                         runner.peer_key, event.round_trips, event.to_send, event.wanted)
            elif isinstance(event, SyncCompleted):
                log.info("sync with %s complete: sent %d, received %d (stored %d, refused %d)",
                         runner.peer_key, event.sent, event.received, runner.stored,
                         runner.refused)
                self._publish_peer(runner)
            elif isinstance(event, SyncProgressed | TransferPlanned):
                self._publish_progress(runner)
            elif isinstance(event, ItemDropped):
                runner.refused += 1
                if runner.item_log_budget > 0:
                    runner.item_log_budget -= 1
                    log.info("dropped item %s from %s: %s", short(event.item_id),
                             runner.peer_key, event.reason)
            elif isinstance(event, LinkClosed):
                runner.closed_event = event
                level = logging.WARNING if event.error else logging.INFO
                log.log(level, "peer disconnected %s (%s %s): %s; stored %d, refused %d",
                        runner.peer_key or "?", runner.link.transport, runner.link.address,
                        event.reason, runner.stored, runner.refused)
                if runner.peer_key:
                    self._publish(api.PeerChanged(
                        peer=api.to_dict(self._peer_info(runner)), connected=False))
        if received:
            self._store_received(runner, received)

    def _store_received(
        self, runner: _LinkRunner, events: list[EnvelopeReceived | ReceiptReceived],
    ) -> None:
        now = self.clock()
        new_ids: list[bytes] = []  # stored for others: may be forwarded before the commit
        own_ids: list[bytes] = []  # receipts we issued: offered only after the commit
        acks: list[tuple[bytes, bool]] = []
        published: list[api.NodeEvent] = []
        try:
            with self.store.batch():
                for event in events:
                    if isinstance(event, ReceiptReceived):
                        stored = self._take_receipt(runner, event.receipt, now, new_ids,
                                                    published)
                        acks.append((event.receipt.id, stored))
                    else:
                        stored = self._take_envelope(runner, event.envelope, now, new_ids,
                                                     published, own_ids)
                        acks.append((event.envelope.id, stored))
                if new_ids:
                    self._forward_now(runner, new_ids)
        except sqlite3.Error as exc:
            # Disk full or I/O error: the batch rolled back, so refuse all of it (the peer
            # keeps its copies and may try again later) and keep serving.
            log.error("could not store %d items from %s: %s; refusing them", len(events),
                      runner.peer_key, exc)
            acks = [(e.envelope.id if isinstance(e, EnvelopeReceived) else e.receipt.id, False)
                    for e in events]
            new_ids, own_ids, published = [], [], []
        # Committed: now, and only now, acknowledge and tell everyone else.
        for item_id, stored in acks:
            if not runner.session.closed:
                runner.session.acknowledge(item_id, stored=stored)
        for note in published:
            self._publish(note)
        if new_ids or own_ids:
            # The session skips ids its peer already has (or was already pushed), so the
            # link they came from only gets what is new to it (the receipt we just issued).
            self._offer(new_ids + own_ids)

    def _forward_now(self, source: _LinkRunner | None, ids: list[bytes]) -> None:
        """Push items just stored for others (or sent by us: ``source`` None) to the other
        live links before our commit, so the next hop's fsync overlaps ours instead of
        following it (one fsync less per hop on a message's path).

        Safe because forwarding acknowledges nothing: the link they came from keeps its
        copies until our Ack, which goes out only after the commit; a crash before it
        costs at most a duplicate downstream, which the id dedupes (our own send: the
        caller is answered only after the commit, see ``_store_sends``). Never used for the
        receipts we issue (they tell a sender its message was delivered, which must not
        happen before our inbox holds it). Only links that can take bytes without waiting
        (``write_nowait``) are served here; the rest get the items after the commit, as
        before. The flow-control window bounds what this can queue.
        """
        for other in self._runners:
            if (other is source or not hasattr(other.link, "write_nowait")
                    or other.session.state not in (State.TRANSFERRING, State.LIVE)):
                continue
            other.session.offer(ids)
            other.flush_nowait()

    def _take_receipt(self, runner: _LinkRunner, receipt: Receipt, now: float,
                      new_ids: list[bytes], published: list[api.NodeEvent]) -> bool:
        is_new, purged = self.store.add_receipt(receipt, now=now, origin=runner.origin)
        if is_new:
            new_ids.append(receipt.id)
            if runner.item_log_budget > 0:
                runner.item_log_budget -= 1
                log.info("receipt stored %s (purged %d copies)", short(receipt.id), len(purged))
        msg_id = self.store.outbox_by_receipt_hash(receipt.answers)
        if msg_id is not None and self.store.outbox_set_state(msg_id, api.STATE_DELIVERED, now=now):
            log.info("delivered %s", msg_id[:12])
            published.append(api.MessageStateChanged(id=msg_id, state=api.STATE_DELIVERED))
        return True

    def _take_envelope(self, runner: _LinkRunner, env: Envelope, now: float,
                       new_ids: list[bytes], published: list[api.NodeEvent],
                       own_ids: list[bytes]) -> bool:
        if self.store.has(env.id):
            return True
        direct = sealing.open_direct(self.identity, env)
        if direct is not None:
            self._accept_direct(env, direct, now, own_ids, published)
            return True
        stored_env = env.with_mutable(hops_left=self.policy.hops_to_store(env))
        result = self.store.add_envelope(stored_env, now=now, origin=runner.origin)
        if result == AddResult.STORED:
            new_ids.append(env.id)
            runner.stored += 1
            if runner.item_log_budget > 0:
                runner.item_log_budget -= 1
                log.info("stored %s from %s (%d bytes)", short(env.id), runner.peer_key, env.size)
            self._open_channels(env, now, published)
            return True
        if result in (AddResult.DUPLICATE, AddResult.ANSWERED):
            return True
        runner.refused += 1
        if runner.item_log_budget > 0:
            runner.item_log_budget -= 1
            log.info("refused %s from %s: %s", short(env.id), runner.peer_key, result.name.lower())
        return False

    def _sender_label(self, sender: PublicIdentity, claimed: str,
                      published: list[api.NodeEvent]) -> tuple[str, Contact | None]:
        """How a sender is shown (a contact's saved name, or a marked stranger label) and
        the contact if it is one; warns when a stranger claims a contact's name."""
        contact = self.store.contact_by_key(sender.sign_pub)
        if contact is not None:
            return contact.name, contact
        label = chat.stranger_label(sender, claimed)
        self._warn_if_impersonating(sender, claimed, label, published)
        return label, None

    def _to_inbox(self, env: Envelope, *, conversation: str, sender_key: bytes, sender: str,
                  text: str, sent_at: float, now: float, kind: InboxKind, verified: bool,
                  published: list[api.NodeEvent]) -> bool:
        """Show a message to the user once (the inbox dedups by id) and announce it."""
        if not self.store.inbox_add(
            env.id.hex(), conversation=conversation, sender_key=sender_key, sender_name=sender,
            text=text, sent_at=sent_at, received_at=now, kind=kind,
        ):
            return False
        published.append(api.MessageReceived(message=api.to_dict(api.InboxMessage(
            id=env.id.hex(), conversation=conversation, sender=sender, text=text,
            sent_at=sent_at, received_at=now, kind=kind, verified_sender=verified,
        ))))
        return True

    def _accept_direct(self, env: Envelope, msg: sealing.DirectMessage, now: float,
                       new_ids: list[bytes], published: list[api.NodeEvent]) -> None:
        label, contact = self._sender_label(msg.sender, msg.sender_name, published)
        added = self._to_inbox(env, conversation=label, sender_key=msg.sender.sign_pub,
                               sender=label, text=msg.text, sent_at=msg.sent_at, now=now,
                               kind="direct", verified=bool(contact and contact.verified),
                               published=published)
        # Keep only a tombstone of the envelope, and release the receipt (the antidote).
        self.store.add_tombstone(env, now=now)
        receipt = Receipt(secret=msg.receipt_secret, issued_min=minutes(now))
        is_new, _ = self.store.add_receipt(receipt, now=now)
        if is_new:
            new_ids.append(receipt.id)
        if added:
            log.info("delivered to us %s", short(env.id))

    def _warn_if_impersonating(self, sender: PublicIdentity, claimed: str, label: str,
                               published: list[api.NodeEvent]) -> None:
        known = self.store.contact_by_name(claimed)
        if known is not None and known.sign_pub != sender.sign_pub:
            log.warning("a sender claims the name of contact %r with a different key", known.name)
            published.append(api.KeyWarning(contact=known.name, claimed_by=label,
                                            fingerprint=sender.fingerprint))

    def _public_rate_exceeded(self, sender_key: bytes, now: float) -> bool:
        recent = self.store.inbox_count(chat.channel_conversation(chat.PUBLIC),
                                        since=now - 3600, sender_key=sender_key)
        return recent >= chat.PUBLIC_RATE_PER_HOUR

    def _open_channels(self, env: Envelope, now: float, published: list[api.NodeEvent]) -> None:
        for channel in chat.channel_keys(self.store):
            msg = sealing.open_channel(channel, env)
            if msg is None:
                continue
            sender, contact = self._sender_label(msg.sender, msg.sender_name, published)
            if (contact is None and channel.name == chat.PUBLIC
                    and self._public_rate_exceeded(msg.sender.sign_pub, now)):
                log.info("public channel: rate limit for a stranger reached; not shown")
                return
            self._to_inbox(env, conversation=chat.channel_conversation(channel.name),
                           sender_key=msg.sender.sign_pub, sender=sender, text=msg.text,
                           sent_at=msg.sent_at, now=now, kind="channel",
                           verified=bool(contact and contact.verified), published=published)
            return

    def _on_acknowledged(self, runner: _LinkRunner, event: ItemsAcknowledged) -> None:
        now = self.clock()
        changed: list[str] = []
        with self.store.batch():  # one commit per Ack frame, not one per id
            for item_id in event.ids:
                msg_id = item_id.hex()
                if self.store.outbox_set_state(msg_id, api.STATE_RELAYED, now=now):
                    changed.append(msg_id)
                elif runner.item_log_budget > 0:
                    runner.item_log_budget -= 1
                    log.info("forwarded %s to %s", short(item_id), runner.peer_key)
        _log_ids("handed %s to " + runner.peer_key, changed)
        for msg_id in changed:
            self._publish(api.MessageStateChanged(id=msg_id, state=api.STATE_RELAYED))

    def _offer(self, ids: list[bytes]) -> None:
        for runner in self._runners:
            if not runner.session.closed:
                runner.session.offer(ids)
                runner.wake.set()

    # ---- public API ---------------------------------------------------------------

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[api.NodeEvent]:
        """A queue of NodeEvents; a slow subscriber loses the oldest events, never blocks us."""
        queue: asyncio.Queue[api.NodeEvent] = asyncio.Queue(maxsize)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[api.NodeEvent]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(queue)

    def _publish(self, event: api.NodeEvent) -> None:
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def _publish_peer(self, runner: _LinkRunner) -> None:
        runner.progress_due = False
        if runner.peer_key:
            self._publish(api.PeerChanged(peer=api.to_dict(self._peer_info(runner)), connected=True))

    def _publish_progress(self, runner: _LinkRunner) -> None:
        """Sync progress, at most every ``PROGRESS_EVENT_S`` per link: a window needs a few
        updates a second, while one event per item cost every message of a burst a peer
        snapshot and a JSON line per subscriber, on the path the message itself takes."""
        if runner.progress_due:
            return
        runner.progress_due = True
        asyncio.get_running_loop().call_later(PROGRESS_EVENT_S, self._flush_progress, runner)

    def _flush_progress(self, runner: _LinkRunner) -> None:
        if runner.progress_due and not runner.session.closed:
            self._publish_peer(runner)

    def send(self, conversation: str, text: str) -> str:
        """Seal ``text`` to a contact (or ``#channel``), store it durably and push it to
        every live link. Returns the message id (hex)."""
        sealed = self._seal(conversation, text)
        self._store_sends([sealed])
        self._announce_queued([sealed])
        return sealed.msg_id

    def _seal(self, conversation: str, text: str) -> chat.SealedMessage:
        return chat.seal_message(self.store, self.identity, conversation, text,
                                 now=self.clock(), ttl_s=self.config.ttl_s,
                                 hops=self.config.hops)

    def _store_sends(self, batch: list[chat.SealedMessage]) -> None:
        """Store our own sealed messages in one durable transaction, pushing them to the
        links that take bytes at once before its commit (``_forward_now``), so the next
        hop's fsync overlaps ours. The caller is answered only after the commit.

        If the commit itself fails, the envelopes may already be on a neighbour's disk and
        may still be delivered; the error says so rather than claim nothing was sent.
        """
        try:
            with self.store.batch():
                chat.store_sealed(self.store, batch)
                self._forward_now(None, [sealed.envelope.id for sealed in batch])
        except sqlite3.Error as exc:
            raise UserError(f"could not save the message ({exc}); it may already have "
                            "reached a neighbour and may still be delivered") from None

    def _announce_queued(self, batch: list[chat.SealedMessage]) -> None:
        """Stored durably: offer to every live link, and tell every window on this node
        (also when another process sent it)."""
        self._offer([sealed.envelope.id for sealed in batch])
        _log_ids("queued %s", [sealed.msg_id for sealed in batch])
        for sealed in batch:
            self._publish(api.MessageStateChanged(id=sealed.msg_id, state=api.STATE_QUEUED))

    async def send_grouped(self, conversation: str, text: str) -> str:
        """``send`` with group commit: every send made in the same event-loop turn (a
        burst from a script, pipelined requests on the control socket) is stored in one
        transaction, one fsync for all. Returns the message id once it is durable; the
        message is offered to links only then, exactly as with ``send``.

        Sealing happens here, at once, so a bad contact or text raises before anything
        is queued; a disk error fails every send of that commit with a ``UserError``.
        """
        sealed = self._seal(conversation, text)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._send_queue.append((sealed, future))
        if len(self._send_queue) == 1:
            asyncio.get_running_loop().call_soon(self._commit_sends)
        return await future

    def _commit_sends(self) -> None:
        batch, self._send_queue = self._send_queue, []
        try:
            self._store_sends([sealed for sealed, _ in batch])
        except UserError as error:
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self._announce_queued([sealed for sealed, _ in batch])
        for sealed, future in batch:
            if not future.done():  # a caller that gave up still gets its message sent
                future.set_result(sealed.msg_id)

    def identity_info(self) -> dict[str, str]:
        return chat.identity_info(self.identity)

    def add_contact(self, name: str, code: str) -> api.ContactInfo:
        return chat.add_contact(self.store, name, code, now=self.clock())

    def replace_contact_key(self, name: str, code: str) -> api.ContactInfo:
        return chat.replace_contact_key(self.store, name, code)

    def verify_contact(self, name: str, verified: bool = True) -> None:
        chat.verify_contact(self.store, name, verified)

    def contacts(self) -> list[api.ContactInfo]:
        return chat.list_contacts(self.store)

    async def join_channel(self, name: str | None = None, *, passphrase: str | None = None,
                           invite: str | None = None) -> api.ChannelInfo:
        """Key derivation runs in a thread, so links keep flowing meanwhile; the store is
        written here, on the loop that owns it."""
        channel = await asyncio.to_thread(chat.channel_key_for, name, passphrase=passphrase,
                                          invite=invite)
        return chat.save_channel(self.store, channel, now=self.clock())

    def channels(self) -> list[api.ChannelInfo]:
        return chat.list_channels(self.store)

    def conversations(self) -> list[api.ConversationInfo]:
        return chat.conversations(self.store)

    def messages(self, conversation: str) -> list[api.ChatMessage]:
        return chat.conversation_messages(self.store, conversation)

    def mark_read(self, conversation: str) -> None:
        chat.mark_read(self.store, conversation, self.clock())

    def inbox(self) -> list[api.InboxMessage]:
        return chat.list_inbox(self.store)

    def outbox(self) -> list[api.OutboxMessage]:
        return chat.list_outbox(self.store)

    def _peer_info(self, runner: _LinkRunner) -> api.PeerInfo:
        s = runner.session
        return api.PeerInfo(
            link_key=runner.peer_key, transport=runner.link.transport,
            address=runner.link.address, state=s.state.value, connected_at=runner.connected_at,
            sent=s.sent_items, received=s.received_items, to_send=s._to_send,
            to_receive=s._to_receive,
        )

    def peers(self) -> list[api.PeerInfo]:
        return [self._peer_info(r) for r in self._runners if r.peer_key and not r.session.closed]

    def status(self) -> api.Status:
        stats = self.store.stats()
        return api.Status(
            node_id=self.identity.public.node_id.hex(), name=self.identity.name,
            envelopes=stats.envelopes, bytes=stats.bytes, receipts=stats.receipts,
            carried_for_others=stats.envelopes - stats.local_envelopes,
            peers=[api.to_dict(p) for p in self.peers()], listening=list(self.listening),
            uptime=self.clock() - self._started_at,
            transports={name: status() if callable(status) else status
                        for name, status in self._transport_status.items()},
        )

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            removed = self.store.sweep(self.clock())
            if removed:
                log.info("swept %d expired items", removed)
