"""Frames exchanged inside an encrypted link, and the only place msgpack is used.

Every other module sees the typed frame classes below. Decoding is strict: the
``msgpack.Unpacker`` runs with explicit limits on buffer, bin, str, array and map sizes
(maps are not used at all), the nesting depth is bounded by msgpack's own stack and then
by the schema check, and any deviation raises ``RemoteProtocolError`` so the session
closes just that link.

A frame is a msgpack array ``[type, field, ...]``. Inside a Noise transport message the
plaintext is ``u16 length || frame || zero padding`` so every encrypted frame on the wire
has one of a few bucket sizes (see ``pad_plaintext``). ``docs/protocol.md`` lists every
frame with its fields.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from mesh.errors import RemoteProtocolError
from mesh.reconcile import ReconcileMessage, decode_message, encode_message

#: 2: a Reconcile frame carries its ranges as one byte string (docs/protocol.md section 7.4),
#: fingerprints carry counts, and a DIFF mode answers lists; version 1 peers cannot reconcile.
PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 2
MAGIC = b"PGN"

#: Largest Noise message (the Noise limit); the plaintext inside loses a 16-byte tag.
MAX_NOISE_MESSAGE = 65535
MAX_PLAINTEXT = MAX_NOISE_MESSAGE - 16
MAX_FRAME = MAX_PLAINTEXT - 2
MAX_IDS_PER_FRAME = 3000
MAX_ITEMS_PER_FRAME = 4096
MAX_REASON_LEN = 120
ID_LEN = 16

#: Smallest padded plaintext: every control frame (Ack of a few ids, Ping, Idle, a receipt)
#: looks the same. Above it, Padmé (see ``padded_length``).
MIN_PADDED = 64
_LEN = struct.Struct("!H")


class FrameType:
    HELLO = 1
    RECONCILE = 2
    WANT = 3
    ITEMS = 4
    ACK = 5
    PLAN = 6
    IDLE = 7
    PING = 8
    PONG = 9
    CLOSE = 10


class ItemKind:
    ENVELOPE = 1
    RECEIPT = 2


@dataclass(frozen=True, kw_only=True)
class Hello:
    """Carried in the Noise handshake payloads; says what this side speaks."""

    version: int
    max_frame: int
    #: Bit flags; 1 = this node relays for others.
    features: int = 0


@dataclass(frozen=True, kw_only=True)
class Reconcile:
    """One round of range-based reconciliation; an empty ``message`` means "I am done"."""

    message: ReconcileMessage


@dataclass(frozen=True, kw_only=True)
class Want:
    """Ids the sender lacks and asks the receiver to push."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True)
class Items:
    """Envelopes and receipts, each as ``(ItemKind, bytes)``, parsed by the session."""

    items: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, kw_only=True)
class Ack:
    """Ids the sender has handled: ``ids`` are committed to its disk, ``refused`` were
    dropped on purpose (quota, stale). Either way they are not resent on this link; only
    ``ids`` count as "handed to a relay" for the sender's outbox."""

    ids: tuple[bytes, ...]
    refused: tuple[bytes, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How much the sender is about to push after reconciliation (for progress display)."""

    count: int
    size: int


@dataclass(frozen=True, kw_only=True)
class Idle:
    """The sender's push queue is empty and everything it pushed was acknowledged.

    ``wants_seen`` counts the Want frames it had processed, so the receiver can tell an
    Idle sent before its Want arrived from one sent after serving it."""

    wants_seen: int


@dataclass(frozen=True, kw_only=True)
class Ping:
    nonce: int


@dataclass(frozen=True, kw_only=True)
class Pong:
    nonce: int


@dataclass(frozen=True, kw_only=True)
class Close:
    """A courtesy before closing; ``reason`` is untrusted text, bounded and logged escaped."""

    reason: str


Frame = Hello | Reconcile | Want | Items | Ack | Plan | Idle | Ping | Pong | Close


def _fields(frame: Frame) -> list[Any]:
    if isinstance(frame, Hello):
        return [FrameType.HELLO, frame.version, frame.max_frame, frame.features]
    if isinstance(frame, Reconcile):
        return [FrameType.RECONCILE, encode_message(frame.message)]
    if isinstance(frame, Want):
        return [FrameType.WANT, list(frame.ids)]
    if isinstance(frame, Items):
        return [FrameType.ITEMS, [[kind, data] for kind, data in frame.items]]
    if isinstance(frame, Ack):
        return [FrameType.ACK, list(frame.ids), list(frame.refused)]
    if isinstance(frame, Plan):
        return [FrameType.PLAN, frame.count, frame.size]
    if isinstance(frame, Idle):
        return [FrameType.IDLE, frame.wants_seen]
    if isinstance(frame, Ping):
        return [FrameType.PING, frame.nonce]
    if isinstance(frame, Pong):
        return [FrameType.PONG, frame.nonce]
    return [FrameType.CLOSE, frame.reason[:MAX_REASON_LEN]]


def encode_frame(frame: Frame) -> bytes:
    data: bytes = msgpack.packb(_fields(frame), use_bin_type=True)
    return data


# Fixed msgpack overheads, used by the session to fill frames without re-encoding.
ITEMS_FRAME_OVERHEAD = 8
ITEM_OVERHEAD = 6
IDS_FRAME_OVERHEAD = 8
ID_OVERHEAD = 2 + ID_LEN


def _unpack(data: bytes) -> Any:
    if len(data) > MAX_FRAME:
        raise RemoteProtocolError("frame too large")
    unpacker = msgpack.Unpacker(
        max_buffer_size=MAX_FRAME,
        max_bin_len=MAX_FRAME,
        max_str_len=MAX_REASON_LEN * 4,
        max_array_len=max(MAX_IDS_PER_FRAME, MAX_ITEMS_PER_FRAME),
        max_map_len=0,
        max_ext_len=0,
        use_list=True,
        raw=False,
        strict_map_key=True,
    )
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        raise RemoteProtocolError("frame truncated") from None
    except Exception as exc:  # msgpack raises several ValueError/StackError subclasses
        raise RemoteProtocolError(f"frame undecodable ({type(exc).__name__})") from None
    if unpacker.tell() != len(data):
        raise RemoteProtocolError("trailing bytes after frame")
    return obj


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RemoteProtocolError(f"{what} out of range")
    return value


def _bytes(value: Any, what: str, exact: int | None = None, max_len: int = MAX_FRAME) -> bytes:
    if not isinstance(value, bytes):
        raise RemoteProtocolError(f"{what} is not bytes")
    if exact is not None and len(value) != exact:
        raise RemoteProtocolError(f"{what} has the wrong length")
    if len(value) > max_len:
        raise RemoteProtocolError(f"{what} too long")
    return value


def _list(value: Any, what: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise RemoteProtocolError(f"{what} is not a list")
    if len(value) > max_len:
        raise RemoteProtocolError(f"{what} too long")
    return value


def _ids(value: Any, what: str) -> tuple[bytes, ...]:
    return tuple(_bytes(v, what, exact=ID_LEN) for v in _list(value, what, MAX_IDS_PER_FRAME))


def _expect_len(fields: list[Any], n: int, name: str) -> None:
    if len(fields) != n:
        raise RemoteProtocolError(f"{name} frame has the wrong number of fields")


def decode_frame(data: bytes) -> Frame:
    """Decode one frame from a peer; raises ``RemoteProtocolError`` on anything off-schema."""
    obj = _unpack(data)
    fields = _list(obj, "frame", 8)
    if not fields:
        raise RemoteProtocolError("empty frame")
    ftype = _int(fields[0], 0, 255, "frame type")
    if ftype == FrameType.HELLO:
        _expect_len(fields, 4, "hello")
        return Hello(
            version=_int(fields[1], 0, 255, "version"),
            max_frame=_int(fields[2], 64, MAX_NOISE_MESSAGE, "max frame"),
            features=_int(fields[3], 0, 0xFFFF, "features"),
        )
    if ftype == FrameType.RECONCILE:
        _expect_len(fields, 2, "reconcile")
        return Reconcile(message=decode_message(_bytes(fields[1], "reconcile message")))
    if ftype == FrameType.WANT:
        _expect_len(fields, 2, "want")
        return Want(ids=_ids(fields[1], "wanted ids"))
    if ftype == FrameType.ITEMS:
        _expect_len(fields, 2, "items")
        items = []
        for entry in _list(fields[1], "items", MAX_ITEMS_PER_FRAME):
            pair = _list(entry, "item", 2)
            if len(pair) != 2:
                raise RemoteProtocolError("item has the wrong shape")
            kind = _int(pair[0], ItemKind.ENVELOPE, ItemKind.RECEIPT, "item kind")
            items.append((kind, _bytes(pair[1], "item body")))
        return Items(items=tuple(items))
    if ftype == FrameType.ACK:
        _expect_len(fields, 3, "ack")
        return Ack(ids=_ids(fields[1], "acked ids"), refused=_ids(fields[2], "refused ids"))
    if ftype == FrameType.PLAN:
        _expect_len(fields, 3, "plan")
        return Plan(
            count=_int(fields[1], 0, 2**32 - 1, "plan count"),
            size=_int(fields[2], 0, 2**48, "plan size"),
        )
    if ftype == FrameType.IDLE:
        _expect_len(fields, 2, "idle")
        return Idle(wants_seen=_int(fields[1], 0, 2**32 - 1, "wants seen"))
    if ftype in (FrameType.PING, FrameType.PONG):
        _expect_len(fields, 2, "ping")
        nonce = _int(fields[1], 0, 2**32 - 1, "ping nonce")
        return Ping(nonce=nonce) if ftype == FrameType.PING else Pong(nonce=nonce)
    if ftype == FrameType.CLOSE:
        _expect_len(fields, 2, "close")
        reason = fields[1]
        if not isinstance(reason, str):
            raise RemoteProtocolError("close reason is not text")
        return Close(reason=reason[:MAX_REASON_LEN])
    raise RemoteProtocolError(f"unknown frame type {ftype}")


def padded_length(length: int) -> int:
    """The plaintext length a frame of ``length`` bytes (prefix included) is padded to.

    At least ``MIN_PADDED``; above it Padmé (Nikitin et al., "Reducing metadata leakage
    from encrypted files and communication with PURBs", PETS 2019): keep the top
    ``floor(log2 E) + 1`` bits of the length, ``E = floor(log2 length)``, and round the
    rest up. A length then reveals O(log log L) bits and costs at most ~12 % padding
    (the earlier powers of two cost up to 100 %: a 100-byte message went out as a 512-byte
    record). Envelopes are already padded to size classes by ``mesh.sealing``; this layer
    only has to blur how many items, acks or ranges a frame holds.
    """
    if length <= MIN_PADDED:
        return MIN_PADDED
    exponent = length.bit_length() - 1
    low_bits = exponent - exponent.bit_length()  # E - (floor(log2 E) + 1)
    mask = (1 << low_bits) - 1
    return min((length + mask) & ~mask, MAX_PLAINTEXT)


def pad_plaintext(frame_bytes: bytes) -> bytes:
    """Length-prefix a frame and pad it with zeros to ``padded_length``.

    Padding hides the exact size of acks, wants and short messages from anyone watching
    the radio; receivers accept any amount of zero padding (docs/protocol.md section 4.4).
    """
    body = _LEN.pack(len(frame_bytes)) + frame_bytes
    if len(body) > MAX_PLAINTEXT:
        raise ValueError("frame larger than the largest plaintext")
    return body + bytes(padded_length(len(body)) - len(body))


def unpad_plaintext(plaintext: bytes) -> bytes:
    if len(plaintext) < 2:
        raise RemoteProtocolError("plaintext too short for its length prefix")
    (length,) = _LEN.unpack_from(plaintext)
    if length > len(plaintext) - 2:
        raise RemoteProtocolError("frame length exceeds plaintext")
    padding = plaintext[2 + length:]
    if padding.count(0) != len(padding):
        raise RemoteProtocolError("non-zero padding")
    return plaintext[2:2 + length]


def encode_ids_frame_size(ids: Sequence[bytes]) -> int:
    return IDS_FRAME_OVERHEAD + ID_OVERHEAD * len(ids)


class StreamFramer:
    """Splits a byte stream into length-prefixed records (``u16 length || record``).

    Used by stream transports (TCP, BLE after fragment reassembly). The buffer never
    holds more than one maximal record plus its prefix, so a peer that announces a huge
    length and trickles bytes costs at most 64 KiB.
    """

    def __init__(self, max_record: int = MAX_NOISE_MESSAGE) -> None:
        self._buf = bytearray()
        self.max_record = max_record

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield complete records one at a time, so a change of ``max_record`` made while
        handling one record (the end of the handshake) applies to the next."""
        self._buf += data
        while len(self._buf) >= 2:
            (length,) = _LEN.unpack_from(self._buf)
            if length == 0 or length > self.max_record:
                raise RemoteProtocolError("record length out of range")
            if len(self._buf) < 2 + length:
                return
            record = bytes(self._buf[2:2 + length])
            del self._buf[:2 + length]
            yield record

    @staticmethod
    def encode(record: bytes) -> bytes:
        if not 0 < len(record) <= MAX_NOISE_MESSAGE:
            raise ValueError("record length out of range")
        return _LEN.pack(len(record)) + record
