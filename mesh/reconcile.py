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
from dataclasses import dataclass, field
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
_TAIL_GROWTH = 2
_TAIL_LIST = False
_MAX_SINGLE_TEST = 4096  # keys in a range we test for "the peer lacks exactly one of them"
#: Kept free while writing: a skip range then a fingerprint range, both ending at INFINITY.
_RESERVE = (12 + ID_LEN) + (30 + ID_LEN)


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

    def excess(lam: float) -> float:  # decreasing in lam; zero at the estimate
        if all_mismatched:
            return -sum(x * math.log1p(-math.exp(-lam * c)) for c, _, x in obs) - math.log(2)
        return sum(x * c / math.expm1(min(lam * c, 700.0)) - m * c for c, m, x in obs)

    lo, hi = -25.0, 3.0  # natural log of the density
    for _ in range(40):
        mid = (lo + hi) / 2
        if excess(math.exp(mid)) > 0:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


class _Kind(IntEnum):
    SKIP = 0  # agreed, or already resolved
    DETAIL = 1  # mismatched: cut it up or list it (decided once the whole message is seen)
    READY = 2  # what to send is already in ``ranges``


@dataclass(slots=True)
class _Item:
    """What we will say about one incoming range ``[lower, upper)`` = our keys ``[lo, hi)``."""

    lo: int
    hi: int
    lower: Bound
    upper: Bound
    kind: _Kind = _Kind.SKIP
    ranges: list[Range] = field(default_factory=list)
    fresh: bool = True  # our id lists in ``ranges`` are new (the peer must answer them)


def _cost(ranges: Sequence[Range]) -> int:
    return sum(_range_cost(r.upper, r.mode, len(r.ids)) for r in ranges)


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
        items: list[_Item] = []
        counts: dict[int, list[int]] = {}
        lo, lower = 0, _BOTTOM
        for r in ranges:
            item = _Item(lo, self._index(r.upper, lo), lower, r.upper)
            if r.mode == Mode.FINGERPRINT:
                same = self._fingerprint(item.lo, item.hi) == r.fingerprint
                counts.setdefault(item.hi - item.lo, [0, 0])[0 if same else 1] += 1
                if not same:
                    self._on_mismatch(item, r.fingerprint)
            elif r.mode == Mode.IDLIST:
                self._on_list(item, r.ids)
            items.append(item)
            lo, lower = item.hi, r.upper
        self._plan([i for i in items if i.kind == _Kind.DETAIL], _estimate_density(counts),
                   sum(_cost(i.ranges) for i in items))
        reply = self._write(items)
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

    def _on_list(self, item: _Item, ids: Sequence[bytes]) -> None:
        """Resolve the peer's complete list for ``item``; prepare our answer if one is due."""
        theirs = self._resolve(item.lo, item.hi, ids)
        if self._is_answer(item.lower, item.upper):
            return  # the answer to our own list: both sides know this range now
        keys = self._keys[item.lo : item.hi]
        common = [i for i, (_, x) in enumerate(keys) if x in theirs]
        if len(common) == len(keys) == len(ids):
            return
        item.kind, item.fresh = _Kind.READY, False
        if not keys:
            item.ranges = [Range(item.upper, Mode.IDLIST)]
            return
        # Their extra ids lie between two common ids (by the order of their list), at a place
        # we cannot see: a piece boundary inside such a gap could put them on the wrong side,
        # so the gap and the common ids at its two ends are listed, never skipped.
        position = {x: i for i, (_, x) in enumerate(keys)}
        dirty = [x not in theirs for _, x in keys]
        gap, last, gaps = 0, -1, set()
        for x in ids:
            i = position.get(x)
            if i is None:
                gaps.add(gap)
            elif i <= last:
                raise RemoteProtocolError("id list out of order")
            else:
                last, gap = i, gap + 1
        for g in gaps:
            start = common[g - 1] if g > 0 else 0
            end = common[g] if g < len(common) else len(keys) - 1
            dirty[start : end + 1] = [True] * (end + 1 - start)
        for i in range(1, len(keys) - 1):  # a lone agreeing id costs more as a skip
            if dirty[i - 1] and dirty[i + 1]:
                dirty[i] = True
        start = 0
        for i in range(1, len(keys) + 1):
            if i < len(keys) and dirty[i] == dirty[start]:
                continue
            upper = _between(keys[i - 1], keys[i]) if i < len(keys) else item.upper
            if not dirty[start]:
                item.ranges.append(Range(upper, Mode.SKIP))
            elif i - start > MAX_IDS_PER_RANGE:
                break
            else:
                ids_here = tuple(self._ids[item.lo + start : item.lo + i])
                item.ranges.append(Range(upper, Mode.IDLIST, ids=ids_here))
            start = i
        if start < len(keys) or _cost(item.ranges) > self._budget // 2:
            item.kind, item.ranges, item.fresh = _Kind.DETAIL, [], True  # too big: cut it up

    def _on_mismatch(self, item: _Item, fingerprint: bytes) -> None:
        """A fingerprint differs. If the peer lacks exactly one of our keys, say which.

        That is the commonest case once ranges are small, and trying every key of the range
        costs one hash each: the peer then learns the id at once instead of after more cuts.
        """
        item.kind = _Kind.DETAIL
        lo, hi = item.lo, item.hi
        if not 0 < hi - lo <= _MAX_SINGLE_TEST:
            return
        total, sums = self._sums[hi] - self._sums[lo], self._sums
        count = (hi - lo - 1).to_bytes(8, "little")
        for j in range(lo, hi):
            rest = (total - sums[j + 1] + sums[j]) & _MASK
            if blake2b(rest.to_bytes(16, "little") + count, digest_size=16).digest() == fingerprint:
                break
        else:
            return
        self.have.add(self._ids[j])
        keys = self._keys
        below = _between(keys[j - 1], keys[j]) if j > lo else None
        above = _between(keys[j], keys[j + 1]) if j + 1 < hi else item.upper
        item.kind = _Kind.READY
        item.ranges = [Range(above, Mode.IDLIST, ids=(self._ids[j],))]
        if below is not None:
            item.ranges.insert(0, Range(below, Mode.SKIP))
        if above != item.upper:
            item.ranges.append(Range(item.upper, Mode.SKIP))

    def _plan(self, items: list[_Item], density: float, fixed: int) -> None:
        """Choose the detail for every mismatched range so that the reply fits the budget.

        Wanted: sub-ranges of about half a difference each (at least ``branching``), and an
        id list for ranges of at most ``idlist_threshold`` keys. Over budget, lists shrink
        and cuts coarsen together until it fits (bytes per difference are then lowest).
        """
        wanted = []
        for item in items:
            count = item.hi - item.lo
            k = self._branching
            if density > 0 and count > 0:
                expected = density * count / -math.expm1(-min(density * count, 700.0))
                k = max(k, math.ceil(2 * expected))
            wanted.append(min(k, count))
        limit, scale = self._list_max, 1.0
        for _ in range(40):
            total = fixed + sum(
                17 * (c + 1) + 4 if c <= limit else 32 * max(2, int(k * scale))
                for c, k in ((i.hi - i.lo, k) for i, k in zip(items, wanted, strict=True))
            )
            if total <= self._budget - 4 * _RESERVE:
                break
            limit, scale = max(2, limit * 3 // 4), scale * 0.75
        for item, k in zip(items, wanted, strict=True):
            item.ranges = self._detail(item, limit, max(2, int(k * scale)))

    def _detail(self, item: _Item, limit: int, parts: int) -> list[Range]:
        """Our ids in ``item`` if at most ``limit``, else ``parts`` equal-count sub-ranges.

        The range that ends at INFINITY is cut finer towards the top (sizes ``limit``,
        ``limit``, ``2*limit``, ... from the newest down), since new keys differ most often.
        """
        lo, hi = item.lo, item.hi
        count = hi - lo
        if count <= limit:
            return [Range(item.upper, Mode.IDLIST, ids=tuple(self._ids[lo:hi]))]
        cuts: list[int] = []
        top = hi
        if item.upper == INFINITY:
            size = limit
            while size <= count // parts // 2:
                top -= size
                cuts.append(top)
                size *= _TAIL_GROWTH if len(cuts) > 1 else 1
        n = max(1, round((top - lo) * parts / count))
        cuts.extend(lo + (top - lo) * j // n for j in range(1, n))
        ranges: list[Range] = []
        start = lo
        for cut in [*sorted(set(cuts)), hi]:
            if not lo < cut <= hi or cut == start:
                continue
            upper = _between(self._keys[cut - 1], self._keys[cut]) if cut < hi else item.upper
            if cut - start <= 1 or (_TAIL_LIST and cut == hi and item.upper == INFINITY and cut - start <= limit):
                ranges.append(Range(upper, Mode.IDLIST, ids=tuple(self._ids[start:cut])))
            else:
                ranges.append(Range(upper, Mode.FINGERPRINT, self._fingerprint(start, cut)))
            start = cut
        return ranges

    def _write(self, items: list[_Item]) -> ReconcileMessage | None:
        """Assemble the reply within budget, merging skips; remember the lists we sent.

        Detail that does not fit degrades to a plain fingerprint of that range (the peer
        then cuts it up itself), and when even that does not fit, one fingerprint covers
        everything from there to INFINITY. Detail always fits when it comes first, so every
        round makes progress.
        """
        out: list[Range] = []
        listed: list[tuple[tuple[int, bytes], tuple[int, bytes]]] = []
        size, asks = 5, False
        position = _BOTTOM

        def add(r: Range, fresh: bool = False) -> None:
            nonlocal size, position
            if r.mode == Mode.SKIP and out and out[-1].mode == Mode.SKIP:
                size -= _range_cost(out.pop().upper, Mode.SKIP)
            elif r.mode == Mode.IDLIST and fresh:
                listed.append(((position.ts, position.id_prefix), (r.upper.ts, r.upper.id_prefix)))
            out.append(r)
            size += _range_cost(r.upper, r.mode, len(r.ids))
            position = r.upper

        for item in items:
            room = self._budget - _RESERVE - size
            if item.kind == _Kind.SKIP:
                add(Range(item.upper, Mode.SKIP))
            elif _cost(item.ranges) <= room and len(out) + len(item.ranges) + 2 <= self._max_ranges:
                fresh = item.fresh
                for r in item.ranges:
                    add(r, fresh)
                asks = asks or fresh
            elif 30 + len(item.upper.id_prefix) <= room and len(out) + 3 <= self._max_ranges:
                add(Range(item.upper, Mode.FINGERPRINT, self._fingerprint(item.lo, item.hi)))
                asks = True
            else:
                add(Range(INFINITY, Mode.FINGERPRINT, self._fingerprint(item.lo, len(self._keys))))
                asks = True
                break
        if not asks and all(r.mode == Mode.SKIP for r in out):
            self._listed = []
            return None
        self._listed = listed
        self._finished = not asks
        return ReconcileMessage(tuple(out))
