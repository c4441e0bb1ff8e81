"""The main screen's building blocks.

Each widget is told what to show by its screen (attributes down) and reports what the
user did with a message (messages up); none of them talks to the node. Every string that
came from a peer goes through ``tui.safe`` before it is put into a widget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

from mesh import api
from tui.format import STATES, bluetooth_line, later_state, peer_line, sync_progress
from tui.safe import line, plain

MAX_ROWS = 500
PUBLIC = "#public"


def conversation_label(conv: api.ConversationInfo) -> Content:
    """The list entry: name, a verified mark, and the unread count as a badge."""
    if conv.kind == "stranger":
        name = line(conv.name, "italic $text-muted")
    elif conv.kind == "channel" and conv.name.lower() == PUBLIC:
        name = Content.assemble(line(conv.name), (" broadcast", "$text-muted"))
    else:
        name = line(conv.name)
    parts: list[Content | str | tuple[str, str]] = [name]
    if conv.verified:
        parts.append((" ✔", "$text-success"))
    unread = conv.unread if isinstance(conv.unread, int) else 0
    if unread > 0:
        parts += [" ", (f" {min(unread, 999)} ", "bold reverse $accent")]
    return Content.assemble(*parts)


class ConversationList(OptionList):
    """Contacts, channels and strangers, grouped, with unread counts.

    Moving the highlight opens that conversation (no extra Enter needed), so arrow keys
    alone are enough to read through everything."""

    class Chosen(Message):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    GROUPS = (("channel", "Channels"), ("contact", "Contacts"), ("stranger", "Not in contacts"))

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._names: list[str | None] = []
        self.current: str | None = None

    def show(self, conversations: Iterable[api.ConversationInfo], current: str | None) -> None:
        by_kind: dict[str, list[api.ConversationInfo]] = {}
        for conv in conversations:
            by_kind.setdefault(conv.kind, []).append(conv)
        options: list[Option] = []
        names: list[str | None] = []
        for kind, title in self.GROUPS:
            entries = by_kind.get(kind, [])
            if not entries and kind != "contact":
                continue
            options.append(Option(Content.styled(title, "bold $text-muted"), disabled=True))
            names.append(None)
            if not entries:
                options.append(Option(Content.styled("  none yet: F3 adds one", "$text-muted"),
                                      disabled=True))
                names.append(None)
            for conv in entries:
                options.append(Option(Content.assemble("  ", conversation_label(conv))))
                names.append(conv.name)
        self.current = current
        self._names = names
        self.set_options(options)
        if current in names:
            self.highlighted = names.index(current)

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        event.stop()
        name = self._names[event.option_index] if event.option_index < len(self._names) else None
        if name is not None and name != self.current:
            self.current = name
            self.post_message(self.Chosen(name))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        name = self._names[event.option_index] if event.option_index < len(self._names) else None
        if name is not None:
            self.current = name
            self.post_message(self.Chosen(name))


class MessageRow(Static):
    """One message: time, delivery state (ours only), sender, text.

    The state glyph sits in a fixed column right after the time, so it never wraps away
    from its message and a column of ticks can be read at a glance; the words are in the
    legend under the conversation."""

    def __init__(self, message: api.ChatMessage, stamp: str) -> None:
        super().__init__(classes="outgoing" if message.outgoing else "incoming")
        self.message = message
        self.stamp = stamp
        self.state = message.state
        self.update(self._content())

    def set_state(self, state: str) -> None:
        new = later_state(self.state, state)
        if new != self.state:
            self.state = new
            self.update(self._content())

    def _content(self) -> Content:
        msg = self.message
        if msg.outgoing:
            who = Content.styled("you", "bold $text-primary")
        elif msg.sender.startswith("~"):
            who = line(msg.sender, "italic $text-warning")
        else:
            who = line(msg.sender, "bold $text-secondary")
        parts: list[Content | str | tuple[str, str]] = [(self.stamp, "$text-muted"), " "]
        if msg.outgoing:
            glyph, _, style = STATES.get(self.state, ("?", "", ""))
            parts.append((f"{glyph:<2}", f"bold {style}"))
        else:
            parts.append("  ")
        parts += [" ", who]
        if not msg.outgoing and msg.verified_sender:
            parts.append((" ✔", "$text-success"))
        parts += [": ", plain(msg.text)]
        return Content.assemble(*parts)


class MessageView(VerticalScroll):
    """The open conversation. Rows are kept by message id so a delivery state change
    (an event from the node) updates one row in place."""

    def __init__(self, *, stamp: Callable[[float], str], id: str | None = None) -> None:
        super().__init__(id=id)
        self._stamp = stamp
        self._rows: dict[str, MessageRow] = {}
        self._states: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="empty")

    def show(self, messages: list[api.ChatMessage], empty_hint: Content) -> None:
        """Replace everything with ``messages`` (the newest ``MAX_ROWS``)."""
        self.remove_children(MessageRow)
        self._rows.clear()
        rows = [self._row(m) for m in messages[-MAX_ROWS:]]
        empty = self.query_one("#empty", Static)
        empty.update(empty_hint)
        empty.display = not rows
        if rows:
            self.mount_all(rows)
        self.call_after_refresh(self.scroll_end, animate=False)

    def add(self, message: api.ChatMessage) -> None:
        if message.id in self._rows:
            return
        at_bottom = self.scroll_y >= self.max_scroll_y - 1
        self.query_one("#empty", Static).display = False
        row = self._row(message)
        self.mount(row)
        if len(self._rows) > MAX_ROWS:
            oldest = next(iter(self._rows))
            self._rows.pop(oldest).remove()
        if at_bottom or message.outgoing:
            self.call_after_refresh(self.scroll_end, animate=False)

    def set_state(self, msg_id: str, state: str) -> None:
        """Remember the newest state even for rows not shown yet (a reload may race)."""
        self._states[msg_id] = later_state(self._states.get(msg_id, ""), state)
        row = self._rows.get(msg_id)
        if row is not None:
            row.set_state(state)

    def state_of(self, msg_id: str) -> str | None:
        row = self._rows.get(msg_id)
        return row.state if row is not None else None

    def _row(self, message: api.ChatMessage) -> MessageRow:
        row = MessageRow(message, self._stamp(message.at))
        if message.outgoing and message.id in self._states:
            row.set_state(self._states[message.id])
        self._rows[message.id] = row
        return row


class PeerPanel(Vertical):
    """Always visible: who is in range and over what, sync progress, what we carry."""

    def compose(self) -> ComposeResult:
        yield Static("Peers in range", classes="panel-title")
        yield Static(id="peer-lines")
        yield Static(id="sync-label")
        yield ProgressBar(id="sync-bar", show_eta=False, show_percentage=False)
        yield Static(id="carried")
        yield Static(id="radios")

    def on_mount(self) -> None:
        self.show_peers([])
        self.show_carried(None)

    def show_peers(self, peers: list[api.PeerInfo]) -> None:
        lines = self.query_one("#peer-lines", Static)
        if peers:
            lines.update(Content("\n").join(peer_line(p) for p in peers[:6]))
        else:
            lines.update(Content.styled("none right now", "$text-muted"))
        progress = sync_progress(peers)
        label = self.query_one("#sync-label", Static)
        bar = self.query_one("#sync-bar", ProgressBar)
        label.display = bar.display = progress is not None
        if progress is not None:
            done, total = progress
            if total:
                label.update(Content.styled(f"Syncing {done}/{total}", "$text-accent"))
                bar.update(total=total, progress=done)
            else:
                label.update(Content.styled("Syncing: comparing…", "$text-accent"))
                bar.update(total=None)

    def show_transports(self, transports: dict[str, str]) -> None:
        """What optional radios do ("Bluetooth off: no adapter"), so nobody waits for a
        BLE peer on a laptop that cannot have one. Nothing when the node says nothing."""
        radios = self.query_one("#radios", Static)
        ble = transports.get("ble")
        radios.display = ble is not None
        if ble is not None:
            radios.update(line(bluetooth_line(ble), "$text-muted"))

    def show_carried(self, count: int | None) -> None:
        carried = self.query_one("#carried", Static)
        if count is None:
            carried.update(Content.styled("Carrying: …", "$text-muted"))
        else:
            carried.update(Content.assemble(("Carrying ", "$text-muted"), (str(count), "bold"),
                                            (" for others", "$text-muted")))

