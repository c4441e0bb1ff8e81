"""Range-based set reconciliation over ``(ts, id)`` keys (after Meyer's RBSR and Negentropy).

Two peers find the ids each holds that the other lacks, at a cost that grows with the
difference rather than with the stores. Keys are ``(ts, id)``: ``ts`` a u32 (minutes, at most
``MAX_TS``), ``id`` 16 bytes, ordered by ``ts`` then ``id``; the caller gives them sorted and
unique, and ``ts`` must be a function of ``id`` (both come from the envelope).

Protocol. A message is a list of ranges that tiles the whole key space: each range runs from
the previous range's upper bound (or the very bottom) up to its own ``upper`` (exclusive), and
the last ends at ``INFINITY``. A bound ``(ts, id_prefix)`` sorts like a key whose id is the
prefix, so it can be a few bytes. Every range has a mode:

* ``SKIP``: nothing to do here (already agreed, or the sender learned all it needed).
* ``FINGERPRINT``: BLAKE2b-128 of (sum of the ids as 128-bit little-endian integers mod 2**128,
  16 bytes LE) || (count, 8 bytes LE) over the sender's keys in the range. The receiver
  answers ``SKIP`` if its own fingerprint is equal, else it sends more detail: the range cut
  into sub-ranges of equal count (fingerprints, or id lists when tiny), or its ids if few.
* ``IDLIST``: the sender's *complete* ids in the range, in key order. The receiver resolves
  the range (ids it lacks go to ``need``, its ids missing from the list to ``have``). If the
  range lies inside one the receiver itself listed in its previous message, this is the answer
  to that list and there is nothing more to say (``SKIP``). Otherwise the receiver answers, so
  that the lister learns the difference too: ``SKIP`` if equal, else the range as pieces,
  ``SKIP`` where both agree and ``IDLIST`` (the receiver's complete ids) where they do not.
  Both sides therefore end with the full difference, each from its own point of view.

Each reply stays under ``max_message_bytes`` (as counted by ``encoded_size``) and
``MAX_RANGES_PER_MESSAGE``: detail that does not fit becomes a plain fingerprint of the
incoming range, or at worst one fingerprint from there to ``INFINITY``, and the next round
carries on. ``respond`` returns ``None`` when every range is ``SKIP``; that ends the exchange.

How much detail to send is a policy, not part of the protocol: the number of mismatching
fingerprints in a message estimates how dense the difference is, which sets how finely to cut
a range; the range that ends at ``INFINITY`` is cut geometrically finer towards the newest keys,
because peers that were apart differ mostly in what is newest.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from hashlib import blake2b
from itertools import accumulate

from mesh.errors import LocalProtocolError, RemoteProtocolError

ID_LEN = 16
MAX_TS = 2**32 - 2  # 2**32 - 1 is reserved for INFINITY
#: Hard limits shared with the codec (``mesh.wire``): a message never has more ranges, a
#: range never more ids.
MAX_RANGES_PER_MESSAGE = 4096
MAX_IDS_PER_RANGE = 3000
_MASK = (1 << 128) - 1
_CUT_COST = 12 + ID_LEN + 18  # a fingerprint range ending at INFINITY


class Mode(IntEnum):
    """What a range carries."""

    SKIP = 0
    FINGERPRINT = 1
    IDLIST = 2


@dataclass(frozen=True)
class Bound:
    """Exclusive upper end of a range; sorts like the key ``(ts, id_prefix)``."""

    ts: int
    id_prefix: bytes


#: The top of the key space; every message's last range ends here.
INFINITY = Bound(2**32 - 1, b"\xff" * ID_LEN)
_BOTTOM = Bound(0, b"")


@dataclass(frozen=True)
class Range:
    """Keys from the previous range's ``upper`` up to this ``upper`` (exclusive)."""

    upper: Bound
    mode: Mode
    fingerprint: bytes = b""
    ids: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ReconcileMessage:
    """One turn of the conversation; its ranges tile the whole key space in order."""

    ranges: tuple[Range, ...]


def _range_cost(upper: Bound, mode: Mode, n_ids: int = 0) -> int:
    if mode == Mode.FINGERPRINT:
        return 30 + len(upper.id_prefix)
    if mode == Mode.IDLIST:
        return 17 + len(upper.id_prefix) + 17 * n_ids
    return 12 + len(upper.id_prefix)


def encoded_size(message: ReconcileMessage) -> int:
    """A conservative estimate of the msgpack size; budgets are enforced against it."""
    return 5 + sum(_range_cost(r.upper, r.mode, len(r.ids)) for r in message.ranges)


def _between(prev: tuple[int, bytes], key: tuple[int, bytes]) -> Bound:
    """The shortest bound above ``prev`` and at or below ``key`` (bounds stay small)."""
    if prev[0] != key[0]:
        return Bound(key[0], b"")
    a, b = prev[1], key[1]
    i = 0
    while a[i] == b[i]:
        i += 1
    return Bound(key[0], b[: i + 1])


def _estimate_density(counts: dict[int, list[int]]) -> float:
    """Differences per key, estimated from ``count -> [matched, mismatched]`` fingerprints.

    Assumes differences scattered at random (a range of ``c`` keys matches with probability
    ``exp(-density * c)``). With no match at all it returns the density at which seeing every
    range mismatch is a coin flip, which grows with the number of ranges seen.
    """
    obs = [(c, m, x) for c, (m, x) in counts.items() if c > 0]
    if not any(x for _, _, x in obs):
        return 0.0
    all_mismatched = not any(m for _, m, _ in obs)

    def excess(lam: float) -> float:  # decreasing in lam
        if all_mismatched:
            return sum(x * math.log1p(-math.exp(-lam * c)) for c, _, x in obs) + math.log(2)
        return sum(x * c / math.expm1(lam * c) - m * c for c, m, x in obs)

    lo, hi = -25.0, 3.0  # natural log of the density
    for _ in range(40):
        mid = (lo + hi) / 2
        if excess(math.exp(mid)) > 0:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


@dataclass(frozen=True)
class _Detail:
    """Pending output for one incoming range: the ranges we want to send for it."""

    lo: int  # our key index where the incoming range starts
    lower: Bound
    upper: Bound
    ranges: list[Range]
    fresh_lists: bool  # some of ``ranges`` are new id lists the peer must answer


class Reconciler:
    """One side of a reconciliation; both sides use the same class.

    The initiator sends ``initiate()``; each side feeds what it receives to ``respond`` and
    sends the result until one ``respond`` returns ``None``. ``have`` and ``need`` then hold
    the full difference. Both peers must use the same ``max_message_bytes``; messages up to
    twice our own budget are accepted. After a ``RemoteProtocolError`` the object is spent.
    """

    def __init__(
        self,
        keys: Sequence[tuple[int, bytes]],
        *,
        max_message_bytes: int = 60_000,
        branching: int = 16,
        idlist_threshold: int = 32,
        max_need: int = 1_000_000,
    ) -> None:
        if max_message_bytes < 1024:
            raise LocalProtocolError("max_message_bytes must be at least 1024")
        if not 2 <= branching <= 256:
            raise LocalProtocolError("branching must be between 2 and 256")
        self._keys = list(keys)
        if not all(
            type(ts) is int and 0 <= ts <= MAX_TS and type(i) is bytes and len(i) == ID_LEN
            for ts, i in self._keys
        ):
            raise LocalProtocolError("keys must be (ts <= MAX_TS, 16-byte id)")
        if not all(a < b for a, b in zip(self._keys, self._keys[1:], strict=False)):
            raise LocalProtocolError("keys must be sorted and unique")
        self._ids = [i for _, i in self._keys]
        self._id_set = set(self._ids)
        if len(self._id_set) != len(self._ids):
            raise LocalProtocolError("ids must be unique")
        self._sums = [0, *accumulate(int.from_bytes(i, "little") for i in self._ids)]
        self._budget = max_message_bytes
        self._branching = branching
        # An id list must always fit in a message, with room to spare for the rest.
        self._list_max = max(1, min(idlist_threshold, (max_message_bytes // 2 - 64) // 17))
        self._max_need = max_need
        self._max_ranges = MAX_RANGES_PER_MESSAGE
        self._max_ids = min(2 * max_message_bytes // 17 + 16, MAX_RANGES_PER_MESSAGE * 8)
        self._listed: list[tuple[tuple[int, bytes], tuple[int, bytes]]] = []
        self._finished = False
        self.have: set[bytes] = set()
        self.need: set[bytes] = set()

    @property
    def done(self) -> bool:
        """True once this side knows the whole difference and expects no answer."""
        return self._finished

    # ---- public API ------------------------------------------------------------------

    def initiate(self) -> ReconcileMessage:
        """The opening message: one fingerprint over everything (in sync = one round trip)."""
        self._listed = []
        self._finished = False
        return ReconcileMessage((Range(INFINITY, Mode.FINGERPRINT, self._fingerprint(0, len(self._keys))),))

    def respond(self, message: ReconcileMessage) -> ReconcileMessage | None:
        """Process the peer's message; return our reply, or ``None`` when nothing is left."""
        ranges = self._validate(message)
        details: list[_Detail | Range] = []
        counts: dict[int, list[int]] = {}
        lo, lower = 0, _BOTTOM
        for r in ranges:
            hi = self._index(r.upper, lo)
            if r.mode == Mode.FINGERPRINT:
                same = self._fingerprint(lo, hi) == r.fingerprint
                counts.setdefault(hi - lo, [0, 0])[0 if same else 1] += 1
                if same:
                    details.append(Range(r.upper, Mode.SKIP))
                else:
                    details.append(_Detail(lo, lower, r.upper, [], True))
            elif r.mode == Mode.IDLIST:
                details.append(self._on_list(lo, hi, lower, r))
            else:
                details.append(Range(r.upper, Mode.SKIP))
            lo, lower = hi, r.upper
        density = _estimate_density(counts)
        details = [
            self._split(d, density) if isinstance(d, _Detail) and not d.ranges else d
            for d in details
        ]
        reply = self._write(details)
        if reply is None:
            self._finished = True
        return reply

    # ---- internals -------------------------------------------------------------------

    def _index(self, bound: Bound, lo: int = 0) -> int:
        return bisect_left(self._keys, (bound.ts, bound.id_prefix), lo)

    def _fingerprint(self, lo: int, hi: int) -> bytes:
        total = (self._sums[hi] - self._sums[lo]) & _MASK
        data = total.to_bytes(16, "little") + (hi - lo).to_bytes(8, "little")
        return blake2b(data, digest_size=16).digest()

    def _validate(self, message: ReconcileMessage) -> Sequence[Range]:
        """Check everything that does not need our keys; raise before touching any state."""
        if not isinstance(message, ReconcileMessage):
            raise RemoteProtocolError("not a reconcile message")
        ranges = message.ranges
        if not isinstance(ranges, tuple | list) or not ranges:
            raise RemoteProtocolError("reconcile message without ranges")
        if len(ranges) > self._max_ranges:
            raise RemoteProtocolError("too many ranges")
        prev: tuple[int, bytes] | None = None
        total_ids = 0
        for r in ranges:
            if not isinstance(r, Range) or not isinstance(r.upper, Bound):
                raise RemoteProtocolError("malformed range")
            ts, prefix = r.upper.ts, r.upper.id_prefix
            if type(ts) is not int or not 0 <= ts <= INFINITY.ts:
                raise RemoteProtocolError("bound time out of range")
            if type(prefix) is not bytes or len(prefix) > ID_LEN:
                raise RemoteProtocolError("bound id prefix too long")
            key = (ts, prefix)
            if prev is not None and key <= prev:
                raise RemoteProtocolError("bounds not increasing")
            prev = key
            if type(r.fingerprint) is not bytes or type(r.ids) not in (tuple, list):
                raise RemoteProtocolError("malformed range")
            if r.mode == Mode.FINGERPRINT:
                if len(r.fingerprint) != 16 or r.ids:
                    raise RemoteProtocolError("fingerprint must be 16 bytes")
            elif r.mode == Mode.IDLIST:
                if r.fingerprint or len(r.ids) > MAX_IDS_PER_RANGE:
                    raise RemoteProtocolError("id list too long")
                total_ids += len(r.ids)
                if total_ids > self._max_ids:
                    raise RemoteProtocolError("too many ids in one message")
                if not all(type(i) is bytes and len(i) == ID_LEN for i in r.ids):
                    raise RemoteProtocolError("ids must be 16 bytes")
            elif r.mode == Mode.SKIP:
                if r.fingerprint or r.ids:
                    raise RemoteProtocolError("skip range carries a payload")
            else:
                raise RemoteProtocolError("unknown range mode")
        if prev != (INFINITY.ts, INFINITY.id_prefix):
            raise RemoteProtocolError("last range does not end at infinity")
        return ranges

    def _resolve(self, lo: int, hi: int, ids: Sequence[bytes]) -> set[bytes]:
        """Record the difference in one range given the peer's complete list; return it as a set."""
        theirs = set(ids)
        if len(theirs) != len(ids):
            raise RemoteProtocolError("duplicate id in list")
        ours = self._ids[lo:hi]
        self.have.update(i for i in ours if i not in theirs)
        new = [i for i in ids if i not in self._id_set]
        if len(self.need) + len(new) > self._max_need:
            raise RemoteProtocolError("peer offers too many ids")
        self.need.update(new)
        return theirs

    def _is_answer(self, lower: Bound, upper: Bound) -> bool:
        """Does [lower, upper) lie inside a range we listed in our previous message?"""
        j = bisect_right(self._listed, ((lower.ts, lower.id_prefix), (INFINITY.ts + 1, b""))) - 1
        return j >= 0 and (upper.ts, upper.id_prefix) <= self._listed[j][1]

    def _on_list(self, lo: int, hi: int, lower: Bound, r: Range) -> _Detail | Range:
        theirs = self._resolve(lo, hi, r.ids)
        if self._is_answer(lower, r.upper):
            return Range(r.upper, Mode.SKIP)
        keys = self._keys[lo:hi]
        common = [i for i, (_, x) in enumerate(keys) if x in theirs]
        if len(common) == len(keys) == len(r.ids):
            return Range(r.upper, Mode.SKIP)
        # Where do their extra ids sit? Between two common ids, by the order of their list.
        position = {x: i for i, (_, x) in enumerate(keys)}
        dirty = [x not in theirs for _, x in keys]
        gap, last, gaps = 0, -1, set()
        for x in r.ids:
            i = position.get(x)
            if i is None:
                gaps.add(gap)
            elif i <= last:
                raise RemoteProtocolError("id list out of order")
            else:
                last, gap = i, gap + 1
        for g in gaps:  # pieces may not split such a gap: mark it and its two ends
            start = common[g - 1] if g > 0 else 0
            end = common[g] if g < len(common) else len(keys) - 1
            dirty[start : end + 1] = [True] * (end + 1 - start)
        if not keys:
            return _Detail(lo, lower, r.upper, [Range(r.upper, Mode.IDLIST)], False)
        for i in range(1, len(keys) - 1):  # a lone clean key costs more as a skip
            if dirty[i - 1] and dirty[i + 1]:
                dirty[i] = True
        pieces: list[Range] = []
        start = 0
        for i in range(1, len(keys) + 1):
            if i < len(keys) and dirty[i] == dirty[start]:
                continue
            upper = _between(keys[i - 1], keys[i]) if i < len(keys) else r.upper
            if dirty[start]:
                if i - start > MAX_IDS_PER_RANGE:
                    return _Detail(lo, lower, r.upper, [], False)  # too big: cut it instead
                pieces.append(Range(upper, Mode.IDLIST, ids=tuple(self._ids[lo + start : lo + i])))
            else:
                pieces.append(Range(upper, Mode.SKIP))
            start = i
        return _Detail(lo, lower, r.upper, pieces, False)

    def _split(self, d: _Detail, density: float) -> _Detail:
        """Detail for a mismatched range: our ids if few, else sub-range fingerprints."""
        lo, hi = d.lo, self._index(d.upper, d.lo)
        count = hi - lo
        if count <= self._list_max:
            return _Detail(lo, d.lower, d.upper, [Range(d.upper, Mode.IDLIST, ids=tuple(self._ids[lo:hi]))], True)
        k = self._branching
        if density > 0:
            expected = density * count / -math.expm1(-density * count)
            k = max(k, min(math.ceil(2 * expected), count // 2))
        cuts: list[int] = []
        if d.upper == INFINITY:  # newest first: sizes T, T, 2T, 4T, ... from the top
            size, top = self._list_max, hi
            while top - size > lo and size * 2 <= count // k:
                top -= size
                cuts.append(top)
                size = size * 2 if len(cuts) > 1 else size
            hi_uniform = top
        else:
            hi_uniform = hi
        n = hi_uniform - lo
        parts = max(1, min(k, round(n * k / count) if count else 1))
        cuts.extend(lo + (n * j) // parts for j in range(1, parts))
        cuts = sorted(set(c for c in cuts if lo < c < hi))
        ranges: list[Range] = []
        start = lo
        for cut in [*cuts, hi]:
            upper = _between(self._keys[cut - 1], self._keys[cut]) if cut < hi else d.upper
            if cut - start <= 1:
                ranges.append(Range(upper, Mode.IDLIST, ids=tuple(self._ids[start:cut])))
            else:
                ranges.append(Range(upper, Mode.FINGERPRINT, self._fingerprint(start, cut)))
            start = cut
        return _Detail(lo, d.lower, d.upper, ranges, True)

    def _write(self, details: list[_Detail | Range]) -> ReconcileMessage | None:
        """Assemble the reply within budget; merge skips; remember the lists we sent."""
        out: list[Range] = []
        size = 5
        listed: list[tuple[tuple[int, bytes], tuple[int, bytes]]] = []
        expects_answer = False
        position = _BOTTOM

        def add(r: Range) -> None:
            nonlocal size, position
            if r.mode == Mode.SKIP and out and out[-1].mode == Mode.SKIP:
                size -= _range_cost(out[-1].upper, Mode.SKIP)
                out.pop()
            if r.mode == Mode.IDLIST and fresh:
                listed.append(((position.ts, position.id_prefix), (r.upper.ts, r.upper.id_prefix)))
            out.append(r)
            size += _range_cost(r.upper, r.mode, len(r.ids))
            position = r.upper

        for n, d in enumerate(details):
            fresh = False
            if isinstance(d, Range):
                add(d)
                continue
            cost = sum(_range_cost(r.upper, r.mode, len(r.ids)) for r in d.ranges)
            room = self._budget - _CUT_COST - size
            if cost <= room and len(out) + len(d.ranges) < self._max_ranges:
                fresh = d.fresh_lists
                for r in d.ranges:
                    add(r)
                expects_answer = expects_answer or d.fresh_lists or any(
                    r.mode == Mode.FINGERPRINT for r in d.ranges)
            elif 30 + len(d.upper.id_prefix) <= room and len(out) + 1 < self._max_ranges:
                hi = self._index(d.upper, d.lo)
                add(Range(d.upper, Mode.FINGERPRINT, self._fingerprint(d.lo, hi)))
                expects_answer = True
            else:
                add(Range(INFINITY, Mode.FINGERPRINT, self._fingerprint(d.lo, len(self._keys))))
                expects_answer = True
                break
            del n
        if not expects_answer and all(r.mode == Mode.SKIP for r in out):
            self._listed = []
            return None
        self._listed = listed
        self._finished = not expects_answer
        return ReconcileMessage(tuple(out))
