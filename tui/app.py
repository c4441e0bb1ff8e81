"""``pigeon chat``: the Textual app.

The app owns one ``Backend`` and, once open, one ``NodeClient``; it hands the client down
to screens (attributes down) and screens report back through messages and dismiss
results (messages up). It never touches the store, the profile or a socket: ``pigeon
chat`` in ``mesh.cli`` decides where the node runs and gives the app a backend.

``clock`` and ``tz`` only affect how times are shown; tests fix them so screenshots are
the same on every machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path, PurePath
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from mesh.client import NodeClient
from mesh.errors import UserError
from tui.backend import Backend
from tui.screens.first_run import CreateIdentityScreen, FatalScreen, MyCodeScreen, UnlockScreen
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen

log = logging.getLogger("pigeon.tui")

STYLES = Path(__file__).parent / "styles"


class PigeonApp(App[None]):
    """The messenger. ``bell=False`` silences the terminal bell on new messages."""

    TITLE = "Pigeon"
    CSS_PATH: ClassVar[list[str | PurePath]] = [
        STYLES / "app.tcss", STYLES / "main.tcss", STYLES / "dialogs.tcss"]
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, backend: Backend, *, bell: bool = True,
                 clock: Callable[[], float] = time.time, tz: tzinfo | None = None,
                 status_interval: float = 3.0) -> None:
        super().__init__()
        self.backend = backend
        self.ring = bell
        self.clock = clock
        self.tz = tz
        self.status_interval = status_interval
        self.client: NodeClient | None = None
        self.main: MainScreen | None = None

    def compose(self) -> ComposeResult:
        yield Static("Starting Pigeon…", id="starting")

    def on_mount(self) -> None:
        needs = self.backend.needs
        if needs == "create":
            self.push_screen(CreateIdentityScreen(self.backend), self._created)
        elif needs == "unlock":
            self.push_screen(UnlockScreen(self.backend), self._unlocked)
        else:
            self.open_node(first_run=False)

    def _created(self, ok: bool | None) -> None:
        if ok:
            self.open_node(first_run=True)

    def _unlocked(self, ok: bool | None) -> None:
        if ok:
            self.open_node(first_run=False)

    @work(group="node", exclusive=True, exit_on_error=False)
    async def open_node(self, first_run: bool) -> None:
        """Start or attach to the node, then show the main screen (and, on first run, the
        user's new contact code so they can share it straight away)."""
        try:
            client = await self.backend.open()
            identity = await client.identity()
        except UserError as exc:
            await self.push_screen(FatalScreen(exc))
            return
        except Exception as exc:
            log.exception("could not open the node")
            await self.push_screen(FatalScreen(f"{type(exc).__name__}: {exc}"))
            return
        self.client = client
        self.main = MainScreen(client, identity, bell=self.ring, clock=self.clock, tz=self.tz,
                               status_interval=self.status_interval)
        await self.push_screen(self.main)
        if first_run:
            await self.push_screen(MyCodeScreen(identity, first_run=True))

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())
