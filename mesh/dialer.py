"""Dialing peers that a discovery mechanism (mDNS today) merely *hinted* at.

A discovered service is an unauthenticated claim from anyone on the segment, so this
module treats it as a hint with a price tag: the table of candidates is bounded (LRU, a
few per host), connection attempts come out of one global token bucket with a cap on how
many are in flight, failures back off with jitter, and an address whose link broke the
protocol (a host that accepts connections and speaks garbage) is shut out for a long
time. Identity is proven only inside the Noise handshake, never by the announcement.

Liveness comes from links, not from mDNS: zeroconf keeps a vanished peer's records for
about 19 minutes and will not tell us it came back, so an address that carried a real
Pigeon link is re-dialed with a short, capped delay for ``RETURN_WINDOW_S`` after the
link drops. That is what brings a returning peer back within seconds.

``CandidateTable`` is pure policy (it takes ``now`` and an rng, does no I/O) so it can be
tested with a hand-advanced clock; ``DiscoveredDialer`` is the asyncio loop around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mesh.transports.base import Link
from mesh.transports.tcp import connect_tcp, format_addr

log = logging.getLogger("pigeon.lan")

#: Candidates remembered at once; a flood of announcements evicts the worst, not the best.
MAX_CANDIDATES = 64
#: Candidates per host address: one host announcing hundreds of ports gets only this many.
MAX_PER_HOST = 4
#: Global attempt rate (tokens per second) and burst.
DIAL_RATE = 8.0
DIAL_BURST = 16
#: TCP connects in flight at once. A connect costs one socket; spoofed announcements
#: pointing at hosts that do not exist hold one for CONNECT_TIMEOUT_S each.
MAX_CONNECTING = 16
#: Our own dialed links still in the Noise handshake: half of Node.max_handshakes, so
#: hosts that accept and stall can never crowd out peers dialing us.
MAX_HANDSHAKING = 4
#: A LAN connect answers in milliseconds; 1.5 s still allows one SYN retransmission.
#: Addresses that carried a real link get longer, as they are worth waiting for.
CONNECT_TIMEOUT_S = 1.5
PROVEN_CONNECT_TIMEOUT_S = 3.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
#: A host that broke the protocol waits this long, doubling up to GARBAGE_MAX_S.
GARBAGE_BACKOFF_S = 300.0
GARBAGE_MAX_S = 3600.0
#: Penalised addresses remembered after their candidate is evicted.
MAX_PENALTIES = 256
#: After a real Pigeon link drops, re-dial that address every ~RETURN_DELAY_S for this long.
RETURN_WINDOW_S = 20 * 60.0
RETURN_DELAY_S = 1.0
#: A candidate not announced again and not proven within this long is forgotten.
CANDIDATE_TTL_S = 20 * 60.0
#: A connected attempt waits at most this long for a handshake slot, then gives up.
HANDSHAKE_SLOT_WAIT_S = 5.0
#: Spread first attempts a little so two nodes that discover each other at once rarely
#: complete two handshakes (the node closes the duplicate anyway).
FIRST_TRY_JITTER_S = 0.25

DUPLICATE_REASON = "duplicate link"
#: Close reasons that mean "slow or gone", not "hostile", for an address that was proven.
TIMEOUT_REASONS = frozenset({"handshake timed out", "peer silent"})


@dataclass
class Candidate:
    """One (host, port) we may dial. Fields are the policy's memory of that address."""

    host: str
    port: int
    transport: str
    last_seen: float
    next_try: float
    failures: int = 0
    #: How many times this address broke the protocol (drives the long backoff).
    garbage: int = 0
    #: Until then, this address carried a real link recently: re-dial it quickly.
    proven_until: float = 0.0
    #: Link key of the peer last reached here, to skip dialing a peer we already have.
    remote_key: bytes | None = None
    in_flight: bool = False
    linked: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def address(self) -> str:
        return format_addr((self.host, self.port))

    def busy(self) -> bool:
        return self.in_flight or self.linked

    def rank(self, now: float) -> int:
        """Dial priority: proven peers first, fresh hints next, failing addresses last."""
        if now < self.proven_until:
            return 0
        if self.failures == 0 and self.garbage == 0:
            return 1
        return 2

    def badness(self, now: float) -> tuple[int, int, float]:
        """Eviction order: garbage first, then failing, then fresh, then proven; oldest first."""
        if self.garbage:
            cls = 0
        elif self.failures and now >= self.proven_until:
            cls = 1
        elif now >= self.proven_until:
            cls = 2
        else:
            cls = 3
        return (cls, -self.failures - self.garbage, self.last_seen)


class TokenBucket:
    """Classic token bucket; ``now`` comes from the caller."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def try_take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def next_available(self, now: float) -> float:
        self._refill(now)
        return now if self.tokens >= 1.0 else now + (1.0 - self.tokens) / self.rate


class CandidateTable:
    """Bounded LRU of dial candidates with backoff, rate limit and garbage penalties."""

    def __init__(self, now: float, *, rng: Callable[[], float] = random.random,
                 max_candidates: int = MAX_CANDIDATES, max_per_host: int = MAX_PER_HOST,
                 rate: float = DIAL_RATE, burst: int = DIAL_BURST) -> None:
        self._rng = rng
        self.max_candidates = max_candidates
        self.max_per_host = max_per_host
        self.bucket = TokenBucket(rate, burst, now)
        self._items: OrderedDict[tuple[str, int], Candidate] = OrderedDict()
        #: Penalties outlive eviction, or re-announcing a garbage address would reset it.
        self._penalties: OrderedDict[tuple[str, int], tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, host: str, port: int) -> Candidate | None:
        return self._items.get((host, port))

    def _jitter(self) -> float:
        return 0.75 + 0.5 * self._rng()

    # ---- hints in and out ----------------------------------------------------------

    def note(self, host: str, port: int, transport: str, now: float,
             ) -> tuple[Candidate | None, list[Candidate]]:
        """A discovery hint. Returns (the candidate if it is new, candidates evicted for it)."""
        existing = self._items.get((host, port))
        if existing is not None:
            # Seen again: fresher for eviction, but no earlier retry (or re-announcing
            # would be a way around the backoff).
            existing.last_seen = now
            self._items.move_to_end(existing.key)
            return None, []
        evicted: list[Candidate] = []
        same_host = [c for c in self._items.values() if c.host == host]
        if len(same_host) >= self.max_per_host:
            victim = self._worst(same_host, now)
            if victim is None:
                return None, []
            evicted.append(self._remove(victim))
        if len(self._items) >= self.max_candidates:
            victim = self._worst(list(self._items.values()), now)
            if victim is None:
                return None, evicted
            evicted.append(self._remove(victim))
        cand = Candidate(host=host, port=port, transport=transport, last_seen=now,
                         next_try=now + FIRST_TRY_JITTER_S * self._rng())
        until, garbage = self._penalties.get(cand.key, (0.0, 0))
        if until > now:
            cand.next_try, cand.garbage = until, garbage
        self._items[cand.key] = cand
        return cand, evicted

    def _worst(self, pool: list[Candidate], now: float) -> Candidate | None:
        idle = [c for c in pool if not c.busy()]
        return min(idle, key=lambda c: c.badness(now)) if idle else None

    def _remove(self, cand: Candidate) -> Candidate:
        self._items.pop(cand.key, None)
        if cand.garbage:
            self._penalties[cand.key] = (cand.next_try, cand.garbage)
            self._penalties.move_to_end(cand.key)
            while len(self._penalties) > MAX_PENALTIES:
                self._penalties.popitem(last=False)
        return cand

    def forget(self, host: str, port: int, now: float) -> Candidate | None:
        """The service said goodbye: drop it unless a link or an attempt is using it, or it
        carried a real link lately (goodbyes are unauthenticated; proven peers are kept)."""
        cand = self._items.get((host, port))
        if cand is None or cand.busy() or now < cand.proven_until:
            return None
        return self._remove(cand)

    def expire(self, now: float) -> list[Candidate]:
        """Forget candidates neither announced nor proven within the TTL."""
        stale = [c for c in self._items.values()
                 if not c.busy() and now >= c.proven_until and now - c.last_seen > CANDIDATE_TTL_S]
        return [self._remove(c) for c in stale]

    # ---- choosing what to dial -------------------------------------------------------

    def take(self, now: float, is_linked: Callable[[bytes], bool]) -> Candidate | None:
        """The best due candidate, if the rate limit allows an attempt now; marks it in flight."""
        due = [c for c in self._items.values()
               if not c.busy() and c.next_try <= now
               and not (c.remote_key is not None and is_linked(c.remote_key))]
        if not due:
            return None
        best = min(due, key=lambda c: (c.rank(now), c.next_try))
        if not self.bucket.try_take(now):
            return None
        best.in_flight = True
        return best

    def next_wakeup(self, now: float) -> float | None:
        """When ``take`` may next succeed (ignores linked-peer skips: the caller re-polls)."""
        times = [c.next_try for c in self._items.values() if not c.busy()]
        if not times:
            return None
        return max(min(times), self.bucket.next_available(now))

    # ---- outcomes --------------------------------------------------------------------

    def attempt_failed(self, cand: Candidate, now: float) -> None:
        """The TCP connect failed or the node refused the link (too many links)."""
        cand.in_flight = False
        cand.failures += 1
        if now < cand.proven_until:
            cand.next_try = now + RETURN_DELAY_S * self._jitter()
        else:
            delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** min(cand.failures - 1, 16))
            cand.next_try = now + delay * self._jitter()

    def connected(self, cand: Candidate, remote_key: bytes) -> None:
        """The Noise handshake completed: this address is a real Pigeon node."""
        cand.in_flight = False
        cand.linked = True
        cand.remote_key = remote_key
        cand.failures = 0
        cand.garbage = 0
        cand.proven_until = math.inf

    def link_closed(self, cand: Candidate, now: float, *, handshaken: bool, error: bool,
                    reason: str) -> bool:
        """A link dialed from this candidate ended. Returns True if it was judged garbage."""
        was_proven = handshaken or now < cand.proven_until
        cand.in_flight = False
        cand.linked = False
        if DUPLICATE_REASON in reason:
            cand.proven_until = now + RETURN_WINDOW_S
            cand.next_try = now + RETURN_DELAY_S * self._jitter()
            return False
        hostile = error and not (was_proven and reason in TIMEOUT_REASONS)
        if hostile:
            cand.garbage += 1
            cand.proven_until = 0.0
            delay = min(GARBAGE_MAX_S, GARBAGE_BACKOFF_S * 2.0 ** min(cand.garbage - 1, 16))
            cand.next_try = now + delay * self._jitter()
            return True
        if was_proven:
            cand.proven_until = now + RETURN_WINDOW_S
            cand.failures = 0
            cand.next_try = now + RETURN_DELAY_S * self._jitter()
        else:  # never proven: an ordinary failed attempt
            self.attempt_failed(cand, now)
        return False


# ---- the asyncio side ---------------------------------------------------------------


class LinkObserver(Protocol):
    """What a node tells whoever opened a link about it; each method is called once."""

    def handshake_completed(self, remote_key: bytes) -> None: ...

    def link_closed(self, *, handshaken: bool, error: bool, reason: str) -> None: ...


class DialHost(Protocol):
    """The part of ``Node`` the dialer needs (a Protocol, so this module never imports it)."""

    def add_link(self, link: Link, *, initiator: bool,
                 observer: LinkObserver | None = None) -> asyncio.Task[Any] | None: ...

    def has_link_to(self, remote_key: bytes) -> bool: ...


class _Attempt:
    """Observer for one dialed link: feeds the outcome back to the table."""

    def __init__(self, dialer: DiscoveredDialer, cand: Candidate) -> None:
        self.dialer = dialer
        self.cand = cand
        self.settled = asyncio.Event()

    def handshake_completed(self, remote_key: bytes) -> None:
        self.dialer.table.connected(self.cand, remote_key)
        self.settled.set()
        self.dialer.wake.set()

    def link_closed(self, *, handshaken: bool, error: bool, reason: str) -> None:
        garbage = self.dialer.table.link_closed(
            self.cand, self.dialer.clock(), handshaken=handshaken, error=error, reason=reason)
        if garbage:
            log.warning("lan candidate %s misbehaved (%s): backing off for %.0f s",
                        self.cand.address, reason, self.cand.next_try - self.dialer.clock())
        self.settled.set()
        self.dialer.wake.set()


class DiscoveredDialer:
    """Runs the table: dials due candidates within the rate and in-flight limits."""

    def __init__(self, host: DialHost, *, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 connect: Callable[[str, int, float], Any] = connect_tcp) -> None:
        self.host = host
        self.clock = clock
        self.table = CandidateTable(clock(), rng=rng)
        self.wake = asyncio.Event()
        self._connect = connect
        self._connecting = 0
        self._handshakes = asyncio.Semaphore(MAX_HANDSHAKING)
        self._attempts: set[asyncio.Task[None]] = set()

    def note(self, host: str, port: int, transport: str = "lan") -> None:
        now = self.clock()
        new, evicted = self.table.note(host, port, transport, now)
        for cand in evicted:
            log.info("lan candidate lost %s (evicted)", cand.address)
        if new is not None:
            log.info("lan candidate found %s", new.address)
        self.wake.set()

    def forget(self, host: str, port: int) -> None:
        cand = self.table.forget(host, port, self.clock())
        if cand is not None:
            log.info("lan candidate lost %s (goodbye)", cand.address)

    async def run(self) -> None:
        try:
            while True:
                now = self.clock()
                for stale in self.table.expire(now):
                    log.info("lan candidate lost %s (not seen for %.0f min)", stale.address,
                             (now - stale.last_seen) / 60)
                while self._connecting < MAX_CONNECTING:
                    cand = self.table.take(now, self.host.has_link_to)
                    if cand is None:
                        break
                    self._connecting += 1
                    task = asyncio.ensure_future(self._attempt(cand))
                    self._attempts.add(task)
                    task.add_done_callback(self._attempts.discard)
                wakeup = self.table.next_wakeup(now)
                delay = 5.0 if wakeup is None else min(5.0, max(0.05, wakeup - now))
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), delay)
        finally:
            for task in list(self._attempts):
                task.cancel()

    async def _attempt(self, cand: Candidate) -> None:
        timeout = (PROVEN_CONNECT_TIMEOUT_S if self.clock() < cand.proven_until
                   else CONNECT_TIMEOUT_S)
        try:
            link = await self._connect(cand.host, cand.port, timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            log.debug("lan dial %s failed: %s", cand.address, exc)
            self.table.attempt_failed(cand, self.clock())
            return
        finally:
            self._connecting -= 1
            self.wake.set()
        link.transport = cand.transport
        try:
            await asyncio.wait_for(self._handshakes.acquire(), HANDSHAKE_SLOT_WAIT_S)
        except TimeoutError:
            link.close()
            self.table.attempt_failed(cand, self.clock())
            return
        try:
            attempt = _Attempt(self, cand)
            if self.host.add_link(link, initiator=True, observer=attempt) is None:
                self.table.attempt_failed(cand, self.clock())
                return
            # Hold the handshake slot until the handshake settles one way or the other;
            # the session's own handshake timeout bounds this wait.
            await attempt.settled.wait()
        finally:
            self._handshakes.release()
            self.wake.set()
