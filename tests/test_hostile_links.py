"""A node under attack over real TCP on loopback: every kind of bad input closes only the
offending link with a logged reason, the node keeps serving an honest peer, and nothing
already stored is lost."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from mesh import wire
from mesh.identity import Identity, encode_contact
from mesh.node import Node, NodeConfig
from mesh.noise import HandshakeState, generate_keypair
from mesh.session import PROLOGUE
from mesh.store import Store


def make_node(tmp_path: Path, name: str, **config: object) -> Node:
    return Node(Identity.generate(name), Store.open(tmp_path / name / "s.sqlite"),
                NodeConfig(**config))  # type: ignore[arg-type]


async def listening_target(tmp_path: Path, **config: object) -> tuple[Node, int]:
    """A started node listening on a free loopback port: what every attack here aims at."""
    target = make_node(tmp_path, "target", listen=[("127.0.0.1", 0)], **config)
    await target.start()
    return target, int(target.listening[0].rsplit(":", 1)[1])


async def wait_until(pred: object, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def record(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


async def handshaken_attacker(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, object]:
    """A peer that does the real Noise handshake, then misbehaves inside the encryption."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    preamble = wire.MAGIC + bytes([wire.PROTOCOL_VERSION])
    hs = HandshakeState("XX", True, prologue=PROLOGUE + preamble, s=generate_keypair())
    writer.write(record(preamble + hs.write_message(b"")))
    length = int.from_bytes(await reader.readexactly(2), "big")
    hs.read_message(await reader.readexactly(length))
    hello = wire.encode_frame(wire.Hello(version=wire.PROTOCOL_VERSION, max_frame=wire.MAX_FRAME, features=0))
    writer.write(record(hs.write_message(hello)))
    await writer.drain()
    send_cs, _ = hs.split()
    return reader, writer, send_cs


def encrypted(cs: object, frame_bytes: bytes) -> bytes:
    return record(cs.encrypt(wire.pad_plaintext(frame_bytes)))  # type: ignore[attr-defined]


ATTACKS_RAW = {
    "random bytes": os.urandom(300),
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "zero length record": b"\x00\x00",
    "old version": record(wire.MAGIC + b"\x00" + bytes(32)),
    "low-order ephemeral": record(wire.MAGIC + bytes([wire.PROTOCOL_VERSION]) + bytes(32)),
    "truncated handshake": record(wire.MAGIC + bytes([wire.PROTOCOL_VERSION]) + b"\x09" * 10),
}

ATTACKS_ENCRYPTED = {
    "undecodable frame": b"\xc1\xc1",
    "oversized bin claim": b"\x92\x04\xc6\xff\xff\xff\xff",
    "deep nesting": b"\x91" * 5000,
    "wrong field types": wire.encode_frame(wire.Ping(nonce=1))[:-1] + b"\xa1x",
    "items before reconcile": wire.encode_frame(wire.Items(items=((1, b"\x01" * 50),))),
    "hello again": wire.encode_frame(wire.Hello(version=1, max_frame=1000, features=0)),
}


@pytest.mark.parametrize("name", sorted(ATTACKS_RAW) + sorted(ATTACKS_ENCRYPTED))
async def test_attack_closes_only_its_link_and_honest_sync_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str) -> None:
    caplog.set_level(logging.INFO, logger="pigeon")
    target, port = await listening_target(tmp_path)
    honest = make_node(tmp_path, "honest", peers=[("127.0.0.1", port)])
    far = make_node(tmp_path, "far")
    honest.add_contact("far", encode_contact(far.identity.public, "far"))
    honest.send("far", "before the attack")
    await honest.start()
    await wait_until(lambda: target.store.stats().envelopes == 1)
    before = target.store.sync_keys()

    if name in ATTACKS_RAW:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ATTACKS_RAW[name])
    else:
        reader, writer, cs = await handshaken_attacker(port)
        writer.write(encrypted(cs, ATTACKS_ENCRYPTED[name]))
    await writer.drain()
    # The target closes the attacker's link: reading reaches EOF (after an optional Close frame).
    async def drained() -> None:
        while await reader.read(65536):
            pass
    await asyncio.wait_for(drained(), timeout=15)
    writer.close()

    honest.send("far", "after the attack")
    await wait_until(lambda: target.store.stats().envelopes == 2)
    assert set(before) <= set(target.store.sync_keys())
    disconnects = [r.getMessage() for r in caplog.records if "peer disconnected" in r.getMessage()]
    assert disconnects, "no logged reason for closing the attacker's link"
    assert len(target.peers()) == 1  # the honest peer is still linked
    await honest.stop()
    await target.stop()
    await far.stop()


async def test_half_open_connections_are_timed_out(tmp_path: Path) -> None:
    from mesh.session import SessionConfig
    target, port = await listening_target(
        tmp_path, session=SessionConfig(handshake_timeout=0.5))
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    await wait_until(lambda: len(target._runners) == 5)
    await wait_until(lambda: len(target._runners) == 0, timeout=10)
    for _, writer in conns:
        writer.close()
    await target.stop()


async def test_link_cap_refuses_extra_connections(tmp_path: Path) -> None:
    target, port = await listening_target(tmp_path, max_links=3)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
    await asyncio.sleep(0.3)
    assert len(target._runners) == 3
    for _, writer in conns:
        writer.close()
    await target.stop()


async def test_handshake_cap_refuses_the_ninth_half_open_link(tmp_path: Path) -> None:
    """Half-open handshakes are capped separately from established links."""
    target, port = await listening_target(tmp_path, max_handshakes=8)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
    await asyncio.sleep(0.3)
    assert len(target._runners) == 8
    for _, writer in conns:
        writer.close()
    await target.stop()


async def test_frame_larger_than_announced_limit_closes_the_link(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mesh.session import SessionConfig
    caplog.set_level(logging.INFO, logger="pigeon")
    target, port = await listening_target(tmp_path, session=SessionConfig(max_frame=20_000))
    reader, writer, cs = await handshaken_attacker(port)
    oversized = wire.encode_frame(wire.Items(items=((1, bytes(30_000)),)))
    assert len(oversized) > 20_000
    writer.write(encrypted(cs, oversized))
    await writer.drain()

    async def drained() -> None:
        while await reader.read(65536):
            pass
    await asyncio.wait_for(drained(), timeout=15)
    writer.close()
    await target.stop()
    assert any("larger than the limit we announced" in r.getMessage() for r in caplog.records)
