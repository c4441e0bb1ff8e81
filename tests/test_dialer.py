"""The discovery-hint policy with a hand-advanced clock, the LAN helpers that need no
network, and the one-link-per-pair rule on real nodes joined by memory links."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh import dialer
from mesh.dialer import CandidateTable
from mesh.identity import Identity
from mesh.node import Node, NodeConfig
from mesh.store import Store
from mesh.transports.lan import InterfaceAddress, LanDiscovery, listen_spec
from mesh.transports.memory import memory_pipe


def table(now: float = 0.0, **kw: object) -> CandidateTable:
    return CandidateTable(now, rng=lambda: 0.5, **kw)  # type: ignore[arg-type]


def no_link(_: bytes) -> bool:
    return False


def test_table_is_bounded_and_caps_each_host() -> None:
    t = table()
    for port in range(1000, 1300):
        t.note("10.0.0.66", port, "lan", 0.0)
    assert len(t) == dialer.MAX_PER_HOST
    for i in range(300):
        t.note(f"10.0.{i // 250}.{i % 250}", 7447, "lan", 0.0)
    assert len(t) == dialer.MAX_CANDIDATES


def test_proven_peer_survives_a_flood_and_is_dialed_first() -> None:
    t = table(rate=1000.0, burst=1000)
    honest, _ = t.note("10.0.0.2", 7447, "lan", 0.0)
    assert honest is not None
    got = t.take(1.0, no_link)
    assert got is honest
    t.connected(honest, b"k" * 32)
    t.link_closed(honest, 2.0, handshaken=True, error=True, reason="peer silent")
    for i in range(500):
        t.note(f"10.1.{i // 250}.{i % 250}", 7447, "lan", 2.0 + i / 1000)
    assert t.get("10.0.0.2", 7447) is honest, "a flood evicted a proven peer"
    assert t.take(4.0, no_link) is honest


def test_token_bucket_bounds_attempts() -> None:
    t = table()
    for i in range(64):
        t.note(f"10.0.0.{i}", 7447, "lan", 0.0)
    taken = 0
    now = 1.0
    for _ in range(1000):
        if t.take(now, no_link) is not None:
            taken += 1
        now += 0.01  # 10 s in all
    assert taken <= dialer.DIAL_BURST + dialer.DIAL_RATE * 10 + 1


def test_garbage_host_gets_a_long_backoff_and_a_returning_peer_a_short_one() -> None:
    t = table(rate=1000.0, burst=1000)
    bad, _ = t.note("10.0.0.9", 9000, "lan", 0.0)
    good, _ = t.note("10.0.0.2", 7447, "lan", 0.0)
    assert bad is not None and good is not None
    taken = [t.take(1.0, no_link), t.take(1.0, no_link)]
    assert bad in taken and good in taken
    assert t.link_closed(bad, 1.0, handshaken=False, error=True, reason="not a pigeon link")
    assert bad.next_try - 1.0 >= dialer.GARBAGE_BACKOFF_S * 0.75
    # Evicted by a flood from its host and announced again: the penalty is remembered.
    for port in range(9001, 9001 + dialer.MAX_PER_HOST):
        t.note("10.0.0.9", port, "lan", 2.0)
    assert t.get("10.0.0.9", 9000) is None
    again, _ = t.note("10.0.0.9", 9000, "lan", 3.0)
    assert again is not None and again.garbage == 1 and again.next_try == bad.next_try
    t.connected(good, b"g" * 32)
    assert not t.link_closed(good, 5.0, handshaken=True, error=True, reason="peer silent")
    assert good.next_try - 5.0 <= 1.5
    # While it stays away, the proven address is retried every ~second, not exponentially.
    now = 5.0
    for _ in range(50):
        now = good.next_try
        assert t.take(now, no_link) is good
        t.attempt_failed(good, now)
        assert good.next_try - now <= 1.5
    # An unproven address that keeps failing backs off exponentially, with a cap.
    t = table(rate=1000.0, burst=1000)
    other, _ = t.note("10.0.0.3", 7447, "lan", now)
    assert other is not None
    for _ in range(20):
        now = other.next_try
        assert t.take(now, no_link) is other
        t.attempt_failed(other, now)
    assert dialer.BACKOFF_MAX_S * 0.75 <= other.next_try - now <= dialer.BACKOFF_MAX_S * 1.25


def test_a_peer_we_already_have_is_not_dialed_again() -> None:
    t = table(rate=1000.0, burst=1000)
    cand, _ = t.note("10.0.0.2", 7447, "lan", 0.0)
    assert cand is not None
    assert t.take(1.0, no_link) is cand
    t.connected(cand, b"r" * 32)
    t.link_closed(cand, 2.0, handshaken=True, error=False, reason=dialer.DUPLICATE_REASON)
    assert t.take(10.0, lambda key: key == b"r" * 32) is None
    assert t.take(10.0, no_link) is cand


def test_stale_candidates_expire_and_goodbyes_forget() -> None:
    t = table()
    t.note("10.0.0.2", 7447, "lan", 0.0)
    t.note("10.0.0.3", 7447, "lan", 0.0)
    assert t.forget("10.0.0.3", 7447, 0.0) is not None
    assert [c.host for c in t.expire(dialer.CANDIDATE_TTL_S + 1)] == ["10.0.0.2"]
    assert len(t) == 0
    # A (spoofable) goodbye does not make us forget a peer that carried a real link lately.
    proven, _ = t.note("10.0.0.4", 7447, "lan", 5000.0)
    assert proven is not None and t.take(5000.0 + 1, no_link) is proven
    t.connected(proven, b"p" * 32)
    t.link_closed(proven, 5002.0, handshaken=True, error=False, reason="link lost")
    assert t.forget("10.0.0.4", 7447, 5003.0) is None
    assert t.get("10.0.0.4", 7447) is proven


# ---- LAN helpers ----------------------------------------------------------------------


def test_listen_spec_reads_the_node_listeners() -> None:
    both = listen_spec(["0.0.0.0:7447", ":::7447"])
    assert both is not None and both.port == 7447 and both.any_v4 and both.any_v6
    v4 = listen_spec(["0.0.0.0:9000"])
    assert v4 is not None and v4.any_v4 and not v4.any_v6
    assert listen_spec(["127.0.0.1:7447", "::1:7447"]) is None
    one = listen_spec(["10.0.0.5:7000"])
    assert one is not None and one.reaches(InterfaceAddress("eth0", "10.0.0.5", 24))
    assert not one.reaches(InterfaceAddress("eth0", "10.0.0.6", 24))


class _Sink:
    def __init__(self) -> None:
        self.listening = ["0.0.0.0:7447"]

    def connect_discovered(self, host: str, port: int, transport: str = "lan") -> None: ...

    def forget_discovered(self, host: str, port: int) -> None: ...


def test_only_on_link_addresses_are_dialable() -> None:
    sink = _Sink()
    lan = LanDiscovery(sink, listen=listen_spec(sink.listening))
    lan._snapshot = frozenset({InterfaceAddress("eth0", "10.9.0.1", 24),
                               InterfaceAddress("eth0", "fe80::1", 64, 3)})
    assert lan._dialable("10.9.0.7") == "10.9.0.7"
    assert lan._dialable("127.0.0.1") is None
    assert lan._dialable("8.8.8.8") is None
    assert lan._dialable("10.10.0.7") is None
    assert lan._dialable("fe80::2%3") == "fe80::2%3"
    assert lan._dialable("fe80::2") == "fe80::2%3"
    assert lan._dialable("fe80::2%9") is None
    assert lan._dialable("2001:db8::1") is None
    assert lan._dialable("not an address") is None


# ---- one link per pair ------------------------------------------------------------------


def _node(tmp_path: Path, name: str) -> Node:
    return Node(Identity.generate(name), Store.open(tmp_path / name / "store.sqlite"), NodeConfig())


async def test_simultaneous_dials_leave_exactly_one_link(tmp_path: Path) -> None:
    a, b = _node(tmp_path, "a"), _node(tmp_path, "b")
    await a.start()
    await b.start()
    try:
        # Both dial at once: two links, each side initiator of one.
        a1, b1 = memory_pipe("a", "b")
        b2, a2 = memory_pipe("b", "a")
        a.add_link(a1, initiator=True)
        b.add_link(b1, initiator=False)
        b.add_link(b2, initiator=True)
        a.add_link(a2, initiator=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline and (len(a._runners) != 1 or len(b._runners) != 1):
            await asyncio.sleep(0.02)
        assert len(a.peers()) == 1 and len(b.peers()) == 1
        # Both kept the same link: the one A initiated iff A's link key is the smaller.
        a_kept_own = next(r for r in a._runners if not r.session.closed).session.initiator
        b_kept_own = next(r for r in b._runners if not r.session.closed).session.initiator
        assert a_kept_own != b_kept_own
        assert a_kept_own == (a._link_key.public < b._link_key.public)
    finally:
        await a.stop()
        await b.stop()
        a.store.close()
        b.store.close()
