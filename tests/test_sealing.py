"""End-to-end sealing: direct messages (Noise X), channels, receipts, padding."""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import nacl.bindings
import nacl.pwhash.argon2id
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import sealing
from mesh.envelope import (
    KIND_CHANNEL,
    KIND_DIRECT,
    MAX_BODY,
    NO_STAMP,
    VERSION,
    Envelope,
    minutes,
    receipt_hash,
)
from mesh.errors import LocalProtocolError, RemoteProtocolError, UserError
from mesh.identity import Identity
from mesh.noise import HandshakeState
from mesh.sealing import (
    PUBLIC_CHANNEL,
    ChannelKey,
    channel_from_invite,
    channel_from_passphrase,
    make_invite,
    open_channel,
    open_direct,
    seal_channel,
    seal_direct,
)

OPS: int = nacl.pwhash.argon2id.OPSLIMIT_MIN  # keep Argon2 cheap in tests
MEM: int = nacl.pwhash.argon2id.MEMLIMIT_MIN
NOW = 1_700_000_000.123
ALICE = Identity.generate("alice-sender-name")
BOB = Identity.generate("bob-recipient-name")
CAROL = Identity.generate("carol-third-party")
ROOM = ChannelKey("room", bytes(range(32)))
TEXT = "the secret meeting is at the old mill"


def _parse_or_none(data: bytes) -> Envelope | None:
    try:
        return Envelope.from_bytes(data)
    except RemoteProtocolError:
        return None


def _forge_direct(static: Identity, claimed_pub: bytes, recipient: Identity, *,
                  inner_secret: bytes, header_secret: bytes, inner: bytes | None = None,
                  created_min: int = 1000, ttl_s: int = 3600) -> Envelope:
    """Seal like ``seal_direct`` but with every field under the attacker's control."""
    rhash = receipt_hash(header_secret)
    if inner is None:
        inner = struct.pack("!B16sQ32s", 1, inner_secret, 5, claimed_pub)
        inner += sealing._variable_part("alice-sender-name", "forged", sealing.DIRECT_MAX_VAR)
    hs = HandshakeState("X", initiator=True, prologue=sealing.DIRECT_PROLOGUE
                        + sealing._header_fields(VERSION, KIND_DIRECT, created_min, ttl_s,
                                                 rhash),
                        s=static.dh_keypair, rs=recipient.public.dh_pub)
    return Envelope(kind=KIND_DIRECT, created_min=created_min, ttl_s=ttl_s,
                    receipt_hash=rhash, body=hs.write_message(inner), ttl_left_s=ttl_s)


def _channel_inner(env: Envelope, channel: ChannelKey) -> bytes:
    return bytes(nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        env.body[24:], sealing.CHANNEL_AD + sealing._envelope_header(env), env.body[:24],
        channel.key))


def _rechannel(env: Envelope, channel: ChannelKey, inner: bytes, **header: int) -> Envelope:
    """What any member can do: re-encrypt an arbitrary inner plaintext under the key."""
    env = dataclasses.replace(env, **header)  # type: ignore[arg-type]
    nonce = os.urandom(24)
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        inner, sealing.CHANNEL_AD + sealing._envelope_header(env), nonce, channel.key)
    return dataclasses.replace(env, body=nonce + bytes(ct))


# -- direct: round trip ----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300), now=st.floats(0, 4e9), ttl=st.integers(1, 14 * 86400),
       hops=st.integers(0, 64))
def test_direct_round_trip(text: str, now: float, ttl: int, hops: int) -> None:
    env, secret = seal_direct(ALICE, BOB.public, text, now=now, ttl_s=ttl, hops=hops)
    assert (env.kind, env.ttl_s, env.ttl_left_s, env.hops_left) == (KIND_DIRECT, ttl, ttl, hops)
    assert env.created_min == minutes(now) and env.stamp == NO_STAMP
    assert env.receipt_hash == receipt_hash(secret)
    wire = Envelope.from_bytes(env.to_bytes())
    msg = open_direct(BOB, wire)
    assert msg is not None
    assert (msg.sender, msg.sender_name, msg.text) == (ALICE.public, ALICE.name, text)
    assert msg.receipt_secret == secret
    assert abs(msg.sent_at - now) < 0.002


def test_direct_is_deterministic_given_rng() -> None:
    def rng(n: int) -> bytes:
        return b"\x07" * n
    a = seal_direct(ALICE, BOB.public, TEXT, now=NOW, rng=rng)
    assert a == seal_direct(ALICE, BOB.public, TEXT, now=NOW, rng=rng)


def test_bad_limits_are_local_errors() -> None:
    kws: list[dict[str, Any]] = [{"ttl_s": 0}, {"ttl_s": 10**9}, {"hops": 65}, {"hops": -1}]
    for kw in kws:
        with pytest.raises(LocalProtocolError):
            seal_direct(ALICE, BOB.public, "x", now=NOW, **kw)
        with pytest.raises(LocalProtocolError):
            seal_channel(ALICE, ROOM, "x", now=NOW, **kw)


# -- what a relay sees -----------------------------------------------------------------

def test_relay_sees_only_the_header() -> None:
    env, secret = seal_direct(ALICE, BOB.public, TEXT, now=NOW)
    post = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    for wire in (env.to_bytes(), post.to_bytes()):
        for ident in (ALICE, BOB):
            for leak in (ident.public.sign_pub, ident.public.dh_pub, ident.public.node_id,
                         ident.name.encode(), ident.public.fingerprint.encode()):
                assert leak not in wire
        assert TEXT.encode() not in wire and b"secret meeting" not in wire
        assert ROOM.channel_id not in wire and ROOM.key not in wire
    assert secret not in env.to_bytes()


# -- tampering -------------------------------------------------------------------------

def _assert_every_flip_fails(env: Envelope, opener: object) -> None:
    wire = env.to_bytes()
    for i in range(len(env.immutable_bytes)):
        for mask in (0x01, 0x80):
            data = bytearray(wire)
            data[i] ^= mask
            parsed = _parse_or_none(bytes(data))
            assert parsed is None or opener(parsed) is None, (i, mask)  # type: ignore[operator]


def test_direct_every_immutable_byte_is_protected() -> None:
    env, _ = seal_direct(ALICE, BOB.public, "hi", now=NOW)
    _assert_every_flip_fails(env, lambda e: open_direct(BOB, e))


def test_channel_every_immutable_byte_is_protected() -> None:
    env = seal_channel(ALICE, ROOM, "hi", now=NOW)
    _assert_every_flip_fails(env, lambda e: open_channel(ROOM, e))


@pytest.mark.parametrize("field,value", [
    ("created_min", 1), ("ttl_s", 60), ("receipt_hash", bytes(16)), ("kind", KIND_CHANNEL),
    ("version", 2),
])
def test_header_field_edits_fail(field: str, value: Any) -> None:
    env, _ = seal_direct(ALICE, BOB.public, TEXT, now=NOW)
    post = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    assert open_direct(BOB, dataclasses.replace(env, **{field: value})) is None
    if field == "kind":
        value = KIND_DIRECT
    assert open_channel(ROOM, dataclasses.replace(post, **{field: value})) is None


@given(hops=st.integers(0, 64), ttl_left=st.integers(0, 3600),
       stamp=st.binary(min_size=8, max_size=8))
@settings(max_examples=30, deadline=None)
def test_mutable_fields_do_not_matter(hops: int, ttl_left: int, stamp: bytes) -> None:
    env, _ = seal_direct(ALICE, BOB.public, TEXT, now=NOW, ttl_s=3600)
    post = seal_channel(ALICE, ROOM, TEXT, now=NOW, ttl_s=3600)
    moved = env.with_mutable(hops_left=hops, ttl_left_s=ttl_left, stamp=stamp)
    moved_post = post.with_mutable(hops_left=hops, ttl_left_s=ttl_left, stamp=stamp)
    assert moved.id == env.id
    assert open_direct(BOB, Envelope.from_bytes(moved.to_bytes())) is not None
    assert open_channel(ROOM, Envelope.from_bytes(moved_post.to_bytes())) is not None


# -- addressing and sender authentication ----------------------------------------------

def test_only_the_recipient_can_open() -> None:
    env, _ = seal_direct(ALICE, BOB.public, TEXT, now=NOW)
    assert open_direct(CAROL, env) is None
    assert open_direct(ALICE, env) is None
    to_carol, _ = seal_direct(ALICE, CAROL.public, TEXT, now=NOW)
    assert open_direct(BOB, to_carol) is None
    assert open_direct(CAROL, to_carol) is not None


def test_resealing_cannot_claim_another_sender() -> None:
    env, _ = seal_direct(ALICE, BOB.public, TEXT, now=NOW)
    secret = os.urandom(16)
    # Carol reuses Alice's header fields and claims Alice's key inside.
    forged = _forge_direct(CAROL, ALICE.public.sign_pub, BOB, inner_secret=secret,
                           header_secret=secret, created_min=env.created_min, ttl_s=env.ttl_s)
    assert open_direct(BOB, forged) is None
    # The same construction with her own key works, and names her, not Alice.
    honest = _forge_direct(CAROL, CAROL.public.sign_pub, BOB, inner_secret=secret,
                           header_secret=secret)
    msg = open_direct(BOB, honest)
    assert msg is not None and msg.sender == CAROL.public


def _var(name: bytes, text: bytes = b"x") -> bytes:
    var = bytes([len(name)]) + name + struct.pack("!BH", 1, len(text)) + text
    return var.ljust(64, b"\0")


def test_bad_inner_version_or_key_rejected() -> None:
    secret = os.urandom(16)
    good = _forge_direct(ALICE, ALICE.public.sign_pub, BOB, inner_secret=secret,
                         header_secret=secret)
    assert open_direct(BOB, good) is not None  # the helper itself builds valid messages
    base = struct.pack("!B16sQ", 1, secret, 5)
    tail = sealing._variable_part("alice", "x", sealing.DIRECT_MAX_VAR)
    for bad_inner in (
        struct.pack("!B16sQ32s", 2, secret, 5, ALICE.public.sign_pub) + tail,
        base + bytes(32) + tail,  # small-order key
        base + ALICE.public.sign_pub,  # no variable part
        base + ALICE.public.sign_pub + tail[:-1],  # not a bucket size
        base + ALICE.public.sign_pub + tail[:-1] + b"\x01",  # non-zero padding
        base + ALICE.public.sign_pub + b"\x01a\x02" + tail[3:],  # unknown content type
        base + ALICE.public.sign_pub + _var(b"a\nb"),  # control character in the name
        base + ALICE.public.sign_pub + _var(b" alice"),  # name not stripped
        base + ALICE.public.sign_pub + _var(b""),  # empty name
        base + ALICE.public.sign_pub + _var(b"\xff"),  # name not UTF-8
        base + ALICE.public.sign_pub + _var(b"alice", b"\xc3"),  # text not UTF-8
    ):
        env = _forge_direct(ALICE, ALICE.public.sign_pub, BOB, inner_secret=secret,
                            header_secret=secret, inner=bad_inner)
        assert open_direct(BOB, env) is None


# -- receipts --------------------------------------------------------------------------

def test_receipt_secret_reaches_only_the_recipient() -> None:
    env, secret = seal_direct(ALICE, BOB.public, TEXT, now=NOW)
    msg = open_direct(BOB, env)
    assert msg is not None and msg.receipt_secret == secret
    assert receipt_hash(msg.receipt_secret) == env.receipt_hash
    assert open_direct(CAROL, env) is None
    assert secret not in env.to_bytes()


@settings(max_examples=200)
@given(st.binary(min_size=16, max_size=16))
def test_random_secrets_never_match(guess: bytes) -> None:
    env, secret = seal_direct(ALICE, BOB.public, "x", now=NOW, rng=lambda n: b"\x42" * n)
    if guess != secret:
        assert receipt_hash(guess) != env.receipt_hash


def test_header_receipt_hash_must_match_sealed_secret() -> None:
    # A sender who puts a hash in the header that does not match the secret inside
    # (so relays would drop the message on a receipt nobody sent) is rejected.
    forged = _forge_direct(ALICE, ALICE.public.sign_pub, BOB, inner_secret=os.urandom(16),
                           header_secret=os.urandom(16))
    assert open_direct(BOB, forged) is None


def test_channel_receipt_hash_is_random() -> None:
    a = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    b = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    assert a.receipt_hash != b.receipt_hash and a.body != b.body


# -- channels --------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300), now=st.floats(0, 4e9))
def test_channel_round_trip(text: str, now: float) -> None:
    for channel in (ROOM, PUBLIC_CHANNEL):
        env = seal_channel(ALICE, channel, text, now=now, ttl_s=600, hops=3)
        assert (env.kind, env.ttl_left_s, env.hops_left) == (KIND_CHANNEL, 600, 3)
        msg = open_channel(channel, Envelope.from_bytes(env.to_bytes()))
        assert msg is not None
        assert (msg.channel, msg.sender, msg.sender_name, msg.text) == (
            channel.name, ALICE.public, ALICE.name, text)
        assert abs(msg.sent_at - now) < 0.002


def test_non_member_and_cross_kind_fail() -> None:
    env = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    assert open_channel(ChannelKey("room", bytes(32)), env) is None
    assert open_channel(PUBLIC_CHANNEL, env) is None
    assert open_direct(BOB, env) is None
    direct, _ = seal_direct(ALICE, BOB.public, TEXT, now=NOW)
    assert open_channel(ROOM, direct) is None


def test_channel_impersonation_fails() -> None:
    env = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    inner = _channel_inner(env, ROOM)
    assert open_channel(ROOM, _rechannel(env, ROOM, inner)) is not None  # helper sanity
    swapped_key = inner[:1] + BOB.public.sign_pub + inner[33:]
    assert open_channel(ROOM, _rechannel(env, ROOM, swapped_key)) is None
    # Bob signs the same content but leaves Alice's key in place.
    bob_post = _channel_inner(seal_channel(BOB, ROOM, TEXT, now=NOW), ROOM)
    swapped_sig = inner[:33] + bob_post[33:97] + inner[97:]
    assert open_channel(ROOM, _rechannel(env, ROOM, swapped_sig)) is None
    # Bob claims Alice's key but signs with his own.
    claimed = inner[:1] + ALICE.public.sign_pub + bob_post[33:]
    assert open_channel(ROOM, _rechannel(env, ROOM, claimed)) is None
    # Changing the text under Alice's signature.
    assert open_channel(ROOM, _rechannel(env, ROOM, inner[:-1] + b"\x01")) is None


def test_channel_signature_binds_channel_and_header() -> None:
    env = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    inner = _channel_inner(env, ROOM)
    other = ChannelKey("other", bytes(range(1, 33)))
    assert open_channel(other, _rechannel(env, other, inner)) is None  # cross-channel replay
    assert open_channel(ROOM, _rechannel(env, ROOM, inner, ttl_s=60)) is None
    assert open_channel(ROOM, _rechannel(env, ROOM, inner, created_min=5)) is None


# -- padding and size limits -----------------------------------------------------------

def test_padding_hides_short_lengths() -> None:
    d1, _ = seal_direct(ALICE, BOB.public, "x", now=NOW)
    d40, _ = seal_direct(ALICE, BOB.public, "x" * 40, now=NOW)
    assert len(d1.body) == len(d40.body)
    c1 = seal_channel(ALICE, ROOM, "x", now=NOW)
    c40 = seal_channel(ALICE, ROOM, "y" * 40, now=NOW)
    assert len(c1.body) == len(c40.body)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 16_300))
def test_bodies_come_in_buckets(n: int) -> None:
    allowed = {*sealing._BUCKETS, sealing.DIRECT_MAX_VAR}
    try:
        env, _ = seal_direct(ALICE, BOB.public, "x" * n, now=NOW)
    except UserError:
        return
    assert len(env.body) - sealing.NOISE_X_OVERHEAD - 57 in allowed


def test_longest_text_fits_and_one_more_does_not() -> None:
    fixed = 4 + len(ALICE.name.encode())
    longest = "x" * (sealing.DIRECT_MAX_VAR - fixed)
    env, _ = seal_direct(ALICE, BOB.public, longest, now=NOW)
    assert len(env.body) == MAX_BODY
    assert Envelope.from_bytes(env.to_bytes()) == env
    msg = open_direct(BOB, env)
    assert msg is not None and msg.text == longest
    with pytest.raises(UserError, match="too long"):
        seal_direct(ALICE, BOB.public, longest + "x", now=NOW)
    chan_longest = "x" * (sealing.CHANNEL_MAX_VAR - fixed)
    post = seal_channel(ALICE, ROOM, chan_longest, now=NOW)
    assert len(post.body) == MAX_BODY
    assert open_channel(ROOM, post) is not None
    with pytest.raises(UserError, match="too long"):
        seal_channel(ALICE, ROOM, chan_longest + "x", now=NOW)


def test_unencodable_text_is_user_error() -> None:
    with pytest.raises(UserError):
        seal_direct(ALICE, BOB.public, "bad \ud800 surrogate", now=NOW)


# -- hostile bytes ---------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([KIND_DIRECT, KIND_CHANNEL]), body=st.binary(max_size=600),
       rhash=st.binary(min_size=16, max_size=16))
def test_hostile_bodies_never_raise(kind: int, body: bytes, rhash: bytes) -> None:
    env = Envelope(kind=kind, created_min=1, ttl_s=60, receipt_hash=rhash, body=body)
    assert open_direct(BOB, env) is None
    assert open_channel(ROOM, env) is None
    assert open_channel(PUBLIC_CHANNEL, env) is None


@settings(max_examples=200, deadline=None)
@given(inner=st.binary(max_size=400))
def test_hostile_authenticated_inner_never_raises(inner: bytes) -> None:
    # The outer crypto passes (the attacker is a contact or a channel member) but the
    # plaintext is garbage: still only None, never an exception.
    secret = inner[1:17].ljust(16, b"\0")
    env = _forge_direct(CAROL, CAROL.public.sign_pub, BOB, inner_secret=secret,
                        header_secret=secret, inner=inner)
    open_direct(BOB, env)
    post = seal_channel(ALICE, ROOM, "x", now=NOW)
    open_channel(ROOM, _rechannel(post, ROOM, inner))


def test_truncated_and_extended_bodies() -> None:
    env, _ = seal_direct(ALICE, BOB.public, TEXT, now=NOW)
    post = seal_channel(ALICE, ROOM, TEXT, now=NOW)
    for cut in (0, 1, 31, 32, 95, 96, 97, len(env.body) - 1):
        assert open_direct(BOB, dataclasses.replace(env, body=env.body[:cut])) is None
    assert open_direct(BOB, dataclasses.replace(env, body=env.body + b"\0")) is None
    for cut in (0, 24, 40, 41, len(post.body) - 1):
        assert open_channel(ROOM, dataclasses.replace(post, body=post.body[:cut])) is None


# -- channel keys and invites ----------------------------------------------------------

def test_invite_round_trip_and_typos() -> None:
    code = make_invite(ROOM)
    assert code.startswith("pigeonch1")
    assert channel_from_invite(code) == ROOM
    assert channel_from_invite("  " + code.upper()[:30] + "\n" + code[30:] + "\n") == ROOM
    for i in range(len(code)):
        for c in "abcdefghijklmnopqrstuvwxyz234567":
            if c != code[i]:
                with pytest.raises(UserError):
                    channel_from_invite(code[:i] + c + code[i + 1:])
    with pytest.raises(UserError, match="contact code"):
        channel_from_invite(ALICE.contact_code())
    with pytest.raises(UserError):
        channel_from_invite("hello")


def test_channel_key_repr_hides_key() -> None:
    assert ROOM.key.hex() not in repr(ROOM)
    assert len(ROOM.channel_id) == 16 and ROOM.channel_id != ROOM.key[:16]
    assert PUBLIC_CHANNEL.name == "public"


def test_channel_from_passphrase() -> None:
    a = channel_from_passphrase("Family", "long shared passphrase", opslimit=OPS, memlimit=MEM)
    b = channel_from_passphrase("family", "long shared passphrase", opslimit=OPS, memlimit=MEM)
    c = channel_from_passphrase("family", "another passphrase", opslimit=OPS, memlimit=MEM)
    d = channel_from_passphrase("friends", "long shared passphrase", opslimit=OPS, memlimit=MEM)
    assert a.key == b.key and a.name == "Family"
    assert len({a.key, c.key, d.key}) == 3
    assert channel_from_passphrase("x", b"bytes ok", opslimit=OPS, memlimit=MEM).key == \
        channel_from_passphrase("x", "bytes ok", opslimit=OPS, memlimit=MEM).key
    with pytest.raises(UserError):
        channel_from_passphrase("family", "", opslimit=OPS, memlimit=MEM)
    with pytest.raises(UserError):
        channel_from_passphrase("bad\nname", "pw", opslimit=OPS, memlimit=MEM)
