"""Message load in the style of The ONE's ``MessageEventGenerator``.

The same knobs, with the same meaning, so a ONE settings file translates directly:
``interval`` (seconds between two creations, uniform in ``[a, b]``), ``size`` (bytes,
uniform in ``[a, b)``), ``hosts`` and ``to_hosts`` (half-open ranges of host
addresses; the recipient is redrawn until it differs from the sender) and a TTL in
minutes. The first message is created one interval after the start, as in The ONE.

Sizes are the *text* a person typed; the sealed envelope that travels is larger (about
200 bytes of keys, header and padding to a size class), and the report counts envelope
bytes, since those are what cross the air.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.envelope import MAX_TTL_S
from mesh.errors import UserError

__all__ = ["MAX_MESSAGES", "MAX_TEXT", "LoadSpec", "MessageEvent", "generate_messages"]

#: Bounds that keep a typo (an interval of 0.0001 s) from eating the machine.
MAX_MESSAGES = 1_000_000
#: The longest text one sealed direct message carries (``mesh.sealing.DIRECT_MAX_VAR``
#: less the name and length fields), rounded down.
MAX_TEXT = 16_000


@dataclass(frozen=True)
class LoadSpec:
    interval: tuple[float, float] = (25.0, 35.0)
    size: tuple[int, int] = (100, 500)
    ttl_minutes: float = 300.0
    #: Sender addresses ``[a, b)``; None means every node.
    hosts: tuple[int, int] | None = None
    #: Recipient addresses ``[a, b)``; None means the same as ``hosts``.
    to_hosts: tuple[int, int] | None = None

    def check(self, nodes: int) -> None:
        """Raise ``UserError`` with a clear message for an impossible load."""
        lo, hi = self.interval
        if not 0 < lo <= hi:
            raise UserError("--msg-interval needs 0 < A <= B seconds")
        smin, smax = self.size
        if not 1 <= smin <= smax <= MAX_TEXT:
            raise UserError(f"--msg-size needs 1 <= A <= B <= {MAX_TEXT} bytes")
        if not 0 < self.ttl_minutes * 60 <= MAX_TTL_S:
            raise UserError(f"--msg-ttl must be between 1 second and {MAX_TTL_S // 60} minutes")
        senders = self.hosts or (0, nodes)
        recipients = self.to_hosts or senders
        for what, (a, b) in (("sender", senders), ("recipient", recipients)):
            if not 0 <= a < b <= nodes:
                raise UserError(f"{what} host range [{a}, {b}) is not within 0..{nodes}")
        if senders[1] - senders[0] == 1 and senders == recipients:
            raise UserError("a host range of one node leaves no one to write to")

    @property
    def ttl_s(self) -> int:
        return max(1, int(self.ttl_minutes * 60))


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """One message to create: ``time`` in seconds since the start of the simulation."""

    time: float
    name: str
    sender: int
    recipient: int
    size: int
    ttl_s: int


def _draw_host(rng: random.Random, lo: int, hi: int) -> int:
    return lo if hi - lo <= 1 else lo + rng.randrange(hi - lo)


def generate_messages(
    spec: LoadSpec, *, nodes: int, duration: float, rng: random.Random,
) -> list[MessageEvent]:
    """Every message created in ``[0, duration)``, in time order; deterministic in ``rng``."""
    spec.check(nodes)
    senders = spec.hosts or (0, nodes)
    recipients = spec.to_hosts or senders
    lo, hi = spec.interval
    out: list[MessageEvent] = []
    t = rng.uniform(lo, hi)
    while t < duration:
        if len(out) >= MAX_MESSAGES:
            raise UserError(f"the load creates more than {MAX_MESSAGES} messages; "
                            "lengthen --msg-interval or shorten --duration")
        sender = _draw_host(rng, *senders)
        recipient = _draw_host(rng, *recipients)
        while recipient == sender:  # as The ONE; a one-node recipient range moves the sender
            if recipients[1] - recipients[0] == 1:
                sender = _draw_host(rng, *senders)
            else:
                recipient = _draw_host(rng, *recipients)
        smin, smax = spec.size
        size = smin if smin == smax else smin + rng.randrange(smax - smin)
        out.append(MessageEvent(t, f"M{len(out) + 1}", sender, recipient, size, spec.ttl_s))
        t += rng.uniform(lo, hi)
    return out
