"""The sans-IO BLE framing: fragments shuttled in memory with a hand-held clock."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import LocalProtocolError
from mesh.session import LinkSession, State
from mesh.transports.ble import BleLink
from mesh.transports.ble_framing import (
    CLOSE,
    CREDIT,
    DATA,
    DEFAULT_WINDOW,
    HEADER,
    MAX_CHUNK,
    MAX_FRAGMENT,
    OPEN,
    OPEN_SIZE,
    SEQ_MOD,
    BleFraming,
    decode_header,
    decode_open,
    encode_fragment,
    encode_open,
    pick_link_id,
)
from tests.helpers import MemorySource, make_envelope, session_pair

NOW = 29_000_000 * 60.0 + 600


def rng(seed: int) -> random.Random:
    return random.Random(seed)


def pair(chunk: int, seed: int = 1, **kw: int) -> tuple[BleFraming, BleFraming]:
    r = rng(seed)
    central = BleFraming(r.randbytes, chunk, NOW, initiator=True, **kw)
    peripheral = BleFraming(r.randbytes, chunk, NOW, initiator=False, **kw)
    return central, peripheral


def shuttle(a: BleFraming, b: BleFraming, now: float = NOW,
            log: list[bytes] | None = None) -> tuple[bytes, bytes]:
    """Deliver fragments both ways until quiet; returns (bytes a received, bytes b received)."""
    got_a, got_b = bytearray(), bytearray()
    while True:
        moved = False
        for me, peer, got in ((a, b, got_b), (b, a, got_a)):
            for frag in me.fragments_to_send(now):
                assert len(frag) <= me.chunk
                if log is not None:
                    log.append(frag)
                peer.receive_fragment(frag, now)
                moved = True
            got += peer.received_data()
        if not moved:
            return bytes(got_a), bytes(got_b)


frag = encode_fragment


def opened(chunk: int = 20, **kw: int) -> tuple[BleFraming, BleFraming]:
    a, b = pair(chunk, **kw)
    shuttle(a, b)
    assert a.peer_id == b.my_id and b.peer_id == a.my_id
    return a, b


# ---- round trips ------------------------------------------------------------------


@settings(max_examples=60)
@given(chunk=st.integers(20, 520), parts_ab=st.lists(st.binary(max_size=3000), max_size=6),
       parts_ba=st.lists(st.binary(max_size=3000), max_size=6), seed=st.integers(0, 2**32))
def test_random_streams_round_trip(chunk: int, parts_ab: list[bytes], parts_ba: list[bytes],
                                   seed: int) -> None:
    a, b = pair(chunk, seed)
    got_a, got_b = bytearray(), bytearray()
    for i in range(max(len(parts_ab), len(parts_ba))):
        if i < len(parts_ab):
            a.send(parts_ab[i])
        if i < len(parts_ba):
            b.send(parts_ba[i])
        ra, rb = shuttle(a, b)
        got_a += ra
        got_b += rb
    assert bytes(got_b) == b"".join(parts_ab)
    assert bytes(got_a) == b"".join(parts_ba)
    assert not a.closed and not b.closed
    assert a.chunk == min(chunk, MAX_CHUNK)


def test_chunk_size_change_mid_stream() -> None:
    a, b = opened(500)
    data = random.Random(3).randbytes(20_000)
    a.send(data[:10_000])
    first = a.fragments_to_send(NOW)
    a.set_chunk_size(20)
    b.set_chunk_size(20)
    a.send(data[10_000:])
    for f in first:
        b.receive_fragment(f, NOW)
    _, got = shuttle(a, b)
    assert got == data and not b.closed
    with pytest.raises(LocalProtocolError):
        a.set_chunk_size(19)


def test_goodput_ratio() -> None:
    # 4-byte header: 16 of 20 bytes at MTU 23 (the old 6-byte one reached at most 0.70).
    for chunk, floor in ((20, 0.78), (500, 0.98)):
        a, b = pair(chunk)
        data = random.Random(chunk).randbytes(200_000)
        log: list[bytes] = []
        a.send(data)
        _, got = shuttle(a, b, log=log)
        assert got == data
        ratio = len(data) / sum(map(len, log))  # every fragment, both directions
        print(f"chunk {chunk}: goodput {ratio:.3f} over {len(log)} fragments")
        assert ratio >= floor


# ---- the real session over BLE framing ----------------------------------------------


def drive_over_ble(a: LinkSession, b: LinkSession, sa: MemorySource, sb: MemorySource,
                   fa: BleFraming, fb: BleFraming) -> None:
    for _ in range(200_000):
        progressed = False
        for sess, src, me, peer_sess, peer in ((a, sa, fa, b, fb), (b, sb, fb, a, fa)):
            while (event := sess.next_event()) is not None:
                src.handle(sess, event, NOW)
                progressed = True
            data = sess.data_to_send(NOW)
            if data:
                me.send(data)
                progressed = True
            for f in me.fragments_to_send(NOW):
                peer.receive_fragment(f, NOW)
                progressed = True
            stream = peer.received_data()
            if stream:
                peer_sess.receive_data(stream, NOW)
        if not progressed:
            return
    raise AssertionError("did not go quiet")


@pytest.mark.parametrize("chunk", [20, 500])
def test_session_pair_syncs_200_envelopes_each_way(chunk: int) -> None:
    sa, sb = MemorySource(), MemorySource()
    for i in range(200):
        sa.add_envelope(make_envelope(i), NOW, local=True)
        sb.add_envelope(make_envelope(10_000 + i), NOW, local=True)
    a, b = session_pair(sa, sb, NOW)
    fa, fb = pair(chunk)
    drive_over_ble(a, b, sa, sb, fa, fb)
    assert a.state == b.state == State.LIVE
    assert set(sa.items) == set(sb.items) and len(sa.items) == 400
    assert not fa.closed and not fb.closed
    assert sum(1 for i in sb.received_order if i in sa.items) == 200


# ---- flow control -------------------------------------------------------------------


def test_receiver_that_never_drains_bounds_in_flight_then_times_out() -> None:
    a, b = opened(20, window=8)
    a.send(b"x" * 10_000)
    sent = 0
    for t in range(50):
        for f in a.fragments_to_send(NOW + t * 0.1):
            b.receive_fragment(f, NOW)
            sent += 1
        b.fragments_to_send(NOW)  # b never calls received_data, so never returns credit
    assert sent == 8
    assert a.pending == 10_000 - 8 * (20 - HEADER)
    deadline = a.get_timer()
    assert deadline is not None and deadline <= NOW + 15.0
    a.handle_timer(deadline - 0.01)
    assert not a.closed
    a.handle_timer(deadline)
    assert a.closed and a.close_reason == "peer granted no credit"


def test_credit_is_returned_after_draining() -> None:
    a, b = opened(20)
    a.send(b"y" * 50_000)
    _, got = shuttle(a, b)
    assert got == b"y" * 50_000


def test_data_beyond_credit_closes_with_bounded_memory() -> None:
    _, b = opened(500, window=4)
    # A hostile peer ignores the window and floods maximal fragments.
    peak = 0
    for seq in range(1, 200):
        b.receive_fragment(frag(b.my_id, DATA, seq, b"z" * (MAX_FRAGMENT - HEADER)), NOW)
        peak = max(peak, len(b._in))
    assert peak == 4 * (MAX_FRAGMENT - HEADER)
    assert b.closed and b.close_reason == "data beyond granted credit"
    assert len(b.received_data()) == 0  # closed: buffers released


def test_oversized_fragment_closes() -> None:
    _, b = opened(500)
    b.receive_fragment(frag(b.my_id, DATA, 1, b"o" * MAX_FRAGMENT), NOW)
    assert b.closed and "exceeds" in (b.close_reason or "")


def test_credit_beyond_window_closes() -> None:
    a, _ = opened(20, window=4)
    a.receive_fragment(frag(a.my_id, 1, 1, struct.pack(">H", 1)), NOW)
    assert a.closed and a.close_reason == "credit beyond the announced window"


# ---- addressing, gaps, duplicates -------------------------------------------------


def test_notifications_for_other_subscribers_and_stale_links_are_ignored() -> None:
    r = rng(9)
    ca = BleFraming(r.randbytes, 20, NOW, initiator=True)
    cb = BleFraming(r.randbytes, 20, NOW, initiator=True)
    pa = BleFraming(r.randbytes, 20, NOW, initiator=False)
    pb = BleFraming(r.randbytes, 20, NOW, initiator=False)
    stale = BleFraming(r.randbytes, 20, NOW, initiator=False)
    stale.receive_fragment(BleFraming(r.randbytes, 20, NOW, initiator=True)
                           .fragments_to_send(NOW)[0], NOW)
    stale.send(b"old link")
    ca.send(b"from A")
    cb.send(b"from B")
    pa.send(b"to A" * 50)
    pb.send(b"to B" * 50)
    got = {ca: bytearray(), cb: bytearray(), pa: bytearray(), pb: bytearray()}
    for _ in range(50):
        for central, periph in ((ca, pa), (cb, pb)):  # writes are unicast
            for f in central.fragments_to_send(NOW):
                periph.receive_fragment(f, NOW)
        for periph in (pa, pb, stale):  # notifications reach every subscriber
            for f in periph.fragments_to_send(NOW):
                ca.receive_fragment(f, NOW)
                cb.receive_fragment(f, NOW)
        for side in got:
            got[side] += side.received_data()
    assert bytes(got[ca]) == b"to A" * 50 and bytes(got[cb]) == b"to B" * 50
    assert bytes(got[pa]) == b"from A" and bytes(got[pb]) == b"from B"
    assert not any(s.closed for s in got)
    assert ca.ignored > 0 and cb.ignored > 0


@pytest.mark.parametrize("fault", ["gap", "duplicate"])
def test_gap_or_duplicate_closes_and_tells_the_peer(fault: str) -> None:
    a, b = opened(20)
    a.send(b"q" * 200)
    frags = a.fragments_to_send(NOW)
    frags = [frags[0], *frags[2:]] if fault == "gap" else [frags[0], frags[0], *frags[1:]]
    for f in frags:
        b.receive_fragment(f, NOW)
    assert b.closed and (b.close_reason or "").startswith(
        "fragment gap" if fault == "gap" else "duplicate fragment")
    [close] = b.fragments_to_send(NOW)
    assert decode_header(close)[1] == CLOSE
    a.receive_fragment(close, NOW)
    assert a.closed and (a.close_reason or "").startswith("peer closed: ")
    assert b.fragments_to_send(NOW) == [] and b.get_timer() is None


def test_seq_wraps() -> None:
    a, b = opened(20)
    data = random.Random(5).randbytes((SEQ_MOD + 500) * (20 - HEADER))
    a.send(data)
    _, got = shuttle(a, b)
    assert got == data and not b.closed


def test_floods_of_foreign_and_short_fragments_cost_nothing() -> None:
    _, b = opened(500)
    for i in range(20_000):
        b.receive_fragment(frag(b.my_id ^ (i + 1), DATA, i, b"f" * 400), NOW)
        b.receive_fragment(b"\x00" * (i % HEADER), NOW)
    assert not b.closed and b.received_data() == b""
    assert b.ignored == 40_000


# ---- layout and link ids ------------------------------------------------------------


def fixed(*chunks: bytes) -> Callable[[int], bytes]:
    """An rng that returns ``chunks`` in turn, then repeats the last one forever."""
    queue = list(chunks)

    def draw(n: int) -> bytes:
        out = queue.pop(0) if len(queue) > 1 else queue[0]
        assert len(out) == n
        return out
    return draw


def test_fragment_layout_is_a_16_bit_id_then_type_and_seq() -> None:
    a = BleFraming(fixed(b"\x12\x34"), 20, NOW, initiator=True, window=64)
    b = BleFraming(fixed(b"\xbe\xef"), 20, NOW, initiator=False, window=8)
    [open_a] = a.fragments_to_send(NOW)
    # dst 0 | OPEN, seq 0 | a's id | window 64
    assert open_a == bytes.fromhex("0000" "8000" "1234" "0040") and len(open_a) == OPEN_SIZE
    assert decode_header(open_a) == (0, OPEN, 0)
    b.receive_fragment(open_a, NOW)
    [open_b] = b.fragments_to_send(NOW)
    assert open_b == bytes.fromhex("1234" "8000" "beef" "0008")
    a.receive_fragment(open_b, NOW)
    a.send(bytes(range(40)))
    data = a.fragments_to_send(NOW)
    # Every DATA fragment: b's id, DATA with a's next seq, then 16 stream bytes at MTU 23.
    assert data[0] == bytes.fromhex("beef" "0001") + bytes(range(16))
    assert data[1] == bytes.fromhex("beef" "0002") + bytes(range(16, 32))
    assert data[2] == bytes.fromhex("beef" "0003") + bytes(range(32, 40))
    assert HEADER == 4 and all(len(f) <= 20 for f in data)
    assert decode_header(encode_fragment(0xBEEF, CREDIT, SEQ_MOD + 5, b"")) == (
        0xBEEF, CREDIT, 5)
    assert decode_open(encode_open(0x1234, 64)) == (0x1234, 64)


def test_link_ids_are_16_bit_never_0_and_never_taken() -> None:
    assert pick_link_id(fixed(b"\x00\x00", b"\x00\x07", b"\x00\x09"), {7}) == 9
    # An rng that keeps repeating a taken id (or 0) still yields a free id, by scanning.
    assert pick_link_id(fixed(b"\x00\x07"), {7, 8}) == 9
    assert pick_link_id(fixed(b"\xff\xff"), {0xFFFF}) == 1
    assert pick_link_id(fixed(b"\x00\x00"), range(1, 65535)) == 65535
    with pytest.raises(LocalProtocolError):
        pick_link_id(fixed(b"\x00\x05"), range(1, 65536))
    r = rng(4)
    taken: set[int] = set()
    for _ in range(2000):  # ids a host holds at once never repeat, even from one stream
        f = BleFraming(r.randbytes, 20, NOW, initiator=bool(len(taken) % 2), taken=taken)
        assert 1 <= f.my_id <= 0xFFFF and f.my_id not in taken
        taken.add(f.my_id)
    live = BleFraming(fixed(b"\x00\x2a"), 20, NOW, initiator=True)
    again = BleFraming(fixed(b"\x00\x2a"), 20, NOW, initiator=True, taken={live.my_id})
    assert live.my_id == 42 and again.my_id != 42


def test_colliding_ids_close_instead_of_mixing_streams() -> None:
    """Two centrals of one peripheral (BlueZ notifies both) drew the same id: what the
    framing cannot prevent, it turns into a close; an end that stays open got only its own
    peer's bytes (the rest is Noise's to refuse: see the module docstring)."""
    for first in ("pa", "pb"):
        ca = BleFraming(fixed(b"\x0b\xad"), 20, NOW, initiator=True)
        cb = BleFraming(fixed(b"\x0b\xad"), 20, NOW, initiator=True)
        pa = BleFraming(fixed(b"\x00\x01"), 20, NOW, initiator=False)
        pb = BleFraming(fixed(b"\x00\x02"), 20, NOW, initiator=False)
        assert ca.my_id == cb.my_id
        streams = {pa: b"to A" * 50, pb: b"to B" * 50, ca: b"from A" * 9, cb: b"from B" * 9}
        peer_of = {ca: pa, cb: pb, pa: ca, pb: cb}
        for side, data in streams.items():
            side.send(data)
        got = {side: bytearray() for side in streams}
        order = (pa, pb) if first == "pa" else (pb, pa)
        for _ in range(50):
            for central, periph in ((ca, pa), (cb, pb)):  # writes are unicast
                for f in central.fragments_to_send(NOW):
                    periph.receive_fragment(f, NOW)
                    got[periph] += periph.received_data()
            for periph in order:  # notifications reach every subscriber
                for f in periph.fragments_to_send(NOW):
                    for central in (ca, cb):
                        central.receive_fragment(f, NOW)
                        got[central] += central.received_data()
        reasons = {ca.close_reason, cb.close_reason} - {None}
        assert reasons and all(r.startswith(("duplicate fragment", "fragment gap",
                                             "second OPEN", "peer closed"))
                               for r in reasons), reasons
        for side in streams:  # open ends got only their own peer's bytes, all if it is open
            expected = streams[peer_of[side]]
            if not side.closed:
                assert expected.startswith(bytes(got[side])), side
            if not side.closed and not peer_of[side].closed:
                assert bytes(got[side]) == expected


async def test_ble_links_of_one_process_never_share_an_id() -> None:
    """``BleLink`` passes its live siblings' ids as ``taken`` and frees its own only once
    its connection is torn down (a stale link's leftovers can arrive until then)."""
    sent: list[bytes] = []
    torn_down: list[str] = []

    async def send(f: bytes) -> None:
        sent.append(f)

    def link(name: str) -> BleLink:
        async def disconnect() -> None:
            torn_down.append(name)
        return BleLink(name, initiator=True, chunk_size=lambda: 20, send_fragment=send,
                       disconnect=disconnect, rng=fixed(b"\x00\x2a"))

    links = [link(f"p{i}") for i in range(3)]
    ids = [x.framing.my_id for x in links]
    assert ids[0] == 42 and len(set(ids)) == 3
    links[0].close()
    assert link("p3").framing.my_id not in ids  # p0 is closed but not yet torn down
    assert links[0].finished is not None
    await links[0].finished
    assert torn_down == ["p0"]
    reuse = link("p4")
    assert reuse.framing.my_id == 42  # free again after teardown
    for x in [*links[1:], reuse]:
        x.close()
        assert x.finished is not None
        await x.finished


# ---- hostile bytes never raise ------------------------------------------------------


@settings(max_examples=300)
@given(frags=st.lists(st.binary(max_size=600), max_size=30), targeted=st.booleans(),
       initiator=st.booleans(), sequenced=st.booleans())
def test_random_bytes_never_raise(frags: list[bytes], targeted: bool, initiator: bool,
                                  sequenced: bool) -> None:
    """Raw junk, junk addressed to us, and junk addressed and in sequence (any type)."""
    a, b = opened(20)
    victim = a if initiator else b
    fresh = BleFraming(rng(2).randbytes, 20, NOW, initiator=initiator)
    for target in (victim, fresh):
        for f in frags:
            if sequenced and f:
                f = frag(target.my_id, f[0] >> 6, target._recv_seq, f[1:])
            elif targeted:
                f = target.my_id.to_bytes(2, "big") + f
            target.receive_fragment(f, NOW)
            target.fragments_to_send(NOW)
            target.received_data()
            target.handle_timer(NOW + 1)
        assert target.closed == (target.close_reason is not None)
        assert len(target._in) <= DEFAULT_WINDOW * (MAX_FRAGMENT - HEADER)


# ---- timers -------------------------------------------------------------------------


def test_open_times_out() -> None:
    a, _ = pair(20)
    a.fragments_to_send(NOW)  # the OPEN is lost
    assert a.get_timer() == NOW + 10.0
    a.handle_timer(NOW + 10.0)
    assert a.closed and a.close_reason == "link open timed out"
    assert a.fragments_to_send(NOW + 11) == []


def test_never_completed_record_times_out() -> None:
    a, b = opened(20)
    a.send(struct.pack(">H", 100) + b"r" * 30)  # a record announced as 100 bytes, 30 sent
    shuttle(a, b, NOW + 1)
    assert b.get_timer() == NOW + 1 + 15.0
    b.handle_timer(NOW + 10)
    assert not b.closed
    b.handle_timer(NOW + 16)
    assert b.closed and b.close_reason == "record left unfinished (fragments lost or withheld)"


def test_completed_records_leave_no_timer() -> None:
    a, b = opened(20)
    a.send(struct.pack(">H", 100) + b"r" * 100 + struct.pack(">H", 3) + b"abc")
    shuttle(a, b)
    assert b.get_timer() is None and a.get_timer() is None
