"""Plain data types of the node's public API: what the CLI, the TUI and the control
socket exchange. No behaviour here, so both sides of the control socket can import it
without pulling in the runtime; every type converts to and from JSON-safe dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Final, TypeVar

T = TypeVar("T")

STATE_QUEUED: Final = "queued"
STATE_RELAYED: Final = "relayed"
STATE_DELIVERED: Final = "delivered"
OUTBOX_STATES = (STATE_QUEUED, STATE_RELAYED, STATE_DELIVERED)


def to_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)


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


NodeEvent = MessageReceived | MessageStateChanged | PeerChanged
