"""Make strings from peers safe to put on a terminal.

Everything a peer controls (display names, message text, channel names, stranger labels,
even error text relayed by a node) passes through here before it reaches a widget:

* ``sanitize`` replaces terminal control characters with visible stand-ins, so an
  escape sequence shows up as harmless text (``\\x1b[2J`` becomes ``␛[2J``) instead of
  clearing the screen, retitling the window or faking other messages. Bidirectional
  overrides are replaced too: they can make text read in a different order than it was
  written (the "Trojan Source" trick) and so disguise a name or a link.
* ``plain`` wraps the result in a Textual ``Content``, which is shown as-is: square
  brackets are never parsed as markup, so a contact called ``[bold red]x[/]`` is shown
  exactly like that.

Never put a peer string into a markup string (``f"[b]{name}[/b]"``); build ``Content``
with ``plain`` / ``Content.assemble`` instead (a tuple ``(text, style)`` is literal too).
"""

from __future__ import annotations

from textual.content import Content

#: Bidirectional formatting characters (LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_REPLACEMENT = "\ufffd"
_MAX_DISPLAY = 8000


def _stand_in(char: str) -> str:
    code = ord(char)
    if code < 0x20:
        return chr(0x2400 + code)  # Unicode "control pictures": ␀ ... ␟, ␛ for ESC
    if code == 0x7F:
        return "\u2421"  # ␡
    return _REPLACEMENT  # C1 controls (0x80-0x9f, e.g. the one-byte CSI 0x9b), bidi


def sanitize(value: object, *, multiline: bool = True, limit: int = _MAX_DISPLAY) -> str:
    """A display-safe version of ``value``: no C0/C1 controls, no ESC, no bidi overrides.

    Newlines survive when ``multiline`` (message bodies); tabs become spaces; ``\\r\\n``
    becomes ``\\n``; everything else that could steer the terminal is replaced by a
    visible stand-in, so the user still sees that something odd was sent. Non-strings
    (a malformed event) are shown by type rather than trusted; an exception shows its
    message. Very long values are cut
    at ``limit`` characters so one message cannot make the UI crawl.
    """
    if isinstance(value, BaseException):
        value = str(value) or type(value).__name__
    elif not isinstance(value, str):
        value = "" if value is None else f"<{type(value).__name__}>"
    text = value[:limit] if len(value) > limit else value
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char == "\n":
            out.append("\n" if multiline else " ")
        elif code < 0x20 or 0x7F <= code <= 0x9F or char in _BIDI:
            out.append(_stand_in(char))
        elif char in "\u2028\u2029":  # line / paragraph separators
            out.append("\n" if multiline else " ")
        else:
            out.append(char)
    if len(value) > limit:
        out.append(" …")
    return "".join(out)


def plain(value: object, style: str = "", *, multiline: bool = True) -> Content:
    """``Content`` holding ``value`` sanitized and literal (never parsed as markup)."""
    return Content.styled(sanitize(value, multiline=multiline), style)


def line(value: object, style: str = "") -> Content:
    """Like ``plain`` for one-line labels (names, channel titles): newlines become spaces."""
    return plain(value, style, multiline=False)


def sentence(value: object, style: str = "$text-error") -> Content:
    """An error or notice for a person: the message (of an exception too), capitalised."""
    text = sanitize(value)
    return Content.styled(text[:1].upper() + text[1:], style)
