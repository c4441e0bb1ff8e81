"""Who meets whom, and when: The ONE's connectivity traces and a random-waypoint model.

Trace format (The ONE's ``StandardEventsReader``, connection events only)::

    TIME CONN HOST_A HOST_B up|down [INTERFACE]

``TIME`` in seconds (a decimal number), hosts as The ONE writes them (``12`` or ``p12``:
the trailing digits are the address), ``up``/``down`` in any case. Blank lines and lines
starting with ``#`` are skipped. A trace is a file from outside, so it is read as hostile
input: bounded line length, event count, host address and time; anything else is a
``TraceError`` naming the line. Message events (``C``, ``S``, ``DE``...) are refused rather
than ignored, so a mistaken file never replays silently as an empty scenario.

Random waypoint (The ONE's ``RandomWaypoint``): each node starts at a uniform point of a
``W x H`` area, walks straight to another uniform point at a speed uniform in
``speed``, pauses for a time uniform in ``pause``, and repeats; optional fixed relays stand
at the centres of a grid over the area. Contacts are computed
exactly, not by sampling: between two breakpoints both nodes move linearly, so their
squared distance is a quadratic in time and the in-range interval is its root interval.
That makes the contact list independent of a time step and cheap enough for 126 nodes
over 12 hours (about 8,000 pairs x 100 segment pairs).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mesh.errors import UserError

__all__ = [
    "MAX_EVENTS",
    "MAX_HOST",
    "MAX_LINE",
    "MAX_TIME",
    "ContactEvent",
    "TraceError",
    "WaypointSpec",
    "format_trace",
    "load_trace",
    "parse_trace",
    "random_waypoint_contacts",
    "trace_lines",
]

MAX_LINE = 1024
MAX_EVENTS = 5_000_000
MAX_HOST = 100_000
MAX_TIME = 10 * 365 * 86_400.0
_HOST = re.compile(r"^[A-Za-z_]*(\d{1,9})$")


class TraceError(UserError):
    """A trace line could not be used; the message names the line and the reason."""


@dataclass(frozen=True, slots=True)
class ContactEvent:
    """A link between hosts ``a`` and ``b`` (``a < b``) comes up or goes down at ``time``."""

    time: float
    a: int
    b: int
    up: bool


def _host(token: str, lineno: int) -> int:
    match = _HOST.match(token)
    if match is None:
        raise TraceError(f"line {lineno}: invalid host id {token[:40]!r}")
    value = int(match.group(1))
    if value >= MAX_HOST:
        raise TraceError(f"line {lineno}: host address {value} above the limit {MAX_HOST - 1}")
    return value


def _parse_line(line: str, lineno: int) -> ContactEvent | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    fields = stripped.split()
    if len(fields) >= 2 and fields[1] != "CONN":
        raise TraceError(f"line {lineno}: only CONN events can be replayed, not "
                         f"{fields[1][:20]!r} (give the message load with --msg-*)")
    if len(fields) not in (5, 6):
        raise TraceError(f"line {lineno}: expected 'TIME CONN HOST_A HOST_B up|down', "
                         f"got {len(fields)} fields")
    try:
        time = float(fields[0])
    except ValueError:
        raise TraceError(f"line {lineno}: time {fields[0][:40]!r} is not a number") from None
    if not 0.0 <= time <= MAX_TIME:  # also rejects nan
        raise TraceError(f"line {lineno}: time {fields[0][:40]!r} out of range 0..{MAX_TIME:.0f}")
    a, b = _host(fields[2], lineno), _host(fields[3], lineno)
    if a == b:
        raise TraceError(f"line {lineno}: host {a} connects to itself")
    state = fields[4].lower()
    if state not in ("up", "down"):
        raise TraceError(f"line {lineno}: expected 'up' or 'down', got {fields[4][:20]!r}")
    return ContactEvent(time, min(a, b), max(a, b), state == "up")


def parse_trace(lines: Iterable[str], *, max_events: int = MAX_EVENTS) -> list[ContactEvent]:
    """Parse trace lines into events sorted by time (stable, so file order breaks ties)."""
    events: list[ContactEvent] = []
    for lineno, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            raise TraceError(f"line {lineno}: longer than {MAX_LINE} characters")
        event = _parse_line(line, lineno)
        if event is None:
            continue
        if len(events) >= max_events:
            raise TraceError(f"line {lineno}: more than {max_events} events")
        events.append(event)
    events.sort(key=lambda e: e.time)
    return events


def trace_lines(path: Path) -> Iterator[str]:
    """Lines of a trace file, refusing an over-long line before it is held in memory."""
    try:
        with path.open("r", encoding="utf-8", newline=None) as f:
            while True:
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return
                yield line
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None


def load_trace(path: Path, *, max_events: int = MAX_EVENTS) -> list[ContactEvent]:
    return parse_trace(trace_lines(path), max_events=max_events)


def format_trace(events: Iterable[ContactEvent]) -> str:
    """The events in The ONE's format (what ``ConnectivityONEReport`` writes)."""
    return "".join(f"{e.time:.1f} CONN {e.a} {e.b} {'up' if e.up else 'down'}\n" for e in events)


# ---- random waypoint --------------------------------------------------------------------


@dataclass(frozen=True)
class WaypointSpec:
    nodes: int = 126
    area: tuple[float, float] = (4500.0, 3400.0)
    speed: tuple[float, float] = (0.5, 1.5)
    pause: tuple[float, float] = (0.0, 120.0)
    range_m: float = 10.0
    #: Fixed relays added after the walkers (hosts ``nodes .. nodes + relays - 1``), placed
    #: at the centres of an even grid over the area. The walkers' paths do not depend on
    #: it, so runs with 0, 2, 4... relays see the same people walking.
    relays: int = 0

    def check(self) -> None:
        if not 2 <= self.nodes + self.relays <= MAX_HOST or self.nodes < 1:
            raise UserError(f"--nodes must be between 2 and {MAX_HOST}")
        if self.relays < 0:
            raise UserError("--relays cannot be negative")
        w, h = self.area
        if not (0 < w <= 1e7 and 0 < h <= 1e7):
            raise UserError("--area needs positive width and height (metres)")
        if not 0 < self.speed[0] <= self.speed[1]:
            raise UserError("--speed needs 0 < A <= B (m/s)")
        if not 0 <= self.pause[0] <= self.pause[1]:
            raise UserError("--pause needs 0 <= A <= B (seconds)")
        if not self.range_m > 0:
            raise UserError("--range must be positive (metres)")


#: One straight piece of a path: from ``t0`` to ``t1`` starting at ``(x, y)`` with velocity ``(vx, vy)``.
_Segment = tuple[float, float, float, float, float, float]


def _path(spec: WaypointSpec, duration: float, rng: random.Random) -> list[_Segment]:
    w, h = spec.area
    x, y = rng.uniform(0, w), rng.uniform(0, h)
    t = 0.0
    segments: list[_Segment] = []
    while t < duration:
        nx, ny = rng.uniform(0, w), rng.uniform(0, h)
        speed = rng.uniform(*spec.speed)
        travel = math.hypot(nx - x, ny - y) / speed
        if travel > 0:
            segments.append((t, t + travel, x, y, (nx - x) / travel, (ny - y) / travel))
            t += travel
        x, y = nx, ny
        wait = rng.uniform(*spec.pause)
        if wait > 0:
            segments.append((t, t + wait, x, y, 0.0, 0.0))
            t += wait
    return segments


def _relay_paths(spec: WaypointSpec, duration: float) -> list[list[_Segment]]:
    """Stationary relays at the centres of a ``cols x rows`` grid over the area."""
    if not spec.relays:
        return []
    w, h = spec.area
    cols = math.ceil(math.sqrt(spec.relays * w / h))
    rows = math.ceil(spec.relays / cols)
    return [[(0.0, duration, w * (i % cols + 0.5) / cols, h * (i // cols + 0.5) / rows, 0.0, 0.0)]
            for i in range(spec.relays)]


def _in_range(a: _Segment, b: _Segment, t0: float, t1: float, r2: float) -> tuple[float, float] | None:
    """The part of ``[t0, t1]`` during which the two moving points are within range."""
    dx = (a[2] + a[4] * (t0 - a[0])) - (b[2] + b[4] * (t0 - b[0]))
    dy = (a[3] + a[5] * (t0 - a[0])) - (b[3] + b[5] * (t0 - b[0]))
    vx, vy = a[4] - b[4], a[5] - b[5]
    qa = vx * vx + vy * vy
    c = dx * dx + dy * dy - r2
    span = t1 - t0
    if qa == 0.0:
        return (t0, t1) if c <= 0 else None
    # Cheap reject: even closing at full relative speed cannot bring them within range.
    reach = math.sqrt(qa) * span
    if c > 0 and dx * dx + dy * dy > (reach + math.sqrt(r2)) ** 2:
        return None
    qb = 2 * (dx * vx + dy * vy)
    disc = qb * qb - 4 * qa * c
    if disc < 0:
        return None
    root = math.sqrt(disc)
    s0, s1 = max(0.0, (-qb - root) / (2 * qa)), min(span, (-qb + root) / (2 * qa))
    return (t0 + s0, t0 + s1) if s0 < s1 else None


def _pair_contacts(pa: list[_Segment], pb: list[_Segment], r2: float,
                   duration: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    i = j = 0
    while i < len(pa) and j < len(pb):
        a, b = pa[i], pb[j]
        t0, t1 = max(a[0], b[0]), min(a[1], b[1], duration)
        if t1 > t0:
            hit = _in_range(a, b, t0, t1, r2)
            if hit is not None:
                if out and hit[0] - out[-1][1] < 1e-6:
                    out[-1] = (out[-1][0], hit[1])  # continues across a breakpoint
                else:
                    out.append(hit)
        if a[1] <= b[1]:
            i += 1
        else:
            j += 1
    return out


def random_waypoint_contacts(
    spec: WaypointSpec, *, duration: float, rng: random.Random,
) -> list[ContactEvent]:
    """Contact events for ``spec`` over ``[0, duration]``, sorted by time then hosts."""
    spec.check()
    paths = [_path(spec, duration, rng) for _ in range(spec.nodes)] + _relay_paths(spec, duration)
    r2 = spec.range_m ** 2
    events: list[ContactEvent] = []
    for a in range(len(paths)):
        for b in range(a + 1, len(paths)):
            for start, end in _pair_contacts(paths[a], paths[b], r2, duration):
                events.append(ContactEvent(start, a, b, True))
                if end < duration:
                    events.append(ContactEvent(end, a, b, False))
    events.sort(key=lambda e: (e.time, e.a, e.b, e.up))
    return events
