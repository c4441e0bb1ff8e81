"""Throwaway network labs in Linux network namespaces, for the LAN integration tests.

Rules this helper enforces (see shared NOTES): nothing is ever created in the root
namespace. Each segment is a bridge inside a namespace of its own, every veth pair is
created from inside that bridge namespace with its far end moved straight into the
host namespace, names carry the test's pid and a per-lab tag, and ``close()`` kills (by
PID), waits for, and deletes everything it started even when the test failed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMD_TIMEOUT_S = 10
_counter = itertools.count()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=CMD_TIMEOUT_S,
                          check=check)


def capability_problem() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"pgprobe{os.getpid()}"
    try:
        result = run("ip", "netns", "add", probe, check=False)
        if result.returncode != 0:
            return f"cannot create a network namespace: {result.stderr.strip()}"
        made = run("ip", "-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if made.returncode != 0:
            return f"cannot create a bridge in a namespace: {made.stderr.strip()}"
    finally:
        run("ip", "netns", "del", probe, check=False)
    return None


class Lab:
    """Namespaces, bridges, veths and processes of one test; ``close()`` undoes all of it."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"pg{os.getpid()}{tag}{next(_counter)}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._veths = 0

    def netns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        run("ip", "netns", "add", full)
        self.namespaces.append(full)
        run("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def segment(self, name: str) -> str:
        """A bridge (``br0``) alone in its own namespace; returns that namespace."""
        ns = self.netns(name)
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge", "stp_state", "0",
            "forward_delay", "0", "mcast_snooping", "0")
        run("ip", "-n", ns, "link", "set", "br0", "up")
        return ns

    def attach(self, host: str, segment: str, ifname: str, cidr: str | None) -> str:
        """Cable ``host`` to ``segment`` as ``ifname`` with ``cidr`` (None: IPv6 link-local
        only); returns the bridge port name."""
        self._veths += 1
        port = f"vn{self._veths}"
        run("ip", "-n", segment, "link", "add", port, "type", "veth", "peer", "name", ifname,
            "netns", host)
        run("ip", "-n", segment, "link", "set", port, "master", "br0", "up")
        # No IPv6 duplicate address detection: link-local addresses are usable at once.
        run("ip", "netns", "exec", host, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0")
        run("ip", "-n", host, "link", "set", ifname, "multicast", "on", "up")
        if cidr is not None:
            run("ip", "-n", host, "addr", "add", cidr, "dev", ifname)
            run("ip", "-n", host, "route", "append", "224.0.0.0/4", "dev", ifname)
        return port

    def link(self, segment: str, port: str, up: bool) -> None:
        """Pull or plug a cable: the bridge end of a host's veth goes down or up."""
        run("ip", "-n", segment, "link", "set", port, "up" if up else "down")

    def loss(self, segment: str, port: str, percent: int) -> None:
        """Drop ``percent``% of frames leaving the bridge on ``port`` (towards the host)
        and entering from it (from the host), with nftables netdev hooks."""
        table = f"loss{port}"
        rules = (
            f"table netdev {table} {{\n"
            f"  chain egress {{ type filter hook egress device {port} priority 0; "
            f"numgen random mod 100 < {percent} drop; }}\n"
            f"  chain ingress {{ type filter hook ingress device {port} priority 0; "
            f"numgen random mod 100 < {percent} drop; }}\n"
            f"}}\n"
        )
        subprocess.run(["ip", "netns", "exec", segment, "nft", "-f", "-"], input=rules,
                       text=True, capture_output=True, timeout=CMD_TIMEOUT_S, check=True)

    def no_loss(self, segment: str, port: str) -> None:
        run("ip", "netns", "exec", segment, "nft", "delete", "table", "netdev", f"loss{port}",
            check=False)

    def spawn(self, ns: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start a process inside ``ns`` (``ip netns exec`` execs it: the PID is the process)."""
        with open(log, "wb") as fh:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=fh,
                                    stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; always waits. Returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # Deleting a namespace destroys its interfaces (and so both ends of its veths).
        for ns in reversed(self.namespaces):
            run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_until(pred: object, timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll ``pred()`` until truthy; bounded by ``timeout``."""
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
