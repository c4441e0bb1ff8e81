"""The end-to-end proof: three real `pigeon relay` processes on loopback, A - B - C.

A and C never connect. B carries the message without being able to read it, survives a
SIGKILL while holding it, and the receipt travels back so A's outbox says delivered.
Every process started here is killed and waited for by PID, even when the test fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.identity import Identity

ROOT = Path(__file__).resolve().parents[1]
SECRET = "the plaintext no relay may see 7f3a"
LISTEN_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def pigeon(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", "--home", str(home), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=check,
    )


def pigeon_json(home: Path, *args: str) -> Any:
    return json.loads(pigeon(home, *args, "--json").stdout)


class Relays:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, home: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = home / f"relay-{len(self.procs)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mesh.cli", "--home", str(home), "relay", "--no-lan",
                 "--no-ble", *args],
                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

    def dump_logs(self) -> None:
        for log in sorted(self.tmp.glob("*/relay-*.log")):
            print(f"==== {log}\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Relays]:
    r = Relays(tmp_path)
    try:
        yield r
    finally:
        r.stop_all()


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def listen_port(log: Path) -> int:
    def find() -> int | None:
        match = LISTEN_RE.search(log.read_text(errors="replace"))
        return int(match.group(1)) if match else None
    return int(wait_for(find, 20, f"listen line in {log.name}"))


def outbox_state(home: Path) -> str | None:
    rows = pigeon_json(home, "outbox")
    return rows[0]["state"] if rows else None


@pytest.mark.slow
def test_a_b_c_chain_with_kill_and_restart(tmp_path: Path, relays: Relays) -> None:
    try:
        chain_scenario(tmp_path, relays)
    except BaseException:
        relays.dump_logs()
        raise


def chain_scenario(tmp_path: Path, relays: Relays) -> None:
    homes = {n: tmp_path / n for n in "abc"}
    for name, home in homes.items():
        pigeon(home, "init", "--name", f"user-{name}")
    code = {n: pigeon_json(h, "id")["contact"] for n, h in homes.items()}
    pigeon(homes["a"], "contacts", "add", "carol", code["c"])
    pigeon(homes["c"], "contacts", "add", "alice", code["a"])
    msg_id = pigeon(homes["a"], "send", "carol", SECRET).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", msg_id)
    assert outbox_state(homes["a"]) == "queued"

    _, b_log = relays.start(homes["b"], "--listen", "127.0.0.1:0")
    b_port = listen_port(b_log)
    a_proc, a_log = relays.start(homes["a"], "--listen", "127.0.0.1:0", "--peer",
                                 f"127.0.0.1:{b_port}")
    wait_for(lambda: outbox_state(homes["a"]) == "relayed", what="A's message relayed to B")
    status = pigeon_json(homes["b"], "status")
    assert status["envelopes"] == 1 and status["running"] is True

    # B dies without warning while holding the message.
    b_proc = relays.procs[0]
    b_proc.send_signal(signal.SIGKILL)
    b_proc.wait(timeout=10)
    offline = pigeon_json(homes["b"], "status")
    assert offline["running"] is False and offline["envelopes"] == 1

    b2_proc, b2_log = relays.start(homes["b"], "--listen", f"127.0.0.1:{b_port}")
    listen_port(b2_log)
    c_proc, _ = relays.start(homes["c"], "--listen", "127.0.0.1:0", "--peer",
                                 f"127.0.0.1:{b_port}")
    inbox = wait_for(lambda: pigeon_json(homes["c"], "inbox"), 40, "C's inbox")
    assert [m["text"] for m in inbox] == [SECRET]
    assert inbox[0]["id"] == msg_id
    assert inbox[0]["from"] == "alice"
    wait_for(lambda: outbox_state(homes["a"]) == "delivered", 40, "delivered at A")
    assert pigeon_json(homes["b"], "inbox") == []

    for proc in (a_proc, b2_proc, c_proc):
        proc.send_signal(signal.SIGTERM)
    for proc in (a_proc, b2_proc, c_proc):
        assert proc.wait(timeout=15) == 0

    blob = b"".join(p.read_bytes() for p in homes["b"].iterdir() if p.is_file())
    assert SECRET.encode() not in blob, "relay B's files contain the plaintext"
    for log in (b_log, b2_log):
        text = log.read_text()
        assert "peer connected" in text and "stored" in text
    assert "delivered" in a_log.read_text()

    # Secrets in logs: no plaintext, no key material, in any log of the run.
    logs = "".join(p.read_text(errors="replace") for h in homes.values()
                   for p in h.glob("relay-*.log"))
    assert SECRET not in logs
    for home in homes.values():
        identity = Identity.load(home / "identity.key", None)
        for secret in (identity._seed, identity.dh_keypair.private):
            assert secret.hex() not in logs
            assert base64.b64encode(secret).decode() not in logs
    assert os.path.exists(homes["b"] / "store.sqlite")
