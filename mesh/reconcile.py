"""Range-based set reconciliation over ``(ts, id)`` keys (after Meyer's RBSR and Negentropy).

Two peers learn which ids each holds that the other lacks, at a cost that grows with the
difference rather than with the stores. Keys are ``(ts, id)``: ``ts`` a u32 (minutes, at most
``MAX_TS``), ``id`` 16 bytes, ordered by ``ts`` then ``id``. The caller gives them sorted and
unique, and ``ts`` must be a function of ``id`` (both come from the envelope). Ids must be
hashes: the fingerprint is a sum, and sums of structured ids collide.

Protocol. A message is a list of ranges that tiles the whole key space: each range runs from
the previous range's upper bound (or the very bottom) up to its own ``upper`` (exclusive), and
the last ends at ``INFINITY``. A bound ``(ts, id_prefix)`` sorts like a key whose id is the
prefix, so it is usually a few bytes. Every range has a mode:

* ``SKIP``: nothing to say about this range.
* ``FINGERPRINT``: BLAKE2b-128 of (sum of the ids as 128-bit little-endian integers mod 2**128,
  16 bytes LE) || (count, 8 bytes LE) over the sender's keys in the range. The receiver
  answers ``SKIP`` if its own fingerprint is equal; otherwise it sends detail: its ids if they
  are few, else the range cut into sub-ranges of equal count on its side.
* ``IDLIST``: the sender's *complete* ids in the range, in key order. The receiver resolves
  the range (ids it lacks go to ``need``, its own ids missing from the list to ``have``). If
  the range lies inside one the receiver itself listed in its previous message, it is the
  answer to that list: nothing more to say. Otherwise the receiver answers so that the lister
  learns the difference too: ``SKIP`` if equal, else the same range cut into pieces, ``SKIP``
  where both agree and ``IDLIST`` (again its complete ids there) where they do not. Both sides
  thus end with the whole difference, each from its own point of view.

Every message stays within ``max_message_bytes`` (as counted by ``encoded_size``) and
``MAX_RANGES_PER_MESSAGE``: detail that does not fit shrinks, then becomes a plain fingerprint
of the incoming range, and at worst one fingerprint covers everything from there to
``INFINITY``; the next round carries on. ``respond`` returns ``None`` when it has nothing to
say, which ends the exchange.

How much detail to send is policy, not protocol, and aims at few round trips first, then few
bytes. The opening message has eight fingerprints over ranges that halve towards the newest
keys; the share of fingerprints that differ estimates how dense the difference is, which sets
how finely a range is cut (at least ``branching`` pieces); the range that ends at ``INFINITY``
is cut finer towards the top and its newest keys are listed outright, because peers that were
apart differ mostly in what is newest; and a peer that lacks exactly one key of a range is
spotted from the fingerprint alone (one hash per key tried) and told that id at once.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import partial
from hashlib import blake2b
from itertools import accumulate, islice, pairwise

from mesh.errors import LocalProtocolError, RemoteProtocolError

ID_LEN = 16
MAX_TS = 2**32 - 2  # 2**32 - 1 belongs to INFINITY
#: Hard limits shared with the codec: a message never has more ranges, a range never more ids.
MAX_RANGES_PER_MESSAGE = 4096
MAX_IDS_PER_RANGE = 3000
_MASK = (1 << 128) - 1
_OPENING_RANGES = 8  # ~260 bytes: an in-sync check stays one small round trip
#: Every fingerprint differing only bounds the density from below; aim this much higher, as a
#: round trip lost to cutting too coarsely costs more than bytes (which the budget caps).
_ALL_MISMATCHED_BOOST = 8.0
#: "Does the peer lack exactly one of our keys here?" costs a hash per key: tried on ranges of
#: at most this many keys, and on at most ``_SINGLE_TEST_BUDGET`` keys per message.
_MAX_SINGLE_TEST = 4096
_SINGLE_TEST_BUDGET = 65536
#: Kept free while writing: a skip range, then a fingerprint range, both ending at INFINITY.
_RESERVE = (12 + ID_LEN) + (30 + ID_LEN)

_KeyTuple = tuple[int, bytes]


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
    """Keys from the previous range's ``upper`` (or the bottom) up to this ``upper``."""

    upper: Bound
    mode: Mode
    fingerprint: bytes = b""
    ids: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ReconcileMessage:
    """One turn of the conversation; its ranges tile the whole key space in order."""

    ranges: tuple[Range, ...]


def _range_cost(upper: Bound, mode: Mode, n_ids: int = 0) -> int:
    payload = 18 if mode == Mode.FINGERPRINT else 5 + 17 * n_ids if mode == Mode.IDLIST else 0
    return 12 + len(upper.id_prefix) + payload


def _cost(ranges: Sequence[Range]) -> int:
    return sum(_range_cost(r.upper, r.mode, len(r.ids)) for r in ranges)


def encoded_size(message: ReconcileMessage) -> int:
    """A conservative estimate of the msgpack size; budgets are enforced against it."""
    return 5 + _cost(message.ranges)


def _key(bound: Bound) -> _KeyTuple:
    return (bound.ts, bound.id_prefix)


def _between(prev: _KeyTuple, key: _KeyTuple) -> Bound:
    """The shortest bound above ``prev`` and at or below ``key`` (bounds stay small)."""
    if prev[0] != key[0]:
        return Bound(key[0], b"")
    i = next(i for i, (x, y) in enumerate(zip(prev[1], key[1], strict=True)) if x != y)
    return Bound(key[0], key[1][: i + 1])


def _bin(count: int) -> int:
    """``count`` rounded down to 5 significant bits: few distinct values to estimate over."""
    shift = max(0, count.bit_length() - 5)
    return count >> shift << shift


def _estimate_density(counts: dict[int, list[int]]) -> float:
    """Differences per key, from ``count -> [matched, mismatched]`` over fingerprints.

    Models differences as scattered at random (a range of ``c`` keys matches with probability
    ``exp(-density * c)``) and returns the maximum-likelihood density. If no fingerprint
    matched, it takes the density at which that is a coin flip, boosted (see above).
    """
    obs = [(c, m, x) for c, (m, x) in counts.items() if c > 0]
    if not any(x for _, _, x in obs):
        return 0.0
    all_mismatched = not any(m for _, m, _ in obs)

    def excess(lam: float) -> float:  # decreasing in lam, zero at the estimate
        if all_mismatched:
            return -sum(x * math.log1p(-math.exp(-lam * c)) for c, _, x in obs) - math.log(2)
        return sum(x * c / math.expm1(min(lam * c, 700.0)) - m * c for c, m, x in obs)

    lo, hi = -25.0, 3.0  # natural logarithm of the density
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(math.exp(mid)) > 0 else (lo, mid)
    return math.exp(hi) * (_ALL_MISMATCHED_BOOST if all_mismatched else 1.0)


class _Kind(IntEnum):
    SKIP = 0  # nothing to say
    DETAIL = 1  # mismatched: cut it up or list it, once the whole message has been seen
    READY = 2  # what to say is already in ``ranges``


@dataclass(slots=True)
class _Item:
    """What we will say about one incoming range ``[lower, upper)``, our keys ``[lo, hi)``."""

    lo: int
    hi: int
    lower: Bound
    upper: Bound
    kind: _Kind = _Kind.SKIP
    ranges: list[Range] = field(default_factory=list)
    fresh: bool = True  # id lists in ``ranges`` are new: the peer must answer them


class Reconciler:
    """One side of a reconciliation; both sides use the same class.

    The initiator sends ``initiate()``; each side feeds what it receives to ``respond`` and
    sends the result, until a ``respond`` returns ``None``. ``have`` (ours, the peer lacks
    them) and ``need`` (the peer's, we lack them) then hold the whole difference, on both
    sides. Both peers must use the same ``max_message_bytes``; messages with up to twice the
    ids our own budget allows are accepted. After a ``RemoteProtocolError`` the object is spent.
    """

    def __init__(
        self,
        keys: Sequence[tuple[int, bytes]],
        *,
        max_message_bytes: int = 60_000,
        branching: int = 16,
        idlist_threshold: int = 48,
        max_need: int = 1_000_000,
    ) -> None:
        if max_message_bytes < 1024:
            raise LocalProtocolError("max_message_bytes must be at least 1024")
        if not 2 <= branching <= 256:
            raise LocalProtocolError("branching must be between 2 and 256")
        self._keys: list[_KeyTuple] = list(keys)
        try:
            self._ids = [k[1] for k in self._keys]
            stamps = [k[0] for k in self._keys]
        except (TypeError, IndexError, KeyError):
            raise LocalProtocolError("keys must be (ts, id) pairs") from None
        if self._keys and not (
            set(map(type, stamps)) == {int}
            and 0 <= min(stamps) <= max(stamps) <= MAX_TS
            and set(map(type, self._ids)) == {bytes}
            and set(map(len, self._ids)) == {ID_LEN}
        ):
            raise LocalProtocolError("keys must be (ts <= MAX_TS, 16-byte id) pairs")
        if not all(map(operator.lt, self._keys, islice(self._keys, 1, None))):
            raise LocalProtocolError("keys must be sorted and unique")
        self._id_set = set(self._ids)
        if len(self._id_set) != len(self._ids):
            raise LocalProtocolError("an id appears under two timestamps")
        # Prefix sums make any range's fingerprint two lookups and one hash.
        to_int = partial(int.from_bytes, byteorder="little")
        self._sums = [0, *accumulate(map(to_int, self._ids))]
        self._budget = max_message_bytes
        self._branching = branching
        # A list always fits in half a message, leaving room for everything else.
        self._list_max = max(1, min(idlist_threshold, MAX_IDS_PER_RANGE, (max_message_bytes // 2 - 64) // 17))
        self._max_need = max_need
        self._max_ids = min(2 * max_message_bytes // 17 + 16, 8 * MAX_RANGES_PER_MESSAGE)
        self._listed: list[tuple[_KeyTuple, _KeyTuple]] = []  # fresh lists we sent last
        self._tests_left = 0
        self._finished = False
        self.have: set[bytes] = set()
        self.need: set[bytes] = set()

    @property
    def done(self) -> bool:
        """True once this side knows the whole difference and expects no further message."""
        return self._finished

    def initiate(self) -> ReconcileMessage:
        """The opening message: fingerprints over ranges halving towards the newest keys."""
        self._listed, self._finished = [], False
        n = len(self._keys)
        cuts = sorted({n - (n >> j) for j in range(1, _OPENING_RANGES)} - {0, n})
        ranges, start = [], 0
        for cut in [*cuts, n]:
            upper = _between(self._keys[cut - 1], self._keys[cut]) if cut < n else INFINITY
            ranges.append(Range(upper, Mode.FINGERPRINT, self._fingerprint(start, cut)))
            start = cut
        return ReconcileMessage(tuple(ranges))

    def respond(self, message: ReconcileMessage) -> ReconcileMessage | None:
        """Process the peer's message; return our reply, or ``None`` if nothing is left to say.

        Raises ``RemoteProtocolError`` (and nothing else) on a malformed message.
        """
        ranges = self._validate(message)
        items: list[_Item] = []
        counts: dict[int, list[int]] = {}
        self._tests_left = _SINGLE_TEST_BUDGET
        lo, lower = 0, _BOTTOM
        for r in ranges:
            item = _Item(lo, bisect_left(self._keys, _key(r.upper), lo), lower, r.upper)
            if r.mode == Mode.FINGERPRINT:
                same = self._fingerprint(item.lo, item.hi) == r.fingerprint
                counts.setdefault(_bin(item.hi - item.lo), [0, 0])[0 if same else 1] += 1
                if not same:
                    self._on_mismatch(item, r.fingerprint)
            elif r.mode == Mode.IDLIST:
                self._on_list(item, r.ids)
            items.append(item)
            lo, lower = item.hi, r.upper
        skips = 1 + sum(a.kind != b.kind == _Kind.SKIP for a, b in pairwise(items))
        fixed = 14 * skips + sum(_cost(i.ranges) for i in items)
        details = [i for i in items if i.kind == _Kind.DETAIL]
        self._plan(details, _estimate_density(counts), fixed)
        return self._write(items)

    # ---- reading -----------------------------------------------------------------------

    def _fingerprint(self, lo: int, hi: int) -> bytes:
        total = (self._sums[hi] - self._sums[lo]) & _MASK
        data = total.to_bytes(16, "little") + (hi - lo).to_bytes(8, "little")
        return blake2b(data, digest_size=16).digest()

    def _validate(self, message: ReconcileMessage) -> Sequence[Range]:
        """Check all that needs none of our keys, before any state changes."""
        if not isinstance(message, ReconcileMessage):
            raise RemoteProtocolError("not a reconcile message")
        ranges = message.ranges
        if not isinstance(ranges, tuple | list) or not ranges:
            raise RemoteProtocolError("reconcile message without ranges")
        if len(ranges) > MAX_RANGES_PER_MESSAGE:
            raise RemoteProtocolError("too many ranges")
        prev: _KeyTuple | None = None
        total_ids = 0
        for r in ranges:
            if not isinstance(r, Range) or not isinstance(r.upper, Bound):
                raise RemoteProtocolError("malformed range")
            ts, prefix, mode, fingerprint, ids = r.upper.ts, r.upper.id_prefix, r.mode, r.fingerprint, r.ids
            if type(ts) is not int or not 0 <= ts <= INFINITY.ts:
                raise RemoteProtocolError("bound time out of range")
            if type(prefix) is not bytes or len(prefix) > ID_LEN:
                raise RemoteProtocolError("bound id prefix too long")
            if prev is not None and (ts, prefix) <= prev:
                raise RemoteProtocolError("bounds not increasing")
            prev = (ts, prefix)
            if (
                type(mode) not in (Mode, int)
                or type(fingerprint) is not bytes
                or type(ids) not in (tuple, list)
            ):
                raise RemoteProtocolError("malformed range")
            if mode not in (Mode.SKIP, Mode.FINGERPRINT, Mode.IDLIST):
                raise RemoteProtocolError("unknown range mode")
            if (mode == Mode.FINGERPRINT) != bool(fingerprint) or (mode != Mode.IDLIST and ids):
                raise RemoteProtocolError("range payload does not match its mode")
            if fingerprint and len(fingerprint) != 16:
                raise RemoteProtocolError("fingerprint must be 16 bytes")
            total_ids += len(ids)
            if len(ids) > MAX_IDS_PER_RANGE or total_ids > self._max_ids:
                raise RemoteProtocolError("too many ids")
            if not all(type(i) is bytes and len(i) == ID_LEN for i in ids):
                raise RemoteProtocolError("ids must be 16 bytes")
        if prev != _key(INFINITY):
            raise RemoteProtocolError("last range does not end at infinity")
        return ranges

    def _resolve(self, lo: int, hi: int, ids: Sequence[bytes]) -> set[bytes]:
        """Record the difference in a range from the peer's complete list (returned as a set)."""
        theirs = set(ids)
        if len(theirs) != len(ids):
            raise RemoteProtocolError("duplicate id in list")
        self.have.update(i for i in self._ids[lo:hi] if i not in theirs)
        new = [i for i in ids if i not in self._id_set]
        if len(self.need) + len(new) > self._max_need:
            raise RemoteProtocolError("peer offers too many ids")
        self.need.update(new)
        return theirs

    def _on_list(self, item: _Item, ids: Sequence[bytes]) -> None:
        """Resolve the peer's list for ``item``; prepare our answer if one is due."""
        theirs = self._resolve(item.lo, item.hi, ids)
        j = bisect_right(self._listed, (_key(item.lower), (INFINITY.ts + 1, b""))) - 1
        if j >= 0 and _key(item.upper) <= self._listed[j][1]:
            return  # the answer to a list of ours: both sides know this range now
        keys = self._keys[item.lo : item.hi]
        common = [i for i, (_, x) in enumerate(keys) if x in theirs]
        if len(common) == len(keys) == len(ids):
            return
        item.kind, item.fresh = _Kind.READY, False
        if not keys:
            item.ranges = [Range(item.upper, Mode.IDLIST)]
            return
        # Each of their extra ids lies between two common ids (by the order of their list),
        # but we cannot see where: a piece boundary there could put it on the wrong side, so
        # such a gap and the common ids at its ends are listed, never skipped.
        position = {x: i for i, (_, x) in enumerate(keys)}
        dirty = [x not in theirs for _, x in keys]
        gap, last, gaps = 0, -1, set[int]()
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
        for i in range(1, len(keys) - 1):  # one agreeing id costs less listed than skipped
            dirty[i] = dirty[i] or (dirty[i - 1] and dirty[i + 1])
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
                piece = tuple(self._ids[item.lo + start : item.lo + i])
                item.ranges.append(Range(upper, Mode.IDLIST, ids=piece))
            start = i
        if start < len(keys) or _cost(item.ranges) > self._budget // 2:
            item.kind, item.ranges, item.fresh = _Kind.DETAIL, [], True  # too big: cut it up

    def _on_mismatch(self, item: _Item, fingerprint: bytes) -> None:
        """A fingerprint differs; if the peer lacks exactly one of our keys, tell it which.

        Once ranges are small that is the commonest case, and the peer learns the id now
        instead of after more rounds of cutting.
        """
        item.kind = _Kind.DETAIL
        lo, hi = item.lo, item.hi
        if not 0 < hi - lo <= min(_MAX_SINGLE_TEST, self._tests_left):
            return
        self._tests_left -= hi - lo
        sums, total = self._sums, self._sums[hi] - self._sums[lo]
        count = (hi - lo - 1).to_bytes(8, "little")
        for j in range(lo, hi):
            rest = ((total - sums[j + 1] + sums[j]) & _MASK).to_bytes(16, "little")
            if blake2b(rest + count, digest_size=16).digest() == fingerprint:
                break  # a false match would take a 128-bit collision
        else:
            return
        self.have.add(self._ids[j])
        keys = self._keys
        above = _between(keys[j], keys[j + 1]) if j + 1 < hi else item.upper
        item.kind = _Kind.READY
        item.ranges = [Range(above, Mode.IDLIST, ids=(self._ids[j],))]
        if j > lo:
            item.ranges.insert(0, Range(_between(keys[j - 1], keys[j]), Mode.SKIP))
        if j + 1 < hi:
            item.ranges.append(Range(item.upper, Mode.SKIP))

    # ---- writing -----------------------------------------------------------------------

    def _plan(self, items: list[_Item], density: float, fixed: int) -> None:
        """Choose the detail for each mismatched range so that the reply fits the budget.

        Wanted: our ids for a range of at most ``idlist_threshold`` keys, else about two
        pieces per expected difference (at least ``branching``). Over budget, lists and
        pieces shrink together until it fits; bytes per difference are then lowest.
        """
        if not items:
            return
        wanted: list[int] = []
        for item in items:
            count, k = item.hi - item.lo, self._branching
            if density > 0 and count > 0:
                expected = density * count / -math.expm1(-min(density * count, 700.0))
                k = max(k, math.ceil(2 * expected))
            wanted.append(min(k, count))
        limit, scale = self._list_max, 1.0
        for _ in range(40):
            total = fixed + sum(
                self._estimate(i, limit, max(2, int(k * scale))) for i, k in zip(items, wanted, strict=True)
            )
            if total <= self._budget - 4 * _RESERVE or (limit == 2 and max(wanted) * scale < 2):
                break
            limit, scale = max(2, limit * 3 // 4), scale * 0.75
        for item, k in zip(items, wanted, strict=True):
            item.ranges = self._detail(item, limit, max(2, int(k * scale)), tail=True)

    def _estimate(self, item: _Item, limit: int, parts: int) -> int:
        """Roughly what ``_detail`` will cost, without building it."""
        count = item.hi - item.lo
        if count <= limit:
            return 17 * (count + 1) + 4
        if item.upper == INFINITY:
            parts += 1 + (count // parts // limit).bit_length()
        return 32 * parts

    def _detail(self, item: _Item, limit: int, parts: int, *, tail: bool) -> list[Range]:
        """Our ids in ``item`` if at most ``limit``, else ``parts`` equal-count sub-ranges.

        With ``tail``, the range that ends at INFINITY gets its newest ``limit`` keys listed,
        then sub-ranges of ``limit``, ``2*limit``, ``4*limit``... keys below them.
        """
        lo, hi = item.lo, item.hi
        count = hi - lo
        if count <= limit:
            return [Range(item.upper, Mode.IDLIST, ids=tuple(self._ids[lo:hi]))]
        cuts: list[int] = []
        top, size = hi, limit
        while tail and item.upper == INFINITY and size > 0 and (not cuts or size <= count // parts // 2):
            top -= size
            cuts.append(top)
            size *= 2 if len(cuts) > 1 else 1
        n = max(1, round((top - lo) * parts / count))
        cuts.extend(lo + (top - lo) * j // n for j in range(1, n))
        ranges: list[Range] = []
        start = lo
        for cut in [*sorted(set(cuts)), hi]:
            if cut <= start:
                continue
            upper = _between(self._keys[cut - 1], self._keys[cut]) if cut < hi else item.upper
            if cut - start <= 1 or (top < hi and cut == hi and cut - start <= limit):
                ranges.append(Range(upper, Mode.IDLIST, ids=tuple(self._ids[start:cut])))
            else:
                ranges.append(Range(upper, Mode.FINGERPRINT, self._fingerprint(start, cut)))
            start = cut
        return ranges

    def _coarse(self, item: _Item, room: int) -> list[Range]:
        """The least detail that still makes progress: our ids if they fit, else two halves."""
        return self._detail(item, min(self._list_max, max(0, room - 40) // 17), 2, tail=False)

    def _write(self, items: list[_Item]) -> ReconcileMessage | None:
        """Assemble the reply within budget, merging skips; remember the lists we sent.

        Detail that does not fit is cut coarser, else replaced by our fingerprint of that
        range (the peer then cuts it up itself), else by one fingerprint from there to
        INFINITY. The first detail always fits in some form, so every round makes progress.
        """
        out: list[Range] = []
        listed: list[tuple[_KeyTuple, _KeyTuple]] = []
        size, asks, position = 5, False, _BOTTOM

        def add(r: Range, fresh: bool = False) -> None:
            nonlocal size, position
            if r.mode == Mode.SKIP and out and out[-1].mode == Mode.SKIP:
                size -= _range_cost(out.pop().upper, Mode.SKIP)
            elif r.mode == Mode.IDLIST and fresh:
                listed.append((_key(position), _key(r.upper)))
            out.append(r)
            size += _range_cost(r.upper, r.mode, len(r.ids))
            position = r.upper

        for item in items:
            room = self._budget - _RESERVE - size
            slots = MAX_RANGES_PER_MESSAGE - len(out) - 2
            if item.kind == _Kind.SKIP:
                add(Range(item.upper, Mode.SKIP))
            elif _cost(item.ranges) <= room and len(item.ranges) <= slots:
                for r in item.ranges:
                    add(r, item.fresh)
                asks = asks or item.fresh
            elif (
                item.kind == _Kind.DETAIL and slots >= 2 and _cost(coarse := self._coarse(item, room)) <= room
            ):
                for r in coarse:
                    add(r, True)
                asks = True
            elif 30 + len(item.upper.id_prefix) <= room and slots >= 1:
                add(Range(item.upper, Mode.FINGERPRINT, self._fingerprint(item.lo, item.hi)))
                asks = True
            else:
                everything_after = self._fingerprint(item.lo, len(self._keys))
                add(Range(INFINITY, Mode.FINGERPRINT, everything_after))
                asks = True
                break
        self._listed = listed
        self._finished = not asks
        if not asks and all(r.mode == Mode.SKIP for r in out):
            return None
        return ReconcileMessage(tuple(out))
