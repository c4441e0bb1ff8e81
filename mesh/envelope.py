"""The byte format of what relays carry: envelopes and receipts.

This module is the relay's whole view of a message. It knows nothing about keys: the
``body`` of an envelope is opaque ciphertext made by ``mesh.sealing``. What a relay can
read is exactly the fields below, and ``docs/protocol.md`` gives the same layout in
bytes. The layout is a fixed ``struct`` (not msgpack) because the message id is a hash
over these bytes and must be the same on every implementation.

Envelope layout (big-endian)::

    immutable part (hashed into the id)
      0   version        u8    = 1
      1   kind           u8    1 = direct, 2 = channel
      2   created_min    u32   sender's clock, minutes since the Unix epoch
      6   ttl_s          u32   lifetime the sender asked for, seconds (<= MAX_TTL_S)
      10  receipt_hash   16    BLAKE2b-128 of the receipt secret sealed inside
      26  body_len       u16
      28  body           body_len bytes of ciphertext
    mutable part (relays rewrite it; outside the id)
      +0  hops_left      u8    decremented on every forward
      +1  ttl_left_s     u32   remaining lifetime, measured by each holder's own clock
      +5  stamp          8     proof-of-work nonce, all zero when absent

Lifetime is carried as a remaining duration (``ttl_left_s``), rewritten by each holder
from its own monotonic notion of "how long have I held it", so nodes whose wall clocks
disagree by a day still agree on how long a message may live. ``created_min`` is coarse
(minutes) on purpose: it orders ids for reconciliation and bounds replays, and a coarse
value says less about when the sender was active.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace
from functools import cached_property

from mesh.errors import RemoteProtocolError

VERSION = 1
KIND_DIRECT = 1
KIND_CHANNEL = 2
KINDS = (KIND_DIRECT, KIND_CHANNEL)

ID_LEN = 16
RECEIPT_SECRET_LEN = 16
RECEIPT_HASH_LEN = 16
STAMP_LEN = 8
NO_STAMP = bytes(STAMP_LEN)

MAX_BODY = 16 * 1024
MAX_TTL_S = 14 * 24 * 3600
DEFAULT_TTL_S = 7 * 24 * 3600
MAX_HOPS = 64
DEFAULT_HOPS = 24
#: How far a sender's clock may be from ours before we call an envelope a replay or junk.
CLOCK_SKEW_S = 2 * 24 * 3600

_FIXED = struct.Struct("!BBII16sH")
_MUTABLE = struct.Struct("!BI8s")
_RECEIPT = struct.Struct("!16sI")
HEADER_LEN = _FIXED.size  # 28
MUTABLE_LEN = _MUTABLE.size  # 13
#: ``ttl_s`` inside the immutable header (after version, kind, created_min).
_TTL_S_AT = struct.calcsize("!BBI")
_TTL_S = struct.Struct("!I")
#: ``hops_left`` u8 then ``ttl_left_s`` u32: the stamp after them is not touched.
_HOPS_TTL = struct.Struct("!BI")


def mutable_bytes(hops_left: int, ttl_left_s: int, stamp: bytes) -> bytes:
    """The per-hop tail of an envelope's bytes."""
    return _MUTABLE.pack(hops_left, ttl_left_s, stamp)


def ttl_s_of(data: bytes) -> int:
    """``ttl_s`` of stored envelope bytes, without parsing the rest."""
    (ttl_s,) = _TTL_S.unpack_from(data, _TTL_S_AT)
    return int(ttl_s)


def patch_mutable(data: bytes, *, hops_left: int, ttl_left_s: int) -> bytes:
    """Stored envelope bytes with ``hops_left`` and ``ttl_left_s`` replaced, the stamp kept:
    five bytes patched instead of parsing and re-encoding an envelope whose bytes were
    checked when they were stored."""
    at = len(data) - MUTABLE_LEN
    return b"".join((data[:at], _HOPS_TTL.pack(hops_left, ttl_left_s),
                     data[at + _HOPS_TTL.size:]))
RECEIPT_LEN = _RECEIPT.size  # 20
MAX_ENVELOPE_LEN = HEADER_LEN + MAX_BODY + MUTABLE_LEN


def _blake(data: bytes, person: bytes, size: int = 16) -> bytes:
    return hashlib.blake2b(data, digest_size=size, person=person).digest()


def receipt_hash(secret: bytes) -> bytes:
    """The hash that an envelope's header commits to; only the recipient knows its preimage."""
    return _blake(secret, b"pigeon-rcpt")


def minutes(now: float) -> int:
    """Wall-clock seconds to the coarse minute count used in headers (clamped to u32)."""
    return max(0, min(int(now // 60), 0xFFFFFFFF))


@dataclass(frozen=True)
class Envelope:
    """One sealed message as relays see it. Build with ``mesh.sealing``; parse with ``from_bytes``."""

    kind: int
    created_min: int
    ttl_s: int
    receipt_hash: bytes
    body: bytes
    hops_left: int = DEFAULT_HOPS
    ttl_left_s: int = DEFAULT_TTL_S
    stamp: bytes = NO_STAMP
    version: int = VERSION

    @cached_property
    def immutable_bytes(self) -> bytes:
        """The bytes the id covers: sealing uses them as associated data, so a header
        cannot be changed without breaking decryption."""
        return _FIXED.pack(
            self.version, self.kind, self.created_min, self.ttl_s, self.receipt_hash,
            len(self.body),
        ) + self.body

    @cached_property
    def id(self) -> bytes:
        """BLAKE2b-128 of the immutable part: the message id used everywhere."""
        return _blake(self.immutable_bytes, b"pigeon-env-id")

    def to_bytes(self) -> bytes:
        return self.immutable_bytes + mutable_bytes(self.hops_left, self.ttl_left_s, self.stamp)

    @property
    def size(self) -> int:
        return HEADER_LEN + len(self.body) + MUTABLE_LEN

    def with_mutable(
        self, *, hops_left: int | None = None, ttl_left_s: int | None = None,
        stamp: bytes | None = None,
    ) -> Envelope:
        new = replace(
            self,
            hops_left=self.hops_left if hops_left is None else hops_left,
            ttl_left_s=self.ttl_left_s if ttl_left_s is None else ttl_left_s,
            stamp=self.stamp if stamp is None else stamp,
        )
        # The immutable part is unchanged: keep its bytes and id rather than hash again.
        for cached in ("immutable_bytes", "id"):
            if cached in self.__dict__:
                new.__dict__[cached] = self.__dict__[cached]
        return new

    @property
    def stamp_bits(self) -> int:
        """Proof-of-work value: leading zero bits of BLAKE2b(id || stamp); 0 without a stamp."""
        if self.stamp == NO_STAMP:
            return 0
        return stamp_bits(self.id, self.stamp)

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse and bound-check bytes from a peer; raises ``RemoteProtocolError``."""
        if len(data) < HEADER_LEN + MUTABLE_LEN:
            raise RemoteProtocolError("envelope truncated")
        if len(data) > MAX_ENVELOPE_LEN:
            raise RemoteProtocolError("envelope too large")
        version, kind, created_min, ttl_s, rhash, body_len = _FIXED.unpack_from(data, 0)
        if version != VERSION:
            raise RemoteProtocolError(f"envelope version {version} not supported")
        if kind not in KINDS:
            raise RemoteProtocolError(f"unknown envelope kind {kind}")
        if len(data) != HEADER_LEN + body_len + MUTABLE_LEN:
            raise RemoteProtocolError("envelope length does not match its body length")
        if ttl_s > MAX_TTL_S or ttl_s == 0:
            raise RemoteProtocolError("envelope ttl out of range")
        body = bytes(data[HEADER_LEN:HEADER_LEN + body_len])
        hops_left, ttl_left_s, stamp = _MUTABLE.unpack_from(data, HEADER_LEN + body_len)
        if hops_left > MAX_HOPS:
            raise RemoteProtocolError("envelope hop limit out of range")
        if ttl_left_s > ttl_s:
            raise RemoteProtocolError("envelope remaining lifetime exceeds its ttl")
        return cls(
            kind=kind, created_min=created_min, ttl_s=ttl_s, receipt_hash=bytes(rhash),
            body=body, hops_left=hops_left, ttl_left_s=ttl_left_s, stamp=bytes(stamp),
            version=version,
        )

    def check_fresh(self, now: float) -> None:
        """Refuse envelopes created implausibly far in the future or outside any lifetime.

        The window is ``[now - ttl - CLOCK_SKEW_S, now + CLOCK_SKEW_S]`` in the receiver's
        clock; dedup state (tombstones) is kept at least that long, so a replay of an old
        envelope is either rejected here or recognised as already seen.
        """
        created_s = self.created_min * 60
        if created_s > now + CLOCK_SKEW_S:
            raise RemoteProtocolError("envelope created in the future beyond clock tolerance")
        if created_s + self.ttl_s + CLOCK_SKEW_S < now:
            raise RemoteProtocolError("envelope older than its lifetime")
        if self.ttl_left_s == 0:
            raise RemoteProtocolError("envelope has no lifetime left")

    def dedup_until(self) -> float:
        """Wall-clock time (receiver's) until which the id must be remembered as seen."""
        return float(self.created_min * 60 + self.ttl_s + CLOCK_SKEW_S + 60)


def stamp_bits(envelope_id: bytes, stamp: bytes) -> int:
    digest = _blake(envelope_id + stamp, b"pigeon-stamp", 32)
    value = int.from_bytes(digest, "big")
    return 256 - value.bit_length()


def make_stamp(envelope_id: bytes, bits: int, start: int = 0, max_tries: int = 1 << 26) -> bytes:
    """Search a proof-of-work nonce with at least ``bits`` leading zero bits.

    Deterministic from ``start`` so tests and simulations reproduce; raises
    ``ValueError`` if ``max_tries`` is exhausted (bound the work a caller asks for).
    """
    for counter in range(start, start + max_tries):
        nonce = counter.to_bytes(STAMP_LEN, "big")
        if nonce != NO_STAMP and stamp_bits(envelope_id, nonce) >= bits:
            return nonce
    raise ValueError("no stamp found within max_tries")


@dataclass(frozen=True)
class Receipt:
    """The antidote: releasing ``secret`` proves delivery of the envelope whose header
    carries ``receipt_hash(secret)``. Only the recipient could decrypt the secret, so
    nobody else can forge one; anyone can check one."""

    secret: bytes
    issued_min: int

    @cached_property
    def id(self) -> bytes:
        """The item id used in reconciliation. It covers ``issued_min`` too, because the
        reconciliation key ``(issued_min, id)`` must be a function of the id: a copy
        re-sent with another ``issued_min`` is then simply another item, never two keys
        for one id (which would break the ordering two honest peers rely on)."""
        return _blake(self.to_bytes(), b"pigeon-rcpt-id")

    @cached_property
    def answers(self) -> bytes:
        """The ``receipt_hash`` of the envelopes this receipt deletes."""
        return receipt_hash(self.secret)

    def to_bytes(self) -> bytes:
        return _RECEIPT.pack(self.secret, self.issued_min)

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        if len(data) != RECEIPT_LEN:
            raise RemoteProtocolError("receipt has the wrong length")
        secret, issued_min = _RECEIPT.unpack(data)
        return cls(secret=bytes(secret), issued_min=issued_min)

    def check_fresh(self, now: float) -> None:
        issued_s = self.issued_min * 60
        if issued_s > now + CLOCK_SKEW_S:
            raise RemoteProtocolError("receipt issued in the future beyond clock tolerance")
        if issued_s + MAX_TTL_S + CLOCK_SKEW_S < now:
            raise RemoteProtocolError("receipt older than any envelope it could answer")

    def keep_until(self) -> float:
        """Relays keep a receipt as long as any envelope it answers could still be alive."""
        return float(self.issued_min * 60 + MAX_TTL_S + CLOCK_SKEW_S)
