"""How node data is worded on screen: delivery states, transports, times, peers.

Kept apart from the widgets so the words are the same everywhere (message rows, the
legend, the help screen) and can be tested without a terminal. Nothing here parses markup:
functions return ``Content`` built from sanitized pieces.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, tzinfo

from textual.content import Content

from mesh import api
from tui.safe import line

#: state -> (glyph, word, style). The glyphs differ in shape, not only colour, so they
#: read on a monochrome terminal and for colour-blind users.
STATES: dict[str, tuple[str, str, str]] = {
    api.STATE_QUEUED: ("◷", "queued", "$text-muted"),
    api.STATE_RELAYED: ("✓", "relayed", "$text-accent"),
    api.STATE_DELIVERED: ("✓✓", "delivered", "$text-success"),
}
STATE_ORDER = {state: i for i, state in enumerate(api.OUTBOX_STATES)}
STATE_HELP = {
    api.STATE_QUEUED: "stored on this device, waiting for someone to carry it",
    api.STATE_RELAYED: "handed to another device that carries it on",
    api.STATE_DELIVERED: "the recipient's device confirmed it",
}
TRANSPORTS = {"lan": "LAN", "ble": "BLE", "tcp": "TCP", "memory": "memory", "bundle": "file"}
SYNCING = ("reconciling", "transferring")


def later_state(a: str, b: str) -> str:
    """States only move forward; an older report must not undo a newer one."""
    return a if STATE_ORDER.get(a, -1) >= STATE_ORDER.get(b, -1) else b


def state_text(state: str) -> Content:
    glyph, word, style = STATES.get(state, ("?", line(state).plain, ""))
    return Content.assemble((glyph, f"bold {style}".strip()), " ", (word, style))


def legend() -> Content:
    """One line that explains the glyphs, always under the conversation."""
    return Content("   ").join(state_text(state) for state in api.OUTBOX_STATES)


def transport_label(transport: object) -> str:
    if isinstance(transport, str) and transport.lower() in TRANSPORTS:
        return TRANSPORTS[transport.lower()]
    return line(transport).plain[:8] or "?"


def clock_time(at: float, now: float, tz: tzinfo | None) -> str:
    """``HH:MM`` today, ``Mon 14 HH:MM`` otherwise: the device clock may be wrong in a
    blackout, so we never say "5 minutes ago" as if we knew."""
    try:
        when = datetime.fromtimestamp(at, tz)
        today = datetime.fromtimestamp(now, tz).date()
    except (OverflowError, OSError, ValueError, TypeError):
        return "--:--"
    if when.date() == today:
        return when.strftime("%H:%M")
    return when.strftime("%d %b %H:%M")


def sync_progress(peers: Iterable[api.PeerInfo]) -> tuple[int, int] | None:
    """(done, total) over every peer still syncing, or None when nothing is syncing.
    A total of 0 means "still comparing what we have" (progress unknown yet)."""
    done = total = 0
    syncing = False
    for peer in peers:
        if peer.state not in SYNCING:
            continue
        syncing = True
        total += max(0, peer.to_send) + max(0, peer.to_receive)
        done += max(0, peer.sent) + max(0, peer.received)
    if not syncing:
        return None
    return min(done, total), total


def bluetooth_line(status: str) -> str:
    """``on: central and peripheral on /org/bluez/hci0`` -> ``Bluetooth on``; an ``off``
    or a scan failure keeps its reason (the peer panel wraps it)."""
    state, _, rest = status.partition(":")
    if state.startswith("on") and "scanning fails" in rest:
        return "Bluetooth: scanning fails" + rest.split("scanning fails", 1)[1]
    if state.startswith("on"):
        return "Bluetooth on" + (" (others cannot find this laptop)"
                                 if "central only" in rest else "")
    return "Bluetooth off" + (f":{rest}" if rest else "")


def peer_line(peer: api.PeerInfo) -> Content:
    """``LAN  192.168.4.17:7447``; sync state is shown once, in the progress bar below,
    and only a link still shaking hands is marked, since it is not usable yet."""
    parts: list[Content | str | tuple[str, str]] = [
        (f"{transport_label(peer.transport):<5} ", "bold"), line(peer.address)]
    if peer.state == "handshake":
        parts.append((" connecting", "$text-muted"))
    return Content.assemble(*parts)
