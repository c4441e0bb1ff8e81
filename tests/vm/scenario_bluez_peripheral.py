"""VM scenario f2: Pigeon's dbus-fast BlueZ peripheral serves a bumble central (inside the VM).

bob serves ``BlePeripheralServer`` on ``BluezPeripheral``: Pigeon's GATT application and
advertisement registered with bluetoothd over D-Bus, on the adapter ``probe_bluez``
picks (a bumble controller on /dev/vhci). alice is a Pigeon node whose ``BleCentral``
drives a second bumble controller on the same LocalLink (tests/ble_support's test-only
bleak backend). alice must find bob's advertisement by the service UUID, connect, and
the two nodes must sync ``N`` envelopes each way, each exactly once. The advertisement
BlueZ sends is checked for identifying fields (a name, manufacturer or service data),
and with ``PIGEON_BLUEZ_PRIVACY=device`` for a resolvable private address.
"""

from __future__ import annotations

import asyncio
import os
import shutil

from bumble.core import AdvertisingData
from bumble.device import Advertisement

from mesh.transports.ble import SERVICE_UUID, BleCentral, BlePeripheralServer
from mesh.transports.bluez import BluezPeripheral, probe_bluez
from tests.ble_support import BumbleWorld, bleak_backends
from tests.test_node import Clock, befriend, make_node
from tests.vm.guest_support import (
    BLUEZ_SIDE_ADDRESS,
    WORK,
    AirLink,
    N,
    bounded,
    check_exactly_once,
    check_live_push,
    delivered,
    main,
    powered_adapter,
    queue_both_ways,
    say,
    teardown,
    vhci_controller,
    wait_for,
)

#: Set by the VM harness when bluetoothd runs with ``Privacy = device``.
PRIVACY = bool(os.environ.get("PIGEON_BLUEZ_PRIVACY"))

IDENTIFYING = {
    AdvertisingData.COMPLETE_LOCAL_NAME: "complete local name",
    AdvertisingData.SHORTENED_LOCAL_NAME: "shortened local name",
    AdvertisingData.MANUFACTURER_SPECIFIC_DATA: "manufacturer data",
    AdvertisingData.SERVICE_DATA_16_BIT_UUID: "service data",
    AdvertisingData.SERVICE_DATA_128_BIT_UUID: "service data",
    AdvertisingData.APPEARANCE: "appearance",
}


def check_advertisements(seen: list[Advertisement]) -> None:
    """BlueZ advertises the service UUID and nothing identifying; with LE privacy on (the
    PIGEON_BLUEZ_PRIVACY variant) not even the adapter's fixed address."""
    assert seen, "no advertisement with Pigeon's service UUID"
    for adv in seen:
        found = sorted({label for ad_type, label in IDENTIFYING.items()
                        if adv.data.get(ad_type) is not None})
        assert not found, f"BlueZ advertised identifying fields: {found} in {adv.data}"
    addresses = sorted({adv.address.to_string(True) for adv in seen})
    say(f"advertisement ({len(seen)} seen, none identifying) from {addresses}: {seen[0].data}")
    if PRIVACY:
        for adv in seen:
            assert adv.address.is_resolvable, f"{adv.address} is not a resolvable private address"
            assert adv.address.to_string(False) != BLUEZ_SIDE_ADDRESS
    else:
        assert addresses == [BLUEZ_SIDE_ADDRESS + "/P"], addresses


async def scenario() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    world = BumbleWorld()
    world.link = AirLink()
    _controller, transport = await vhci_controller(world.link)
    say("bumble controller attached to /dev/vhci")
    await powered_adapter()
    adapter, reason = await probe_bluez(timeout=10.0)
    say(f"probe_bluez: {adapter} ({reason})")
    assert adapter is not None, reason

    clock = Clock()
    alice, bob = make_node(WORK, "alice", clock), make_node(WORK, "bob", clock)
    befriend(alice, bob)
    queue_both_ways(alice, bob, N)
    peripheral = BluezPeripheral(adapter, call_timeout=20.0)
    server = BlePeripheralServer(bob, peripheral)
    await bounded("BluezPeripheral start", server.start(), 60)
    say("bob serves and advertises Pigeon's service through BlueZ")

    radio = await world.device("alice-radio")
    seen: list[Advertisement] = []

    def on_advertisement(adv: Advertisement) -> None:
        uuids = adv.data.get(AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS)
        if len(seen) < 50 and uuids and SERVICE_UUID in [str(u).lower() for u in uuids]:
            seen.append(adv)

    radio.on(radio.EVENT_ADVERTISEMENT, on_advertisement)
    scanner, client = bleak_backends(radio, mtu=517)
    central = BleCentral(alice, scanner_backend=scanner, client_backend=client,
                         scan_timeout=10.0, connect_timeout=30.0,
                         backoff_initial_s=0.5, backoff_max_s=2.0)
    run_task = asyncio.ensure_future(central.run())
    try:
        await wait_for("bumble central linked to bob", lambda: len(central.links) == 1, 90)
        check_advertisements(seen)
        await wait_for("sessions live on both nodes",
                       lambda: [p.state for p in alice.peers() + bob.peers()] == ["live"] * 2, 60)
        await wait_for(f"{N} envelopes each way", lambda: delivered(alice, bob, N), 90)
        check_exactly_once(alice, bob, N)
        await check_live_push(alice, bob)
        assert [p.transport for p in bob.peers()] == ["ble"]
        link = next(iter(central.links.values()))
        served = next(iter(server.links.values()))
        say(f"value sizes: central {link.framing.chunk} B, peripheral {served.framing.chunk} B "
            f"(BlueZ MTUs {peripheral.peers}); fragments: central sent {link.fragments_sent}, "
            f"received {link.fragments_received}; malformed inputs {peripheral.malformed}")
        assert link.framing.chunk <= 500 and served.framing.chunk <= 500
        assert peripheral.malformed == 0
    finally:
        await teardown(central, run_task, server, [alice, bob], transport)


if __name__ == "__main__":
    main(scenario)
