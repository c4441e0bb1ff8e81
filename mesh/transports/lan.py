"""LAN discovery over mDNS/DNS-SD: announce ``_pigeon._tcp.local.`` and browse for it.

What is found is only a *hint*: a (host, port) handed to the node, which dials it over the
ordinary TCP link (``mesh.transports.tcp``) within the bounds of ``mesh.dialer``; who the
peer is gets proven inside the Noise handshake and nowhere else.

Privacy: the instance name, host name and TXT record carry no static identifier, only the
protocol version and a random token that is new on every (re)start and replaced at least
hourly. The machine's own host name is never used. What an observer still learns (that a
Pigeon node is at this IP/MAC and port, and when) is written down in ``docs/lan.md``.

zeroconf neither watches interfaces nor tells us when a silent peer is gone (it keeps
records ~19 minutes), so this class polls the addresses of the chosen interfaces every
few seconds and rebuilds zeroconf (new token, fresh browser cache, a new announcement
that peers see as a new service) whenever they change; liveness is left to the links.

Only the chosen interfaces' addresses are used: zeroconf's responder sockets bind to
them and multicast groups are joined on them alone (the shared receive socket is bound
to the wildcard address, as mDNS requires, but only hears groups joined on those
interfaces). Announced addresses must be on-link to be dialed, so a spoofed
announcement cannot point us at loopback or the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh.wire import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION

log = logging.getLogger("pigeon.lan")

SERVICE_TYPE = "_pigeon._tcp.local."
#: Seconds between interface address polls (zeroconf does not watch interfaces).
POLL_S = 2.0
#: The announcement token is replaced after a random time in [0.85, 1.0] of this.
ROTATE_S = 3600.0
RESOLVE_TIMEOUT_MS = 3000
#: Service names waiting to be resolved; a flood beyond this is dropped, not queued.
MAX_PENDING = 512
RESOLVERS = 4
#: Names remembered (for goodbyes) and addresses taken from one announcement.
MAX_REMEMBERED = 256
#: Service names seen, re-resolved (from zeroconf's cache) every REFRESH_S: zeroconf
#: reports a service once, so a hint the dialer had to evict under a flood comes back.
MAX_SEEN = 1024
REFRESH_S = 20.0
MAX_ADDRS_PER_SERVICE = 4
CLOSE_TIMEOUT_S = 3.0

_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
_SYS_NET = Path("/sys/class/net")


class DiscoverySink(Protocol):
    """What discovery needs from a node (``mesh.node.Node`` fits; this module never imports it)."""

    listening: list[str]

    def connect_discovered(self, host: str, port: int, transport: str = "lan") -> None: ...

    def forget_discovered(self, host: str, port: int) -> None: ...


@dataclass(frozen=True, order=True)
class InterfaceAddress:
    """One usable address: IPv4, or IPv6 link-local with its interface index as scope."""

    ifname: str
    ip: str
    prefix: int
    scope_id: int = 0

    @property
    def version(self) -> int:
        return 6 if ":" in self.ip else 4


def _interface_up(name: str) -> bool:
    """Administratively up, carrier present and not loopback (Linux sysfs; elsewhere assume up)."""
    base = _SYS_NET / name
    try:
        flags = int((base / "flags").read_text().strip(), 16)
        operstate = (base / "operstate").read_text().strip()
    except (OSError, ValueError):
        return True
    return bool(flags & _IFF_UP) and not flags & _IFF_LOOPBACK and operstate not in (
        "down", "lowerlayerdown", "notpresent")


def _unusable_ipv6() -> set[str]:
    """IPv6 addresses still in (or failed) duplicate address detection: binding them fails,
    so they join the snapshot, and zeroconf gets rebuilt, only once they are usable (Linux)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return set()
    out: set[str] = set()
    for line in lines:
        parts = line.split()
        with contextlib.suppress(ValueError, IndexError):
            if int(parts[4], 16) & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED):
                out.add(str(ipaddress.IPv6Address(int(parts[0], 16))))
    return out


def usable_addresses(names: Sequence[str] | None = None) -> frozenset[InterfaceAddress]:
    """IPv4 and IPv6 link-local addresses of up, non-loopback interfaces (``names`` only, if given)."""
    found: set[InterfaceAddress] = set()
    unusable = _unusable_ipv6()
    for adapter in ifaddr.get_adapters():
        ifname = str(adapter.nice_name or adapter.name)
        if names and ifname not in names and str(adapter.name) not in names:
            continue
        if not _interface_up(str(adapter.name)):
            continue
        for entry in adapter.ips:
            if isinstance(entry.ip, tuple):
                ip6 = ipaddress.IPv6Address(entry.ip[0].split("%")[0])
                if ip6.is_link_local and entry.ip[2] and str(ip6) not in unusable:
                    found.add(InterfaceAddress(ifname, str(ip6), entry.network_prefix, entry.ip[2]))
            else:
                ip4 = ipaddress.IPv4Address(entry.ip)
                if not ip4.is_loopback and not ip4.is_unspecified:
                    found.add(InterfaceAddress(ifname, str(ip4), entry.network_prefix))
    return frozenset(found)


@dataclass(frozen=True)
class ListenSpec:
    """Which of our addresses a peer can reach the node's listener at, and on which port."""

    port: int
    any_v4: bool
    any_v6: bool
    specific: frozenset[str]

    def reaches(self, addr: InterfaceAddress) -> bool:
        if addr.ip in self.specific:
            return True
        return self.any_v4 if addr.version == 4 else self.any_v6


def listen_spec(listening: Sequence[str]) -> ListenSpec | None:
    """From the node's ``listening`` list ("0.0.0.0:7447", ":::7447"); None if nothing reachable."""
    parsed: list[tuple[str, int]] = []
    for entry in listening:
        host, _, port_text = entry.rpartition(":")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
            port = int(port_text)
        except ValueError:
            continue
        if not ip.is_loopback and 0 < port < 65536:
            parsed.append((str(ip), port))
    if not parsed:
        return None
    wildcard = [p for h, p in parsed if h in ("0.0.0.0", "::")]
    port = wildcard[0] if wildcard else parsed[0][1]
    hosts = {h for h, p in parsed if p == port}
    return ListenSpec(port=port, any_v4="0.0.0.0" in hosts, any_v6="::" in hosts,
                      specific=frozenset(hosts - {"0.0.0.0", "::"}))


class LanDiscovery:
    """Announces this node and browses for others on the chosen interfaces."""

    def __init__(self, sink: DiscoverySink, *, listen: ListenSpec | None,
                 interfaces: Sequence[str] | None = None, poll_s: float = POLL_S,
                 rotate_s: float = ROTATE_S, rng: Callable[[], float] = random.random) -> None:
        self.sink = sink
        self.listen = listen
        self.interfaces = list(interfaces) if interfaces else None
        self.poll_s = poll_s
        self.rotate_s = rotate_s
        self._rng = rng
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._register_task: asyncio.Task[None] | None = None
        self._snapshot: frozenset[InterfaceAddress] | None = None
        self._rotate_at = 0.0
        #: Our recent tokens: a stale copy of our own announcement is still ours.
        self._tokens: deque[str] = deque(maxlen=8)
        self._queue: asyncio.Queue[str] = asyncio.Queue(MAX_PENDING)
        self._pending: set[str] = set()
        self._known: OrderedDict[str, list[tuple[str, int]]] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0
        self._last_error = ""

    async def start(self) -> None:
        """Returns at once; announcing and browsing continue in the background."""
        if self.interfaces:
            found = {a.ifname for a in usable_addresses(self.interfaces)}
            missing = [n for n in self.interfaces if n not in found]
            if missing:
                log.warning("lan: interface %s has no usable address yet; waiting for it",
                            ", ".join(missing))
        self._tasks.append(asyncio.ensure_future(self._supervise()))
        self._tasks.extend(asyncio.ensure_future(self._resolver()) for _ in range(RESOLVERS))
        self._tasks.append(asyncio.ensure_future(self._refresh()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        await self._close()

    # ---- announcing ------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                snapshot = usable_addresses(self.interfaces)
                if snapshot != self._snapshot:
                    await self._restart(snapshot, "interfaces changed" if self._snapshot else "start")
                elif self._zc is not None and time.monotonic() >= self._rotate_at:
                    await self._restart(snapshot, "token rotation")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad poll must not end discovery for good
                if str(exc) != self._last_error:
                    log.warning("lan: cannot start discovery (%s); retrying", exc)
                    self._last_error = str(exc)
                self._snapshot = None
            await asyncio.sleep(self.poll_s)

    async def _restart(self, snapshot: frozenset[InterfaceAddress], why: str) -> None:
        await self._close()
        self._snapshot = snapshot
        self._seen.clear()  # the new browser reports what is still there
        self._known.clear()
        if not snapshot:
            log.info("lan: no usable interface; waiting")
            return
        token = secrets.token_hex(8)
        self._tokens.append(token)
        versions = {a.version for a in snapshot}
        ip_version = (IPVersion.All if versions == {4, 6}
                      else IPVersion.V6Only if versions == {6} else IPVersion.V4Only)
        zc = AsyncZeroconf(interfaces=sorted({a.ip for a in snapshot}), ip_version=ip_version)
        self._zc = zc
        self._browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self._rotate_at = time.monotonic() + self.rotate_s * (0.85 + 0.15 * self._rng())
        where = ", ".join(f"{a.ifname} {a.ip}" for a in sorted(snapshot))
        advertised = ([a.ip for a in sorted(snapshot) if self.listen.reaches(a)]
                      if self.listen is not None else [])
        if self.listen is None or not advertised:
            log.info("lan: browsing on %s (%s); not announcing: no listener reachable there",
                     where, why)
            return
        info = AsyncServiceInfo(
            SERVICE_TYPE, f"{token}.{SERVICE_TYPE}", port=self.listen.port,
            properties={"v": str(PROTOCOL_VERSION), "t": token}, server=f"{token}.local.",
            parsed_addresses=advertised,
        )
        self._register_task = asyncio.ensure_future(self._register(zc, info))
        log.info("lan: announcing port %d and browsing on %s (%s)", self.listen.port, where, why)

    async def _register(self, zc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
        try:
            # No probing (RFC 6762 s8.1): the name is 64 random bits, new on each start, so
            # a collision is not a practical concern, and probing would add ~1.6 s to
            # every discovery. A deliberate squatter cannot guess the name in advance.
            announced = await zc.async_register_service(info, cooperating_responders=True)
            await announced
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("lan: announcing failed: %s", exc)

    async def _close(self) -> None:
        zc, browser, task = self._zc, self._browser, self._register_task
        self._zc = self._browser = self._register_task = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if zc is None:
            return
        try:
            if browser is not None:
                await asyncio.wait_for(browser.async_cancel(), CLOSE_TIMEOUT_S)
            await asyncio.wait_for(zc.async_close(), CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError, RuntimeError) as exc:
            log.debug("lan: closing zeroconf: %s", exc)

    # ---- browsing ------------------------------------------------------------------

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self._seen.pop(name, None)
            for host, port in self._known.pop(name, []):
                self.sink.forget_discovered(host, port)
            return
        if len(name) > 255:
            return
        self._seen[name] = None
        self._seen.move_to_end(name)
        while len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        self._enqueue(name)

    async def _refresh(self) -> None:
        """Offer every cached service again. Cache only: a name whose records are gone
        must not cost a network query (a flood would keep the resolvers busy)."""
        while True:
            await asyncio.sleep(REFRESH_S)
            zc = self._zc
            for i, name in enumerate(list(self._seen)):
                if zc is None or zc is not self._zc:
                    break
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                with contextlib.suppress(Exception):  # hostile records: skip, never stop
                    if info.load_from_cache(zc.zeroconf):
                        self._accept(name, info)
                if i % 32 == 31:
                    await asyncio.sleep(0)

    def _enqueue(self, name: str) -> None:
        if name in self._pending:
            return
        try:
            self._queue.put_nowait(name)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped in (1, 100, 10_000):
                log.warning("lan: too many announcements to resolve; dropped %d", self.dropped)
            return
        self._pending.add(name)

    async def _resolver(self) -> None:
        while True:
            name = await self._queue.get()
            self._pending.discard(name)
            zc = self._zc
            if zc is None:
                continue
            try:
                await self._resolve(zc, name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a hostile record must not stop the resolver
                log.debug("lan: resolving %r failed: %s", name, exc)

    async def _resolve(self, zc: AsyncZeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if await info.async_request(zc.zeroconf, RESOLVE_TIMEOUT_MS) and zc is self._zc:
            self._accept(name, info)

    def _accept(self, name: str, info: AsyncServiceInfo) -> None:
        """Validate a resolved announcement and hand its on-link addresses to the node."""
        props = info.decoded_properties
        if props.get("t") in self._tokens:
            return  # our own announcement
        try:
            version = int(props.get("v") or "")
        except ValueError:
            return
        port = info.port
        if version < MIN_PROTOCOL_VERSION or port is None or not 0 < port < 65536:
            return
        hosts = [h for h in (self._dialable(a) for a in info.parsed_scoped_addresses())
                 if h is not None][:MAX_ADDRS_PER_SERVICE]
        if not hosts:
            return
        self._known[name] = [(h, port) for h in hosts]
        self._known.move_to_end(name)
        while len(self._known) > MAX_REMEMBERED:
            self._known.popitem(last=False)
        for host in hosts:
            self.sink.connect_discovered(host, port, "lan")

    def _dialable(self, text: str) -> str | None:
        """``text`` if it is on a link we use (scoped for IPv6 link-local), else None."""
        snapshot = self._snapshot or frozenset()
        addr_text, _, scope = text.partition("%")
        try:
            ip = ipaddress.ip_address(addr_text)
        except ValueError:
            return None
        if ip.version == 4:
            for a in snapshot:
                if a.version == 4 and ip in ipaddress.ip_network(f"{a.ip}/{a.prefix}", strict=False):
                    return str(ip)
            return None
        if not ip.is_link_local:
            return None
        scopes = {str(a.scope_id) for a in snapshot if a.version == 6}
        if scope:
            return f"{ip}%{scope}" if scope in scopes else None
        return f"{ip}%{scopes.pop()}" if len(scopes) == 1 else None


async def start_lan(sink: DiscoverySink, interfaces: Sequence[str] | None = None,
                    **kwargs: Any) -> LanDiscovery:
    """Build and start LAN discovery for a started node (``pigeon relay`` and ``pigeon chat``).

    The node must already listen, so the announced port is the real one; with no
    listener reachable from the LAN the node still browses and dials, but announces nothing.
    """
    listen = listen_spec(sink.listening)
    if listen is None:
        log.warning("lan: no non-loopback listener; browsing only (peers cannot find us)")
    discovery = LanDiscovery(sink, listen=listen, interfaces=interfaces, **kwargs)
    await discovery.start()
    return discovery
