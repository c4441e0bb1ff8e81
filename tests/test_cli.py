"""The command line, run in-process (fast paths) and as real processes where a relay must
hold the profile."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def init(capsys: pytest.CaptureFixture[str], home: Path, name: str, *extra: str) -> dict[str, str]:
    code, out, _ = run(capsys, "--home", str(home), *extra, "init", "--name", name, "--json")
    assert code == 0
    info: dict[str, str] = json.loads(out)
    return info


def test_init_id_and_refusal_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "p"
    created = init(capsys, home, "alice")
    code, out, _ = run(capsys, "--home", str(home), "id", "--json")
    assert code == 0
    info = json.loads(out)
    assert info == created
    assert set(info) == {"node_id", "name", "fingerprint", "contact"}
    assert re.fullmatch(r"[0-9a-f]{32}", info["node_id"])
    assert re.fullmatch(r"(\d{5} ){5}\d{5}", info["fingerprint"])
    code, _, err = run(capsys, "--home", str(home), "init", "--name", "mallory")
    assert code == 2 and "refusing to overwrite" in err
    code, out, _ = run(capsys, "--home", str(home), "id", "--json")
    assert json.loads(out)["name"] == "alice"


def test_contacts_send_outbox_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init(capsys, a, "alice")
    bob = init(capsys, b, "bob")
    typo = bob["contact"][:-1] + ("a" if bob["contact"][-1] != "a" else "b")
    code, _, err = run(capsys, "--home", str(a), "contacts", "add", "bob", typo)
    assert code == 2 and "typo" in err
    code, _, _ = run(capsys, "--home", str(a), "contacts", "add", "bob", bob["contact"])
    assert code == 0
    code, _, err = run(capsys, "--home", str(a), "contacts", "add", "bob", bob["contact"])
    assert code == 0  # the same key again is harmless
    mallory = init(capsys, tmp_path / "m", "bob")
    code, _, err = run(capsys, "--home", str(a), "contacts", "add", "bob", mallory["contact"])
    assert code == 2 and "DIFFERENT KEY" in err
    code, out, _ = run(capsys, "--home", str(a), "contacts", "list", "--json")
    assert json.loads(out)[0]["fingerprint"] == bob["fingerprint"]  # nothing replaced silently
    code, _, _ = run(capsys, "--home", str(a), "contacts", "verify", "bob")
    assert code == 0
    code, out, _ = run(capsys, "--home", str(a), "contacts", "list", "--json")
    [contact] = json.loads(out)
    assert contact["name"] == "bob" and contact["fingerprint"] == bob["fingerprint"]
    assert contact["verified"] is True
    code, out, _ = run(capsys, "--home", str(a), "send", "bob", "hi there")
    msg_id = out.strip()
    assert code == 0 and re.fullmatch(r"[0-9a-f]{32}", msg_id)
    code, out, _ = run(capsys, "--home", str(a), "outbox", "--json")
    assert json.loads(out) == [{"id": msg_id, "to": "bob", "text": "hi there", "state": "queued"}]
    code, _, err = run(capsys, "--home", str(a), "send", "nobody", "x")
    assert code == 2 and "no contact named" in err
    code, out, _ = run(capsys, "--home", str(a), "status", "--json")
    status = json.loads(out)
    assert status["envelopes"] == 1 and status["peers"] == [] and status["bytes"] > 0
    code, out, _ = run(capsys, "--home", str(b), "inbox", "--json")
    assert json.loads(out) == []


def test_passphrase_protects_the_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "p"
    monkeypatch.setenv("PW", "correct horse battery staple")
    info = init(capsys, home, "alice", "--passphrase-env", "PW")
    raw = (home / "identity.key").read_bytes()
    assert b"alice" not in raw
    code, _, err = run(capsys, "--home", str(home), "id")
    assert code == 2 and "encrypted" in err
    monkeypatch.setenv("PW", "wrong")
    code, _, err = run(capsys, "--home", str(home), "--passphrase-env", "PW", "id")
    assert code == 2 and "passphrase" in err
    monkeypatch.setenv("PW", "correct horse battery staple")
    code, out, _ = run(capsys, "--home", str(home), "--passphrase-env", "PW", "id", "--json")
    assert code == 0 and json.loads(out)["node_id"] == info["node_id"]


def test_commands_before_init_explain_what_to_do(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["inbox"], ["send", "x", "y"], ["status"], ["id"]):
        code, _, err = run(capsys, "--home", str(tmp_path / "none"), *argv)
        assert code == 2 and "pigeon init" in err


@pytest.mark.slow
def test_commands_attach_to_a_running_relay_and_a_second_relay_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init(capsys, a, "alice")
    bob = init(capsys, b, "bob")
    log = tmp_path / "relay.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--home", str(a), "relay", "--listen",
             "127.0.0.1:0", "--no-lan", "--no-ble"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while "running" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (a / "control.sock").stat().st_mode & 0o777 == 0o600
        code, _, _ = run(capsys, "--home", str(a), "contacts", "add", "bob", bob["contact"])
        assert code == 0
        code, out, _ = run(capsys, "--home", str(a), "send", "bob", "via the relay")
        assert code == 0
        code, out, _ = run(capsys, "--home", str(a), "status", "--json")
        status = json.loads(out)
        assert status["running"] is True and status["envelopes"] == 1
        assert status["transports"] == {"ble": "off (--no-ble)"}
        code, out, _ = run(capsys, "--home", str(a), "outbox", "--json")
        assert [m["text"] for m in json.loads(out)] == ["via the relay"]
        second = subprocess.run(
            [sys.executable, "-m", "mesh.cli", "--home", str(a), "relay", "--listen", "127.0.0.1:0",
             "--no-lan", "--no-ble"], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert second.returncode == 2 and "already runs" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert not (a / "control.sock").exists()
    code, out, _ = run(capsys, "--home", str(a), "status", "--json")
    assert json.loads(out)["running"] is False


def test_wipe_destroys_keys_and_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "p"
    init(capsys, home, "alice")
    bob = init(capsys, tmp_path / "b", "bob")
    run(capsys, "--home", str(home), "contacts", "add", "bob", bob["contact"])
    run(capsys, "--home", str(home), "send", "bob", "delete me")
    code, _, err = run(capsys, "--home", str(home), "wipe")  # no terminal: needs --yes
    assert code == 2 and "--yes" in err
    assert (home / "identity.key").exists()
    code, out, _ = run(capsys, "--home", str(home), "wipe", "--yes", "--json")
    assert code == 0 and "identity.key" in json.loads(out)["files"]
    assert not home.exists()
    code, _, err = run(capsys, "--home", str(home), "id")
    assert code == 2 and "pigeon init" in err


@pytest.mark.slow
def test_wipe_stops_a_running_relay_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "p"
    init(capsys, home, "alice")
    log = tmp_path / "relay.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--home", str(home), "relay", "--listen",
             "127.0.0.1:0", "--no-lan", "--no-ble"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while "running" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, _, _ = run(capsys, "--home", str(home), "wipe", "--yes")
        assert code == 0
        assert proc.wait(timeout=15) == 0
        assert not home.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_inbox_output_neutralises_terminal_escapes(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.store import Store
    home = tmp_path / "p"
    init(capsys, home, "alice")
    store = Store.open(home / "store.sqlite")
    store.inbox_add(bytes(16), conversation="bob", sender_key=bytes(32), sender_name="bob",
                    text="hi\x1b[2J\x1b]0;pwned\x07 there", sent_at=1.0, received_at=2.0,
                    kind="direct")
    store.close()
    for argv in (["inbox"], ["inbox", "--json"]):
        code, out, _ = run(capsys, "--home", str(home), *argv)
        assert code == 0 and "\x1b" not in out and "\x07" not in out
        assert "pwned" in out  # shown, but as inert text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BlueZ probe is Linux-only")
def test_relay_without_bluetooth_says_so_once_and_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BLE is on by default. With no system bus (pointed at a socket that does not exist,
    so nothing here ever touches a real Bluetooth stack) the relay logs one clear line,
    `pigeon status` says why BLE is off, and the relay works. ``--no-lan`` per the
    network rule."""
    import os

    home = tmp_path / "a"
    init(capsys, home, "alice")
    log = tmp_path / "relay.log"
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-such-bus"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--home", str(home), "relay", "--listen",
             "127.0.0.1:0", "--no-lan"], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 20
        while "running" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "running" in log.read_text(), log.read_text()
        code, out, _ = run(capsys, "--home", str(home), "status")
        assert code == 0 and "\nble: off: " in out
        code, out, _ = run(capsys, "--home", str(home), "status", "--json")
        assert json.loads(out)["transports"]["ble"].startswith("off: ")
        time.sleep(1.0)  # a second chance to repeat itself
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    text = log.read_text()
    assert text.count("Bluetooth LE off") == 1, text
