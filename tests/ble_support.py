"""Bluetooth LE without a radio: bumble software controllers on one in-process LocalLink.

* ``BumbleWorld.device`` makes a powered-on bumble ``Device`` on the shared link.
* ``BumblePeripheral`` implements ``mesh.transports.ble.Peripheral`` on a bumble device
  (Pigeon's GATT layout, advertising the service UUID and nothing else).
* ``bleak_backends`` returns a bleak scanner and client backend *class* bound to one
  bumble device, so ``mesh.transports.ble.BleCentral`` (real bleak ``BleakScanner`` /
  ``BleakClient`` code) runs unmodified against a bumble peripheral. ``visible`` simulates
  radio range (the scanner drops advertisements from addresses it rejects) and
  ``connect_lock`` serialises connection set-up across devices (see ``BumbleClient.connect``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import BleakError
from bumble.controller import Controller
from bumble.core import UUID, AdvertisingData
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.hci import Address
from bumble.host import Host
from bumble.link import LocalLink
from bumble.transport.common import AsyncPipeSink

from mesh.transports.ble import RX_UUID, SERVICE_UUID, TX_UUID, PeripheralHandler


class BumbleWorld:
    """Software controllers that hear each other (one shared ``LocalLink``)."""

    def __init__(self) -> None:
        self.link = LocalLink()
        self.count = 0
        #: Shared by every central of this world that wants set-up serialised.
        self.connect_lock = asyncio.Lock()

    async def device(self, name: str) -> Device:
        self.count += 1
        address = ":".join([f"{0xC0 + self.count:02X}"] + ["00"] * 4 + [f"{self.count:02X}"])
        controller = Controller(name, link=self.link, public_address=address)
        device = Device(name=name, address=Address(address),
                        host=Host(controller, AsyncPipeSink(controller)))
        device.gatt_server.max_mtu = 517
        await device.power_on()
        return device


def advertising_data() -> bytes:
    """Flags + the 128-bit service UUID: no name, no static data."""
    return bytes(AdvertisingData([
        (AdvertisingData.FLAGS, bytes([0x06])),
        (AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
         UUID(SERVICE_UUID).to_bytes()),
    ]))


class BumblePeripheral:
    """``Peripheral`` on a bumble device; peers are named by their connection handle."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.connections: dict[str, Connection] = {}
        self.handler: PeripheralHandler | None = None
        self.rx = Characteristic(RX_UUID, Characteristic.Properties.WRITE_WITHOUT_RESPONSE,
                                 Characteristic.WRITEABLE, CharacteristicValue(write=self._on_write))
        self.tx = Characteristic(TX_UUID, Characteristic.Properties.NOTIFY,
                                 Characteristic.READABLE, b"")
        self.writes = 0
        self._advertising_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    @staticmethod
    def peer_name(connection: Connection) -> str:
        return f"{connection.peer_address}#{connection.handle}"

    async def start(self, handler: PeripheralHandler) -> None:
        self.handler = handler
        self.device.add_service(Service(SERVICE_UUID, [self.rx, self.tx]))
        self.device.on(self.device.EVENT_CONNECTION, self._on_connection)
        await self._advertise()

    async def _advertise(self) -> None:
        """(Re)start connectable advertising. A controller stops advertising when a central
        connects; like BlueZ, we start again at once so more centrals can connect (bumble's
        own ``auto_restart`` waits for a disconnection)."""
        async with self._advertising_lock:
            if self._stopped:
                return
            await self.device.start_advertising(advertising_data=advertising_data(),
                                                scan_response_data=b"", auto_restart=False,
                                                advertising_interval_min=20,
                                                advertising_interval_max=20)

    def _schedule_advertising(self) -> None:
        task = asyncio.ensure_future(self._advertise())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2.0)
        with contextlib.suppress(Exception):
            await self.device.stop_advertising()
        for connection in list(self.connections.values()):
            with contextlib.suppress(Exception):
                await connection.disconnect()

    def _on_connection(self, connection: Connection) -> None:
        if connection.role != connection.role.PERIPHERAL:
            return
        name = self.peer_name(connection)
        self.connections[name] = connection
        self._schedule_advertising()

        def gone(*_: Any) -> None:
            self.connections.pop(name, None)
            if not self._stopped and self.device.legacy_advertiser is None:
                self._schedule_advertising()
            if self.handler is not None:
                self.handler.on_disconnect(name)

        connection.on(connection.EVENT_DISCONNECTION, gone)

    def _on_write(self, connection: Connection, value: bytes) -> None:
        self.writes += 1
        if self.peer_name(connection) not in self.connections:
            # bumble runs write handlers in tasks, so a write can land after the
            # disconnection was reported; a new link for a gone central would linger.
            return
        if self.handler is not None:
            self.handler.on_write(self.peer_name(connection), bytes(value))

    async def notify(self, peer: str, value: bytes) -> None:
        connection = self.connections.get(peer)
        if connection is None:
            raise ConnectionError("not connected")
        await self.device.notify_subscriber(connection, self.tx, value)

    def max_value_size(self, peer: str) -> int:
        connection = self.connections.get(peer)
        return 20 if connection is None else int(connection.att_mtu) - 3

    async def disconnect(self, peer: str) -> None:
        connection = self.connections.get(peer)
        if connection is not None:
            await connection.disconnect()


# ---- a test-only bleak backend driving a bumble central --------------------------------------


def bleak_backends(device: Device, mtu: int = 517, *,
                   visible: Callable[[str], bool] | None = None,
                   connect_lock: asyncio.Lock | None = None,
                   ) -> tuple[type[BaseBleakScanner], type[BaseBleakClient]]:
    """Scanner and client backend classes (bleak takes classes) bound to ``device``.

    ``visible(address)``: advertisements from addresses it rejects are never reported, as
    if out of radio range (a ``LocalLink`` is one room where everyone hears everyone).
    ``connect_lock``: held around each connection set-up; share one lock between all the
    centrals of a world so no device accepts a connection while another is being made.
    """

    class BumbleScanner(BaseBleakScanner):
        def __init__(self, detection_callback: Any, service_uuids: list[str] | None,
                     scanning_mode: str = "active", **_kw: Any) -> None:
            super().__init__(detection_callback, service_uuids)

        async def start(self) -> None:
            self.seen_devices = {}
            device.on(device.EVENT_ADVERTISEMENT, self._on_advertisement)
            await device.start_scanning(filter_duplicates=False, scan_interval=20,
                                        scan_window=20)

        async def stop(self) -> None:
            device.remove_listener(device.EVENT_ADVERTISEMENT, self._on_advertisement)
            # Bounded: a cancelled scan can leave bumble's HCI command exchange waiting.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(device.stop_scanning(), 2.0)

        def _on_advertisement(self, adv: Advertisement) -> None:
            if visible is not None and not visible(str(adv.address)):
                return
            entries = adv.data.get_all(AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS)
            flat = [str(u).lower() for entry in entries
                    for u in (entry if isinstance(entry, list) else [entry])]
            if not self.is_allowed_uuid(flat):
                return
            data = AdvertisementData(local_name=None, manufacturer_data={}, service_data={},
                                     service_uuids=flat, tx_power=None, rssi=adv.rssi,
                                     platform_data=(adv,))
            address = str(adv.address)
            bd = self.create_or_update_device(address, address, None, adv.address, data)
            self.call_detection_callbacks(bd, data)

    class BumbleClient(BaseBleakClient):
        def __init__(self, address_or_ble_device: BLEDevice | str, **kwargs: Any) -> None:
            super().__init__(address_or_ble_device,
                             disconnected_callback=kwargs.get("disconnected_callback"),
                             timeout=kwargs.get("timeout", 10.0))
            if not isinstance(address_or_ble_device, BLEDevice):
                raise BleakError("the bumble backend needs a scanned BLEDevice")
            self._target: Address = address_or_ble_device.details
            self._connection: Connection | None = None
            self._peer: Peer | None = None

        @property
        def mtu_size(self) -> int:
            return 23 if self._connection is None else int(self._connection.att_mtu)

        async def connect(self, pair: bool, **kwargs: Any) -> None:
            if connect_lock is None:
                connection = await self._connect_as_central()
            else:
                async with connect_lock:
                    connection = await self._connect_as_central()
            self._connection = connection
            connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)
            peer = self._peer = Peer(connection)
            if mtu > 23:
                await peer.request_mtu(mtu)
            services = BleakGATTServiceCollection()
            for svc in await peer.discover_services([UUID(SERVICE_UUID)]):
                bsvc = BleakGATTService(svc, svc.handle, str(svc.uuid).lower())
                services.add_service(bsvc)
                for char in await peer.discover_characteristics(service=svc):
                    props: list[Any] = []
                    if char.properties & Characteristic.Properties.WRITE_WITHOUT_RESPONSE:
                        props.append("write-without-response")
                    if char.properties & Characteristic.Properties.NOTIFY:
                        props.append("notify")
                    bchar = BleakGATTCharacteristic(char, char.handle, str(char.uuid).lower(),
                                                    props, self._max_write, bsvc)
                    services.add_characteristic(bchar)
            self.services = services

        async def _connect_as_central(self) -> Connection:
            """bumble's quirk: ``device.connect`` resolves with the first connection the
            device reports, so on a device that is also a peripheral it can return an
            *incoming* connection. Wait for our own (role central, to the target) instead."""
            loop = asyncio.get_running_loop()
            ours: asyncio.Future[Connection] = loop.create_future()

            def on_connection(connection: Connection) -> None:
                if (connection.role == connection.role.CENTRAL
                        and connection.peer_address == self._target and not ours.done()):
                    ours.set_result(connection)

            if any(c.peer_address == self._target for c in device.connections.values()):
                # A real controller refuses this (HCI "Connection Already Exists"); bumble's
                # only logs it and the connect hangs until its timeout.
                raise BleakError("a connection to this device already exists")
            device.on(device.EVENT_CONNECTION, on_connection)
            try:
                first = await device.connect(self._target, timeout=self._timeout)
                if first.role == first.role.CENTRAL and first.peer_address == self._target:
                    return first
                return await asyncio.wait_for(ours, self._timeout)
            finally:
                device.remove_listener(device.EVENT_CONNECTION, on_connection)

        def _max_write(self) -> int:
            return self.mtu_size - 3

        def _on_disconnection(self, *_: Any) -> None:
            self._connection = None
            if self._disconnected_callback is not None:
                self._disconnected_callback()

        async def disconnect(self) -> None:
            connection = self._connection
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.disconnect()

        async def pair(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError

        async def unpair(self) -> None:
            raise NotImplementedError

        @property
        def is_connected(self) -> bool:
            return self._connection is not None

        async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, **kw: Any,
                                 ) -> bytearray:
            assert self._peer is not None
            return bytearray(await self._peer.read_value(characteristic.obj))

        async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, **kw: Any,
                                       ) -> bytearray:
            raise NotImplementedError

        async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any,
                                  response: bool) -> None:
            if self._peer is None or self._connection is None:
                raise BleakError("not connected")
            await self._peer.write_value(characteristic.obj, bytes(data), with_response=response)

        async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
            raise NotImplementedError

        async def start_notify(self, characteristic: BleakGATTCharacteristic,
                               callback: NotifyCallback, **kwargs: Any) -> None:
            assert self._peer is not None
            await self._peer.subscribe(characteristic.obj, lambda v: callback(bytearray(v)))

        async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
            assert self._peer is not None
            await self._peer.unsubscribe(characteristic.obj)

    return BumbleScanner, BumbleClient


async def bounded(awaitable: Any, timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


Predicate = Callable[[], bool]
