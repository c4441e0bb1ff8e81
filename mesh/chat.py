"""Messenger operations on a profile's store: contacts, channels, conversations, sending.

They take a ``Store`` and an ``Identity`` and no runtime, so the node uses them while it
runs and the CLI uses them directly when no node runs on the profile. Everything a person
typed is validated here with a ``UserError`` that says what to do.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh import api, sealing
from mesh.envelope import DEFAULT_HOPS, DEFAULT_TTL_S, Envelope, receipt_hash
from mesh.errors import UserError
from mesh.identity import (
    Identity,
    PublicIdentity,
    decode_contact,
    encode_contact,
    public_identity,
)
from mesh.store import Store

PUBLIC = sealing.PUBLIC_CHANNEL.name
#: The public channel is open to anyone; a stranger (not a contact) gets this many
#: messages per hour shown before the rest are dropped as spam.
PUBLIC_RATE_PER_HOUR = 10
_READ_PREFIX = "read:"


class KeyChangedError(UserError):
    """A contact code for a saved name carries a different key: maybe a man in the middle."""


def channel_conversation(name: str) -> str:
    return f"#{name}"


def stranger_label(sender: PublicIdentity, claimed: str) -> str:
    """How an unknown sender is shown: their claim, marked, plus a piece of their key."""
    return f"~{claimed} ({sender.node_id.hex()[:8]})"


def _clean(name: str, what: str) -> str:
    clean = name.strip()
    if not clean or len(clean) > 64 or any(ord(c) < 32 or ord(c) == 127 for c in clean):
        raise UserError(f"{what} names are 1-64 printable characters")
    if clean.startswith(("#", "~")):
        raise UserError(f"{what} names cannot start with '#' or '~'")
    return clean


def identity_info(identity: Identity) -> dict[str, str]:
    """What `pigeon id` shows and the control socket's ``id`` op returns."""
    return {"node_id": identity.public.node_id.hex(), "name": identity.name,
            "fingerprint": identity.public.fingerprint,
            "contact": encode_contact(identity.public, identity.name)}


def _contact_info(name: str, sign_pub: bytes, verified: bool) -> api.ContactInfo:
    public = public_identity(sign_pub)
    return api.ContactInfo(name=name, node_id=public.node_id.hex(),
                           fingerprint=public.fingerprint, verified=verified)


# ---- contacts -----------------------------------------------------------------------


def add_contact(store: Store, name: str, code: str, *, now: float) -> api.ContactInfo:
    """Save a contact from their code. Re-adding the same key is harmless; a different key
    under a saved name is refused loudly (``KeyChangedError``), never accepted silently."""
    public, _claimed = decode_contact(code)
    clean = _clean(name, "contact")
    existing = store.contact_by_name(clean)
    if existing is not None:
        if existing.sign_pub == public.sign_pub:
            return _contact_info(existing.name, existing.sign_pub, existing.verified)
        raise KeyChangedError(
            f"the code for {existing.name!r} carries a DIFFERENT KEY than the one saved. "
            "This can be a man-in-the-middle attack. Compare fingerprints in person "
            "before replacing it (pigeon contacts replace).")
    store.contact_add(clean, public.sign_pub, now=now)
    return _contact_info(clean, public.sign_pub, False)


def replace_contact_key(store: Store, name: str, code: str) -> api.ContactInfo:
    """The explicit, confirmed path after a key change: new key, verification reset."""
    public, _ = decode_contact(code)
    contact = store.contact_by_name(name)
    if contact is None:
        raise UserError(f"no contact named {name!r}")
    store.contact_replace_key(contact.name, public.sign_pub)
    return _contact_info(contact.name, public.sign_pub, False)


def verify_contact(store: Store, name: str, verified: bool = True) -> None:
    store.contact_set_verified(name, verified)


def list_contacts(store: Store) -> list[api.ContactInfo]:
    return [_contact_info(r.name, r.sign_pub, r.verified) for r in store.contact_list()]


# ---- channels -------------------------------------------------------------------------


def join_channel(store: Store, name: str | None = None, *, passphrase: str | None = None,
                 invite: str | None = None, now: float) -> api.ChannelInfo:
    """Join (or create: the same thing) a channel by passphrase or by invite code."""
    return save_channel(store, channel_key_for(name, passphrase=passphrase, invite=invite),
                        now=now)


def channel_key_for(name: str | None = None, *, passphrase: str | None = None,
                    invite: str | None = None) -> sealing.ChannelKey:
    """The channel's key from an invite, or from name + passphrase (Argon2id: seconds of
    work and hundreds of MB, so a running node calls this off its event loop)."""
    if invite:
        channel = sealing.channel_from_invite(invite)
        if name:
            channel = sealing.ChannelKey(name=_clean(name, "channel"), key=channel.key)
    elif passphrase and name:
        channel = sealing.channel_from_passphrase(_clean(name, "channel"), passphrase)
    else:
        raise UserError("join a channel with a name and a passphrase, or with an invite code")
    return channel


def save_channel(store: Store, channel: sealing.ChannelKey, *, now: float) -> api.ChannelInfo:
    if channel.name.lower() == PUBLIC:
        raise UserError("the public channel is always joined")
    store.channel_add(channel.name, channel.key, now=now)
    return api.ChannelInfo(name=channel.name, invite=sealing.make_invite(channel), public=False)


def channel_keys(store: Store) -> list[sealing.ChannelKey]:
    rows = [sealing.ChannelKey(name=r.name, key=r.key) for r in store.channel_list()]
    return [sealing.PUBLIC_CHANNEL, *rows]


def list_channels(store: Store) -> list[api.ChannelInfo]:
    return [api.ChannelInfo(name=c.name, invite=sealing.make_invite(c), public=c.name == PUBLIC)
            for c in channel_keys(store)]


# ---- sending --------------------------------------------------------------------------


def _seal_kwargs(now: float, ttl_s: int, hops: int | None) -> dict[str, Any]:
    """A sender's first copy would otherwise stand out to its neighbour: the default hop
    count and an untouched lifetime. Starting a few hops lower (random) makes a fresh
    envelope look like one already relayed a hop or three."""
    kwargs: dict[str, Any] = {"now": now, "ttl_s": ttl_s}
    kwargs["hops"] = hops if hops is not None else DEFAULT_HOPS - secrets.randbelow(4)
    return kwargs


@dataclass(frozen=True)
class SealedMessage:
    """A message sealed for sending but not stored yet (see ``store_sealed``)."""

    msg_id: str
    envelope: Envelope
    label: str
    text: str
    receipt_hash: bytes | None
    now: float


def seal_message(store: Store, identity: Identity, conversation: str, text: str, *,
                 now: float, ttl_s: int = DEFAULT_TTL_S, hops: int | None = None,
                 ) -> SealedMessage:
    """Seal a message to a contact (``name``) or a channel (``#name``); stores nothing.

    Every ``UserError`` (unknown contact, empty or too long text) is raised here, so a
    caller that stores many sealed messages in one transaction only fails on disk errors.
    """
    if not text.strip():
        raise UserError("empty message")
    if conversation.startswith("#"):
        wanted = conversation[1:].lower()
        channel = next((c for c in channel_keys(store) if c.name.lower() == wanted), None)
        if channel is None:
            raise UserError(f"not a member of channel {conversation!r}")
        env = sealing.seal_channel(identity, channel, text, **_seal_kwargs(now, ttl_s, hops))
        rhash: bytes | None = None
        label = channel_conversation(channel.name)
    else:
        contact = store.contact_by_name(conversation)
        if contact is None:
            raise UserError(f"no contact named {conversation!r}; add one with 'pigeon contacts add'")
        recipient = public_identity(contact.sign_pub)
        env, secret = sealing.seal_direct(identity, recipient, text,
                                          **_seal_kwargs(now, ttl_s, hops))
        rhash = receipt_hash(secret)
        label = contact.name
    return SealedMessage(msg_id=env.id.hex(), envelope=env, label=label, text=text,
                         receipt_hash=rhash, now=now)


def store_sealed(store: Store, batch: Sequence[SealedMessage]) -> None:
    """Write sealed messages to the sync set and the outbox in one durable transaction
    (one fsync for a whole burst); on disk trouble nothing is stored and ``UserError``
    says so."""
    try:
        with store.batch():
            for sealed in batch:
                store.add_envelope(sealed.envelope, now=sealed.now, origin="self", local=True)
                store.outbox_add(sealed.msg_id, contact=sealed.label, text=sealed.text,
                                 now=sealed.now, receipt_hash=sealed.receipt_hash)
    except sqlite3.Error as exc:
        raise UserError(f"could not save the message ({exc}); is the disk full?") from None


def queue_message(store: Store, identity: Identity, conversation: str, text: str, *,
                  now: float, ttl_s: int = DEFAULT_TTL_S, hops: int | None = None,
                  ) -> tuple[str, Envelope]:
    """Seal and store a message to a contact (``name``) or a channel (``#name``)."""
    sealed = seal_message(store, identity, conversation, text, now=now, ttl_s=ttl_s, hops=hops)
    store_sealed(store, [sealed])
    return sealed.msg_id, sealed.envelope


# ---- reading ----------------------------------------------------------------------------


def list_inbox(store: Store) -> list[api.InboxMessage]:
    verified = {c.sign_pub for c in store.contact_list() if c.verified}
    return [
        api.InboxMessage(
            id=r.msg_id, conversation=r.conversation, sender=r.sender_name, text=r.text,
            sent_at=r.sent_at, received_at=r.received_at, kind=r.kind,
            verified_sender=r.sender_key in verified,
        )
        for r in store.inbox_list()
    ]


def list_outbox(store: Store) -> list[api.OutboxMessage]:
    return [api.OutboxMessage(id=r.msg_id, to=r.contact, text=r.text, state=r.state,
                              created_at=r.created_at) for r in store.outbox_list()]


def conversation_messages(store: Store, conversation: str) -> list[api.ChatMessage]:
    """One conversation, both directions, in the order this device saw them."""
    verified = {c.sign_pub for c in store.contact_list() if c.verified}
    out = [api.ChatMessage(id=r.msg_id, conversation=conversation, outgoing=False,
                           sender=r.sender_name, text=r.text, at=r.received_at,
                           sent_at=r.sent_at, state="", verified_sender=r.sender_key in verified)
           for r in store.inbox_list(conversation)]
    out += [api.ChatMessage(id=r.msg_id, conversation=conversation, outgoing=True, sender="",
                            text=r.text, at=r.created_at, sent_at=r.created_at, state=r.state,
                            verified_sender=True)
            for r in store.outbox_list(conversation)]
    return sorted(out, key=lambda m: m.at)


def mark_read(store: Store, conversation: str, now: float | None = None) -> None:
    store.meta_set(_READ_PREFIX + conversation, repr(time.time() if now is None else now))


def conversations(store: Store) -> list[api.ConversationInfo]:
    """Contacts, channels (public first) and strangers who wrote to us, with unread counts."""
    entries: dict[str, api.ConversationInfo] = {}

    def unread(conv: str) -> int:
        seen = float(store.meta_get(_READ_PREFIX + conv) or 0)
        return store.inbox_count(conv, since=seen)

    for ch in channel_keys(store):
        label = channel_conversation(ch.name)
        entries[label] = api.ConversationInfo(name=label, kind="channel", unread=unread(label),
                                              verified=False)
    for c in store.contact_list():
        entries[c.name] = api.ConversationInfo(name=c.name, kind="contact", unread=unread(c.name),
                                               verified=c.verified)
    for conv in store.inbox_conversations():
        if conv not in entries:
            entries[conv] = api.ConversationInfo(name=conv, kind="stranger",
                                                 unread=unread(conv), verified=False)
    return list(entries.values())
