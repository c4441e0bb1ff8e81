"""Two Pigeon nodes over Bluetooth LE on bumble software controllers (no radio).

The central is ``BleCentral`` (real bleak ``BleakScanner``/``BleakClient`` code with a
test-only backend driving a bumble central); the peripheral is ``BlePeripheralServer``
on ``BumblePeripheral``. Each node has its own controller; only one node is central, so
connection set-up is serialised (bumble's central+peripheral ``connect()`` quirk).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh.node import Node
from mesh.transports.ble import BleCentral, BlePeripheralServer
from tests.ble_support import BumblePeripheral, BumbleWorld, bleak_backends
from tests.test_node import Clock, befriend, inbox_texts, make_node, wait_until

pytestmark = pytest.mark.timeout(60)

N = 200
#: Fragments (both directions, central side) after which test (c) cuts the connection.
CUT_AFTER = 7000


@dataclass
class Pair:
    a: Node  # central
    b: Node  # peripheral
    central: BleCentral
    server: BlePeripheralServer
    peripheral: BumblePeripheral
    run_task: asyncio.Task[None]

    def live(self) -> bool:
        pa, pb = self.a.peers(), self.b.peers()
        return len(pa) == 1 and len(pb) == 1 and all(p.state == "live" for p in pa + pb)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def make_pair(tmp_path: Path, clock: Clock, mtu: int) -> Pair:
    world = BumbleWorld()
    dev_a, dev_b = await world.device("a"), await world.device("b")
    a, b = make_node(tmp_path, "alice", clock), make_node(tmp_path, "bob", clock)
    befriend(a, b)
    peripheral = BumblePeripheral(dev_b)
    server = BlePeripheralServer(b, peripheral)
    await server.start()
    scanner, client = bleak_backends(dev_a, mtu=mtu)
    central = BleCentral(a, scanner_backend=scanner, client_backend=client, scan_timeout=3.0,
                         connect_timeout=5.0, backoff_initial_s=0.05, backoff_max_s=0.2)
    run_task = asyncio.ensure_future(central.run())
    return Pair(a, b, central, server, peripheral, run_task)


async def teardown(p: Pair) -> None:
    """Every step bounded: a stuck software controller must fail the test, not hang it."""
    await asyncio.wait_for(p.central.stop(), 10)  # the loop ends after its current scan
    done, _ = await asyncio.wait([p.run_task], timeout=10)
    if not done:  # fallback only: cancelling a bumble scan mid-command can wedge it
        p.run_task.cancel()
    steps: list[tuple[str, Awaitable[object]]] = [
        ("central loop", asyncio.gather(p.run_task, return_exceptions=True)),
        ("peripheral", p.server.stop()),
        ("node a", p.a.stop()), ("node b", p.b.stop())]
    for name, step in steps:
        try:
            await asyncio.wait_for(step, 10)
        except TimeoutError:
            raise AssertionError(f"teardown of {name} did not finish in 10 s") from None


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Pair]]:
    pairs: list[Pair] = []
    yield pairs
    for p in pairs:
        await teardown(p)


def queue_both_ways(a: Node, b: Node, n: int) -> None:
    for i in range(n):
        a.send("bob", f"a->b {i}")
        b.send("alice", f"b->a {i}")


def all_delivered(a: Node, b: Node, n: int) -> bool:
    return len(inbox_texts(b)) >= n and len(inbox_texts(a)) >= n


def assert_exactly_once(a: Node, b: Node, n: int) -> None:
    assert sorted(inbox_texts(b)) == sorted(f"a->b {i}" for i in range(n))
    assert sorted(inbox_texts(a)) == sorted(f"b->a {i}" for i in range(n))


@pytest.mark.parametrize("mtu", [23, 517])
async def test_two_nodes_discover_connect_and_sync_both_ways(
        tmp_path: Path, clock: Clock, cleanup: list[Pair], mtu: int) -> None:
    started = time.monotonic()
    p = await make_pair(tmp_path, clock, mtu)
    cleanup.append(p)
    queue_both_ways(p.a, p.b, N)
    await wait_until(p.live, timeout=15)
    link = next(iter(p.central.links.values()))
    expected_chunk = min(mtu - 3, 500)
    assert link.framing.chunk == expected_chunk
    assert next(iter(p.server.links.values())).framing.chunk == expected_chunk
    await wait_until(lambda: all_delivered(p.a, p.b, N), timeout=30)
    assert_exactly_once(p.a, p.b, N)
    assert [peer.transport for peer in p.a.peers()] == ["ble"]
    print(f"mtu {mtu}: {link.fragments_sent} fragments sent by the central, "
          f"{time.monotonic() - started:.2f} s")


async def test_disconnect_mid_transfer_reconnects_without_loss_or_duplicates(
        tmp_path: Path, clock: Clock, cleanup: list[Pair]) -> None:
    p = await make_pair(tmp_path, clock, 23)
    cleanup.append(p)
    queue_both_ways(p.a, p.b, N)
    await wait_until(lambda: len(p.central.links) == 1, timeout=15)
    first = next(iter(p.central.links.values()))
    # Mid-transfer: the session is up and a good share of the fragments (the whole sync is
    # several thousand at MTU 23) has crossed, far from all.
    await wait_until(lambda: first.fragments_received + first.fragments_sent >= CUT_AFTER,
                     timeout=20)
    delivered_before_cut = len(inbox_texts(p.a)) + len(inbox_texts(p.b))
    assert delivered_before_cut < 2 * N
    for connection in list(p.peripheral.connections.values()):
        await asyncio.wait_for(connection.disconnect(), 5)  # the radio link drops
    await wait_until(lambda: first.closed, timeout=10)
    # The central scans again, reconnects, and the sync resumes on a new link.
    await wait_until(lambda: any(link is not first and not link.closed
                                 for link in p.central.links.values()), timeout=15)
    await wait_until(lambda: all_delivered(p.a, p.b, N), timeout=40)
    assert_exactly_once(p.a, p.b, N)
    print(f"cut after {first.fragments_received + first.fragments_sent} fragments, "
          f"{delivered_before_cut} of {2 * N} envelopes delivered by then")
