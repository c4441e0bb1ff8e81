"""mesh.noise: cacophony vectors, interop with `noiseprotocol`, hostile input, misuse."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from mesh import noise
from mesh.errors import LocalProtocolError
from mesh.noise import (
    LOW_ORDER_POINTS,
    MAX_MESSAGE_LEN,
    PATTERNS,
    CipherState,
    HandshakeState,
    KeyPair,
    NoiseError,
    generate_keypair,
    keypair_from_private,
)

VECTORS_PATH = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "vectors"
    / "noise-25519-chachapoly-blake2b.json"
)
REQUIRED_PATTERNS = {"XX", "NN", "X"}


def _pattern_of(vector: dict[str, Any]) -> str:
    return str(vector["protocol_name"]).split("_")[1]


def _load_vectors() -> list[dict[str, Any]]:
    if not VECTORS_PATH.exists():
        return []
    vectors: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["vectors"]
    return [v for v in vectors if _pattern_of(v) in PATTERNS]


VECTORS = _load_vectors()


def _one_way(pattern: str) -> bool:
    return len(PATTERNS[pattern][1]) == 1


def _check_vector(v: dict[str, Any]) -> None:
    pattern = _pattern_of(v)
    assert v["protocol_name"] == f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2b"

    def key(name: str) -> KeyPair | None:
        return keypair_from_private(bytes.fromhex(v[name])) if name in v else None

    def raw(name: str) -> bytes | None:
        return bytes.fromhex(v[name]) if name in v else None

    init = HandshakeState(pattern, True, prologue=bytes.fromhex(v["init_prologue"]),
                          s=key("init_static"), e=key("init_ephemeral"),
                          rs=raw("init_remote_static"))
    resp = HandshakeState(pattern, False, prologue=bytes.fromhex(v["resp_prologue"]),
                          s=key("resp_static"), e=key("resp_ephemeral"),
                          rs=raw("resp_remote_static"))
    messages = v["messages"]
    i = 0
    while not init.complete:
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        payload = bytes.fromhex(messages[i]["payload"])
        ciphertext = writer.write_message(payload)
        assert ciphertext.hex() == messages[i]["ciphertext"], f"handshake message {i}"
        assert reader.read_message(ciphertext) == payload
        i += 1
    assert resp.complete
    assert init.handshake_hash.hex() == v["handshake_hash"]
    assert resp.handshake_hash == init.handshake_hash
    if "resp_static" in v:
        assert init.remote_static == keypair_from_private(bytes.fromhex(v["resp_static"])).public
    if "init_static" in v:
        assert resp.remote_static == keypair_from_private(bytes.fromhex(v["init_static"])).public

    init_send, init_recv = init.split()
    resp_send, resp_recv = resp.split()
    assert i < len(messages), "vector has no transport messages"
    for j in range(i, len(messages)):
        # Cacophony keeps alternating across the whole list; one-way patterns only send I->R.
        from_init = _one_way(pattern) or j % 2 == 0
        send, recv = (init_send, resp_recv) if from_init else (resp_send, init_recv)
        payload = bytes.fromhex(messages[j]["payload"])
        ciphertext = send.encrypt(payload)
        assert ciphertext.hex() == messages[j]["ciphertext"], f"transport message {j}"
        assert recv.decrypt(ciphertext) == payload


# --- 1. vectors ------------------------------------------------------------------------------


def test_vector_file_covers_required_patterns() -> None:
    if not VECTORS_PATH.exists():
        reason = f"Noise test vectors not found at {VECTORS_PATH}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must prove the vectors)")
        pytest.skip(reason)
    by_pattern = {_pattern_of(v): v for v in VECTORS}
    assert set(by_pattern) >= REQUIRED_PATTERNS
    assert set(by_pattern) == set(PATTERNS), "every registered pattern must have a vector"
    for pattern in sorted(REQUIRED_PATTERNS):  # exercised here even if -k deselects the rest
        _check_vector(by_pattern[pattern])


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: str(v["protocol_name"]))
def test_vector(vector: dict[str, Any]) -> None:
    _check_vector(vector)


# --- helpers -----------------------------------------------------------------------------------


def _pair(pattern: str, prologue: bytes = b"pigeon") -> tuple[HandshakeState, HandshakeState]:
    """An initiator and a responder with every key the pattern needs."""
    pre, msgs = PATTERNS[pattern]
    tokens = [(by_init, t) for by_init, ts in pre + msgs for t in ts]

    def needs_s(initiator: bool) -> bool:
        mine = "se" if initiator else "es"
        return any((t == "s" and by == initiator) or t in ("ss", mine) for by, t in tokens)

    init_s = generate_keypair() if needs_s(True) else None
    resp_s = generate_keypair() if needs_s(False) else None
    init_rs = resp_s.public if resp_s and any(not b and "s" in ts for b, ts in pre) else None
    resp_rs = init_s.public if init_s and any(b and "s" in ts for b, ts in pre) else None
    return (
        HandshakeState(pattern, True, prologue=prologue, s=init_s, rs=init_rs),
        HandshakeState(pattern, False, prologue=prologue, s=resp_s, rs=resp_rs),
    )


Tamper = Callable[[int, bytes], bytes]


def _run(init: HandshakeState, resp: HandshakeState, tamper: Tamper | None = None) -> None:
    """Handshake, then one transport message each way; ``tamper(index, msg)`` edits the wire."""
    i = 0
    while not init.complete or not resp.complete:
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        message = writer.write_message(b"payload %d" % i)
        if tamper is not None:
            message = tamper(i, message)
        reader.read_message(message)
        i += 1
    init_send, init_recv = init.split()
    resp_send, resp_recv = resp.split()
    assert resp_recv.decrypt(init_send.encrypt(b"ping")) == b"ping"
    if not isinstance(resp_send, noise._UnusedCipherState):  # one-way patterns send I->R only
        assert init_recv.decrypt(resp_send.encrypt(b"pong")) == b"pong"
    assert init.handshake_hash == resp.handshake_hash


def _message_sizes(pattern: str) -> list[int]:
    sizes: list[int] = []

    def record(i: int, m: bytes) -> bytes:
        sizes.append(len(m))
        return m

    _run(*_pair(pattern), tamper=record)
    return sizes


def _flip(index: int, pos: int, bit: int) -> Tamper:
    def tamper(i: int, m: bytes) -> bytes:
        if i != index:
            return m
        out = bytearray(m)
        out[pos] ^= 1 << bit
        return bytes(out)

    return tamper


TESTED_PATTERNS = ["XX", "NN", "X", "IK", "XK", "KK", "N", "K"]


# --- 2. interop --------------------------------------------------------------------------------


def _theirs(initiator: bool, static: KeyPair, prologue: bytes) -> NoiseConnection:
    conn = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_BLAKE2b")
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static.private)
    conn.start_handshake()
    return conn


@pytest.mark.parametrize("ours_initiates", [True, False], ids=["ours-initiator", "ours-responder"])
def test_interop_with_noiseprotocol(ours_initiates: bool) -> None:
    prologue = b"pigeon/1"
    our_static, their_static = generate_keypair(), generate_keypair()
    ours = HandshakeState("XX", ours_initiates, prologue=prologue, s=our_static)
    theirs = _theirs(not ours_initiates, their_static, prologue)
    for i in range(3):
        payload = b"handshake payload %d" % i * (i + 1)
        if (i % 2 == 0) == ours_initiates:
            assert bytes(theirs.read_message(ours.write_message(payload))) == payload
        else:
            assert ours.read_message(bytes(theirs.write_message(payload))) == payload
    assert ours.complete and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.remote_static == their_static.public
    send, recv = ours.split()
    for n in range(100):
        out = b"to them %d " % n + bytes(n * 7)
        assert theirs.decrypt(send.encrypt(out)) == out
        back = b"to us %d " % n + bytes(n * 5)
        assert recv.decrypt(theirs.encrypt(back)) == back
    assert send.nonce == recv.nonce == 100


# --- 3. bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", TESTED_PATTERNS)
def test_every_flipped_byte_in_handshake_is_caught(pattern: str) -> None:
    for index, size in enumerate(_message_sizes(pattern)):
        for pos in range(size):
            with pytest.raises(NoiseError):
                _run(*_pair(pattern), tamper=_flip(index, pos, pos % 8))


@pytest.mark.parametrize("pattern", TESTED_PATTERNS)
def test_truncated_or_extended_handshake_is_caught(pattern: str) -> None:
    for index, size in enumerate(_message_sizes(pattern)):
        for cut in [*range(size), size + 1]:

            def tamper(i: int, m: bytes, index: int = index, cut: int = cut) -> bytes:
                return (m[:cut] if cut < len(m) else m + b"\x00") if i == index else m

            with pytest.raises(NoiseError):
                _run(*_pair(pattern), tamper=tamper)


def test_oversized_handshake_message() -> None:
    _, resp = _pair("NN")
    with pytest.raises(NoiseError):
        resp.read_message(bytes(MAX_MESSAGE_LEN + 1))
    init, _ = _pair("NN")
    with pytest.raises(LocalProtocolError):
        init.write_message(bytes(MAX_MESSAGE_LEN))


def test_low_order_point_list() -> None:
    assert len(LOW_ORDER_POINTS) == 14  # libsodium's 7, each also with bit 255 set
    assert bytes(32) in LOW_ORDER_POINTS
    assert bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800") in (
        LOW_ORDER_POINTS
    )


@pytest.mark.parametrize(
    "point", sorted(LOW_ORDER_POINTS), ids=lambda p: p.hex()[:8] + p.hex()[-4:]
)
def test_low_order_keys_rejected(point: bytes) -> None:
    def low_order(reason: str) -> bool:
        return "low-order" in reason

    # Ephemeral, responder side (XX message 1) and initiator side (NN message 2).
    _, resp = _pair("XX")
    with pytest.raises(NoiseError) as info:
        resp.read_message(point)
    assert low_order(info.value.reason)
    init, _ = _pair("NN")
    init.write_message()
    with pytest.raises(NoiseError) as info:
        init.read_message(point + bytes(16))
    assert low_order(info.value.reason)

    # Static, sent encrypted (XX message 3 and X message 1) by a peer claiming it.
    fake = KeyPair(private=generate_keypair().private, public=point)
    init = HandshakeState("XX", True, s=fake)
    resp = HandshakeState("XX", False, s=generate_keypair())
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    with pytest.raises(NoiseError) as info:
        resp.read_message(init.write_message())
    assert low_order(info.value.reason)
    resp_s = generate_keypair()
    init = HandshakeState("X", True, s=fake, rs=resp_s.public)
    with pytest.raises(NoiseError) as info:
        HandshakeState("X", False, s=resp_s).read_message(init.write_message())
    assert low_order(info.value.reason)

    # A known static key (pre-message) and the DH itself.
    with pytest.raises(NoiseError):
        HandshakeState("X", True, s=generate_keypair(), rs=point)
    with pytest.raises(NoiseError):
        noise._dh(generate_keypair(), point)


def _transport(pattern: str = "XX") -> tuple[CipherState, CipherState, CipherState, CipherState]:
    init, resp = _pair(pattern)
    i = 0
    while not init.complete:
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        reader.read_message(writer.write_message())
        i += 1
    return (*init.split(), *resp.split())


def test_transport_replay_and_reorder_rejected() -> None:
    init_send, _, _, resp_recv = _transport()
    m0, m1, m2 = (init_send.encrypt(b"m%d" % n) for n in range(3))
    assert resp_recv.decrypt(m0) == b"m0"
    with pytest.raises(NoiseError):
        resp_recv.decrypt(m0)  # replay
    with pytest.raises(NoiseError):
        resp_recv.decrypt(m2)  # reordered: m1 still missing
    assert resp_recv.nonce == 1  # failures do not move the nonce
    assert resp_recv.decrypt(m1) == b"m1"
    assert resp_recv.decrypt(m2) == b"m2"


def test_transport_tampering_rejected() -> None:
    init_send, _, _, resp_recv = _transport()
    message = init_send.encrypt(b"hello", ad=b"hdr")
    for bad in (
        message[:-1],
        message[:15],
        b"",
        message + b"\x00",
        bytes([message[0] ^ 1]) + message[1:],
        bytes(MAX_MESSAGE_LEN + 1),
    ):
        with pytest.raises(NoiseError):
            resp_recv.decrypt(bad, ad=b"hdr")
    with pytest.raises(NoiseError):
        resp_recv.decrypt(message, ad=b"other")
    assert resp_recv.decrypt(message, ad=b"hdr") == b"hello"


READ_STAGES = [(p, stage) for p in TESTED_PATTERNS for stage in range(len(PATTERNS[p][1]))]


def _reader_at(pattern: str, stage: int) -> HandshakeState:
    """A handshake side whose next step is to read message ``stage``."""
    init, resp = _pair(pattern)
    for i in range(stage):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        reader.read_message(writer.write_message(b"x"))
    return resp if stage % 2 == 0 else init


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(READ_STAGES), st.binary(max_size=300))
def test_random_bytes_only_raise_noise_error(where: tuple[str, int], data: bytes) -> None:
    reader = _reader_at(*where)
    with contextlib.suppress(NoiseError):  # anything else escapes and fails the test
        reader.read_message(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TESTED_PATTERNS), st.data())
def test_any_edit_of_a_handshake_message_is_caught(pattern: str, data: st.DataObject) -> None:
    sizes = _message_sizes(pattern)
    index = data.draw(st.integers(0, len(sizes) - 1))
    pos = data.draw(st.integers(0, sizes[index] - 1))
    xor = data.draw(st.integers(1, 255))

    def tamper(i: int, m: bytes) -> bytes:
        return m[:pos] + bytes([m[pos] ^ xor]) + m[pos + 1 :] if i == index else m

    with pytest.raises(NoiseError):
        _run(*_pair(pattern), tamper=tamper)


# --- 4. misuse ---------------------------------------------------------------------------------


def test_out_of_turn_and_after_completion() -> None:
    init, resp = _pair("XX")
    with pytest.raises(LocalProtocolError):
        resp.write_message()
    with pytest.raises(LocalProtocolError):
        init.read_message(bytes(32))
    with pytest.raises(LocalProtocolError):
        init.split()
    with pytest.raises(LocalProtocolError):
        _ = init.handshake_hash
    resp.read_message(init.write_message())
    with pytest.raises(LocalProtocolError):
        init.write_message()
    init.read_message(resp.write_message())
    resp.read_message(init.write_message())
    assert init.complete and resp.complete
    for side in (init, resp):
        with pytest.raises(LocalProtocolError):
            side.write_message()
        with pytest.raises(LocalProtocolError):
            side.read_message(bytes(64))
    init.split()
    with pytest.raises(LocalProtocolError):
        init.split()  # a second split would reuse nonces


def test_failed_handshake_cannot_continue() -> None:
    init, resp = _pair("NN")
    init.write_message()
    with pytest.raises(NoiseError):
        init.read_message(b"short")
    with pytest.raises(LocalProtocolError):
        init.read_message(resp.write_message())


def test_wrong_keys_for_pattern() -> None:
    s = generate_keypair()
    for kwargs in (
        {},  # XX needs s
        {"s": s, "rs": s.public},  # XX cannot pre-know rs
    ):
        with pytest.raises(LocalProtocolError):
            HandshakeState("XX", True, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        HandshakeState("X", True, s=s)  # X needs rs
    with pytest.raises(LocalProtocolError):
        HandshakeState("NN", True, s=s)
    with pytest.raises(LocalProtocolError):
        HandshakeState("XXpsk3", True, s=s)
    with pytest.raises(LocalProtocolError):
        HandshakeState("X", True, s=s, rs=bytes(31))
    with pytest.raises(LocalProtocolError):
        keypair_from_private(bytes(31))


def test_one_way_pattern_responder_cannot_send() -> None:
    init_send, init_recv, resp_send, resp_recv = _transport("X")
    assert resp_recv.decrypt(init_send.encrypt(b"hi")) == b"hi"
    with pytest.raises(LocalProtocolError):
        resp_send.encrypt(b"back")
    with pytest.raises(LocalProtocolError):
        init_recv.decrypt(b"x" * 20)


def test_nonce_exhaustion_and_size_limit() -> None:
    key = bytes(range(32))
    sender = CipherState(key, nonce=2**64 - 2)
    receiver = CipherState(key, nonce=2**64 - 2)
    assert receiver.decrypt(sender.encrypt(b"last")) == b"last"
    with pytest.raises(LocalProtocolError):
        sender.encrypt(b"one too many")
    with pytest.raises(NoiseError):
        receiver.decrypt(bytes(32))
    fresh = CipherState(key)
    assert len(fresh.encrypt(bytes(MAX_MESSAGE_LEN - 16))) == MAX_MESSAGE_LEN
    with pytest.raises(LocalProtocolError):
        fresh.encrypt(bytes(MAX_MESSAGE_LEN - 15))


def test_rng_is_the_only_source_of_randomness() -> None:
    def fixed_rng(n: int) -> bytes:
        return b"\x42" * n

    s = keypair_from_private(bytes(range(32)))
    a = HandshakeState("XX", True, s=s, rng=fixed_rng).write_message(b"hi")
    b = HandshakeState("XX", True, s=s, rng=fixed_rng).write_message(b"hi")
    assert a == b and a[:32] == generate_keypair(fixed_rng).public
    assert "private" not in repr(s) and s.private.hex() not in repr(s)
