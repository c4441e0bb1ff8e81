"""The attach path: a real ``pigeon relay`` process holds the profile, the chat app
attaches to it over the control socket, and a message goes out and comes back through it.

The other end is a real node in this process, linked to the relay over TCP on 127.0.0.1.
The relay is killed and waited for by PID in a ``finally``, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import Input

from mesh import api, control
from mesh.chat import KeyChangedError
from mesh.client import RemoteClient
from mesh.host import ChatHost
from mesh.identity import Identity, encode_contact
from mesh.node import NodeConfig
from mesh.profile import Profile
from tests.tui_support import code_of, make_node, screen_text, until
from tui.app import PigeonApp
from tui.screens.contacts import AddContactScreen
from tui.screens.main import MainScreen
from tui.widgets import MessageRow

ROOT = Path(__file__).resolve().parents[1]
LISTEN_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def pigeon(home: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "--home", str(home), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          check=True).stdout


async def relay_port(log: Path, proc: subprocess.Popen[bytes]) -> int:
    for _ in range(400):
        match = LISTEN_RE.search(log.read_text(errors="replace"))
        if match and control.reachable(log.parent / "control.sock"):
            return int(match.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"relay exited early:\n{log.read_text()}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"relay did not start:\n{log.read_text()}")


def row_state(app: PigeonApp, text: str) -> str | None:
    return next((r.state for r in app.screen.query(MessageRow) if r.message.text == text), None)


@pytest.mark.slow
async def test_chat_attaches_to_a_running_relay_and_leaves_it_running(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    pigeon(home, "init", "--name", "alice")
    alice_code = json.loads(pigeon(home, "id", "--json"))["contact"]
    log = home / "relay.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--home", str(home), "relay",
             "--listen", "127.0.0.1:0", "--no-lan", "--no-ble"],
            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    bob = None
    try:
        port = await relay_port(log, proc)
        # Real time: bob talks to a real process, whose clock is the wall clock.
        bob = make_node(tmp_path, "bob", Identity.generate("bob"), time.time,
                        NodeConfig(peers=[("127.0.0.1", port)], backoff_initial_s=0.1,
                                   backoff_max_s=0.5))
        bob.add_contact("alice", alice_code)
        await bob.start()

        host = ChatHost(Profile(home), NodeConfig(listen=[("127.0.0.1", 0)]))
        host.claim()
        assert host.attached and host.needs is None
        app = PigeonApp(host, bell=False, status_interval=0.2)
        try:
            async with app.run_test(size=(100, 30)) as pilot:
                await until(pilot, lambda: isinstance(app.screen, MainScreen)
                            and "attached to the relay" in screen_text(app), what="attached")
                # Add bob through the dialog: the call goes over the control socket.
                await pilot.press("f3")
                await until(pilot, lambda: isinstance(app.screen, AddContactScreen), what="dialog")
                app.screen.query_one("#code", Input).value = code_of(bob)
                app.screen.query_one("#code", Input).focus()
                await pilot.pause()
                await pilot.press("enter", "enter")  # code -> name (empty: the code's name)
                await until(pilot, lambda: isinstance(app.screen, MainScreen)
                            and app.screen.current == "bob", what="bob's conversation")

                await pilot.press(*"hi", "space", *"bob", "enter")
                await until(pilot, lambda: [m.text for m in bob.inbox()] == ["hi bob"],
                            what="bob receives it through the relay")
                await until(pilot, lambda: row_state(app, "hi bob") == api.STATE_DELIVERED,
                            what="the receipt reaches the app")
                assert "✓✓ you: hi bob" in screen_text(app)
                assert "TCP" in screen_text(app)  # the relay's link to bob, in range

                bob.send("alice", "hello alice, via the relay")
                await until(pilot, lambda: "hello alice, via the relay" in screen_text(app),
                            what="the reply shows up")

                # Refusals keep their kind over the socket: a key change stays loud.
                client = RemoteClient(Profile(home).control_path)
                other = Identity.generate("bob")
                with pytest.raises(KeyChangedError):
                    await client.add_contact("bob", encode_contact(other.public, "bob"))
                await client.close()
                await pilot.press("ctrl+q")
        finally:
            await host.close()
        assert proc.poll() is None, "closing the chat must leave the relay running"
        assert control.reachable(Profile(home).control_path)
        status = await asyncio.to_thread(control.call, Profile(home).control_path, "status")
        assert status["name"] == "alice"
    finally:
        if bob is not None:
            await bob.stop()
            bob.store.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
