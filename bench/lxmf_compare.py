"""Pigeon against Reticulum/LXMF on loopback, the same jobs in the same run.

* Throughput: 1,000 messages of 100 bytes from A to B, sent as fast as the API accepts
  them. Pigeon goes through a relay (A - R - B, three ``pigeon relay`` processes, every
  store durable: SQLite WAL with ``synchronous=FULL``); LXMF goes direct (two processes,
  ``DIRECT`` delivery over one TCP interface). Messages/s counts from the first send to
  the last arrival; latency is arrival at B minus the send call at A (one clock).
  Pigeon's send calls are pipelined on A's control socket (all made at once; each is
  answered only once its message is on A's disk), as LXMF's ``handle_outbound`` calls are
  made back to back; Pigeon with one call outstanding at a time is reported beside it
  (``throughput_serial``).
* Latency: 100 messages one at a time, each sent after the previous one arrived.
* Bytes on the wire per message, receipt included: a loopback TCP relay counts both
  directions of one hop (Pigeon's A - R hop: envelope, ack, receipt, ack; LXMF's only hop:
  message and delivery proof). After a warm-up message (link set up), ``K`` messages go
  one at a time, each waiting for its receipt, and the bytes of the window are divided by
  ``K``; keep-alives that fell in the window are included, for both.

Safety: every Reticulum instance runs from a config this benchmark writes (one TCP
interface on 127.0.0.1, no AutoInterface, no shared instance) and ``bench.lxmf_peer``
refuses to start otherwise. Every Pigeon process runs with ``--no-lan --no-ble`` and
listens on 127.0.0.1 only. No other address is ever dialled.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import cli, pyplot
from mesh import api
from mesh.client import RemoteClient
from mesh.profile import Profile

NAME = "lxmf_compare"
PY = sys.executable
#: Pause before and after a byte-counting window, so stragglers land on the right side
#: (shorter in the smoke test, which checks plumbing, not figures).
SETTLE_S = 0.5
SETTLE_TINY_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingProxy:
    """A loopback TCP relay that counts the bytes it forwards, per direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    @property
    def total(self) -> int:
        return self.up + self.down

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool) -> None:
            try:
                while data := await src.read(65536):
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_stats(latencies: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {"p50_ms": _r(percentile(ms, 0.5)), "p99_ms": _r(percentile(ms, 0.99)),
            "mean_ms": _r(statistics.fmean(ms) if ms else None)}


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ---- LXMF --------------------------------------------------------------------------------


class _Peer:
    """An ``bench.lxmf_peer`` process and a queue of the JSON events it prints."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([PY, "-m", "bench.lxmf_peer", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def next(self, timeout: float) -> dict[str, Any]:
        event = self.events.get(timeout=timeout)
        if event.get("event") == "error":
            raise RuntimeError(f"LXMF peer: {event.get('reason')}")
        return event

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.next(0))
            except queue.Empty:
                return out

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def lxmf_job(tmp: Path, mode: str, count: int, size: int, *,
             window: tuple[int, int] | None = None, timeout: float = 180,
             settle: float = SETTLE_S) -> dict[str, Any]:
    """One LXMF sender/recipient pair through a counting proxy."""
    port = free_port()
    recipient = _Peer(["recv", str(tmp / f"b-{mode}-{size}"), str(port)])
    proxy = CountingProxy(port)
    sender: _Peer | None = None
    try:
        ready = recipient.next(30)
        sender = _Peer(["send", str(tmp / f"a-{mode}-{size}"), str(proxy.port), ready["hash"], mode,
                        str(count), str(size)])
        sent: dict[int, float] = {}
        received: dict[int, float] = {}
        delivered: dict[int, float] = {}
        marks: dict[str, int] = {}
        deadline = time.time() + timeout
        while (len(received) < count or (window and window[1] not in delivered)) \
                and time.time() < deadline:
            events = sender.drain() + recipient.drain()
            if not events:
                time.sleep(0.002)
            for event in events:
                kind, i = event.get("event"), event.get("i")
                if kind == "sent":
                    sent[i] = event["t"]
                elif kind == "recv":
                    received.setdefault(i, event["t"])
                elif kind == "delivered":
                    delivered.setdefault(i, event["t"])
                elif kind == "warm":  # first message delivered, link up: count from here
                    time.sleep(settle)
                    marks["start"] = proxy.total
                    sender.tell("go")
        if window and window[1] in delivered:
            time.sleep(settle)  # the last proof's acknowledgements
            marks["end"] = proxy.total
        # In "seq" jobs message 0 set the link up; Pigeon's links are up before its jobs too.
        first = 1 if mode == "seq" else 0
        lat = [received[i] - sent[i] for i in received if i in sent and i >= first]
        result: dict[str, Any] = {"sent": len(sent), "received": len(received),
                                  "delivery_proofs": len(delivered), **latency_stats(lat)}
        if received and sent:
            span = max(received.values()) - min(sent.values())
            result["msgs_per_s"] = _r(len(received) / span if span > 0 else None)
        if window and "start" in marks and "end" in marks:
            result["bytes_per_message"] = _r((marks["end"] - marks["start"]) / (window[1] - window[0]), 1)
        return result
    finally:
        if sender is not None:
            sender.stop()
        recipient.stop()
        proxy.close()


def run_lxmf(tmp: Path, tiny: bool) -> dict[str, Any]:
    if tiny:  # smoke test: one pair (Reticulum start-up dominates), reused for every row
        job = lxmf_job(tmp, "seq", 3, 100, window=(0, 2), settle=SETTLE_TINY_S)
        return {"throughput": job, "latency": job, "bytes_100": job, "bytes_1000": job}
    burst, one_by_one, k = 1000, 100, 30
    return {
        "throughput": lxmf_job(tmp, "burst", burst, 100),
        "latency": lxmf_job(tmp, "seq", one_by_one + 1, 100),
        "bytes_100": lxmf_job(tmp, "seq", k + 1, 100, window=(0, k)),
        "bytes_1000": lxmf_job(tmp, "seq", k + 1, 1000, window=(0, k)),
    }


# ---- Pigeon --------------------------------------------------------------------------------


def _cli(home: Path, *args: str) -> Any:
    out = subprocess.run([PY, "-m", "mesh.cli", "--home", str(home), *args, "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout) if out.stdout.strip() else None


class PigeonMesh:
    """Relays A, R and B on 127.0.0.1; A reaches R through a counting proxy."""

    def __init__(self, tmp: Path) -> None:
        self.homes = {name: tmp / f"pigeon-{name}" for name in "arb"}
        codes = {name: _cli(home, "init", "--name", name)["contact"]
                 for name, home in self.homes.items()}
        _cli(self.homes["a"], "contacts", "add", "b", codes["b"])
        _cli(self.homes["b"], "contacts", "add", "a", codes["a"])
        r_port = free_port()
        self.proxy = CountingProxy(r_port)
        self.procs = [
            self._relay("r", r_port, None),
            self._relay("a", free_port(), self.proxy.port),
            self._relay("b", free_port(), r_port),
        ]
        self.a = RemoteClient(Profile.resolve(self.homes["a"]).control_path)
        self.b = RemoteClient(Profile.resolve(self.homes["b"]).control_path)

    def _relay(self, name: str, port: int, peer: int | None) -> subprocess.Popen[bytes]:
        # Profile each relay (issue section 5): BENCH_PROFILE_DIR=DIR writes one profile per
        # relay there; BENCH_PROFILER=pyinstrument (a sampling profiler, low overhead, shows
        # time spent waiting too) or cProfile (the default, deterministic).
        profile_dir = os.environ.get("BENCH_PROFILE_DIR")
        prefix: list[str] = []
        if profile_dir and os.environ.get("BENCH_PROFILER") == "pyinstrument":
            prefix = ["-m", "pyinstrument", "-r", "text", "-o", f"{profile_dir}/relay-{name}.txt"]
        elif profile_dir:
            prefix = ["-m", "cProfile", "-o", f"{profile_dir}/relay-{name}.prof"]
        args = [PY, *prefix, "-m", "mesh.cli", "--home", str(self.homes[name]), "relay",
                "--no-lan", "--no-ble", "--listen", f"127.0.0.1:{port}"]
        if peer is not None:
            args += ["--peer", f"127.0.0.1:{peer}"]
        log = (self.homes[name] / "relay.log").open("wb")
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    async def wait_linked(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                peers_a, peers_b = await self.a.peers(), await self.b.peers()
                if any(p.state == "live" for p in peers_a) and any(p.state == "live" for p in peers_b):
                    return
            except (OSError, ValueError, Exception):
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("pigeon relays did not link up")

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proxy.close()


async def _collect(events: Any, sink: dict[int, float], states: dict[str, float]) -> None:
    async for event in events:
        if isinstance(event, api.MessageReceived):
            sink.setdefault(int(event.message["text"][:8]), time.time())
        elif isinstance(event, api.MessageStateChanged) and event.state == api.STATE_DELIVERED:
            states.setdefault(event.id, time.time())


async def _wait(cond: Any, timeout: float) -> bool:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def _burst(mesh: PigeonMesh, received: dict[int, float], first: int, count: int, *,
                 pipelined: bool) -> dict[str, Any]:
    """``count`` 100-byte messages A -> B; latency = arrival at B - the send call."""
    sent: dict[int, float] = {}
    target = len(received) + count  # every earlier message has arrived: a cheap test

    async def send(i: int) -> None:
        sent[i] = time.time()
        await mesh.a.send("b", f"{i:08d}".ljust(100, "x"))

    if pipelined:
        await asyncio.gather(*(send(i) for i in range(first, first + count)))
    else:
        for i in range(first, first + count):
            await send(i)
    accepted = time.time()
    await _wait(lambda: len(received) >= target, 120)
    got = [i for i in sent if i in received]
    lat = [received[i] - sent[i] for i in got]
    span = max(received[i] for i in got) - min(sent.values()) if got else 0
    return {"sent": count, "received": len(got), **latency_stats(lat),
            "msgs_per_s": _r(len(got) / span if span else None),
            "accepted_per_s": _r(count / (accepted - min(sent.values()))
                                 if accepted > min(sent.values()) else None)}


async def pigeon_jobs(mesh: PigeonMesh, tiny: bool) -> dict[str, Any]:
    burst, one_by_one, k = (3, 2, 1) if tiny else (1000, 100, 30)
    settle = SETTLE_TINY_S if tiny else SETTLE_S
    await mesh.wait_linked()
    received: dict[int, float] = {}
    delivered: dict[str, float] = {}
    tasks = [asyncio.create_task(_collect(mesh.b.events(), received, delivered)),
             asyncio.create_task(_collect(mesh.a.events(), {}, delivered))]
    # A warm-up message proves both subscriptions are live (its arrival at B, its receipt at A).
    warm_id = await mesh.a.send("b", f"{99_999_999:08d}")
    if not await _wait(lambda: 99_999_999 in received and warm_id in delivered, 30):
        raise RuntimeError("pigeon warm-up message did not arrive with its receipt in 30 s")
    received.clear()
    out: dict[str, Any] = {}
    try:
        # The burst: every send call made at once, pipelined on A's control socket (the
        # API accepts a call before the previous one is answered; each answer still comes
        # only after its message is on A's disk). LXMF's burst likewise calls
        # handle_outbound back to back without waiting for anything.
        out["throughput"] = await _burst(mesh, received, 0, burst, pipelined=True)
        # The same with one call outstanding at a time (the caller awaits each answer):
        # reported beside it, not judged.
        out["throughput_serial"] = await _burst(mesh, received, burst, burst, pipelined=False)
        first = 2 * burst
        seq_lat = []
        for i in range(first, first + one_by_one):
            t = time.time()
            await mesh.a.send("b", f"{i:08d}".ljust(100, "x"))
            if not await _wait(lambda i=i: i in received, 30):
                raise RuntimeError(f"pigeon message {i} not delivered in 30 s")
            seq_lat.append(received[i] - t)
        out["latency"] = {"received": len(seq_lat), **latency_stats(seq_lat)}
        base = first + one_by_one
        for size in (100, 1000):
            start = 0
            for j in range(k + 1):
                if j == 1:  # the first message was the warm-up
                    await asyncio.sleep(settle)
                    start = mesh.proxy.total
                msg_id = await mesh.a.send("b", f"{base:08d}".ljust(size, "x"))
                base += 1
                if not await _wait(lambda m=msg_id: m in delivered, 30):
                    raise RuntimeError("pigeon receipt did not come back in 30 s")
            await asyncio.sleep(settle)
            out[f"bytes_{size}"] = {"bytes_per_message": _r((mesh.proxy.total - start) / k, 1),
                                    "hop": "A-R (one hop of two)"}
    finally:
        for task in tasks:
            task.cancel()
        await mesh.a.close()
        await mesh.b.close()
    return out


def run_pigeon(tmp: Path, tiny: bool) -> dict[str, Any]:
    mesh = PigeonMesh(tmp)
    try:
        return asyncio.run(pigeon_jobs(mesh, tiny))
    finally:
        mesh.stop()


# ---- the benchmark ---------------------------------------------------------------------------


def lxmf_available() -> bool:
    return importlib.util.find_spec("RNS") is not None and importlib.util.find_spec("LXMF") is not None


def judge(pigeon: dict[str, Any], lxmf: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []
    p_rate, l_rate = pigeon["throughput"].get("msgs_per_s"), lxmf["throughput"].get("msgs_per_s")
    ratio = _r(p_rate / l_rate) if p_rate and l_rate else None
    goals.append({"goal": "burst throughput, Pigeon (via relay) / LXMF (direct), x", "limit": 50,
                  "measured": ratio, "met": ratio is not None and ratio >= 50,
                  "detail": f"{p_rate} vs {l_rate} msgs/s"})
    p_lat, l_lat = pigeon["latency"].get("p50_ms"), lxmf["latency"].get("p50_ms")
    goals.append({"goal": "one-at-a-time latency p50, Pigeon via relay / LXMF direct (<= 1)",
                  "limit": 1.0, "measured": _r(p_lat / l_lat) if p_lat and l_lat else None,
                  "met": bool(p_lat and l_lat and p_lat <= l_lat),
                  "detail": f"{p_lat} vs {l_lat} ms"})
    for size in (100, 1000):
        pb = pigeon[f"bytes_{size}"].get("bytes_per_message")
        lb = lxmf[f"bytes_{size}"].get("bytes_per_message")
        share = _r(pb / lb, 3) if pb and lb else None
        goals.append({"goal": f"bytes per {size}-byte message incl. receipt, Pigeon / LXMF",
                      "limit": 0.6, "measured": share, "met": share is not None and share <= 0.6,
                      "detail": f"{pb} vs {lb} bytes"})
    return goals


def run(tiny: bool) -> dict[str, Any]:
    if not lxmf_available():
        return {"skipped": "rns/lxmf not installed (pip install -e '.[bench]')", "goals": []}
    with tempfile.TemporaryDirectory(prefix="pigeon-lxmf-") as tmp:
        lxmf = run_lxmf(Path(tmp), tiny)
        pigeon = run_pigeon(Path(tmp), tiny)
    return {"pigeon": pigeon, "lxmf": lxmf, "goals": judge(pigeon, lxmf)}


def plot(data: dict[str, Any], path: Path) -> None:
    if data.get("skipped"):
        return
    plt = pyplot()
    p, lx = data["pigeon"], data["lxmf"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = ["Pigeon A-R-B", "LXMF direct"]
    axes[0].bar(names, [p["throughput"]["msgs_per_s"] or 0, lx["throughput"]["msgs_per_s"] or 0],
                color=["tab:blue", "tab:orange"])
    axes[0].set(ylabel="messages/s (burst of 100-byte)", yscale="log", title="Throughput")
    axes[1].bar(names, [p["latency"]["p50_ms"] or 0, lx["latency"]["p50_ms"] or 0],
                color=["tab:blue", "tab:orange"])
    axes[1].set(ylabel="p50 latency, ms (one at a time)", title="Latency")
    width = 0.35
    for j, (label, src) in enumerate((("Pigeon (per hop)", p), ("LXMF", lx))):
        axes[2].bar([x + j * width for x in (0, 1)],
                    [src["bytes_100"].get("bytes_per_message") or 0,
                     src["bytes_1000"].get("bytes_per_message") or 0], width, label=label)
    axes[2].set_xticks([width / 2, 1 + width / 2], ["100-byte", "1000-byte"])
    axes[2].set(ylabel="bytes on the wire incl. receipt", title="Bytes per message")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(cli(NAME, run, plot))
