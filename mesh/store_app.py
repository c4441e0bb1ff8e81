"""App tables of the store: outbox, inbox, contacts, channels and a small key/value meta.

Split from ``mesh.store`` (which owns the connection, transactions and the sync set) to
keep each file readable; ``Store`` mixes this class in. These tables are what a person
sees, so the rules here are about never confusing them: a message is shown once
(``inbox_add`` is idempotent), delivery state only moves forward, and names and keys of
contacts are unique with a clear ``UserError`` otherwise.

Message ids are the 16-byte envelope ids. Methods accept them as ``bytes`` or as a
32-character hex string; every row returns them as lowercase hex (``msg_id: str``), the
form the CLI, the control socket and ``--json`` output use.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, cast

from mesh.errors import LocalProtocolError, UserError

OutboxState = Literal["queued", "relayed", "delivered"]
InboxKind = Literal["direct", "channel"]
#: Delivery states in the only order they may be reached.
OUTBOX_STATES: tuple[OutboxState, ...] = ("queued", "relayed", "delivered")
MSG_ID_LEN = 16

APP_SCHEMA = """
CREATE TABLE outbox (
    msg_id BLOB PRIMARY KEY NOT NULL CHECK (length(msg_id) = 16),
    contact TEXT NOT NULL,
    text TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'relayed', 'delivered')),
    created_at REAL NOT NULL,
    receipt_hash BLOB,
    updated_at REAL NOT NULL
);
CREATE INDEX outbox_receipt_hash ON outbox (receipt_hash) WHERE receipt_hash IS NOT NULL;
CREATE INDEX outbox_contact ON outbox (contact, created_at);

CREATE TABLE inbox (
    msg_id BLOB PRIMARY KEY NOT NULL CHECK (length(msg_id) = 16),
    conversation TEXT NOT NULL,
    sender_key BLOB NOT NULL,
    sender_name TEXT NOT NULL,
    text TEXT NOT NULL,
    sent_at REAL NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('direct', 'channel'))
);
CREATE INDEX inbox_conversation ON inbox (conversation, received_at);

CREATE TABLE contacts (
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    sign_pub BLOB NOT NULL UNIQUE,
    verified INTEGER NOT NULL DEFAULT 0,
    added_at REAL NOT NULL
);

CREATE TABLE channels (
    name TEXT NOT NULL UNIQUE COLLATE NOCASE,
    key BLOB NOT NULL UNIQUE,
    added_at REAL NOT NULL
);

CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class OutboxEntry:
    """A message we sent. ``contact`` is the conversation it belongs to (a contact name,
    or whatever conversation key the node uses for channels)."""

    msg_id: str
    contact: str
    text: str
    state: OutboxState
    created_at: float
    receipt_hash: bytes | None
    updated_at: float


@dataclass(frozen=True)
class InboxEntry:
    msg_id: str
    conversation: str
    sender_key: bytes  # Ed25519 public key
    sender_name: str  # the name the sender claims inside the sealed message
    text: str
    sent_at: float  # the sender's clock: display only, never trusted for ordering
    received_at: float  # our clock: the order messages are listed in
    kind: InboxKind


@dataclass(frozen=True)
class Contact:
    name: str
    sign_pub: bytes
    verified: bool
    added_at: float


@dataclass(frozen=True)
class ChannelRow:
    name: str
    key: bytes
    added_at: float


def msg_id_bytes(msg_id: bytes | str) -> bytes:
    """Normalise a message id given as bytes or hex; raises ``LocalProtocolError``."""
    if isinstance(msg_id, str):
        try:
            raw = bytes.fromhex(msg_id)
        except ValueError:
            raise LocalProtocolError("message id is not hex") from None
    else:
        raw = bytes(msg_id)
    if len(raw) != MSG_ID_LEN:
        raise LocalProtocolError(f"message id must be {MSG_ID_LEN} bytes")
    return raw


def _clean_name(name: str, what: str) -> str:
    cleaned = name.strip()
    if not cleaned:
        raise UserError(f"a {what} name cannot be empty")
    return cleaned


def _outbox(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(
        msg_id=cast(bytes, row[0]).hex(), contact=row[1], text=row[2], state=row[3],
        created_at=row[4], receipt_hash=row[5], updated_at=row[6],
    )


def _inbox(row: tuple[Any, ...]) -> InboxEntry:
    return InboxEntry(
        msg_id=cast(bytes, row[0]).hex(), conversation=row[1], sender_key=row[2],
        sender_name=row[3], text=row[4], sent_at=row[5], received_at=row[6], kind=row[7],
    )


def _contact(row: tuple[Any, ...]) -> Contact:
    return Contact(name=row[0], sign_pub=row[1], verified=bool(row[2]), added_at=row[3])


_OUTBOX_COLS = "msg_id, contact, text, state, created_at, receipt_hash, updated_at"
_INBOX_COLS = "msg_id, conversation, sender_key, sender_name, text, sent_at, received_at, kind"
_CONTACT_COLS = "name, sign_pub, verified, added_at"


class AppTablesMixin:
    """Methods over the app tables; ``mesh.store.Store`` supplies the connection."""

    _conn: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[None]:  # pragma: no cover - Store overrides
        raise NotImplementedError

    # ------------------------------------------------------------------ outbox

    def outbox_add(
        self, msg_id: bytes | str, *, contact: str, text: str, receipt_hash: bytes | None,
        now: float, state: OutboxState = "queued",
    ) -> bool:
        """Record a message we sent; False (and no change) if the id is already there."""
        if state not in OUTBOX_STATES:
            raise LocalProtocolError(f"unknown outbox state {state!r}")
        with self._tx():
            cur = self._conn.execute(
                f"INSERT OR IGNORE INTO outbox ({_OUTBOX_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (msg_id_bytes(msg_id), contact, text, state, now, receipt_hash, now),
            )
            return cur.rowcount > 0

    def outbox_set_state(self, msg_id: bytes | str, state: OutboxState, *, now: float) -> bool:
        """Advance delivery state; True if it changed. Never moves backward, so a late
        'relayed' after 'delivered' (events race across links) is ignored."""
        if state not in OUTBOX_STATES:
            raise LocalProtocolError(f"unknown outbox state {state!r}")
        rank = OUTBOX_STATES.index(state)
        with self._tx():
            cur = self._conn.execute(
                "UPDATE outbox SET state = ?, updated_at = ? WHERE msg_id = ? AND "
                "(CASE state WHEN 'queued' THEN 0 WHEN 'relayed' THEN 1 ELSE 2 END) < ?",
                (state, now, msg_id_bytes(msg_id), rank),
            )
            return cur.rowcount > 0

    def outbox_by_receipt_hash(self, receipt_hash: bytes) -> str | None:
        """The (hex) id of the message a receipt confirms, if it is ours."""
        row = self._conn.execute(
            "SELECT msg_id FROM outbox WHERE receipt_hash = ? ORDER BY created_at LIMIT 1",
            (receipt_hash,),
        ).fetchone()
        return None if row is None else cast(bytes, row[0]).hex()

    def outbox_get(self, msg_id: bytes | str) -> OutboxEntry | None:
        row = self._conn.execute(
            f"SELECT {_OUTBOX_COLS} FROM outbox WHERE msg_id = ?", (msg_id_bytes(msg_id),)
        ).fetchone()
        return None if row is None else _outbox(row)

    def outbox_list(self, contact: str | None = None) -> list[OutboxEntry]:
        """Sent messages, oldest first; all of them or one conversation's."""
        if contact is None:
            rows = self._conn.execute(
                f"SELECT {_OUTBOX_COLS} FROM outbox ORDER BY created_at, rowid"
            )
        else:
            rows = self._conn.execute(
                f"SELECT {_OUTBOX_COLS} FROM outbox WHERE contact = ? ORDER BY created_at, rowid",
                (contact,),
            )
        return [_outbox(r) for r in rows]

    # ------------------------------------------------------------------ inbox

    def inbox_add(
        self, msg_id: bytes | str, *, conversation: str, sender_key: bytes, sender_name: str,
        text: str, sent_at: float, received_at: float, kind: InboxKind,
    ) -> bool:
        """Record a received message; False if it is already there (never shown twice)."""
        if kind not in ("direct", "channel"):
            raise LocalProtocolError(f"unknown inbox kind {kind!r}")
        with self._tx():
            cur = self._conn.execute(
                f"INSERT OR IGNORE INTO inbox ({_INBOX_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (msg_id_bytes(msg_id), conversation, sender_key, sender_name, text, sent_at,
                 received_at, kind),
            )
            return cur.rowcount > 0

    def inbox_count(self, conversation: str, *, since: float,
                    sender_key: bytes | None = None) -> int:
        """Messages in one conversation received after ``since`` (optionally from one
        sender), counted in SQL: unread badges and rate limits need no message bodies."""
        if sender_key is None:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM inbox WHERE conversation = ? AND received_at > ?",
                (conversation, since),
            ).fetchone()
        else:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM inbox WHERE conversation = ? AND received_at > ? "
                "AND sender_key = ?", (conversation, since, bytes(sender_key)),
            ).fetchone()
        return int(row[0])

    def inbox_conversations(self) -> list[str]:
        """Every conversation that has received messages, in order of first arrival."""
        rows = self._conn.execute(
            "SELECT conversation FROM inbox GROUP BY conversation ORDER BY MIN(received_at)"
        )
        return [str(r[0]) for r in rows]

    def inbox_list(self, conversation: str | None = None) -> list[InboxEntry]:
        """Received messages in the order they arrived here."""
        if conversation is None:
            rows = self._conn.execute(
                f"SELECT {_INBOX_COLS} FROM inbox ORDER BY received_at, rowid"
            )
        else:
            rows = self._conn.execute(
                f"SELECT {_INBOX_COLS} FROM inbox WHERE conversation = ? "
                "ORDER BY received_at, rowid", (conversation,),
            )
        return [_inbox(r) for r in rows]

    # ------------------------------------------------------------------ contacts

    def contact_add(
        self, name: str, sign_pub: bytes, *, now: float, verified: bool = False,
    ) -> Contact:
        """Save a contact. Names are unique ignoring ASCII case, keys are unique."""
        name = _clean_name(name, "contact")
        with self._tx():
            if (other := self.contact_by_name(name)) is not None:
                raise UserError(f"a contact named {other.name!r} already exists")
            if (other := self.contact_by_key(sign_pub)) is not None:
                raise UserError(f"this key is already saved as contact {other.name!r}")
            self._conn.execute(
                f"INSERT INTO contacts ({_CONTACT_COLS}) VALUES (?, ?, ?, ?)",
                (name, bytes(sign_pub), int(verified), now),
            )
        return Contact(name=name, sign_pub=bytes(sign_pub), verified=verified, added_at=now)

    def contact_list(self) -> list[Contact]:
        rows = self._conn.execute(
            f"SELECT {_CONTACT_COLS} FROM contacts ORDER BY name COLLATE NOCASE"
        )
        return [_contact(r) for r in rows]

    def contact_by_name(self, name: str) -> Contact | None:
        row = self._conn.execute(
            f"SELECT {_CONTACT_COLS} FROM contacts WHERE name = ?", (name.strip(),)
        ).fetchone()
        return None if row is None else _contact(row)

    def contact_by_key(self, sign_pub: bytes) -> Contact | None:
        row = self._conn.execute(
            f"SELECT {_CONTACT_COLS} FROM contacts WHERE sign_pub = ?", (bytes(sign_pub),)
        ).fetchone()
        return None if row is None else _contact(row)

    def contact_set_verified(self, name: str, verified: bool = True) -> None:
        with self._tx():
            cur = self._conn.execute(
                "UPDATE contacts SET verified = ? WHERE name = ?", (int(verified), name.strip())
            )
            if cur.rowcount == 0:
                raise UserError(f"no contact named {name!r}")

    def contact_replace_key(self, name: str, sign_pub: bytes) -> None:
        """Give a contact a new key after the user confirmed a key change; resets verified."""
        with self._tx():
            if (other := self.contact_by_key(sign_pub)) is not None and other.name != name.strip():
                raise UserError(f"this key is already saved as contact {other.name!r}")
            cur = self._conn.execute(
                "UPDATE contacts SET sign_pub = ?, verified = 0 WHERE name = ?",
                (bytes(sign_pub), name.strip()),
            )
            if cur.rowcount == 0:
                raise UserError(f"no contact named {name!r}")

    def contact_remove(self, name: str) -> None:
        with self._tx():
            cur = self._conn.execute("DELETE FROM contacts WHERE name = ?", (name.strip(),))
            if cur.rowcount == 0:
                raise UserError(f"no contact named {name!r}")

    # ------------------------------------------------------------------ channels

    def channel_add(self, name: str, key: bytes, *, now: float) -> ChannelRow:
        """Join a channel. Names are unique ignoring ASCII case; so are keys, because
        one key under two names would show every message twice."""
        name = _clean_name(name, "channel")
        with self._tx():
            row = self._conn.execute(
                "SELECT name FROM channels WHERE name = ?", (name,)
            ).fetchone()
            if row is not None:
                raise UserError(f"a channel named {row[0]!r} already exists")
            row = self._conn.execute(
                "SELECT name FROM channels WHERE key = ?", (bytes(key),)
            ).fetchone()
            if row is not None:
                raise UserError(f"this channel is already joined as {row[0]!r}")
            self._conn.execute(
                "INSERT INTO channels (name, key, added_at) VALUES (?, ?, ?)",
                (name, bytes(key), now),
            )
        return ChannelRow(name=name, key=bytes(key), added_at=now)

    def channel_list(self) -> list[ChannelRow]:
        rows = self._conn.execute(
            "SELECT name, key, added_at FROM channels ORDER BY name COLLATE NOCASE"
        )
        return [ChannelRow(name=r[0], key=r[1], added_at=r[2]) for r in rows]

    # ------------------------------------------------------------------ meta

    def meta_get(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else cast(str, row[0])

    def meta_set(self, key: str, value: str) -> None:
        with self._tx():
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
