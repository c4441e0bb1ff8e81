"""Bluetooth LE for a running node: both roles at once, or what is possible, said once.

``start_ble`` is what ``pigeon relay`` and ``pigeon chat`` call unless ``--no-ble``. Every
node is a central (bleak: scan, connect) and, where the OS allows it, a peripheral
(advertise the service UUID, serve the GATT layout). What each platform gives:

* Linux: BlueZ over D-Bus. ``probe_bluez`` finds a powered adapter; the peripheral is
  ``BluezPeripheral`` (dbus-fast). No adapter, no BlueZ, no system bus: BLE is off and the
  node says so once, with the reason. A peripheral BlueZ refuses (no advertising slots,
  policy): the node runs as a central only and says so once.
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

    def __init__(self, node: Node, central: BleCentral | None,
                 server: BlePeripheralServer | None, summary: str) -> None:
        self.node = node
        self.central = central
        self.server = server
        self.summary = summary
        self._run: Any = None

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
        if self.central is not None:
            await self.central.stop()
        if self._run is not None:
            # The loop ends after its current scan; cancelling an OS scan mid-command is the
            # fallback only (it can leave a stack's scan state behind).
            limit = (self.central.scan_timeout if self.central else 0) + 2
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._run), limit)
            self._run.cancel()
            with contextlib.suppress(BaseException):
                await self._run
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.stop()


async def _default_probe() -> tuple[str | None, str]:
    from mesh.transports.bluez import probe_bluez

    return await probe_bluez()


def _default_peripheral(adapter: str) -> Peripheral:
    from mesh.transports.bluez import BluezPeripheral

    return BluezPeripheral(adapter)


async def start_ble(node: Node, *, max_links: int = DEFAULT_MAX_LINKS,
                    probe: Probe | None = None,
                    peripheral_factory: PeripheralFactory | None = None,
                    platform: str = sys.platform, **central_options: Any) -> BleService | None:
    """Start both BLE roles for a started node; None (said once, with why) if BLE is off.

    ``probe``, ``peripheral_factory`` and ``central_options`` (e.g. bleak ``scanner_backend``
    / ``client_backend``) are for tests and other platforms; the defaults use BlueZ on Linux.
    """
    adapter: str | None = None
    if platform.startswith("linux") or probe is not None:
        try:
            adapter, reason = await (probe or _default_probe)()
        except Exception as exc:  # a probe must not take the node down
            adapter, reason = None, f"Bluetooth probe failed: {exc}"
        if adapter is None:
            summary = f"off: {reason}"
            log.warning("Bluetooth LE off: %s. LAN and --peer links still work.", reason)
            node.set_transport_status("ble", summary)
            return None

    server: BlePeripheralServer | None = None
    service = BleService(node, None, None, "")
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
    return service
