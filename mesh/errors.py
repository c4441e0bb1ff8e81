"""Error classes shared by every layer.

The split follows h11: a ``LocalProtocolError`` means our own caller misused an API
(a bug on this machine), a ``RemoteProtocolError`` means bytes from outside (a peer, a
file, an advertisement) broke a rule. The runtime closes the one link that raised a
``RemoteProtocolError``, logs ``reason`` and keeps serving everyone else.
"""

from __future__ import annotations


class PigeonError(Exception):
    """Base class of every error Pigeon raises on purpose."""


class LocalProtocolError(PigeonError):
    """Our own code called an API in a way it does not allow."""


class RemoteProtocolError(PigeonError):
    """Input from outside broke a rule; ``reason`` is safe to log (no secrets, no plaintext)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UserError(PigeonError):
    """A person gave input we cannot use; the message is shown to them as is."""
