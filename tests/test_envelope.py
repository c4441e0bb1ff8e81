"""The relay-visible envelope and receipt formats: strict parsing of hostile bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import envelope as E
from mesh.errors import RemoteProtocolError
from tests.helpers import make_envelope

envelopes = st.builds(
    lambda kind, created, ttl, body, hops, stamp: E.Envelope(
        kind=kind, created_min=created, ttl_s=ttl, receipt_hash=bytes(16), body=body,
        hops_left=hops, ttl_left_s=ttl, stamp=stamp),
    st.sampled_from(E.KINDS), st.integers(0, 2**32 - 1), st.integers(1, E.MAX_TTL_S),
    st.binary(max_size=2000), st.integers(0, E.MAX_HOPS), st.binary(min_size=8, max_size=8))


@given(envelopes)
def test_round_trip_and_id_ignores_mutable_fields(env: E.Envelope) -> None:
    parsed = E.Envelope.from_bytes(env.to_bytes())
    assert parsed == env and parsed.id == env.id
    assert env.with_mutable(hops_left=0, ttl_left_s=1, stamp=bytes(8)).id == env.id


@given(envelopes, st.data())
def test_truncated_or_extended_bytes_are_rejected(env: E.Envelope, data: st.DataObject) -> None:
    raw = env.to_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(RemoteProtocolError):
        E.Envelope.from_bytes(raw[:cut])
    with pytest.raises(RemoteProtocolError):
        E.Envelope.from_bytes(raw + b"\x00")


@given(st.binary(max_size=3000))
def test_random_bytes_raise_only_remote_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        E.Envelope.from_bytes(data)
    with contextlib.suppress(RemoteProtocolError):
        E.Receipt.from_bytes(data)


def test_oversized_and_out_of_range_fields() -> None:
    env = make_envelope(1)
    raw = bytearray(env.to_bytes())
    with pytest.raises(RemoteProtocolError, match="too large"):
        E.Envelope.from_bytes(bytes(E.MAX_ENVELOPE_LEN + 1))
    for offset, value, reason in ((0, 2, "version"), (1, 9, "kind")):
        bad = bytearray(raw)
        bad[offset] = value
        with pytest.raises(RemoteProtocolError, match=reason):
            E.Envelope.from_bytes(bytes(bad))
    bad = bytearray(raw)
    struct.pack_into("!I", bad, 6, E.MAX_TTL_S + 1)
    with pytest.raises(RemoteProtocolError, match="ttl"):
        E.Envelope.from_bytes(bytes(bad))
    body_end = E.HEADER_LEN + len(env.body)
    bad = bytearray(raw)
    bad[body_end] = E.MAX_HOPS + 1
    with pytest.raises(RemoteProtocolError, match="hop"):
        E.Envelope.from_bytes(bytes(bad))
    bad = bytearray(raw)
    struct.pack_into("!I", bad, body_end + 1, env.ttl_s + 1)
    with pytest.raises(RemoteProtocolError, match="remaining lifetime"):
        E.Envelope.from_bytes(bytes(bad))
    bad = bytearray(raw)
    struct.pack_into("!H", bad, 26, 0xFFFF)  # a body length claiming 64 KiB
    with pytest.raises(RemoteProtocolError):
        E.Envelope.from_bytes(bytes(bad))


def test_receipt_format_and_answers() -> None:
    r = E.Receipt(secret=b"s" * 16, issued_min=123)
    assert E.Receipt.from_bytes(r.to_bytes()) == r
    assert r.answers == E.receipt_hash(b"s" * 16)
    assert r.id != r.answers
    assert E.Receipt(secret=b"s" * 16, issued_min=124).id != r.id
    for n in (0, 19, 21):
        with pytest.raises(RemoteProtocolError):
            E.Receipt.from_bytes(bytes(n))


def test_stamps_are_checked_not_trusted() -> None:
    env = make_envelope(5)
    nonce = E.make_stamp(env.id, 8)
    stamped = env.with_mutable(stamp=nonce)
    assert stamped.stamp_bits >= 8
    assert env.stamp_bits == 0
