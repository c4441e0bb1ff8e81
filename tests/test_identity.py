"""Identity: keys, fingerprints, contact codes and the key file."""

from __future__ import annotations

import contextlib
import os
import re
import stat
from pathlib import Path

import nacl.bindings
import nacl.pwhash.argon2id
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import LocalProtocolError, RemoteProtocolError, UserError
from mesh.identity import (
    CONTACT_PREFIX,
    Identity,
    PublicIdentity,
    decode_contact,
    encode_contact,
    fingerprint,
    is_encrypted,
    pack_code,
    safety_number,
    verify,
)
from mesh.noise import keypair_from_private

OPS: int = nacl.pwhash.argon2id.OPSLIMIT_MIN  # keep Argon2 cheap in tests
MEM: int = nacl.pwhash.argon2id.MEMLIMIT_MIN
SEED = bytes(range(1, 33))
ALICE = Identity.generate("alice-the-tester", rng=lambda n: SEED[:n])
BOB = Identity.generate("bob")
CODE = ALICE.contact_code()
B32 = "abcdefghijklmnopqrstuvwxyz234567"

# Ed25519 small-order points (libsodium's blacklist), each must be refused.
SMALL_ORDER = [bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
)]


# -- keys ------------------------------------------------------------------------------

def test_generate_is_deterministic_from_rng_and_consistent() -> None:
    again = Identity(SEED, "alice-the-tester")
    assert again.public == ALICE.public
    assert again.dh_keypair == ALICE.dh_keypair
    assert keypair_from_private(ALICE.dh_keypair.private) == ALICE.dh_keypair
    assert ALICE.public.dh_pub == nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(
        ALICE.public.sign_pub)
    assert len(ALICE.public.node_id) == 16
    assert ALICE.public.node_id != BOB.public.node_id


def test_repr_does_not_leak_the_seed() -> None:
    text = repr(ALICE) + str(ALICE)
    assert SEED.hex() not in text
    assert ALICE.dh_keypair.private.hex() not in repr(ALICE.dh_keypair)


def test_sign_and_verify() -> None:
    sig = ALICE.sign(b"hello")
    assert len(sig) == 64
    assert verify(ALICE.public.sign_pub, b"hello", sig)
    assert not verify(ALICE.public.sign_pub, b"hellO", sig)
    assert not verify(BOB.public.sign_pub, b"hello", sig)
    assert not verify(ALICE.public.sign_pub, b"hello", sig[:-1])
    assert not verify(b"short", b"hello", sig)
    assert not verify(bytes(32), b"hello", bytes(64))


def test_bad_seed_length_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Identity(b"x" * 31, "alice")


@pytest.mark.parametrize("point", SMALL_ORDER)
def test_from_sign_pub_rejects_small_order(point: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        PublicIdentity.from_sign_pub(point)


def test_from_sign_pub_rejects_bad_keys() -> None:
    mixed = nacl.bindings.crypto_core_ed25519_add(ALICE.public.sign_pub, SMALL_ORDER[3])
    non_canonical = (2**255 - 19 + 1).to_bytes(32, "little")  # y = p + 1
    for bad in (b"", b"\x01" * 31, b"\x01" * 33, mixed, non_canonical):
        with pytest.raises(RemoteProtocolError):
            PublicIdentity.from_sign_pub(bad)


@settings(max_examples=200)
@given(st.binary(min_size=32, max_size=32))
def test_from_sign_pub_never_raises_anything_else(raw: bytes) -> None:
    try:
        pub = PublicIdentity.from_sign_pub(raw)
    except RemoteProtocolError:
        return
    assert len(pub.dh_pub) == 32 and pub.dh_pub != bytes(32)


# -- fingerprints ----------------------------------------------------------------------

def test_fingerprint_format() -> None:
    fp = ALICE.public.fingerprint
    assert re.fullmatch(r"\d{5}( \d{5}){5}", fp)
    assert fp == fingerprint(ALICE.public.sign_pub)
    assert fp != BOB.public.fingerprint


def test_safety_number_is_order_independent() -> None:
    carol = Identity.generate("carol")
    ab = safety_number(ALICE.public, BOB.public)
    assert ab == safety_number(BOB.public, ALICE.public)
    assert re.fullmatch(r"\d{5}( \d{5}){5}", ab)
    assert ab != safety_number(ALICE.public, carol.public)
    assert ab not in (ALICE.public.fingerprint, BOB.public.fingerprint)


# -- names -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "", "   ", "a\x00b", "a\nb", "tab\there", "\x1b[31mred", "a\u202eb", "a\u2066b",
    "del\x7f", "line\u2028sep", "x" * 65, "é" * 65, "\U0001f600" * 33,
])
def test_bad_names_rejected(name: str) -> None:
    with pytest.raises(UserError):
        Identity.generate(name)


@pytest.mark.parametrize("name", ["a", "x" * 64, "مریم‌جان", "Zoë 🕊", "张伟", "é" * 64])
def test_good_names_accepted(name: str) -> None:
    ident = Identity.generate(name)
    assert ident.name == name
    assert decode_contact(ident.contact_code())[1] == name


def test_name_is_stripped() -> None:
    assert Identity.generate("  alice \n").name == "alice"


# -- contact codes ---------------------------------------------------------------------

def test_contact_round_trip() -> None:
    assert CODE.startswith(CONTACT_PREFIX)
    assert CODE.lower() == CODE and "=" not in CODE
    assert decode_contact(CODE) == (ALICE.public, ALICE.name)
    assert encode_contact(ALICE.public, ALICE.name) == CODE


def test_contact_tolerates_case_and_whitespace() -> None:
    wrapped = "\n  " + CODE[:20].upper() + "\r\n" + CODE[20:40] + " \t" + CODE[40:] + "\n\n"
    assert decode_contact(wrapped) == (ALICE.public, ALICE.name)
    assert decode_contact(CODE.upper()) == (ALICE.public, ALICE.name)


def _typos(code: str) -> st.SearchStrategy[str]:
    index = st.integers(0, len(code) - 1)
    char = st.characters(codec="utf-8").filter(lambda c: not c.isspace())
    substitute = st.tuples(index, char).filter(
        lambda t: t[1].lower() != code[t[0]]).map(
        lambda t: code[:t[0]] + t[1] + code[t[0] + 1:])
    delete = index.map(lambda i: code[:i] + code[i + 1:])
    insert = st.tuples(st.integers(0, len(code)), char).map(
        lambda t: code[:t[0]] + t[1] + code[t[0]:])
    swap = st.integers(0, len(code) - 2).filter(lambda i: code[i] != code[i + 1]).map(
        lambda i: code[:i] + code[i + 1] + code[i] + code[i + 2:])
    return st.one_of(substitute, delete, insert, swap)


@settings(max_examples=500)
@given(_typos(CODE))
def test_every_single_character_typo_is_rejected(typo: str) -> None:
    with pytest.raises(UserError):
        decode_contact(typo)


def test_every_base32_substitution_is_rejected() -> None:
    for i in range(len(CODE)):
        for c in B32 + "018":
            if c != CODE[i]:
                with pytest.raises(UserError):
                    decode_contact(CODE[:i] + c + CODE[i + 1:])


def test_checksum_message_mentions_typo() -> None:
    i = len(CONTACT_PREFIX) + 5
    typo = CODE[:i] + ("a" if CODE[i] != "a" else "b") + CODE[i + 1:]
    with pytest.raises(UserError, match="typo"):
        decode_contact(typo)


@pytest.mark.parametrize("junk", ["", "hello", "pigeon1", "pigeon", "https://x.org", "💥"])
def test_not_a_contact_code(junk: str) -> None:
    with pytest.raises(UserError):
        decode_contact(junk)


def test_invite_is_not_a_contact_code() -> None:
    with pytest.raises(UserError, match="invite"):
        decode_contact(pack_code("pigeonch1", b"\x01" + bytes(32) + b"x"))


def test_contact_unsupported_version() -> None:
    code = pack_code(CONTACT_PREFIX, b"\x02" + ALICE.public.sign_pub + b"alice")
    with pytest.raises(UserError, match="version"):
        decode_contact(code)


@pytest.mark.parametrize("key", [*SMALL_ORDER[:3], b"\xff" * 32])
def test_contact_invalid_key(key: bytes) -> None:
    with pytest.raises(UserError, match="invalid key"):
        decode_contact(pack_code(CONTACT_PREFIX, b"\x01" + key + b"alice"))


@pytest.mark.parametrize("name", [b"", b"a\nb", b"\xff\xfe", b"\x1b[2J", b"x" * 65])
def test_contact_bad_name(name: bytes) -> None:
    with pytest.raises(UserError):
        decode_contact(pack_code(CONTACT_PREFIX, b"\x01" + ALICE.public.sign_pub + name))


# -- key file --------------------------------------------------------------------------

def test_save_load_plain(tmp_path: Path) -> None:
    path = tmp_path / "key"
    ALICE.save(path, None)
    assert not is_encrypted(path)
    loaded = Identity.load(path, None)
    assert loaded.public == ALICE.public and loaded.name == ALICE.name
    assert verify(ALICE.public.sign_pub, b"m", loaded.sign(b"m"))
    assert Identity.load(path, b"ignored").public == ALICE.public


def test_save_load_encrypted(tmp_path: Path) -> None:
    path = tmp_path / "key"
    ALICE.save(path, b"correct horse", opslimit=OPS, memlimit=MEM)
    assert is_encrypted(path)
    loaded = Identity.load(path, b"correct horse")
    assert loaded.public == ALICE.public and loaded.name == ALICE.name
    assert loaded.dh_keypair == ALICE.dh_keypair


def test_encrypted_file_hides_everything(tmp_path: Path) -> None:
    path = tmp_path / "key"
    ALICE.save(path, b"pw", opslimit=OPS, memlimit=MEM)
    data = path.read_bytes()
    for secret in (SEED, ALICE.name.encode(), ALICE.public.sign_pub, ALICE.public.dh_pub,
                   ALICE.dh_keypair.private, ALICE.public.node_id):
        assert secret not in data
    assert SEED[:8] not in data


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "key"
    ALICE.save(path, b"right", opslimit=OPS, memlimit=MEM)
    with pytest.raises(UserError, match="wrong passphrase"):
        Identity.load(path, b"wrong")
    with pytest.raises(UserError, match="passphrase"):
        Identity.load(path, None)


def test_empty_passphrase_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        ALICE.save(tmp_path / "key", b"", opslimit=OPS, memlimit=MEM)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_key_file_mode_0600(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    old = os.umask(umask)
    try:
        ALICE.save(path, None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # no temp file left


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    path = tmp_path / "key"
    ALICE.save(path, None)
    BOB.save(path, b"pw", opslimit=OPS, memlimit=MEM)
    assert Identity.load(path, b"pw").public == BOB.public


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no key file"):
        Identity.load(tmp_path / "nope", None)
    with pytest.raises(UserError):
        is_encrypted(tmp_path / "nope")


def test_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "key"
    ALICE.save(path, b"pw", opslimit=OPS, memlimit=MEM)
    good = path.read_bytes()
    huge_mem = good[:12] + (2**40).to_bytes(8, "big") + good[20:]
    bad_files = [
        b"", b"PGNKEY", b"hello world", good[:30], good[:-1], b"PGNKEY\x09\x01" + good[8:],
        b"PGNKEY\x01\x07" + good[8:], huge_mem, good + b"x" * 5000,
        good[:-3] + bytes([good[-3] ^ 1]) + good[-2:],
    ]
    for data in bad_files:
        path.write_bytes(data)
        with pytest.raises(UserError):
            Identity.load(path, b"pw")
    ALICE.save(path, None)
    plain = path.read_bytes()
    for data in (plain[:40], plain[:8] + SEED + b"\xff\xfe", plain[:8] + SEED + b"a\x00"):
        path.write_bytes(data)
        with pytest.raises(UserError):
            Identity.load(path, None)


@settings(max_examples=100, deadline=None)
@given(st.booleans(), st.binary(max_size=200))
def test_hostile_key_file_only_user_errors(tmp_path_factory: pytest.TempPathFactory,
                                           encrypted: bool, data: bytes) -> None:
    path = tmp_path_factory.mktemp("kf") / "key"
    # Encrypted files get in-range cheap KDF parameters so the fuzzing reaches the box.
    head = (b"PGNKEY\x01\x01" + OPS.to_bytes(4, "big")
            + MEM.to_bytes(8, "big")) if encrypted else b"PGNKEY\x01\x00"
    path.write_bytes(head + data)
    with contextlib.suppress(UserError):
        Identity.load(path, b"pw")
