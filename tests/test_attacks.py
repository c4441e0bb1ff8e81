"""The published attacks on mesh messengers (Bridgefy 2021/22, BitChat 2025/26), each
shown to fail while honest traffic still flows. Transport-specific rows live next to
their transport (test_hostile_links.py, test_flood.py, the LAN and BLE suites); the
table in docs/threat-model.md points at every test."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mesh import api, wire
from mesh.envelope import CLOCK_SKEW_S, Envelope, Receipt
from mesh.identity import Identity, encode_contact
from mesh.node import Node, NodeConfig
from mesh.noise import generate_keypair
from mesh.sealing import seal_direct
from mesh.session import LinkSession
from mesh.store import AddResult, Store
from tests.helpers import MemorySource, drive, make_envelope, session_pair
from tests.test_node import Clock, Link, befriend, inbox_texts, outbox_state, wait_until

NOW = 1_790_000_000.0


def make_node(tmp_path: Path, name: str, clock: Clock, **config: object) -> Node:
    return Node(Identity.generate(name), Store.open(tmp_path / name / "s.sqlite"),
                NodeConfig(**config), clock=clock)  # type: ignore[arg-type]


# 1, 3: tracking and enumeration before authentication ------------------------------------


def test_pre_auth_bytes_carry_no_static_identifier() -> None:
    """The initiator's first record is magic, version and a fresh ephemeral key: two links
    from the same node share nothing but the 4-byte protocol preamble."""
    key = generate_keypair()
    firsts = [LinkSession(initiator=True, static=key, source=MemorySource(), now=NOW)
              .data_to_send(NOW) for _ in range(3)]
    assert all(f[2:6] == wire.MAGIC + bytes([wire.PROTOCOL_VERSION]) for f in firsts)
    assert len({f[6:] for f in firsts}) == 3
    assert all(key.public not in f for f in firsts)
    # The responder's reply carries its static key only encrypted.
    b = LinkSession(initiator=False, static=key, source=MemorySource(), now=NOW)
    b.receive_data(firsts[0], NOW)
    assert key.public not in b.data_to_send(NOW)


async def test_link_keys_are_not_identity_keys_and_rotate(tmp_path: Path) -> None:
    """What a stranger learns by connecting: a link key, unrelated to the identity and new
    for every run of the node."""
    identity = Identity.generate("alice")
    keys = []
    for run in range(2):
        node = Node(identity, Store.open(tmp_path / f"s{run}.sqlite"))
        keys.append(node._link_key.public)
        await node.stop()
    assert keys[0] != keys[1]
    assert identity.dh_keypair.public not in keys
    assert identity.public.sign_pub not in keys


# 2: social graph --------------------------------------------------------------------------


def test_no_frame_carries_recipients_or_neighbour_lists() -> None:
    names = {f for f in dir(wire) if f[0].isupper()}
    frame_fields = {
        name: set(getattr(wire, name).__dataclass_fields__)
        for name in names if hasattr(getattr(wire, name), "__dataclass_fields__")
    }
    everything = set().union(*frame_fields.values())
    assert not everything & {"recipient", "to", "peers", "neighbours", "contacts", "sender"}


# 8: replays and forged hop counts ----------------------------------------------------------


def test_replayed_envelope_inside_the_window_is_recognised_as_seen(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.sqlite")
    env = make_envelope(1, created_min=int(NOW // 60))
    assert store.add_envelope(env, now=NOW, origin="a") == AddResult.STORED
    store.delete_envelope(env.id, now=NOW)  # delivered: only a tombstone remains
    replay = env.with_mutable(hops_left=64)  # a forged hop count changes nothing
    assert replay.id == env.id
    later = NOW + env.ttl_s + CLOCK_SKEW_S - 120
    store.sweep(later)
    replay.check_fresh(later)  # still inside the acceptance window ...
    assert store.add_envelope(replay, now=later, origin="b") == AddResult.DUPLICATE  # ... and seen


def test_replayed_envelope_after_the_window_is_refused_as_too_old() -> None:
    env = make_envelope(1, created_min=int(NOW // 60))
    with pytest.raises(Exception, match="older than its lifetime"):
        env.check_fresh(NOW + env.ttl_s + CLOCK_SKEW_S + 120)


def test_dedup_state_outlives_the_acceptance_window(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.sqlite")
    env = make_envelope(2, created_min=int(NOW // 60))
    store.add_envelope(env, now=NOW, origin="a")
    store.delete_envelope(env.id, now=NOW)
    last_accepted = env.created_min * 60 + env.ttl_s + CLOCK_SKEW_S
    store.sweep(last_accepted)
    assert store.has(env.id)


# 20: forged receipts -------------------------------------------------------------------------


def test_forged_receipt_purges_nothing_and_real_one_purges(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.sqlite")
    secret = os.urandom(16)
    env = make_envelope(3, created_min=int(NOW // 60), receipt_secret=secret)
    store.add_envelope(env, now=NOW, origin="a")
    for _ in range(50):
        _, purged = store.add_receipt(Receipt(os.urandom(16), int(NOW // 60)), now=NOW)
        assert purged == []
    assert store.get_item(env.id).kind == "envelope"  # type: ignore[union-attr]
    _, purged = store.add_receipt(Receipt(secret, int(NOW // 60)), now=NOW)
    assert purged == [env.id]


def test_receipt_resent_with_another_time_does_not_break_sync() -> None:
    """Anyone who saw a receipt can re-send it with another issued_min; two honest peers
    holding the two copies must still reconcile (regression: an id with two keys)."""
    secret = os.urandom(16)
    sa, sb = MemorySource(), MemorySource()
    sa.add_receipt(Receipt(secret, 29_000_000), NOW)
    sb.add_receipt(Receipt(secret, 29_000_500), NOW)
    for i in range(200):
        env = make_envelope(i)
        sa.add_envelope(env, NOW, local=True)
        sb.add_envelope(env, NOW, local=True)
    a, b = session_pair(sa, sb, NOW)
    drive(a, b, sa, sb, NOW)
    assert not a.closed and not b.closed


# 6: first-contact man in the middle --------------------------------------------------------


async def test_impersonating_a_contact_name_raises_a_key_warning(tmp_path: Path) -> None:
    clock = Clock(NOW)
    alice, bob = make_node(tmp_path, "alice", clock), make_node(tmp_path, "bob", clock)
    befriend(alice, bob)
    mallory = make_node(tmp_path, "mallory", clock)
    mallory.identity = Identity.generate("bob")  # claims bob's name with her own key
    mallory.add_contact("alice", encode_contact(alice.identity.public, "alice"))
    events = alice.subscribe()
    link = Link(mallory, alice)
    mallory.send("alice", "hi it's bob, new phone")
    await wait_until(lambda: len(alice.inbox()) == 1)
    await link.close()
    warnings = []
    while not events.empty():
        ev = events.get_nowait()
        if isinstance(ev, api.KeyWarning):
            warnings.append(ev)
    assert [w.contact for w in warnings] == ["bob"]
    [msg] = alice.inbox()
    assert msg.conversation != "bob" and msg.conversation.startswith("~bob (")
    for node in (alice, bob, mallory):
        await node.stop()


# 24: clock skew -------------------------------------------------------------------------------


@pytest.mark.parametrize("skew_a, skew_c", [(-86_400, 86_400), (86_400, -86_400)])
async def test_nodes_a_day_off_still_deliver_and_nothing_fresh_expires(
        tmp_path: Path, skew_a: float, skew_c: float) -> None:
    real = Clock(NOW)
    clock_a, clock_c = Clock(NOW + skew_a), Clock(NOW + skew_c)
    a = make_node(tmp_path, "a", clock_a, ttl_s=2 * 86_400)
    b = make_node(tmp_path, "b", real)
    c = make_node(tmp_path, "c", clock_c)
    befriend(a, c)
    msg_id = a.send("c", "across skewed clocks")
    ab = Link(a, b)
    await wait_until(lambda: b.store.stats().envelopes == 1)
    await ab.close()
    for clock in (real, clock_a, clock_c):  # a day passes for everyone
        clock.t += 86_400
    assert b.store.sweep(real()) == 0
    assert b.store.stats().envelopes == 1, "a fresh message expired on the relay"
    bc = Link(b, c)
    await wait_until(lambda: inbox_texts(c) == ["across skewed clocks"])
    await bc.close()
    ab2 = Link(a, b)
    await wait_until(lambda: outbox_state(a, msg_id) == api.STATE_DELIVERED)
    await ab2.close()
    for node in (a, b, c):
        await node.stop()


# 10: oracles ------------------------------------------------------------------------------------


def test_every_failure_to_open_looks_the_same() -> None:
    from mesh.sealing import open_direct
    alice, bob, eve = (Identity.generate(n) for n in ("alice", "bob", "eve"))
    env, _ = seal_direct(alice, bob.public, "hello", now=NOW)
    raw = bytearray(env.to_bytes())
    raw[40] ^= 1
    tampered = Envelope.from_bytes(bytes(raw))
    results = {open_direct(eve, env), open_direct(bob, tampered)}
    assert results == {None}


async def test_relay_keeps_serving_after_a_bad_peer_disconnects(tmp_path: Path) -> None:
    clock = Clock(NOW)
    a, b = make_node(tmp_path, "a", clock), make_node(tmp_path, "b", clock)
    befriend(a, b)
    la, lb = __import__("mesh.transports.memory", fromlist=["memory_pipe"]).memory_pipe()
    task = b.add_link(lb, initiator=False)
    await la.write(b"\x00\x05hello")
    await asyncio.wait_for(task, 5)  # type: ignore[arg-type]
    link = Link(a, b)
    a.send("b", "still here")
    await wait_until(lambda: inbox_texts(b) == ["still here"])
    await link.close()
    await a.stop()
    await b.stop()


# 4: broadcast spam and impersonation on the public channel ------------------------------------


async def test_public_channel_shows_a_stranger_only_up_to_its_rate_limit(tmp_path: Path) -> None:
    from mesh.chat import PUBLIC_RATE_PER_HOUR
    clock = Clock(NOW)
    spammer, reader = make_node(tmp_path, "spam", clock), make_node(tmp_path, "reader", clock)
    for i in range(PUBLIC_RATE_PER_HOUR + 5):
        spammer.send("#public", f"buy now {i}")
    link = Link(spammer, reader)
    await wait_until(lambda: reader.store.stats().envelopes >= PUBLIC_RATE_PER_HOUR + 5)
    await link.close()
    shown = [m for m in reader.inbox() if m.conversation == "#public"]
    assert len(shown) == PUBLIC_RATE_PER_HOUR
    for node in (spammer, reader):
        await node.stop()


# 13: amplification ---------------------------------------------------------------------------


def test_a_peer_that_never_acknowledges_gets_at_most_one_window() -> None:
    """A sync request costs the requester a handshake and a reconcile opening; what it can
    make us send before acknowledging anything is bounded by the flow-control window."""
    from mesh.session import EnvelopeReceived, SessionConfig
    relay, greedy = MemorySource(), MemorySource()
    for i in range(3000):
        relay.add_envelope(make_envelope(i, body_len=600, created_min=int(NOW // 60)), NOW,
                           local=True)
    config = SessionConfig(window_bytes=128 * 1024)
    r, g = session_pair(relay, greedy, NOW, config)
    sent_by_relay = 0
    for _ in range(500):
        for me, peer in ((r, g), (g, r)):
            while (event := me.next_event()) is not None:
                assert not (me is r and isinstance(event, EnvelopeReceived))
            data = me.data_to_send(NOW)
            if me is r:
                sent_by_relay += len(data)
            if data:
                peer.receive_data(data, NOW)
    assert 0 < r.sent_items < 3000
    assert r._in_flight_bytes <= 128 * 1024 + 700  # the window, overshot by at most one item
    assert sent_by_relay < 128 * 1024 + 200 * 1024  # one window plus reconciliation
