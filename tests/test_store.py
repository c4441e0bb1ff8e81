"""Tests of mesh.store on real SQLite files: sync set, receipts, quotas, batches, app
tables, crash safety (a SIGKILLed writer) and a 100,000-envelope store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.envelope import Envelope, Receipt, make_stamp, receipt_hash
from mesh.errors import LocalProtocolError, UserError
from mesh.store import SCHEMA_VERSION, AddResult, ItemKind, Store

REPO = Path(__file__).resolve().parents[1]
T0 = 28_000_000  # minutes since the epoch (~2023)
NOW = T0 * 60.0
BODY = 100
SIZE = 28 + BODY + 13  # Envelope.size for BODY bytes of ciphertext


def make_env(
    *, ts: int = T0, ttl: int = 3600, ttl_left: int | None = None, body_len: int = BODY,
    rhash: bytes | None = None, bits: int = 0, hops: int = 10,
) -> Envelope:
    env = Envelope(
        kind=1, created_min=ts, ttl_s=ttl, receipt_hash=rhash or os.urandom(16),
        body=os.urandom(body_len), hops_left=hops, ttl_left_s=ttl if ttl_left is None else ttl_left,
    )
    if bits:
        env = env.with_mutable(stamp=make_stamp(env.id, bits))
        assert env.stamp_bits >= bits
    return env


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "profile" / "store.db")
    yield s
    s.close()


def kind_of(store: Store, item_id: bytes) -> ItemKind | None:
    item = store.get_item(item_id)
    return None if item is None else item.kind


# --------------------------------------------------------------------------- lifecycle


def test_open_uses_wal_full_sync_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.db"
    with Store.open(path) as s:
        assert path.exists()
        assert s.integrity_check()
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s.schema_version() == SCHEMA_VERSION
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()


def test_a_schema_1_file_is_upgraded_and_keeps_its_items(tmp_path: Path) -> None:
    """A store written by schema 1 (before the receipts-per-neighbour index) opens, gains
    the index in a 1 -> 2 migration, and loses nothing."""
    path = tmp_path / "store.db"
    with Store.open(path) as s:
        env = make_env()
        assert s.add_envelope(env, now=NOW, origin="peer") == AddResult.STORED
    raw = sqlite3.connect(path)
    raw.execute("DROP INDEX items_receipt_origin")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    with Store.open(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == 2
        assert s.has(env.id)
        names = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "items_receipt_origin" in names
        assert s.integrity_check()


def test_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    Store.open(path).close()
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA user_version = 99")
    raw.commit()
    raw.close()
    with pytest.raises(UserError, match="newer Pigeon"):
        Store.open(path)


def test_not_a_database_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="cannot open"):
        Store.open(path)


def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    env = make_env()
    with Store.open(path) as s:
        assert s.add_envelope(env, now=NOW, origin="aa") is AddResult.STORED
        s.meta_set("k", "v")
    with Store.open(path) as s:
        assert s.has(env.id)
        assert s.meta_get("k") == "v"


# --------------------------------------------------------------------------- envelopes


def test_add_get_duplicate_expired(store: Store) -> None:
    env = make_env(ttl=7200, ttl_left=600, bits=2, hops=7)
    assert store.add_envelope(env, now=NOW, origin="ab12") is AddResult.STORED
    item = store.get_item(env.id)
    assert item is not None
    assert item.kind == "envelope"  # a StrEnum: plain strings compare equal
    assert item.kind is ItemKind.ENVELOPE
    assert item.data == env.to_bytes()
    assert Envelope.from_bytes(item.data) == env
    assert (item.ts, item.expires_at, item.hops_left, item.size) == (T0, NOW + 600, 7, SIZE)
    assert item.stamp_bits == env.stamp_bits >= 2
    assert (item.origin, item.local) == ("ab12", False)
    assert store.has(env.id)
    assert store.add_envelope(env, now=NOW + 1, origin="other") is AddResult.DUPLICATE
    assert store.get_item(env.id) == item

    dead = make_env(ttl_left=0)
    assert store.add_envelope(dead, now=NOW, origin="ab12") is AddResult.EXPIRED
    assert not store.has(dead.id)
    assert store.get_item(os.urandom(16)) is None


def test_get_many_keeps_order_and_skips_unknown(store: Store) -> None:
    envs = [make_env() for _ in range(5)]
    for e in envs:
        store.add_envelope(e, now=NOW, origin="x")
    wanted = [envs[3].id, os.urandom(16), envs[0].id, envs[4].id]
    assert [i.id for i in store.get_many(wanted)] == [envs[3].id, envs[0].id, envs[4].id]


def test_delete_envelope_leaves_tombstone(store: Store) -> None:
    env = make_env()
    store.add_envelope(env, now=NOW, origin="self", local=True)
    assert store.delete_envelope(env.id, now=NOW)
    item = store.get_item(env.id)
    assert item is not None and item.kind == ItemKind.TOMBSTONE and item.data is None
    assert item.expires_at == env.dedup_until()
    assert (T0, env.id) in store.sync_keys()
    assert store.add_envelope(env, now=NOW, origin="x") is AddResult.DUPLICATE
    assert not store.delete_envelope(env.id, now=NOW)
    assert not store.delete_envelope(os.urandom(16), now=NOW)


# --------------------------------------------------------------------------- receipts


def test_receipt_purges_envelopes_into_tombstones(store: Store) -> None:
    secret = os.urandom(16)
    rh = receipt_hash(secret)
    answered = [make_env(rhash=rh, ts=T0 + i) for i in range(2)]
    other = make_env()
    for e in [*answered, other]:
        assert store.add_envelope(e, now=NOW, origin="p") is AddResult.STORED
    receipt = Receipt(secret, T0 + 5)
    new, purged = store.add_receipt(receipt, now=NOW)
    assert new and sorted(purged) == sorted(e.id for e in answered)
    for e in answered:
        item = store.get_item(e.id)
        assert item is not None
        assert (item.kind, item.data, item.ts, item.size) == (ItemKind.TOMBSTONE, None, e.created_min, 0)
        assert item.expires_at == e.dedup_until()
    r_item = store.get_item(receipt.id)
    assert r_item is not None and r_item.kind == ItemKind.RECEIPT
    assert r_item.data == receipt.to_bytes() and r_item.expires_at == receipt.keep_until()
    assert kind_of(store, other.id) == ItemKind.ENVELOPE
    keys = store.sync_keys()
    for key in [(e.created_min, e.id) for e in [*answered, other]] + [(T0 + 5, receipt.id)]:
        assert key in keys
    assert store.add_receipt(receipt, now=NOW + 1) == (False, [])
    st = store.stats()
    assert (st.envelopes, st.receipts, st.tombstones, st.bytes) == (1, 1, 2, SIZE)


def test_envelope_already_answered_is_not_stored_at_all(store: Store) -> None:
    secret = os.urandom(16)
    store.add_receipt(Receipt(secret, T0), now=NOW)
    keys = store.sync_keys()
    for _ in range(20):  # minted under a known receipt hash: nothing accumulates
        env = make_env(rhash=receipt_hash(secret))
        assert store.add_envelope(env, now=NOW, origin="p") is AddResult.ANSWERED
        assert kind_of(store, env.id) is None
    assert store.sync_keys() == keys
    assert store.stats().envelopes == 0 and store.stats().tombstones == 0


def test_answered_envelope_in_file_is_repaired_at_open(tmp_path: Path) -> None:
    """Eviction relies on 'no answered envelope is ever stored'; open() enforces it even
    for a file where some other writer broke it."""
    path = tmp_path / "store.db"
    secret = os.urandom(16)
    env = make_env(rhash=receipt_hash(secret))
    with Store.open(path) as s:
        s.add_envelope(env, now=NOW, origin="p")
        s.add_receipt(Receipt(secret, T0), now=NOW)
        assert kind_of(s, env.id) == ItemKind.TOMBSTONE
    raw = sqlite3.connect(path)  # simulate a foreign writer resurrecting the envelope
    raw.execute(
        "UPDATE items SET kind = 'envelope', data = ?, size = ?, receipt_hash = ? WHERE id = ?",
        (env.to_bytes(), env.size, env.receipt_hash, env.id),
    )
    raw.commit()
    raw.close()
    with Store.open(path) as s:
        assert kind_of(s, env.id) == ItemKind.TOMBSTONE
        assert s.stats().quota_used == 0


# --------------------------------------------------------------------------- sync keys, sweep


def test_sync_keys_sorted_over_all_kinds(store: Store) -> None:
    expected = set()
    for i in range(50):
        e = make_env(ts=T0 + (i * 7) % 13)
        store.add_envelope(e, now=NOW, origin="p")
        expected.add((e.created_min, e.id))
    for i in range(10):
        r = Receipt(os.urandom(16), T0 + i)
        store.add_receipt(r, now=NOW)
        expected.add((r.issued_min, r.id))
    gone = make_env(ts=T0 + 3)
    store.add_envelope(gone, now=NOW, origin="p")
    store.delete_envelope(gone.id, now=NOW)
    expected.add((gone.created_min, gone.id))
    keys = store.sync_keys()
    assert keys == sorted(expected)
    assert all(isinstance(ts, int) and isinstance(i, bytes) and len(i) == 16 for ts, i in keys)


def test_sweep_expires_envelopes_then_forgets(store: Store) -> None:
    short = make_env(ttl=3600, ttl_left=60)
    long = make_env(ttl=3600, ttl_left=3600)
    receipt = Receipt(os.urandom(16), T0)
    for e in (short, long):
        store.add_envelope(e, now=NOW, origin="p")
    store.add_receipt(receipt, now=NOW)

    assert store.sweep(NOW + 59) == 0
    assert store.sweep(NOW + 60) == 1
    assert kind_of(store, short.id) == ItemKind.TOMBSTONE
    assert kind_of(store, long.id) == ItemKind.ENVELOPE
    assert store.get_item(short.id).expires_at == short.dedup_until()  # type: ignore[union-attr]

    assert store.sweep(NOW + 3600) == 1  # long -> tombstone
    assert store.sweep(short.dedup_until()) == 2  # both tombstones forgotten
    assert not store.has(short.id) and not store.has(long.id)
    assert store.has(receipt.id)
    assert store.sweep(receipt.keep_until()) == 1
    assert store.sync_keys() == []


# --------------------------------------------------------------------------- quota


def test_eviction_order_expired_then_lowest_priority(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s.db", quota_bytes=4 * SIZE, neighbour_share=1.0)
    expiring = make_env(ts=T0 + 3, ttl_left=10)
    stamped = make_env(ts=T0, bits=4)
    old = make_env(ts=T0 + 1)
    newer = make_env(ts=T0 + 2)
    for e in (expiring, stamped, old, newer):
        assert s.add_envelope(e, now=NOW, origin="p") is AddResult.STORED
    now = NOW + 100  # `expiring` has expired by our clock but was not swept

    incoming = [make_env(ts=T0 + 10) for _ in range(3)]
    expected_victims = [expiring, old, newer]
    for env, victim in zip(incoming, expected_victims, strict=True):
        assert s.add_envelope(env, now=now, origin="q") is AddResult.STORED
        assert kind_of(s, victim.id) is None  # evicted ids are forgotten, not tombstoned
        assert (victim.created_min, victim.id) not in s.sync_keys()
    assert kind_of(s, stamped.id) == ItemKind.ENVELOPE
    assert s.stats().quota_used == 4 * SIZE

    # An unstamped envelope never evicts a stamped one: the equal-rank newcomers go first.
    s.add_envelope(make_env(ts=T0 + 10), now=now, origin="q")
    assert kind_of(s, stamped.id) == ItemKind.ENVELOPE
    # Something ranked below everything held is refused and changes nothing.
    before = s.sync_keys()
    assert s.add_envelope(make_env(ts=T0 - 5), now=now, origin="q") is AddResult.REFUSED_QUOTA
    assert s.sync_keys() == before
    s.close()


def test_receipt_frees_room_before_any_eviction(tmp_path: Path) -> None:
    """'Answered' comes before 'lowest priority': a receipt purges at once, so its space
    is free and the low-priority envelopes are not touched."""
    s = Store.open(tmp_path / "s.db", quota_bytes=3 * SIZE, neighbour_share=1.0)
    secret = os.urandom(16)
    low = make_env(ts=T0)
    answered = make_env(ts=T0 + 5, bits=4, rhash=receipt_hash(secret))
    other = make_env(ts=T0 + 1)
    for e in (low, answered, other):
        s.add_envelope(e, now=NOW, origin="p")
    s.add_receipt(Receipt(secret, T0 + 6), now=NOW)
    assert s.add_envelope(make_env(ts=T0 + 9), now=NOW, origin="p") is AddResult.STORED
    assert kind_of(s, low.id) == ItemKind.ENVELOPE
    assert kind_of(s, other.id) == ItemKind.ENVELOPE
    assert kind_of(s, answered.id) == ItemKind.TOMBSTONE
    s.close()


def test_flooding_neighbour_fills_only_its_share(tmp_path: Path) -> None:
    share = 10 * SIZE
    s = Store.open(tmp_path / "s.db", quota_bytes=4 * share, neighbour_share=0.25)
    good = [make_env(ts=T0 + i) for i in range(8)]
    for e in good:
        assert s.add_envelope(e, now=NOW, origin="good") is AddResult.STORED
    results = [
        s.add_envelope(make_env(ts=T0 + 100 + i), now=NOW, origin="bad") for i in range(50)
    ]
    assert set(results) == {AddResult.STORED}  # it only ever displaces its own oldest
    for e in good:
        assert kind_of(s, e.id) == ItemKind.ENVELOPE
    st = s.stats()
    assert st.per_origin == {"bad": share, "good": 8 * SIZE}
    assert st.quota_used == share + 8 * SIZE
    assert st.tombstones == 0  # a flood leaves no ids behind for others to reconcile
    s.close()


def test_global_quota_evicts_across_origins(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s.db", quota_bytes=6 * SIZE, neighbour_share=0.5)
    first = [make_env(ts=T0 + i) for i in range(3)]
    second = [make_env(ts=T0 + 10 + i) for i in range(3)]
    for e in first:
        s.add_envelope(e, now=NOW, origin="a")
    for e in second:
        s.add_envelope(e, now=NOW, origin="b")
    assert s.add_envelope(make_env(ts=T0 + 20), now=NOW, origin="c") is AddResult.STORED
    assert kind_of(s, first[0].id) is None  # globally oldest, evicted
    assert s.stats().quota_used == 6 * SIZE
    # Bigger than one neighbour's share: can never fit.
    huge = make_env(body_len=3 * SIZE)
    assert s.add_envelope(huge, now=NOW, origin="c") is AddResult.REFUSED_QUOTA
    assert not s.has(huge.id)
    s.close()


def test_local_envelopes_never_evicted_nor_counted(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s.db", quota_bytes=4 * SIZE, neighbour_share=1.0)
    mine = [make_env(ts=T0 - 100 + i) for i in range(10)]  # oldest, unstamped, over quota
    for e in mine:
        assert s.add_envelope(e, now=NOW, origin="self", local=True) is AddResult.STORED
    assert s.stats().quota_used == 0
    for i in range(20):
        assert s.add_envelope(make_env(ts=T0 + i), now=NOW, origin="p") is AddResult.STORED
    for e in mine:
        item = s.get_item(e.id)
        assert item is not None and item.kind == ItemKind.ENVELOPE and item.local
    st = s.stats()
    assert (st.local_envelopes, st.envelopes, st.quota_used) == (10, 14, 4 * SIZE)
    assert st.bytes == 14 * SIZE and st.per_origin == {"p": 4 * SIZE}
    s.close()


# --------------------------------------------------------------------------- batches


def _count_commits(s: Store) -> list[str]:
    seen: list[str] = []
    s._conn.set_trace_callback(
        lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None
    )
    return seen


def test_each_add_commits_outside_batch(store: Store) -> None:
    commits = _count_commits(store)
    for _ in range(5):
        store.add_envelope(make_env(), now=NOW, origin="p")
    assert len(commits) == 5


def test_batch_commits_once_and_nested_batches_join(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = Store.open(path)
    commits = _count_commits(s)
    reader = sqlite3.connect(path)

    def visible() -> int:
        return int(reader.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    envs = [make_env() for _ in range(10)]
    with s.batch():
        for e in envs[:5]:
            s.add_envelope(e, now=NOW, origin="p")
        with s.batch():
            for e in envs[5:]:
                s.add_envelope(e, now=NOW, origin="p")
        assert visible() == 0  # the inner batch did not commit
        assert len(commits) == 0
    assert len(commits) == 1
    assert visible() == 10
    reader.close()
    s.close()


def test_batch_rolls_back_on_exception(store: Store) -> None:
    kept = make_env()
    store.add_envelope(kept, now=NOW, origin="p")
    envs = [make_env() for _ in range(3)]
    with pytest.raises(RuntimeError), store.batch():
        for e in envs:
            store.add_envelope(e, now=NOW, origin="p")
        store.add_receipt(Receipt(os.urandom(16), T0), now=NOW)
        store.outbox_add(os.urandom(16), contact="bob", text="hi", receipt_hash=None, now=NOW)
        raise RuntimeError("boom")
    assert store.sync_keys() == [(kept.created_min, kept.id)]
    assert store.outbox_list() == []
    assert store.stats().quota_used == SIZE
    # and the store is usable afterwards
    assert store.add_envelope(envs[0], now=NOW, origin="p") is AddResult.STORED


def test_failed_inner_batch_is_undone_but_outer_continues(store: Store) -> None:
    a, b = make_env(), make_env()
    with store.batch():
        store.add_envelope(a, now=NOW, origin="p")
        with pytest.raises(RuntimeError), store.batch():
            store.add_envelope(b, now=NOW, origin="p")
            raise RuntimeError("inner")
    assert store.has(a.id) and not store.has(b.id)


# --------------------------------------------------------------------------- app tables


def test_outbox_state_only_moves_forward(store: Store) -> None:
    mid = os.urandom(16)
    rh = os.urandom(16)
    assert store.outbox_add(mid, contact="bob", text="hello", receipt_hash=rh, now=NOW)
    assert not store.outbox_add(mid.hex(), contact="bob", text="again", receipt_hash=rh, now=NOW)
    [entry] = store.outbox_list()
    assert (entry.msg_id, entry.state, entry.text) == (mid.hex(), "queued", "hello")
    assert store.outbox_by_receipt_hash(rh) == mid.hex()
    assert store.outbox_by_receipt_hash(os.urandom(16)) is None

    assert store.outbox_set_state(mid, "relayed", now=NOW + 1)
    assert not store.outbox_set_state(mid, "relayed", now=NOW + 2)
    assert store.outbox_set_state(mid.hex(), "delivered", now=NOW + 3)
    assert not store.outbox_set_state(mid, "relayed", now=NOW + 4)
    assert not store.outbox_set_state(mid, "queued", now=NOW + 5)
    entry = store.outbox_list("bob")[0]
    assert (entry.state, entry.updated_at, entry.created_at) == ("delivered", NOW + 3, NOW)
    # queued -> delivered directly (the receipt outran the relay notice)
    other = os.urandom(16)
    store.outbox_add(other, contact="carol", text="x", receipt_hash=None, now=NOW)
    assert store.outbox_set_state(other, "delivered", now=NOW)
    assert [e.contact for e in store.outbox_list()] == ["bob", "carol"]
    assert store.outbox_list("nobody") == []
    assert not store.outbox_set_state(os.urandom(16), "relayed", now=NOW)
    with pytest.raises(LocalProtocolError):
        store.outbox_set_state(mid, "lost", now=NOW)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        store.outbox_set_state(b"short", "relayed", now=NOW)


def test_inbox_never_shows_a_message_twice(store: Store) -> None:
    mid = os.urandom(16)
    key = os.urandom(32)
    fields = {
        "conversation": "alice", "sender_key": key, "sender_name": "Alice", "text": "hi",
        "sent_at": NOW - 5, "received_at": NOW, "kind": "direct",
    }
    assert store.inbox_add(mid, **fields)  # type: ignore[arg-type]
    assert not store.inbox_add(mid.hex(), **{**fields, "text": "changed"})  # type: ignore[arg-type]
    store.inbox_add(
        os.urandom(16), conversation="#public", sender_key=key, sender_name="Alice",
        text="all", sent_at=NOW, received_at=NOW + 1, kind="channel",
    )
    assert [e.text for e in store.inbox_list()] == ["hi", "all"]
    [entry] = store.inbox_list("alice")
    assert (entry.msg_id, entry.sender_key, entry.kind, entry.sent_at) == (
        mid.hex(), key, "direct", NOW - 5,
    )
    assert [e.kind for e in store.inbox_list("#public")] == ["channel"]


def test_contacts_unique_name_and_key(store: Store) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    c = store.contact_add("Alice", k1, now=NOW)
    assert (c.name, c.sign_pub, c.verified) == ("Alice", k1, False)
    with pytest.raises(UserError, match="named 'Alice' already exists"):
        store.contact_add("alice", k2, now=NOW)
    with pytest.raises(UserError, match="already saved as contact 'Alice'"):
        store.contact_add("Bob", k1, now=NOW)
    with pytest.raises(UserError, match="empty"):
        store.contact_add("  ", k2, now=NOW)
    store.contact_add("bob", k2, now=NOW, verified=True)
    assert [x.name for x in store.contact_list()] == ["Alice", "bob"]
    assert store.contact_by_key(k2) == store.contact_by_name("BOB")
    store.contact_set_verified("alice")
    assert store.contact_by_name("Alice").verified  # type: ignore[union-attr]
    store.contact_remove("Alice")
    assert store.contact_by_key(k1) is None
    with pytest.raises(UserError, match="no contact named"):
        store.contact_remove("Alice")
    with pytest.raises(UserError, match="no contact named"):
        store.contact_set_verified("nobody")


def test_channels_and_meta(store: Store) -> None:
    key = os.urandom(32)
    store.channel_add("news", key, now=NOW)
    with pytest.raises(UserError, match="already exists"):
        store.channel_add("NEWS", os.urandom(32), now=NOW)
    with pytest.raises(UserError, match="already joined as 'news'"):
        store.channel_add("other", key, now=NOW)
    store.channel_add("alerts", os.urandom(32), now=NOW + 1)
    assert [c.name for c in store.channel_list()] == ["alerts", "news"]
    assert store.meta_get("x") is None
    store.meta_set("x", "1")
    store.meta_set("x", "2")
    assert store.meta_get("x") == "2"


# --------------------------------------------------------------------------- crash safety

_WRITER = """
import os, sys, time
from pathlib import Path
from mesh.envelope import Envelope
from mesh.store import Store
store = Store.open(Path(sys.argv[1]))
now = 28_000_000 * 60.0
deadline = time.monotonic() + 60
for i in range(20_000):
    if time.monotonic() > deadline:
        break
    env = Envelope(kind=1, created_min=28_000_000, ttl_s=3600, receipt_hash=os.urandom(16),
                   body=os.urandom(200), ttl_left_s=3600)
    store.add_envelope(env, now=now, origin=f"peer{i % 3}")
    print(env.id.hex(), flush=True)
"""


@pytest.mark.slow
def test_sigkill_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "crash" / "store.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        while len(printed) < 300:  # kill it mid-way through its 20,000 adds
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(line)
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert len(printed) >= 300, f"writer died early: {err}"
    assert proc.returncode == -signal.SIGKILL
    ids = [bytes.fromhex(x) for x in (printed + rest.splitlines(keepends=True))
           if x.endswith("\n") and len(x.strip()) == 32]
    with Store.open(path) as s:
        assert s.integrity_check()
        missing = [i.hex() for i in ids if s.get_item(i) is None]
        assert missing == []
        assert s.stats().envelopes >= len(ids)


# --------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_hundred_thousand_envelopes(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "big.db")
    n, per_batch = 100_000, 5_000
    envs = (make_env(ts=T0 + i % 2000, body_len=64) for i in range(n))
    start = time.perf_counter()
    for _ in range(n // per_batch):
        with s.batch():
            for _j in range(per_batch):
                result = s.add_envelope(next(envs), now=NOW, origin=f"p{_j % 5}")
                assert result is AddResult.STORED
    insert_s = time.perf_counter() - start
    start = time.perf_counter()
    keys = s.sync_keys()
    keys_s = time.perf_counter() - start
    start = time.perf_counter()
    st = s.stats()
    stats_s = time.perf_counter() - start
    print(
        f"\n100k envelopes: insert {insert_s:.2f} s ({insert_s / n * 1e6:.0f} us each), "
        f"sync_keys {keys_s * 1000:.1f} ms, stats {stats_s * 1000:.1f} ms"
    )
    assert len(keys) == n and keys == sorted(keys)
    assert st.envelopes == n
    s.close()


def test_receipts_from_one_neighbour_are_capped(tmp_path: Path) -> None:
    """Receipts for random secrets cost nothing to mint: one neighbour may have us hold only
    so many; the oldest of its own make room, others' receipts are untouched."""
    s = Store.open(tmp_path / "s.db")
    s.receipts_per_origin = 100
    honest = Receipt(os.urandom(16), T0)
    s.add_receipt(honest, now=NOW, origin="tcp:192.0.2.1")
    flood = [Receipt(os.urandom(16), T0 + 1) for _ in range(500)]
    for i, r in enumerate(flood):
        assert s.add_receipt(r, now=NOW + i, origin="tcp:192.0.2.66")[0]
    held = sum(1 for r in flood if s.has(r.id))
    assert 0 < held <= 100
    assert s.has(flood[-1].id) and not s.has(flood[0].id)  # the oldest went first
    assert s.has(honest.id)
    mine = [Receipt(os.urandom(16), T0) for _ in range(150)]
    for r in mine:
        s.add_receipt(r, now=NOW, origin="self")
    assert all(s.has(r.id) for r in mine)  # our own receipts are never capped
    s.close()


def test_add_tombstone_remembers_an_id_without_its_bytes(store: Store) -> None:
    env = make_env()
    assert store.add_tombstone(env, now=NOW)
    item = store.get_item(env.id)
    assert item is not None and item.kind == ItemKind.TOMBSTONE and item.data is None
    assert (env.created_min, env.id) in store.sync_keys()
    assert store.add_envelope(env, now=NOW, origin="p") is AddResult.DUPLICATE
    assert not store.add_tombstone(env, now=NOW)
    assert store.stats().quota_used == 0
