"""BLE as ``pigeon relay`` / ``pigeon chat`` start it: both roles, or what is possible.

Over bumble software controllers (tests/ble_support.py): two nodes that each run the whole
``BleService`` (central and peripheral at once) end with one link for the pair and sync;
no adapter means BLE off, said once; a peripheral the OS refuses leaves a working central;
a scan that keeps failing is logged once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bleak.backends.scanner import BaseBleakScanner
from bleak.exc import BleakError

from mesh.node import Node
from mesh.transports.ble import Peripheral
from mesh.transports.ble_service import BleService, peer_address, start_ble
from tests.ble_support import BumblePeripheral, BumbleWorld, bleak_backends
from tests.test_node import Clock, befriend, inbox_texts, make_node, wait_until

pytestmark = pytest.mark.timeout(90)

FAST = {"scan_timeout": 2.0, "connect_timeout": 5.0, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3}


def test_peer_address_matches_bleak_spelling() -> None:
    assert peer_address("/org/bluez/hci0/dev_AA_BB_CC_DD_EE_0F") == "AA:BB:CC:DD:EE:0F"
    assert peer_address("c1:00:00:00:00:01/P#3") == "C1:00:00:00:00:01"
    assert peer_address("AA:BB:CC:DD:EE:0F") == "AA:BB:CC:DD:EE:0F"


async def _probe_ok() -> tuple[str | None, str]:
    return "test-adapter", ""


async def _probe_absent() -> tuple[str | None, str]:
    return None, "no Bluetooth adapter"


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Node]]:
    clock = Clock()
    made = [make_node(tmp_path, "alice", clock), make_node(tmp_path, "bob", clock)]
    yield made
    for node in made:
        await asyncio.wait_for(node.stop(), 10)


async def test_no_adapter_means_off_said_once(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    node = make_node(tmp_path, "alice", Clock())
    caplog.set_level(logging.INFO, logger="pigeon.ble")
    try:
        service = await start_ble(node, probe=_probe_absent, reprobe_s=0)
        assert service is None
        assert node.status().transports == {"ble": "off: no Bluetooth adapter"}
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "no Bluetooth adapter" in warnings[0].getMessage()
    finally:
        await node.stop()


async def test_an_adapter_that_appears_later_is_taken_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A relay runs for days: BLE off at start (no adapter), on once one is plugged in;
    the probes in between are quiet (the same reason is not logged again)."""
    world = BumbleWorld()
    dev = await world.device("a")
    scanner, client = bleak_backends(dev)
    answers = [(None, "no Bluetooth adapter")] * 3 + [("hci1", "")]
    calls = 0

    async def probe() -> tuple[str | None, str]:
        nonlocal calls
        calls += 1
        return answers[min(calls, len(answers)) - 1]

    node = make_node(tmp_path, "alice", Clock())
    caplog.set_level(logging.INFO, logger="pigeon.ble")
    service = await start_ble(node, probe=probe, reprobe_s=0.05,
                              peripheral_factory=lambda _a: BumblePeripheral(dev),
                              scanner_backend=scanner, client_backend=client, **FAST)
    try:
        assert service is not None and service.central is None
        assert node.status().transports["ble"] == "off: no Bluetooth adapter"
        await wait_until(lambda: service.central is not None, 10)
        assert calls == 4
        assert node.status().transports["ble"] == "on: central and peripheral on hci1"
        offs = [r for r in caplog.records if "Bluetooth LE off" in r.getMessage()]
        assert len(offs) == 1
        assert any("available now" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.wait_for(service.stop() if service else asyncio.sleep(0), 15)
        await node.stop()


async def test_stopping_while_waiting_for_an_adapter_is_prompt(tmp_path: Path) -> None:
    node = make_node(tmp_path, "alice", Clock())
    service = await start_ble(node, probe=_probe_absent, reprobe_s=30)
    try:
        assert service is not None
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(service.stop(), 5)
        assert asyncio.get_running_loop().time() - started < 1
    finally:
        await node.stop()


async def test_probe_that_raises_is_reported_not_fatal(tmp_path: Path) -> None:
    async def broken() -> tuple[str | None, str]:
        raise RuntimeError("D-Bus exploded")

    node = make_node(tmp_path, "alice", Clock())
    try:
        assert await start_ble(node, probe=broken, reprobe_s=0) is None
        assert "D-Bus exploded" in node.status().transports["ble"]
    finally:
        await node.stop()


async def test_refused_peripheral_leaves_a_central(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    world = BumbleWorld()
    dev = await world.device("a")
    scanner, client = bleak_backends(dev)

    def refuse(_adapter: str) -> Peripheral:
        raise OSError("advertising not permitted")

    node = make_node(tmp_path, "alice", Clock())
    caplog.set_level(logging.WARNING, logger="pigeon.ble")
    service = await start_ble(node, probe=_probe_ok, peripheral_factory=refuse,
                              scanner_backend=scanner, client_backend=client, **FAST)
    try:
        assert service is not None and service.server is None and service.central is not None
        status = node.status().transports["ble"]
        assert status.startswith("on: central only") and "advertising not permitted" in status
        await wait_until(lambda: service.central is not None and service.central.scans >= 2, 10)
        assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    finally:
        await asyncio.wait_for(service.stop() if service else asyncio.sleep(0), 15)
        await node.stop()


async def test_failing_scans_are_said_once(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    class NoAdapter(BaseBleakScanner):
        def __init__(self, detection_callback: Any, service_uuids: list[str] | None,
                     scanning_mode: str = "active", **_kw: Any) -> None:
            super().__init__(detection_callback, service_uuids)

        async def start(self) -> None:
            raise BleakError("No Bluetooth adapters found.")

        async def stop(self) -> None:
            return None

        def set_scanning_filter(self, **kwargs: Any) -> None:
            return None

    node = make_node(tmp_path, "alice", Clock())
    caplog.set_level(logging.INFO, logger="pigeon.ble")
    service = await start_ble(node, platform="darwin", scanner_backend=NoAdapter, **FAST)
    try:
        assert service is not None and service.central is not None
        central = service.central
        assert "no peripheral role on darwin" in node.status().transports["ble"]
        await wait_until(lambda: central.scans >= 4, 15)
        assert "scanning fails: No Bluetooth adapters found." in node.status().transports["ble"]
        said = [r for r in caplog.records if "scanning failed" in r.getMessage()]
        assert len(said) == 1
    finally:
        await asyncio.wait_for(service.stop(), 15)
        await node.stop()


async def test_two_nodes_in_both_roles_keep_one_link_and_sync(nodes: list[Node]) -> None:
    """Each node advertises and scans; whoever dials first, the pair ends with one link
    (the other is refused by the peripheral-side check or closed as a duplicate on both
    sides) and messages flow both ways."""
    a, b = nodes
    befriend(a, b)
    world = BumbleWorld()
    lock = asyncio.Lock()  # bumble's central+peripheral connect() quirk: one set-up at a time
    services: list[BleService] = []
    for node, name in ((a, "a"), (b, "b")):
        dev = await world.device(name)
        scanner, client = bleak_backends(dev, connect_lock=lock)
        service = await start_ble(
            node, probe=_probe_ok, peripheral_factory=lambda _a, d=dev: BumblePeripheral(d),
            scanner_backend=scanner, client_backend=client, **FAST)
        assert service is not None and service.server is not None
        services.append(service)
    try:
        assert a.status().transports["ble"] == "on: central and peripheral on test-adapter"

        def one_live_link() -> bool:
            pa, pb = a.peers(), b.peers()
            return (len(pa) == 1 and len(pb) == 1
                    and all(p.state == "live" and p.transport == "ble" for p in pa + pb))

        await wait_until(one_live_link, 30)
        a.send("bob", "over the air")
        b.send("alice", "and back")
        await wait_until(lambda: inbox_texts(b) == ["over the air"]
                         and inbox_texts(a) == ["and back"], 30)
        # Steady state: scanning goes on (BumblePeripheral advertises on while connected,
        # as BlueZ does), yet nobody dials the pair
        # again (a real controller, like bumble's, refuses a second connection between the
        # same two addresses: every redial would be a failed attempt).
        failures = sum(s.central.failures for s in services if s.central is not None)
        connects = [s.central.connects for s in services if s.central is not None]
        assert 1 <= sum(connects) <= 2  # at most one duplicate, closed by the rule
        scans = [s.central.scans for s in services if s.central is not None]
        await wait_until(lambda: all(s.central is not None and s.central.scans > n + 1
                                     for s, n in zip(services, scans, strict=True)), 20)
        assert one_live_link()
        assert [s.central.connects for s in services if s.central is not None] == connects
        assert sum(s.central.failures for s in services if s.central is not None) == failures
        assert sum(s.link_count() for s in services) == 2  # one link, seen from each end
    finally:
        for service in services:
            await asyncio.wait_for(service.stop(), 15)
