"""Regenerate the user guide's screenshots (docs/images/*.svg), exported by Textual.

    .venv/bin/python -m tests.tui_screenshots

Same scripted backend and fixed clock as the snapshot tests, so the pictures only change
when the UI does. Not a test: it writes into docs/.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input

from mesh import api
from mesh.client import NodeClient
from mesh.identity import encode_contact
from tests.tui_support import TZ, FakeClient, demo_client, fixed_clock, seeded_identity, until
from tui.app import PigeonApp
from tui.backend import ClientBackend
from tui.screens.main import MainScreen
from tui.widgets import MessageRow

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
SIZE = (100, 30)


class FirstRunBackend(ClientBackend):
    needs = "create"

    async def create_identity(self, name: str, passphrase: str | None) -> None:
        self.needs = None

    async def open(self) -> NodeClient:
        return self.client


async def shoot(name: str, steps: Callable[[Pilot[Any]], Awaitable[None]],
                client: FakeClient | None = None, *, first_run: bool = False,
                size: tuple[int, int] = SIZE) -> None:
    fake = client or demo_client()
    backend = FirstRunBackend(fake) if first_run else ClientBackend(fake)
    app = PigeonApp(backend, bell=False, clock=fixed_clock, tz=TZ, status_interval=3600)
    async with app.run_test(size=size) as pilot:
        await steps(pilot)
        for widget in app.screen.query(Input):
            widget.cursor_blink = False
        await pilot.pause(0.3)
        app.save_screenshot(f"{name}.svg", str(OUT))
    print(f"wrote docs/images/{name}.svg")


async def main_ready(pilot: Pilot[Any]) -> None:
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, MainScreen) and bool(app.screen.conversations))
    assert isinstance(app.screen, MainScreen)
    app.screen.refresh_conversations(select="ana")
    await until(pilot, lambda: len(app.screen.query(MessageRow)) == 5)


def then(*keys: str, fill: dict[str, str] | None = None,
         submit: str | None = None) -> Callable[[Pilot[Any]], Awaitable[None]]:
    """Open the main screen, press ``keys``, fill inputs, maybe press Enter in one."""
    async def run(pilot: Pilot[Any]) -> None:
        await main_ready(pilot)
        await pilot.press(*keys)
        await pilot.pause(0.2)
        for selector, value in (fill or {}).items():
            pilot.app.screen.query_one(selector, Input).value = value
        await pilot.pause(0.2)
        if submit:
            pilot.app.screen.query_one(submit, Input).focus()
            await pilot.press("enter")
            await pilot.pause(0.3)
    return run


async def first_run(pilot: Pilot[Any]) -> None:
    await pilot.pause(0.2)
    await pilot.press(*"Sam")


async def key_warning(pilot: Pilot[Any]) -> None:
    await main_ready(pilot)
    client = pilot.app.screen.client
    assert isinstance(client, FakeClient)
    client.queue.put_nowait(api.KeyWarning(contact="ana", claimed_by="~ana (5c1f09e2)",
                                           fingerprint="31337 42424 10101 55555 98765 12345"))
    await pilot.pause(0.3)


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    kim = seeded_identity("kim", 4)
    impostor = seeded_identity("ana", 99)
    await shoot("first-run", first_run, first_run=True, size=(80, 24))
    await shoot("main", then())
    await shoot("main-80x24", then(), size=(80, 24))
    await shoot("my-code", then("f2"))
    await shoot("add-contact", then("f3", fill={"#code": encode_contact(kim.public, "kim")}))
    await shoot("key-change", then("f3", fill={
        "#code": encode_contact(impostor.public, "ana"), "#name": "ana"}, submit="#name"))
    await shoot("key-warning", key_warning)
    await shoot("contact-details", then("f5"))
    await shoot("channels", then("f4", fill={"#name": "neighbours"}))
    await shoot("help", then("f1"))


if __name__ == "__main__":
    asyncio.run(main())
