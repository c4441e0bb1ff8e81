"""Noise Protocol Framework (revision 34), suite ``25519_ChaChaPoly_BLAKE2b``, on PyNaCl.

Every link starts with Noise XX and direct messages are sealed with Noise X, so this module
is the root of Pigeon's confidentiality. It is written here instead of taken from a library
for three reasons: the suite must be exactly the one pinned by ``shared/vectors`` (BLAKE2b,
not the SHA-256 most libraries default to), errors must split into our misuse
(``LocalProtocolError``) and a peer's bad bytes (``NoiseError``, which only ever closes one
link), and randomness must come in through a parameter so tests are deterministic.

Patterns are data: a table of token strings, interpreted by one small engine, so each pattern
is checked against the cacophony vectors rather than hand-coded. PSK patterns are left out.

Peer public keys are checked against every encoding of the X25519 low-order points, and an
all-zero DH output is rejected as well: a peer that forces a known shared secret must not
get a session. The module does no I/O and reads no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

import nacl.exceptions
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _sodium
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from mesh.errors import LocalProtocolError, RemoteProtocolError

MAX_MESSAGE_LEN = 65535
DHLEN = 32
HASHLEN = 64
TAGLEN = 16
_MAX_NONCE = 2**64 - 1  # reserved by the spec: reaching it ends the CipherState
_SUITE = "25519_ChaChaPoly_BLAKE2b"


def _low_order_points() -> frozenset[bytes]:
    p = 2**255 - 19
    order_8 = (
        0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
        0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
    )
    # 0, 1, p-1 and the two order-8 u-coordinates, plus p and p+1 (non-canonical 0 and 1),
    # each with bit 255 clear and set: X25519 ignores that bit, so both encodings are the
    # same point. Together this is libsodium's blacklist as its has_small_order() applies it.
    values = (0, 1, *order_8, p - 1, p, p + 1)
    return frozenset((v | high).to_bytes(32, "little") for v in values for high in (0, 1 << 255))


LOW_ORDER_POINTS: frozenset[bytes] = _low_order_points()


class NoiseError(RemoteProtocolError):
    """The peer sent bytes that break the protocol: bad tag, wrong length, low-order key."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair; ``private`` is used as given (X25519 clamps it when used)."""

    private: bytes
    public: bytes

    def __post_init__(self) -> None:
        if len(self.private) != DHLEN or len(self.public) != DHLEN:
            raise LocalProtocolError("X25519 keys are 32 bytes")

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()})"  # never print the private key


def keypair_from_private(private: bytes) -> KeyPair:
    if len(private) != DHLEN:
        raise LocalProtocolError("an X25519 private key is 32 bytes")
    public: bytes = crypto_scalarmult_base(bytes(private))
    return KeyPair(private=bytes(private), public=public)


def generate_keypair(rng: Callable[[int], bytes] = os.urandom) -> KeyPair:
    return keypair_from_private(rng(DHLEN))


def _check_public(public: bytes, who: str) -> None:
    if public in LOW_ORDER_POINTS:
        raise NoiseError(f"{who} is a low-order X25519 point")


def _dh(keypair: KeyPair, public: bytes) -> bytes:
    try:
        shared: bytes = crypto_scalarmult(keypair.private, public)
    except nacl.exceptions.CryptoError as exc:  # libsodium refuses an all-zero result
        raise NoiseError("X25519 result is all zero") from exc
    if hmac.compare_digest(shared, bytes(DHLEN)):
        raise NoiseError("X25519 result is all zero")
    return shared


def _hkdf(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise HKDF with HMAC-BLAKE2b (hmac uses blake2b's 128-byte block); two outputs."""
    temp = hmac.digest(chaining_key, ikm, hashlib.blake2b)
    out1 = hmac.digest(temp, b"\x01", hashlib.blake2b)
    return out1, hmac.digest(temp, out1 + b"\x02", hashlib.blake2b)


# ChaCha20-Poly1305 (IETF) straight through PyNaCl's libsodium binding: its Python wrappers
# check and format every argument on every call (about 3 of 5 microseconds per record, and
# a simulated run seals and opens hundreds of thousands), while here key and nonce sizes
# are fixed and every caller passes bytes. libsodium reads 32 key bytes whatever it is
# given, so every key is checked where it is set: ``CipherState.__init__`` and
# ``_SymmetricState.mix_key`` (always a 32-byte slice of a 64-byte BLAKE2b output).


def _seal(key: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    nonce = bytes(4) + n.to_bytes(8, "little")
    size = len(plaintext) + TAGLEN
    out = _ffi.new("unsigned char[]", size)
    if _sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            out, _ffi.NULL, plaintext, len(plaintext), ad, len(ad), _ffi.NULL, nonce, key) != 0:
        raise nacl.exceptions.CryptoError("Encryption failed.")
    sealed: bytes = _ffi.buffer(out, size)[:]
    return sealed


def _open(key: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    if len(ciphertext) < TAGLEN:
        raise NoiseError("ciphertext shorter than its tag")
    nonce = bytes(4) + n.to_bytes(8, "little")
    size = len(ciphertext) - TAGLEN
    out = _ffi.new("unsigned char[]", size)
    if _sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
            out, _ffi.NULL, _ffi.NULL, ciphertext, len(ciphertext), ad, len(ad), nonce, key) != 0:
        raise NoiseError("authentication failed")
    opened: bytes = _ffi.buffer(out, size)[:]
    return opened


class CipherState:
    """One direction of a finished session; the nonce only advances on success.

    Because the nonce is implicit, a replayed, reordered or dropped message fails to
    authenticate: the transport underneath must deliver in order and without loss.
    """

    def __init__(self, key: bytes, *, nonce: int = 0) -> None:
        if len(key) != 32 or not 0 <= nonce <= _MAX_NONCE:
            raise LocalProtocolError("bad CipherState key or nonce")
        self._key = key
        self._n = nonce

    @property
    def nonce(self) -> int:
        return self._n

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        if len(plaintext) + TAGLEN > MAX_MESSAGE_LEN:
            raise LocalProtocolError("Noise message would exceed 65535 bytes")
        if self._n >= _MAX_NONCE:
            raise LocalProtocolError("nonces exhausted: start a new session")
        out = _seal(self._key, self._n, ad, plaintext)
        self._n += 1
        return out

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise NoiseError("Noise message longer than 65535 bytes")
        if self._n >= _MAX_NONCE:
            raise NoiseError("nonces exhausted: peer sent too many messages")
        out = _open(self._key, self._n, ad, bytes(ciphertext))
        self._n += 1
        return out


class _UnusedCipherState(CipherState):
    """The responder-to-initiator direction of a one-way pattern, which Noise forbids."""

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        raise LocalProtocolError("one-way pattern: only the initiator sends")

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        raise LocalProtocolError("one-way pattern: only the initiator sends")


class _SymmetricState:
    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = hashlib.blake2b(protocol_name).digest()
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm)
        self.k, self.n = temp_k[:32], 0

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.blake2b(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        out = plaintext
        if self.k is not None:
            out = _seal(self.k, self.n, self.h, plaintext)
            self.n += 1
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        out = ciphertext
        if self.k is not None:
            out = _open(self.k, self.n, self.h, ciphertext)
            self.n += 1
        self.mix_hash(ciphertext)
        return out

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"")
        return k1[:32], k2[:32]


# The one-way and fundamental interactive patterns of revision 34 (sections 7.4 and 7.5), as
# "pre-messages ... messages"; each is "-> tokens" (initiator to responder) or "<- tokens".
# Deferred patterns (section 18) would be one line each; Pigeon does not need them.
_PATTERN_TEXT: dict[str, str] = {
    "N": "<- s ... -> e, es",
    "K": "-> s; <- s ... -> e, es, ss",
    "X": "<- s ... -> e, es, s, ss",
    "NN": "-> e; <- e, ee",
    "NK": "<- s ... -> e, es; <- e, ee",
    "NX": "-> e; <- e, ee, s, es",
    "XN": "-> e; <- e, ee; -> s, se",
    "XK": "<- s ... -> e, es; <- e, ee; -> s, se",
    "XX": "-> e; <- e, ee, s, es; -> s, se",
    "KN": "-> s ... -> e; <- e, ee, se",
    "KK": "-> s; <- s ... -> e, es, ss; <- e, ee, se",
    "KX": "-> s ... -> e; <- e, ee, se, s, es",
    "IN": "-> e, s; <- e, ee, se",
    "IK": "<- s ... -> e, es, s, ss; <- e, ee, se",
    "IX": "-> e, s; <- e, ee, se, s, es",
}

# A message is (sent_by_initiator, tokens).
_Message = tuple[bool, tuple[str, ...]]


def _parse(text: str) -> tuple[tuple[_Message, ...], tuple[_Message, ...]]:
    pre_text, _, msg_text = text.rpartition("...")

    def messages(part: str) -> tuple[_Message, ...]:
        out = []
        for item in filter(None, (m.strip() for m in part.split(";"))):
            arrow, _, tokens = item.partition(" ")
            out.append((arrow == "->", tuple(t.strip() for t in tokens.split(","))))
        return tuple(out)

    return messages(pre_text), messages(msg_text)


PATTERNS: dict[str, tuple[tuple[_Message, ...], tuple[_Message, ...]]] = {
    name: _parse(text) for name, text in _PATTERN_TEXT.items()
}


class HandshakeState:
    """One side of a handshake: alternate ``write_message`` / ``read_message``, then ``split``.

    ``s`` is our static key and ``rs`` the peer's static key when the pattern knows it in
    advance (the "<- s" of X); ``e`` is fixed only by tests. After any ``NoiseError`` the
    handshake is dead and must be dropped. ``remote_static`` is only authenticated once
    ``complete`` is true.
    """

    def __init__(
        self,
        pattern: str,
        initiator: bool,
        *,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if pattern not in PATTERNS:
            raise LocalProtocolError(f"unknown Noise pattern {pattern!r}")
        pre_messages, self._messages = PATTERNS[pattern]
        self._initiator = initiator
        self._s, self._e, self._rng = s, e, rng
        self._rs: bytes | None = None
        self._re: bytes | None = None
        self._one_way = len(self._messages) == 1
        self._turn = 0
        self._failed = False
        self._split_done = False

        all_tokens = [(sender, t) for sender, ts in pre_messages + self._messages for t in ts]
        our_dh = ("ss", "se" if initiator else "es")
        needs_s = any((t == "s" and by == initiator) or t in our_dh for by, t in all_tokens)
        if needs_s and s is None:
            raise LocalProtocolError(f"pattern {pattern} needs our static key")
        if not needs_s and s is not None:
            raise LocalProtocolError(f"pattern {pattern} does not use our static key")
        pre_rs = any(sender != initiator and "s" in ts for sender, ts in pre_messages)
        if pre_rs != (rs is not None):
            raise LocalProtocolError(
                f"pattern {pattern} {'needs' if pre_rs else 'cannot use'} the peer's static key"
            )
        if rs is not None:
            if len(rs) != DHLEN:
                raise LocalProtocolError("the peer's static key must be 32 bytes")
            _check_public(rs, "remote static key")
            self._rs = bytes(rs)

        self._sym = _SymmetricState(f"Noise_{pattern}_{_SUITE}".encode("ascii"))
        self._sym.mix_hash(prologue)
        for sender, tokens in pre_messages:  # only "s" occurs in non-fallback patterns
            key = (s.public if s else None) if sender == initiator else self._rs
            if tokens != ("s",) or key is None:
                raise LocalProtocolError(f"unsupported pre-message {tokens}")
            self._sym.mix_hash(key)

    @property
    def complete(self) -> bool:
        return self._turn == len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        """Channel binding: equal on both sides once complete, unique to this session."""
        if not self.complete:
            raise LocalProtocolError("handshake not complete")
        return self._sym.h

    @property
    def remote_static(self) -> bytes | None:
        return self._rs

    def _start(self, writing: bool) -> tuple[str, ...]:
        if self._failed:
            raise LocalProtocolError("handshake already failed")
        if self.complete:
            raise LocalProtocolError("handshake already complete")
        sender, tokens = self._messages[self._turn]
        if (sender == self._initiator) != writing:
            raise LocalProtocolError(f"not our turn to {'write' if writing else 'read'}")
        return tokens

    def _dh_token(self, token: str) -> None:
        ours, theirs = (token[0], token[1]) if self._initiator else (token[1], token[0])
        local = self._s if ours == "s" else self._e
        remote = self._rs if theirs == "s" else self._re
        if local is None or remote is None:
            raise LocalProtocolError(f"{token} without the keys it needs")
        self._sym.mix_key(_dh(local, remote))

    def write_message(self, payload: bytes = b"") -> bytes:
        tokens = self._start(writing=True)
        out = bytearray()
        for token in tokens:
            if token == "e":
                if self._e is None:
                    self._e = generate_keypair(self._rng)
                out += self._e.public
                self._sym.mix_hash(self._e.public)
            elif token == "s":
                assert self._s is not None  # checked in __init__
                out += self._sym.encrypt_and_hash(self._s.public)
            else:
                self._dh_token(token)
        out += self._sym.encrypt_and_hash(bytes(payload))
        if len(out) > MAX_MESSAGE_LEN:
            self._failed = True
            raise LocalProtocolError("handshake message would exceed 65535 bytes")
        self._turn += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        tokens = self._start(writing=False)
        try:
            payload = self._read(tokens, bytes(message))
        except NoiseError:
            self._failed = True
            raise
        self._turn += 1
        return payload

    def _read(self, tokens: tuple[str, ...], message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LEN:
            raise NoiseError("handshake message longer than 65535 bytes")
        pos = 0

        def take(size: int) -> bytes:
            nonlocal pos
            if len(message) - pos < size:
                raise NoiseError("handshake message truncated")
            pos += size
            return message[pos - size : pos]

        for token in tokens:
            if token == "e":
                self._re = take(DHLEN)
                _check_public(self._re, "remote ephemeral key")
                self._sym.mix_hash(self._re)
            elif token == "s":
                rs = self._sym.decrypt_and_hash(take(DHLEN + (TAGLEN if self._sym.k else 0)))
                _check_public(rs, "remote static key")
                self._rs = rs
            else:
                self._dh_token(token)
        return self._sym.decrypt_and_hash(message[pos:])

    def split(self) -> tuple[CipherState, CipherState]:
        """Return (send, receive) for this side; callable once so no key is used twice."""
        if not self.complete:
            raise LocalProtocolError("handshake not complete")
        if self._split_done:
            raise LocalProtocolError("split() already called")
        self._split_done = True
        k1, k2 = self._sym.split()
        initiator_to_responder = CipherState(k1)
        responder_to_initiator = (_UnusedCipherState if self._one_way else CipherState)(k2)
        if self._initiator:
            return initiator_to_responder, responder_to_initiator
        return responder_to_initiator, initiator_to_responder
