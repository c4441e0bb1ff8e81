"""Issue 7 (d): hostile GATT peers over real bumble connections.

An honest node H serves ``BlePeripheralServer``; an honest central C (``BleCentral``, real
bleak code) is linked to it and stays linked. Then a hostile raw bumble central X (bumble's
own ``Peer``/GATT client, no Pigeon code on its side unless a case needs a real
handshake) connects to the same H and misbehaves. For every attack: H closes X's link
with a logged reason and drops the connection, the buffers an attacker can fill stay
under their documented caps the whole time, and C keeps syncing (a message sent as the
attack starts is delivered). The last test turns it round: a hostile *peripheral* floods
an honest central's notifications while that central keeps syncing with H.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from bumble.core import UUID
from bumble.device import Connection, Device, Peer
from bumble.gatt import Characteristic, CharacteristicValue, Service

from mesh.node import Node
from mesh.transports.ble import (
    RX_UUID,
    SERVICE_UUID,
    TX_UUID,
    BleCentral,
    BleLink,
    BlePeripheralServer,
)
from mesh.transports.ble_framing import (
    CREDIT,
    DATA,
    DEFAULT_WINDOW,
    HEADER,
    MAX_FRAGMENT,
    OPEN,
    OPEN_SIZE,
    decode_header,
    decode_open,
    encode_fragment,
    encode_open,
    pick_link_id,
)
from mesh.wire import MAX_NOISE_MESSAGE, StreamFramer
from tests.ble_support import BumblePeripheral, BumbleWorld, advertising_data, bleak_backends
from tests.test_node import Clock, befriend, inbox_texts, make_node, wait_until

pytestmark = pytest.mark.timeout(90)

#: Most stream bytes one BLE link may hold for its reader: ``window`` undrained fragments.
IN_CAP = DEFAULT_WINDOW * (MAX_FRAGMENT - HEADER)
#: Most bytes a session's record reassembly may hold (``wire.StreamFramer``).
RECORD_CAP = 2 + MAX_NOISE_MESSAGE
FLOOD = 3000
STALL_S = 1.5


#: Fragments are crafted with the framing module's own layout helpers.
fragment = encode_fragment


def parse_open(value: bytes, my_id: int) -> tuple[int, int] | None:
    """(peer link id, window) if ``value`` is an OPEN addressed to ``my_id``."""
    if len(value) != OPEN_SIZE:
        return None
    dst, kind, _seq = decode_header(value)
    if dst != my_id or kind != OPEN:
        return None
    return decode_open(value[HEADER:])


class Parking:
    """H's node as its BLE server sees it, except that links whose address starts with
    ``park`` are accepted and never read: a receiver too busy to drain, which is exactly
    when credit must hold a flood back."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.park: str | None = None
        self.parked: list[BleLink] = []

    def add_link(self, link: BleLink, *, initiator: bool) -> asyncio.Task[Any] | None:
        if self.park is not None and link.address.startswith(self.park):
            self.parked.append(link)
            return None
        return self.node.add_link(link, initiator=initiator)


class WatchedServer(BlePeripheralServer):
    """``BlePeripheralServer`` that records, after every write, the most bytes any of its
    links and sessions held for a reader: the memory an attacker can make it keep."""

    def __init__(self, node: Node, peripheral: BumblePeripheral, **kw: Any) -> None:
        self.parking = Parking(node)
        super().__init__(self.parking, peripheral, **kw)  # type: ignore[arg-type]
        self.real = node
        self.max_in = 0
        self.max_undrained = 0
        self.max_session_buffer = 0
        self.every_link: list[BleLink] = []

    def on_write(self, peer: str, value: bytes) -> None:
        super().on_write(peer, value)
        link = self.links.get(peer)
        if link is not None:
            if link not in self.every_link:
                self.every_link.append(link)
            framing = link.framing
            self.max_in = max(self.max_in, len(framing._in))
            self.max_undrained = max(self.max_undrained, framing._undrained)
        self.max_session_buffer = max(self.max_session_buffer, max(
            (len(r.session._framer._buf) for r in self.real._runners), default=0))


@dataclass
class Scene:
    world: BumbleWorld
    h: Node
    c: Node
    server: WatchedServer
    central: BleCentral
    run_task: asyncio.Task[None]
    h_device: Device
    c_range: set[str]
    extra: list[Callable[[], Any]] = field(default_factory=list)

    def c_link(self) -> BleLink:
        links = [link for link in self.central.links.values() if not link.closed]
        assert len(links) >= 1, "the honest central lost its link"
        return links[0]

    def max_session_buffer(self) -> int:
        return max((len(r.session._framer._buf) for r in self.h._runners), default=0)


def bare(address: object) -> str:
    return str(address).split("/")[0]


async def make_scene(tmp_path: Path, clock: Clock) -> Scene:
    """H and C linked and synced; C's scanner hears only addresses in ``Scene.c_range``."""
    world = BumbleWorld()
    dev_h, dev_c = await world.device("h"), await world.device("c")
    c_range = {bare(dev_h.random_address)}
    h, c = make_node(tmp_path, "hana", clock), make_node(tmp_path, "carl", clock)
    befriend(h, c)
    server = WatchedServer(h, BumblePeripheral(dev_h), open_timeout=3.0, stall_timeout=STALL_S)
    await server.start()
    scanner, client = bleak_backends(dev_c, mtu=517,
                                     visible=lambda address: bare(address) in c_range)
    central = BleCentral(c, scanner_backend=scanner, client_backend=client, scan_timeout=1.0,
                         connect_timeout=5.0, backoff_initial_s=0.05, backoff_max_s=0.3)
    run_task = asyncio.ensure_future(central.run())
    scene = Scene(world, h, c, server, central, run_task, dev_h, c_range)
    h.send("carl", "before the attack")
    await wait_until(lambda: inbox_texts(c) == ["before the attack"], timeout=20)
    return scene


async def teardown(s: Scene) -> None:
    """Every step bounded: a stuck software controller must fail the test, not hang it."""
    await asyncio.wait_for(s.central.stop(), 10)
    done, _ = await asyncio.wait([s.run_task], timeout=10)
    if not done:
        s.run_task.cancel()
    await asyncio.wait_for(asyncio.gather(s.run_task, return_exceptions=True), 10)
    for step in s.extra:
        await asyncio.wait_for(step(), 10)
    await asyncio.wait_for(s.server.stop(), 10)
    await asyncio.wait_for(s.h.stop(), 10)
    await asyncio.wait_for(s.c.stop(), 10)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def scenes() -> AsyncIterator[list[Scene]]:
    made: list[Scene] = []
    yield made
    for s in made:
        await teardown(s)


class HostileCentral:
    """A raw bumble central on Pigeon's GATT layout, speaking the framing by hand."""

    def __init__(self, device: Device, connection: Connection, peer: Peer, rx: Any) -> None:
        self.device, self.connection, self.peer, self.rx = device, connection, peer, rx
        self.notifications: list[bytes] = []
        self.my_id = pick_link_id(os.urandom)
        self.peer_id = 0
        self.seq = 0
        self.disconnected = asyncio.Event()
        connection.on(connection.EVENT_DISCONNECTION, lambda *_: self.disconnected.set())

    @classmethod
    async def connect(cls, world: BumbleWorld, target: Device, mtu: int = 517,
                      ) -> HostileCentral:
        device = await world.device("mallory")
        connection = await asyncio.wait_for(device.connect(target.random_address), 10)
        peer = Peer(connection)
        await peer.request_mtu(mtu)
        (service,) = await peer.discover_services([UUID(SERVICE_UUID)])
        chars = {str(ch.uuid).lower(): ch
                 for ch in await peer.discover_characteristics(service=service)}
        hostile = cls(device, connection, peer, chars[RX_UUID])
        await peer.subscribe(chars[TX_UUID], lambda v: hostile.notifications.append(bytes(v)))
        return hostile

    async def hang_up(self) -> None:
        if not self.disconnected.is_set():
            with contextlib.suppress(Exception):
                await self.connection.disconnect()

    @property
    def max_value(self) -> int:
        return int(self.connection.att_mtu) - 3

    async def write(self, value: bytes) -> None:
        await self.peer.write_value(self.rx, value, with_response=False)

    async def send(self, kind: int, body: bytes, dst: int | None = None) -> None:
        await self.write(fragment(self.peer_id if dst is None else dst, kind, self.seq, body))
        self.seq += 1

    async def open(self, window: int = DEFAULT_WINDOW) -> None:
        """A well-formed OPEN, then wait for the peripheral's answer."""
        await self.send(OPEN, encode_open(self.my_id, window), dst=0)

        def answered() -> bool:
            for value in self.notifications:
                got = parse_open(value, self.my_id)
                if got is not None:
                    self.peer_id = got[0]
                    return True
            return False

        await wait_until(answered, timeout=10)


def hostile_links(s: Scene, hostile: HostileCentral) -> list[BleLink]:
    prefix = bare(hostile.connection.self_address)
    return [link for link in s.server.every_link if link.address.startswith(prefix)]


def logged(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    """Pigeon's log lines that contain every needle."""
    return [rec.getMessage() for rec in caplog.records if rec.name.startswith("pigeon")
            and all(n in rec.getMessage() for n in needles)]


async def assert_contained(s: Scene, hostile: HostileCentral, caplog: pytest.LogCaptureFixture,
                           reasons: tuple[str, ...], during: str) -> str:
    """H closed X's link for one of ``reasons`` (the framing's own, or the session's as
    logged by the node), logged it, dropped the connection; the buffers stayed bounded;
    C, linked to H the whole time, got ``during``. Returns the logged reason."""
    await wait_until(lambda: bool(hostile_links(s, hostile)), timeout=10)
    first = hostile_links(s, hostile)[0]
    await wait_until(lambda: first.closed, timeout=20)
    await asyncio.wait_for(hostile.disconnected.wait(), 15)  # H dropped the connection
    address = first.address

    def reason_line() -> list[str]:
        return [line for line in logged(caplog, address) if any(r in line for r in reasons)]

    await wait_until(lambda: bool(reason_line()), timeout=10)
    assert s.server.max_in <= IN_CAP
    assert s.server.max_undrained <= DEFAULT_WINDOW
    await wait_until(lambda: during in inbox_texts(s.c), timeout=30)
    assert inbox_texts(s.c).count(during) == 1
    assert not s.c_link().closed
    still_open = [(link.address, link.fragments_received)
                  for link in hostile_links(s, hostile) if not link.closed]
    assert still_open == [], f"links to the hostile peer left open: {still_open}"
    return reason_line()[0]


async def start_attack(s: Scene, tmp: str) -> tuple[HostileCentral, str]:
    hostile = await HostileCentral.connect(s.world, s.h_device)
    s.extra.append(hostile.hang_up)
    during = f"during {tmp}"
    s.h.send("carl", during)
    return hostile, during


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="pigeon")
    return caplog


@pytest.mark.parametrize("attack", ["value-over-512", "open-padded", "window-claim",
                                    "credit-claim"])
async def test_oversized_values_and_claims_close_the_link(
        tmp_path: Path, clock: Clock, scenes: list[Scene], caplog_info: pytest.LogCaptureFixture,
        attack: str) -> None:
    s = await make_scene(tmp_path, clock)
    scenes.append(s)
    hostile, during = await start_attack(s, attack)
    assert hostile.max_value == 514  # ATT MTU 517
    if attack == "open-padded":  # an OPEN as long as the ATT server lets through
        padding = os.urandom(MAX_FRAGMENT - OPEN_SIZE)
        await hostile.send(OPEN, encode_open(hostile.my_id, 8) + padding, dst=0)
        expected: tuple[str, ...] = ("malformed OPEN",)
    elif attack == "window-claim":
        await hostile.send(OPEN, encode_open(hostile.my_id, 65535), dst=0)
        expected = ("invalid link id or window",)
    elif attack == "credit-claim":
        await hostile.open()
        await hostile.send(CREDIT, struct.pack(">H", 65535))
        expected = ("credit beyond the announced window",)
    else:
        await hostile.open()
        # 514 bytes is what the MTU allows; bumble's ATT server drops write commands over
        # 512 (one attribute value), so the framing never sees it and its seq is reused.
        await hostile.write(fragment(hostile.peer_id, DATA, hostile.seq,
                                     os.urandom(hostile.max_value - HEADER)))
        # The largest value that does arrive, claiming a 65535-byte record.
        await hostile.send(DATA, b"\xff\xff" + os.urandom(MAX_FRAGMENT - HEADER - 2))
        expected = ("record length out of range",)
    await assert_contained(s, hostile, caplog_info, expected, during)
    if attack == "value-over-512":
        assert hostile_links(s, hostile)[0].fragments_received == 2  # OPEN + the 512


async def test_fragment_flood_beyond_the_credit_window_of_a_busy_reader(
        tmp_path: Path, clock: Clock, scenes: list[Scene],
        caplog_info: pytest.LogCaptureFixture) -> None:
    """H's reader for X is too busy to drain (its link is parked, never read), so H
    returns no credit; X ignores that and streams thousands of full fragments. The link
    must close at the first fragment beyond the window, with at most a window buffered."""
    s = await make_scene(tmp_path, clock)
    scenes.append(s)
    hostile, during = await start_attack(s, "flood")
    s.server.parking.park = bare(hostile.connection.self_address)
    await hostile.open()
    body = os.urandom(MAX_FRAGMENT - HEADER)  # the most bumble's ATT server delivers
    for _ in range(FLOOD):
        await hostile.send(DATA, body)
    await assert_contained(s, hostile, caplog_info, ("data beyond granted credit",), during)
    parked = s.server.parking.parked[0]
    assert parked.fragments_received == 1 + DEFAULT_WINDOW + 1  # OPEN, the window, one more
    assert s.server.max_in == DEFAULT_WINDOW * (MAX_FRAGMENT - HEADER) <= IN_CAP
    assert s.server.max_undrained == DEFAULT_WINDOW
    print(f"busy reader: flood of {FLOOD} x {MAX_FRAGMENT} bytes closed after "
          f"{parked.fragments_received} fragments, {s.server.max_in} bytes buffered at most")


async def test_fragment_flood_ignoring_credit_after_a_handshake(
        tmp_path: Path, clock: Clock, scenes: list[Scene],
        caplog_info: pytest.LogCaptureFixture) -> None:
    """After a real handshake (so the session takes records up to 64 KiB), X stops
    honouring credit and streams thousands of full fragments: a record that claims 65535
    bytes, then more. H drains as fast as it receives (bumble's own ACL flow control keeps
    it ahead, so credit never runs out here); the session's record bound stops it."""
    s = await make_scene(tmp_path, clock)
    scenes.append(s)
    hostile, during = await start_attack(s, "flood")
    link = await handshake_as_mallory(s, hostile, tmp_path, clock)
    h_side = hostile_links(s, hostile)[0]
    framing = link.framing
    framing._credits = framing._peer_window = 10 ** 6  # ignore every credit H grants
    room = framing.chunk - HEADER
    flood = asyncio.ensure_future(
        link.write(struct.pack(">H", 65535) + os.urandom(FLOOD * room - 2)))
    s.extra.append(lambda: asyncio.gather(flood, return_exceptions=True))
    reason = await assert_contained(
        s, hostile, caplog_info, ("data beyond granted credit", "authentication failed"), during)
    assert 60_000 < s.server.max_session_buffer <= RECORD_CAP  # the record bound was reached
    accepted = h_side.fragments_received
    assert accepted < FLOOD / 4, f"H took {accepted} fragments before stopping the flood"
    print(f"flood after handshake: {link.fragments_sent} fragments of {framing.chunk} bytes "
          f"sent, H took {accepted}; {reason}; most buffered {s.server.max_in} bytes "
          f"(cap {IN_CAP}), {s.server.max_undrained} fragments (cap {DEFAULT_WINDOW}), "
          f"session record buffer {s.server.max_session_buffer} (cap {RECORD_CAP})")


async def test_record_never_completed_times_out(
        tmp_path: Path, clock: Clock, scenes: list[Scene],
        caplog_info: pytest.LogCaptureFixture) -> None:
    s = await make_scene(tmp_path, clock)
    scenes.append(s)
    hostile, during = await start_attack(s, "withheld")
    await hostile.open()
    await hostile.send(DATA, struct.pack(">H", 400) + os.urandom(100))  # 300 bytes never come
    started = asyncio.get_running_loop().time()
    await assert_contained(s, hostile, caplog_info, ("record left unfinished",), during)
    assert asyncio.get_running_loop().time() - started >= STALL_S * 0.9


async def test_garbage_after_a_completed_handshake(
        tmp_path: Path, clock: Clock, scenes: list[Scene],
        caplog_info: pytest.LogCaptureFixture) -> None:
    """X runs the honest framing and a real node for the Noise handshake, then writes a
    well-framed record of random bytes straight onto the link."""
    s = await make_scene(tmp_path, clock)
    scenes.append(s)
    hostile, during = await start_attack(s, "garbage")
    link = await handshake_as_mallory(s, hostile, tmp_path, clock)
    await link.write(StreamFramer.encode(os.urandom(300)))
    line = await assert_contained(s, hostile, caplog_info, ("peer disconnected",), during)
    assert "link lost" not in line and "closed locally" not in line, line
    print(f"H: {line}")


async def handshake_as_mallory(s: Scene, hostile: HostileCentral, tmp_path: Path,
                               clock: Clock) -> BleLink:
    """Run the honest framing and a real node on X until the Noise handshake with H is
    done; the returned link is X's, free to misbehave from then on."""
    mallory = make_node(tmp_path, "mallory", clock)
    s.extra.append(mallory.stop)
    link = BleLink("h", initiator=True, chunk_size=lambda: hostile.max_value,
                   send_fragment=hostile.write)
    hostile.notifications = _Feed(link)
    link.start()
    mallory.add_link(link, initiator=True)
    await wait_until(lambda: any(p.state != "handshake" for p in mallory.peers()), timeout=20)
    assert not hostile_links(s, hostile)[0].closed
    return link


class _Feed(list[bytes]):
    """Notifications go straight into a ``BleLink`` (HostileCentral appends to a list)."""

    def __init__(self, link: BleLink) -> None:
        super().__init__()
        self.link = link

    def append(self, value: bytes) -> None:
        self.link.feed(value)


# ---- the other direction: a hostile peripheral against an honest central ------------------


class HostilePeripheral:
    """Pigeon's GATT layout on a raw bumble device: answers OPEN, then floods notifications
    (junk for nobody, then DATA far beyond the credit the central granted)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.tx = Characteristic(TX_UUID, Characteristic.Properties.NOTIFY,
                                 Characteristic.READABLE, b"")
        rx = Characteristic(RX_UUID, Characteristic.Properties.WRITE_WITHOUT_RESPONSE,
                            Characteristic.WRITEABLE, CharacteristicValue(write=self._on_write))
        device.add_service(Service(SERVICE_UUID, [rx, self.tx]))
        self.tasks: list[asyncio.Task[None]] = []
        self.flooded = 0
        self.disconnected = asyncio.Event()

    async def start(self) -> None:
        await self.device.start_advertising(advertising_data=advertising_data(),
                                            scan_response_data=b"", auto_restart=False,
                                            advertising_interval_min=20,
                                            advertising_interval_max=20)

    def _on_write(self, connection: Connection, value: bytes) -> None:
        got = parse_open(bytes(value), 0)
        if got is not None and not self.tasks:
            connection.on(connection.EVENT_DISCONNECTION, lambda *_: self.disconnected.set())
            self.tasks.append(asyncio.ensure_future(self._flood(connection, got[0])))

    async def _flood(self, connection: Connection, central_id: int) -> None:
        await asyncio.sleep(0.2)  # let the central subscribe
        my_id = pick_link_id(os.urandom)
        notify = self.device.notify_subscriber
        with contextlib.suppress(Exception):  # the central hung up: that is the point
            await notify(connection, self.tx, fragment(central_id, OPEN, 0,
                                                       encode_open(my_id, 8)))
            for _ in range(200):  # junk for other subscribers: ignored at no cost
                junk = os.urandom(40)
                if decode_header(junk)[0] == central_id:  # 1 in 65,536: not "other"
                    junk = fragment(central_id ^ 1, DATA, 0, junk[HEADER:])
                await notify(connection, self.tx, junk)
            body = struct.pack(">H", 512) + os.urandom(490)
            for seq in range(1, FLOOD):
                if self.disconnected.is_set():
                    break
                await notify(connection, self.tx, fragment(central_id, DATA, seq, body))
                self.flooded += 1

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_hostile_peripheral_floods_an_honest_central(
        tmp_path: Path, clock: Clock, scenes: list[Scene],
        caplog_info: pytest.LogCaptureFixture) -> None:
    s = await make_scene(tmp_path, clock)
    scenes.append(s)
    h_address = bare(s.h_device.random_address)
    h_link = s.c_link()
    bad = HostilePeripheral(await s.world.device("evil"))
    s.extra.append(bad.stop)
    await bad.start()
    s.c_range.add(bare(bad.device.random_address))  # now in range of C

    seen: dict[str, BleLink] = {}
    max_in = 0

    def bad_link() -> BleLink | None:
        nonlocal max_in
        for address, link in s.central.links.items():
            if not address.startswith(h_address):
                seen.setdefault(address, link)
        for link in seen.values():
            max_in = max(max_in, len(link.framing._in))
        return next(iter(seen.values()), None)

    await wait_until(lambda: bad_link() is not None, timeout=20)
    during = "while a peripheral floods"
    s.h.send("carl", during)
    link = bad_link()
    assert link is not None
    await wait_until(lambda: bad_link() is not None and link.closed, timeout=20)
    await asyncio.wait_for(bad.disconnected.wait(), 15)  # C hung up on it
    reasons = ("data beyond granted credit", "authentication failed")
    await wait_until(lambda: any(r in line for line in logged(caplog_info, link.address)
                                 for r in reasons), timeout=10)
    reason = next(line for line in logged(caplog_info, link.address)
                  if any(r in line for r in reasons))
    assert link.framing.ignored >= 200  # the junk was dropped unread
    assert max_in <= IN_CAP
    await wait_until(lambda: during in inbox_texts(s.c), timeout=30)
    assert s.c_link() is h_link and not h_link.closed
    print(f"hostile peripheral: {bad.flooded} DATA notifications sent, closed for {reason!r}")
