"""First run and start-up: create an identity, unlock an encrypted key file, show the
user's own contact code (text and QR), or explain calmly why the node could not start.

Key derivation from a passphrase (Argon2id) takes seconds; it runs in the backend off the
UI thread, and the screen says so instead of looking frozen.
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, Static

from mesh.errors import UserError
from tui.backend import Backend
from tui.qr import qr_text
from tui.safe import line, sentence

SHARE_HINT = ("Share it so people can add you: let them scan the QR code, or send them the "
              "text. It holds your public key and your name, nothing secret.")


class CreateIdentityScreen(Screen[bool]):
    """Name plus an optional passphrase; dismisses with True once the identity exists."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "app.quit", "Quit")]

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="form") as form:
            form.border_title = Content("Welcome to Pigeon")
            yield Static(Content(
                "Pigeon passes encrypted messages from device to device, with no internet "
                "and no server. First, choose the name your contacts will see."),
                classes="hint")
            yield Label("Your name")
            yield Input(id="name", placeholder="e.g. Sam", max_length=64)
            yield Label("Passphrase (optional)")
            yield Static(Content(
                "Encrypts your key on this device. If the device is taken, the key cannot "
                "be used without it. There is no way to recover a forgotten passphrase."),
                classes="hint")
            yield Input(id="pass1", password=True, placeholder="leave empty for none")
            yield Input(id="pass2", password=True, placeholder="repeat the passphrase")
            yield Static(id="error", classes="error")
            yield Button("Create my identity", id="create", variant="primary")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#error", Static).display = False
        self.query_one("#name", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        following = {"name": "#pass1", "pass1": "#pass2"}
        if event.input.id in following:
            self.query_one(following[event.input.id], Input).focus()
        else:
            self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "create":
            self.submit()

    def error(self, text: object) -> None:
        widget = self.query_one("#error", Static)
        widget.update(sentence(text))
        widget.display = True

    def submit(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        pass1 = self.query_one("#pass1", Input).value
        pass2 = self.query_one("#pass2", Input).value
        if not name:
            self.error("Please enter a name.")
            self.query_one("#name", Input).focus()
            return
        if pass1 != pass2:
            self.error("The two passphrases differ. Type them again.")
            self.query_one("#pass2", Input).value = ""
            self.query_one("#pass2", Input).focus()
            return
        button = self.query_one("#create", Button)
        button.disabled = True
        button.label = Content("Creating… (a passphrase takes a few seconds)" if pass1
                               else "Creating…")
        self.create(name, pass1 or None)

    @work(group="identity", exclusive=True, exit_on_error=False)
    async def create(self, name: str, passphrase: str | None) -> None:
        try:
            await self.backend.create_identity(name, passphrase)
        except UserError as exc:
            self.error(exc)
        except Exception as exc:
            self.error(f"Could not create the identity: {exc}")
        else:
            self.dismiss(True)
            return
        button = self.query_one("#create", Button)
        button.disabled = False
        button.label = Content("Create my identity")


class UnlockScreen(Screen[bool]):
    """The key file is encrypted and no --passphrase-env was given: ask for it here."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+q", "app.quit", "Quit")]

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="form") as form:
            form.border_title = Content("Unlock Pigeon")
            yield Static(Content("Your key on this device is protected by a passphrase."),
                         classes="hint")
            yield Input(id="passphrase", password=True, placeholder="passphrase")
            yield Static(id="error", classes="error")
            yield Button("Unlock", id="unlock", variant="primary")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#error", Static).display = False
        self.query_one("#passphrase", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.submit()

    def submit(self) -> None:
        value = self.query_one("#passphrase", Input).value
        if not value:
            return
        button = self.query_one("#unlock", Button)
        button.disabled = True
        button.label = Content("Unlocking… (this takes a few seconds)")
        self.unlock(value)

    @work(group="identity", exclusive=True, exit_on_error=False)
    async def unlock(self, passphrase: str) -> None:
        try:
            await self.backend.unlock(passphrase)
        except Exception as exc:
            error = self.query_one("#error", Static)
            error.update(sentence(exc if isinstance(exc, UserError) else f"Could not unlock: {exc}"))
            error.display = True
            self.query_one("#passphrase", Input).value = ""
            button = self.query_one("#unlock", Button)
            button.disabled = False
            button.label = Content("Unlock")
            return
        self.dismiss(True)


class MyCodeScreen(ModalScreen[None]):
    """The user's own contact code as text and as a QR code, and their fingerprint."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss_screen", "Close"),
                Binding("c", "copy", "Copy code")]

    def __init__(self, identity: dict[str, str], *, first_run: bool = False) -> None:
        super().__init__()
        self.identity = identity
        self.first_run = first_run

    def compose(self) -> ComposeResult:
        code = self.identity.get("contact", "")
        with Horizontal(classes="dialog code-card", id="my-code") as card:
            title = "You are set up" if self.first_run else "Your contact code"
            card.border_title = Content.assemble(f"{title}: ", line(self.identity.get("name", "")))
            if code:
                yield Static(qr_text(code, border=1), classes="qr")
            with VerticalScroll(classes="code-info"):
                yield Static(Content(SHARE_HINT), classes="hint")
                yield Static(line(code), id="code-text", classes="code")
                yield Static(Content.assemble(
                    ("Fingerprint\n", "$text-muted"),
                    line(self.identity.get("fingerprint", ""), "bold")), id="fingerprint")
                yield Static(Content("Compare fingerprints aloud with a contact, in person or "
                                     "on a call you trust, to be sure nobody is in between."),
                             classes="hint")
                with Horizontal(classes="buttons"):
                    yield Button("Copy", id="copy")
                    yield Button("Start chatting" if self.first_run else "Close", id="close",
                                 variant="primary")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        else:
            self.dismiss(None)

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.identity.get("contact", ""))
        self.app.notify("Copied, if your terminal allows it (otherwise select the text).",
                        markup=False)

    def action_dismiss_screen(self) -> None:
        self.dismiss(None)


class FatalScreen(Screen[None]):
    """The node could not start. Say why, plainly, and let the user quit."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "give_up", "Quit"), Binding("escape", "give_up", "Quit")]

    def __init__(self, message: object) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="form") as form:
            form.border_title = Content("Pigeon could not start")
            yield Static(sentence(self.message), classes="error")
            yield Button("Quit", id="quit", variant="primary")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_give_up()

    def action_give_up(self) -> None:
        self.app.exit(return_code=2)  # like the CLI's exit status for a UserError
