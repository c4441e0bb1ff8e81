"""The frame codec: round trips, hard limits, and hostile bytes that must only ever raise
RemoteProtocolError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import RemoteProtocolError
from mesh.reconcile import Bound, Mode, Range, ReconcileMessage

ids16 = st.binary(min_size=16, max_size=16)

frames = st.one_of(
    st.builds(lambda v, m, f: wire.Hello(version=v, max_frame=m, features=f),
              st.integers(0, 255), st.integers(64, 65535), st.integers(0, 0xFFFF)),
    st.builds(lambda ids: wire.Want(ids=tuple(ids)), st.lists(ids16, max_size=50)),
    st.builds(lambda a, r: wire.Ack(ids=tuple(a), refused=tuple(r)),
              st.lists(ids16, max_size=20), st.lists(ids16, max_size=20)),
    st.builds(lambda items: wire.Items(items=tuple(items)),
              st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300)), max_size=10)),
    st.builds(lambda c, s: wire.Plan(count=c, size=s), st.integers(0, 2**32 - 1),
              st.integers(0, 2**48)),
    st.builds(lambda w: wire.Idle(wants_seen=w), st.integers(0, 2**32 - 1)),
    st.builds(lambda n: wire.Ping(nonce=n), st.integers(0, 2**32 - 1)),
    st.builds(lambda n: wire.Pong(nonce=n), st.integers(0, 2**32 - 1)),
    st.builds(lambda r: wire.Close(reason=r), st.text(max_size=wire.MAX_REASON_LEN)),
)


@given(frames)
def test_every_frame_round_trips(frame: wire.Frame) -> None:
    assert wire.decode_frame(wire.encode_frame(frame)) == frame


def test_reconcile_frame_round_trips() -> None:
    message = ReconcileMessage((
        Range(Bound(5, b"\x01"), Mode.FINGERPRINT, fingerprint=bytes(16)),
        Range(Bound(9, b""), Mode.IDLIST, ids=(b"a" * 16, b"b" * 16)),
        Range(Bound(2**32 - 1, b"\xff" * 16), Mode.SKIP),
    ))
    frame = wire.Reconcile(message=message)
    assert wire.decode_frame(wire.encode_frame(frame)) == frame


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_random_bytes_raise_only_remote_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        wire.decode_frame(data)


@given(frames, st.data())
def test_truncated_frames_are_rejected(frame: wire.Frame, data: st.DataObject) -> None:
    encoded = wire.encode_frame(frame)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(RemoteProtocolError):
        wire.decode_frame(encoded[:cut])


@pytest.mark.parametrize("obj, reason", [
    ([], "empty"),
    ({"a": 1}, "undecodable"),  # maps are refused by the unpacker itself
    ([99], "unknown frame type"),
    ([wire.FrameType.WANT, [b"short"]], "wrong length"),
    ([wire.FrameType.WANT, "ids"], "not a list"),
    ([wire.FrameType.PING, -1], "out of range"),
    ([wire.FrameType.PING, True], "out of range"),
    ([wire.FrameType.PING, 1, 2], "wrong number"),
    ([wire.FrameType.ITEMS, [[3, b"x"]]], "item kind"),
    ([wire.FrameType.ITEMS, [[1]]], "wrong shape"),
    ([wire.FrameType.HELLO, 1, 10, 0], "max frame"),
    ([wire.FrameType.CLOSE, b"bytes"], "not text"),
    ([wire.FrameType.RECONCILE, b"\x01\x80"], "range mode"),
    ([wire.FrameType.RECONCILE, [[1, b"", 0, None]]], "not bytes"),
    ([wire.FrameType.RECONCILE, b"\x01\x11" + b"x" * 17], "too long"),
    ([wire.FrameType.RECONCILE, b"\x01\x01"], "truncated"),
])
def test_wrongly_typed_fields_are_rejected(obj: object, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        wire.decode_frame(msgpack.packb(obj, use_bin_type=True))


def test_oversized_lengths_are_refused_before_allocation() -> None:
    # A bin header claiming 4 GiB, an array header claiming 4 billion entries, deep nesting.
    for data in (b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\x91" * 100_000):
        with pytest.raises(RemoteProtocolError):
            wire.decode_frame(data)
    too_many = [wire.FrameType.WANT, [bytes(16)] * (wire.MAX_IDS_PER_FRAME + 1)]
    with pytest.raises(RemoteProtocolError):
        wire.decode_frame(msgpack.packb(too_many, use_bin_type=True))
    with pytest.raises(RemoteProtocolError, match="too large"):
        wire.decode_frame(bytes(wire.MAX_FRAME + 1))


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="trailing"):
        wire.decode_frame(wire.encode_frame(wire.Ping(nonce=1)) + b"\x00")


@given(st.binary(max_size=20_000))
def test_padding_round_trips_to_a_padme_length(frame: bytes) -> None:
    padded = wire.pad_plaintext(frame)
    n = 2 + len(frame)
    assert len(padded) == wire.padded_length(n) >= n
    # Padmé: at most ~12 % overhead above the 64-byte floor, and the low bits are zero.
    assert len(padded) == 64 or len(padded) <= n * 1.125
    exponent = n.bit_length() - 1
    assert len(padded) == 64 or len(padded) % (1 << (exponent - exponent.bit_length())) == 0
    assert wire.unpad_plaintext(padded) == frame


def test_padme_lengths() -> None:
    """Worked values (also in docs/protocol.md section 4.4)."""
    assert [wire.padded_length(n) for n in (1, 64, 65, 100, 334, 1228, 4100, 65519)] == \
        [64, 64, 72, 104, 336, 1280, 4352, 65519]
    assert wire.padded_length(65_000) == wire.MAX_PLAINTEXT


def test_oversized_frame_cannot_be_padded() -> None:
    with pytest.raises(ValueError):
        wire.pad_plaintext(bytes(wire.MAX_PLAINTEXT - 1))


def test_padding_must_be_zero_and_length_must_fit() -> None:
    padded = bytearray(wire.pad_plaintext(b"abc"))
    padded[-1] = 1
    with pytest.raises(RemoteProtocolError):
        wire.unpad_plaintext(bytes(padded))
    with pytest.raises(RemoteProtocolError):
        wire.unpad_plaintext(b"\xff\xff" + bytes(10))
    with pytest.raises(RemoteProtocolError):
        wire.unpad_plaintext(b"\x00")


def test_size_estimates_are_upper_bounds() -> None:
    items = tuple((1, bytes(n)) for n in (0, 100, 255, 256, 16000))
    encoded = wire.encode_frame(wire.Items(items=items))
    estimate = wire.ITEMS_FRAME_OVERHEAD + sum(wire.ITEM_OVERHEAD + len(d) for _, d in items)
    assert len(encoded) <= estimate
    ids = tuple(bytes([i]) * 16 for i in range(200))
    assert len(wire.encode_frame(wire.Want(ids=ids))) <= wire.encode_ids_frame_size(ids)


@given(st.lists(st.binary(min_size=1, max_size=3000), max_size=20), st.data())
def test_stream_framer_reassembles_any_split(records: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(wire.StreamFramer.encode(r) for r in records)
    framer = wire.StreamFramer()
    out: list[bytes] = []
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(1, 5000))
        out += framer.feed(stream[pos:pos + step])
        pos += step
    assert out == records


def test_stream_framer_rejects_zero_length_and_bounds_its_buffer() -> None:
    with pytest.raises(RemoteProtocolError):
        list(wire.StreamFramer().feed(b"\x00\x00"))
    framer = wire.StreamFramer(max_record=100)
    with pytest.raises(RemoteProtocolError):
        list(framer.feed(b"\x00\x65"))
