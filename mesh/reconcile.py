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
  16 bytes LE) || (count, 8 bytes LE) over the sender's keys in the range, and the count
  itself. The receiver answers ``SKIP`` if its own fingerprint is equal. Otherwise, if the
  sender's keys are a subset of its own that it can name from the fingerprint alone (its
  oldest ``count`` keys there, its newest ``count``, or all but one), it answers ``DIFF``;
  else it sends detail: its ids if they are few, its own fingerprint back if the sender has
  exactly one key more (so the sender can run that test), else sub-ranges.
* ``IDLIST``: the sender's *complete* ids in the range, in key order; an answer is due. The
  receiver resolves the range and answers ``SKIP`` if the sets agree, else ``DIFF``.
* ``DIFF``: the whole difference in the range, sent by a side that knows the receiver's keys
  there: ``ids`` the sender holds and the receiver lacks, and ``missing``, the positions (in
  key order, among the receiver's keys in the range) of the receiver's keys the sender
  lacks. No answer is due: after it both sides know the range.

Every message stays within ``max_message_bytes`` of ``encode_message`` output and
``MAX_RANGES_PER_MESSAGE``: detail that does not fit shrinks, a ``DIFF`` is cut into a part
that fits plus a fingerprint of the rest, else a plain fingerprint of the incoming range, and
at worst one fingerprint covers everything from there to ``INFINITY``; the next round carries
on. ``respond`` returns ``None`` when it has nothing to say, which ends the exchange.

How much detail to send is policy, not protocol, and aims at few round trips first, then few
bytes. The opening message has up to six fingerprints over ranges that halve towards the
newest keys, as many as fit a 128-byte padded frame; counts that differ and the share of
fingerprints that differ estimate how dense the difference is, which sets how finely a range
is cut (at least ``branching`` pieces), unless the pieces would hold under two keys on
average, when the whole range is listed instead; the range that ends at ``INFINITY`` is cut
finer towards the top and its newest keys are listed outright, because peers that were apart
differ mostly in what is newest.

The byte layout (``encode_message``) is documented in ``docs/protocol.md`` section 7.
"""

from __future__ import annotations

import math
import operator
import struct
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from hashlib import blake2b
from itertools import accumulate, islice, repeat
from typing import Literal, NamedTuple, NoReturn

from mesh.errors import LocalProtocolError, RemoteProtocolError

ID_LEN = 16
MAX_TS = 2**32 - 2  # 2**32 - 1 belongs to INFINITY
#: Hard limits shared with the codec: a message never has more ranges, a range never more
#: ids (and a DIFF never more positions).
MAX_RANGES_PER_MESSAGE = 4096
MAX_IDS_PER_RANGE = 3000
_MASK = (1 << 128) - 1
_INFINITY_TS = 2**32 - 1
_OPENING_RANGES = 6
#: The opening's encoded size at most: with the frame header (4 bytes) and the length prefix
#: (2) it is at most a 128-byte plaintext, one of the smallest padding classes.
_OPENING_BYTES = 122
#: Every fingerprint differing only bounds the density from below; aim this much higher, as a
#: round trip lost to cutting too coarsely costs more than bytes (which the budget caps).
_ALL_MISMATCHED_BOOST = 8.0
#: The squared count gaps of five ranges fall below a third of their mean one time in ten.
_GAP_BOOST = 3.0
#: "Does the peer lack exactly one of our keys here?" costs a hash per key: tried on ranges of
#: at most this many keys, and on at most ``_SINGLE_TEST_BUDGET`` keys per message.
_MAX_SINGLE_TEST = 4096
_SINGLE_TEST_BUDGET = 65536
#: Kept free while writing: a skip range, then a fingerprint range, both ending at INFINITY.
_RESERVE = 64
_FP_COST = 22  # a typical fingerprint range: bound, mode, 16 bytes, count

_KeyTuple = tuple[int, bytes]


class Mode(IntEnum):
    """What a range carries."""

    SKIP = 0
    FINGERPRINT = 1
    IDLIST = 2
    DIFF = 3


class Bound(NamedTuple):
    """Exclusive upper end of a range; sorts like the key ``(ts, id_prefix)``.

    A tuple, so it compares with keys directly and is cheap to build: a busy node builds
    and parses thousands of bounds per contact.
    """

    ts: int
    id_prefix: bytes


#: The top of the key space; every message's last range ends here.
INFINITY = Bound(2**32 - 1, b"\xff" * ID_LEN)
_BOTTOM = Bound(0, b"")


class Range(NamedTuple):
    """Keys from the previous range's ``upper`` (or the bottom) up to this ``upper``.

    Immutable; a tuple (not a dataclass) because a busy node decodes, plans and writes
    thousands of ranges per contact, and a tuple is built and unpacked in C.
    """

    upper: Bound
    mode: Mode
    #: FINGERPRINT: the sender's fingerprint and key count in the range.
    fingerprint: bytes = b""
    count: int = 0  # type: ignore[assignment]  # shadows ``tuple.count``, which nobody calls
    #: IDLIST: the sender's complete ids; DIFF: the sender's ids the receiver lacks.
    ids: tuple[bytes, ...] = ()
    #: DIFF: positions, in key order among the receiver's keys in the range, that the sender lacks.
    missing: tuple[int, ...] = ()


#: ``_new(Bound, (ts, prefix))`` / ``_new(Range, (upper, mode, fingerprint, count, ids,
#: missing))``: the NamedTuple built without its Python-level ``__new__`` (all fields given).
_new = tuple.__new__


@dataclass(frozen=True)
class ReconcileMessage:
    """One turn of the conversation; its ranges tile the whole key space in order."""

    ranges: tuple[Range, ...]
    #: Set by ``decode_message`` alone (the ranges are then well-typed by construction):
    #: the number of ids and positions they carry if nothing that ``Reconciler._validate``
    #: checks beyond types is wrong either (bounds increase and end at INFINITY, no id twice
    #: in a range), else ``_UNSOUND``. The message is frozen, so the mark stays true.
    _decoded: int = field(default=-1, init=False, compare=False, repr=False)


# ---- byte layout -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_len(value: int) -> int:
    return 1 if value < 0x80 else (value.bit_length() + 6) // 7


def _gaps(positions: Sequence[int]) -> list[int]:
    return [p - q - 1 for p, q in zip(positions, [-1, *positions], strict=False)]


def _ranges_size(prev_ts: int, ranges: Sequence[Range]) -> int:
    """Exact encoded size of ``ranges`` written after a bound with time ``prev_ts``."""
    size = 0
    for upper, mode, _, count, ids, missing in ranges:
        ts = upper[0]
        if ts == _INFINITY_TS:
            size += 2
        else:
            delta = ts - prev_ts + 1
            size += (2 if delta < 0x80 else 1 + (delta.bit_length() + 6) // 7) + len(upper[1])
            prev_ts = ts
        if mode == Mode.FINGERPRINT:
            size += ID_LEN + (1 if count < 0x80 else _varint_len(count))
        elif mode != Mode.SKIP:
            n = len(ids)
            size += (1 if n < 0x80 else _varint_len(n)) + ID_LEN * n
            if mode == Mode.DIFF:
                size += _varint_len(len(missing)) + sum(map(_varint_len, _gaps(missing))) if missing else 1
    return size


def encode_message(message: ReconcileMessage) -> bytes:
    """The bytes of a reconcile message (the payload of a Reconcile frame).

    Per range: ``varint(t)`` where ``t`` = 0 for INFINITY, else 1 + the bound's time minus
    the previous bound's (0 before the first); one byte ``mode << 5 | len(prefix)``; the
    prefix; then FINGERPRINT: 16 bytes and ``varint(count)``; IDLIST: ``varint(n)`` and ``n``
    ids of 16 bytes; DIFF: the same, then ``varint(m)`` and ``m`` varints, each position minus
    the previous one minus 1. Varints are unsigned LEB128, at most 5 bytes, shortest form.
    """
    out = bytearray()
    append = out.append
    prev_ts = 0
    fingerprint_mode, idlist, diff = Mode.FINGERPRINT, Mode.IDLIST, Mode.DIFF
    for upper, mode, fingerprint, count, ids, missing in message.ranges:
        ts, prefix = upper
        if ts == _INFINITY_TS:
            append(0)
            prefix = b""
        else:
            delta = ts - prev_ts + 1
            if 0 <= delta < 0x80:
                append(delta)
            else:
                out += _varint(delta)
            prev_ts = ts
        append(int(mode) << 5 | len(prefix))
        out += prefix
        if mode == fingerprint_mode:
            out += fingerprint
            if 0 <= count < 0x80:
                append(count)
            else:
                out += _varint(count)
        elif mode in (idlist, diff):
            n = len(ids)
            if n < 0x80:
                append(n)
            else:
                out += _varint(n)
            out += ids[0] if n == 1 else b"".join(ids)
            if mode == diff:
                out += _varint(len(missing))
                out += b"".join(map(_varint, _gaps(missing)))
    return bytes(out)


def encoded_size(message: ReconcileMessage) -> int:
    """The exact length of ``encode_message(message)``; budgets are enforced against it."""
    return _ranges_size(0, message.ranges)


_TRUNCATED = "reconcile message truncated"
_NOT_DECODED, _UNSOUND = -1, -2  # ``ReconcileMessage._decoded`` when it is not a count
_ID_FORMAT = f"{ID_LEN}s"


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A varint at ``pos``: (value, position after it). Unsigned LEB128, at most 5 bytes,
    shortest form; every failure is a ``RemoteProtocolError``."""
    value = shift = 0
    end = len(data)
    for i in range(5):
        if pos >= end:
            raise RemoteProtocolError(_TRUNCATED)
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if b == 0 and i > 0:
                raise RemoteProtocolError("varint not in shortest form")
            return value, pos
        shift += 7
    raise RemoteProtocolError("varint too long")


def decode_message(data: bytes) -> ReconcileMessage:
    """Parse ``encode_message`` output from a peer; checks structure and hard limits only.

    ``Reconciler.respond`` checks the rest (bounds increasing, ending at INFINITY, id budget);
    what it would find is noted on the way (``ReconcileMessage._decoded``), so that it does
    not walk the ranges again for a sound message. Work and memory are linear in
    ``len(data)``. Written flat (one-byte varints inline, no reader object, tuples built
    directly) because a busy node decodes thousands of ranges per contact.
    """
    ranges: list[Range] = []
    append = ranges.append
    new = _new
    end = len(data)
    pos = prev_ts = total = 0
    skip, fingerprint_mode, idlist, diff = Mode.SKIP, Mode.FINGERPRINT, Mode.IDLIST, Mode.DIFF
    # Soundness: bounds increase (times cannot fall, so only a repeated time, or anything
    # after INFINITY, needs a look), the last is INFINITY, no range lists an id twice.
    sound, finite, at_infinity, last_prefix = True, False, False, b""
    while pos < end:
        if len(ranges) >= MAX_RANGES_PER_MESSAGE:
            raise RemoteProtocolError("too many ranges")
        t = data[pos]
        if t < 0x80:
            pos += 1
        else:
            t, pos = _read_varint(data, pos)
        if pos >= end:
            raise RemoteProtocolError(_TRUNCATED)
        head = data[pos]
        pos += 1
        mode_value, prefix_len = head >> 5, head & 0x1F
        if mode_value > 3:
            raise RemoteProtocolError("unknown range mode")
        if prefix_len > ID_LEN:
            raise RemoteProtocolError("bound id prefix too long")
        if t == 0:
            if prefix_len:
                raise RemoteProtocolError("INFINITY carries a prefix")
            upper = INFINITY
            sound = sound and not at_infinity
            at_infinity = True
        else:
            prev_ts += t - 1
            if prev_ts > MAX_TS:
                raise RemoteProtocolError("bound time out of range")
            if prefix_len > end - pos:
                raise RemoteProtocolError(_TRUNCATED)
            prefix = data[pos : pos + prefix_len]
            upper = new(Bound, (prev_ts, prefix))
            pos += prefix_len
            if at_infinity or (t == 1 and finite and prefix <= last_prefix):
                sound = False
            finite, last_prefix = True, prefix
        if mode_value == 0:
            append(new(Range, (upper, skip, b"", 0, (), ())))
            continue
        if mode_value == 1:
            if end - pos < ID_LEN:
                raise RemoteProtocolError(_TRUNCATED)
            fingerprint = data[pos : pos + ID_LEN]
            pos += ID_LEN
            if pos < end and (count := data[pos]) < 0x80:
                pos += 1
            else:
                count, pos = _read_varint(data, pos)
            append(new(Range, (upper, fingerprint_mode, fingerprint, count, (), ())))
            continue
        if pos < end and (n := data[pos]) < 0x80:
            pos += 1
        else:
            n, pos = _read_varint(data, pos)
        if n > MAX_IDS_PER_RANGE:
            raise RemoteProtocolError("too many ids")
        if ID_LEN * n > end - pos:
            raise RemoteProtocolError(_TRUNCATED)
        if n == 1:
            ids: tuple[bytes, ...] = (data[pos : pos + ID_LEN],)
        else:  # split in C: a whole-range list can hold thousands of ids
            ids = struct.unpack_from(_ID_FORMAT * n, data, pos)
            if n > 1 and len(set(ids)) != n:
                sound = False
        pos += ID_LEN * n
        total += n
        if mode_value == 2:
            append(new(Range, (upper, idlist, b"", 0, ids, ())))
            continue
        m, pos = _read_varint(data, pos)
        if m > MAX_IDS_PER_RANGE:
            raise RemoteProtocolError("too many positions")
        missing: list[int] = []
        position = -1
        for _ in range(m):
            if pos < end and (gap := data[pos]) < 0x80:
                pos += 1
            else:
                gap, pos = _read_varint(data, pos)
            position += 1 + gap
            missing.append(position)
        total += m
        append(new(Range, (upper, diff, b"", 0, ids, tuple(missing))))
    message = ReconcileMessage(tuple(ranges))
    _mark_decoded(message, total if sound and at_infinity else _UNSOUND)
    return message


def _mark_decoded(message: ReconcileMessage, mark: int) -> None:
    object.__setattr__(message, "_decoded", mark)  # frozen: only here, once, at birth


# ---- reconciliation ----------------------------------------------------------------------


def _between(prev: _KeyTuple, key: _KeyTuple) -> Bound:
    """The shortest bound above ``prev`` and at or below ``key`` (bounds stay small)."""
    ts = key[0]
    if prev[0] != ts:
        return _new(Bound, (ts, b""))
    a, b = prev[1], key[1]
    if len(a) != len(b) or a == b:
        raise ValueError("keys must differ and have ids of one length")
    if a[0] != b[0]:  # ids are hashes: almost always
        return _new(Bound, (ts, b[:1]))
    # The first differing byte, from the highest set bit of the XOR (ids are big-endian here).
    i = len(a) - 1 - ((int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_length() - 1) // 8
    return _new(Bound, (ts, b[: i + 1]))


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


def _gap_density(gaps: Sequence[tuple[int, int]]) -> float:
    """Differences per key from the count gaps of mismatched ranges, if they are two-sided.

    If every gap points the same way the difference is one-sided and each gap is the number
    of differences in its range (``_plan`` uses it directly): returns 0. Otherwise differences
    are taken as split between the sides at random, so a range with ``d`` of them has a gap
    whose square is ``d`` on average, while the gap itself is mostly near 0. From a handful of
    ranges (the opening) that sum is noisy, hence the boost.
    """
    if len({g > 0 for g, _ in gaps if g}) < 2 and all(g for g, _ in gaps):
        return 0.0
    keys = sum(m for _, m in gaps)
    return _GAP_BOOST * sum(g * g for g, _ in gaps) / keys if keys else 0.0


class _Kind(IntEnum):
    SKIP = 0  # nothing to say
    DETAIL = 1  # mismatched: cut it up or list it, once the whole message has been seen
    READY = 2  # what to say is already in ``ranges``


class _Item:
    """What we will say about one incoming range ``[lower, upper)``, our keys ``[lo, hi)``.

    Only a range we have something to say about gets one; a range we skip is kept as its
    bare upper bound (most ranges, so ``respond`` builds as little as it can per range).
    """

    __slots__ = ("cost", "extras", "hi", "kind", "lo", "lower", "peer_count", "ranges", "upper")

    def __init__(self, lo: int, hi: int, lower: Bound, upper: Bound) -> None:
        self.lo = lo
        self.hi = hi
        self.lower = lower
        self.upper = upper
        self.peer_count = 0
        self.kind = _Kind.SKIP
        self.ranges: list[Range] = []
        #: The encoded size of ``ranges`` written after ``lower``.
        self.cost = 0
        #: When the peer's keys here are ours except these (indices into our keys), a DIFF
        #: that does not fit can be cut at any of our keys.
        self.extras: list[int] | None = None

    def say(self, kind: _Kind, ranges: list[Range]) -> None:
        self.kind, self.ranges, self.cost = kind, ranges, _ranges_size(self.lower[0], ranges)


def _over_cap(ranges: Sequence[Range]) -> bool:
    """Would the peer refuse this detail? (Ids or positions beyond ``MAX_IDS_PER_RANGE``
    in one range: a DIFF can name more of our keys than that even when the bytes fit.)"""
    return any(len(r.ids) > MAX_IDS_PER_RANGE or len(r.missing) > MAX_IDS_PER_RANGE
               for r in ranges)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


class SortedKeys(list[tuple[int, bytes]]):
    """Keys as ``Reconciler`` needs them, kept by a store that hands them out often.

    A list (what ``SyncSource.sync_keys`` returns) that changes only through ``add`` and
    ``discard``: each key is checked once, when it arrives, and its id's value as an integer
    is kept beside it. A ``Reconciler`` built from it copies these instead of checking and
    converting every key again for every session (a simulated store holds thousands of keys
    and reconciles twice per contact). The other list methods that change it raise
    ``TypeError``, so nothing can put it out of order behind its back.
    """

    __slots__ = ("_id_set", "_ids", "_values")

    def __init__(self) -> None:
        super().__init__()
        self._ids: list[bytes] = []
        self._id_set: set[bytes] = set()
        self._values: list[int] = []

    def add(self, key: tuple[int, bytes]) -> None:
        """Insert ``key`` in order; ``LocalProtocolError`` if it is malformed or its id is held."""
        ts, item_id = key
        if type(ts) is not int or not 0 <= ts <= MAX_TS or type(item_id) is not bytes \
                or len(item_id) != ID_LEN:
            raise LocalProtocolError("keys must be (ts <= MAX_TS, 16-byte id) pairs")
        if item_id in self._id_set:
            raise LocalProtocolError("an id appears under two timestamps")
        i = bisect_left(self, key)
        list.insert(self, i, (ts, item_id))
        self._ids.insert(i, item_id)
        self._values.insert(i, int.from_bytes(item_id, "little"))
        self._id_set.add(item_id)

    def discard(self, key: tuple[int, bytes]) -> None:
        """Remove ``key`` if present."""
        i = bisect_left(self, key)
        if i < len(self) and self[i] == key:
            list.__delitem__(self, i)
            del self._ids[i]
            del self._values[i]
            self._id_set.discard(key[1])

    def _sealed(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("SortedKeys changes only through add() and discard()")

    append = extend = insert = pop = remove = clear = sort = reverse = _sealed
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _sealed


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
        self._keys: list[_KeyTuple] = list(keys)  # our own copy: the store changes meanwhile
        #: A tuple, so a slice compares with a peer's id list in one step.
        self._ids: tuple[bytes, ...]
        if type(keys) is SortedKeys:  # checked and converted as they arrived
            self._ids, self._id_set = tuple(keys._ids), set(keys._id_set)
            values: Iterable[int] = keys._values
        else:
            self._ids, self._id_set = self._check(self._keys)
            little: Literal["little"] = "little"
            values = map(int.from_bytes, self._ids, repeat(little))
        # Prefix sums make any range's fingerprint two lookups and one hash.
        self._sums = [0, *accumulate(values)]
        self._budget = max_message_bytes
        self._branching = branching
        # A list always fits in half a message, leaving room for everything else.
        self._whole_max = max(1, min(MAX_IDS_PER_RANGE, (max_message_bytes // 2 - 64) // 16))
        self._list_max = min(idlist_threshold, self._whole_max)
        self._max_need = max_need
        self._max_ids = 2 * max_message_bytes // ID_LEN + 16
        self._tests_left = 0
        self._density = 0.0  # differences per key, as estimated from the last message
        self._finished = False
        self.have: set[bytes] = set()
        self.need: set[bytes] = set()

    @staticmethod
    def _check(keys: list[_KeyTuple]) -> tuple[tuple[bytes, ...], set[bytes]]:
        """The ids of ``keys`` and their set, once ``keys`` are found to be as promised."""
        try:
            ids = tuple(map(_second, keys))
            stamps = list(map(_first, keys))
        except (TypeError, IndexError, KeyError):
            raise LocalProtocolError("keys must be (ts, id) pairs") from None
        if keys:
            well_typed = (set(map(type, stamps)) == {int} and set(map(type, ids)) == {bytes}
                          and set(map(len, ids)) == {ID_LEN})
            ordered = well_typed and all(map(operator.lt, keys, islice(keys, 1, None)))
            if not well_typed:
                low = high = -1
            elif ordered:  # the extreme times are at the ends
                low, high = stamps[0], stamps[-1]
            else:
                low, high = min(stamps), max(stamps)
            if not (well_typed and 0 <= low <= high <= MAX_TS):
                raise LocalProtocolError("keys must be (ts <= MAX_TS, 16-byte id) pairs")
            if not ordered:
                raise LocalProtocolError("keys must be sorted and unique")
        id_set = set(ids)
        if len(id_set) != len(ids):
            raise LocalProtocolError("an id appears under two timestamps")
        return ids, id_set

    @property
    def done(self) -> bool:
        """True once this side knows the whole difference and expects no further message."""
        return self._finished

    def initiate(self) -> ReconcileMessage:
        """The opening: fingerprints over ranges halving towards the newest keys.

        As many as fit ``_OPENING_BYTES`` (dropping the oldest cuts first), so that an
        in-sync check is one small frame each way.
        """
        self._finished = False
        n = len(self._keys)
        cuts = sorted({n - (n >> j) for j in range(1, _OPENING_RANGES)} - {0, n})
        while True:
            ranges, start = [], 0
            for cut in [*cuts, n]:
                upper = _between(self._keys[cut - 1], self._keys[cut]) if cut < n else INFINITY
                ranges.append(self._fingerprint_range(upper, start, cut))
                start = cut
            message = ReconcileMessage(tuple(ranges))
            if not cuts or encoded_size(message) <= _OPENING_BYTES:
                return message
            cuts.pop(0)

    def respond(self, message: ReconcileMessage) -> ReconcileMessage | None:
        """Process the peer's message; return our reply, or ``None`` if nothing is left to say.

        Raises ``RemoteProtocolError`` (and nothing else) on a malformed message.
        """
        ranges = self._validate(message)
        items: list[_Item | Bound] = []  # a bare bound: a range we skip
        add = items.append
        ready: list[_Item] = []
        details: list[_Item] = []
        counts: dict[int, list[int]] = {}
        gaps: list[tuple[int, int]] = []  # (their count - ours, ours) where fingerprints differ
        self._tests_left = _SINGLE_TEST_BUDGET
        lo, lower = 0, _BOTTOM
        keys, ours, n_keys = self._keys, self._ids, len(self._keys)
        fingerprint_mode, idlist, diff = Mode.FINGERPRINT, Mode.IDLIST, Mode.DIFF
        for r in ranges:
            upper, mode, fingerprint, count, ids, missing = r
            # Our keys below ``upper`` (a bound is a tuple: it compares with keys). Ranges
            # hold few of our keys as a rule, so look at the next two before bisecting.
            if lo == n_keys or not keys[lo] < upper:
                hi = lo
            elif lo + 1 == n_keys or not keys[lo + 1] < upper:
                hi = lo + 1
            else:
                hi = bisect_left(keys, upper, lo + 2)
            if mode == idlist:
                if len(ids) == hi - lo and ids == ours[lo:hi]:
                    add(upper)  # the common case: the same list, nothing to say
                    lo, lower = hi, upper
                    continue
                item = _Item(lo, hi, lower, upper)
                self._on_list(item, ids)
            elif mode == fingerprint_mode:
                m = hi - lo
                same = count == m and self._fingerprint(lo, hi) == fingerprint
                counts.setdefault(_bin(m), [0, 0])[0 if same else 1] += 1
                if same:
                    add(upper)
                    lo, lower = hi, upper
                    continue
                gaps.append((count - m, m))
                item = _Item(lo, hi, lower, upper)
                self._on_mismatch(item, r)
            else:
                if mode == diff:  # the peer knows the difference here: record it, say nothing
                    if missing and missing[-1] >= hi - lo:
                        raise RemoteProtocolError("position beyond our keys in the range")
                    self._learn(ids)
                    self.have.update(ours[lo + p] for p in missing)
                add(upper)
                lo, lower = hi, upper
                continue
            if item.kind == _Kind.READY:
                ready.append(item)
                add(item)
            elif item.kind == _Kind.DETAIL:
                details.append(item)
                add(item)
            else:
                add(upper)
            lo, lower = hi, upper
        fixed = 8 * len(items) + sum(i.cost for i in ready)
        self._plan(details, max(_estimate_density(counts), _gap_density(gaps)), fixed)
        return self._write(items)

    # ---- reading -----------------------------------------------------------------------

    def _fingerprint(self, lo: int, hi: int) -> bytes:
        # (sum mod 2**128, 16 bytes LE) || (count, 8 bytes LE), as one 24-byte integer.
        total = (self._sums[hi] - self._sums[lo]) & _MASK
        return blake2b((total | (hi - lo) << 128).to_bytes(24, "little"), digest_size=16).digest()

    def _fingerprint_range(self, upper: Bound, lo: int, hi: int) -> Range:
        return _new(Range, (upper, Mode.FINGERPRINT, self._fingerprint(lo, hi), hi - lo, (), ()))

    def _validate(self, message: ReconcileMessage) -> Sequence[Range]:
        """Check all that needs none of our keys, before any state changes."""
        if not isinstance(message, ReconcileMessage):
            raise RemoteProtocolError("not a reconcile message")
        ranges = message.ranges
        if not isinstance(ranges, tuple | list) or not ranges:
            raise RemoteProtocolError("reconcile message without ranges")
        if len(ranges) > MAX_RANGES_PER_MESSAGE:
            raise RemoteProtocolError("too many ranges")
        if message._decoded != _NOT_DECODED:
            return self._validate_decoded(ranges, message._decoded)
        return self._check_ranges(ranges)

    def _check_ranges(self, ranges: Sequence[Range]) -> Sequence[Range]:
        """Every range check, in order: the first problem found is the error raised."""
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
                or type(r.count) is not int
                or type(r.missing) not in (tuple, list)
            ):
                raise RemoteProtocolError("malformed range")
            if mode not in (Mode.SKIP, Mode.FINGERPRINT, Mode.IDLIST, Mode.DIFF):
                raise RemoteProtocolError("unknown range mode")
            if (
                (mode == Mode.FINGERPRINT) != bool(fingerprint)
                or (mode not in (Mode.IDLIST, Mode.DIFF) and ids)
                or (mode != Mode.DIFF and r.missing)
                or (mode != Mode.FINGERPRINT and r.count)
            ):
                raise RemoteProtocolError("range payload does not match its mode")
            if fingerprint and len(fingerprint) != 16:
                raise RemoteProtocolError("fingerprint must be 16 bytes")
            if not 0 <= r.count < 2**35:
                raise RemoteProtocolError("count out of range")
            missing = r.missing
            if not ids and not missing:
                continue  # most ranges: nothing below applies (checked fast, same outcome)
            total_ids += len(ids) + len(missing)
            if max(len(ids), len(missing)) > MAX_IDS_PER_RANGE or total_ids > self._max_ids:
                raise RemoteProtocolError("too many ids")
            if not all(type(i) is bytes and len(i) == ID_LEN for i in ids):
                raise RemoteProtocolError("ids must be 16 bytes")
            if len(ids) > 1 and len(set(ids)) != len(ids):
                raise RemoteProtocolError("duplicate id in range")
            if missing and (not all(type(p) is int for p in missing) or not all(
                p < q for p, q in zip([-1, *missing], missing, strict=False)
            )):
                raise RemoteProtocolError("positions must increase")
        if prev != INFINITY:
            raise RemoteProtocolError("last range does not end at infinity")
        return ranges

    def _validate_decoded(self, ranges: Sequence[Range], mark: int) -> Sequence[Range]:
        """``_validate`` for a message from ``decode_message``: nothing more to check when
        its ``mark`` says it is sound and within our id budget; otherwise the full checks
        (decoding already made the rest pass) say which error it is."""
        if 0 <= mark <= self._max_ids:
            return ranges
        return self._check_ranges(ranges)

    def _learn(self, ids: Sequence[bytes]) -> None:
        """Add the peer's ids we lack to ``need``, within ``max_need``."""
        new = [i for i in ids if i not in self._id_set]
        if len(self.need) + len(new) > self._max_need:
            raise RemoteProtocolError("peer offers too many ids")
        self.need.update(new)

    def _on_list(self, item: _Item, ids: Sequence[bytes]) -> None:
        """Resolve the peer's complete list for ``item`` and answer with the difference."""
        lo, hi = item.lo, item.hi
        ours = self._ids
        mine = ours[lo:hi]
        if len(ids) == hi - lo and all(map(operator.eq, ids, mine)):
            item.peer_count = len(ids)  # the same list, nothing to say
            return
        # Where each listed id is among our keys, in C (a whole-range list can be long).
        position = dict(zip(mine, range(lo, hi), strict=True))
        found = list(map(position.get, ids))
        missing = [p for p, j in enumerate(found) if j is None]
        held = [j for j in found if j is not None]
        if any(ids[p] in self._id_set for p in missing) or not all(
                map(operator.lt, held, islice(held, 1, None))):
            self._reject_list(ids, position)
        self._learn([ids[p] for p in missing])
        theirs = set(ids)
        extras = [j for j, x in zip(range(lo, hi), mine, strict=True) if x not in theirs]
        self.have.update(map(ours.__getitem__, extras))
        item.peer_count = len(ids)
        if extras or missing:
            item.say(_Kind.READY, [self._diff(item.upper, extras, missing)])
            item.extras = None if missing else extras

    def _reject_list(self, ids: Sequence[bytes], position: dict[bytes, int]) -> None:
        """Raise what is first wrong with a list that names an id we hold outside the range,
        or our ids out of order (walked in list order, so the reason is the first fault)."""
        last = -1
        for x in ids:
            j = position.get(x)
            if j is None:
                if x in self._id_set:
                    raise RemoteProtocolError("listed id outside its range")
            elif j <= last:
                raise RemoteProtocolError("id list out of order")
            else:
                last = j
        raise AssertionError("a list found faulty has no fault")

    def _on_mismatch(self, item: _Item, r: Range) -> None:
        """A fingerprint differs; if the peer's keys are a subset of ours we can name, say which
        of ours it lacks (a DIFF), else leave the range for ``_plan``.

        Tried: the peer holds our oldest ``count`` keys here (it lacks the newest: a phone that
        was away), our newest ``count``, or all of ours but one (one hash per key tried). A
        false match would take a 128-bit collision.
        """
        item.kind, item.peer_count = _Kind.DETAIL, r.count
        lo, hi, c = item.lo, item.hi, r.count
        m = hi - lo
        if c >= m:
            return
        extras: list[int] | None = None
        if self._fingerprint(lo, lo + c) == r.fingerprint:
            extras = list(range(lo + c, hi))
        elif self._fingerprint(hi - c, hi) == r.fingerprint:
            extras = list(range(lo, hi - c))
        elif c == m - 1 and m <= min(_MAX_SINGLE_TEST, self._tests_left):
            self._tests_left -= m
            sums, total = self._sums, self._sums[hi] - self._sums[lo]
            count = c.to_bytes(8, "little")
            for j in range(lo, hi):
                rest = ((total - sums[j + 1] + sums[j]) & _MASK).to_bytes(16, "little")
                if blake2b(rest + count, digest_size=16).digest() == r.fingerprint:
                    extras = [j]
                    break
        if extras is None:
            return
        self.have.update(self._ids[j] for j in extras)
        item.say(_Kind.READY, [self._diff(item.upper, extras, [])])
        item.extras = extras

    def _diff(self, upper: Bound, extras: Sequence[int], missing: Sequence[int]) -> Range:
        # May exceed MAX_IDS_PER_RANGE (our side of a range can hold any number of keys);
        # ``_write`` cuts such a DIFF down before it goes out (``_over_cap``).
        ids = tuple(map(self._ids.__getitem__, extras))
        return _new(Range, (upper, Mode.DIFF, b"", 0, ids, tuple(missing)))

    # ---- writing -----------------------------------------------------------------------

    def _plan(self, items: list[_Item], density: float, fixed: int) -> None:
        """Choose the detail for each mismatched range so that the reply fits the budget.

        Per range, with ``m`` our keys and ``c`` the peer's: if the peer has exactly one key
        more, our fingerprint back (the peer names the key, ``_on_mismatch``); our ids if
        at most ``limit``; else about two pieces per expected difference (the count gap or
        the density estimate, at least ``branching``). Over budget, lists and pieces shrink
        together until it fits; bytes per difference are then lowest.
        """
        self._density = density
        if not items:
            return
        wanted: list[int] = []
        for item in items:
            m = item.hi - item.lo
            expected = max(abs(item.peer_count - m), 1.0)
            if density > 0 and m > 0:
                expected = max(expected, density * m / -math.expm1(-min(density * m, 700.0)))
            wanted.append(min(max(self._branching, math.ceil(2 * expected)), m))
        limit, scale = self._list_max, 1.0
        for _ in range(40):
            total = fixed + sum(
                self._estimate(i, limit, max(2, int(k * scale))) for i, k in zip(items, wanted, strict=True)
            )
            if total <= self._budget - 4 * _RESERVE or (limit == 2 and max(wanted) * scale < 2):
                break
            limit, scale = max(2, limit * 3 // 4), scale * 0.75
        for item, k in zip(items, wanted, strict=True):
            parts = max(2, int(k * scale))
            item_limit = self._list_limit(item, limit, parts)
            item.ranges, item.cost = self._detail(item, item_limit, parts, tail=True)

    def _list_limit(self, item: _Item, limit: int, parts: int) -> int:
        """``limit``, or all our keys in the range if cutting it into ``parts`` would leave
        pieces of under two keys on average.

        Such pieces are mostly one-key lists, each a bound, a mode and a count on top of its
        id, and the two-key fingerprints among them would mostly differ and need another
        round: listing the range outright costs about as many bytes per key and settles it
        in this round. (Also far fewer ranges to build and parse on a dense difference.)
        """
        m = item.hi - item.lo
        return m if 2 * parts > m and m <= self._whole_max else limit

    def _echoes(self, item: _Item) -> bool:
        """Send our fingerprint back: the peer has one key more, which it can then name, or
        (in the range up to INFINITY) more keys, likely its newest, which its prefix test finds.
        """
        m = item.hi - item.lo
        gap = item.peer_count - m
        if m == 0 or gap < 1:
            return False
        return (gap == 1 and m < _MAX_SINGLE_TEST) or (item.upper == INFINITY and self._density * m < gap)

    def _estimate(self, item: _Item, limit: int, parts: int) -> int:
        """Roughly what ``_detail`` will cost, without building it."""
        count = item.hi - item.lo
        if self._echoes(item):
            return _FP_COST
        limit = self._list_limit(item, limit, parts)
        if count <= limit:
            return 16 * count + 8
        if item.upper == INFINITY:
            parts += 1 + (count // parts // limit).bit_length()
            return _FP_COST * parts + 16 * limit
        return _FP_COST * parts

    def _detail(self, item: _Item, limit: int, parts: int, *, tail: bool) -> tuple[list[Range], int]:
        """Our fingerprint back (``_echoes``), our ids if at most ``limit``, else ``parts``
        equal-count sub-ranges; with their encoded size after ``item.lower``.

        With ``tail``, the range that ends at INFINITY gets its newest ``limit`` keys listed,
        then sub-ranges of ``limit``, ``2*limit``, ``4*limit``... keys below them.
        """
        lo, hi = item.lo, item.hi
        count = hi - lo
        whole: Range | None = None
        if self._echoes(item):
            whole = self._fingerprint_range(item.upper, lo, hi)
        elif count <= limit:
            whole = _new(Range, (item.upper, Mode.IDLIST, b"", 0, self._ids[lo:hi], ()))
        if whole is not None:
            return [whole], _ranges_size(item.lower[0], (whole,))
        cuts: list[int] = []
        top, size = hi, limit
        while tail and item.upper == INFINITY and size > 0 and (not cuts or size <= count // parts // 2):
            top -= size
            cuts.append(top)
            size *= 2 if len(cuts) > 1 else 1
        n = max(1, round((top - lo) * parts / count))
        cuts.extend(lo + (top - lo) * j // n for j in range(1, n))
        # Written flat (``_between``, ``_fingerprint`` and ``_ranges_size`` inline): on a
        # dense difference this cuts a range into one piece per key.
        keys, ids, sums = self._keys, self._ids, self._sums
        idlist, fingerprint_mode = Mode.IDLIST, Mode.FINGERPRINT
        ranges: list[Range] = []
        add = ranges.append
        start, prev_ts, cost = lo, item.lower[0], 0
        for cut in [*sorted(set(cuts)), hi]:
            if cut <= start:
                continue
            if cut < hi:
                (below_ts, below), (ts, key_id) = keys[cut - 1], keys[cut]
                if below_ts != ts:
                    upper = _new(Bound, (ts, b""))
                elif below[0] != key_id[0]:
                    upper = _new(Bound, (ts, key_id[:1]))
                else:
                    upper = _between(keys[cut - 1], keys[cut])
            else:
                upper = item.upper
                ts = upper[0]
            if ts == _INFINITY_TS:
                cost += 2
            else:
                delta = ts - prev_ts + 1
                cost += (2 if delta < 0x80 else 1 + (delta.bit_length() + 6) // 7) + len(upper[1])
                prev_ts = ts
            k = cut - start
            if k <= 1 or (top < hi and cut == hi and k <= limit):
                add(_new(Range, (upper, idlist, b"", 0, ids[start:cut], ())))
                cost += (1 if k < 0x80 else _varint_len(k)) + ID_LEN * k
            else:
                total = (sums[cut] - sums[start]) & _MASK
                fingerprint = blake2b((total | k << 128).to_bytes(24, "little"), digest_size=16).digest()
                add(_new(Range, (upper, fingerprint_mode, fingerprint, k, (), ())))
                cost += ID_LEN + (1 if k < 0x80 else _varint_len(k))
            start = cut
        return ranges, cost

    def _coarse(self, item: _Item, room: int) -> tuple[list[Range], int]:
        """The least detail that still makes progress: our ids if they fit, else two halves."""
        return self._detail(item, min(self._list_max, max(0, room - 40) // 16), 2, tail=False)

    def _partial_diff(self, item: _Item, room: int) -> list[Range]:
        """A DIFF too big for ``room``: the part up to one of our keys that fits, then our
        fingerprint of the rest (the peer holds a subset of ours there, so it sends detail)."""
        assert item.extras is not None
        fit = min(len(item.extras), MAX_IDS_PER_RANGE, max(0, room - 2 * _FP_COST) // ID_LEN)
        if fit == 0:
            return []
        end = item.extras[fit - 1] + 1  # our keys below ``end`` are settled
        if end >= item.hi:
            return [self._diff(item.upper, item.extras[:fit], [])]
        bound = _between(self._keys[end - 1], self._keys[end])
        return [self._diff(bound, item.extras[:fit], []), self._fingerprint_range(item.upper, end, item.hi)]

    def _write(self, items: list[_Item | Bound]) -> ReconcileMessage | None:
        """Assemble the reply within budget, merging skips.

        Detail that does not fit is cut coarser (a DIFF: the part that fits), else replaced by
        our fingerprint of that range (the peer then cuts it up itself), else by one
        fingerprint from there to INFINITY. The first detail always fits in some form, so
        every round makes progress.
        """
        out: list[Range] = []
        size, asks = 0, False
        skip, ready_kind = Mode.SKIP, _Kind.READY
        skipping: Bound | None = None  # the upper bound of the run of skips not yet written
        # ``out`` always ends at the previous item's upper bound (= this item's ``lower``),
        # so a detail's ``cost`` is its size in the message.
        for item in items:
            if not isinstance(item, _Item):
                skipping = item
                continue
            if skipping is not None:  # one skip range for the whole run
                ts = skipping[0]
                if ts == _INFINITY_TS:
                    size += 2
                else:
                    delta = ts - (out[-1].upper[0] if out else 0) + 1
                    size += (2 if delta < 0x80 else 1 + (delta.bit_length() + 6) // 7) + len(skipping[1])
                out.append(_new(Range, (skipping, skip, b"", 0, (), ())))
                skipping = None
            room = self._budget - _RESERVE - size
            slots = MAX_RANGES_PER_MESSAGE - len(out) - 2
            detail, cost = item.ranges, item.cost
            # Only a DIFF we resolved can exceed the per-range caps; what ``_detail``,
            # ``_coarse`` and ``_partial_diff`` build stays within them.
            ready = item.kind == ready_kind
            if (cost > room or len(detail) > slots or (ready and _over_cap(detail))) and slots >= 2:
                if item.extras is not None:
                    detail = self._partial_diff(item, room)
                    cost = _ranges_size(item.lower[0], detail)
                else:  # DETAIL, or a READY DIFF that also names positions (cannot be cut)
                    detail, cost = self._coarse(item, room)
            if cost <= room and 0 < len(detail) <= slots \
                    and not (ready and detail is item.ranges and _over_cap(detail)):
                pass
            elif 24 + len(item.upper[1]) <= room and slots >= 1:
                detail = [self._fingerprint_range(item.upper, item.lo, item.hi)]
                cost = _ranges_size(item.lower[0], detail)
            else:
                out.append(self._fingerprint_range(INFINITY, item.lo, len(self._keys)))
                asks = True
                break
            out.extend(detail)
            size += cost
            asks = asks or any(r.mode in (Mode.FINGERPRINT, Mode.IDLIST) for r in detail)
        else:
            if skipping is not None:
                out.append(_new(Range, (skipping, skip, b"", 0, (), ())))
        self._finished = not asks
        if not asks and all(r.mode == skip for r in out):
            return None
        return ReconcileMessage(tuple(out))
