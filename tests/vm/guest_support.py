"""Shared by the scenarios that run *inside* the BLE test VM (tests/vm/vm.py).

Inside the guest, BlueZ's adapter is a bumble ``Controller`` attached to ``/dev/vhci``;
the peer is a second bumble controller on the same ``LocalLink``, so the "air" between
BlueZ and bumble is bumble's link layer. A scenario prints progress with timestamps
(its stdout comes back to the host test) and exits 0 only if every check passed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bumble.controller import Controller
from bumble.core import PhysicalTransport
from bumble.hci import Address, LeFeatureMask
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import Transport
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from mesh.node import Node
from tests.test_node import inbox_texts

STARTED = time.monotonic()
#: Envelopes queued each way (small: TCG emulation is ~10-50x slower than the host).
N = int(os.environ.get("PIGEON_VM_N", "20"))
#: Where the nodes keep their SQLite stores (a tmpfs in the guest).
WORK = Path(os.environ.get("PIGEON_VM_WORK", "/tmp/pigeon-vm"))
BLUEZ_SIDE_ADDRESS = "F0:F0:F0:00:00:01"


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.2f} s] {message}", flush=True)


class AirLink(LocalLink):
    """bumble's ``LocalLink`` with LE data labelled by the sender's connection address.

    bumble 0.0.236 labels every LE ACL packet with the sending controller's *random*
    address. The kernel connects with its public address while it holds a random one (a
    non-resolvable address it sets for active scanning), so the peer found no connection
    for that label and dropped BlueZ's first ATT request (the MTU exchange timed out).
    The address the sender's connection to this peer actually uses is the right label.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def send_acl_data(self, sender_controller: Controller, destination_address: Address,
                      transport: PhysicalTransport, data: bytes) -> None:
        connection = sender_controller.le_connections.get(destination_address)
        if transport != PhysicalTransport.LE or connection is None:
            super().send_acl_data(sender_controller, destination_address, transport, data)
            return
        receiver = self.find_le_controller(destination_address)
        if receiver is not None:
            source = connection.self_address
            asyncio.get_running_loop().call_soon(
                lambda: receiver.on_link_acl_data(source, transport, data))


async def vhci_controller(link: LocalLink) -> tuple[Controller, Transport]:
    """A bumble controller on ``/dev/vhci``: the kernel registers it as hci0 for BlueZ.

    LL_PRIVACY and LE_EXTENDED_ADVERTISING are cleared: with them the kernel waits for an
    LE Enhanced Connection Complete event that bumble does not send (shared/NOTES.md).
    The features are set before the first await, so the kernel's init sees them.
    """
    transport = await open_transport("vhci")
    controller = Controller("bluez-hci0", host_source=transport.source,
                            host_sink=transport.sink, link=link,
                            public_address=BLUEZ_SIDE_ADDRESS)
    controller.le_features = controller.le_features & ~(
        LeFeatureMask.LL_PRIVACY | LeFeatureMask.LE_EXTENDED_ADVERTISING)
    return controller, transport


async def _managed_objects(bus: MessageBus) -> dict[str, Any]:
    """BlueZ's objects, or {} while it is not up yet. Asks only once bluetoothd owns its
    name: a call to an unowned name makes dbus-daemon try to activate it, which without
    systemd can hang (seen under load: the 5 s call timed out and failed the run)."""
    owner = await asyncio.wait_for(bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="NameHasOwner", signature="s",
        body=["org.bluez"])), 5)
    if owner.message_type is MessageType.ERROR or not owner.body or not owner.body[0]:
        return {}
    try:
        reply = await asyncio.wait_for(bus.call(Message(
            destination="org.bluez", path="/", interface="org.freedesktop.DBus.ObjectManager",
            member="GetManagedObjects")), 10)
    except TimeoutError:
        return {}  # a slow emulated bluetoothd: the caller asks again until its deadline
    if reply.message_type is MessageType.ERROR:
        return {}
    objects = reply.body[0]
    return objects if isinstance(objects, dict) else {}


async def powered_adapter(timeout: float = 60.0) -> str:
    """Wait for BlueZ to list an adapter, power it on, and return its object path."""
    bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), 10)
    try:
        deadline = time.monotonic() + timeout
        while True:
            objects = await _managed_objects(bus)
            adapters = sorted(p for p, ifaces in objects.items() if "org.bluez.Adapter1" in ifaces)
            if adapters:
                path = adapters[0]
                props = objects[path]["org.bluez.Adapter1"]
                if props.get("Powered") is not None and props["Powered"].value:
                    say(f"BlueZ adapter {path} ({props['Address'].value}) is powered")
                    return path
                await asyncio.wait_for(bus.call(Message(
                    destination="org.bluez", path=path,
                    interface="org.freedesktop.DBus.Properties", member="Set",
                    signature="ssv",
                    body=["org.bluez.Adapter1", "Powered", Variant("b", True)])), 10)
            if time.monotonic() > deadline:
                raise AssertionError(f"no powered BlueZ adapter after {timeout:.0f} s")
            await asyncio.sleep(0.5)
    finally:
        bus.disconnect()


async def wait_for(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Bounded."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not reached within {timeout:.0f} s")
        await asyncio.sleep(0.05)
    took = time.monotonic() - started
    say(f"{what}: after {took:.1f} s")
    return took


def queue_both_ways(a: Node, b: Node, n: int) -> None:
    for i in range(n):
        a.send(b.identity.name, f"{a.identity.name}->{b.identity.name} {i}")
        b.send(a.identity.name, f"{b.identity.name}->{a.identity.name} {i}")


def delivered(a: Node, b: Node, n: int) -> bool:
    return len(inbox_texts(a)) >= n and len(inbox_texts(b)) >= n


def check_exactly_once(a: Node, b: Node, n: int) -> None:
    """Every envelope arrived, and none twice."""
    for sender, receiver in ((a, b), (b, a)):
        got = sorted(inbox_texts(receiver))
        want = sorted(f"{sender.identity.name}->{receiver.identity.name} {i}" for i in range(n))
        assert got == want, (f"{receiver.identity.name}'s inbox: {len(got)} messages, "
                             f"{len(set(got))} distinct, {len(set(want) - set(got))} missing")
    say(f"all {n} envelopes arrived exactly once in each direction")


async def check_live_push(a: Node, b: Node, timeout: float = 60.0) -> None:
    """Once synced, a new message each way is pushed over the same live link."""
    before_a, before_b = len(inbox_texts(a)), len(inbox_texts(b))
    a.send(b.identity.name, "live from " + a.identity.name)
    b.send(a.identity.name, "live from " + b.identity.name)
    await wait_for("one live message each way",
                   lambda: len(inbox_texts(a)) > before_a and len(inbox_texts(b)) > before_b,
                   timeout)
    assert inbox_texts(b).count("live from " + a.identity.name) == 1
    assert inbox_texts(a).count("live from " + b.identity.name) == 1


async def bounded(what: str, awaitable: Awaitable[Any], timeout: float = 15.0) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(f"{what} did not finish within {timeout:.0f} s") from None


async def teardown(central: Any, run_task: asyncio.Task[Any], server: Any, nodes: list[Node],
                   transport: Transport) -> None:
    """Every step bounded: the central's loop ends after its scan, then the rest."""
    await bounded("central stop", central.stop(), 20)
    done, _ = await asyncio.wait([run_task], timeout=20)
    if not done:
        run_task.cancel()
    await bounded("peripheral stop", server.stop(), 20)
    for node in nodes:
        await bounded(f"{node.identity.name} stop", node.stop(), 15)
    await transport.close()
    say("torn down")


def main(scenario: Callable[[], Awaitable[None]], timeout: float = 240.0) -> None:
    """Run ``scenario`` with an overall bound; exit 0 on success, 1 on any failure."""
    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout))
    except BaseException:
        traceback.print_exc()
        say("FAILED")
        sys.stdout.flush()
        os._exit(1)  # a wedged transport thread must not keep the guest waiting
    say("PASSED")
    sys.stdout.flush()
    os._exit(0)
