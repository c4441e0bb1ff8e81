"""One LXMF endpoint for ``bench.lxmf_compare``, run as its own process (Reticulum is a
per-process singleton). Talks to the orchestrator with JSON lines on stdout.

Safety first: Reticulum's default configuration enables ``AutoInterface``, which
multicasts on every network interface of the machine. This script writes a config with a
single TCP interface on 127.0.0.1 *before* Reticulum starts, re-reads it, and refuses to
start if the file holds any other interface, any non-loopback address, or a shared
instance. Nothing else is ever started.

Usage::

    python -m bench.lxmf_peer recv CONFIGDIR PORT
    python -m bench.lxmf_peer send CONFIGDIR PORT DEST_HASH MODE COUNT SIZE

``recv`` listens on 127.0.0.1:PORT and prints ``{"event": "recv", "i": N, "t": T}`` for
every message; ``send`` dials 127.0.0.1:PORT and sends COUNT messages of SIZE bytes,
``burst`` (as fast as ``handle_outbound`` accepts them) or ``seq`` (each after the previous
one's delivery proof; after the first it prints ``warm`` and waits for a line on stdin, so
the orchestrator can start counting bytes once the link is up), printing ``sent`` and
``delivered`` events.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
ALLOWED_TYPES = {"TCPServerInterface", "TCPClientInterface"}


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def write_config(configdir: Path, *, server_port: int | None, client_port: int | None) -> Path:
    """The whole Reticulum config: one TCP interface on 127.0.0.1, no shared instance."""
    configdir.mkdir(parents=True, exist_ok=True)
    if server_port is not None:
        iface = ("  [[Bench TCP Server]]\n    type = TCPServerInterface\n    enabled = yes\n"
                 f"    listen_ip = {LOOPBACK}\n    listen_port = {server_port}\n")
    else:
        iface = ("  [[Bench TCP Client]]\n    type = TCPClientInterface\n    enabled = yes\n"
                 f"    target_host = {LOOPBACK}\n    target_port = {client_port}\n")
    text = ("[reticulum]\n  enable_transport = No\n  share_instance = No\n"
            "  panic_on_interface_error = Yes\n  discover_interfaces = No\n"
            "[logging]\n  loglevel = 2\n"
            "[interfaces]\n" + iface)
    path = configdir / "config"
    path.write_text(text)
    return path


def check_config(path: Path) -> None:
    """Refuse to start Reticulum unless the config is loopback TCP only."""
    from RNS.vendor.configobj import ConfigObj

    config = ConfigObj(str(path))
    reticulum = config.get("reticulum", {})
    if str(reticulum.get("share_instance", "Yes")).lower() not in ("no", "false"):
        raise SystemExit("refusing to start Reticulum: shared instance enabled")
    interfaces = config.get("interfaces", {})
    if len(interfaces) != 1:
        raise SystemExit(f"refusing to start Reticulum: {len(interfaces)} interfaces configured")
    for name, section in interfaces.items():
        kind = section.get("type")
        if kind not in ALLOWED_TYPES:
            raise SystemExit(f"refusing to start Reticulum: interface {name!r} is {kind}")
        host = section.get("listen_ip") or section.get("target_host")
        if host != LOOPBACK or "device" in section or "listen_on" in section:
            raise SystemExit(f"refusing to start Reticulum: interface {name!r} not on {LOOPBACK}")


def start(configdir: Path, **ports: int | None) -> Any:
    path = write_config(configdir, **ports)
    check_config(path)
    import RNS

    return RNS.Reticulum(configdir=str(configdir), loglevel=2)


def recv(configdir: Path, port: int) -> None:
    import LXMF
    import RNS

    start(configdir, server_port=port, client_port=None)
    router = LXMF.LXMRouter(storagepath=str(configdir / "lxmf"))
    identity = RNS.Identity()
    dest = router.register_delivery_identity(identity, display_name="bench-b")

    def on_message(message: Any) -> None:
        content = message.content_as_string()
        emit(event="recv", i=int(content[:8]), t=time.time())

    router.register_delivery_callback(on_message)
    emit(event="ready", hash=dest.hash.hex())
    router.announce(dest.hash)
    for line in sys.stdin:  # the orchestrator asks for announces, or closes stdin
        if line.strip() == "announce":
            router.announce(dest.hash)
    emit(event="bye")


def send(configdir: Path, port: int, dest_hex: str, mode: str, count: int, size: int) -> None:
    import LXMF
    import RNS

    start(configdir, server_port=None, client_port=port)
    router = LXMF.LXMRouter(storagepath=str(configdir / "lxmf"))
    source = router.register_delivery_identity(RNS.Identity(), display_name="bench-a")
    dest_hash = bytes.fromhex(dest_hex)
    deadline = time.time() + 30
    while not RNS.Transport.has_path(dest_hash):
        if time.time() > deadline:
            emit(event="error", reason="no path to the recipient")
            return
        RNS.Transport.request_path(dest_hash)
        time.sleep(0.2)
    dest = RNS.Destination(RNS.Identity.recall(dest_hash), RNS.Destination.OUT,
                           RNS.Destination.SINGLE, "lxmf", "delivery")
    emit(event="path")
    delivered = threading.Event()

    def on_delivered(message: Any) -> None:
        emit(event="delivered", i=int(message.content_as_string()[:8]), t=time.time())
        delivered.set()

    for i in range(count):
        content = f"{i:08d}".ljust(size, "x")
        message = LXMF.LXMessage(dest, source, content, "", desired_method=LXMF.LXMessage.DIRECT)
        message.register_delivery_callback(on_delivered)
        delivered.clear()
        emit(event="sent", i=i, t=time.time())
        router.handle_outbound(message)
        if mode == "seq" and not delivered.wait(timeout=30):
            emit(event="error", reason=f"message {i} not delivered within 30 s")
            return
        if mode == "seq" and i == 0:
            emit(event="warm")  # link is up: wait until the orchestrator starts counting
            sys.stdin.readline()
    for line in sys.stdin:  # stay up (delivery proofs still arriving) until told to go
        if line.strip() == "quit":
            break
    emit(event="bye")


def main(argv: list[str]) -> int:
    role, configdir, port = argv[0], Path(argv[1]), int(argv[2])
    if role == "recv":
        recv(configdir, port)
    else:
        send(configdir, port, argv[3], argv[4], int(argv[5]), int(argv[6]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
