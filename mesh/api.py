"""Plain data types of the node's public API: what the CLI, the TUI and the control
socket exchange. No behaviour here, so both sides of the control socket can import it
without pulling in the runtime; every type converts to and from JSON-safe dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Final, TypeVar

T = TypeVar("T")

STATE_QUEUED: Final = "queued"
STATE_RELAYED: Final = "relayed"
STATE_DELIVERED: Final = "delivered"
OUTBOX_STATES = (STATE_QUEUED, STATE_RELAYED, STATE_DELIVERED)


def to_dict(obj: Any) -> dict[str, Any]:
    """Shallow: every API type holds only JSON values (nested parts are already dicts and
    lists), and ``asdict``'s recursive deep copy cost more than the rest of publishing an
    event (profiled under a 1,000-message burst)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def from_dict(cls: type[T], data: Any) -> T:
    """Build a dataclass from a dict, ignoring unknown keys (newer peer on the socket)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects an object")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class InboxMessage:
    id: str
    conversation: str
    sender: str
    text: str
    sent_at: float
    received_at: float
    kind: str
    verified_sender: bool


@dataclass(frozen=True)
class OutboxMessage:
    id: str
    to: str
    text: str
    state: str
    created_at: float


@dataclass(frozen=True)
class ContactInfo:
    name: str
    node_id: str
    fingerprint: str
    verified: bool


@dataclass(frozen=True)
class ChannelInfo:
    name: str
    #: Invite code that lets someone else join; treat it like the passphrase.
    invite: str
    public: bool


@dataclass(frozen=True)
class ConversationInfo:
    """One entry of the conversation list: ``name`` is a contact name, ``#channel`` or a
    stranger's marked label (``~claimed (id)``); ``kind`` is contact|channel|stranger."""

    name: str
    kind: str
    unread: int
    verified: bool


@dataclass(frozen=True)
class ChatMessage:
    """A message in a conversation, either direction. ``at`` is this device's clock
    (display order); ``sent_at`` is the sender's claim; ``state`` only for outgoing."""

    id: str
    conversation: str
    outgoing: bool
    sender: str
    text: str
    at: float
    sent_at: float
    state: str
    verified_sender: bool


@dataclass(frozen=True)
class PeerInfo:
    link_key: str
    transport: str
    address: str
    state: str
    connected_at: float
    sent: int
    received: int
    to_send: int
    to_receive: int


@dataclass(frozen=True)
class Status:
    node_id: str
    name: str
    envelopes: int
    bytes: int
    receipts: int
    carried_for_others: int
    peers: list[dict[str, Any]]
    listening: list[str]
    uptime: float
    #: Optional transports and what they do now, e.g. {"ble": "off: no Bluetooth adapter"}.
    transports: dict[str, str] = field(default_factory=dict)


# ---- events the node publishes ----------------------------------------------------


@dataclass(frozen=True)
class MessageReceived:
    message: dict[str, Any]
    type: str = "message_received"


@dataclass(frozen=True)
class MessageStateChanged:
    id: str
    state: str
    type: str = "message_state"


@dataclass(frozen=True)
class PeerChanged:
    peer: dict[str, Any]
    connected: bool
    type: str = "peer"


@dataclass(frozen=True)
class KeyWarning:
    """Someone whose key is not the saved one claims a contact's name: a possible
    impersonation or man in the middle, shown loudly, never merged silently."""

    contact: str
    claimed_by: str
    fingerprint: str
    type: str = "key_warning"


NodeEvent = MessageReceived | MessageStateChanged | PeerChanged | KeyWarning


def event_from_dict(data: Any) -> NodeEvent:
    """Rebuild an event sent over the control socket; ValueError if it is not one."""
    kinds: dict[str, type[Any]] = {"message_received": MessageReceived,
                                    "message_state": MessageStateChanged, "peer": PeerChanged,
                                    "key_warning": KeyWarning}
    if not isinstance(data, dict) or data.get("type") not in kinds:
        raise ValueError("not a node event")
    event: NodeEvent = from_dict(kinds[data["type"]], data)
    return event
