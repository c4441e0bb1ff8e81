"""QR codes drawn with text, so a contact code can be scanned straight off the terminal.

Two QR rows share one terminal line (upper/lower half blocks), which makes the modules
roughly square in a normal terminal font. The code is always drawn dark-on-light with an
explicit style, whatever the theme: many scanners cannot read an inverted QR code.
"""

from __future__ import annotations

import segno
from rich.text import Text

QR_STYLE = "#000000 on #ffffff"
_BLOCKS = {(False, False): " ", (True, False): "▀", (False, True): "▄", (True, True): "█"}


def qr_text(data: str, *, border: int = 2) -> Text:
    """Render ``data`` as a QR code. Contact codes are case-insensitive base32, so they are
    encoded upper-case: QR's alphanumeric mode then makes the symbol about a third smaller
    (version 4, 37x37 with the border, 19 lines: it fits an 80x24 terminal)."""
    payload = data.upper() if data.isascii() else data
    qr = segno.make(payload, error="m", boost_error=False)
    rows = [[bool(cell) for cell in row] for row in qr.matrix_iter(border=border)]
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))
    lines = ["".join(_BLOCKS[(a, b)] for a, b in zip(top, bottom, strict=True))
             for top, bottom in zip(rows[0::2], rows[1::2], strict=True)]
    return Text("\n".join(lines), style=QR_STYLE, no_wrap=True, end="")
