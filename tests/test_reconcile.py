"""Range-based set reconciliation: exact results, round trips and bytes, frame caps, hostility,
and the byte layout of a reconcile message.

A "round trip" is one message from the initiator plus the reply to it, so it is the number
of messages the initiator sends. Costs are counted with ``encoded_size`` (the exact length of
``encode_message``). The cost tests print
what they measured (``pytest -s`` shows it); the reference is Negentropy with 32-byte ids: in
sync 1 round trip ~350 B; n=100k d=100 newest 3 round trips ~3.2 KB; n=100k d=1000 random
2 round trips ~800 KB (no frame cap); 4 KB frames, n=10k d=1000 random: 97 round trips.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.errors import LocalProtocolError, RemoteProtocolError
from mesh.reconcile import (
    INFINITY,
    MAX_IDS_PER_RANGE,
    MAX_RANGES_PER_MESSAGE,
    MAX_TS,
    Bound,
    Mode,
    Range,
    ReconcileMessage,
    Reconciler,
    SortedKeys,
    decode_message,
    encode_message,
    encoded_size,
)

Key = tuple[int, bytes]


# ---- helpers ------------------------------------------------------------------------------


def random_keys(rng: random.Random, n: int, ts_span: int = 2**22) -> list[Key]:
    """``n`` sorted keys with hash-like ids, as the store would hold them."""
    keys: dict[bytes, int] = {}
    while len(keys) < n:
        keys[rng.randbytes(16)] = rng.randrange(ts_span)
    return sorted((ts, i) for i, ts in keys.items())


def drop_each_from_one_side(
    rng: random.Random, keys: list[Key], positions: list[int]
) -> tuple[list[Key], list[Key]]:
    """Two sets: each key at ``positions`` is missing from one side, chosen at random."""
    missing_a = {p for p in positions if rng.random() < 0.5}
    missing_b = set(positions) - missing_a
    a = [k for p, k in enumerate(keys) if p not in missing_a]
    b = [k for p, k in enumerate(keys) if p not in missing_b]
    return a, b


@dataclass
class Conversation:
    a: Reconciler  # the initiator
    b: Reconciler
    sizes: list[int]  # encoded_size of every message, in order
    round_trips: int
    finisher: Reconciler  # the side whose respond() returned None

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def report(self, name: str) -> str:
        line = f"{name}: {self.round_trips} round trips, {len(self.sizes)} messages, "
        line += f"{self.total_bytes} bytes, largest {max(self.sizes)}"
        print(line)
        return line


def converse(
    a_keys: list[Key], b_keys: list[Key], *, max_messages: int = 500, **options: Any
) -> Conversation:
    """Run a whole reconciliation in memory, checking every message against the caps."""
    cap = options.get("max_message_bytes", 60_000)
    a, b = Reconciler(a_keys, **options), Reconciler(b_keys, **options)
    message: ReconcileMessage | None = a.initiate()
    sizes: list[int] = []
    receiver, round_trips = b, 1
    while message is not None:
        sizes.append(encoded_size(message))
        assert sizes[-1] <= cap
        assert len(message.ranges) <= MAX_RANGES_PER_MESSAGE
        assert all(len(r.ids) <= MAX_IDS_PER_RANGE for r in message.ranges)
        assert len(sizes) <= max_messages, "reconciliation does not converge"
        finisher = receiver
        message = receiver.respond(message)
        if message is not None and receiver is a:
            round_trips += 1
        receiver = b if receiver is a else a
    return Conversation(a, b, sizes, round_trips, finisher)


def assert_exact(conversation: Conversation, a_keys: list[Key], b_keys: list[Key]) -> None:
    a_ids, b_ids = {i for _, i in a_keys}, {i for _, i in b_keys}
    assert conversation.a.have == a_ids - b_ids
    assert conversation.a.need == b_ids - a_ids
    assert conversation.b.have == b_ids - a_ids
    assert conversation.b.need == a_ids - b_ids
    assert conversation.finisher.done


# ---- exact results for any pair of sets ---------------------------------------------------

# Ids are hashes in real use; a few shared prefixes force long bounds, and a tiny time range
# forces many keys onto one ``ts``. (Ids that are not hash-like can defeat a sum fingerprint.)
_elements = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sampled_from([b"", b"\x00", b"\x00\x00\x00\x00", b"\xff\xff"]),
        st.integers(0, 2**64),
        st.sampled_from("abx"),  # only in A, only in B, in both
    ),
    max_size=80,
)


@settings(max_examples=200)
@given(
    elements=_elements,
    relation=st.sampled_from(["mixed", "identical", "disjoint", "a empty", "b empty"]),
    max_message_bytes=st.sampled_from([1024, 4096, 60_000]),
)
def test_any_two_sets_reconcile_exactly(
    elements: list[tuple[int, bytes, int, str]], relation: str, max_message_bytes: int
) -> None:
    where: dict[bytes, tuple[int, str]] = {}
    for ts, prefix, salt, side in elements:
        digest = blake2b(salt.to_bytes(9, "little"), digest_size=16 - len(prefix)).digest()
        side = {"identical": "x", "a empty": "b", "b empty": "a"}.get(relation, side)
        if relation == "disjoint" and side == "x":
            side = "ab"[salt % 2]
        where[prefix + digest] = (ts, side)
    a_keys = sorted((ts, i) for i, (ts, side) in where.items() if side in "ax")
    b_keys = sorted((ts, i) for i, (ts, side) in where.items() if side in "bx")
    conversation = converse(a_keys, b_keys, max_message_bytes=max_message_bytes)
    assert_exact(conversation, a_keys, b_keys)
    assert len(conversation.sizes) <= 10


def test_large_dense_difference_with_small_frames_still_converges() -> None:
    rng = random.Random(11)
    keys = random_keys(rng, 1500, ts_span=3)
    a = [k for k in keys if rng.random() < 0.6]
    b = [k for k in keys if rng.random() < 0.6]
    conversation = converse(a, b, max_message_bytes=1024)
    assert_exact(conversation, a, b)


# ---- cost: round trips and bytes ----------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 1_000, 100_000])
def test_in_sync_is_one_tiny_round_trip(n: int) -> None:
    keys = random_keys(random.Random(n), n)
    conversation = converse(keys, list(keys))
    conversation.report(f"in sync, n={n}")
    assert conversation.round_trips == 1
    assert len(conversation.sizes) == 1  # the responder replies None
    assert conversation.total_bytes <= 300
    assert_exact(conversation, keys, keys)
    # The opening fits the 128-byte padding class with the frame header and length prefix.
    opening = wire.encode_frame(wire.Reconcile(message=Reconciler(keys).initiate()))
    assert len(wire.pad_plaintext(opening)) <= 128


def test_10k_differing_by_10_at_random() -> None:
    rng = random.Random(10)
    base = random_keys(rng, 10_010)
    a, b = drop_each_from_one_side(rng, base, rng.sample(range(len(base)), 10))
    conversation = converse(a, b)
    conversation.report("n=10k, d=10 random")
    assert_exact(conversation, a, b)
    assert conversation.round_trips <= 3


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["initiator", "responder", "both"])
def test_100k_differing_by_100_among_the_newest(extra: str) -> None:
    """The usual case: two peers that were apart each miss what the other got meanwhile."""
    rng = random.Random(100)
    base = random_keys(rng, 100_100)
    newest = list(range(len(base) - 100, len(base)))
    if extra == "both":
        a, b = drop_each_from_one_side(rng, base, newest)
    elif extra == "initiator":
        a, b = base, base[:-100]
    else:
        a, b = base[:-100], base
    conversation = converse(a, b)
    conversation.report(f"n=100k, d=100 newest, extra on {extra}")
    assert_exact(conversation, a, b)
    assert conversation.round_trips <= (1 if extra == "responder" else 3)
    assert conversation.total_bytes <= 3_000  # goal 3 KB; Negentropy ~3.2 KB


@pytest.mark.slow
@pytest.mark.parametrize("empty", ["initiator", "responder"])
def test_an_empty_newcomer_gets_100k_within_the_per_range_caps(empty: str) -> None:
    """A relay holding 100k meets a newcomer. A DIFF names our keys in a range the peer
    listed as empty: more than MAX_IDS_PER_RANGE of them can fit the bytes of one message,
    and the peer would close the link ("too many ids"): it must go out in parts."""
    keys = random_keys(random.Random(7), 100_000)
    a, b = ([], keys) if empty == "initiator" else (keys, [])
    conversation = converse(a, b)  # asserts every range within the caps
    assert_exact(conversation, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sides", ["one", "two"])
def test_100k_differing_by_1000_at_random(sides: str) -> None:
    """One-sided (the initiator lacks them, as in the benchmark) and split between the sides."""
    rng = random.Random(1000)
    base = random_keys(rng, 101_000)
    gone = rng.sample(range(len(base)), 1000)
    if sides == "two":
        a, b = drop_each_from_one_side(rng, base, gone)
    else:
        a, b = [k for p, k in enumerate(base) if p not in set(gone)], base
    conversation = converse(a, b)
    conversation.report(f"n=100k, d=1000 random, {sides}-sided, 60 KB frames")
    assert_exact(conversation, a, b)
    assert conversation.round_trips <= 3
    assert conversation.total_bytes <= 400_000


def test_4k_frames_10k_differing_by_1000_at_random() -> None:
    rng = random.Random(4096)
    base = random_keys(rng, 10_000)
    a, b = drop_each_from_one_side(rng, base, rng.sample(range(len(base)), 1000))
    conversation = converse(a, b, max_message_bytes=4096)
    conversation.report("n=10k, d=1000 random, 4 KB frames")
    assert_exact(conversation, a, b)
    assert max(conversation.sizes) <= 4096
    assert conversation.round_trips < 97  # Negentropy needs 97


def test_fingerprint_is_blake2b_of_sum_and_count() -> None:
    """Pinned because the peer computes the same thing: it is part of the wire protocol."""
    ids = [bytes([0xF0 + i]) * 16 for i in range(4)]  # the sum of two wraps around 2**128
    first, *_ = Reconciler([(7, i) for i in ids]).initiate().ranges  # opening: halves, ...
    total = sum(int.from_bytes(i, "little") for i in ids[:2]) % 2**128
    data = total.to_bytes(16, "little") + (2).to_bytes(8, "little")
    assert first.mode == Mode.FINGERPRINT
    assert first.fingerprint == blake2b(data, digest_size=16).digest()


# ---- our own misuse -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        [(2, b"\x01" * 16), (1, b"\x02" * 16)],  # not sorted
        [(1, b"\x01" * 16), (1, b"\x01" * 16)],  # not unique
        [(1, b"\x01" * 16), (2, b"\x01" * 16)],  # one id under two timestamps
        [(MAX_TS + 1, b"\x01" * 16)],
        [(-1, b"\x01" * 16)],
        [(1, b"\x01" * 15)],
        [(1, "x" * 16)],
        [(1.0, b"\x01" * 16)],
        [(1,)],
    ],
)
def test_bad_keys_are_local_errors(keys: list[Any]) -> None:
    with pytest.raises(LocalProtocolError):
        Reconciler(keys)


def test_too_small_a_budget_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Reconciler([], max_message_bytes=1000)


def test_sorted_keys_reconcile_as_the_checked_list_does() -> None:
    """``Reconciler`` trusts a ``SortedKeys`` (checked key by key as it was filled) instead of
    checking and converting the keys again: every message and the result must be the same."""
    rng = random.Random(21)
    keys = random_keys(rng, 600, ts_span=64)
    held = SortedKeys()
    for key in rng.sample(keys, len(keys)):
        held.add(key)
    for key in rng.sample(keys, 60):
        held.discard(key)
    held.discard((1, b"\x00" * 16))  # absent: nothing happens
    assert held == sorted(set(keys) - (set(keys) - set(held))) and len(held) == 540
    peer = [k for k in keys if rng.random() < 0.8]
    for ours in (held, list(held)):
        conversation = converse(peer, ours, max_message_bytes=4096)
        assert_exact(conversation, peer, list(held))
    trusted, checked = Reconciler(held), Reconciler(list(held))
    assert (trusted._ids, trusted._id_set, trusted._sums) == (checked._ids, checked._id_set, checked._sums)
    assert encode_message(trusted.initiate()) == encode_message(checked.initiate())


def test_sorted_keys_refuse_bad_keys_and_changes_behind_their_back() -> None:
    held = SortedKeys()
    held.add((5, b"\x01" * 16))
    for bad in [(5, b"\x01" * 16), (6, b"\x01" * 16), (MAX_TS + 1, b"\x02" * 16), (-1, b"\x02" * 16),
                (True, b"\x02" * 16), (5, b"\x02" * 15), (5, bytearray(16))]:
        with pytest.raises(LocalProtocolError):
            held.add(bad)  # type: ignore[arg-type]
    key = (7, b"\x03" * 16)
    for change in [lambda: held.append(key), lambda: held.extend([key]), lambda: held.insert(0, key),
                   held.pop, lambda: held.remove(key), held.clear, held.sort, held.reverse,
                   lambda: held.__setitem__(0, key), lambda: held.__delitem__(0),
                   lambda: held.__iadd__([key]), lambda: held.__imul__(2)]:
        with pytest.raises(TypeError):
            change()
    assert held == [(5, b"\x01" * 16)]


def test_a_dense_difference_is_listed_outright_not_cut_into_single_keys() -> None:
    """About one key in ten differs: cutting the opening's ranges into about two pieces per
    expected difference would leave pieces of one or two keys (943 ranges, as it once did),
    so each range goes out as one list."""
    rng = random.Random(8)
    keys = random_keys(rng, 2000, ts_span=600)
    a, b = drop_each_from_one_side(rng, keys, rng.sample(range(len(keys)), 200))
    initiator, responder = Reconciler(a), Reconciler(b)
    reply = responder.respond(initiator.initiate())
    assert reply is not None
    assert len(reply.ranges) <= 8 and max(len(r.ids) for r in reply.ranges) > 200
    assert_exact(converse(a, b), a, b)


# ---- hostile input --------------------------------------------------------------------------

_ID = b"\x11" * 16
_FP = b"\x22" * 16


def _bound(ts: int, prefix: bytes = b"") -> Bound:
    return Bound(ts, prefix)


def _end(mode: Mode = Mode.SKIP, **payload: Any) -> Range:
    return Range(INFINITY, mode, **payload)


_MALFORMED: dict[str, Any] = {
    "not a message": [_end()],
    "no ranges": ReconcileMessage(()),
    "ranges not a tuple": ReconcileMessage("abc"),  # type: ignore[arg-type]
    "not a range": ReconcileMessage(("x",)),  # type: ignore[arg-type]
    "too many ranges": ReconcileMessage(
        (*(Range(_bound(t), Mode.SKIP) for t in range(MAX_RANGES_PER_MESSAGE)), _end())
    ),
    "bounds equal": ReconcileMessage((Range(_bound(5), Mode.SKIP),) * 2 + (_end(),)),
    "bounds decreasing": ReconcileMessage(
        (Range(_bound(5, b"\x02"), Mode.SKIP), Range(_bound(5, b"\x01"), Mode.SKIP), _end())
    ),
    "not ending at infinity": ReconcileMessage((Range(_bound(5), Mode.SKIP),)),
    "bound beyond infinity": ReconcileMessage((Range(_bound(2**32), Mode.SKIP),)),
    "negative time": ReconcileMessage((Range(_bound(-1), Mode.SKIP), _end())),
    "boolean time": ReconcileMessage((Range(_bound(True), Mode.SKIP), _end())),
    "prefix too long": ReconcileMessage((Range(_bound(5, b"\x00" * 17), Mode.SKIP), _end())),
    "prefix not bytes": ReconcileMessage((Range(_bound(5, "ab"), Mode.SKIP), _end())),  # type: ignore[arg-type]
    "unknown mode": ReconcileMessage((_end(4),)),  # type: ignore[arg-type]
    "mode not an int": ReconcileMessage((_end("1"),)),  # type: ignore[arg-type]
    "fingerprint too short": ReconcileMessage((_end(Mode.FINGERPRINT, fingerprint=_FP[:15]),)),
    "fingerprint too long": ReconcileMessage((_end(Mode.FINGERPRINT, fingerprint=_FP + b"!"),)),
    "fingerprint missing": ReconcileMessage((_end(Mode.FINGERPRINT),)),
    "fingerprint with ids": ReconcileMessage((_end(Mode.FINGERPRINT, fingerprint=_FP, ids=(_ID,)),)),
    "skip with payload": ReconcileMessage((_end(Mode.SKIP, ids=(_ID,)),)),
    "list with fingerprint": ReconcileMessage((_end(Mode.IDLIST, fingerprint=_FP),)),
    "id too short": ReconcileMessage((_end(Mode.IDLIST, ids=(_ID[:15],)),)),
    "id too long": ReconcileMessage((_end(Mode.IDLIST, ids=(_ID + b"!",)),)),
    "id not bytes": ReconcileMessage((_end(Mode.IDLIST, ids=("x" * 16,)),)),
    "ids not a sequence": ReconcileMessage((_end(Mode.IDLIST, ids=_ID),)),
    "duplicate id": ReconcileMessage((_end(Mode.IDLIST, ids=(_ID, _ID)),)),
    "count on a skip": ReconcileMessage((_end(Mode.SKIP, count=3),)),
    "negative count": ReconcileMessage((_end(Mode.FINGERPRINT, fingerprint=_FP, count=-1),)),
    "boolean count": ReconcileMessage((_end(Mode.FINGERPRINT, fingerprint=_FP, count=True),)),
    "positions on a list": ReconcileMessage((_end(Mode.IDLIST, missing=(0,)),)),
    "positions not increasing": ReconcileMessage((_end(Mode.DIFF, missing=(2, 1)),)),
    "negative position": ReconcileMessage((_end(Mode.DIFF, missing=(-1,)),)),
    "position beyond our keys": ReconcileMessage((_end(Mode.DIFF, missing=(50,)),)),
    "duplicate id in a diff": ReconcileMessage((_end(Mode.DIFF, ids=(_ID, _ID)),)),
    "diff with fingerprint": ReconcileMessage((_end(Mode.DIFF, fingerprint=_FP),)),
    "too many ids in a range": ReconcileMessage(
        (_end(Mode.IDLIST, ids=tuple(bytes(16) for _ in range(MAX_IDS_PER_RANGE + 1))),)
    ),
}


@pytest.mark.parametrize("name", sorted(_MALFORMED))
def test_malformed_message_is_a_remote_error(name: str) -> None:
    with pytest.raises(RemoteProtocolError):
        Reconciler(random_keys(random.Random(1), 50)).respond(_MALFORMED[name])


def test_too_many_ids_for_our_budget_is_a_remote_error() -> None:
    ids = tuple(i.to_bytes(16, "big") for i in range(100))
    message = ReconcileMessage((Range(_bound(5), Mode.IDLIST, ids=ids), _end(Mode.IDLIST, ids=ids)))
    with pytest.raises(RemoteProtocolError):
        Reconciler([], max_message_bytes=1024).respond(message)


def test_our_ids_out_of_key_order_are_a_remote_error() -> None:
    keys = random_keys(random.Random(2), 10)
    backwards = (bytes(16), *(i for _, i in reversed(keys)))  # and one id we lack
    with pytest.raises(RemoteProtocolError):
        Reconciler(keys).respond(ReconcileMessage((_end(Mode.IDLIST, ids=backwards),)))


def test_need_cannot_grow_without_bound() -> None:
    ids = tuple(random.Random(3).randbytes(16) for _ in range(20))
    reconciler = Reconciler([], max_need=10)
    with pytest.raises(RemoteProtocolError):
        reconciler.respond(ReconcileMessage((_end(Mode.IDLIST, ids=ids),)))
    assert len(reconciler.need) <= 10


_HOSTILE_KEYS = random_keys(random.Random(4), 300, ts_span=4)
_ts = st.one_of(st.integers(0, 4), st.sampled_from([-1, 2**32 - 2, 2**32 - 1, 2**32, True]))
_prefix = st.one_of(st.binary(max_size=17), st.sampled_from([i[:4] for _, i in _HOSTILE_KEYS[:20]]))
_some_id = st.one_of(st.binary(min_size=15, max_size=17), st.sampled_from([i for _, i in _HOSTILE_KEYS]))
_range = st.builds(
    Range,
    upper=st.builds(Bound, _ts, _prefix),
    mode=st.one_of(st.sampled_from(list(Mode)), st.integers(-1, 5)),
    fingerprint=st.one_of(st.just(b""), st.binary(min_size=15, max_size=17)),
    count=st.integers(-1, 400),
    ids=st.lists(_some_id, max_size=6).map(tuple),
    missing=st.lists(st.integers(-1, 400), max_size=4).map(tuple),
)
_well_formed_range = st.builds(
    lambda upper, mode, fingerprint, count, ids, missing: Range(
        upper,
        mode,
        fingerprint if mode == Mode.FINGERPRINT else b"",
        count if mode == Mode.FINGERPRINT else 0,
        tuple(dict.fromkeys(ids)) if mode in (Mode.IDLIST, Mode.DIFF) else (),
        tuple(sorted(set(missing))) if mode == Mode.DIFF else (),
    ),
    upper=st.builds(Bound, st.integers(0, 4), st.sampled_from([b"", *(i[:3] for _, i in _HOSTILE_KEYS)])),
    mode=st.sampled_from(list(Mode)),
    fingerprint=st.one_of(
        st.binary(min_size=16, max_size=16),
        st.sampled_from([Reconciler(_HOSTILE_KEYS[:k])._fingerprint(0, k) for k in (0, 1, 2, 150, 299)]),
    ),
    count=st.sampled_from([0, 1, 2, 5, 150, 299, 300, 301]),
    ids=st.lists(
        st.one_of(st.sampled_from([i for _, i in _HOSTILE_KEYS]), st.binary(min_size=16, max_size=16))
    ),
    missing=st.lists(st.integers(0, 300), max_size=5),
)


@settings(max_examples=300)
@given(
    ranges=st.one_of(st.lists(_range, max_size=12), st.lists(_well_formed_range, max_size=12)),
    tidy=st.booleans(),
)
def test_random_messages_raise_nothing_but_remote_errors(ranges: list[Range], tidy: bool) -> None:
    if tidy:  # mostly well formed, so that the checks deeper in are reached too
        ranges = sorted(
            {(r.upper.ts, r.upper.id_prefix): r for r in ranges}.values(),
            key=lambda r: (r.upper.ts, r.upper.id_prefix),
        )
        ranges = [r for r in ranges if (r.upper.ts, r.upper.id_prefix) < (INFINITY.ts, INFINITY.id_prefix)]
        ranges.append(_end(Mode.FINGERPRINT, fingerprint=_FP))
    reconciler = Reconciler(_HOSTILE_KEYS, max_message_bytes=1024)
    try:
        reply = reconciler.respond(ReconcileMessage(tuple(ranges)))
    except RemoteProtocolError:
        return
    if reply is not None:  # whatever we answer is itself well formed and within budget
        assert encoded_size(reply) <= 1024
        assert decode_message(encode_message(reply)) == reply
        Reconciler(_HOSTILE_KEYS)._validate(reply)


def test_a_listed_id_we_hold_in_another_range_is_a_remote_error() -> None:
    keys = random_keys(random.Random(5), 50)
    middle = Bound(keys[25][0], keys[25][1])
    message = ReconcileMessage((Range(middle, Mode.IDLIST, ids=(keys[40][1],)), _end()))
    with pytest.raises(RemoteProtocolError, match="outside its range"):
        Reconciler(keys).respond(message)


# ---- what the peer's keys reveal: one reply instead of rounds of cutting ---------------------


def _modes(message: ReconcileMessage | None) -> set[Mode]:
    assert message is not None
    return {r.mode for r in message.ranges}


@pytest.mark.parametrize("lacks", ["newest", "oldest", "one in the middle"])
def test_a_peer_lacking_a_subset_we_can_name_learns_it_in_one_reply(lacks: str) -> None:
    """From a fingerprint and count alone we spot that the peer holds our oldest keys there
    (it lacks the newest), our newest (it lacks the oldest) or all but one: a DIFF, no cutting."""
    ours = random_keys(random.Random(6), 2_000)
    theirs = {"newest": ours[:-40], "oldest": ours[40:], "one in the middle": ours[:700] + ours[701:]}[lacks]
    peer, us = Reconciler(theirs), Reconciler(ours)
    reply = us.respond(peer.initiate())
    assert _modes(reply) <= {Mode.SKIP, Mode.DIFF}
    assert us.done  # it asked nothing: we already know the whole difference
    assert reply is not None and peer.respond(reply) is None
    expected = {i for _, i in ours} - {i for _, i in theirs}
    assert us.have == peer.need == expected and not us.need and not peer.have


def test_a_peer_with_one_key_more_gets_our_fingerprint_back_and_names_it() -> None:
    rng = random.Random(8)
    ours = random_keys(rng, 300)
    theirs = sorted([*ours, *random_keys(rng, 1)])
    range_ = (Range(INFINITY, Mode.FINGERPRINT, Reconciler(theirs)._fingerprint(0, 301), 301),)
    reply = Reconciler(ours).respond(ReconcileMessage(range_))
    assert reply is not None and [r.mode for r in reply.ranges] == [Mode.FINGERPRINT]
    assert reply.ranges[0].count == 300
    peer = Reconciler(theirs)
    assert _modes(peer.respond(reply)) == {Mode.DIFF}
    assert peer.have == {i for _, i in theirs} - {i for _, i in ours}


def test_a_list_is_answered_with_our_extras_and_the_positions_we_lack() -> None:
    rng = random.Random(9)
    ours = random_keys(rng, 10, ts_span=1)
    foreign = rng.randbytes(16)
    listed = [i for _, i in ours]
    dropped = listed.pop(3)
    listed.insert(5, foreign)  # the lister's order for ids we lack cannot be checked
    us = Reconciler(ours)
    reply = us.respond(ReconcileMessage((_end(Mode.IDLIST, ids=tuple(listed)),)))
    assert reply is not None
    assert reply.ranges == (Range(INFINITY, Mode.DIFF, ids=(dropped,), missing=(5,)),)
    assert us.have == {dropped} and us.need == {foreign} and us.done


def test_an_empty_newcomer_with_small_frames_gets_everything_in_pieces() -> None:
    """A DIFF larger than a message goes out in parts, each followed by a fingerprint of the rest."""
    keys = random_keys(random.Random(12), 3_000)
    conversation = converse([], keys, max_message_bytes=1024)
    assert_exact(conversation, [], keys)
    assert max(conversation.sizes) <= 1024
    assert len(conversation.sizes) <= 2 * (3_000 * 16 // 900 + 2)


# ---- the byte layout -------------------------------------------------------------------------


def test_the_layout_is_pinned() -> None:
    """A worked example (docs/protocol.md section 7.7): the peer decodes exactly these bytes."""
    message = ReconcileMessage((
        Range(Bound(5, b"\x01"), Mode.SKIP),
        Range(Bound(7, b""), Mode.FINGERPRINT, fingerprint=bytes(16), count=300),
        Range(Bound(7, b"\x02"), Mode.IDLIST, ids=(b"\xaa" * 16,)),
        Range(INFINITY, Mode.DIFF, ids=(b"\xbb" * 16,), missing=(0, 2)),
    ))
    expected = bytes.fromhex(
        "060101" + "0320" + "00" * 16 + "ac02"  # SKIP to (5, 01); FINGERPRINT to (7, ""), 300 keys
        + "014102" + "01" + "aa" * 16  # IDLIST to (7, 02): one id
        + "0060" + "01" + "bb" * 16 + "020001"  # DIFF to INFINITY: one id, positions 0 and 2
    )
    assert encode_message(message) == expected
    assert encoded_size(message) == len(expected)
    assert decode_message(expected) == message


_layout_range = st.builds(
    lambda mode, fingerprint, count, ids, missing: (mode, fingerprint, count, ids, missing),
    st.sampled_from(list(Mode)),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**35 - 1),
    st.lists(st.binary(min_size=16, max_size=16), max_size=4),
    st.lists(st.integers(0, 2**20), max_size=4, unique=True).map(sorted),
)


@given(
    bounds=st.lists(st.tuples(st.integers(0, MAX_TS), st.binary(max_size=16)), unique=True, max_size=12),
    payloads=st.lists(_layout_range, min_size=13, max_size=13),
)
def test_every_message_survives_the_layout(bounds: list[tuple[int, bytes]], payloads: list[Any]) -> None:
    uppers = [Bound(*b) for b in sorted(bounds)] + [INFINITY]
    ranges = []
    for upper, (mode, fingerprint, count, ids, missing) in zip(uppers, payloads, strict=False):
        fp_mode, list_mode = mode == Mode.FINGERPRINT, mode in (Mode.IDLIST, Mode.DIFF)
        ranges.append(Range(
            upper, mode, fingerprint if fp_mode else b"", count if fp_mode else 0,
            tuple(ids) if list_mode else (), tuple(missing) if mode == Mode.DIFF else (),
        ))
    message = ReconcileMessage(tuple(ranges))
    data = encode_message(message)
    assert len(data) == encoded_size(message)
    assert decode_message(data) == message
    frame = wire.Reconcile(message=message)
    assert wire.decode_frame(wire.encode_frame(frame)) == frame


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_random_bytes_decode_or_raise_a_remote_error(data: bytes) -> None:
    try:
        message = decode_message(data)
    except RemoteProtocolError:
        return
    assert encode_message(message) == data  # one encoding per message: nothing is skipped


@pytest.mark.parametrize("data, reason", [
    (b"\x81\x00\x00", "shortest form"),
    (b"\x80\x80\x80\x80\x80\x01\x00", "too long"),
    (b"\x00\x01\x00", "INFINITY carries a prefix"),
    (b"\x01\x11" + bytes(17), "prefix too long"),
    (b"\x01\x80", "unknown range mode"),
    (b"\x01\x20" + bytes(15), "truncated"),
    (b"\x00\x40\x02" + bytes(16), "truncated"),
    (b"\x00\x40\xb9\x17", "too many ids"),  # 3,000 + 1 ids claimed
    (b"\x00\x60\x00\xb9\x17", "too many positions"),
    (b"\x01\x00" * (MAX_RANGES_PER_MESSAGE + 1), "too many ranges"),
    (b"\x80\x80\x80\x80\x10\x00", "bound time out of range"),
])
def test_bad_layouts_are_remote_errors(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_message(data)


def _outcome(keys: list[Key], message: ReconcileMessage, budget: int) -> tuple[Any, ...]:
    side = Reconciler(keys, max_message_bytes=budget)
    try:
        reply = side.respond(message)
    except RemoteProtocolError as exc:
        return ("error", exc.reason)
    return ("reply", None if reply is None else encode_message(reply), side.have, side.need)


def test_decoded_messages_get_the_same_verdict_as_the_full_checks() -> None:
    """A message from ``decode_message`` skips the type checks decoding already made; for any
    bytes, damaged or not, the reply or the error must be what the full checks give."""
    rng = random.Random(11)
    compared = errors = 0
    for _ in range(40):
        keys = random_keys(rng, rng.randrange(0, 300), ts_span=64)
        a = [k for k in keys if rng.random() < 0.8]
        b = [k for k in keys if rng.random() < 0.8]
        message: ReconcileMessage | None = Reconciler(a, max_message_bytes=4000).initiate()
        sides, turn = [Reconciler(b, max_message_bytes=4000), Reconciler(a, max_message_bytes=4000)], 0
        while message is not None and turn < 12:
            data = encode_message(message)
            for _ in range(10):
                damaged = bytearray(data)
                spot = rng.randrange(len(damaged) + 1)
                ranges = list(message.ranges)
                listing = [i for i, r in enumerate(ranges) if r.ids]
                if listing and rng.random() < 0.3:  # an id twice in one range
                    i = rng.choice(listing)
                    ids = ranges[i].ids
                    ranges[i] = ranges[i]._replace(ids=(*ids, ids[rng.randrange(len(ids))]))
                    damaged = bytearray(encode_message(ReconcileMessage(tuple(ranges))))
                elif len(ranges) > 2 and rng.random() < 0.3:  # a bound repeated
                    i = rng.randrange(len(ranges) - 2)
                    ranges[i + 1] = ranges[i + 1]._replace(upper=ranges[i].upper)
                    damaged = bytearray(encode_message(ReconcileMessage(tuple(ranges))))
                elif rng.random() < 0.5 and len(damaged) > 40:  # repeat some bytes
                    start = rng.randrange(len(damaged) - 16)
                    damaged[spot:spot] = damaged[start:start + 16]
                else:
                    damaged[spot:spot + 1] = bytes([rng.randrange(256)])
                try:
                    decoded = decode_message(bytes(damaged))
                except RemoteProtocolError:
                    continue
                ours = (b, a)[turn % 2]
                budget = rng.choice([1024, 4000])  # 1024: some messages carry too many ids
                fast = _outcome(ours, decoded, budget)
                assert fast == _outcome(ours, ReconcileMessage(tuple(decoded.ranges)), budget)
                compared += 1
                errors += fast[0] == "error"
            message = sides[turn % 2].respond(decode_message(data))
            turn += 1
    assert compared > 500 and 20 < errors < compared
