"""VM scenario f1: bleak's own BlueZ backend as Pigeon's central (runs inside the VM).

alice's ``BleCentral`` gets no backend argument, so bleak talks D-Bus to bluetoothd, which
drives the kernel's HCI layer, which drives a bumble controller on /dev/vhci. bob is a
Pigeon node serving ``BlePeripheralServer`` on a ``BumblePeripheral`` (a second bumble
controller on the same LocalLink). The central must find bob by the service UUID,
connect, subscribe, and the two nodes must sync ``N`` envelopes each way, each exactly
once, with real SQLite stores on the guest's tmpfs.
"""

from __future__ import annotations

import asyncio
import shutil

from bumble.device import Device

from mesh.transports.ble import BleCentral, BlePeripheralServer
from tests.ble_support import BumblePeripheral, BumbleWorld
from tests.test_node import Clock, befriend, make_node
from tests.vm.guest_support import (
    WORK,
    AirLink,
    N,
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


async def scenario() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    world = BumbleWorld()
    world.link = AirLink()
    _controller, transport = await vhci_controller(world.link)
    say("bumble controller attached to /dev/vhci")
    await powered_adapter()
    peer: Device = await world.device("bob-radio")
    clock = Clock()
    alice, bob = make_node(WORK, "alice", clock), make_node(WORK, "bob", clock)
    befriend(alice, bob)
    queue_both_ways(alice, bob, N)
    server = BlePeripheralServer(bob, BumblePeripheral(peer))
    await server.start()
    say(f"bob advertises Pigeon's service from {peer.public_address}")
    # No backend argument: bleak picks its BlueZ backend (D-Bus to bluetoothd).
    central = BleCentral(alice, scan_timeout=10.0, connect_timeout=30.0,
                         backoff_initial_s=0.5, backoff_max_s=2.0)
    run_task = asyncio.ensure_future(central.run())
    try:
        await wait_for("BlueZ central linked to bob", lambda: len(central.links) == 1, 90)
        address, link = next(iter(central.links.items()))
        expected = peer.public_address.to_string(with_type_qualifier=False)
        assert address == expected, (address, expected)
        await wait_for("sessions live on both nodes",
                       lambda: [p.state for p in alice.peers() + bob.peers()] == ["live"] * 2, 60)
        await wait_for(f"{N} envelopes each way", lambda: delivered(alice, bob, N), 90)
        check_exactly_once(alice, bob, N)
        await check_live_push(alice, bob)
        assert [p.transport for p in alice.peers()] == ["ble"]
        served = next(iter(server.links.values()))
        say(f"value sizes: central {link.framing.chunk} B, peripheral {served.framing.chunk} B; "
            f"fragments: central sent {link.fragments_sent}, received {link.fragments_received}")
        assert link.framing.chunk <= 500 and served.framing.chunk <= 500
    finally:
        await teardown(central, run_task, server, [alice, bob], transport)


if __name__ == "__main__":
    main(scenario)
