"""The node's SQLite store: the sync set (envelopes, receipts, tombstones) and app data.

One file per profile, in WAL mode with ``synchronous=FULL``: every mutating method
commits before it returns (outside ``batch()``), so once the session acknowledges an
envelope to a peer, or the UI shows a message, a ``kill -9`` or power cut cannot lose
it. The store never reads the clock; every method that needs time takes ``now`` (float
seconds, the node's wall clock), which keeps it drivable from a simulator.

Tables
------
``items`` is exactly the reconciliation set, keyed by the 16-byte id:

* ``envelope``: the relay bytes as received (``data``); ``expires_at = now + ttl_left_s``
  measured by our clock at storing time; ``hops_left`` / ``stamp_bits`` for routing.
* ``receipt``: id = ``Receipt.id``; its ``receipt_hash`` column holds ``Receipt.answers``
  (the hash the answered envelopes carry); kept until ``Receipt.keep_until()``.
* ``tombstone``: an envelope we held or refused and must keep reporting as known (so
  peers do not send it again) until its ``dedup_until()``; ``data`` is NULL.

``ts`` is the coarse minute (``created_min`` / ``issued_min``) that orders
reconciliation keys; ``sync_keys()`` reads the covering index on ``(ts, id)``.

Invariant: no envelope row is ever answered by a held receipt. ``add_receipt`` turns the
envelopes it answers into tombstones and ``add_envelope`` stores a tombstone instead of an
already answered envelope.

Quota
-----
``quota_bytes`` bounds the total ``size`` of non-local envelopes and each origin (the
neighbour we received it from) may hold at most ``neighbour_share * quota_bytes`` of it,
so a flooding neighbour can only fill its own share. Our own outgoing envelopes
(``local``) are neither counted nor evicted. Usage per origin is kept in ``quota_usage``
by triggers, so it stays right through rollbacks and crashes and costs O(1) per add.
When an add would exceed a bound, victims are chosen in DESIGN section 6 order: expired,
then answered by a held receipt, then lowest priority (``stamp_bits`` ascending, then
oldest ``ts``), among the over-share origin's envelopes when its share is the problem,
otherwise among all. An envelope never evicts one that ranks above it, so an unstamped
flood cannot push out stamped mail. The whole plan is made before anything changes: if it
cannot free enough, the add is refused and nothing is touched. Victims become tombstones.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from mesh.envelope import Envelope, Receipt
from mesh.errors import LocalProtocolError, UserError
from mesh.store_app import (
    APP_SCHEMA,
    AppTablesMixin,
    ChannelRow,
    Contact,
    InboxEntry,
    OutboxEntry,
)

__all__ = [
    "ORIGIN_SELF",
    "SCHEMA_VERSION",
    "AddResult",
    "ChannelRow",
    "Contact",
    "InboxEntry",
    "ItemKind",
    "OutboxEntry",
    "Store",
    "StoreStats",
    "StoredItem",
]

SCHEMA_VERSION = 2
#: Receipts one neighbour may have us hold. Anyone can mint receipts for random secrets, so
#: past this the oldest of that neighbour's receipts make room (a tenth at a time).
RECEIPTS_PER_ORIGIN = 20_000
#: Origin recorded for envelopes we created ourselves.
ORIGIN_SELF = "self"
#: Reserved ``quota_usage`` key for the total over all origins (no link key is ``*``).
_TOTAL = "*"

_ITEMS_SCHEMA = """
CREATE TABLE items (
    id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
    kind TEXT NOT NULL CHECK (kind IN ('envelope', 'receipt', 'tombstone')),
    ts INTEGER NOT NULL,
    data BLOB,
    size INTEGER NOT NULL,
    receipt_hash BLOB,
    expires_at REAL NOT NULL,
    dedup_until REAL NOT NULL,
    hops_left INTEGER NOT NULL DEFAULT 0,
    stamp_bits INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL,
    local INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL
);
CREATE INDEX items_ts_id ON items (ts, id);
CREATE INDEX items_kind_expires ON items (kind, expires_at);
CREATE INDEX items_receipt_hash ON items (receipt_hash) WHERE receipt_hash IS NOT NULL;
CREATE INDEX items_evict_all ON items (stamp_bits, ts, id)
    WHERE kind = 'envelope' AND local = 0;
CREATE INDEX items_evict_origin ON items (origin, stamp_bits, ts, id)
    WHERE kind = 'envelope' AND local = 0;

CREATE TABLE quota_usage (
    origin TEXT PRIMARY KEY NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER items_usage_insert AFTER INSERT ON items
WHEN NEW.kind = 'envelope' AND NEW.local = 0
BEGIN
    INSERT INTO quota_usage (origin, bytes) VALUES (NEW.origin, NEW.size), ('*', NEW.size)
        ON CONFLICT (origin) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER items_usage_delete AFTER DELETE ON items
WHEN OLD.kind = 'envelope' AND OLD.local = 0
BEGIN
    UPDATE quota_usage SET bytes = bytes - OLD.size WHERE origin IN (OLD.origin, '*');
    DELETE FROM quota_usage WHERE origin = OLD.origin AND origin <> '*' AND bytes <= 0;
END;
CREATE TRIGGER items_usage_update_old AFTER UPDATE OF kind, size, origin, local ON items
WHEN OLD.kind = 'envelope' AND OLD.local = 0
BEGIN
    UPDATE quota_usage SET bytes = bytes - OLD.size WHERE origin IN (OLD.origin, '*');
    DELETE FROM quota_usage WHERE origin = OLD.origin AND origin <> '*' AND bytes <= 0;
END;
CREATE TRIGGER items_usage_update_new AFTER UPDATE OF kind, size, origin, local ON items
WHEN NEW.kind = 'envelope' AND NEW.local = 0
BEGIN
    INSERT INTO quota_usage (origin, bytes) VALUES (NEW.origin, NEW.size), ('*', NEW.size)
        ON CONFLICT (origin) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
"""

#: Turns envelope rows into tombstones; callers append a WHERE clause (no values inside).
_TOMBSTONE_SET = (
    "UPDATE items SET kind = 'tombstone', data = NULL, size = 0, receipt_hash = NULL, "
    "expires_at = dedup_until "
)

_ITEM_COLUMNS = "id, kind, ts, data, expires_at, hops_left, stamp_bits, origin, local, size"


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    """Create the first schema on an empty database."""
    for statement in _split_sql(_ITEMS_SCHEMA + APP_SCHEMA):
        conn.execute(statement)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Receipts per neighbour, for the cap on what one neighbour can make us hold.
    (``IF NOT EXISTS``: development builds of schema 1 created it at open.)"""
    conn.execute("CREATE INDEX IF NOT EXISTS items_receipt_origin ON items (origin, received_at) "
                 "WHERE kind = 'receipt'")


def _split_sql(script: str) -> Iterator[str]:
    """Split a schema script into statements (trigger bodies contain ';')."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf.strip()
            buf = ""
    if buf.strip():
        raise LocalProtocolError("incomplete statement in schema script")


#: ``_MIGRATIONS[v]`` upgrades a database at ``user_version == v`` to ``v + 1``. Each
#: step runs in the same transaction as the version bump, so a crash mid-way leaves the
#: old version intact. Add new steps here; never edit a released one.
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _migrate_0_to_1, 1: _migrate_1_to_2,
}


class ItemKind(enum.StrEnum):
    ENVELOPE = "envelope"
    RECEIPT = "receipt"
    TOMBSTONE = "tombstone"


class AddResult(enum.Enum):
    """What ``add_envelope`` did; the session acknowledges every outcome but REFUSED_QUOTA."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    ANSWERED = "answered"
    REFUSED_QUOTA = "refused_quota"
    EXPIRED = "expired"


@dataclass(frozen=True)
class StoredItem:
    """One row of the sync set; satisfies ``mesh.routing.ItemView``.

    ``data`` holds the bytes as received (their mutable header is stale: use
    ``hops_left`` and ``expires_at``); it is None for tombstones.
    """

    id: bytes
    kind: ItemKind
    ts: int
    data: bytes | None
    expires_at: float
    hops_left: int
    stamp_bits: int
    origin: str
    local: bool
    size: int


@dataclass(frozen=True)
class StoreStats:
    envelopes: int
    bytes: int  # total size of all stored envelopes, local included
    receipts: int
    tombstones: int
    local_envelopes: int
    quota_used: int  # the part of ``bytes`` that counts against the quota (non-local)
    per_origin: dict[str, int]  # non-local envelope bytes per origin


def _item(row: tuple[Any, ...]) -> StoredItem:
    return StoredItem(
        id=row[0], kind=ItemKind(row[1]), ts=row[2], data=row[3], expires_at=row[4],
        hops_left=row[5], stamp_bits=row[6], origin=row[7], local=bool(row[8]), size=row[9],
    )


class Store(AppTablesMixin):
    """The profile's database. Create with ``Store.open``; not shared between threads."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, *, quota_bytes: int, neighbour_share: float,
    ) -> None:
        self._conn = conn
        self.path = path
        self.quota_bytes = quota_bytes
        self.neighbour_quota = int(quota_bytes * neighbour_share)
        self._depth = 0
        self._savepoints = 0
        self.receipts_per_origin = RECEIPTS_PER_ORIGIN
        #: Receipts held per origin; an upper estimate (a rollback or a sweep only makes it
        #: high), recounted exactly before anything is evicted on its word.
        self._receipt_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls, path: Path, *, quota_bytes: int = 256 * 2**20, neighbour_share: float = 0.25,
    ) -> Store:
        """Open (creating if needed) the store at ``path`` and bring its schema up to date."""
        if quota_bytes <= 0 or not 0.0 < neighbour_share <= 1.0:
            raise LocalProtocolError("quota_bytes must be > 0 and neighbour_share in (0, 1]")
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so commit points are ours.
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=10.0)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise UserError(f"cannot use write-ahead logging for {path} (got {mode})")
            # FULL: fsync the WAL on every commit, so a commit survives power loss too.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn, path, quota_bytes=quota_bytes, neighbour_share=neighbour_share)
            store._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise UserError(f"cannot open the store at {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return store

    def _migrate(self) -> None:
        with self._tx():
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"the store at {self.path} was written by a newer Pigeon "
                    f"(schema {version}, this version knows {SCHEMA_VERSION})"
                )
            while version < SCHEMA_VERSION:
                _MIGRATIONS[version](self._conn)
                version += 1
                # PRAGMA takes no parameters; ``version`` is an int we computed.
                self._conn.execute(f"PRAGMA user_version = {int(version)}")
            self._repair_answered()

    def _repair_answered(self) -> int:
        """Tombstone any envelope a held receipt answers; returns how many.

        Every write path keeps this set empty; running it once at open makes that true
        of any file (an older writer, a hand edit), which is what lets eviction skip an
        O(store) "answered" search on every add. The tombstones' dedup time may already
        have passed: ``sweep`` removes those.
        """
        return self._conn.execute(
            _TOMBSTONE_SET + "WHERE id IN (SELECT e.id FROM items AS r "
            "JOIN items AS e INDEXED BY items_receipt_hash ON e.receipt_hash = r.receipt_hash "
            "WHERE r.kind = 'receipt' AND e.kind = 'envelope')"
        ).rowcount

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def integrity_check(self) -> bool:
        """True when SQLite's full integrity check finds nothing wrong."""
        rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        return [tuple(r) for r in rows] == [("ok",)]

    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One atomic unit: a transaction at top level, a savepoint inside ``batch()``.

        The savepoint keeps each method all-or-nothing even inside a batch whose caller
        catches an exception and carries on.
        """
        if self._depth == 0:
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself after some failed commits (disk full, I/O
                # error) but not all (busy): never leave a transaction open behind us.
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise
            return
        self._savepoints += 1
        name = f"sp{self._savepoints}"  # our own counter, never a value from outside
        self._conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            raise
        self._depth -= 1
        self._conn.execute(f"RELEASE {name}")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group many changes into one commit (one fsync); rolled back on exception.

        A nested ``batch()`` joins the outer one: nothing is durable until the outermost
        block ends. Do not acknowledge anything to a peer from inside a batch.
        """
        with self._tx():
            yield

    # ------------------------------------------------------------------ reading

    def sync_keys(self) -> list[tuple[int, bytes]]:
        """Sorted ``(ts, id)`` of every item held (all kinds): the reconciliation set.

        Expired rows stay until ``sweep``; call it before a sync session if it matters.
        """
        return self._conn.execute("SELECT ts, id FROM items ORDER BY ts, id").fetchall()

    def get_item(self, item_id: bytes) -> StoredItem | None:
        row = self._conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)
        ).fetchone()
        return None if row is None else _item(row)

    def has(self, item_id: bytes) -> bool:
        return self._conn.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() \
            is not None

    def get_many(self, ids: Iterable[bytes]) -> list[StoredItem]:
        """Items for ``ids`` in the given order; unknown ids are skipped."""
        found = (self.get_item(i) for i in ids)
        return [item for item in found if item is not None]

    def _answered(self, rhash: bytes) -> bool:
        return self._conn.execute(
            "SELECT 1 FROM items WHERE receipt_hash = ? AND kind = 'receipt' LIMIT 1", (rhash,),
        ).fetchone() is not None

    def _kind_of(self, item_id: bytes) -> str | None:
        row = self._conn.execute("SELECT kind FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else cast(str, row[0])

    # ------------------------------------------------------------------ envelopes

    def add_envelope(
        self, env: Envelope, *, now: float, origin: str, local: bool = False,
    ) -> AddResult:
        """Store an envelope from ``origin`` (a neighbour's link key hex, or 'self').

        The caller has checked freshness and hop rules. Commits before returning
        (outside ``batch()``), so STORED/DUPLICATE/ANSWERED may be acknowledged.
        """
        eid = env.id
        with self._tx():
            if self._kind_of(eid) is not None:
                return AddResult.DUPLICATE
            if env.ttl_left_s <= 0:
                return AddResult.EXPIRED
            if self._answered(env.receipt_hash):
                # Nothing is stored, not even a tombstone: anyone who has seen a receipt
                # could otherwise mint endless envelopes under its hash, each one a
                # permanent, quota-free id in every peer's sync set.
                return AddResult.ANSWERED
            bits = env.stamp_bits
            if not local:
                victims = self._plan_room(env.size, origin, (bits, env.created_min), now)
                if victims is None:
                    return AddResult.REFUSED_QUOTA
                for victim in victims:
                    self._evict(victim)
            self._insert_item(
                eid, ItemKind.ENVELOPE, env.created_min, env.to_bytes(), env.size,
                env.receipt_hash, now + env.ttl_left_s, env.dedup_until(), env.hops_left, bits,
                origin, local, now,
            )
            return AddResult.STORED

    def _insert_item(
        self, item_id: bytes, kind: ItemKind, ts: int, data: bytes | None, size: int,
        rhash: bytes | None, expires_at: float, dedup_until: float, hops_left: int,
        stamp_bits: int, origin: str, local: bool, now: float,
    ) -> None:
        self._conn.execute(
            "INSERT INTO items (id, kind, ts, data, size, receipt_hash, expires_at, "
            "dedup_until, hops_left, stamp_bits, origin, local, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (item_id, str(kind), ts, data, size, rhash, expires_at, dedup_until, hops_left,
             stamp_bits, origin, int(local), now),
        )

    def delete_envelope(self, item_id: bytes, *, now: float) -> bool:
        """Drop an envelope's bytes but remember its id (e.g. we are the recipient and
        have read it). Returns False if no envelope with that id is held."""
        with self._tx():
            return self._tombstone(item_id, now)

    def add_tombstone(self, env: Envelope, *, now: float) -> bool:
        """Remember an envelope's id without ever holding its bytes (we are its recipient
        and have read it), until its dedup time. False if the id is already known."""
        with self._tx():
            if self._kind_of(env.id) is not None or env.dedup_until() <= now:
                return False
            self._insert_item(
                env.id, ItemKind.TOMBSTONE, env.created_min, None, 0, None, env.dedup_until(),
                env.dedup_until(), env.hops_left, env.stamp_bits, ORIGIN_SELF, True, now,
            )
            return True

    def _evict(self, item_id: bytes) -> None:
        """Quota eviction forgets the id entirely, unlike delivery or expiry.

        A tombstone stays in the reconciliation set, so a flooder that pushes 100,000
        junk envelopes through its share would otherwise leave 100,000 ids that every
        later peer has to reconcile against (measured: a 5-message honest sync then took
        over a minute). Forgetting costs at most a re-offer of the same envelope by a
        peer that still holds it, which lands in that peer's own share again.
        """
        self._conn.execute("DELETE FROM items WHERE id = ? AND kind = 'envelope'", (item_id,))

    def _tombstone(self, item_id: bytes, now: float) -> bool:
        """Envelope -> tombstone until its dedup time (deleted outright if that passed)."""
        changed = self._conn.execute(
            _TOMBSTONE_SET + "WHERE id = ? AND kind = 'envelope'", (item_id,)
        ).rowcount > 0
        self._conn.execute(
            "DELETE FROM items WHERE id = ? AND kind = 'tombstone' AND expires_at <= ?",
            (item_id, now),
        )
        return changed

    # ------------------------------------------------------------------ receipts

    def add_receipt(self, receipt: Receipt, *, now: float,
                    origin: str = "") -> tuple[bool, list[bytes]]:
        """Store a receipt and tombstone the envelopes it answers.

        Returns (whether the receipt was new, ids of the envelopes purged). The caller
        has checked freshness. ``origin`` (a neighbour, as for envelopes) is held to
        ``receipts_per_origin`` receipts; ours and unattributed ones are not capped.
        """
        rid, answers = receipt.id, receipt.answers
        with self._tx():
            # One receipt per answered hash: a re-sent copy with another issued_min (anyone
            # who saw the secret can make those) is refused rather than stored again.
            if self._kind_of(rid) is not None or self._answered(answers):
                return False, []
            data = receipt.to_bytes()
            keep = receipt.keep_until()
            self._insert_item(
                rid, ItemKind.RECEIPT, receipt.issued_min, data, len(data), answers, keep, keep,
                0, 0, origin, False, now,
            )
            if origin not in ("", ORIGIN_SELF):
                self._cap_receipts(origin, keep_id=rid)
            purged = [
                cast(bytes, r[0]) for r in self._conn.execute(
                    "SELECT id FROM items WHERE receipt_hash = ? AND kind = 'envelope' "
                    "ORDER BY id", (answers,),
                ).fetchall()
            ]
            for item_id in purged:
                self._tombstone(item_id, now)
            return True, purged

    def _cap_receipts(self, origin: str, keep_id: bytes) -> None:
        count = self._receipt_counts.get(origin)
        if count is None:
            count = self._count_receipts(origin) - 1
        count += 1
        if count > self.receipts_per_origin:
            count = self._count_receipts(origin)
            excess = count - self.receipts_per_origin
            if excess > 0:
                drop = excess + self.receipts_per_origin // 10
                count -= self._conn.execute(
                    "DELETE FROM items WHERE id IN (SELECT id FROM items "
                    "INDEXED BY items_receipt_origin WHERE kind = 'receipt' AND origin = ? "
                    "AND id != ? ORDER BY received_at LIMIT ?)", (origin, keep_id, drop),
                ).rowcount
        self._receipt_counts[origin] = count

    def _count_receipts(self, origin: str) -> int:
        row = self._conn.execute(
            "SELECT COUNT(*) FROM items INDEXED BY items_receipt_origin "
            "WHERE kind = 'receipt' AND origin = ?", (origin,),
        ).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ expiry & quota

    def sweep(self, now: float) -> int:
        """Expire envelopes (to tombstones) and delete expired receipts and tombstones.

        Returns how many rows changed. A tombstone whose dedup time already passed is
        deleted in the same sweep.
        """
        with self._tx():
            expired = self._conn.execute(
                _TOMBSTONE_SET + "WHERE kind = 'envelope' AND expires_at <= ?", (now,)
            ).rowcount
            deleted = 0
            for kind in (ItemKind.RECEIPT, ItemKind.TOMBSTONE):
                deleted += self._conn.execute(
                    "DELETE FROM items WHERE kind = ? AND expires_at <= ?", (str(kind), now)
                ).rowcount
            return expired + deleted

    def _usage(self, origin: str) -> int:
        row = self._conn.execute(
            "SELECT bytes FROM quota_usage WHERE origin = ?", (origin,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _plan_room(
        self, need: int, origin: str, rank: tuple[int, int], now: float,
    ) -> list[bytes] | None:
        """Ids to evict so ``need`` more bytes from ``origin`` fit, or None if impossible."""
        if need > self.neighbour_quota or need > self.quota_bytes:
            return None
        chosen: dict[bytes, int] = {}
        over_share = self._usage(origin) + need - self.neighbour_quota
        if over_share > 0 and self._pick(chosen, over_share, origin, rank, now) < over_share:
            return None
        over_total = self._usage(_TOTAL) + need - self.quota_bytes - sum(chosen.values())
        if over_total > 0 and self._pick(chosen, over_total, None, rank, now) < over_total:
            return None
        return list(chosen)

    def _pick(
        self, chosen: dict[bytes, int], amount: int, origin: str | None,
        rank: tuple[int, int], now: float,
    ) -> int:
        """Add victims to ``chosen`` until ``amount`` bytes are freed; returns bytes freed."""
        freed = 0
        for item_id, size in self._candidates(origin, rank, now):
            if item_id in chosen:
                continue
            chosen[item_id] = size
            freed += size
            if freed >= amount:
                break
        return freed

    def _candidates(
        self, origin: str | None, rank: tuple[int, int], now: float,
    ) -> Iterator[tuple[bytes, int]]:
        """Non-local envelopes in eviction order (DESIGN section 6), lazily.

        1. expired; 2. answered by a held receipt: always empty, because the invariant
        (see the module docstring, and ``_repair_answered`` at open) purges those the
        moment the receipt arrives; a join here would cost O(store) per eviction;
        3. lowest priority, but only those ranked at or below the newcomer (``rank``).
        """
        where = "" if origin is None else " AND e.origin = ?"
        args: tuple[Any, ...] = () if origin is None else (origin,)
        queries: list[tuple[str, tuple[Any, ...]]] = [
            ("SELECT e.id, e.size FROM items AS e INDEXED BY items_kind_expires "
             "WHERE e.kind = 'envelope' AND e.local = 0 "
             "AND e.expires_at <= ?" + where + " ORDER BY e.expires_at, e.id", (now, *args)),
            # INDEXED BY: without ANALYZE statistics the planner prefers items_kind_expires
            # and sorts every envelope; the partial index walks victims in order instead.
            ("SELECT e.id, e.size FROM items AS e INDEXED BY "
             + ("items_evict_all" if origin is None else "items_evict_origin")
             + " WHERE e.kind = 'envelope' AND e.local = 0" + where
             + " AND (e.stamp_bits, e.ts) <= (?, ?) ORDER BY e.stamp_bits, e.ts, e.id",
             (*args, *rank)),
        ]
        for sql, params in queries:
            cur = self._conn.execute(sql, params)
            try:
                for row in cur:  # steps one row at a time: usually one or two are needed
                    yield cast(bytes, row[0]), int(row[1])
            finally:
                cur.close()

    # ------------------------------------------------------------------ stats

    def stats(self) -> StoreStats:
        counts: dict[tuple[str, int], tuple[int, int]] = {}
        for kind, local, n, total in self._conn.execute(
            "SELECT kind, local, COUNT(*), COALESCE(SUM(size), 0) FROM items GROUP BY kind, local"
        ):
            counts[(kind, int(local))] = (int(n), int(total))

        def get(kind: str, local: int) -> tuple[int, int]:
            return counts.get((kind, local), (0, 0))

        env_remote, env_local = get("envelope", 0), get("envelope", 1)
        per_origin = {
            str(o): int(b) for o, b in self._conn.execute(
                "SELECT origin, bytes FROM quota_usage WHERE origin <> ? AND bytes > 0 "
                "ORDER BY origin", (_TOTAL,),
            )
        }
        return StoreStats(
            envelopes=env_remote[0] + env_local[0],
            bytes=env_remote[1] + env_local[1],
            receipts=get("receipt", 0)[0] + get("receipt", 1)[0],
            tombstones=get("tombstone", 0)[0] + get("tombstone", 1)[0],
            local_envelopes=env_local[0],
            quota_used=self._usage(_TOTAL),
            per_origin=per_origin,
        )
