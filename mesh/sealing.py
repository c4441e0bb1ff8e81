"""End-to-end crypto: what goes inside an envelope's body. Pure: no I/O, no clock.

A relay sees only the header of ``mesh.envelope``; everything here is inside the body.

Direct messages use the one-way Noise pattern X (``Noise_X_25519_ChaChaPoly_BLAKE2b``):
the body is the single handshake message ``e | enc(s) | enc(payload)`` (96 bytes of
overhead). That gives what DESIGN section 3 asks for:

* the sender's static key is encrypted, so relays cannot see who wrote;
* the sender is authenticated by the static-static DH only, with no signature, so a
  seized device cannot prove to a third party who wrote what (deniability);
* the recipient's static key is mixed in as a pre-message, so re-addressing fails;
* the prologue is ``b"pigeon-direct/1"`` + the header fields before ``body_len``, so a
  relay that edits version, kind, created time, ttl or receipt hash breaks decryption.

Known limits of pattern X: no forward secrecy against later theft of the *recipient's*
key, and whoever holds the recipient's key can forge messages *to* that recipient (KCI).
Both are accepted for store-and-forward, where there is no round trip to do better.

Direct inner plaintext (Noise payload), big-endian::

    0   version        u8   = 1
    1   receipt_secret 16   preimage of the header's receipt_hash
    17  sent_at_ms     u64  sender's clock, ms since the Unix epoch
    25  sender_pub     32   Ed25519; its X25519 conversion must equal the Noise static
    57  ---- variable part, padded with zeros to a bucket size ----
    +0  name_len       u8   (<= 128)
    +1  name           UTF-8 display name
    ..  content_type   u8   1 = text
    ..  text_len       u16
    ..  text           UTF-8
    ..  zero padding

Channel messages: body = ``nonce(24) | XChaCha20-Poly1305(key, nonce, ad, inner)`` with
``ad = b"pigeon-chan/1" + header fields``. Channel inner plaintext::

    0   version        u8   = 1
    1   sender_pub     32   Ed25519
    33  signature      64   over b"pigeon-chan-sig/1" + channel_id + header fields
                            + inner[0:33] + inner[97:] (everything but itself)
    97  sent_at_ms     u64
    105 ---- variable part, as above ----

Channel members share one key, so any member could forge an AEAD tag; the signature is
what stops one member (or anyone, on the public channel) from posting as another.

Padding: only the variable part is padded, to 64, 128, 256 ... 8192 bytes or the most
that fits ``MAX_BODY``, so a relay learns a size class, not the length of the text. The
fixed part is the same for every message of a kind, so padding it would hide nothing.

Header fields = version u8, kind u8, created_min u32, ttl_s u32, receipt_hash 16 (the
envelope's fixed header without ``body_len``; the body length is implied by the body).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
import nacl.pwhash.argon2id

from mesh.envelope import (
    DEFAULT_HOPS,
    DEFAULT_TTL_S,
    KIND_CHANNEL,
    KIND_DIRECT,
    MAX_BODY,
    MAX_HOPS,
    MAX_TTL_S,
    NO_STAMP,
    RECEIPT_HASH_LEN,
    RECEIPT_SECRET_LEN,
    VERSION,
    Envelope,
    minutes,
    receipt_hash,
)
from mesh.errors import LocalProtocolError, RemoteProtocolError, UserError
from mesh.identity import (
    KEY_LEN,
    SIG_LEN,
    Identity,
    PublicIdentity,
    check_name,
    pack_code,
    public_identity,
    unpack_code,
    verify,
)
from mesh.noise import HandshakeState

INNER_VERSION = 1
CONTENT_TEXT = 1

DIRECT_PROLOGUE = b"pigeon-direct/1"
CHANNEL_AD = b"pigeon-chan/1"
CHANNEL_SIG = b"pigeon-chan-sig/1"
CHANNEL_SALT = b"pigeon-channel/1"
INVITE_PREFIX = "pigeonch1"
INVITE_VERSION = 1

NOISE_X_OVERHEAD = 32 + (32 + 16) + 16  # e, enc(s), payload tag
NONCE_LEN = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
AEAD_TAG_LEN = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
CHANNEL_OVERHEAD = NONCE_LEN + AEAD_TAG_LEN

_HEADER = struct.Struct("!BBII16s")  # envelope fixed header up to, not including, body_len
_DIRECT_FIXED = struct.Struct("!B16sQ32s")  # 57 bytes
_CHANNEL_FIXED = struct.Struct("!B32s64sQ")  # 105 bytes
_SIG_AT = 1 + KEY_LEN
_SIGNED_TAIL_AT = _SIG_AT + SIG_LEN

#: Most variable-part bytes each kind can carry within ``MAX_BODY``.
DIRECT_MAX_VAR = MAX_BODY - NOISE_X_OVERHEAD - _DIRECT_FIXED.size
CHANNEL_MAX_VAR = MAX_BODY - CHANNEL_OVERHEAD - _CHANNEL_FIXED.size
_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
_MAX_U64 = 2**64 - 1

#: Well-known key of the public broadcast channel: anyone can read and post; posts
#: are still signed, so nobody can post as somebody else.
PUBLIC_CHANNEL_LABEL = b"pigeon public broadcast channel v1"

Rng = Callable[[int], bytes]
# What hostile bytes can make the parsing below raise; all of it means "not for us".
_OPEN_FAILURES = (RemoteProtocolError, UserError, nacl.exceptions.CryptoError, ValueError,
                  TypeError, struct.error, IndexError)


class _Reject(RemoteProtocolError):
    """Internal: the body decrypted but its contents are not acceptable."""


@dataclass(frozen=True)
class DirectMessage:
    sender: PublicIdentity
    sender_name: str
    text: str
    sent_at: float  # sender's clock, seconds: display only, never trusted for ordering
    receipt_secret: bytes


@dataclass(frozen=True)
class ChannelMessage:
    channel: str
    sender: PublicIdentity
    sender_name: str
    text: str
    sent_at: float


@dataclass(frozen=True)
class ChannelKey:
    """A channel's name (local label, never sent) and 32-byte symmetric key."""

    name: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_LEN:
            raise LocalProtocolError("a channel key is 32 bytes")

    @property
    def channel_id(self) -> bytes:
        """Local handle (store, UI); kept off the wire since it would link posts."""
        return hashlib.blake2b(self.key, digest_size=16, person=b"pigeon-chan-id").digest()


PUBLIC_CHANNEL = ChannelKey(
    "public", hashlib.blake2b(PUBLIC_CHANNEL_LABEL, digest_size=KEY_LEN).digest())


def _channel_salt(name: str) -> bytes:
    # Case and Unicode form are folded so "Family" and "family" typed on two phones
    # meet in the same channel.
    folded = unicodedata.normalize("NFC", name).casefold().encode("utf-8")
    return hashlib.blake2b(CHANNEL_SALT + folded, digest_size=16).digest()


def channel_from_passphrase(
    name: str, passphrase: str | bytes, *,
    opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
    memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
) -> ChannelKey:
    """Derive a channel key from a name and a shared passphrase (Argon2id).

    The salt comes from the name, so everyone derives the same key without talking;
    an attacker can therefore precompute per name, which is why the cost is high and
    the passphrase must be strong. Invites (random keys) are safer.
    """
    name = check_name(name, "channel name")
    if isinstance(passphrase, str):
        passphrase = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    if not passphrase:
        raise UserError("the channel passphrase is empty")
    key = nacl.pwhash.argon2id.kdf(KEY_LEN, passphrase, _channel_salt(name),
                                   opslimit=opslimit, memlimit=memlimit)
    return ChannelKey(name, bytes(key))


def make_invite(ch: ChannelKey) -> str:
    """A copy-pasteable invite carrying the channel's name and key (share it privately)."""
    name = check_name(ch.name, "channel name")
    return pack_code(INVITE_PREFIX, bytes([INVITE_VERSION]) + ch.key + name.encode("utf-8"))


def channel_from_invite(code: str) -> ChannelKey:
    """Parse an invite; ``UserError`` with a clear message on typos and wrong codes."""
    if isinstance(code, str) and "".join(code.split()).lower().startswith("pigeon1"):
        raise UserError("this is a contact code, not a channel invite")
    payload = unpack_code(code, INVITE_PREFIX, "channel invite")
    if payload[0] != INVITE_VERSION:
        raise UserError(f"channel invite version {payload[0]} is not supported; "
                        "update Pigeon")
    if len(payload) < 1 + KEY_LEN + 1:
        raise UserError("this channel invite has no channel name in it")
    try:
        name = payload[1 + KEY_LEN:].decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("the channel name in this invite is not valid text") from None
    return ChannelKey(check_name(name, "channel name"), payload[1:1 + KEY_LEN])


# -- shared inner-plaintext helpers ----------------------------------------------------

def _header_fields(version: int, kind: int, created_min: int, ttl_s: int,
                   rhash: bytes) -> bytes:
    return _HEADER.pack(version, kind, created_min, ttl_s, rhash)


def _envelope_header(env: Envelope) -> bytes:
    return _header_fields(env.version, env.kind, env.created_min, env.ttl_s, env.receipt_hash)


def _bucket(size: int, cap: int) -> int:
    for b in _BUCKETS:
        if size <= b <= cap:
            return b
    return cap


def _variable_part(name: str, text: str, cap: int) -> bytes:
    """name, content type and text, zero-padded to a bucket; UserError if too long."""
    try:
        text_b = text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the message contains characters that cannot be sent") from None
    name_b = name.encode("utf-8")
    var = struct.pack("!B", len(name_b)) + name_b + struct.pack("!BH", CONTENT_TEXT,
                                                                 len(text_b)) + text_b
    if len(var) > cap:
        raise UserError(f"message too long: {len(text_b)} bytes of text, at most "
                        f"{cap - (len(var) - len(text_b))} fit")
    return var + bytes(_bucket(len(var), cap) - len(var))


def _parse_variable(var: bytes, cap: int) -> tuple[str, str]:
    """Inverse of ``_variable_part``; strict, since a sender has no reason to deviate."""
    name_len = var[0]
    name = var[1:1 + name_len].decode("utf-8")
    at = 1 + name_len
    content_type, text_len = struct.unpack_from("!BH", var, at)
    at += 3
    if content_type != CONTENT_TEXT:
        raise _Reject("unknown content type")
    text_b = var[at:at + text_len]
    if len(text_b) != text_len or any(var[at + text_len:]):
        raise _Reject("bad text length or padding")
    if len(var) != _bucket(len(var), cap):
        raise _Reject("not padded to a bucket")
    checked = check_name(name)
    if checked != name:
        raise _Reject("name not in canonical form")
    return name, text_b.decode("utf-8")


def _check_limits(ttl_s: int, hops: int) -> None:
    if not 0 < ttl_s <= MAX_TTL_S:
        raise LocalProtocolError(f"ttl_s must be in 1..{MAX_TTL_S}")
    if not 0 <= hops <= MAX_HOPS:
        raise LocalProtocolError(f"hops must be in 0..{MAX_HOPS}")


def _ms(now: float) -> int:
    return max(0, min(int(now * 1000), _MAX_U64))


# -- direct messages -------------------------------------------------------------------

def seal_direct(
    sender: Identity, recipient: PublicIdentity, text: str, *, now: float,
    ttl_s: int = DEFAULT_TTL_S, hops: int = DEFAULT_HOPS, rng: Rng = os.urandom,
) -> tuple[Envelope, bytes]:
    """Seal ``text`` to ``recipient``; returns the envelope and its receipt secret.

    The caller keeps the secret to recognise the receipt when it comes back.
    """
    _check_limits(ttl_s, hops)
    secret = rng(RECEIPT_SECRET_LEN)
    if len(secret) != RECEIPT_SECRET_LEN:
        raise LocalProtocolError("rng returned the wrong number of bytes")
    created_min, rhash = minutes(now), receipt_hash(secret)
    inner = _DIRECT_FIXED.pack(INNER_VERSION, secret, _ms(now), sender.public.sign_pub)
    inner += _variable_part(sender.name, text, DIRECT_MAX_VAR)
    hs = HandshakeState(
        "X", initiator=True,
        prologue=DIRECT_PROLOGUE + _header_fields(VERSION, KIND_DIRECT, created_min, ttl_s,
                                                  rhash),
        s=sender.dh_keypair, rs=recipient.dh_pub, rng=rng)
    body = hs.write_message(inner)
    envelope = Envelope(kind=KIND_DIRECT, created_min=created_min, ttl_s=ttl_s,
                        receipt_hash=rhash, body=body, hops_left=hops, ttl_left_s=ttl_s,
                        stamp=NO_STAMP)
    return envelope, secret


def open_direct(me: Identity, envelope: Envelope) -> DirectMessage | None:
    """Try to open ``envelope`` as a direct message to ``me``.

    Returns None for every kind of failure alike (not for us, tampered, malformed,
    key mismatch, wrong receipt hash) so the caller cannot become an oracle, and never
    raises on hostile bytes: a relay trial-decrypts everything it carries.
    """
    if envelope.kind != KIND_DIRECT or envelope.version != VERSION:
        return None
    try:
        return _open_direct(me, envelope)
    except _OPEN_FAILURES:
        return None


def _open_direct(me: Identity, envelope: Envelope) -> DirectMessage | None:
    body = envelope.body
    if not isinstance(body, bytes) or not NOISE_X_OVERHEAD < len(body) <= MAX_BODY:
        return None
    hs = HandshakeState("X", initiator=False,
                        prologue=DIRECT_PROLOGUE + _envelope_header(envelope),
                        s=me.dh_keypair)
    inner = hs.read_message(body)
    remote_static = hs.remote_static
    if not hs.complete or remote_static is None or len(inner) <= _DIRECT_FIXED.size:
        return None
    version, secret, sent_ms, sign_pub = _DIRECT_FIXED.unpack_from(inner, 0)
    if version != INNER_VERSION:
        return None
    if not hmac.compare_digest(receipt_hash(secret), envelope.receipt_hash):
        return None
    sender = public_identity(sign_pub)
    if not hmac.compare_digest(sender.dh_pub, remote_static):
        return None
    name, text = _parse_variable(inner[_DIRECT_FIXED.size:], DIRECT_MAX_VAR)
    return DirectMessage(sender=sender, sender_name=name, text=text,
                         sent_at=sent_ms / 1000, receipt_secret=bytes(secret))


# -- channel messages ------------------------------------------------------------------

def seal_channel(
    sender: Identity, channel: ChannelKey, text: str, *, now: float,
    ttl_s: int = DEFAULT_TTL_S, hops: int = DEFAULT_HOPS, rng: Rng = os.urandom,
) -> Envelope:
    """Encrypt and sign ``text`` for everyone holding ``channel``'s key.

    The receipt hash is random: channel posts have no single recipient to confirm them,
    and a random value looks like a direct message's hash to a relay.
    """
    _check_limits(ttl_s, hops)
    rhash = rng(RECEIPT_HASH_LEN)
    nonce = rng(NONCE_LEN)
    if len(rhash) != RECEIPT_HASH_LEN or len(nonce) != NONCE_LEN:
        raise LocalProtocolError("rng returned the wrong number of bytes")
    created_min = minutes(now)
    header = _header_fields(VERSION, KIND_CHANNEL, created_min, ttl_s, rhash)
    head = struct.pack("!B32s", INNER_VERSION, sender.public.sign_pub)
    tail = struct.pack("!Q", _ms(now)) + _variable_part(sender.name, text, CHANNEL_MAX_VAR)
    sig = sender.sign(CHANNEL_SIG + channel.channel_id + header + head + tail)
    inner = head + sig + tail
    ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        inner, CHANNEL_AD + header, nonce, channel.key)
    return Envelope(kind=KIND_CHANNEL, created_min=created_min, ttl_s=ttl_s,
                    receipt_hash=rhash, body=nonce + bytes(ciphertext), hops_left=hops,
                    ttl_left_s=ttl_s, stamp=NO_STAMP)


def open_channel(channel: ChannelKey, envelope: Envelope) -> ChannelMessage | None:
    """Try to open ``envelope`` as a post in ``channel``; None on any failure, never raises.

    A bad signature is a failure like any other: a member posting under another
    member's key must not get through.
    """
    if envelope.kind != KIND_CHANNEL or envelope.version != VERSION:
        return None
    try:
        return _open_channel(channel, envelope)
    except _OPEN_FAILURES:
        return None


def _open_channel(channel: ChannelKey, envelope: Envelope) -> ChannelMessage | None:
    body = envelope.body
    if not isinstance(body, bytes) or not CHANNEL_OVERHEAD < len(body) <= MAX_BODY:
        return None
    header = _envelope_header(envelope)
    inner = bytes(nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
        body[NONCE_LEN:], CHANNEL_AD + header, body[:NONCE_LEN], channel.key))
    if len(inner) <= _CHANNEL_FIXED.size:
        return None
    version, sign_pub, sig, sent_ms = _CHANNEL_FIXED.unpack_from(inner, 0)
    if version != INNER_VERSION:
        return None
    signed = CHANNEL_SIG + channel.channel_id + header + inner[:_SIG_AT] + \
        inner[_SIGNED_TAIL_AT:]
    if not verify(sign_pub, signed, sig):
        return None
    sender = public_identity(sign_pub)
    name, text = _parse_variable(inner[_CHANNEL_FIXED.size:], CHANNEL_MAX_VAR)
    return ChannelMessage(channel=channel.name, sender=sender, sender_name=name, text=text,
                          sent_at=sent_ms / 1000)
