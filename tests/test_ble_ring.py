"""Issue 7 (b): six nodes in a ring over bumble, each central *and* peripheral; a message
crosses three hops and its receipt comes back.

Every node has its own software controller on one ``LocalLink`` and runs both roles: a
``BlePeripheralServer`` on a ``BumblePeripheral`` and a ``BleCentral`` (real bleak code,
test backend). Range is simulated in the scanner: node i only hears nodes i-1 and i+1
(mod 6), so the only paths from node 0 to node 3 are 0-1-2-3 and 0-5-4-3. Connection
set-up is serialised across the world (one shared lock) and the backend waits for the
connection whose role is central: bumble's ``connect()`` can otherwise return the
incoming connection on a node that is central and peripheral at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bumble.device import Connection, Device

from mesh import api
from mesh.node import Node
from mesh.transports.ble import BleCentral, BlePeripheralServer
from tests.ble_support import BumblePeripheral, BumbleWorld, bleak_backends
from tests.test_node import Clock, befriend, inbox_texts, make_node, outbox_state, wait_until

pytestmark = pytest.mark.timeout(90)

SIZE = 6
TEXT = "three hops round the ring"


@dataclass
class Ring:
    world: BumbleWorld
    devices: list[Device]
    nodes: list[Node]
    servers: list[BlePeripheralServer]
    centrals: list[BleCentral]
    tasks: list[asyncio.Task[None]]
    #: Every connection any controller ever reported: (node index, peer node index).
    connections: list[tuple[int, int]] = field(default_factory=list)

    def index(self, address: object) -> int:
        text = str(address).split("/")[0]
        return [str(d.public_address).split("/")[0] for d in self.devices].index(text)


def neighbours(i: int) -> set[int]:
    return {(i - 1) % SIZE, (i + 1) % SIZE}


async def make_ring(tmp_path: Path, clock: Clock) -> Ring:
    world = BumbleWorld()
    devices = [await world.device(f"d{i}") for i in range(SIZE)]
    nodes = [make_node(tmp_path, f"n{i}", clock) for i in range(SIZE)]
    ring = Ring(world, devices, nodes, [], [], [])
    # One string per device, whichever address type it advertises or connects with.
    addresses = [str(d.public_address).split("/")[0] for d in devices]

    for i, device in enumerate(devices):
        def record(connection: Connection, i: int = i) -> None:
            ring.connections.append((i, ring.index(connection.peer_address)))

        device.on(device.EVENT_CONNECTION, record)
        server = BlePeripheralServer(nodes[i], BumblePeripheral(device))
        await server.start()
        ring.servers.append(server)

    for i, device in enumerate(devices):
        in_range = {addresses[j] for j in neighbours(i)}

        def visible(address: str, in_range: set[str] = in_range, device: Device = device,
                    ) -> bool:
            """In range, and not already connected to us in either role (one link per
            pair: bumble allows one connection per pair of controllers)."""
            address = address.split("/")[0]
            linked = {str(c.peer_address).split("/")[0] for c in device.connections.values()}
            return address in in_range and address not in linked

        scanner, client = bleak_backends(device, mtu=247, visible=visible,
                                         connect_lock=world.connect_lock)
        central = BleCentral(nodes[i], scanner_backend=scanner, client_backend=client,
                             scan_timeout=1.0, connect_timeout=8.0,
                             backoff_initial_s=0.05, backoff_max_s=0.5)
        ring.centrals.append(central)
        ring.tasks.append(asyncio.ensure_future(central.run()))
    return ring


async def teardown(ring: Ring) -> None:
    """Every step bounded: a stuck software controller must fail the test, not hang it."""
    await asyncio.wait_for(asyncio.gather(*(c.stop() for c in ring.centrals)), 15)
    _, pending = await asyncio.wait(ring.tasks, timeout=10)
    for task in pending:  # fallback only: cancelling a bumble scan mid-command can wedge it
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*ring.tasks, return_exceptions=True), 10)
    await asyncio.wait_for(asyncio.gather(*(s.stop() for s in ring.servers)), 15)
    await asyncio.wait_for(asyncio.gather(*(n.stop() for n in ring.nodes)), 15)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def rings() -> AsyncIterator[list[Ring]]:
    made: list[Ring] = []
    yield made
    for ring in made:
        await teardown(ring)


async def test_message_crosses_three_hops_in_a_ring_of_central_peripheral_nodes(
        tmp_path: Path, clock: Clock, rings: list[Ring]) -> None:
    started = time.monotonic()
    ring = await make_ring(tmp_path, clock)
    rings.append(ring)
    sender, recipient = ring.nodes[0], ring.nodes[3]
    befriend(sender, recipient)
    msg_id = sender.send("n3", TEXT)

    await wait_until(lambda: inbox_texts(recipient) == [TEXT], timeout=45)
    delivered_at = time.monotonic() - started
    await wait_until(lambda: outbox_state(sender, msg_id) == api.STATE_DELIVERED, timeout=30)
    receipt_at = time.monotonic() - started

    # Exactly once, and only where it was addressed (relays cannot read it).
    await asyncio.sleep(0.5)  # let any duplicate that is still in flight land
    assert inbox_texts(recipient) == [TEXT]
    for i, node in enumerate(ring.nodes):
        if i != 3:
            assert inbox_texts(node) == [], f"node {i} shows a message not meant for it"
    # Range held: no controller ever connected to a node out of its range, so the message
    # cannot have skipped a hop; and both roles were used by the ring's nodes.
    assert ring.connections, "no connection was ever made"
    strays = [(i, j) for i, j in ring.connections if j not in neighbours(i)]
    assert strays == [], f"links to non-neighbours: {strays}"
    for i, node in enumerate(ring.nodes):
        for peer in node.peers():
            assert peer.transport == "ble"
            assert ring.index(peer.address.split("#")[0]) in neighbours(i)
    as_central = {i for i, c in enumerate(ring.centrals) if c.links}
    as_peripheral = {i for i, s in enumerate(ring.servers) if s.links}
    print(f"delivered after {delivered_at:.2f} s, receipt back after {receipt_at:.2f} s; "
          f"{len(ring.connections)} connection events; central on {sorted(as_central)}, "
          f"peripheral on {sorted(as_peripheral)}")
