"""The main screen: conversations, the open conversation, peers, sync and carried count.

All node calls run in named Textual workers, so a slow relay never freezes typing. Node
events arrive through one listening worker that turns each into a ``NodeEventArrived``
message; the handler applies it inside a try/except, so one malformed event is logged
and skipped instead of taking the app down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import tzinfo
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from mesh import api
from mesh.client import NodeClient
from mesh.errors import UserError
from tui.format import clock_time, legend
from tui.safe import line, sentence
from tui.widgets import PUBLIC, ConversationList, MessageView, PeerPanel

log = logging.getLogger("pigeon.tui")
#: A sync that brings fifty messages at once rings once, not fifty times.
BELL_GAP_S = 2.0


class NodeEventArrived(Message):
    """A node event, carried from the listening worker to the screen."""

    def __init__(self, event: api.NodeEvent) -> None:
        super().__init__()
        self.event = event


class MainScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f2", "my_code", "My code"),
        Binding("f3", "add_contact", "Add contact"),
        Binding("f4", "channels", "Channels"),
        Binding("f5", "details", "Details"),
        Binding("escape", "focus_input", "Write", show=False),
    ]

    def __init__(self, client: NodeClient, identity: dict[str, str], *, bell: bool,
                 clock: Callable[[], float], tz: tzinfo | None, status_interval: float) -> None:
        super().__init__()
        self.client = client
        self.identity = identity
        self.bell = bell
        self.clock = clock
        self.tz = tz
        self.status_interval = status_interval
        self.conversations: dict[str, api.ConversationInfo] = {}
        self.current: str | None = None
        self.peers: dict[str, api.PeerInfo] = {}
        self.node_reachable = True
        self._last_bell = -BELL_GAP_S

    # ---- layout ------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="topbar")
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield ConversationList(id="conversations")
                yield PeerPanel(id="peers")
            with Vertical(id="chat"):
                yield Static(id="conv-title")
                yield MessageView(id="messages", stamp=self._stamp)
                yield Static(legend(), id="legend")
                yield Input(id="compose", placeholder="Write a message, Enter sends",
                            max_length=4000)
                yield Static(id="notice")
        yield Footer()

    def _stamp(self, at: float) -> str:
        return clock_time(at, self.clock(), self.tz)

    def on_mount(self) -> None:
        self._show_topbar(None)
        self.query_one("#notice", Static).display = False
        self.listen()
        self.refresh_conversations(select=None)
        self.refresh_status()
        self.set_interval(self.status_interval, self.refresh_status)
        self.query_one("#compose", Input).focus()

    def _show_topbar(self, status: api.Status | None) -> None:
        mode = ("attached to the relay on this profile" if self.client.attached
                else "node runs in this window")
        parts: list[Content | str | tuple[str, str]] = [
            ("Pigeon", "bold $text-primary"), "  ", line(self.identity.get("name", "")),
            ("  ·  " + mode, "$text-muted")]
        if status is not None and status.listening:
            parts.append((f"  ·  listening on {', '.join(map(str, status.listening[:2]))}",
                          "$text-muted"))
        if not self.node_reachable:
            parts = [("The relay on this profile is not answering; retrying…",
                      "bold $text-error")]
        self.query_one("#topbar", Static).update(Content.assemble(*parts))

    def notice(self, text: object, *, error: bool = True) -> None:
        """A calm one-line message under the input (errors from the node, hints)."""
        widget = self.query_one("#notice", Static)
        widget.update(sentence(text, "$text-error" if error else "$text-muted"))
        widget.display = True

    def clear_notice(self) -> None:
        self.query_one("#notice", Static).display = False

    # ---- node calls (workers) ---------------------------------------------------------

    @work(group="events", exit_on_error=False)
    async def listen(self) -> None:
        """Forward node events as messages; an attached relay may go away and come back."""
        delay = 1.0
        while True:
            try:
                async for event in self.client.events():
                    delay = 1.0
                    self.post_message(NodeEventArrived(event))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the relay stopped, or sent garbage
                log.warning("event stream ended: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    @work(group="conversations", exclusive=True, exit_on_error=False)
    async def refresh_conversations(self, select: str | None = None) -> None:
        try:
            conversations = await self.client.conversations()
        except Exception as exc:
            log.warning("conversations failed: %s", exc)
            return
        self.conversations = {c.name: c for c in conversations}
        if select is not None and select in self.conversations:
            self.current = select
        if self.current not in self.conversations:
            self.current = self._default_conversation(conversations)
        if self.current is not None:
            # The open conversation is being read: never badge it.
            cur = self.conversations[self.current]
            self.conversations[self.current] = api.ConversationInfo(
                name=cur.name, kind=cur.kind, unread=0, verified=cur.verified)
        clist = self.query_one(ConversationList)
        changed = clist.current != self.current
        clist.show(self.conversations.values(), self.current)
        if changed and self.current is not None:
            self.open_conversation(self.current)

    @staticmethod
    def _default_conversation(conversations: list[api.ConversationInfo]) -> str | None:
        for conv in conversations:
            if conv.unread:
                return conv.name
        contacts = [c.name for c in conversations if c.kind == "contact"]
        if contacts:
            return contacts[0]
        return conversations[0].name if conversations else None

    def open_conversation(self, name: str) -> None:
        self.current = name
        self._show_title()
        self.load_messages(name)

    @work(group="messages", exclusive=True, exit_on_error=False)
    async def load_messages(self, name: str) -> None:
        try:
            messages = await self.client.messages(name)
        except Exception as exc:
            self.notice(f"Could not load the conversation: {exc}")
            return
        if name != self.current:
            return
        self.query_one(MessageView).show(messages, self._empty_hint())
        await self._mark_read(name)

    async def _mark_read(self, name: str) -> None:
        try:
            await self.client.mark_read(name)
        except Exception as exc:
            log.warning("mark_read failed: %s", exc)
        self.refresh_conversations()

    @work(group="send", exit_on_error=False)
    async def send_text(self, conversation: str, text: str) -> None:
        try:
            msg_id = await self.client.send(conversation, text)
        except Exception as exc:
            compose = self.query_one("#compose", Input)
            if not compose.value:
                compose.value = text  # nothing typed is lost
            self.notice(exc if isinstance(exc, UserError) else f"Not sent: {exc}")
            return
        self.clear_notice()
        if conversation == self.current:
            self.query_one(MessageView).add(api.ChatMessage(
                id=msg_id, conversation=conversation, outgoing=True, sender="", text=text,
                at=self.clock(), sent_at=self.clock(), state=api.STATE_QUEUED,
                verified_sender=True))
        self.refresh_status()

    @work(group="status", exclusive=True, exit_on_error=False)
    async def refresh_status(self) -> None:
        try:
            status = await self.client.status()
            peers = [api.from_dict(api.PeerInfo, p) for p in status.peers]  # one round trip
        except Exception as exc:
            log.warning("status failed: %s", exc)
            if self.node_reachable:
                self.node_reachable = False
                self._show_topbar(None)
            return
        if not self.node_reachable:  # the relay is back: catch up on what we missed
            self.node_reachable = True
            self.refresh_conversations()
            if self.current is not None:
                self.load_messages(self.current)
        self.peers = {p.link_key: p for p in peers}
        panel = self.query_one(PeerPanel)
        panel.show_peers(list(self.peers.values()))
        panel.show_carried(status.carried_for_others)
        panel.show_transports(status.transports)
        self._show_topbar(status)

    # ---- node events ------------------------------------------------------------------

    def on_node_event_arrived(self, message: NodeEventArrived) -> None:
        try:
            self.apply_event(message.event)
        except Exception:
            log.exception("ignored a malformed node event")

    def apply_event(self, event: api.NodeEvent) -> None:
        if isinstance(event, api.MessageReceived):
            self._message_received(api.from_dict(api.InboxMessage, event.message))
        elif isinstance(event, api.MessageStateChanged):
            view = self.query_one(MessageView)
            if event.state == api.STATE_QUEUED and view.state_of(str(event.id)) is None:
                # Sent from elsewhere (`pigeon send` while this window is open): reload.
                if self.current is not None:
                    self.load_messages(self.current)
                self.refresh_conversations()
            view.set_state(str(event.id), str(event.state))
        elif isinstance(event, api.PeerChanged):
            peer = api.from_dict(api.PeerInfo, event.peer)
            if event.connected:
                self.peers[str(peer.link_key)] = peer
            else:
                self.peers.pop(str(peer.link_key), None)
                self.refresh_status()
            self.query_one(PeerPanel).show_peers(list(self.peers.values()))
        elif isinstance(event, api.KeyWarning):
            from tui.screens.contacts import KeyWarningScreen
            self.app.push_screen(KeyWarningScreen(event))
            self.refresh_conversations()

    def _message_received(self, msg: api.InboxMessage) -> None:
        now = time.monotonic()
        if self.bell and now - self._last_bell >= BELL_GAP_S:
            self._last_bell = now
            self.app.bell()
        if msg.conversation == self.current:
            self.query_one(MessageView).add(api.ChatMessage(
                id=str(msg.id), conversation=msg.conversation, outgoing=False,
                sender=msg.sender, text=msg.text, at=msg.received_at, sent_at=msg.sent_at,
                state="", verified_sender=bool(msg.verified_sender)))
            self._mark_read_soon(msg.conversation)
        else:
            self.refresh_conversations()

    @work(group="read", exclusive=True, exit_on_error=False)
    async def _mark_read_soon(self, name: str) -> None:
        await self._mark_read(name)

    # ---- user input ---------------------------------------------------------------------

    def on_conversation_list_chosen(self, message: ConversationList.Chosen) -> None:
        self.open_conversation(message.name)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "compose":
            return
        text = event.value
        if not text.strip():
            return
        if self.current is None:
            self.notice("Choose a conversation first (Tab, then the arrow keys).")
            return
        event.input.value = ""
        self.send_text(self.current, text)

    def _show_title(self) -> None:
        conv = self.conversations.get(self.current or "")
        compose = self.query_one("#compose", Input)
        title: list[Content | str | tuple[str, str]]
        if conv is None:
            title = [("No conversation open", "$text-muted")]
        elif conv.kind == "contact":
            title = [line(conv.name, "bold"), "  "]
            title += [("✔ verified", "$text-success")] if conv.verified else [
                ("not verified: compare fingerprints (F5)", "$text-warning")]
        elif conv.kind == "channel" and conv.name.lower() == PUBLIC:
            title = [line(conv.name, "bold"),
                     ("  public broadcast: anyone nearby can read and post", "$text-muted")]
        elif conv.kind == "channel":
            title = [line(conv.name, "bold"),
                     ("  channel: anyone with its invite can read (F5)", "$text-muted")]
        else:
            title = [line(conv.name, "bold italic"),
                     ("  not in your contacts: anyone can claim any name", "$text-warning")]
        self.query_one("#conv-title", Static).update(Content.assemble(*title))
        stranger = conv is not None and conv.kind == "stranger"
        compose.disabled = stranger or conv is None
        compose.placeholder = ("You can only reply to contacts: add their code (F3)" if stranger
                               else "Write a message, Enter sends")
        self.clear_notice()

    def _empty_hint(self) -> Content:
        return Content.styled(
            "No messages yet. What you send waits here (◷ queued) until a device in range "
            "can carry it; ✓ means handed on, ✓✓ means it arrived.", "$text-muted")

    # ---- actions ------------------------------------------------------------------------

    def action_focus_input(self) -> None:
        compose = self.query_one("#compose", Input)
        if not compose.disabled:
            compose.focus()

    def action_my_code(self) -> None:
        from tui.screens.first_run import MyCodeScreen
        self.app.push_screen(MyCodeScreen(self.identity))

    def action_add_contact(self) -> None:
        from tui.screens.contacts import AddContactScreen

        def added(info: api.ContactInfo | None) -> None:
            if info is not None:
                self.refresh_conversations(select=info.name)
        self.app.push_screen(AddContactScreen(self.client), added)

    def action_channels(self) -> None:
        from tui.screens.channels import ChannelScreen

        def joined(info: api.ChannelInfo | None) -> None:
            if info is not None:
                self.refresh_conversations(select=f"#{info.name}")
        self.app.push_screen(ChannelScreen(self.client), joined)

    @work(group="details", exclusive=True, exit_on_error=False)
    async def action_details(self) -> None:
        from tui.screens.channels import InviteScreen
        from tui.screens.contacts import ContactScreen
        conv = self.conversations.get(self.current or "")
        if conv is None:
            return
        try:
            if conv.kind == "contact":
                contact = next((c for c in await self.client.contacts() if c.name == conv.name),
                               None)
                if contact is not None:
                    await self.app.push_screen_wait(ContactScreen(
                        self.client, contact, self.identity.get("fingerprint", "")))
                    self.refresh_conversations()
            elif conv.kind == "channel":
                channel = next((c for c in await self.client.channels()
                                if f"#{c.name}".lower() == conv.name.lower()), None)
                if channel is not None:
                    await self.app.push_screen_wait(InviteScreen(channel))
            else:
                self.notice("This sender is not in your contacts. Ask them for their contact "
                            "code in person, then add it (F3).", error=False)
        except Exception as exc:
            self.notice(f"Could not load the details: {exc}")
