"""Faults a relay must survive: SIGKILL at random moments during a heavy two-way sync,
and a full disk. Real `pigeon relay` processes on loopback; every process started here is
killed and waited for by PID."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from mesh import control
from mesh.chat import add_contact, queue_message
from mesh.identity import Identity, encode_contact
from mesh.profile import Profile
from mesh.store import Store
from tests.test_flood import flood, pigeon, start_relay, wait_port

ROOT = Path(__file__).resolve().parents[1]
PER_SIDE = 400
PER_ROUND = 50
KILLS = 20
TOTAL = PER_SIDE + KILLS * PER_ROUND


def make_profile(home: Path, name: str) -> Identity:
    pigeon(home, "init", "--name", name)
    return Identity.load(Profile(home).identity_path, None)


def queue_many(home: Path, me: Identity, to: str, first: int, n: int) -> None:
    """Queue offline, the way `pigeon send` does when no node runs on the profile."""
    store = Store.open(Profile(home).store_path)
    try:
        now = time.time()
        with store.batch():
            for i in range(first, first + n):
                queue_message(store, me, to, f"{me.name} message {i}", now=now)
    finally:
        store.close()


def inbox_texts(home: Path) -> list[str]:
    return [m["text"] for m in json.loads(pigeon(home, "inbox", "--json"))]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_twenty_random_points_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    hx, hy = tmp_path / "x", tmp_path / "y"
    x, y = make_profile(hx, "xavier"), make_profile(hy, "yara")
    for home, other in ((hx, y), (hy, x)):
        store = Store.open(Profile(home).store_path)
        add_contact(store, other.name, encode_contact(other.public, other.name), now=time.time())
        store.close()
    queue_many(hx, x, "yara", 0, PER_SIDE)
    queue_many(hy, y, "xavier", 0, PER_SIDE)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        y_proc = start_relay(hy, tmp_path / "y.log", "--listen", "127.0.0.1:0")
        procs.append(y_proc)
        port = wait_port(tmp_path / "y.log")
        for k in range(KILLS):
            # Fresh traffic both ways every round, so every kill lands in a live sync.
            first = PER_SIDE + k * PER_ROUND
            queue_many(hx, x, "yara", first, PER_ROUND)
            for i in range(first, first + PER_ROUND):
                control.call(Profile(hy).control_path, "send", to="xavier",
                             text=f"yara message {i}")
            x_proc = start_relay(hx, tmp_path / f"x{k}.log", "--peer", f"127.0.0.1:{port}",
                                 "--listen", "127.0.0.1:0")
            procs.append(x_proc)
            time.sleep(rng.uniform(0.3, 1.5))
            x_proc.kill()
            x_proc.wait(timeout=10)
        x_proc = start_relay(hx, tmp_path / "x-final.log", "--peer", f"127.0.0.1:{port}",
                             "--listen", "127.0.0.1:0")
        procs.append(x_proc)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            states = {m["state"] for h in (hx, hy)
                      for m in json.loads(pigeon(h, "outbox", "--json"))}
            if states == {"delivered"}:
                break
            time.sleep(0.5)
        assert states == {"delivered"}, states
        for home, sender in ((hx, "yara"), (hy, "xavier")):
            texts = inbox_texts(home)
            assert len(texts) == TOTAL, "a message was lost or shown twice"
            assert sorted(texts) == sorted(f"{sender} message {i}" for i in range(TOTAL))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    for home in (hx, hy):
        store = Store.open(Profile(home).store_path)
        assert store.integrity_check()
        store.close()


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    return None


@pytest.mark.slow
def test_full_disk_refuses_relayed_envelopes_and_keeps_the_outbox(tmp_path: Path) -> None:
    reason = _can_mount()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(disk)], check=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        home = disk / "relay"
        me = make_profile(home, "relay-owner")
        friend = Identity.generate("friend")
        store = Store.open(Profile(home).store_path)
        add_contact(store, "friend", encode_contact(friend.public, "friend"), now=time.time())
        queue_message(store, me, "friend", "queued before the disk filled", now=time.time())
        store.close()
        log = tmp_path / "relay.log"  # the log lives off the small disk
        proc = start_relay(home, log, "--listen", "127.0.0.1:0", "--quota-mb", "100")
        port = wait_port(log)
        asyncio.run(asyncio.wait_for(flood(port, 8000), 300))
        assert proc.poll() is None, "the relay died on a full disk"
        text = log.read_text()
        assert "could not store" in text and "refusing them" in text
        outbox = json.loads(pigeon(home, "outbox", "--json"))
        assert [m["text"] for m in outbox] == ["queued before the disk filled"]
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        conn = sqlite3.connect(Profile(home).store_path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["umount", "-l", str(disk)], check=False)
