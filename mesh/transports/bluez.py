"""The BLE peripheral role on Linux: Pigeon's GATT service and advertisement through BlueZ.

bluetoothd owns the radio. An application exports objects on the system bus and asks
BlueZ to serve them (``GattManager1.RegisterApplication``) and to advertise them
(``LEAdvertisingManager1.RegisterAdvertisement``). ``BluezPeripheral`` does that with
``dbus-fast`` (already a bleak dependency on Linux) and implements the small
``mesh.transports.ble.Peripheral`` protocol. Objects, on its own bus connection::

    /org/pigeon/app                  ObjectManager root (dbus-fast answers GetManagedObjects)
    /org/pigeon/app/service0         GattService1         SERVICE_UUID, primary
    /org/pigeon/app/service0/rx      GattCharacteristic1  RX_UUID, ["write-without-response"]
    /org/pigeon/app/service0/tx      GattCharacteristic1  TX_UUID, ["notify"]
    /org/pigeon/advertisement        LEAdvertisement1     "peripheral", ServiceUUIDs, Discoverable

What the caller must know:

* A central is named by its BlueZ ``Device1`` object path (the ``device`` option BlueZ
  passes to ``WriteValue``). Only centrals that wrote to us are tracked, at most
  ``max_peers``; their state goes when BlueZ reports them disconnected or removed.
* BlueZ sends each TX notification to *every* subscribed central (and truncates it to each
  one's ATT_MTU - 3). That is harmless: every fragment names the receiver's link id
  (``ble_framing``), so the others ignore it.
* ``max_value_size`` is ``min(mtu - 3, 500)`` with the ATT MTU from the central's last
  write (BlueZ >= 5.62 passes ``mtu``), else 20. Never above 500: see docs/ble.md.
* The advertisement carries the service UUID and nothing else: no name, appearance,
  manufacturer or service data, no TX power; ``Discoverable`` so phones list it.
* Everything arriving from the bus is untrusted: malformed writes and signals are logged
  (at most a few lines) and ignored; they never reach the node.

``probe_bluez`` says, without ever hanging or raising, whether this machine can be a
peripheral at all and why not. dbus-fast is imported guarded, so this module imports on
macOS and Windows too (where the probe simply answers "unavailable").
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import logging
import re
from pathlib import Path
from typing import Annotated, Any

from mesh.errors import LocalProtocolError
from mesh.transports.ble import RX_UUID, SERVICE_UUID, TX_UUID, PeripheralHandler
from mesh.transports.ble_framing import MAX_CHUNK, MAX_FRAGMENT, MIN_CHUNK

try:
    from dbus_fast import BusType, DBusError, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus
    from dbus_fast.annotations import (
        DBusBool,
        DBusBytes,
        DBusDict,
        DBusObjectPath,
        DBusSignature,
        DBusStr,
    )
    from dbus_fast.constants import PropertyAccess
    from dbus_fast.service import ServiceInterface, dbus_property, method
except ImportError:  # not Linux: dbus-fast is a Linux-only dependency
    HAVE_DBUS_FAST = False
else:
    HAVE_DBUS_FAST = True

log = logging.getLogger("pigeon.ble")

BLUEZ = "org.bluez"
ADAPTER_IFACE = "org.bluez.Adapter1"
DEVICE_IFACE = "org.bluez.Device1"
GATT_MANAGER_IFACE = "org.bluez.GattManager1"
ADV_MANAGER_IFACE = "org.bluez.LEAdvertisingManager1"
GATT_SERVICE_IFACE = "org.bluez.GattService1"
GATT_CHRC_IFACE = "org.bluez.GattCharacteristic1"
ADVERTISEMENT_IFACE = "org.bluez.LEAdvertisement1"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

APP_PATH = "/org/pigeon/app"
SERVICE_PATH = APP_PATH + "/service0"
RX_PATH = SERVICE_PATH + "/rx"
TX_PATH = SERVICE_PATH + "/tx"
ADVERTISEMENT_PATH = "/org/pigeon/advertisement"

MIN_MTU, MAX_MTU = 23, 517
_OBJECT_PATH = re.compile(r"^/([A-Za-z0-9_]+(/[A-Za-z0-9_]+)*)?$")
_MAX_PATH = 255
#: Distinct "malformed input" log lines per peripheral; later ones go to debug.
_MAX_WARNINGS = 8
#: Where bluetoothd reads its settings, LE privacy among them.
BLUEZ_MAIN_CONF = Path("/etc/bluetooth/main.conf")


class BluezUnavailable(RuntimeError):
    """The peripheral role cannot run here; ``str(exc)`` is a reason fit for the user."""


# ---- small D-Bus helpers ------------------------------------------------------------------


def _bus_call(member: str, *, destination: str, path: str, interface: str,
              signature: str = "", body: list[Any] | None = None) -> Message:
    return Message(destination=destination, path=path, interface=interface, member=member,
                   signature=signature, body=body or [])


async def _call(bus: MessageBus, msg: Message, timeout: float) -> list[Any]:
    """One method call, bounded by ``timeout``; an error reply raises ``DBusError``."""
    reply = await asyncio.wait_for(bus.call(msg), timeout)
    if reply.message_type is MessageType.ERROR:
        detail = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", detail)
    return list(reply.body)


def _daemon_call(member: str, signature: str = "", body: list[Any] | None = None) -> Message:
    return _bus_call(member, destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                     interface="org.freedesktop.DBus", signature=signature, body=body)


async def _connect(bus_address: str | None, timeout: float) -> MessageBus:
    bus = MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM)
    try:
        return await asyncio.wait_for(bus.connect(), timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            bus.disconnect()
        raise


def _variant_value(options: dict[str, Any], key: str, signature: str) -> Any:
    """``options[key]``'s value if it is a Variant of ``signature``; None if absent.
    Raises ValueError for a present value of the wrong type."""
    variant = options.get(key)
    if variant is None:
        return None
    if not isinstance(variant, Variant) or variant.signature != signature:
        raise ValueError(f"option {key!r} is not of type {signature!r}")
    return variant.value


def _is_object_path(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= _MAX_PATH and bool(_OBJECT_PATH.match(value))


async def _pick_adapter(bus: MessageBus, timeout: float) -> tuple[str | None, str]:
    """(adapter path, reason) from BlueZ's objects on ``bus``: the first powered adapter
    (by path) that offers both GATT and advertising managers."""
    (has_owner,) = await _call(bus, _daemon_call("NameHasOwner", "s", [BLUEZ]), timeout)
    if not has_owner:
        return None, ("BlueZ is not running (no org.bluez on the system bus); "
                      "start bluetoothd to use the BLE peripheral")
    (objects,) = await _call(bus, _bus_call("GetManagedObjects", destination=BLUEZ, path="/",
                                            interface=OBJECT_MANAGER_IFACE), timeout)
    if not isinstance(objects, dict):
        return None, "BlueZ answered GetManagedObjects with nonsense"
    adapters = sorted(path for path, ifaces in objects.items()
                      if isinstance(ifaces, dict) and ADAPTER_IFACE in ifaces)
    if not adapters:
        return None, "no Bluetooth adapter (BlueZ runs but reports no Adapter1)"
    reasons: list[str] = []
    for path in adapters:
        ifaces = objects[path]
        props = ifaces.get(ADAPTER_IFACE)
        powered = props.get("Powered") if isinstance(props, dict) else None
        name = path.rsplit("/", 1)[-1]
        if not (isinstance(powered, Variant) and powered.value is True):
            reasons.append(f"adapter {name} is powered off (try `bluetoothctl power on`)")
        elif GATT_MANAGER_IFACE not in ifaces or ADV_MANAGER_IFACE not in ifaces:
            missing = [i.rsplit(".", 1)[-1] for i in (GATT_MANAGER_IFACE, ADV_MANAGER_IFACE)
                       if i not in ifaces]
            reasons.append(f"adapter {name} has no {' or '.join(missing)} "
                           "(BlueZ too old, or the adapter cannot do LE peripheral)")
        else:
            return path, f"BlueZ adapter {name} can be a BLE peripheral"
    return None, "; ".join(reasons)


async def probe_bluez(timeout: float = 3.0, *, bus_address: str | None = None,
                      ) -> tuple[str | None, str]:
    """Can this machine run ``BluezPeripheral``? Returns (adapter object path, reason);
    the path is None when it cannot, and the reason then says why in words for the user.

    Never raises and never takes longer than ``timeout`` (plus a moment to close the
    connection). ``bus_address`` None means the system bus.
    """
    if not HAVE_DBUS_FAST:
        return None, "the BLE peripheral needs BlueZ on Linux (dbus-fast is not installed)"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        bus = await _connect(bus_address, timeout)
    except Exception as exc:
        return None, f"no D-Bus system bus ({type(exc).__name__}: {exc})"
    try:
        return await asyncio.wait_for(_pick_adapter(bus, timeout),
                                      max(0.01, deadline - loop.time()))
    except TimeoutError:
        return None, f"BlueZ did not answer within {timeout:g} s"
    except DBusError as exc:
        return None, f"BlueZ refused to list its objects ({exc.type}: {exc.text})"
    except Exception as exc:
        return None, f"D-Bus failed while asking BlueZ ({type(exc).__name__}: {exc})"
    finally:
        bus.disconnect()


def privacy_warning(main_conf: Path = BLUEZ_MAIN_CONF) -> str | None:
    """A warning for the user when BlueZ's LE privacy looks off, else None.

    Without ``Privacy`` in ``[General]`` bluetoothd advertises with the adapter's fixed
    public address, which identifies the device over time whatever the advertisement
    says. D-Bus does not tell: ``Adapter1.AddressType`` is the *identity* address type
    ("public" on most laptops even with privacy on), so this reads bluetoothd's
    configuration file instead. Best effort: a file it cannot read counts as "off".
    """
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    try:
        parser.read_string(main_conf.read_text(errors="replace"))
        privacy = parser.get("General", "Privacy", fallback="off").strip().lower()
    except (OSError, configparser.Error):
        privacy = "off"
    if privacy not in ("", "off"):
        return None
    return (f"BlueZ LE privacy is off ({main_conf}: no 'Privacy = device' in [General]): "
            "advertisements carry this adapter's fixed address, which identifies the device "
            "over time; set it and restart bluetoothd")


# ---- the peripheral ---------------------------------------------------------------------------


class BluezPeripheral:
    """``Peripheral`` on BlueZ's D-Bus GATT and advertising API (see the module docstring).

    ``adapter`` is an adapter object path such as ``/org/bluez/hci0`` (None: the one
    ``probe_bluez`` would pick); ``bus_address`` None means the system bus. ``start``
    raises ``BluezUnavailable`` with a reason for the user when BlueZ refuses, and logs
    ``privacy_warning(main_conf)`` once if there is one (``main_conf`` None: no check).
    """

    def __init__(self, adapter: str | None = None, *, bus_address: str | None = None,
                 call_timeout: float = 10.0, max_peers: int = 16,
                 main_conf: Path | None = BLUEZ_MAIN_CONF) -> None:
        self.adapter = adapter
        self.main_conf = main_conf
        self.bus_address = bus_address
        self.call_timeout = call_timeout
        self.max_peers = max_peers
        self.advertising = False
        self.notifying = False
        self._bus: MessageBus | None = None
        self._handler: PeripheralHandler | None = None
        self._bluez_owner: str | None = None
        self._app_registered = False
        self._objects: list[tuple[str, Any]] = []
        self._tx: Any = None
        #: Centrals that wrote to us: Device1 path -> ATT MTU (0 while unknown).
        self._mtu: dict[str, int] = {}
        self._warnings = 0
        self.malformed = 0  # ignored inputs, for diagnostics and tests

    # ---- Peripheral ----------------------------------------------------------------------

    async def start(self, handler: PeripheralHandler) -> None:
        """Register the application and the advertisement. Any failure raises
        ``BluezUnavailable`` (its text is for the user) after undoing what was done."""
        if not HAVE_DBUS_FAST:
            raise BluezUnavailable("the BLE peripheral needs BlueZ on Linux "
                                   "(dbus-fast is not installed)")
        if self._bus is not None:
            raise LocalProtocolError("BluezPeripheral already started")
        self._handler = handler
        try:
            await self._start()
        except BaseException as exc:
            await self._teardown()
            if isinstance(exc, Exception) and not isinstance(exc, BluezUnavailable):
                raise BluezUnavailable(_describe(exc)) from exc
            raise

    async def _start(self) -> None:
        timeout = self.call_timeout
        try:
            bus = self._bus = await _connect(self.bus_address, timeout)
        except Exception as exc:
            raise BluezUnavailable(f"no D-Bus system bus ({type(exc).__name__}: {exc})") from exc
        if self.adapter is None:
            self.adapter, reason = await _pick_adapter(bus, timeout)
            if self.adapter is None:
                raise BluezUnavailable(reason)
        (self._bluez_owner,) = await _call(bus, _daemon_call("GetNameOwner", "s", [BLUEZ]),
                                           timeout)
        bus.add_message_handler(self._on_message)
        for rule in (
            f"type='signal',sender='{BLUEZ}',interface='{PROPERTIES_IFACE}',"
            f"member='PropertiesChanged',arg0='{DEVICE_IFACE}'",
            f"type='signal',sender='{BLUEZ}',interface='{OBJECT_MANAGER_IFACE}',"
            "member='InterfacesRemoved'",
            "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
            f"member='NameOwnerChanged',arg0='{BLUEZ}'",
        ):
            await _call(bus, _daemon_call("AddMatch", "s", [rule]), timeout)
        self._tx = _TxCharacteristic(self)
        self._objects = [
            (SERVICE_PATH, _GattService()),
            (RX_PATH, _RxCharacteristic(self)),
            (TX_PATH, self._tx),
            (ADVERTISEMENT_PATH, _Advertisement(self)),
        ]
        for path, obj in self._objects:
            bus.export(path, obj)
        await _call(bus, _bus_call("RegisterApplication", destination=BLUEZ, path=self.adapter,
                                   interface=GATT_MANAGER_IFACE, signature="oa{sv}",
                                   body=[APP_PATH, {}]), timeout)
        self._app_registered = True
        await _call(bus, _bus_call("RegisterAdvertisement", destination=BLUEZ,
                                   path=self.adapter, interface=ADV_MANAGER_IFACE,
                                   signature="oa{sv}", body=[ADVERTISEMENT_PATH, {}]), timeout)
        self.advertising = True
        log.info("BLE peripheral: serving and advertising Pigeon's service on %s",
                 self.adapter)
        warning = None if self.main_conf is None else privacy_warning(self.main_conf)
        if warning is not None:
            log.warning("BLE peripheral: %s", warning)

    async def stop(self) -> None:
        """Disconnect our centrals, withdraw the advertisement and the application, close the
        bus. Every step bounded; errors are logged, never raised."""
        if self._bus is None:
            return
        peers = list(self._mtu)
        if peers:
            await asyncio.gather(*(self.disconnect(p) for p in peers), return_exceptions=True)
        await self._teardown()

    async def _teardown(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        timeout = min(self.call_timeout, 5.0)
        if self.advertising and self.adapter is not None:
            await self._quietly(bus, _bus_call(
                "UnregisterAdvertisement", destination=BLUEZ, path=self.adapter,
                interface=ADV_MANAGER_IFACE, signature="o", body=[ADVERTISEMENT_PATH]), timeout)
        if self._app_registered and self.adapter is not None:
            await self._quietly(bus, _bus_call(
                "UnregisterApplication", destination=BLUEZ, path=self.adapter,
                interface=GATT_MANAGER_IFACE, signature="o", body=[APP_PATH]), timeout)
        self.advertising = self._app_registered = self.notifying = False
        for path, obj in self._objects:
            with contextlib.suppress(Exception):
                bus.unexport(path, obj)
        self._objects = []
        bus.remove_message_handler(self._on_message)
        bus.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.wait_for_disconnect(), timeout)  # type: ignore[no-untyped-call]
        self._mtu.clear()

    @staticmethod
    async def _quietly(bus: MessageBus, msg: Message, timeout: float) -> None:
        try:
            await _call(bus, msg, timeout)
        except Exception as exc:
            log.info("BLE peripheral: %s failed: %s", msg.member, _describe(exc))

    async def notify(self, peer: str, value: bytes) -> None:
        """Set TX's value and emit PropertiesChanged: BlueZ notifies every subscribed
        central. Returns once the signal is written to the bus."""
        bus = self._bus
        if bus is None or peer not in self._mtu:
            raise ConnectionError(f"{peer} is not connected")
        if len(value) > self.max_value_size(peer):
            raise ValueError(f"{len(value)}-byte value exceeds {self.max_value_size(peer)}")
        self._tx.value = bytes(value)
        msg = Message.new_signal(TX_PATH, PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as",
                                 [GATT_CHRC_IFACE, {"Value": Variant("ay", bytes(value))}, []])
        await asyncio.wait_for(bus.send(msg), self.call_timeout)

    def max_value_size(self, peer: str) -> int:
        mtu = self._mtu.get(peer, 0)
        return min(mtu - 3, MAX_CHUNK) if mtu else MIN_CHUNK

    async def disconnect(self, peer: str) -> None:
        """``Device1.Disconnect`` on a central that wrote to us (others are not ours to
        drop), then forget it."""
        bus = self._bus
        if peer not in self._mtu:
            return
        if bus is not None:
            await self._quietly(bus, _bus_call("Disconnect", destination=BLUEZ, path=peer,
                                               interface=DEVICE_IFACE), self.call_timeout)
        self._forget(peer, "disconnected locally")

    @property
    def peers(self) -> dict[str, int]:
        """Tracked centrals and their ATT MTU (0: unknown). A copy."""
        return dict(self._mtu)

    # ---- from BlueZ ----------------------------------------------------------------------

    def _on_write(self, value: Any, options: Any) -> None:
        """RX ``WriteValue``: validate, track the central and its MTU, hand the value on."""
        try:
            peer, mtu = self._parse_write(value, options)
        except ValueError as exc:
            self._malformed(f"ignored an RX write: {exc}")
            return
        if peer not in self._mtu and len(self._mtu) >= self.max_peers:
            self._malformed(f"ignored a write from {peer}: already {self.max_peers} centrals")
            return
        if mtu is not None:
            self._mtu[peer] = mtu
        else:
            self._mtu.setdefault(peer, 0)
        if self._handler is not None:
            try:
                self._handler.on_write(peer, bytes(value))
            except Exception:
                log.exception("BLE peripheral: handling a write from %s failed", peer)

    def _parse_write(self, value: Any, options: Any) -> tuple[str, int | None]:
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError("value is not a byte array")
        if len(value) > MAX_FRAGMENT:  # no ATT value is longer: not from BlueZ
            raise ValueError(f"{len(value)}-byte value exceeds an attribute's 512")
        if not isinstance(options, dict):
            raise ValueError("options are not a dictionary")
        peer = _variant_value(options, "device", "o")
        if peer is None:
            raise ValueError("no 'device' option (BlueZ too old?)")
        if not _is_object_path(peer) or self.adapter is None \
                or not peer.startswith(self.adapter + "/"):
            raise ValueError("'device' is not a device of our adapter")
        offset = _variant_value(options, "offset", "q")
        if offset:
            raise ValueError("offset writes are not part of Pigeon's protocol")
        mtu = _variant_value(options, "mtu", "q")
        return peer, None if mtu is None else max(MIN_MTU, min(int(mtu), MAX_MTU))

    def _on_message(self, msg: Message) -> bool:
        """Every message on our connection passes here first; we only watch signals."""
        if msg.message_type is MessageType.SIGNAL:
            try:
                self._on_signal(msg)
            except Exception as exc:
                self._malformed(f"ignored a {msg.member} signal: {type(exc).__name__}: {exc}")
        return False

    def _on_signal(self, msg: Message) -> None:
        body = msg.body
        if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
            if len(body) == 3 and body[0] == BLUEZ and body[2] != self._bluez_owner:
                log.warning("BLE peripheral: BlueZ went away; no longer serving or advertising")
                self._bluez_owner = None
                self.advertising = self._app_registered = self.notifying = False
                for peer in list(self._mtu):
                    self._forget(peer, "BlueZ stopped")
            return
        if self._bluez_owner is None or msg.sender != self._bluez_owner:
            return
        if msg.member == "PropertiesChanged" and msg.interface == PROPERTIES_IFACE:
            if msg.path not in self._mtu or len(body) < 2 or body[0] != DEVICE_IFACE:
                return
            changed = body[1]
            if not isinstance(changed, dict) or "Connected" not in changed:
                return
            connected = _variant_value(changed, "Connected", "b")
            if connected is False:
                self._forget(msg.path, "disconnected")
        elif (msg.member == "InterfacesRemoved" and msg.interface == OBJECT_MANAGER_IFACE
              and len(body) == 2 and body[0] in self._mtu and isinstance(body[1], list)
              and DEVICE_IFACE in body[1]):
            self._forget(body[0], "removed")

    def _on_advertisement_released(self) -> None:
        self.advertising = False
        log.warning("BLE peripheral: BlueZ released our advertisement (adapter off or "
                    "reset?); centrals can no longer find this node")

    def _forget(self, peer: str, why: str) -> None:
        if self._mtu.pop(peer, None) is None:
            return
        log.debug("BLE peripheral: central %s %s", peer, why)
        if self._handler is not None:
            try:
                self._handler.on_disconnect(peer)
            except Exception:
                log.exception("BLE peripheral: handling the loss of %s failed", peer)

    def _malformed(self, what: str) -> None:
        self.malformed += 1
        self._warnings += 1
        if self._warnings <= _MAX_WARNINGS:
            log.warning("BLE peripheral: %s", what)
        else:
            log.debug("BLE peripheral: %s", what)


def _describe(exc: BaseException) -> str:
    if HAVE_DBUS_FAST and isinstance(exc, DBusError):
        if exc.type in ("org.freedesktop.DBus.Error.AccessDenied", "org.bluez.Error.NotPermitted"):
            return (f"BlueZ refused: {exc.text or exc.type} (run as root or in the "
                    "'bluetooth' group, or allow it in the D-Bus/polkit policy)")
        return f"BlueZ refused: {exc.type}: {exc.text}"
    if isinstance(exc, TimeoutError):
        return "BlueZ did not answer in time"
    return f"{type(exc).__name__}: {exc}"


# ---- the exported D-Bus objects -------------------------------------------------------------

if HAVE_DBUS_FAST:
    DBusStrings = Annotated[list[str], DBusSignature("as")]
    #: A method that returns nothing. Plain ``-> None`` breaks dbus-fast's signature parsing
    #: under ``from __future__ import annotations`` (it reads the string "None" as a value).
    DBusNoReply = Annotated[None, DBusSignature("")]

    class _GattService(ServiceInterface):
        """``GattService1``: Pigeon's primary service."""

        def __init__(self) -> None:
            super().__init__(GATT_SERVICE_IFACE)

        @dbus_property(access=PropertyAccess.READ)
        def UUID(self) -> DBusStr:
            return SERVICE_UUID

        @dbus_property(access=PropertyAccess.READ)
        def Primary(self) -> DBusBool:
            return True

    class _RxCharacteristic(ServiceInterface):
        """``GattCharacteristic1`` RX: centrals write fragments without response."""

        def __init__(self, owner: BluezPeripheral) -> None:
            super().__init__(GATT_CHRC_IFACE)
            self._owner = owner

        @dbus_property(access=PropertyAccess.READ)
        def UUID(self) -> DBusStr:
            return RX_UUID

        @dbus_property(access=PropertyAccess.READ)
        def Service(self) -> DBusObjectPath:
            return SERVICE_PATH

        @dbus_property(access=PropertyAccess.READ)
        def Flags(self) -> DBusStrings:
            return ["write-without-response"]

        @method()
        def WriteValue(self, value: DBusBytes, options: DBusDict) -> DBusNoReply:
            self._owner._on_write(value, options)

    class _TxCharacteristic(ServiceInterface):
        """``GattCharacteristic1`` TX: notifications (a PropertiesChanged on Value)."""

        def __init__(self, owner: BluezPeripheral) -> None:
            super().__init__(GATT_CHRC_IFACE)
            self._owner = owner
            self.value = b""

        @dbus_property(access=PropertyAccess.READ)
        def UUID(self) -> DBusStr:
            return TX_UUID

        @dbus_property(access=PropertyAccess.READ)
        def Service(self) -> DBusObjectPath:
            return SERVICE_PATH

        @dbus_property(access=PropertyAccess.READ)
        def Flags(self) -> DBusStrings:
            return ["notify"]

        @dbus_property(access=PropertyAccess.READ)
        def Value(self) -> DBusBytes:
            return self.value

        @dbus_property(access=PropertyAccess.READ)
        def Notifying(self) -> DBusBool:
            return self._owner.notifying

        @method()
        def StartNotify(self) -> DBusNoReply:
            self._owner.notifying = True

        @method()
        def StopNotify(self) -> DBusNoReply:
            # BlueZ calls this when the last subscriber left; others may subscribe again.
            self._owner.notifying = False

    class _Advertisement(ServiceInterface):
        """``LEAdvertisement1``: the service UUID and nothing that identifies the device."""

        def __init__(self, owner: BluezPeripheral) -> None:
            super().__init__(ADVERTISEMENT_IFACE)
            self._owner = owner

        @dbus_property(access=PropertyAccess.READ)
        def Type(self) -> DBusStr:
            return "peripheral"

        @dbus_property(access=PropertyAccess.READ)
        def ServiceUUIDs(self) -> DBusStrings:
            return [SERVICE_UUID]

        @dbus_property(access=PropertyAccess.READ)
        def Discoverable(self) -> DBusBool:
            return True

        @method()
        def Release(self) -> DBusNoReply:
            self._owner._on_advertisement_released()
