"""``BluezPeripheral`` and ``probe_bluez`` against a fake BlueZ on a private D-Bus daemon.

No Bluetooth here: each test starts its own ``dbus-daemon`` (never the system bus) and a
``FakeBluez`` that owns ``org.bluez`` on it. The fake does what bluetoothd does with an
application, through the bus: RegisterApplication reads the app back with
GetManagedObjects and checks the layout, RegisterAdvertisement reads the advertisement's
properties, a fake central (``FakeCentral``, a Device1 object) writes through the app's RX
``WriteValue`` with ``{device, mtu}`` options, subscribes with StartNotify, receives every
TX PropertiesChanged (as every subscribed central does under BlueZ, truncated to its
ATT_MTU - 3) and disconnects by flipping ``Connected``. The real-BlueZ proof is the VM
tier's (tests/vm/).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusStr
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

from mesh.transports.ble import RX_UUID, SERVICE_UUID, TX_UUID, BleLink, BlePeripheralServer
from mesh.transports.bluez import (
    ADV_MANAGER_IFACE,
    ADVERTISEMENT_IFACE,
    DEVICE_IFACE,
    GATT_CHRC_IFACE,
    GATT_MANAGER_IFACE,
    GATT_SERVICE_IFACE,
    OBJECT_MANAGER_IFACE,
    PROPERTIES_IFACE,
    BluezPeripheral,
    BluezUnavailable,
    privacy_warning,
    probe_bluez,
)
from tests.test_node import Clock, befriend, inbox_texts, make_node, wait_until

pytestmark = pytest.mark.timeout(60)

CALL_TIMEOUT = 5.0
CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


# ---- a private dbus-daemon ------------------------------------------------------------------


@pytest.fixture
def bus_address() -> Iterator[str]:
    """A dbus-daemon of this test's own on a socket in a fresh temporary directory."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        reason = "dbus-daemon is not installed (apt-get install dbus)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the BlueZ peripheral tests: {reason}")
        pytest.skip(reason)
    # A short directory: a unix socket path must fit in 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="pgdbus", dir="/tmp"))
    config = workdir / "bus.conf"
    config.write_text(CONFIG.format(socket=workdir / "bus"))
    proc = subprocess.Popen([daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if not line:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"dbus-daemon did not start: {err.decode(errors='replace')}")
        yield line
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


# ---- the fake BlueZ ------------------------------------------------------------------------


class FakeAdapter(ServiceInterface):
    def __init__(self, powered: bool) -> None:
        super().__init__("org.bluez.Adapter1")
        self.powered = powered

    @dbus_property(access=PropertyAccess.READ)
    def Powered(self) -> DBusBool:
        return self.powered

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return "00:11:22:33:44:55"


class Marker(ServiceInterface):
    """A manager interface that must be listed; FakeBluez handles its methods raw (it needs
    the caller's bus name to call the application back)."""


class FakeDevice1(ServiceInterface):
    def __init__(self, central: FakeCentral) -> None:
        super().__init__(DEVICE_IFACE)
        self.central = central

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> DBusBool:
        return self.central.connected

    @method()
    def Disconnect(self):  # type: ignore[no-untyped-def]  # "-> None" confuses dbus-fast
        self.central.bluez.calls.append(("Disconnect", self.central.path))
        self.central.lose()


class FakeCentral:
    """A remote central as BlueZ shows it to a peripheral application."""

    def __init__(self, bluez: FakeBluez, path: str, mtu: int, send_mtu: bool) -> None:
        self.bluez, self.path, self.mtu, self.send_mtu = bluez, path, mtu, send_mtu
        self.connected = True
        self.subscribed = False
        self.notifications: list[bytes] = []
        self.on_notify: Callable[[bytes], None] | None = None
        self.iface = FakeDevice1(self)

    def options(self) -> dict[str, Variant]:
        opts = {"device": Variant("o", self.path), "type": Variant("s", "command"),
                "link": Variant("s", "LE")}
        if self.send_mtu:
            opts["mtu"] = Variant("q", self.mtu)
        return opts

    async def write(self, value: bytes, options: dict[str, Variant] | None = None,
                    signature: str = "aya{sv}") -> Message:
        """Write without response to RX, as BlueZ forwards it (awaiting the reply keeps
        the writes in order and bounded)."""
        body: list[Any] = [value, self.options() if options is None else options]
        if signature != "aya{sv}":
            body = [value]
        return await self.bluez.call_app(self.bluez.rx_path, GATT_CHRC_IFACE, "WriteValue",
                                         signature, body)

    async def subscribe(self) -> None:
        reply = await self.bluez.call_app(self.bluez.tx_path, GATT_CHRC_IFACE, "StartNotify")
        assert reply.message_type is MessageType.METHOD_RETURN
        self.subscribed = True

    def notified(self, value: bytes) -> None:
        value = value[:min(self.mtu - 3, 512)]  # BlueZ clips to each central's ATT_MTU - 3
        self.notifications.append(value)
        if self.on_notify is not None:
            self.on_notify(value)

    def lose(self) -> None:
        """The radio link went down: BlueZ flips Connected."""
        if self.connected:
            self.connected = False
            self.subscribed = False
            self.iface.emit_properties_changed({"Connected": False})

    async def remove(self) -> None:
        """BlueZ forgot the device: InterfacesRemoved on the object manager."""
        self.bluez.bus.unexport(self.path, self.iface)
        await self.bluez.bus.send(Message.new_signal(
            "/", OBJECT_MANAGER_IFACE, "InterfacesRemoved", "oas", [self.path, [DEVICE_IFACE]]))


class FakeBluez:
    """org.bluez on a private bus, with the adapters given as (name, powered, managers)."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.calls: list[tuple[str, str]] = []
        self.app_owner: str | None = None
        self.layout: dict[str, dict[str, Any]] = {}
        self.advertisement: dict[str, Any] = {}
        self.rx_path = self.tx_path = ""
        self.centrals: dict[str, FakeCentral] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, address: str,
                    adapters: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
                        ("hci0", True, (GATT_MANAGER_IFACE, ADV_MANAGER_IFACE)),),
                    ) -> FakeBluez:
        bus = await MessageBus(bus_address=address).connect()
        self = cls(bus)
        for name, powered, managers in adapters:
            bus.export(f"/org/bluez/{name}", FakeAdapter(powered))
            for iface in managers:
                bus.export(f"/org/bluez/{name}", Marker(iface))
        bus.add_message_handler(self._on_message)
        await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="AddMatch",
                               signature="s", body=["type='signal',member='PropertiesChanged'"]))
        # A previous fake's connection may not be gone from the daemon yet: retry, bounded.
        for _ in range(200):
            reply = await bus.request_name("org.bluez", NameFlag.DO_NOT_QUEUE)
            if reply is RequestNameReply.PRIMARY_OWNER:
                return self
            await asyncio.sleep(0.01)
        raise AssertionError("could not own org.bluez on the private bus")

    def stop(self) -> None:
        self.bus.disconnect()

    def central(self, name: str, mtu: int = 23, send_mtu: bool = True) -> FakeCentral:
        path = f"/org/bluez/hci0/dev_{name}"
        central = self.centrals[path] = FakeCentral(self, path, mtu, send_mtu)
        self.bus.export(path, central.iface)
        return central

    async def call_app(self, path: str, interface: str, member: str, signature: str = "",
                       body: list[Any] | None = None) -> Message:
        assert self.app_owner is not None, "no application registered"
        return await asyncio.wait_for(self.bus.call(Message(
            destination=self.app_owner, path=path, interface=interface, member=member,
            signature=signature, body=body or [])), CALL_TIMEOUT)

    # ---- what bluetoothd does ------------------------------------------------------------

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL:
            self._on_signal(msg)
            return False
        if msg.message_type is not MessageType.METHOD_CALL or msg.interface not in (
                GATT_MANAGER_IFACE, ADV_MANAGER_IFACE):
            return False
        task = asyncio.ensure_future(self._manager_call(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _manager_call(self, msg: Message) -> None:
        assert msg.member is not None and msg.sender is not None
        self.calls.append((msg.member, msg.body[0]))
        try:
            if msg.member == "RegisterApplication":
                await self._read_application(msg.sender, msg.body[0])
            elif msg.member == "RegisterAdvertisement":
                await self._read_advertisement(msg.sender, msg.body[0])
        except AssertionError as exc:
            await self.bus.send(Message.new_error(msg, "org.bluez.Error.Failed", str(exc)))
            return
        await self.bus.send(Message.new_method_return(msg))

    async def _read_application(self, owner: str, root: str) -> None:
        reply = await asyncio.wait_for(self.bus.call(Message(
            destination=owner, path=root, interface=OBJECT_MANAGER_IFACE,
            member="GetManagedObjects")), CALL_TIMEOUT)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        objects = {path: {iface: {k: v.value for k, v in props.items()}
                          for iface, props in ifaces.items()}
                   for path, ifaces in reply.body[0].items()}
        services = [p for p, i in objects.items() if GATT_SERVICE_IFACE in i]
        assert len(services) == 1, f"expected one service, got {services}"
        chrcs = {i[GATT_CHRC_IFACE]["UUID"]: p for p, i in objects.items() if GATT_CHRC_IFACE in i}
        assert set(chrcs) == {RX_UUID, TX_UUID}, chrcs
        for path in chrcs.values():
            assert objects[path][GATT_CHRC_IFACE]["Service"] == services[0]
            assert path.startswith(root + "/")
        self.app_owner, self.layout = owner, objects
        self.rx_path, self.tx_path = chrcs[RX_UUID], chrcs[TX_UUID]

    async def _read_advertisement(self, owner: str, path: str) -> None:
        reply = await asyncio.wait_for(self.bus.call(Message(
            destination=owner, path=path, interface=PROPERTIES_IFACE, member="GetAll",
            signature="s", body=[ADVERTISEMENT_IFACE])), CALL_TIMEOUT)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        self.advertisement = {k: v.value for k, v in reply.body[0].items()}
        self.advertisement_owner = (owner, path)

    def _on_signal(self, msg: Message) -> None:
        if (msg.sender == self.app_owner and msg.path == self.tx_path
                and msg.member == "PropertiesChanged" and msg.body[0] == GATT_CHRC_IFACE
                and "Value" in msg.body[1]):
            value = bytes(msg.body[1]["Value"].value)
            for central in list(self.centrals.values()):
                if central.connected and central.subscribed:
                    central.notified(value)

    async def release_advertisement(self) -> None:
        owner, path = self.advertisement_owner
        await self.bus.send(Message(destination=owner, path=path, interface=ADVERTISEMENT_IFACE,
                                    member="Release"))


class Recorder:
    """A ``PeripheralHandler`` that remembers what it was told."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes]] = []
        self.gone: list[str] = []

    def on_write(self, peer: str, value: bytes) -> None:
        self.writes.append((peer, value))

    def on_disconnect(self, peer: str) -> None:
        self.gone.append(peer)


@pytest.fixture
async def bluez(bus_address: str) -> AsyncIterator[FakeBluez]:
    fake = await FakeBluez.start(bus_address)
    yield fake
    fake.stop()


@pytest.fixture
async def started(bus_address: str, bluez: FakeBluez,
                  ) -> AsyncIterator[tuple[BluezPeripheral, Recorder]]:
    peripheral = BluezPeripheral(bus_address=bus_address, call_timeout=CALL_TIMEOUT, main_conf=None)
    handler = Recorder()
    await asyncio.wait_for(peripheral.start(handler), 10)
    yield peripheral, handler
    await asyncio.wait_for(peripheral.stop(), 10)


# ---- layout, advertisement, probe ---------------------------------------------------------------


async def test_layout_and_advertisement_carry_the_service_uuid_only(
        started: tuple[BluezPeripheral, Recorder], bluez: FakeBluez) -> None:
    peripheral, _ = started
    assert peripheral.adapter == "/org/bluez/hci0"
    assert [c[0] for c in bluez.calls] == ["RegisterApplication", "RegisterAdvertisement"]
    service = next(i[GATT_SERVICE_IFACE] for i in bluez.layout.values() if GATT_SERVICE_IFACE in i)
    assert service == {"UUID": SERVICE_UUID, "Primary": True}
    rx = bluez.layout[bluez.rx_path][GATT_CHRC_IFACE]
    tx = bluez.layout[bluez.tx_path][GATT_CHRC_IFACE]
    assert rx["Flags"] == ["write-without-response"]
    assert tx["Flags"] == ["notify"]
    # Every property the advertisement has, and nothing that names the device.
    assert bluez.advertisement == {"Type": "peripheral", "ServiceUUIDs": [SERVICE_UUID],
                                   "Discoverable": True}
    assert peripheral.advertising


async def test_probe_says_why_the_peripheral_cannot_run(bus_address: str) -> None:
    path, reason = await probe_bluez(2.0, bus_address="unix:path=/nonexistent/pigeon-bus")
    assert path is None and "no D-Bus system bus" in reason

    path, reason = await probe_bluez(2.0, bus_address=bus_address)
    assert path is None and "BlueZ is not running" in reason

    cases: list[tuple[tuple[tuple[str, bool, tuple[str, ...]], ...], str | None, str]] = [
        ((), None, "no Bluetooth adapter"),
        ((("hci0", False, (GATT_MANAGER_IFACE, ADV_MANAGER_IFACE)),), None,
         "adapter hci0 is powered off"),
        ((("hci0", True, (GATT_MANAGER_IFACE,)),), None,
         "adapter hci0 has no LEAdvertisingManager1"),
        ((("hci0", True, ()),), None, "has no GattManager1 or LEAdvertisingManager1"),
        ((("hci0", False, (GATT_MANAGER_IFACE, ADV_MANAGER_IFACE)),
          ("hci1", True, (GATT_MANAGER_IFACE, ADV_MANAGER_IFACE))),
         "/org/bluez/hci1", "BlueZ adapter hci1 can be a BLE peripheral"),
        ((("hci1", True, (GATT_MANAGER_IFACE, ADV_MANAGER_IFACE)),
          ("hci0", True, (GATT_MANAGER_IFACE, ADV_MANAGER_IFACE))),
         "/org/bluez/hci0", "BlueZ adapter hci0 can be a BLE peripheral"),
    ]
    for adapters, want_path, want_reason in cases:
        fake = await FakeBluez.start(bus_address, adapters)
        try:
            path, reason = await probe_bluez(2.0, bus_address=bus_address)
            assert path == want_path, (adapters, reason)
            assert want_reason in reason, (adapters, reason)
            if want_path is None:  # start() refuses with the same reason
                with pytest.raises(BluezUnavailable, match=want_reason):
                    await BluezPeripheral(bus_address=bus_address, call_timeout=2.0,
                                          main_conf=None).start(Recorder())
        finally:
            fake.stop()


async def test_probe_never_hangs_on_a_silent_bluez(bus_address: str) -> None:
    """An org.bluez that never answers GetManagedObjects: the probe gives up in time."""
    bus = await MessageBus(bus_address=bus_address).connect()
    bus.add_message_handler(lambda msg: msg.member == "GetManagedObjects")  # swallow it
    await bus.request_name("org.bluez")
    try:
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        path, reason = await probe_bluez(0.5, bus_address=bus_address)
        assert path is None and "did not answer within 0.5 s" in reason
        assert loop.time() - started_at < 2.0
    finally:
        bus.disconnect()


def test_module_imports_and_reports_unavailable_without_dbus_fast() -> None:
    """macOS/Windows have no dbus-fast: importing works, probe and start say why."""
    code = (
        "import asyncio, sys\n"
        "sys.modules['dbus_fast'] = None\n"
        "from mesh.transports import bluez\n"
        "assert not bluez.HAVE_DBUS_FAST\n"
        "path, reason = asyncio.run(bluez.probe_bluez())\n"
        "assert path is None and 'dbus-fast is not installed' in reason, reason\n"
        "async def start():\n"
        "    try:\n"
        "        await bluez.BluezPeripheral().start(None)\n"
        "    except bluez.BluezUnavailable as exc:\n"
        "        return str(exc)\n"
        "print(asyncio.run(start()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "dbus-fast is not installed" in out.stdout


@pytest.mark.parametrize(("text", "warns"), [
    (None, True),  # no main.conf at all
    ("[General]\n#Privacy = off\n", True),  # the shipped default: commented out
    ("[General]\nPrivacy = off\n", True),
    ("Privacy = device\n", True),  # no section header: unreadable, so unknown
    ("[General]\nName = laptop\nPrivacy = device\n", False),
    ("[General]\nPrivacy=network\n[Policy]\nAutoEnable=true\n", False),
])
def test_privacy_warning_reads_bluetoothd_config(tmp_path: Path, text: str | None,
                                                 warns: bool) -> None:
    conf = tmp_path / "main.conf"
    if text is not None:
        conf.write_text(text)
    warning = privacy_warning(conf)
    assert (warning is not None) == warns
    if warning is not None:
        assert "Privacy = device" in warning and str(conf) in warning


async def test_start_logs_the_privacy_warning(bus_address: str, bluez: FakeBluez,
                                              tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    peripheral = BluezPeripheral(bus_address=bus_address, call_timeout=CALL_TIMEOUT,
                                 main_conf=tmp_path / "absent.conf")
    with caplog.at_level("WARNING", logger="pigeon.ble"):
        await peripheral.start(Recorder())
    await asyncio.wait_for(peripheral.stop(), 10)
    assert [r.message for r in caplog.records if "LE privacy is off" in r.message]


# ---- writes, notifications, disconnects -----------------------------------------------------


async def test_write_notify_and_disconnect_per_central(
        started: tuple[BluezPeripheral, Recorder], bluez: FakeBluez) -> None:
    peripheral, handler = started
    a = bluez.central("AA", mtu=185)
    b = bluez.central("BB", mtu=517)
    c = bluez.central("CC", mtu=247, send_mtu=False)  # BlueZ < 5.62 passes no "mtu"
    for central in (a, b):
        await central.subscribe()
    assert peripheral.notifying
    for central, value in ((a, b"from a"), (b, b"from b"), (c, b"from c")):
        reply = await central.write(value)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    assert handler.writes == [(a.path, b"from a"), (b.path, b"from b"), (c.path, b"from c")]
    assert peripheral.max_value_size(a.path) == 182
    assert peripheral.max_value_size(b.path) == 500
    assert peripheral.max_value_size(c.path) == 20
    assert peripheral.max_value_size("/org/bluez/hci0/dev_unknown") == 20

    # One notification reaches every subscribed central (BlueZ's behaviour).
    await peripheral.notify(b.path, b"n" * 400)
    await wait_until(lambda: bool(a.notifications) and bool(b.notifications), timeout=5)
    assert b.notifications == [b"n" * 400]
    assert a.notifications == [b"n" * 182]  # clipped to a's MTU: a's framing ignores it
    assert c.notifications == []  # never subscribed
    with pytest.raises(ValueError):
        await peripheral.notify(a.path, b"x" * 183)

    a.lose()  # Connected -> false
    await wait_until(lambda: handler.gone == [a.path], timeout=5)
    with pytest.raises(ConnectionError):
        await peripheral.notify(a.path, b"late")
    await b.remove()  # InterfacesRemoved
    await wait_until(lambda: handler.gone == [a.path, b.path], timeout=5)
    await peripheral.disconnect(c.path)  # ours to drop: Device1.Disconnect
    assert ("Disconnect", c.path) in bluez.calls
    assert handler.gone == [a.path, b.path, c.path]
    assert peripheral.peers == {}
    await peripheral.disconnect("/org/bluez/hci0/dev_DD")  # never wrote: not ours to drop
    assert ("Disconnect", "/org/bluez/hci0/dev_DD") not in bluez.calls


async def test_malformed_input_is_logged_and_ignored(bus_address: str, bluez: FakeBluez) -> None:
    peripheral = BluezPeripheral(bus_address=bus_address, call_timeout=CALL_TIMEOUT,
                                 max_peers=2, main_conf=None)
    handler = Recorder()
    await peripheral.start(handler)
    try:
        a = bluez.central("AA", mtu=100)
        good = a.options()
        bad_options: list[dict[str, Variant]] = [
            {},  # no device
            {**good, "device": Variant("s", a.path)},  # wrong type
            {**good, "device": Variant("o", "/org/bluez/hci1/dev_AA")},  # not our adapter
            {**good, "device": Variant("o", "/org/bluez/hci0")},  # the adapter itself
            {**good, "mtu": Variant("s", "big")},
            {**good, "offset": Variant("q", 5)},
        ]
        for options in bad_options:
            reply = await a.write(b"bad", options)
            assert reply.message_type is MessageType.METHOD_RETURN
        reply = await a.write(b"x" * 600)  # longer than any attribute value
        assert reply.message_type is MessageType.METHOD_RETURN
        reply = await a.write(b"wrong signature", signature="ay")
        assert reply.message_type is MessageType.ERROR  # dbus-fast refuses it
        assert handler.writes == []
        assert peripheral.malformed == len(bad_options) + 1

        # Absurd MTUs are clamped to what ATT allows.
        a.mtu = 65535
        await a.write(b"ok")
        assert peripheral.max_value_size(a.path) == 500
        a.mtu = 5
        await a.write(b"ok")
        assert peripheral.max_value_size(a.path) == 20

        # A malformed Connected signal is ignored; the central stays tracked.
        a.iface.emit_properties_changed({})
        await bluez.bus.send(Message.new_signal(
            a.path, PROPERTIES_IFACE, "PropertiesChanged", "sa{sv}as",
            [DEVICE_IFACE, {"Connected": Variant("s", "no")}, []]))
        await bluez.bus.send(Message.new_signal(
            "/", OBJECT_MANAGER_IFACE, "InterfacesRemoved", "oas", ["/not/ours", [DEVICE_IFACE]]))
        await wait_until(lambda: peripheral.malformed == len(bad_options) + 2, timeout=5)
        assert a.path in peripheral.peers and handler.gone == []

        # The cap on tracked centrals: a third one is ignored until one leaves.
        b, c = bluez.central("BB"), bluez.central("CC")
        await b.write(b"b")
        await c.write(b"c")
        assert [p for p, _ in handler.writes] == [a.path, a.path, b.path]
        a.lose()
        await wait_until(lambda: handler.gone == [a.path], timeout=5)
        await c.write(b"c again")
        assert handler.writes[-1] == (c.path, b"c again")
    finally:
        await asyncio.wait_for(peripheral.stop(), 10)


async def test_stop_disconnects_and_unregisters(bus_address: str, bluez: FakeBluez) -> None:
    peripheral = BluezPeripheral(bus_address=bus_address, call_timeout=CALL_TIMEOUT, main_conf=None)
    handler = Recorder()
    await peripheral.start(handler)
    a = bluez.central("AA")
    await a.write(b"hello")
    await bluez.release_advertisement()  # e.g. the adapter was switched off
    await wait_until(lambda: not peripheral.advertising, timeout=5)
    await asyncio.wait_for(peripheral.stop(), 10)
    assert bluez.calls == [
        ("RegisterApplication", "/org/pigeon/app"),
        ("RegisterAdvertisement", "/org/pigeon/advertisement"),
        ("Disconnect", a.path),
        ("UnregisterApplication", "/org/pigeon/app"),  # BlueZ already dropped the advert
    ]
    assert handler.gone == [a.path]
    await peripheral.stop()  # idempotent
    # Started again on the same bus, it registers afresh.
    await peripheral.start(handler)
    await asyncio.wait_for(peripheral.stop(), 10)
    assert [c for c in bluez.calls[4:] if c[0] != "Disconnect"] == [
        ("RegisterApplication", "/org/pigeon/app"),
        ("RegisterAdvertisement", "/org/pigeon/advertisement"),
        ("UnregisterAdvertisement", "/org/pigeon/advertisement"),
        ("UnregisterApplication", "/org/pigeon/app"),
    ]


async def test_bluez_going_away_drops_every_central(bus_address: str) -> None:
    bluez = await FakeBluez.start(bus_address)
    peripheral = BluezPeripheral(bus_address=bus_address, call_timeout=2.0, main_conf=None)
    handler = Recorder()
    await peripheral.start(handler)
    try:
        a = bluez.central("AA")
        await a.write(b"hello")
        bluez.stop()  # bluetoothd exits: its name goes away
        await wait_until(lambda: handler.gone == [a.path], timeout=5)
        assert not peripheral.advertising and peripheral.peers == {}
    finally:
        await asyncio.wait_for(peripheral.stop(), 10)  # bounded although BlueZ is gone


async def test_registration_refused_is_a_clear_error(bus_address: str, bluez: FakeBluez) -> None:
    """BlueZ answers RegisterAdvertisement with an error: start() says so and cleans up."""
    original = bluez._read_advertisement

    async def refuse(owner: str, path: str) -> None:
        raise AssertionError("Maximum advertisements reached")

    bluez._read_advertisement = refuse  # type: ignore[method-assign]
    peripheral = BluezPeripheral(bus_address=bus_address, call_timeout=CALL_TIMEOUT, main_conf=None)
    with pytest.raises(BluezUnavailable, match="Maximum advertisements reached"):
        await peripheral.start(Recorder())
    assert bluez.calls[-1] == ("UnregisterApplication", "/org/pigeon/app")
    bluez._read_advertisement = original  # type: ignore[method-assign]
    await peripheral.start(Recorder())  # a clean slate: it can start again
    await asyncio.wait_for(peripheral.stop(), 10)


# ---- end to end: two Pigeon nodes through the fake BlueZ -------------------------------------


@pytest.mark.parametrize("mtu", [23, 247])
async def test_two_nodes_sync_through_the_bluez_peripheral(
        tmp_path: Path, bus_address: str, bluez: FakeBluez, mtu: int) -> None:
    """Node B serves through ``BluezPeripheral``; node A is the central, its ``BleLink``
    writing and receiving through the fake central that the fake BlueZ bridges."""
    clock = Clock()
    a, b = make_node(tmp_path, "alice", clock), make_node(tmp_path, "bob", clock)
    befriend(a, b)
    peripheral = BluezPeripheral(bus_address=bus_address, call_timeout=CALL_TIMEOUT, main_conf=None)
    server = BlePeripheralServer(b, peripheral)
    await server.start()
    central = bluez.central("A1", mtu=mtu)
    await central.subscribe()

    async def send(fragment: bytes) -> None:
        reply = await central.write(fragment)
        if reply.message_type is not MessageType.METHOD_RETURN:
            raise ConnectionError(str(reply.body))

    async def disconnect() -> None:
        central.lose()

    link = BleLink(central.path, initiator=True, chunk_size=lambda: min(central.mtu - 3, 500),
                   send_fragment=send, disconnect=disconnect)
    central.on_notify = link.feed
    link.start()
    assert a.add_link(link, initiator=True) is not None
    n = 20
    for i in range(n):
        a.send("bob", f"a->b {i}")
        b.send("alice", f"b->a {i}")
    try:
        await wait_until(lambda: len(inbox_texts(b)) >= n and len(inbox_texts(a)) >= n,
                         timeout=30)
        assert sorted(inbox_texts(b)) == sorted(f"a->b {i}" for i in range(n))
        assert sorted(inbox_texts(a)) == sorted(f"b->a {i}" for i in range(n))
        assert [p.transport for p in b.peers()] == ["ble"]
        assert next(iter(server.links.values())).framing.chunk == mtu - 3
        assert peripheral.max_value_size(central.path) == mtu - 3
        print(f"mtu {mtu}: {link.fragments_sent} fragments written, "
              f"{link.fragments_received} notified")
    finally:
        for step in (server.stop(), a.stop(), b.stop()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(step, 10)
    assert ("UnregisterApplication", "/org/pigeon/app") in bluez.calls
