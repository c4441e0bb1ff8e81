"""The TUI's pure helpers: display sanitizing, QR rendering, and how node data is worded."""

from __future__ import annotations

from datetime import UTC

import segno
from hypothesis import given
from hypothesis import strategies as st

from mesh import api
from mesh.identity import Identity, decode_contact, encode_contact
from tui.format import bluetooth_line, clock_time, later_state, sync_progress, transport_label
from tui.qr import qr_text
from tui.safe import line, plain, sanitize


def test_escape_sequences_become_visible_and_inert() -> None:
    assert sanitize("\x1b[2J\x1b]0;pwned\x07") == "␛[2J␛]0;pwned␇"
    assert sanitize("a\x9b31mb") == "a\ufffd31mb"  # the one-byte CSI
    assert sanitize("\x00\x7f") == "␀␡"
    assert sanitize("abc\u202etxt.exe") == "abc\ufffdtxt.exe"  # right-to-left override
    assert sanitize("one\r\ntwo\tthree") == "one\ntwo    three"
    assert sanitize("one\ntwo", multiline=False) == "one two"
    assert sanitize(None) == "" and sanitize(42) == "<int>"
    assert sanitize(ValueError("bad code")) == "bad code"
    assert sanitize("x" * 10, limit=4) == "xxxx …"


@given(st.text())
def test_sanitized_text_has_no_terminal_controls(value: str) -> None:
    out = sanitize(value)
    assert all(c == "\n" or (ord(c) >= 0x20 and not 0x7F <= ord(c) <= 0x9F) for c in out)
    assert "\x1b" not in out


def test_markup_is_never_parsed() -> None:
    content = plain("[bold red]x[/] [link=http://evil]y[/link]")
    assert content.plain == "[bold red]x[/] [link=http://evil]y[/link]"
    assert not content.spans
    assert line("[b]name[/b]\nsecond").plain == "[b]name[/b] second"


def test_qr_blocks_encode_the_same_matrix_as_segno_and_the_scan_decodes() -> None:
    ident = Identity.generate("sam")
    code = encode_contact(ident.public, "sam")
    text = qr_text(code, border=1).plain.split("\n")
    cells = {" ": (0, 0), "▀": (1, 0), "▄": (0, 1), "█": (1, 1)}
    rows: list[list[int]] = []
    for row in text:
        rows += [[cells[c][0] for c in row], [cells[c][1] for c in row]]
    matrix = [[int(bool(v)) for v in row] for row in segno.make(code.upper(), error="m",
                                                               boost_error=False).matrix_iter(border=1)]
    assert rows[:len(matrix)] == matrix
    # A scanner returns the upper-case text; it is still the same contact.
    assert decode_contact(code.upper())[0] == ident.public


def test_times_never_pretend_to_know_more_than_the_clock() -> None:
    noon = 1_790_000_000.0 - 1_790_000_000.0 % 86400 + 12 * 3600
    assert clock_time(noon + 60, noon, UTC) == "12:01"
    assert clock_time(noon - 86400, noon, UTC) == "20 Sep 12:00"
    assert clock_time(float("nan"), noon, UTC) == "--:--"


def peer(state: str, sent: int = 0, received: int = 0, to_send: int = 0,
         to_receive: int = 0, transport: str = "tcp") -> api.PeerInfo:
    return api.PeerInfo(link_key="k", transport=transport, address="a", state=state,
                        connected_at=0.0, sent=sent, received=received, to_send=to_send,
                        to_receive=to_receive)


def test_sync_progress_and_transport_names() -> None:
    assert sync_progress([peer("live")]) is None
    assert sync_progress([peer("reconciling")]) == (0, 0)
    assert sync_progress([peer("transferring", 1, 2, 3, 4), peer("live", 9, 9, 9, 9),
                          peer("transferring", 5, 0, 5, 0)]) == (8, 12)
    assert [transport_label(t) for t in ("lan", "BLE", "tcp", "memory")] == [
        "LAN", "BLE", "TCP", "memory"]
    assert transport_label("\x1b[31mevil-transport") == "␛[31mevi"
    assert later_state(api.STATE_DELIVERED, api.STATE_QUEUED) == api.STATE_DELIVERED
    assert later_state("", api.STATE_RELAYED) == api.STATE_RELAYED


def test_bluetooth_line_words_what_the_node_reports() -> None:
    assert bluetooth_line("on: central and peripheral on /org/bluez/hci0") == "Bluetooth on"
    assert bluetooth_line("on: central only (no peripheral role on darwin in this version)") \
        == "Bluetooth on (others cannot find this laptop)"
    assert bluetooth_line("off: no Bluetooth adapter") == "Bluetooth off: no Bluetooth adapter"
    assert bluetooth_line("off (--no-ble)") == "Bluetooth off"
    assert bluetooth_line("on: central only; scanning fails: adapter is powered off") \
        == "Bluetooth: scanning fails: adapter is powered off"
