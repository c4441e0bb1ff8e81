"""Long-term identity: keys, node id, fingerprint, contact code and the key file.

One secret, a 32-byte Ed25519 seed, is the whole identity. The X25519 key used for
Diffie-Hellman (Noise links, sealed direct messages) is derived from it with libsodium's
birational map, so a contact code needs to carry only the Ed25519 public key and nobody
can pair our signing key with somebody else's DH key.

Humans compare *fingerprints* (30 digits, 6 groups of 5, easy to read aloud over a bad
phone line) and exchange *contact codes* (one copy-pasteable string with a checksum, so a
typo is caught instead of silently adding a stranger).

Contact code: ``"pigeon1" + base32(payload + check)``, lowercase, no padding, where::

    payload  0  version   u8  = 1
             1  sign_pub  32  Ed25519 public key
            33  name      rest, UTF-8 display name
    check       4 bytes  BLAKE2b-32(prefix + payload, person="pigeon-code")

``"pigeon1"`` works like a bech32 human-readable part: ``1`` is not a base32 character,
so the prefix never runs into the data. A future format keeps the prefix and changes the
version byte, which lets an old client say "unsupported version" instead of "typo".

Key file (binary, big-endian)::

    0  magic    6   b"PGNKEY"
    6  version  u8  = 1
    7  mode     u8  0 = plaintext, 1 = Argon2id + SecretBox
    plaintext:  8  seed 32 | name UTF-8
    encrypted:  8  opslimit u32 | 12 memlimit u64 | 20 salt 16 | 36 SecretBox(seed | name)
                   (nonce 24 + MAC 16 + ciphertext)

Changing the Argon2 parameters or salt in the file changes the derived key, so tampering
shows up as a failed decryption, not as a weaker key. Bounds on the parameters stop a
planted file from making ``load`` allocate gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import os
import struct
import tempfile
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.pwhash.argon2id
import nacl.secret
import nacl.signing

from mesh.errors import LocalProtocolError, RemoteProtocolError, UserError
from mesh.noise import KeyPair

SEED_LEN = 32
KEY_LEN = 32
SIG_LEN = 64
NODE_ID_LEN = 16

MAX_NAME_CHARS = 64
#: UTF-8 bytes; 64 two-byte letters (Persian, Arabic, Cyrillic) must fit.
MAX_NAME_BYTES = 128

CONTACT_PREFIX = "pigeon1"
CONTACT_VERSION = 1
CHECK_LEN = 4
#: Longest code string we even look at (a 128-byte name gives ~290 characters).
MAX_CODE_CHARS = 1024

KEYFILE_MAGIC = b"PGNKEY"
KEYFILE_VERSION = 1
_MODE_PLAIN = 0
_MODE_ARGON2ID = 1
_KF_HEAD = struct.Struct("!6sBB")
_KF_KDF = struct.Struct("!IQ16s")
MAX_KEYFILE_LEN = 4096
DEFAULT_OPSLIMIT: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE
_OPSLIMIT_RANGE = (int(nacl.pwhash.argon2id.OPSLIMIT_MIN), 64)
_MEMLIMIT_RANGE = (int(nacl.pwhash.argon2id.MEMLIMIT_MIN),
                   int(nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE))

# Explicit direction overrides and isolates let a name render as something else.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")

Rng = Callable[[int], bytes]


def _blake(data: bytes, person: bytes, size: int = 16) -> bytes:
    return hashlib.blake2b(data, digest_size=size, person=person).digest()


def node_id(sign_pub: bytes) -> bytes:
    """BLAKE2b-128 of the Ed25519 public key: the stable local handle for a person."""
    return _blake(sign_pub, b"pigeon-node-id")


def fingerprint(sign_pub: bytes) -> str:
    """30 decimal digits in 6 groups of 5 (~99 bits), derived from the public key.

    Each group is a 40-bit hash chunk mod 100000, so every group is uniform to within
    2^-23 and all 30 digits carry weight (no leading-zero tricks for a forger).
    """
    digest = _blake(sign_pub, b"pigeon-fpr", 30)
    return _digit_groups(digest)


def _digit_groups(digest: bytes) -> str:
    groups = [int.from_bytes(digest[i:i + 5], "big") % 100_000 for i in range(0, 30, 5)]
    return " ".join(f"{g:05d}" for g in groups)


def check_name(name: object, what: str = "display name") -> str:
    """Validate a name a person typed or a peer sent; returns it stripped.

    Control characters and bidi overrides are refused because names are shown in a
    terminal next to messages: they could fake lines or reorder text to impersonate.
    """
    if not isinstance(name, str):
        raise UserError(f"{what} must be text")
    stripped = name.strip()
    if not stripped:
        raise UserError(f"{what} is empty")
    if len(stripped) > MAX_NAME_CHARS:
        raise UserError(f"{what} is longer than {MAX_NAME_CHARS} characters")
    for ch in stripped:
        if unicodedata.category(ch) in _BAD_CATEGORIES or ch in _BIDI_CONTROLS:
            raise UserError(f"{what} contains a control character")
    if len(stripped.encode("utf-8")) > MAX_NAME_BYTES:
        raise UserError(f"{what} is longer than {MAX_NAME_BYTES} bytes of UTF-8")
    return stripped


@dataclass(frozen=True)
class PublicIdentity:
    """What we know about a person: their keys and the handles derived from them.

    Build it with ``from_sign_pub`` so the derived fields are always consistent.
    """

    sign_pub: bytes
    dh_pub: bytes
    node_id: bytes
    fingerprint: str

    @classmethod
    def from_sign_pub(cls, sign_pub: bytes) -> PublicIdentity:
        """Derive everything from an Ed25519 public key that came from outside.

        Rejects non-canonical, off-curve, small-order and mixed-order points: such a key
        would convert to a weak X25519 key whose DH output an attacker can predict.
        Raises ``RemoteProtocolError`` (callers handling typed input turn it into UserError).
        """
        if not isinstance(sign_pub, bytes | bytearray) or len(sign_pub) != KEY_LEN:
            raise RemoteProtocolError("public key has the wrong length")
        sign_pub = bytes(sign_pub)
        try:
            if not nacl.bindings.crypto_core_ed25519_is_valid_point(sign_pub):
                raise RemoteProtocolError("public key is not a valid Ed25519 point")
            dh_pub = bytes(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(sign_pub))
        except (nacl.exceptions.CryptoError, ValueError, TypeError, RuntimeError) as exc:
            raise RemoteProtocolError("public key cannot be converted to X25519") from exc
        if dh_pub == bytes(KEY_LEN):
            raise RemoteProtocolError("public key converts to a zero X25519 key")
        return cls(sign_pub=sign_pub, dh_pub=dh_pub, node_id=node_id(sign_pub),
                   fingerprint=fingerprint(sign_pub))


#: Distinct keys whose derived identity is remembered. Checking a key (is it a canonical,
#: prime-order point?) and converting it costs ~0.2 ms, paid per message sent and per
#: message opened; the same few contacts come back again and again. Bounded, so keys a
#: peer makes up can only evict entries, never grow memory.
PUBLIC_IDENTITY_CACHE = 4096


@functools.lru_cache(maxsize=PUBLIC_IDENTITY_CACHE)
def _cached_public_identity(sign_pub: bytes) -> PublicIdentity:
    return PublicIdentity.from_sign_pub(sign_pub)


def public_identity(sign_pub: bytes) -> PublicIdentity:
    """``PublicIdentity.from_sign_pub`` with a bounded cache (the result is immutable and a
    pure function of the key; invalid keys raise every time and are not cached)."""
    return _cached_public_identity(bytes(sign_pub))


def safety_number(a: PublicIdentity, b: PublicIdentity) -> str:
    """One 30-digit number both sides of a pairing compute identically.

    The two keys are sorted first so Alice and Bob see the same digits; hashing them
    together keeps it as short as one fingerprint while binding both keys.
    """
    first, second = sorted((a.sign_pub, b.sign_pub))
    return _digit_groups(_blake(first + second, b"pigeon-safety", 30))


def verify(sign_pub: bytes, message: bytes, sig: bytes) -> bool:
    """Check a detached Ed25519 signature; False (never an exception) on any bad input."""
    try:
        if len(sig) != SIG_LEN:
            return False
        nacl.signing.VerifyKey(bytes(sign_pub)).verify(bytes(message), bytes(sig))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return False
    return True


class Identity:
    """Our own long-term identity; the only object that holds the secret seed."""

    __slots__ = ("_seed", "_signing_key", "dh_keypair", "name", "public")

    def __init__(self, seed: bytes, name: str) -> None:
        if len(seed) != SEED_LEN:
            raise LocalProtocolError("identity seed must be 32 bytes")
        self.name: str = check_name(name)
        self._seed = bytes(seed)
        self._signing_key = nacl.signing.SigningKey(self._seed)
        sign_pub, secret64 = nacl.bindings.crypto_sign_seed_keypair(self._seed)
        self.public: PublicIdentity = PublicIdentity.from_sign_pub(bytes(sign_pub))
        dh_private = bytes(nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(secret64))
        self.dh_keypair: KeyPair = KeyPair(private=dh_private, public=self.public.dh_pub)

    def __repr__(self) -> str:  # never print the seed
        return f"Identity(name={self.name!r}, node_id={self.public.node_id.hex()})"

    @classmethod
    def generate(cls, name: str, rng: Rng = os.urandom) -> Identity:
        """A fresh identity; the name is validated first so a bad name wastes no key."""
        name = check_name(name)
        seed = rng(SEED_LEN)
        if len(seed) != SEED_LEN:
            raise LocalProtocolError("rng returned the wrong number of bytes")
        return cls(seed, name)

    def sign(self, message: bytes) -> bytes:
        """A 64-byte detached Ed25519 signature (non-deniable: use only where intended)."""
        return bytes(self._signing_key.sign(bytes(message)).signature)

    def contact_code(self) -> str:
        return encode_contact(self.public, self.name)

    # -- key file ---------------------------------------------------------------------

    def save(
        self, path: str | os.PathLike[str], passphrase: bytes | None, *,
        opslimit: int = DEFAULT_OPSLIMIT, memlimit: int = DEFAULT_MEMLIMIT,
        rng: Rng = os.urandom,
    ) -> None:
        """Write the key file atomically with mode 0600, encrypted iff a passphrase is given.

        Atomic (temp file, fsync, rename) because a half-written key file after a crash
        or a pulled battery would lose the identity for good.
        """
        secret = self._seed + self.name.encode("utf-8")
        if passphrase is None:
            data = _KF_HEAD.pack(KEYFILE_MAGIC, KEYFILE_VERSION, _MODE_PLAIN) + secret
        else:
            if not passphrase:
                raise UserError("the passphrase is empty")
            _check_kdf_params(opslimit, memlimit, LocalProtocolError)
            salt = rng(nacl.pwhash.argon2id.SALTBYTES)
            nonce = rng(nacl.secret.SecretBox.NONCE_SIZE)
            key = _kdf(passphrase, salt, opslimit, memlimit)
            boxed = bytes(nacl.secret.SecretBox(key).encrypt(secret, nonce))
            data = (_KF_HEAD.pack(KEYFILE_MAGIC, KEYFILE_VERSION, _MODE_ARGON2ID)
                    + _KF_KDF.pack(opslimit, memlimit, salt) + boxed)
        _atomic_write(Path(path), data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: bytes | None) -> Identity:
        """Read a key file; every problem becomes a ``UserError`` a person can act on."""
        data = _read_keyfile(Path(path))
        mode = _parse_head(data)
        if mode == _MODE_PLAIN:
            secret = data[_KF_HEAD.size:]
        else:
            if passphrase is None:
                raise UserError("the key file is encrypted; a passphrase is needed")
            if len(data) < _KF_HEAD.size + _KF_KDF.size + 40 + SEED_LEN:
                raise UserError("the key file is corrupt (truncated)")
            opslimit, memlimit, salt = _KF_KDF.unpack_from(data, _KF_HEAD.size)
            _check_kdf_params(opslimit, memlimit, UserError)
            key = _kdf(passphrase, bytes(salt), opslimit, memlimit)
            try:
                secret = bytes(nacl.secret.SecretBox(key).decrypt(
                    data[_KF_HEAD.size + _KF_KDF.size:]))
            except nacl.exceptions.CryptoError:
                raise UserError("wrong passphrase (or the key file was modified)") from None
        if len(secret) <= SEED_LEN:
            raise UserError("the key file is corrupt (no name)")
        try:
            name = secret[SEED_LEN:].decode("utf-8")
            return cls(secret[:SEED_LEN], name)
        except UnicodeDecodeError:
            raise UserError("the key file is corrupt (bad name)") from None


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Whether ``load`` will need a passphrase (so the CLI knows whether to prompt)."""
    return _parse_head(_read_keyfile(Path(path))) == _MODE_ARGON2ID


def _read_keyfile(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEYFILE_LEN + 1)
    except FileNotFoundError:
        raise UserError(f"no key file at {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEYFILE_LEN:
        raise UserError("the key file is corrupt (too large)")
    return data


def _parse_head(data: bytes) -> int:
    if len(data) < _KF_HEAD.size or not data.startswith(KEYFILE_MAGIC):
        raise UserError("this is not a Pigeon key file (or it is corrupt)")
    _, version, mode = _KF_HEAD.unpack_from(data, 0)
    if version != KEYFILE_VERSION:
        raise UserError(f"key file version {version} is not supported by this Pigeon")
    if mode not in (_MODE_PLAIN, _MODE_ARGON2ID):
        raise UserError("the key file is corrupt (unknown mode)")
    return int(mode)


def _check_kdf_params(opslimit: int, memlimit: int, error: type[Exception]) -> None:
    if not (_OPSLIMIT_RANGE[0] <= opslimit <= _OPSLIMIT_RANGE[1]
            and _MEMLIMIT_RANGE[0] <= memlimit <= _MEMLIMIT_RANGE[1]):
        raise error("Argon2id parameters out of range (key file corrupt?)")


def _kdf(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return bytes(nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, bytes(passphrase), salt,
        opslimit=opslimit, memlimit=memlimit))


def _atomic_write(path: Path, data: bytes) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not possible on every platform, so best effort.
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- checksummed codes (contact codes here, channel invites in mesh.sealing) ------------

def _check(prefix: str, payload: bytes) -> bytes:
    return _blake(prefix.encode("ascii") + payload, b"pigeon-code", CHECK_LEN)


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def pack_code(prefix: str, payload: bytes) -> str:
    """``prefix`` + lowercase unpadded base32 of ``payload`` and a 4-byte checksum."""
    return prefix + _b32(payload + _check(prefix, payload))


def unpack_code(code: object, prefix: str, what: str) -> bytes:
    """Inverse of ``pack_code``; tolerant of whitespace, line breaks and case.

    Raises ``UserError`` naming ``what`` on anything else. Non-canonical base32 (a typo
    in the unused bits of the last character) is refused too, so every single-character
    change is caught, not just those the checksum sees.
    """
    if not isinstance(code, str):
        raise UserError(f"this is not a Pigeon {what}")
    compact = "".join(code.split())
    if len(compact) > MAX_CODE_CHARS:
        raise UserError(f"this is too long to be a Pigeon {what}")
    if not compact.isascii():  # checked before lower(): it maps the Kelvin sign to "k"
        raise UserError(f"this is not a Pigeon {what} (it has non-ASCII characters)")
    compact = compact.lower()
    if not compact.startswith(prefix):
        raise UserError(f"this is not a Pigeon {what} (it should start with {prefix!r})")
    body = compact[len(prefix):]
    if not body or not set(body) <= _B32_ALPHABET:
        raise UserError(f"this {what} contains characters that cannot be in one; "
                        "check for a typo")
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise UserError(f"this {what} has the wrong length; check for a typo "
                        "or a missing part") from None
    if _b32(raw) != body or len(raw) <= CHECK_LEN:
        raise UserError(f"this {what} is damaged; check for a typo or a missing part")
    payload, check = raw[:-CHECK_LEN], raw[-CHECK_LEN:]
    if not hmac.compare_digest(check, _check(prefix, payload)):
        raise UserError(f"the {what} checksum does not match; check for a typo")
    return payload


def encode_contact(public: PublicIdentity, name: str) -> str:
    """The string a person shares so others can add them (also fits a QR code)."""
    name = check_name(name)
    return pack_code(CONTACT_PREFIX,
                     bytes([CONTACT_VERSION]) + public.sign_pub + name.encode("utf-8"))


def decode_contact(code: str) -> tuple[PublicIdentity, str]:
    """Parse a contact code a person pasted or typed; ``UserError`` says what is wrong."""
    if isinstance(code, str) and "".join(code.split()).lower().startswith("pigeonch1"):
        raise UserError("this is a channel invite, not a contact code")
    payload = unpack_code(code, CONTACT_PREFIX, "contact code")
    if payload[0] != CONTACT_VERSION:
        raise UserError(f"contact code version {payload[0]} is not supported; "
                        "update Pigeon")
    if len(payload) < 1 + KEY_LEN + 1:
        raise UserError("this contact code has no name in it")
    try:
        public = PublicIdentity.from_sign_pub(payload[1:1 + KEY_LEN])
    except RemoteProtocolError:
        raise UserError("this contact code holds an invalid key") from None
    try:
        name = payload[1 + KEY_LEN:].decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("the name in this contact code is not valid text") from None
    return public, check_name(name, "the name in this contact code")
