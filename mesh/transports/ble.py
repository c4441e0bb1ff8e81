"""Bluetooth LE links: Pigeon's GATT layout, a ``Link`` over ``BleFraming``, a bleak central.

GATT layout (one primary service, two characteristics; random 128-bit UUIDs)::

    service  e47f3f75-1b41-4b2f-a6a3-196df32ef4b6   advertised, nothing else is
    RX       27f2fae8-f76d-4196-8fc2-5eacdc675787   write without response (central -> peripheral)
    TX       8bee04a6-d0a4-471c-a7c2-52cacaef2320   notify (peripheral -> central)

The central writes framed fragments to RX and receives TX notifications; the peripheral
receives RX writes and notifies TX to that one central. ``BleFraming`` (sans-IO) does
fragmentation, link ids, credits and timeouts; ``BleLink`` only drives it with asyncio and
one send function, so the Noise session above runs unchanged.

Every value is at most ``min(max_write_without_response_size, 500)`` bytes on the
central and ``min(ATT_MTU - 3, 500)`` on the peripheral (BlueZ loses 511-514-byte write
commands; see docs/ble.md).

The peripheral side is behind the small ``Peripheral`` protocol so the OS stack is
pluggable: ``mesh.transports.bluez`` implements it on BlueZ over ``dbus-fast``; the tests
also use a bumble implementation (tests/ble_support.py). The central uses bleak and takes
``backend=`` classes so tests can inject a backend that drives a software controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from mesh.dialer import DUPLICATE_REASON
from mesh.errors import LocalProtocolError
from mesh.transports.ble_framing import DEFAULT_WINDOW, BleFraming

if TYPE_CHECKING:
    from mesh.node import Node

log = logging.getLogger("pigeon.ble")

SERVICE_UUID = "e47f3f75-1b41-4b2f-a6a3-196df32ef4b6"
RX_UUID = "27f2fae8-f76d-4196-8fc2-5eacdc675787"
TX_UUID = "8bee04a6-d0a4-471c-a7c2-52cacaef2320"

#: ``write`` returns once no more than this many stream bytes wait for credit.
HIGH_WATER = 16 * 1024
#: How long closing waits to flush a CLOSE fragment and tear the connection down.
TEARDOWN_TIMEOUT = 5.0
#: Addresses a central remembers a connection backoff for (the rest are forgotten).
MAX_RETRY_ENTRIES = 256

SendFragment = Callable[[bytes], Awaitable[None]]


def _remember(table: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` as the newest entry of an insertion-ordered table, dropping the oldest
    beyond ``MAX_RETRY_ENTRIES`` (what a central remembers per address stays bounded)."""
    table.pop(key, None)
    table[key] = value
    while len(table) > MAX_RETRY_ENTRIES:
        del table[next(iter(table))]


#: Links of this process whose GATT connection may still deliver fragments (until their
#: teardown finished): a new link's id differs from all of theirs, so on one host a stale
#: or parallel link's fragments never match a new link's id (docs/ble.md, "Framing").
#: Weak: a link dropped without ever starting frees its id.
_live_links: weakref.WeakSet[BleLink] = weakref.WeakSet()


class BleLink:
    """One BLE link as a ``Link``: stream bytes over ``BleFraming`` fragments.

    ``send_fragment`` writes (central) or notifies (peripheral) one value; ``chunk_size``
    reports the current maximum value size (it is re-read before every batch, so a late
    MTU exchange takes effect); ``disconnect`` tears the GATT connection down once the
    link has closed. Call ``feed`` with every received value, ``lost`` when the
    connection dropped, and ``start`` once the peer can hear our notifications/writes.
    """

    transport = "ble"

    def __init__(self, address: str, *, initiator: bool, chunk_size: Callable[[], int],
                 send_fragment: SendFragment,
                 disconnect: Callable[[], Awaitable[Any]] | None = None,
                 window: int = DEFAULT_WINDOW, open_timeout: float = 10.0,
                 stall_timeout: float = 15.0,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.address = address
        self._loop = asyncio.get_running_loop()
        self._chunk_size = chunk_size
        self._send = send_fragment
        self._disconnect = disconnect
        self.framing: BleFraming = BleFraming(
            rng, chunk_size(), self._loop.time(), initiator=initiator,
            window=window, open_timeout=open_timeout, stall_timeout=stall_timeout,
            taken={link.framing.my_id for link in _live_links})
        _live_links.add(self)
        self._wake = asyncio.Event()  # the pump has work
        self._changed = asyncio.Event()  # readers and writers may proceed
        self._lost = False
        self._pump_task: asyncio.Task[None] | None = None
        self.fragments_sent = 0
        self.fragments_received = 0

    # ---- driving ---------------------------------------------------------------------

    def start(self) -> None:
        if self._pump_task is None:
            self._pump_task = self._loop.create_task(self._pump())

    @property
    def closed(self) -> bool:
        return self.framing.closed

    @property
    def finished(self) -> asyncio.Task[None] | None:
        """The pump task: done once the link closed and the connection was torn down."""
        return self._pump_task

    def feed(self, fragment: bytes) -> None:
        """One received attribute value (RX write or TX notification). Never raises."""
        self.fragments_received += 1
        self.framing.receive_fragment(bytes(fragment), self._loop.time())
        self._kick()

    def lost(self, reason: str = "BLE connection lost") -> None:
        """The GATT connection is gone: nothing more can be sent."""
        self._lost = True
        self.framing.close(reason)
        self._kick()

    def _kick(self) -> None:
        self._wake.set()
        self._changed.set()

    # ---- Link ------------------------------------------------------------------------

    async def read(self) -> bytes:
        while True:
            data = self.framing.received_data()
            if data:
                self._wake.set()  # drained fragments may owe the peer credit
                return data
            if self.framing.closed:
                return b""
            self._changed.clear()
            await self._changed.wait()

    async def write(self, data: bytes) -> None:
        if self.framing.closed:
            raise ConnectionError(self.framing.close_reason or "BLE link closed")
        self.framing.send(data)
        self._wake.set()
        while self.framing.pending > HIGH_WATER:
            self._changed.clear()
            await self._changed.wait()
            if self.framing.closed:
                raise ConnectionError(self.framing.close_reason or "BLE link closed")

    def close(self) -> None:
        self.framing.close("closed locally")
        self._kick()
        if self._pump_task is None and self._disconnect is not None:
            self.start()  # never started: still tear the connection down

    # ---- the pump ----------------------------------------------------------------------

    async def _pump(self) -> None:
        try:
            while True:
                self._wake.clear()
                if not self._lost:
                    with contextlib.suppress(LocalProtocolError):
                        self.framing.set_chunk_size(self._chunk_size())
                    frags = self.framing.fragments_to_send(self._loop.time())
                    for frag in frags:
                        await self._send(frag)
                        self.fragments_sent += 1
                    if frags:
                        self._changed.set()  # pending shrank: writers may go on
                if self.framing.closed or self._lost:
                    break
                timer = self.framing.get_timer()
                delay = 1.0 if timer is None else max(0.0, timer - self._loop.time())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                except TimeoutError:
                    self.framing.handle_timer(self._loop.time())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the OS stack failed a write: the link is gone
            log.info("BLE link to %s failed: %s", self.address, exc)
            self._lost = True
        finally:
            if not self.framing.closed:
                self.framing.close("BLE link failed")
            self._changed.set()
            # INFO, not DEBUG: a framing violation (credit, size, gap, stall) is only
            # named here; the session above just sees the link end ("link lost").
            log.info("BLE link to %s closed: %s", self.address, self.framing.close_reason)
            if self._disconnect is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._disconnect(), TEARDOWN_TIMEOUT)
            _live_links.discard(self)


# ---- peripheral ---------------------------------------------------------------------------


class PeripheralHandler(Protocol):
    """What a ``Peripheral`` reports to Pigeon. ``peer`` names one connected central.

    No ``on_write`` for a peer after its ``on_disconnect`` (stacks that run write handlers
    asynchronously must drop late ones): the server would open a link for a gone central.
    """

    def on_write(self, peer: str, value: bytes) -> None: ...

    def on_disconnect(self, peer: str) -> None: ...


class Peripheral(Protocol):
    """The OS peripheral role, as small as Pigeon needs it.

    ``start`` serves the GATT layout above and advertises ``SERVICE_UUID`` only (no name,
    no manufacturer or service data: nothing that identifies the device over time).
    """

    async def start(self, handler: PeripheralHandler) -> None: ...

    async def stop(self) -> None: ...

    async def notify(self, peer: str, value: bytes) -> None:
        """Notify TX to this one central (``value`` <= ``max_value_size(peer)``)."""
        ...

    def max_value_size(self, peer: str) -> int:
        """ATT_MTU - 3 for this central's connection."""
        ...

    async def disconnect(self, peer: str) -> None: ...


class BlePeripheralServer:
    """Turns a ``Peripheral``'s writes into one ``BleLink`` per central for ``node``."""

    def __init__(self, node: Node, peripheral: Peripheral, *, max_links: int = 6,
                 total_links: Callable[[], int] | None = None,
                 **link_options: Any) -> None:
        self.node = node
        self.peripheral = peripheral
        self.max_links = max_links
        #: Links counted against ``max_links``: by default ours; ``BleService`` passes the
        #: count over both roles, so central and peripheral links share one cap.
        self._total_links = total_links or (lambda: len(self.links))
        self._link_options = link_options
        self.links: dict[str, BleLink] = {}

    async def start(self) -> None:
        await self.peripheral.start(self)

    async def stop(self) -> None:
        for link in list(self.links.values()):
            link.close()
        await self.peripheral.stop()

    def on_write(self, peer: str, value: bytes) -> None:
        link = self.links.get(peer)
        if link is None or link.closed:
            if link is None and self._total_links() >= self.max_links:
                return  # ignored; the central's OPEN times out
            link = self._open(peer)
        link.feed(value)

    def on_disconnect(self, peer: str) -> None:
        link = self.links.pop(peer, None)
        if link is not None:
            link.lost()

    def _open(self, peer: str) -> BleLink:
        peripheral = self.peripheral
        link = BleLink(
            peer, initiator=False,
            chunk_size=lambda: peripheral.max_value_size(peer),
            send_fragment=lambda frag: peripheral.notify(peer, frag),
            disconnect=lambda: peripheral.disconnect(peer),
            **self._link_options)
        self.links[peer] = link
        link.start()
        self.node.add_link(link, initiator=False)
        return link


# ---- central (bleak) ------------------------------------------------------------------------


class BleScanError(Exception):
    """The OS scan itself failed (no adapter, powered off, no permission): not a peer's fault."""


class _CentralAttempt:
    """``LinkObserver`` for one dialed BLE link: reports its end to the central."""

    def __init__(self, central: BleCentral, address: str) -> None:
        self.central = central
        self.address = address
        self.remote_key: bytes | None = None

    def handshake_completed(self, remote_key: bytes) -> None:
        self.remote_key = remote_key

    def link_closed(self, *, handshaken: bool, error: bool, reason: str) -> None:
        self.central.link_ended(self.address, remote_key=self.remote_key,
                                handshaken=handshaken, error=error, reason=reason)


class BleCentral:
    """Scans for Pigeon's service with bleak, connects, subscribes, runs a session.

    ``scanner_backend`` / ``client_backend`` are passed to bleak as ``backend=`` (None:
    the platform's own). ``run`` keeps looking for peers not yet linked on a duty cycle
    (see ``run``). ``skip(address)`` names peers we must not dial (``BleService`` passes
    "already linked to us as a central", the cheap half of the one-link-per-pair rule);
    ``total_links()`` counts links against ``max_links`` (default: ours only).
    """

    def __init__(self, node: Node, *, scanner_backend: Any = None, client_backend: Any = None,
                 scan_timeout: float = 5.0, connect_timeout: float = 10.0, max_links: int = 6,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 skip: Callable[[str], bool] | None = None,
                 total_links: Callable[[], int] | None = None,
                 **link_options: Any) -> None:
        self.node = node
        self._scanner_kw: dict[str, Any] = {} if scanner_backend is None else {
            "backend": scanner_backend}
        self._client_kw: dict[str, Any] = {} if client_backend is None else {
            "backend": client_backend}
        self.scan_timeout = scan_timeout
        self.connect_timeout = connect_timeout
        self.max_links = max_links
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._skip = skip or (lambda _address: False)
        self._total_links = total_links or (lambda: len(self.links))
        self._link_options = link_options
        self.links: dict[str, BleLink] = {}
        #: Per-address backoff after a failed connection: address -> (retry at, delay).
        #: A peer that keeps failing (out of range, hostile, wrong GATT) does not starve
        #: the others. Bounded: expired entries go first, then the oldest.
        self._retry: dict[str, tuple[float, float]] = {}
        #: Addresses whose link lost the duplicate-link rule (they also dialed us), with
        #: the link key they had: not redialed while a link to that key lives.
        self._duplicate_of: dict[str, bytes] = {}
        self._stopping = False
        #: Scanning failed (no adapter, powered off, permission): said once, not per scan.
        self.scan_error: str | None = None
        self._scan_failures = 0
        self.scans = 0
        self.connects = 0
        self.failures = 0

    def _wanted(self, device: Any, adv: Any) -> bool:
        if SERVICE_UUID not in [u.lower() for u in adv.service_uuids]:
            return False
        address = device.address
        if address in self.links or self._skip(address):
            return False
        twin = self._duplicate_of.get(address)
        if twin is not None:
            if self.node.has_link_to(twin):
                return False  # we lost the duplicate-link rule to it; its link stands
            del self._duplicate_of[address]
        retry = self._retry.get(address)
        return retry is None or retry[0] <= time.monotonic()

    def _failed(self, address: str) -> None:
        self.failures += 1
        now = time.monotonic()
        _, delay = self._retry.get(address, (0.0, self.backoff_initial_s / 2))
        delay = min(max(delay * 2, self.backoff_initial_s), self.backoff_max_s)
        if len(self._retry) >= MAX_RETRY_ENTRIES:
            for key in [k for k, (at, _) in self._retry.items() if at <= now]:
                del self._retry[key]
        _remember(self._retry, address, (now + delay * (0.5 + random.random()), delay))

    async def connect_once(self) -> BleLink | None:
        """Find one unlinked Pigeon peripheral and start a session with it; None if none
        was found within ``scan_timeout``. Raises on connection errors."""
        from bleak import BleakScanner

        if self._total_links() >= self.max_links:
            return None
        self.scans += 1
        try:
            device = await BleakScanner.find_device_by_filter(
                self._wanted, timeout=self.scan_timeout, service_uuids=[SERVICE_UUID],
                **self._scanner_kw)
        except Exception as exc:
            raise BleScanError(str(exc) or type(exc).__name__) from exc
        if device is None:
            return None
        try:
            return await self._connect(device)
        except BaseException:
            self._failed(device.address)
            raise

    async def _connect(self, device: Any) -> BleLink | None:
        from bleak import BleakClient

        holder: list[BleLink] = []

        def disconnected(_client: BleakClient) -> None:
            for link in holder:
                link.lost()

        client = BleakClient(device, disconnected_callback=disconnected,
                             services=[SERVICE_UUID], timeout=self.connect_timeout,
                             **self._client_kw)
        await asyncio.wait_for(client.connect(), self.connect_timeout)
        try:
            rx = client.services.get_characteristic(RX_UUID)
            tx = client.services.get_characteristic(TX_UUID)
            if rx is None or tx is None:
                raise ConnectionError("peer lacks Pigeon's GATT characteristics")
            rx_char = rx

            async def send(frag: bytes) -> None:
                await client.write_gatt_char(rx_char, frag, response=False)

            link = BleLink(device.address, initiator=True,
                           chunk_size=lambda: rx_char.max_write_without_response_size,
                           send_fragment=send, disconnect=client.disconnect,
                           **self._link_options)
            holder.append(link)
            await asyncio.wait_for(
                client.start_notify(tx, lambda _c, data: link.feed(bytes(data))),
                self.connect_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), TEARDOWN_TIMEOUT)
            raise
        if not client.is_connected:
            raise ConnectionError("disconnected during set-up")
        self.links[device.address] = link
        self.connects += 1
        link.start()  # subscribed: the peripheral's OPEN answer can reach us now
        task = self.node.add_link(link, initiator=True,
                                  observer=_CentralAttempt(self, device.address))
        finished = link.finished
        assert finished is not None
        finished.add_done_callback(lambda _t: self._forget(device.address, link))
        if task is None:
            link.close()
        return link

    def _forget(self, address: str, link: BleLink) -> None:
        if self.links.get(address) is link:
            del self.links[address]

    async def run(self) -> None:
        """Connect to every Pigeon peripheral in range until ``stop``.

        The duty cycle, for laptop batteries: a scan lasts at most ``scan_timeout``; after
        a scan that found nobody new we pause, the pause doubling (jittered) from
        ``backoff_initial_s`` to ``backoff_max_s``, so a node alone scans ~5 s in every
        ~35 s (about 14%) and one that just met someone looks again soon. At ``max_links``
        it does not scan at all. Finding a peer resets the pause. ``stop`` lets the current
        scan end by itself: cancelling an OS scan mid-command is the riskier path.
        """
        backoff = self.backoff_initial_s
        while not self._stopping:
            try:
                link = await self.connect_once()
            except asyncio.CancelledError:
                raise
            except BleScanError as exc:
                link = None
                # One failure can be transient (BlueZ answers InProgress to a scan started
                # right after a connection); two in a row are worth saying, once.
                self._scan_failures += 1
                if self._scan_failures == 1:
                    log.info("BLE scan failed: %s", exc)
                elif self.scan_error is None:
                    log.warning("Bluetooth LE scanning failed: %s (retrying quietly)", exc)
                    self.scan_error = str(exc)
                else:
                    self.scan_error = str(exc)
            except Exception as exc:
                link = None
                log.info("BLE connect failed: %s", exc)
                self._scan_ok()
            else:
                self._scan_ok()
            if link is not None:
                backoff = self.backoff_initial_s
                continue
            if self._stopping:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.backoff_max_s)

    def _scan_ok(self) -> None:
        self._scan_failures = 0
        if self.scan_error is not None:
            log.warning("Bluetooth LE scanning works again")
            self.scan_error = None

    def link_ended(self, address: str, *, remote_key: bytes | None, handshaken: bool,
                   error: bool, reason: str) -> None:
        """How a link we dialed ended: decides whether and when to dial that address again."""
        if DUPLICATE_REASON in reason and remote_key is not None:
            _remember(self._duplicate_of, address, remote_key)
        elif error or not handshaken:
            self._failed(address)

    async def stop(self) -> None:
        self._stopping = True
        for link in list(self.links.values()):
            link.close()
        for link in list(self.links.values()):
            if link.finished is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(link.finished), TEARDOWN_TIMEOUT)
