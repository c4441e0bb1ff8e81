"""The help screen (F1 or ?): keys, what the delivery marks mean, and a few honest
sentences about what Pigeon does and does not protect."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from mesh import api
from tui.format import STATE_HELP, state_text

KEYS = [
    ("Enter", "send the message you typed"),
    ("Tab", "move between the conversation list and the message line"),
    ("↑ ↓", "in the list: open the previous / next conversation"),
    ("F2", "your contact code and QR code, to share"),
    ("F3", "add a contact from their code"),
    ("F4", "create or join a channel"),
    ("F5", "details: verify a contact, or show a channel's invite"),
    ("Esc", "close a window, back to writing"),
    ("F1 or ?", "this help"),
    ("Ctrl+Q", "quit (a relay running on this profile keeps running)"),
]

NOTES = [
    "Messages travel from device to device. Nobody in between can read them, and a "
    "message can take minutes or days to arrive, depending on who meets whom.",
    "A contact marked ✔ verified is someone whose fingerprint you compared out loud. "
    "Without that, anyone could have handed you a fake code.",
    "Names starting with ~ are people who are not in your contacts. Anyone can claim any "
    "name; the letters in brackets come from their key.",
    "The public channel (#public) can be read by everyone nearby. Channels you create are "
    "readable by anyone with their invite or passphrase.",
    "Peers in range shows the devices connected right now and how (LAN, BLE, TCP). "
    "Carrying counts sealed messages this device holds for other people.",
]


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"), Binding("f1", "close", "Close", show=False),
        Binding("question_mark", "close", "Close", show=False)]

    def compose(self) -> ComposeResult:
        keys = Content("\n").join(
            Content.assemble((f"{key:10}", "bold $text-accent"), what) for key, what in KEYS)
        states = Content("\n").join(
            Content.assemble(state_text(state), " " * (13 - len(state_text(state).plain)),
                             (STATE_HELP[state], "$text-muted"))
            for state in api.OUTBOX_STATES)
        with VerticalScroll(classes="dialog", id="help") as dialog:
            dialog.border_title = Content("Pigeon help")
            yield Static(keys, classes="section")
            yield Static(Content.styled("Your messages", "bold"), classes="subtitle")
            yield Static(states, classes="section")
            yield Static(Content.styled("Good to know", "bold"), classes="subtitle")
            yield Static(Content("\n\n").join(Content(n) for n in NOTES), classes="section")
            yield Button("Close", id="close", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#help", VerticalScroll).focus()  # start at the top; arrows scroll

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
