"""Snapshot tests (pytest-textual-snapshot) of the screens people see most, at 80x24.

Deterministic on purpose: identities come from a seeded rng, the clock is fixed and shown
in UTC, the backend is the scripted ``FakeClient`` (no random message ids or live times
on screen), and the input cursor does not blink. Regenerate after an intended change with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input

from mesh.identity import encode_contact
from tests.tui_support import TZ, FakeClient, demo_client, fixed_clock, seeded_identity, until
from tui.app import PigeonApp
from tui.backend import ClientBackend
from tui.screens.contacts import AddContactScreen, KeyChangeScreen
from tui.screens.main import MainScreen
from tui.widgets import MessageRow

SIZE = (80, 24)
Compare = Callable[..., bool]


def demo_app(client: FakeClient | None = None) -> PigeonApp:
    return PigeonApp(ClientBackend(client or demo_client()), bell=False, clock=fixed_clock,
                     tz=TZ, status_interval=3600)


async def open_ana(pilot: Pilot[Any]) -> None:
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, MainScreen) and bool(app.screen.conversations),
                what="main screen")
    assert isinstance(app.screen, MainScreen)
    app.screen.refresh_conversations(select="ana")
    await until(pilot, lambda: len(app.screen.query(MessageRow)) == 5, what="ana's messages")


def still_cursor(pilot: Pilot[Any]) -> None:
    for widget in pilot.app.screen.query(Input):
        widget.cursor_blink = False


def before(*steps: Callable[[Pilot[Any]], Awaitable[None]]) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def run(pilot: Pilot[Any]) -> None:
        for step in steps:
            await step(pilot)
        still_cursor(pilot)
        await pilot.pause()
    return run


def test_main_screen(snap_compare: Compare) -> None:
    assert snap_compare(demo_app(), terminal_size=SIZE, run_before=before(open_ana))


def test_add_contact_screen(snap_compare: Compare) -> None:
    kim = seeded_identity("kim", 4)

    async def fill(pilot: Pilot[Any]) -> None:
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(pilot.app.screen, AddContactScreen), what="dialog")
        pilot.app.screen.query_one("#code", Input).value = encode_contact(kim.public, "kim")
        await pilot.pause()
    assert snap_compare(demo_app(), terminal_size=SIZE, run_before=before(open_ana, fill))


def test_key_change_warning(snap_compare: Compare) -> None:
    impostor = seeded_identity("ana", 99)

    async def paste_changed_key(pilot: Pilot[Any]) -> None:
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(pilot.app.screen, AddContactScreen), what="dialog")
        screen = pilot.app.screen
        screen.query_one("#code", Input).value = encode_contact(impostor.public, "ana")
        screen.query_one("#name", Input).value = "ana"
        await pilot.pause()
        screen.query_one("#name", Input).focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, KeyChangeScreen)
                    and pilot.app.screen.is_mounted, what="the warning")
    assert snap_compare(demo_app(), terminal_size=SIZE,
                        run_before=before(open_ana, paste_changed_key))


def test_own_contact_code_with_qr(snap_compare: Compare) -> None:
    async def show_code(pilot: Pilot[Any]) -> None:
        await pilot.press("f2")
        await pilot.pause()
    assert snap_compare(demo_app(), terminal_size=SIZE, run_before=before(open_ana, show_code))
