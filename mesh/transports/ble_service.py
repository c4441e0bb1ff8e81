"""Bluetooth LE for a running node: both roles at once, or what is possible, said once.

``start_ble`` is what ``pigeon relay`` and ``pigeon chat`` call unless ``--no-ble``. Every
node is a central (bleak: scan, connect) and, where the OS allows it, a peripheral
(advertise the service UUID, serve the GATT layout). What each platform gives:

* Linux: BlueZ over D-Bus. ``probe_bluez`` finds a powered adapter; the peripheral is
  ``BluezPeripheral`` (dbus-fast). No adapter, no BlueZ, no system bus: BLE is off and the
  node says so once, with the reason, then looks again every ``REPROBE_S``. A peripheral
  BlueZ refuses (no advertising slots, policy): the node runs as a central only and says
  so once.
* macOS and Windows: bleak's central only (no peripheral implementation yet); said once.

One link per pair: both nodes may see each other and both may dial. The central skips
addresses that are already linked to us as a central (cheap, works when the OS uses one
address for both roles), and the node's duplicate-link rule closes the same one of two
links on both sides after the handshake (deterministic: the link whose initiator has the
larger link key goes); the central then leaves that address alone while the other link
lives. Central and peripheral links share one cap (``max_links``, default 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mesh.transports.ble import BleCentral, BlePeripheralServer, Peripheral

if TYPE_CHECKING:
    from mesh.node import Node

log = logging.getLogger("pigeon.ble")

#: Concurrent BLE links, both roles together (laptop controllers manage 2-8; see docs/ble.md).
DEFAULT_MAX_LINKS = 6
#: With BLE off for want of an adapter, how often to look again (one D-Bus call).
REPROBE_S = 30.0

Probe = Callable[[], Awaitable[tuple[str | None, str]]]
PeripheralFactory = Callable[[str], Peripheral]


def peer_address(peer: str) -> str:
    """The device address inside a peripheral's peer name, in bleak's spelling.

    BlueZ names a central by its D-Bus object path (``/org/bluez/hci0/dev_AA_BB_..``);
    bumble by ``AA:BB:..[/P]#handle``. The central compares it with bleak's ``AA:BB:..``.
    """
    if "/dev_" in peer:
        peer = peer.rsplit("/dev_", 1)[1].split("/", 1)[0].replace("_", ":")
    return peer.split("#", 1)[0].split("/", 1)[0].upper()


class BleService:
    """The BLE roles started for one node; ``stop`` ends them (the node stops after)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.central: BleCentral | None = None
        self.server: BlePeripheralServer | None = None
        self.summary = ""
        self._run: asyncio.Task[None] | None = None

    def status(self) -> str:
        """For ``pigeon status``: the roles, and a scan failure while it lasts."""
        if self.central is not None and self.central.scan_error is not None:
            return f"{self.summary}; scanning fails: {self.central.scan_error}"
        return self.summary

    def link_count(self) -> int:
        central = sum(1 for link in (self.central.links.values() if self.central else ())
                      if not link.closed)
        served = sum(1 for link in (self.server.links.values() if self.server else ())
                     if not link.closed)
        return central + served

    def linked_as_peripheral(self, address: str) -> bool:
        if self.server is None:
            return False
        wanted = peer_address(address)
        return any(peer_address(peer) == wanted and not link.closed
                   for peer, link in self.server.links.items())

    async def stop(self) -> None:
        if self.central is None and self._run is not None:  # still waiting for an adapter
            self._run.cancel()
            with contextlib.suppress(BaseException):
                await self._run
        if self.central is not None:
            await self.central.stop()
            # The loop ends after its current scan; cancelling an OS scan mid-command is
            # the fallback only (it can leave a stack's scan state behind).
            run = self._run
            if run is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(run), self.central.scan_timeout + 2)
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.stop()


async def _default_probe() -> tuple[str | None, str]:
    from mesh.transports.bluez import probe_bluez

    return await probe_bluez()


def _default_peripheral(adapter: str) -> Peripheral:
    from mesh.transports.bluez import BluezPeripheral

    return BluezPeripheral(adapter)


async def _probe_once(probe: Probe) -> tuple[str | None, str]:
    try:
        return await probe()
    except Exception as exc:  # a probe must not take the node down
        return None, f"Bluetooth probe failed: {exc}"


async def start_ble(node: Node, *, max_links: int = DEFAULT_MAX_LINKS,
                    probe: Probe | None = None,
                    peripheral_factory: PeripheralFactory | None = None,
                    platform: str = sys.platform, reprobe_s: float = REPROBE_S,
                    **central_options: Any) -> BleService | None:
    """Start both BLE roles for a started node, or wait for an adapter.

    With no usable adapter (no BlueZ, none powered on) BLE is off, said once with why; the
    service then asks again every ``reprobe_s`` seconds (quietly) and starts the roles once
    an adapter appears, so a relay left running for days picks up a dongle or a switch
    flipped on. ``reprobe_s <= 0``: no waiting, None is returned instead.

    ``probe``, ``peripheral_factory`` and ``central_options`` (e.g. bleak ``scanner_backend``
    / ``client_backend``) are for tests and other platforms; the defaults use BlueZ on Linux.
    """
    service = BleService(node)

    async def start_roles(adapter: str | None) -> None:
        await _start_roles(service, adapter, max_links=max_links, platform=platform,
                           peripheral_factory=peripheral_factory, **central_options)

    if not (platform.startswith("linux") or probe is not None):
        await start_roles(None)
        return service
    probe = probe or _default_probe
    adapter, reason = await _probe_once(probe)
    if adapter is not None:
        await start_roles(adapter)
        return service
    log.warning("Bluetooth LE off: %s. LAN and --peer links still work.", reason)
    if reprobe_s <= 0:
        node.set_transport_status("ble", f"off: {reason}")
        return None
    service.summary = f"off: {reason}"
    node.set_transport_status("ble", service.status)

    async def wait_for_adapter() -> None:
        nonlocal reason
        while True:
            await asyncio.sleep(reprobe_s)
            found, why = await _probe_once(probe)
            if found is not None:
                log.warning("Bluetooth LE: an adapter is available now (%s)", found)
                await start_roles(found)
                return
            if why != reason:
                reason = why
                log.info("Bluetooth LE still off: %s", why)
                service.summary = f"off: {why}"

    service._run = asyncio.ensure_future(wait_for_adapter())
    return service


async def _start_roles(service: BleService, adapter: str | None, *, max_links: int,
                       platform: str, peripheral_factory: PeripheralFactory | None,
                       **central_options: Any) -> None:
    """Start the peripheral (where there is one) and the central's loop on ``service``."""
    node = service.node
    server: BlePeripheralServer | None = None
    if adapter is not None and (peripheral_factory is not None or platform.startswith("linux")):
        try:
            peripheral = (peripheral_factory or _default_peripheral)(adapter)
            server = BlePeripheralServer(node, peripheral, max_links=max_links,
                                         total_links=service.link_count)
            await server.start()
        except Exception as exc:
            server = None
            roles = "central only"
            why = f"the peripheral role is unavailable ({exc})"
        else:
            roles = "central and peripheral"
            why = ""
    else:
        roles = "central only"
        why = f"no peripheral role on {platform} in this version"
    if why:
        log.warning("Bluetooth LE: %s; this node finds others but they cannot find it over "
                    "BLE", why)
    central = BleCentral(node, max_links=max_links, skip=service.linked_as_peripheral,
                         total_links=service.link_count, **central_options)
    service.central, service.server = central, server
    service.summary = f"on: {roles}" + (f" on {adapter}" if adapter else "") + (
        f" ({why})" if why else "")
    node.set_transport_status("ble", service.status)
    log.info("Bluetooth LE %s", service.summary)
    service._run = asyncio.ensure_future(central.run())
