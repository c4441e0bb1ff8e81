"""The sans-IO BLE framing: fragments shuttled in memory with a hand-held clock."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import LocalProtocolError
from mesh.session import LinkSession, State
from mesh.transports.ble_framing import (
    CLOSE,
    DATA,
    DEFAULT_WINDOW,
    HEADER,
    MAX_CHUNK,
    MAX_FRAGMENT,
    SEQ_MOD,
    BleFraming,
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


def frag(dst: int, kind: int, seq: int, body: bytes) -> bytes:
    return struct.pack(">IH", dst, kind << 14 | seq % SEQ_MOD) + body


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
    for chunk, floor in ((20, 0.66), (500, 0.98)):
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
    assert close[4] >> 6 == CLOSE
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
                f = target.my_id.to_bytes(4, "big") + f
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
