"""Channels: create or join one by name and passphrase or by invite code, and show a
channel's invite so others can join.

Creating and joining are the same operation (the key is derived from name + passphrase,
or carried by the invite), which the screen says plainly so nobody wonders which to use.
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from mesh import api
from mesh.client import NodeClient
from tui.qr import qr_text
from tui.safe import line, sentence


class ChannelScreen(ModalScreen[api.ChannelInfo | None]):
    """Join (or create) a channel; dismisses with its ``ChannelInfo``."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, client: NodeClient) -> None:
        super().__init__()
        self.client = client

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="channels") as dialog:
            dialog.border_title = Content("Create or join a channel")
            yield Static(Content(
                "A channel is a group chat. Everyone who uses the same name and passphrase is "
                "in the same channel, so creating and joining are the same step. Pick a long "
                "passphrase: anyone who guesses it can read along."), classes="hint")
            yield Label("Channel name")
            yield Input(id="name", placeholder="e.g. neighbours", max_length=64)
            yield Label("Passphrase")
            yield Input(id="passphrase", password=True, placeholder="shared with the members")
            yield Static(Content.styled("or", "$text-muted"), classes="or")
            yield Label("Invite code")
            yield Input(id="invite", placeholder="pigeonch1… (the name above is optional then)")
            yield Static(id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Join channel", id="join", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#error", Static).display = False
        self.query_one("#name", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        following = {"name": "#passphrase"}
        if event.input.id in following and not self.query_one("#invite", Input).value:
            self.query_one(following[event.input.id], Input).focus()
        else:
            self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "join":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def submit(self) -> None:
        name = self.query_one("#name", Input).value.strip() or None
        passphrase = self.query_one("#passphrase", Input).value or None
        invite = self.query_one("#invite", Input).value.strip() or None
        self.join(name, passphrase, invite)

    @work(group="channels", exclusive=True, exit_on_error=False)
    async def join(self, name: str | None, passphrase: str | None, invite: str | None) -> None:
        try:
            info = await self.client.join_channel(name, passphrase=passphrase, invite=invite)
        except Exception as exc:
            error = self.query_one("#error", Static)
            error.update(sentence(exc))
            error.display = True
            return
        self.app.notify(f"Joined #{info.name}. F5 shows its invite.", markup=False)
        self.dismiss(info)


class InviteScreen(ModalScreen[None]):
    """A channel's invite code (text and QR), with what sharing it means."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"), Binding("c", "copy", "Copy invite")]

    def __init__(self, channel: api.ChannelInfo) -> None:
        super().__init__()
        self.channel = channel

    def compose(self) -> ComposeResult:
        ch = self.channel
        with Horizontal(classes="dialog code-card", id="invite") as card:
            card.border_title = Content.assemble("Invite to ", line(f"#{ch.name}"))
            if ch.invite:
                yield Static(qr_text(ch.invite, border=1), classes="qr")
            with VerticalScroll(classes="code-info"):
                if ch.public:
                    yield Static(Content(
                        "The public channel is open to everyone, and so is this code. Post "
                        "nothing here you would not say in the street."), classes="hint")
                else:
                    yield Static(Content(
                        "Anyone with this code can read and post in this channel. Share it only "
                        "with people you would let in, ideally in person."),
                        classes="hint warning")
                yield Static(line(ch.invite), id="code-text", classes="code")
                with Horizontal(classes="buttons"):
                    yield Button("Copy", id="copy")
                    yield Button("Close", id="close", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        else:
            self.dismiss(None)

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.channel.invite)
        self.app.notify("Copied, if your terminal allows it (otherwise select the text).",
                        markup=False)

    def action_close(self) -> None:
        self.dismiss(None)
