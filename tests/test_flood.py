"""Storage and memory exhaustion: a neighbour floods 100,000 envelopes at a relay.

The flooder is a bare session driven from this test over real TCP on loopback; the
target is a real `pigeon relay` process with a small quota. The flood may fill only the
flooder's share of the quota; an honest neighbour's messages are still stored and
delivered; the relay's peak RSS stays under a stated bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.envelope import KIND_DIRECT, Envelope, minutes, receipt_hash
from mesh.noise import generate_keypair
from mesh.session import EnvelopeReceived, LinkSession, SessionConfig, SyncCompleted
from tests.helpers import MemorySource

ROOT = Path(__file__).resolve().parents[1]
#: `make test` floods 20,000 envelopes; `make test-soak` (run by CI too) the full 100,000.
FLOOD = int(os.environ.get("PIGEON_FLOOD_N", "20000"))
RSS_BOUND_MB = 150
QUOTA_MB = 4


def pigeon(home: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "--home", str(home), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=True).stdout


def start_relay(home: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--home", str(home), "relay", "--no-lan",
             "--no-ble", *args], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_port(log: Path) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m:
            return int(m.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no listen line in {log}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def flood(port: int, n: int) -> int:
    """Push ``n`` junk envelopes through a real session; returns how many went out."""
    src = MemorySource()
    now = time.time()
    for i in range(n):
        body = i.to_bytes(8, "big") + os.urandom(200)
        env = Envelope(kind=KIND_DIRECT, created_min=minutes(now), ttl_s=86_400,
                       receipt_hash=receipt_hash(body[:16]), body=body, hops_left=5,
                       ttl_left_s=86_400)
        src.add_envelope(env, now, local=True)
    # From its own loopback address: quota shares are per neighbour address, and on a real
    # network the flooder and the honest laptops are different hosts.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    session = LinkSession(initiator=True, static=generate_keypair(), source=src, now=now,
                          config=SessionConfig(idle_timeout=120))
    done = False
    deadline = time.monotonic() + 300
    while not done and time.monotonic() < deadline:
        data = session.data_to_send(time.time())
        if data:
            writer.write(data)
            await writer.drain()
        try:
            chunk = await asyncio.wait_for(reader.read(65536), 0.5)
        except TimeoutError:
            chunk = None
        if chunk == b"":
            break
        if chunk:
            session.receive_data(chunk, time.time())
        while (event := session.next_event()) is not None:
            if isinstance(event, EnvelopeReceived):
                session.acknowledge(event.envelope.id)
            if isinstance(event, SyncCompleted):
                done = True
    writer.close()
    return session.sent_items


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flooding_neighbour_fills_only_its_share(tmp_path: Path) -> None:
    homes = {n: tmp_path / n for n in ("target", "honest", "far")}
    for name, home in homes.items():
        pigeon(home, "init", "--name", name)
    far_code = json.loads(pigeon(homes["far"], "id", "--json"))["contact"]
    pigeon(homes["honest"], "contacts", "add", "far", far_code)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        target_log = tmp_path / "target.log"
        target = start_relay(homes["target"], target_log, "--listen", "127.0.0.1:0",
                             "--quota-mb", str(QUOTA_MB))
        procs.append(target)
        port = wait_port(target_log)
        sent = asyncio.run(asyncio.wait_for(flood(port, FLOOD), 400))
        assert sent == FLOOD
        status = json.loads(pigeon(homes["target"], "status", "--json"))
        carried = status["bytes"]
        assert carried <= QUOTA_MB * 2**20 * 0.25 + 16_384, "flooder exceeded its share"
        assert status["envelopes"] < FLOOD / 4  # the rest were evicted or refused

        for i in range(5):
            pigeon(homes["honest"], "send", "far", f"honest message {i}")
        honest = start_relay(homes["honest"], tmp_path / "honest.log", "--listen", "127.0.0.1:0",
                             "--peer", f"127.0.0.1:{port}")
        procs.append(honest)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [m["state"] for m in json.loads(pigeon(homes["honest"], "outbox", "--json"))]
            if states == ["relayed"] * 5:
                break
            time.sleep(0.2)
        assert states == ["relayed"] * 5, states
        far = start_relay(homes["far"], tmp_path / "far.log", "--listen", "127.0.0.1:0",
                          "--peer", f"127.0.0.1:{port}")
        procs.append(far)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            inbox = json.loads(pigeon(homes["far"], "inbox", "--json"))
            if len(inbox) == 5:
                break
            time.sleep(0.2)
        assert sorted(m["text"] for m in inbox) == [f"honest message {i}" for i in range(5)]
        rss = peak_rss_mb(target.pid)
        print(f"flood of {FLOOD}: target peak RSS {rss:.1f} MB, carried {carried} bytes")
        assert rss < RSS_BOUND_MB
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
