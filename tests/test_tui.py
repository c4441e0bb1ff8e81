"""The chat app driven through Textual's Pilot against real nodes (SQLite stores, real
sessions) joined by the memory transport, plus the hostile-display and first-run paths.

Nodes run on a fixed clock; links are opened and closed by hand, so each delivery step
(queued, handed to a relay, delivered) happens exactly when the test says.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Button, Checkbox, Input

from mesh import api, control
from mesh.client import LocalClient
from mesh.host import ChatHost
from mesh.identity import Identity
from mesh.node import Node, NodeConfig
from mesh.profile import Profile
from tests.tui_support import (
    FakeClient,
    FixedClock,
    MemLink,
    code_of,
    make_node,
    screen_text,
    seeded_identity,
    until,
)
from tui.app import PigeonApp
from tui.backend import ClientBackend
from tui.screens.contacts import AddContactScreen, KeyChangeScreen, KeyWarningScreen
from tui.screens.first_run import CreateIdentityScreen, MyCodeScreen, UnlockScreen
from tui.screens.main import MainScreen
from tui.widgets import MessageRow

SIZE = (100, 30)


def app_for(node: Node, **kwargs: Any) -> PigeonApp:
    kwargs.setdefault("bell", False)
    kwargs.setdefault("status_interval", 0.2)
    return PigeonApp(ClientBackend(LocalClient(node)), **kwargs)


def row_state(app: PigeonApp, text: str) -> str | None:
    for row in app.screen.query(MessageRow):
        if row.message.text == text:
            return row.state
    return None


def on_main(app: PigeonApp) -> bool:
    return isinstance(app.screen, MainScreen) and bool(app.screen.conversations)


async def click(pilot: Any, selector: str) -> None:
    """Click once the layout has settled (a live preview may move the button)."""
    await pilot.pause()
    assert await pilot.click(selector), f"{selector} was not under the pointer"


async def type_text(pilot: Any, text: str) -> None:
    await pilot.press(*["space" if c == " " else c for c in text])


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


async def test_two_apps_message_arrives_and_ticks_move_queued_relayed_delivered(
        tmp_path: Path, clock: FixedClock) -> None:
    alice = make_node(tmp_path, "alice", Identity.generate("alice"), clock)
    relay = make_node(tmp_path, "relay", Identity.generate("relay"), clock)
    bob = make_node(tmp_path, "bob", Identity.generate("bob"), clock)
    alice.add_contact("bob", code_of(bob))
    bob.add_contact("alice", code_of(alice))
    app_a, app_b = app_for(alice), app_for(bob, bell=True)
    rings: list[int] = []
    app_b.bell = lambda: rings.append(1)  # type: ignore[method-assign]
    try:
        async with app_a.run_test(size=SIZE) as pa, app_b.run_test(size=SIZE) as pb:
            await until(pa, lambda: on_main(app_a), what="alice's main screen")
            await until(pb, lambda: on_main(app_b), what="bob's main screen")
            assert app_a.main is not None and app_a.main.current == "bob"
            await type_text(pa, "hello bob")
            await pa.press("enter")
            await until(pa, lambda: row_state(app_a, "hello bob") == api.STATE_QUEUED,
                        what="queued row")
            assert "◷  you: hello bob" in screen_text(app_a)

            ab = MemLink(alice, relay)  # alice meets a relay: the message is handed on
            await until(pa, lambda: row_state(app_a, "hello bob") == api.STATE_RELAYED,
                        what="relayed tick")
            assert "✓  you: hello bob" in screen_text(app_a)
            await until(pa, lambda: "memory" in screen_text(app_a), what="peer in range")
            await ab.close()

            rb = MemLink(relay, bob)  # the relay meets bob
            await until(pb, lambda: "hello bob" in screen_text(app_b), what="bob sees it")
            assert rings, "a new message rings the bell"
            await rb.close()

            ab2 = MemLink(alice, relay)  # the receipt travels back
            await until(pa, lambda: row_state(app_a, "hello bob") == api.STATE_DELIVERED,
                        what="delivered ticks")
            assert "✓✓ you: hello bob" in screen_text(app_a)
            await ab2.close()
            await until(pa, lambda: "none right now" in screen_text(app_a), what="peer gone")
    finally:
        for node in (alice, relay, bob):
            await node.stop()
            node.store.close()


async def test_a_burst_of_messages_rings_the_bell_once(tmp_path: Path, clock: FixedClock) -> None:
    alice = make_node(tmp_path, "alice", Identity.generate("alice"), clock)
    bob = make_node(tmp_path, "bob", Identity.generate("bob"), clock)
    alice.add_contact("bob", code_of(bob))
    bob.add_contact("alice", code_of(alice))
    for i in range(20):
        alice.send("bob", f"queued while apart {i}")
    app = app_for(bob, bell=True)
    rings: list[int] = []
    app.bell = lambda: rings.append(1)  # type: ignore[method-assign]
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_main(app), what="bob's main screen")
            link = MemLink(alice, bob)
            await until(pilot, lambda: len(bob.inbox()) == 20, what="all 20 arrive")
            await pilot.pause(0.2)
            assert rings == [1], f"the bell rang {len(rings)} times for one sync"
            await link.close()
    finally:
        for node in (alice, bob):
            await node.stop()
            node.store.close()


async def test_markup_and_escape_sequences_from_peers_are_shown_literally(
        tmp_path: Path, clock: FixedClock) -> None:
    alice = make_node(tmp_path, "alice", Identity.generate("alice"), clock)
    bob = make_node(tmp_path, "bob", Identity.generate("bob"), clock)
    carol = make_node(tmp_path, "carol", Identity.generate("[reverse]carol[/]"), clock)
    alice.add_contact("bob", code_of(bob))
    bob.add_contact("[bold red]x[/]", code_of(alice))  # bob saved alice under a hostile name
    nasty = "\x1b[2J\x1b]0;pwned\x07 and [blink]markup[/blink] \x9b31m\u202eevil"
    alice.send("bob", nasty)
    carol.send("#public", "[link=http://x]click[/link] \x1b[31mred")
    app = app_for(bob)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_main(app), what="main screen")
            links = [MemLink(alice, bob), MemLink(carol, bob)]
            await until(pilot, lambda: "pwned" in screen_text(app), what="the message")
            text = screen_text(app)
            assert "[bold red]x[/]" in text  # the contact's name, not red bold "x"
            for piece in ("␛[2J␛]0;pwned␇ and", "[blink]markup[/blink] �31m�evil"):
                assert piece in text
            assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
            svg = app.export_screenshot()
            assert "\x1b" not in svg and "pwned" in svg

            assert isinstance(app.screen, MainScreen)
            app.screen.open_conversation("#public")
            await until(pilot, lambda: "click[/link]" in screen_text(app), what="channel text")
            text = screen_text(app)
            assert "~[reverse]carol[/] (" in text  # a stranger: marked, literal
            assert "[link=http://x]click[/link] ␛[31mred" in text
            for link in links:
                await link.close()
    finally:
        for node in (alice, bob, carol):
            await node.stop()
            node.store.close()


async def test_malformed_events_are_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    client = FakeClient(seeded_identity("sam", 1), [(seeded_identity("ana", 2), False)])
    client.convs = [api.ConversationInfo(name="ana", kind="contact", unread=0, verified=False)]
    app = PigeonApp(ClientBackend(client), bell=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: on_main(app), what="main screen")
        for bad in [api.MessageReceived(message={"bogus": 1}),
                    api.MessageReceived(message="not a dict"),  # type: ignore[arg-type]
                    api.PeerChanged(peer={"link_key": 1}, connected=True),
                    api.KeyWarning(contact=None, claimed_by=3, fingerprint=[]),  # type: ignore[arg-type]
                    api.MessageStateChanged(id=None, state=7)]:  # type: ignore[arg-type]
            client.queue.put_nowait(bad)
        good = api.InboxMessage(id="m1", conversation="ana", sender="ana", text=12345,  # type: ignore[arg-type]
                                sent_at="x", received_at=None, kind="direct",  # type: ignore[arg-type]
                                verified_sender=False)
        client.queue.put_nowait(api.MessageReceived(message=api.to_dict(good)))
        await until(pilot, lambda: any(isinstance(s, KeyWarningScreen) for s in app.screen_stack)
                    or "<int>" in screen_text(app), what="events processed")
        while isinstance(app.screen, KeyWarningScreen):
            await pilot.press("escape")
            await pilot.pause()
        await until(pilot, lambda: "<int>" in screen_text(app), what="the odd message shown")
        assert app.is_running
    assert "ignored a malformed node event" in caplog.text


async def test_add_contact_bad_code_key_change_refused_then_confirmed(
        tmp_path: Path, clock: FixedClock) -> None:
    alice = make_node(tmp_path, "alice", Identity.generate("alice"), clock)
    bob, impostor = Identity.generate("bob"), Identity.generate("bob")
    from mesh.identity import encode_contact
    alice.add_contact("bob", encode_contact(bob.public, "bob"))
    new_code = encode_contact(impostor.public, "bob")
    app = app_for(alice)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_main(app), what="main screen")
            await pilot.press("f3")
            await until(pilot, lambda: isinstance(app.screen, AddContactScreen), what="dialog")
            app.screen.query_one("#code", Input).value = "pigeon1nonsense"
            await click(pilot, "#add")
            await until(pilot, lambda: app.screen.query_one("#error").display
                        and "check for a typo" in screen_text(app).lower(), what="bad code message")

            for confirm in (False, True):
                if not isinstance(app.screen, AddContactScreen):
                    await pilot.press("f3")
                    await until(pilot, lambda: isinstance(app.screen, AddContactScreen),
                                what="dialog")
                app.screen.query_one("#code", Input).value = new_code
                app.screen.query_one("#name", Input).value = "bob"
                await click(pilot, "#add")
                await until(pilot, lambda: isinstance(app.screen, KeyChangeScreen)
                            and "HAS CHANGED" in screen_text(app), what="the key-change warning")
                text = screen_text(app)
                assert "HAS CHANGED" in text and impostor.public.fingerprint in text
                assert bob.public.fingerprint in text
                assert app.screen.query_one("#replace", Button).disabled
                if confirm:
                    app.screen.query_one("#confirm", Checkbox).value = True
                    await pilot.pause()
                    await click(pilot, "#replace")
                else:
                    await pilot.press("escape")  # keep the old key
                await until(pilot, lambda: isinstance(app.screen, MainScreen), what="back")
                saved = next(c for c in alice.contacts() if c.name == "bob")
                expected = impostor if confirm else bob
                assert saved.fingerprint == expected.public.fingerprint
                assert not saved.verified
    finally:
        await alice.stop()
        alice.store.close()


async def test_key_warning_event_and_verifying_a_contact(tmp_path: Path, clock: FixedClock) -> None:
    alice = make_node(tmp_path, "alice", Identity.generate("alice"), clock)
    bob = make_node(tmp_path, "bob", Identity.generate("bob"), clock)
    mallory = make_node(tmp_path, "mallory", Identity.generate("bob"), clock)  # claims "bob"
    alice.add_contact("bob", code_of(bob))
    mallory.add_contact("alice", code_of(alice))
    mallory.send("alice", "it's me, bob, new phone")
    app = app_for(alice)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_main(app), what="main screen")
            link = MemLink(mallory, alice)
            await until(pilot, lambda: isinstance(app.screen, KeyWarningScreen)
                        and "SOMEONE ELSE" in screen_text(app), what="warning")
            text = screen_text(app)
            assert "SOMEONE ELSE IS USING THE NAME bob" in text
            assert mallory.identity.public.fingerprint in text
            await pilot.press("escape")
            await link.close()

            await until(pilot, lambda: isinstance(app.screen, MainScreen), what="main again")
            main = app.screen
            assert isinstance(main, MainScreen)
            await until(pilot, lambda: any(c.kind == "stranger" for c in main.conversations.values()),
                        what="the impostor listed as a stranger")
            main.open_conversation("bob")
            await pilot.pause()
            await pilot.press("f5")
            await until(pilot, lambda: "Their fingerprint" in screen_text(app), what="details")
            assert bob.identity.public.fingerprint in screen_text(app)
            await click(pilot, "#toggle")
            await until(pilot, lambda: any(c.verified for c in alice.contacts()), what="verified")
    finally:
        for node in (alice, bob, mallory):
            await node.stop()
            node.store.close()


async def test_channel_join_and_invite(tmp_path: Path, clock: FixedClock) -> None:
    alice = make_node(tmp_path, "alice", Identity.generate("alice"), clock)
    app = app_for(alice)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_main(app), what="main screen")
            await pilot.press("f4")
            await pilot.pause()
            app.screen.query_one("#name", Input).value = "neighbours"
            app.screen.query_one("#passphrase", Input).value = "correct horse battery staple"
            await click(pilot, "#join")
            await until(pilot, lambda: isinstance(app.screen, MainScreen)
                        and app.screen.current == "#neighbours", what="channel open")
            await pilot.press("f5")
            invite = next(c.invite for c in alice.channels() if c.name == "neighbours")
            await until(pilot, lambda: "Invite to #neighbours" in screen_text(app)
                        and invite[:24] in screen_text(app), what="invite code shown")
    finally:
        await alice.stop()
        alice.store.close()


async def test_first_run_creates_identity_shows_code_and_serves_control_socket(
        tmp_path: Path) -> None:
    profile = Profile(tmp_path / "profile")
    host = ChatHost(profile, NodeConfig())
    host.claim()
    assert host.needs == "create"
    app = PigeonApp(host, bell=False)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, CreateIdentityScreen), what="form")
            await type_text(pilot, "Sam")  # the name field has the focus
            await pilot.press("enter", "enter", "enter")  # no passphrase: Enter, Enter submits
            await until(pilot, lambda: isinstance(app.screen, MyCodeScreen)
                        and "You are set up" in screen_text(app), what="own code")
            text = screen_text(app)
            assert "You are set up" in text and "Fingerprint" in text
            assert "█" in text  # the QR code
            assert profile.exists()
            # Other commands reach the node that runs inside the chat.
            info = await asyncio.to_thread(control.call, profile.control_path, "id")
            assert info["name"] == "Sam"
            assert info["contact"].replace("\n", "")[:20] in text.replace("\n", "")
            await pilot.press("enter")
            await until(pilot, lambda: on_main(app), what="main screen")
    finally:
        await host.close()
    assert not profile.control_path.exists()


async def test_encrypted_key_is_unlocked_in_the_app(tmp_path: Path) -> None:
    profile = Profile(tmp_path / "profile")
    profile.ensure()
    Identity.generate("sam").save(profile.identity_path, b"right passphrase",
                                  opslimit=2, memlimit=8 * 1024 * 1024)
    host = ChatHost(profile, NodeConfig())
    host.claim()
    assert host.needs == "unlock"
    app = PigeonApp(host, bell=False)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: isinstance(app.screen, UnlockScreen), what="unlock")
            app.screen.query_one("#passphrase", Input).value = "wrong"
            await click(pilot, "#unlock")
            await until(pilot, lambda: "Wrong passphrase" in screen_text(app), what="refusal")
            app.screen.query_one("#passphrase", Input).value = "right passphrase"
            await click(pilot, "#unlock")
            await until(pilot, lambda: on_main(app), what="main screen")
    finally:
        await host.close()



async def test_mouse_keyboard_help_resize_and_a_refused_send() -> None:
    from mesh.errors import UserError
    from tests.tui_support import demo_client
    from tui.screens.help import HelpScreen
    from tui.widgets import ConversationList

    client = demo_client()

    async def refuse(conversation: str, text: str) -> str:
        raise UserError("message too long")
    client.send = refuse  # type: ignore[method-assign]
    app = PigeonApp(ClientBackend(client), bell=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: on_main(app), what="main screen")
        main = app.screen
        assert isinstance(main, MainScreen)
        clist = main.query_one(ConversationList)
        row = clist._names.index("ben")
        assert await pilot.click(ConversationList, offset=(4, row))  # the mouse opens it
        await until(pilot, lambda: main.current == "ben", what="ben opened by a click")

        await pilot.press("tab")  # keyboard: into the list, arrows move between chats
        focused = app.focused
        if not isinstance(focused, ConversationList):
            await pilot.press("shift+tab")
        assert isinstance(app.focused, ConversationList)
        await pilot.press("up")
        await until(pilot, lambda: main.current == "ana", what="ana by arrow key")
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help via ?")
        await pilot.press("escape")
        await pilot.press("f1")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help via F1")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is main, what="back")

        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        await pilot.resize_terminal(60, 18)  # smaller than supported: cramped, not broken
        await pilot.pause()
        await pilot.resize_terminal(120, 40)
        await until(pilot, lambda: "Peers in range" in screen_text(app), what="relayout")

        main.action_focus_input()
        await type_text(pilot, "too long")
        await pilot.press("enter")
        await until(pilot, lambda: "Message too long" in screen_text(app), what="the refusal")
        assert main.query_one("#compose", Input).value == "too long"  # nothing typed is lost


def test_pigeon_chat_command_runs_the_node_in_the_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pigeon chat` end to end, in-process: lock, node, control socket, clean exit."""
    from mesh.cli import main
    from mesh.profile import ProfileLock

    home = tmp_path / "p"
    assert main(["--home", str(home), "init", "--name", "sam"]) == 0
    seen: dict[str, Any] = {}

    async def run_headless(self: PigeonApp) -> None:
        async with self.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: on_main(self), what="main screen")
            await until(pilot, lambda: "Bluetooth off" in screen_text(self),
                        what="the Bluetooth line in the peer panel")
            seen["status"] = await asyncio.to_thread(
                control.call, Profile(home).control_path, "status")
            seen["attached"] = self.client is not None and self.client.attached
            seen["bell"] = self.ring

    monkeypatch.setattr(PigeonApp, "run_async", run_headless)
    log = tmp_path / "chat.log"
    assert main(["--home", str(home), "chat", "--no-lan", "--no-ble", "--no-bell",
                 "--log", str(log)]) == 0
    assert seen == {"status": seen["status"], "attached": False, "bell": False}
    assert seen["status"]["name"] == "sam"
    assert seen["status"]["transports"] == {"ble": "off (--no-ble)"}
    assert not Profile(home).control_path.exists()
    assert log.stat().st_mode & 0o077 == 0
    lock = ProfileLock(Profile(home))
    assert lock.try_acquire(), "the chat released the profile"
    lock.release()


async def test_a_node_that_cannot_start_is_explained_not_crashed() -> None:
    from mesh.errors import UserError

    class Broken(ClientBackend):
        async def open(self) -> Any:
            raise UserError("cannot listen: [Errno 98] address already in use")

    app = PigeonApp(Broken(FakeClient(seeded_identity("sam", 1))), bell=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "Cannot listen: [Errno 98] address already in use"
                    in screen_text(app), what="the reason")
        await pilot.press("escape")
    assert app.return_code == 2


async def test_a_message_sent_from_another_command_appears_in_the_open_window(
        tmp_path: Path, clock: FixedClock) -> None:
    """`pigeon send` while the window is open reaches the same node (control socket); the
    window shows it without the user reopening the conversation."""
    alice = make_node(tmp_path, "alice", Identity.generate("alice"), clock)
    bob = make_node(tmp_path, "bob", Identity.generate("bob"), clock)
    alice.add_contact("bob", code_of(bob))
    app = app_for(alice)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: on_main(app), what="main screen")
            assert app.main is not None and app.main.current == "bob"
            alice.send("bob", "sent from the command line")  # as the control socket does
            await until(pilot, lambda: row_state(app, "sent from the command line")
                        == api.STATE_QUEUED, what="the row appears, queued")
    finally:
        for node in (alice, bob):
            await node.stop()
            node.store.close()
