"""Helpers for the TUI tests: a scripted NodeClient with fixed data (snapshots, docs
screenshots), deterministic identities, and a way to read the screen as text."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from pathlib import Path
from typing import Any

from rich.console import Console
from textual.app import App
from textual.pilot import Pilot

from mesh import api
from mesh.chat import KeyChangedError
from mesh.errors import UserError
from mesh.identity import Identity, decode_contact, encode_contact
from mesh.node import Node, NodeConfig
from mesh.store import Store
from mesh.transports.memory import memory_pipe

#: 2026-09-21 14:00 UTC. Every screenshot is drawn at this time, in UTC.
FIXED_NOW = 1_790_000_000.0 - 1_790_000_000.0 % 86400 + 14 * 3600
TZ = UTC


def fixed_clock() -> float:
    return FIXED_NOW


def seeded_identity(name: str, seed: int) -> Identity:
    rng = random.Random(seed)
    return Identity.generate(name, rng=lambda n: bytes(rng.getrandbits(8) for _ in range(n)))


def screen_text(app: App[Any]) -> str:
    """What the terminal shows right now, as plain text (modal screens over their
    background included), the same render the SVG screenshot uses."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(
        full=True, screen_stack=app._background_screens))
    return console.export_text()


class FakeClient:
    """A NodeClient with canned, fixed data. ``events`` yields whatever tests put in
    ``queue``; ``add_contact`` raises KeyChangedError for a saved name with another key."""

    attached = False

    def __init__(self, me: Identity, contacts: list[tuple[Identity, bool]] | None = None) -> None:
        self.me = me
        self.saved: dict[str, tuple[Identity | None, str, bool]] = {}
        for ident, verified in contacts or []:
            self.saved[ident.name] = (ident, ident.public.fingerprint, verified)
        self.channel_list = [api.ChannelInfo(name="public", invite="pigeonch1public", public=True)]
        self.convs: list[api.ConversationInfo] = []
        self.msgs: dict[str, list[api.ChatMessage]] = {}
        self.peer_list: list[api.PeerInfo] = []
        self.carried = 0
        self.queue: asyncio.Queue[api.NodeEvent] = asyncio.Queue()
        self.sent: list[tuple[str, str]] = []
        self.replaced: list[str] = []

    async def identity(self) -> dict[str, str]:
        return {"node_id": self.me.public.node_id.hex(), "name": self.me.name,
                "fingerprint": self.me.public.fingerprint,
                "contact": encode_contact(self.me.public, self.me.name)}

    async def status(self) -> api.Status:
        return api.Status(node_id=self.me.public.node_id.hex(), name=self.me.name, envelopes=0,
                          bytes=0, receipts=0, carried_for_others=self.carried,
                          peers=[api.to_dict(p) for p in self.peer_list], listening=[],
                          uptime=0.0)

    async def send(self, conversation: str, text: str) -> str:
        self.sent.append((conversation, text))
        return f"{0xF000 + len(self.sent):032x}"

    async def contacts(self) -> list[api.ContactInfo]:
        return [api.ContactInfo(name=n, node_id="00", fingerprint=fp, verified=v)
                for n, (_, fp, v) in self.saved.items()]

    async def add_contact(self, name: str, code: str) -> api.ContactInfo:
        public, _ = decode_contact(code)
        if name in self.saved and self.saved[name][1] != public.fingerprint:
            raise KeyChangedError(f"the code for {name!r} carries a DIFFERENT KEY")
        self.saved[name] = (None, public.fingerprint, False)
        return api.ContactInfo(name=name, node_id="00", fingerprint=public.fingerprint,
                               verified=False)

    async def replace_contact_key(self, name: str, code: str) -> api.ContactInfo:
        public, _ = decode_contact(code)
        self.replaced.append(name)
        self.saved[name] = (None, public.fingerprint, False)
        return api.ContactInfo(name=name, node_id="00", fingerprint=public.fingerprint,
                               verified=False)

    async def verify_contact(self, name: str, verified: bool = True) -> None:
        ident, fp, _ = self.saved[name]
        self.saved[name] = (ident, fp, verified)

    async def channels(self) -> list[api.ChannelInfo]:
        return list(self.channel_list)

    async def join_channel(self, name: str | None = None, *, passphrase: str | None = None,
                           invite: str | None = None) -> api.ChannelInfo:
        if not name or not (passphrase or invite):
            raise UserError("join a channel with a name and a passphrase, or with an invite code")
        info = api.ChannelInfo(name=name, invite="pigeonch1example", public=False)
        self.channel_list.append(info)
        return info

    async def conversations(self) -> list[api.ConversationInfo]:
        return list(self.convs)

    async def messages(self, conversation: str) -> list[api.ChatMessage]:
        return list(self.msgs.get(conversation, []))

    async def mark_read(self, conversation: str) -> None:
        return None

    async def peers(self) -> list[api.PeerInfo]:
        return list(self.peer_list)

    async def events(self) -> AsyncIterator[api.NodeEvent]:
        while True:
            yield await self.queue.get()

    async def close(self) -> None:
        return None


def demo_client() -> FakeClient:
    """The conversation shown in snapshots and in the user guide's screenshots."""
    me = seeded_identity("sam", 1)
    ana, ben = seeded_identity("ana", 2), seeded_identity("ben", 3)
    client = FakeClient(me, [(ana, True), (ben, False)])
    client.convs = [
        api.ConversationInfo(name="#public", kind="channel", unread=2, verified=False),
        api.ConversationInfo(name="#neighbours", kind="channel", unread=0, verified=False),
        api.ConversationInfo(name="ana", kind="contact", unread=0, verified=True),
        api.ConversationInfo(name="ben", kind="contact", unread=1, verified=False),
        api.ConversationInfo(name="~ana (5c1f09e2)", kind="stranger", unread=1, verified=False),
    ]
    t = FIXED_NOW - 3600

    def msg(i: int, out: bool, text: str, state: str = "", minutes: float = 0) -> api.ChatMessage:
        return api.ChatMessage(id=f"{i:032x}", conversation="ana", outgoing=out,
                               sender="" if out else "ana", text=text, at=t + minutes * 60,
                               sent_at=t + minutes * 60, state=state, verified_sender=not out)
    client.msgs["ana"] = [
        msg(1, False, "Are you near the square? The phones are down here.", minutes=0),
        msg(2, True, "Yes, by the library. Internet is gone here too.", "delivered", 3),
        msg(3, False, "Water and first aid at the north gate.", minutes=12),
        msg(4, True, "On my way with two more people.", "relayed", 14),
        msg(5, True, "Meet at the bakery at nine if we get separated.", "queued", 15),
    ]
    client.peer_list = [
        api.PeerInfo(link_key="a1", transport="lan", address="192.168.4.17:7447",
                     state="transferring", connected_at=t, sent=3, received=5, to_send=4,
                     to_receive=8),
        api.PeerInfo(link_key="b2", transport="ble", address="ble:4f:2a", state="live",
                     connected_at=t, sent=0, received=0, to_send=0, to_receive=0),
    ]
    client.carried = 17
    return client




# ---- real nodes ----------------------------------------------------------------------

START = 1_790_000_000.0


class FixedClock:
    """The nodes' clock: fixed, so nothing in the tests depends on wall time."""

    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_node(tmp: Path, dirname: str, identity: Identity, clock: Callable[[], float],
              config: NodeConfig | None = None) -> Node:
    """A real node (SQLite store under ``tmp/dirname``), not started: links are added
    by hand with ``MemLink``, or ``start()`` it for TCP."""
    store = Store.open(tmp / dirname / "store.sqlite")
    return Node(identity, store, config or NodeConfig(), clock=clock)


def code_of(node: Node) -> str:
    return encode_contact(node.identity.public, node.identity.name)


class MemLink:
    """Two real nodes joined by an in-memory pipe, closed on demand."""

    def __init__(self, a: Node, b: Node) -> None:
        self.la, self.lb = memory_pipe(a.identity.name, b.identity.name)
        self.tasks = [a.add_link(self.la, initiator=True), b.add_link(self.lb, initiator=False)]

    async def close(self) -> None:
        self.la.close()
        self.lb.close()
        for task in self.tasks:
            if task is not None:
                await asyncio.wait_for(task, 5)


async def until(pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 20.0,
                what: str = "condition") -> None:
    """Let the app run until ``predicate()`` holds (or fail saying what we waited for)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the screen shows:\n"
                                 f"{screen_text(pilot.app)}")
        await pilot.pause(0.02)
