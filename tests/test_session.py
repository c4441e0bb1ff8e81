"""The sans-IO session, two ends joined in memory with a hand-held clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.envelope import Receipt
from mesh.noise import generate_keypair
from mesh.session import (
    EnvelopeReceived,
    HandshakeCompleted,
    ItemsAcknowledged,
    LinkClosed,
    LinkSession,
    ReceiptReceived,
    ReconcileCompleted,
    SessionConfig,
    State,
    SyncCompleted,
)
from tests.helpers import MemorySource, drive, make_envelope, session_pair

NOW = 29_000_000 * 60.0 + 600


def fill(src: MemorySource, ids: range | list[int], **kw: object) -> list[bytes]:
    out = []
    for i in ids:
        env = make_envelope(i, **kw)  # type: ignore[arg-type]
        src.add_envelope(env, NOW, local=True)
        out.append(env.id)
    return out


def closed_events(events: list[object]) -> list[LinkClosed]:
    return [e for e in events if isinstance(e, LinkClosed)]


def test_two_empty_nodes_handshake_and_go_live() -> None:
    sa, sb = MemorySource(), MemorySource()
    a, b = session_pair(sa, sb, NOW)
    ea, eb = drive(a, b, sa, sb, NOW)
    assert any(isinstance(e, HandshakeCompleted) for e in ea)
    assert any(isinstance(e, SyncCompleted) for e in ea)
    assert any(isinstance(e, SyncCompleted) for e in eb)
    assert a.state == b.state == State.LIVE
    assert a.reconcile_rounds == 1


def test_stores_of_10000_differing_by_10_reconcile_in_3_round_trips() -> None:
    sa, sb = MemorySource(), MemorySource()
    common = list(range(10_000))
    fill(sa, common)
    fill(sb, common)
    rng = random.Random(7)
    only_a = fill(sa, rng.sample(range(10_000, 20_000), 5))
    only_b = fill(sb, rng.sample(range(20_000, 30_000), 5))
    a, b = session_pair(sa, sb, NOW)
    ea, eb = drive(a, b, sa, sb, NOW)
    rounds = [e.round_trips for e in ea if isinstance(e, ReconcileCompleted)]
    assert rounds and rounds[0] <= 3
    assert set(sa.items) == set(sb.items)
    assert set(only_a) <= set(sb.items) and set(only_b) <= set(sa.items)
    assert sum(isinstance(e, EnvelopeReceived) for e in eb) == 5
    assert sum(isinstance(e, EnvelopeReceived) for e in ea) == 5


def test_receipts_are_sent_before_envelopes() -> None:
    sa, sb = MemorySource(), MemorySource()
    fill(sa, range(50))
    receipts = [Receipt(secret=bytes([i]) * 16, issued_min=29_000_100) for i in range(1, 6)]
    for r in receipts:
        sa.add_receipt(r, NOW)
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW)
    first = sb.received_order[:5]
    assert set(first) == {r.id for r in receipts}
    assert len(sb.received_order) == 55


def test_receipt_purges_the_relay_copy_and_is_not_answered_with_the_envelope() -> None:
    secret = b"s" * 16
    env = make_envelope(1, receipt_secret=secret)
    relay, recipient = MemorySource(), MemorySource()
    relay.add_envelope(env, NOW)
    recipient.add_envelope(env, NOW)
    recipient.add_receipt(Receipt(secret=secret, issued_min=29_000_050), NOW)
    a, b = session_pair(relay, recipient, NOW)
    drive(a, b, relay, recipient, NOW)
    assert relay.items[env.id].kind == "tombstone"
    assert relay.items[env.id].data is None


def test_disconnect_mid_transfer_resumes_without_resending_acknowledged() -> None:
    sa, sb = MemorySource(), MemorySource()
    fill(sa, range(400), body_len=600)
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW, byte_budget=120_000)
    got_first = len(sb.items)
    assert 0 < got_first < 400
    a2, b2 = session_pair(sa, sb, NOW + 5)
    _, eb = drive(a2, b2, sa, sb, NOW + 5)
    second = [e.envelope.id for e in eb if isinstance(e, EnvelopeReceived)]
    assert len(second) == 400 - got_first
    assert set(sb.items) == set(sa.items)


def test_live_push_after_sync() -> None:
    sa, sb = MemorySource(), MemorySource()
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW)
    [new_id] = fill(sb, [77])
    b.offer([new_id])
    ea, eb = drive(a, b, sa, sb, NOW + 1)
    assert [e.envelope.id for e in ea if isinstance(e, EnvelopeReceived)] == [new_id]
    assert any(isinstance(e, ItemsAcknowledged) and new_id in e.ids for e in eb)


def test_live_push_costs_one_record_each_way() -> None:
    """Once live, a pushed envelope is one record and its Ack one record: no Idle frames
    (they only end the initial sync) after every item."""
    sa, sb = MemorySource(), MemorySource()
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW)
    assert a.state == b.state == State.LIVE
    for n in range(3):
        [new_id] = fill(sb, [100 + n])
        b.offer([new_id])
        sent_b, sent_a = b.bytes_sent, a.bytes_sent
        drive(a, b, sa, sb, NOW + 1 + n)
        envelope_record = 2 + wire.padded_length(
            2 + len(wire.encode_frame(wire.Items(items=((wire.ItemKind.ENVELOPE,
                                                         sb.get_item(new_id).data),))))) + 16
        assert b.bytes_sent - sent_b == envelope_record
        assert a.bytes_sent - sent_a == 2 + 64 + 16  # the Ack


def test_offer_during_reconciliation_is_not_lost() -> None:
    sa, sb = MemorySource(), MemorySource()
    fill(sa, range(100))
    a, b = session_pair(sa, sb, NOW)
    b.receive_data(a.data_to_send(NOW), NOW)  # msg1 only: still handshaking
    [late] = fill(sb, [5000])
    b.offer([late])
    drive(a, b, sa, sb, NOW)
    assert late in sa.items


def test_hops_exhausted_envelopes_are_not_forwarded() -> None:
    sa, sb = MemorySource(), MemorySource()
    env = make_envelope(3, hops=1)
    sa.add_envelope(env, NOW)  # received from someone: stored with hops 0
    assert sa.items[env.id].hops_left == 0
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW)
    assert env.id not in sb.items


def test_flow_control_bounds_unacknowledged_bytes() -> None:
    sa, sb = MemorySource(), MemorySource()
    fill(sa, range(300), body_len=4000)
    config = SessionConfig(window_bytes=64 * 1024)
    a, b = session_pair(sa, sb, NOW, config)
    ea, eb = [], []
    # Drive but never acknowledge on b's side.
    for _ in range(200):
        for me, peer in ((a, b), (b, a)):
            while (event := me.next_event()) is not None:
                (ea if me is a else eb).append(event)
            data = me.data_to_send(NOW)
            if data:
                peer.receive_data(data, NOW)
    received = sum(isinstance(e, EnvelopeReceived) for e in eb)
    assert 0 < received * 4000 <= 64 * 1024 + 4100


# ---- hostile peers ---------------------------------------------------------------------


def handshaken(config: SessionConfig | None = None) -> tuple[LinkSession, LinkSession,
                                                              MemorySource, MemorySource]:
    sa, sb = MemorySource(), MemorySource()
    a, b = session_pair(sa, sb, NOW, config)
    drive(a, b, sa, sb, NOW)
    return a, b, sa, sb


def test_garbage_after_handshake_closes_with_a_reason() -> None:
    _, b, *_ = handshaken()
    b.receive_data(wire.StreamFramer.encode(b"\x00" * 100), NOW)
    events = []
    while (e := b.next_event()) is not None:
        events.append(e)
    [closed] = closed_events(events)
    assert closed.error and b.closed


def test_replayed_record_closes_the_link() -> None:
    sa, sb = MemorySource(), MemorySource()
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW)
    a.handle_timer(NOW + 3)  # produces a ping
    ping = a.data_to_send(NOW + 3)
    assert ping
    b.receive_data(ping, NOW + 3)
    assert not b.closed
    b.receive_data(ping, NOW + 3)
    events = []
    while (e := b.next_event()) is not None:
        events.append(e)
    assert closed_events(events) and closed_events(events)[0].error
    assert b.closed


def test_not_a_pigeon_peer_is_closed() -> None:
    b = LinkSession(initiator=False, static=generate_keypair(), source=MemorySource(), now=NOW)
    b.receive_data(wire.StreamFramer.encode(b"GET / HTTP/1.1\r\n"), NOW)
    assert b.closed
    assert "not a pigeon link" in closed_events([b.next_event()])[0].reason


def test_version_below_minimum_is_refused() -> None:
    b = LinkSession(initiator=False, static=generate_keypair(), source=MemorySource(), now=NOW)
    b.receive_data(wire.StreamFramer.encode(wire.MAGIC + b"\x00" + bytes(32)), NOW)
    assert "below minimum" in closed_events([b.next_event()])[0].reason


def test_preamble_is_bound_into_the_handshake() -> None:
    """A man in the middle that rewrites the version byte breaks the handshake."""
    sa, sb = MemorySource(), MemorySource()
    a, b = session_pair(sa, sb, NOW)
    first = bytearray(a.data_to_send(NOW))
    first[2 + 3] = wire.PROTOCOL_VERSION + 1  # claim another version
    b.receive_data(bytes(first), NOW)
    assert b.closed


def test_handshake_timeout_and_idle_timeout() -> None:
    b = LinkSession(initiator=False, static=generate_keypair(), source=MemorySource(), now=NOW)
    assert b.get_timer() == NOW + 10
    b.handle_timer(NOW + 10)
    assert b.closed and "handshake timed out" in closed_events([b.next_event()])[0].reason
    _, b2, *_ = handshaken()
    b2.handle_timer(NOW + 11)
    events = []
    while (e := b2.next_event()) is not None:
        events.append(e)
    assert "peer silent" in closed_events(events)[0].reason


def encrypted_frame(sender: LinkSession, frame: wire.Frame) -> bytes:
    sender._send_frame(frame)
    return sender.data_to_send(NOW)


def test_items_before_reconciliation_close_the_link() -> None:
    sa, sb = MemorySource(), MemorySource()
    fill(sa, range(100))
    a, b = session_pair(sa, sb, NOW)
    # Complete only the handshake: msg1, msg2, msg3 (a then sends its first reconcile).
    b.receive_data(a.data_to_send(NOW), NOW)
    a.receive_data(b.data_to_send(NOW), NOW)
    a_out = a.data_to_send(NOW)
    assert a.state == State.RECONCILING
    b.receive_data(a_out, NOW)
    env = make_envelope(1)
    data = encrypted_frame(a, wire.Items(items=((wire.ItemKind.ENVELOPE, env.to_bytes()),)))
    assert b.state == State.RECONCILING
    b.receive_data(data, NOW)
    events = []
    while (e := b.next_event()) is not None:
        events.append(e)
    assert b.closed
    assert "before reconciliation finished" in closed_events(events)[0].reason
    assert not any(isinstance(e, EnvelopeReceived) for e in events)


def test_unsolicited_reconcile_after_sync_closes() -> None:
    from mesh.reconcile import Reconciler
    a, b, *_ = handshaken()
    msg = Reconciler([]).initiate()
    b.receive_data(encrypted_frame(a, wire.Reconcile(message=msg)), NOW)
    assert b.closed


def test_acks_for_unsent_ids_are_ignored_and_wants_for_unknown_ids_send_nothing() -> None:
    a, b, *_ = handshaken()
    b.receive_data(encrypted_frame(a, wire.Ack(ids=(b"x" * 16,), refused=())), NOW)
    b.receive_data(encrypted_frame(a, wire.Want(ids=(b"y" * 16, b"z" * 16))), NOW)
    assert not b.closed
    out = b.data_to_send(NOW)
    a.receive_data(out, NOW)
    events = []
    while (e := a.next_event()) is not None:
        events.append(e)
    assert not any(isinstance(e, EnvelopeReceived | ReceiptReceived) for e in events)


def test_malformed_envelope_in_items_closes_with_reason() -> None:
    a, b, *_ = handshaken()
    b.receive_data(encrypted_frame(a, wire.Items(items=((wire.ItemKind.ENVELOPE, b"\x01" * 10),))),
                   NOW)
    events = []
    while (e := b.next_event()) is not None:
        events.append(e)
    assert "envelope truncated" in closed_events(events)[0].reason


def test_stale_envelopes_are_dropped_not_stored() -> None:
    a, b, *_ = handshaken()
    old = make_envelope(1, created_min=1_000)  # 1971
    b.receive_data(encrypted_frame(a, wire.Items(items=((wire.ItemKind.ENVELOPE, old.to_bytes()),))),
                   NOW)
    events = []
    while (e := b.next_event()) is not None:
        events.append(e)
    assert not b.closed
    assert not any(isinstance(e, EnvelopeReceived) for e in events)


@given(st.binary(min_size=1, max_size=3000))
@settings(max_examples=150, deadline=None)
def test_random_bytes_at_any_stage_never_raise(data: bytes) -> None:
    for stage in range(3):
        sa, sb = MemorySource(), MemorySource()
        a, b = session_pair(sa, sb, NOW)
        if stage >= 1:
            b.receive_data(a.data_to_send(NOW), NOW)
        if stage >= 2:
            drive(a, b, sa, sb, NOW)
        b.receive_data(data, NOW)
        b.receive_data(wire.StreamFramer.encode(data[:65535]), NOW)
        while b.next_event() is not None:
            pass


def test_connecting_to_ourselves_is_refused() -> None:
    key = generate_keypair()
    src = MemorySource()
    a = LinkSession(initiator=True, static=key, source=src, now=NOW)
    b = LinkSession(initiator=False, static=key, source=src, now=NOW)
    drive(a, b, src, src, NOW)
    assert a.closed or b.closed


@pytest.mark.parametrize("n_items", [0, 1, 20])
def test_bytes_on_wire_are_padded_buckets(n_items: int) -> None:
    sa, sb = MemorySource(), MemorySource()
    fill(sa, range(n_items))
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW)
    a.handle_timer(NOW + 3)
    out = a.data_to_send(NOW + 3)
    # One padded ping: 2-byte record length + 64-byte bucket + 16-byte tag.
    assert len(out) == 2 + 64 + 16


def test_hello_with_a_tiny_frame_limit_closes_cleanly() -> None:
    """A peer announcing an unusable frame size gets a closed link, never an exception."""
    sa, sb = MemorySource(), MemorySource()
    a, b = session_pair(sa, sb, NOW, SessionConfig(max_frame=100))
    ea, _ = drive(a, b, sa, sb, NOW)
    assert a.closed and "frame limit too small" in closed_events(ea)[0].reason
    b.handle_timer(NOW + 60)
    assert b.closed


def test_records_after_msg3_in_the_same_read_are_accepted() -> None:
    """The handshake record cap must not apply to transport records that arrive together
    with the last handshake message."""
    sa, sb = MemorySource(), MemorySource()
    fill(sa, range(3000))
    a, b = session_pair(sa, sb, NOW)
    b.receive_data(a.data_to_send(NOW), NOW)
    a.receive_data(b.data_to_send(NOW), NOW)
    # A 1 KiB record right behind msg3 (a Want, out of place: the session says so).
    a._send_frame(wire.Want(ids=tuple(bytes([i]) * 16 for i in range(60))))
    data = a.data_to_send(NOW)
    assert len(data) > 1000
    b.receive_data(data, NOW)
    events = []
    while (e := b.next_event()) is not None:
        events.append(e)
    [closed] = closed_events(events)
    assert "want before reconciliation finished" in closed.reason
