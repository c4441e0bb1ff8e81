"""Contacts: add one from a pasted code, compare fingerprints and mark verified, and the
two loud warnings (a saved contact's key changed; a stranger claims a contact's name).

A key change is never accepted in passing: the add-contact flow stops at a full warning,
and only ticking "I compared..." and pressing the red button replaces the key. That
holds in-process and attached alike: the screen compares fingerprints itself before
asking the node, and also handles the node's ``KeyChangedError``.
"""

from __future__ import annotations

from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Static

from mesh import api
from mesh.chat import KeyChangedError
from mesh.client import NodeClient
from mesh.errors import UserError
from mesh.identity import decode_contact
from tui.safe import line, sentence


def _preview(code: str) -> tuple[str, str] | UserError:
    """(fingerprint, claimed name) of a pasted code, or the UserError saying what is wrong."""
    try:
        public, claimed = decode_contact(code)
    except UserError as exc:
        return exc
    return public.fingerprint, claimed


class AddContactScreen(ModalScreen[api.ContactInfo | None]):
    """Paste a contact code, check the fingerprint it carries, save it under a name."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, client: NodeClient) -> None:
        super().__init__()
        self.client = client

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog", id="add-contact") as dialog:
            dialog.border_title = Content("Add a contact")
            yield Static(Content("Paste the code they gave you (it starts with pigeon1), or "
                                 "type it from their screen. Spaces and case do not matter."),
                         classes="hint")
            yield Label("Contact code")
            yield Input(id="code", placeholder="pigeon1…")
            yield Static(id="preview")
            yield Label("Name to save them under")
            yield Input(id="name", placeholder="the name in the code, if left empty",
                        max_length=64)
            yield Static(id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Add contact", id="add", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#error", Static).display = False
        self.query_one("#preview", Static).display = False
        self.query_one("#code", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id != "code":
            return
        preview = self.query_one("#preview", Static)
        self.query_one("#error", Static).display = False
        if not event.value.strip():
            preview.display = False
            return
        result = _preview(event.value)
        if isinstance(result, UserError):
            preview.update(sentence(result, "$text-warning"))
        else:
            fingerprint, claimed = result
            preview.update(Content.assemble(
                ("Calls themselves ", "$text-muted"), line(claimed, "bold"), "\n",
                ("Fingerprint ", "$text-muted"), line(fingerprint, "bold")))
        preview.display = True

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "code":
            self.query_one("#name", Input).focus()
        else:
            self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "add":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def error(self, text: object) -> None:
        widget = self.query_one("#error", Static)
        widget.update(sentence(text))
        widget.display = True

    def submit(self) -> None:
        code = self.query_one("#code", Input).value
        result = _preview(code)
        if isinstance(result, UserError):
            self.error(result if code.strip() else "Paste a contact code first.")
            self.query_one("#code", Input).focus()
            return
        name = self.query_one("#name", Input).value.strip() or result[1]
        self.add(name, code, result[0])

    @work(group="contacts", exclusive=True, exit_on_error=False)
    async def add(self, name: str, code: str, fingerprint: str) -> None:
        old: api.ContactInfo | None = None
        try:
            saved = {c.name.lower(): c for c in await self.client.contacts()}
            old = saved.get(name.lower())
            if old is not None and old.fingerprint != fingerprint:
                raise KeyChangedError(f"the code for {old.name!r} carries a different key")
            info = await self.client.add_contact(name, code)
        except KeyChangedError as exc:
            old_fp = old.fingerprint if old is not None else ""
            confirmed = await self.app.push_screen_wait(
                KeyChangeScreen(old.name if old else name, old_fp, fingerprint, str(exc)))
            if not confirmed:
                self.dismiss(None)
                return
            try:
                info = await self.client.replace_contact_key(old.name if old else name, code)
            except Exception as replace_error:
                self.error(replace_error)
                return
            self.app.notify("Key replaced. The contact is no longer marked verified.",
                            markup=False, severity="warning")
        except UserError as exc:
            self.error(exc)
            return
        except Exception as exc:
            self.error(f"Could not add the contact: {exc}")
            return
        self.dismiss(info)


class KeyChangeScreen(ModalScreen[bool]):
    """LOUD: the code for a saved contact carries a different key. True = replace it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "keep", "Keep the old key")]

    def __init__(self, name: str, old_fingerprint: str, new_fingerprint: str,
                 detail: str = "") -> None:
        super().__init__(classes="danger")
        self.contact = name
        self.old_fingerprint = old_fingerprint
        self.new_fingerprint = new_fingerprint
        self.detail = detail

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog danger", id="key-change"):
            yield Static(Content.assemble("⚠  THE KEY OF ", line(self.contact),
                                          " HAS CHANGED  ⚠"), classes="alarm")
            yield Static(Content.assemble(
                "The code you entered for ", line(self.contact, "bold"),
                " carries a different key than the one you saved. That happens after a "
                "reinstall or with a new device, and also when someone is impersonating ",
                line(self.contact), " or listening in between."), classes="body")
            yield Static(Content.assemble(
                ("Saved key    ", "$text-muted"), line(self.old_fingerprint or "unknown", "bold"),
                "\n", ("New key      ", "$text-muted"),
                line(self.new_fingerprint, "bold $text-error")), classes="fingerprints")
            yield Static(Content.assemble(
                "Keep the old key unless you compared the new fingerprint with ",
                line(self.contact), " in person, or on a call where you know their voice."),
                classes="advice")
            yield Checkbox(Content.assemble("I compared the new fingerprint with ",
                                            line(self.contact), " and it matches"),
                           id="confirm")
            with Horizontal(classes="buttons"):
                yield Button("Keep the old key", id="keep", variant="primary")
                yield Button("Replace the key", id="replace", variant="error", disabled=True)

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#replace", Button).disabled = not event.value

    def on_button_pressed(self, event: Button.Pressed) -> None:
        replace = event.button.id == "replace" and self.query_one("#confirm", Checkbox).value
        self.dismiss(replace)

    def action_keep(self) -> None:
        self.dismiss(False)


class KeyWarningScreen(ModalScreen[None]):
    """LOUD: someone with another key sent a message under a saved contact's name."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "I understand")]

    def __init__(self, warning: api.KeyWarning) -> None:
        super().__init__(classes="danger")
        self.warning = warning

    def compose(self) -> ComposeResult:
        w = self.warning
        with VerticalScroll(classes="dialog danger", id="key-warning"):
            yield Static(Content.assemble("⚠  SOMEONE ELSE IS USING THE NAME ", line(w.contact),
                                          "  ⚠"), classes="alarm")
            yield Static(Content.assemble(
                "A message arrived from a key that is not the one you saved for ",
                line(w.contact, "bold"), ". It is NOT shown as theirs: it is kept apart as ",
                line(w.claimed_by, "bold italic"), "."), classes="body")
            yield Static(Content.assemble(("Their fingerprint  ", "$text-muted"),
                                          line(w.fingerprint, "bold $text-error")),
                         classes="fingerprints")
            yield Static(Content.assemble(
                "If ", line(w.contact), " has a new device, compare this fingerprint with them "
                "in person before trusting it. Until then, treat these messages as coming from "
                "a stranger who may be impersonating them."), classes="advice")
            with Horizontal(classes="buttons"):
                yield Button("I understand", id="ok", variant="primary")

    def on_mount(self) -> None:
        self.app.bell()
        self.query_one("#ok", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)


class ContactScreen(ModalScreen[None]):
    """Compare fingerprints with a contact and mark them verified (or not)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, client: NodeClient, contact: api.ContactInfo, my_fingerprint: str) -> None:
        super().__init__()
        self.client = client
        self.contact = contact
        self.my_fingerprint = my_fingerprint

    def compose(self) -> ComposeResult:
        c = self.contact
        with VerticalScroll(classes="dialog", id="contact") as dialog:
            dialog.border_title = Content.assemble("Contact: ", line(c.name))
            yield Static(id="verified-state")
            yield Static(Content.assemble(
                ("Their fingerprint  ", "$text-muted"), line(c.fingerprint, "bold"), "\n",
                ("Your fingerprint   ", "$text-muted"), line(self.my_fingerprint, "bold")),
                classes="fingerprints")
            yield Static(Content(
                "Read both fingerprints aloud to each other, in person or on a call where you "
                "recognise the voice. Mark them verified only if every digit matches."),
                classes="hint")
            yield Static(id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close")
                yield Button("", id="toggle", variant="success")

    def on_mount(self) -> None:
        self.query_one("#error", Static).display = False
        self._show()
        self.query_one("#toggle", Button).focus()

    def _show(self) -> None:
        verified = self.contact.verified
        self.query_one("#verified-state", Static).update(
            Content.styled("✔ verified: you compared fingerprints", "$text-success") if verified
            else Content.styled("not verified yet", "$text-warning"))
        toggle = self.query_one("#toggle", Button)
        toggle.label = Content("Mark not verified" if verified else "Fingerprints match: verify")
        toggle.variant = "default" if verified else "success"

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "toggle":
            self.toggle(not self.contact.verified)
        else:
            self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)

    @work(group="contacts", exclusive=True, exit_on_error=False)
    async def toggle(self, verified: bool) -> None:
        try:
            await self.client.verify_contact(self.contact.name, verified)
        except Exception as exc:
            error = self.query_one("#error", Static)
            error.update(sentence(exc))
            error.display = True
            return
        c = self.contact
        self.contact = api.ContactInfo(name=c.name, node_id=c.node_id, fingerprint=c.fingerprint,
                                       verified=verified)
        self._show()
