"""A relay under load: a real ``pigeon relay`` process holding 100,000 envelopes.

Measured: the relay's resident memory (after start-up, and its peak after serving a sync),
the store's size on disk per envelope, start-up time (process start to accepting TCP on
127.0.0.1) and the time to serve a full sync to a newcomer: an in-process ``Node`` with an
empty store dials it and the clock stops when all envelopes are committed on its disk.
Baseline in the same run: the same relay with an empty store (memory and start-up).

The envelopes are relay-shaped but not sealed to anyone (a relay cannot tell the
difference): random 300-byte bodies, so the newcomer trial-decrypts each one and fails, as
a real relay does with mail for others. The relay listens on 127.0.0.1 only, with
``--no-lan --no-ble``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import cli, pyplot
from mesh.envelope import KIND_DIRECT, Envelope, minutes
from mesh.identity import Identity
from mesh.node import Node, NodeConfig
from mesh.profile import Profile
from mesh.store import Store

NAME = "relay_load"
GOALS = {"rss_mb": 150.0, "startup_s": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def make_profile(home: Path, n: int, now: float) -> float:
    """A relay profile whose store holds ``n`` envelopes; returns the fill time (s)."""
    profile = Profile.resolve(home)
    profile.ensure()
    Identity.generate("relay").save(profile.identity_path, None)
    rng = random.Random(1)
    started = time.perf_counter()
    with Store.open(profile.store_path) as store:
        for start in range(0, n, 5000):
            with store.batch():
                for _ in range(start, min(n, start + 5000)):
                    env = Envelope(kind=KIND_DIRECT, created_min=minutes(now) - rng.randrange(600),
                                   ttl_s=7 * 86_400, receipt_hash=rng.randbytes(16),
                                   body=rng.randbytes(300), hops_left=24, ttl_left_s=7 * 86_400)
                    store.add_envelope(env, now=now, origin="tcp:127.0.0.9")
    return time.perf_counter() - started


def store_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("store.sqlite*"))


def start_relay(home: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    """Start ``pigeon relay`` on 127.0.0.1 only; returns it and seconds until it accepts."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "--home", str(home), "relay", "--no-lan", "--no-ble",
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = started + 60
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, time.perf_counter() - started
        except OSError:
            time.sleep(0.01)
    proc.kill()
    proc.wait()
    raise RuntimeError("relay did not start listening within 60 s")


def stop_relay(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def newcomer_sync(home: Path, port: int, n: int, timeout: float) -> float:
    """An empty node dials the relay; seconds until it holds all ``n`` envelopes."""
    home.mkdir(parents=True)
    store = Store.open(home / "store.sqlite")
    node = Node(Identity.generate("newcomer"), store, NodeConfig(peers=[("127.0.0.1", port)]))
    started = time.perf_counter()
    await node.start()
    try:
        while store.stats().envelopes < n:
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"newcomer got {store.stats().envelopes} of {n} in {timeout} s")
            await asyncio.sleep(0.05)
        return time.perf_counter() - started
    finally:
        await node.stop()
        store.close()


def measure(n: int, tmp: Path) -> dict[str, Any]:
    home = tmp / f"relay-{n}"
    fill_s = make_profile(home, n, time.time())
    disk = store_bytes(home)
    port = free_port()
    proc, startup = start_relay(home, port)
    try:
        time.sleep(0.3)  # let it settle after accepting
        after_start = rss_kb(proc.pid)
        sync_s = None
        if n:
            sync_s = asyncio.run(newcomer_sync(tmp / f"newcomer-{n}", port, n, timeout=900))
        after_sync = rss_kb(proc.pid)
    finally:
        stop_relay(proc)
    return {
        "envelopes": n,
        "fill_s": round(fill_s, 2),
        "disk_bytes": disk,
        "disk_bytes_per_envelope": round(disk / n, 1) if n else None,
        "startup_s": round(startup, 3),
        "rss_mb_after_start": round(after_start["VmRSS"] / 1024, 1),
        "rss_mb_peak": round(after_sync["VmHWM"] / 1024, 1),
        "full_sync_s": None if sync_s is None else round(sync_s, 2),
        "sync_envelopes_per_s": None if not sync_s else round(n / sync_s, 1),
    }


def run(tiny: bool) -> dict[str, Any]:
    n = 500 if tiny else 100_000
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        base = measure(0, Path(tmp))
        loaded = measure(n, Path(tmp))
    goals = [
        {"goal": f"relay RSS with {n:,} envelopes (peak while serving a sync)",
         "limit": GOALS["rss_mb"], "measured": loaded["rss_mb_peak"],
         "met": loaded["rss_mb_peak"] < GOALS["rss_mb"]},
        {"goal": f"relay start-up with {n:,} envelopes (s)", "limit": GOALS["startup_s"],
         "measured": loaded["startup_s"], "met": loaded["startup_s"] < GOALS["startup_s"]},
    ]
    return {"baseline_empty": base, "loaded": loaded, "goals": goals, "pid": os.getpid()}


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    base, loaded = data["baseline_empty"], data["loaded"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = ["empty store", f"{loaded['envelopes']:,} envelopes"]
    axes[0].bar(labels, [base["rss_mb_peak"], loaded["rss_mb_peak"]], color=["grey", "tab:blue"])
    axes[0].axhline(GOALS["rss_mb"], color="red", linestyle=":", label="goal")
    axes[0].set(ylabel="relay peak RSS (MB)", title="Memory")
    axes[0].legend()
    axes[1].bar(labels, [base["startup_s"], loaded["startup_s"]], color=["grey", "tab:blue"])
    axes[1].axhline(GOALS["startup_s"], color="red", linestyle=":", label="goal")
    axes[1].set(ylabel="seconds to accept TCP", title="Start-up")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(cli(NAME, run, plot))
