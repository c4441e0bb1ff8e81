"""Sans-IO framing of a Pigeon link over one BLE GATT connection.

The central writes to the peripheral's RX characteristic (write without response) and
receives on TX notifications. The session's stream bytes (already ``u16 length ||
record``, ``wire.StreamFramer``) pass through unchanged: ``send`` queues them,
``fragments_to_send`` cuts them into attribute values of at most ``chunk`` bytes, and
the other end's ``receive_fragment`` + ``received_data`` give the same stream back.
Shaped like ``LinkSession``: it never reads a clock or touches a radio, and nothing a
peer sends makes it raise; a broken rule closes it with ``close_reason``.

Byte layout of every fragment (big-endian)::

    dst_id  u16   the link id the *receiver* chose for this link (0 only in the central's OPEN)
    tag     u16   type (top 2 bits) | seq (low 14 bits, per direction, wraps)
    body    ...   DATA:   1..chunk-4 stream bytes
                  CREDIT: u16 more fragments the sender may send
                  OPEN:   u16 my link id || u16 window (initial credit, fragments)
                  CLOSE:  reason, ASCII, truncated to fit

Overhead: 4 bytes per fragment (20-byte chunks at MTU 23 carry 16 stream bytes; the
first layout's u32 id left 14). ``encode_fragment``/``decode_header`` and
``encode_open``/``decode_open`` are the one definition of this layout; tests and tools
that craft fragments use them.

Why receiver-chosen ids: a peripheral's notifications may reach every subscriber (BlueZ
notifies them all), and a stale link's fragments may still be queued when the next link
starts. Each end picks a random id per link, never 0 and never one of its own live ids
(``taken``); fragments carry the id of the end they are for, so filtering is one
comparison and anything else (another subscriber's traffic, an old link, junk too short
to hold an id) is ignored without cost. Opening is asymmetric because only the central's
writes are unicast: the central sends OPEN addressed to 0; the peripheral accepts only
that, answers with an OPEN addressed to the central's id, and the central accepts only an
OPEN addressed to itself, so a broadcast meant for another central never binds it
(unless their ids collide: below).

Why 16 bits are enough: the id is a filter, not a secret or a guarantee. One host's
links never share an id (``BleLink`` passes as ``taken`` the ids of every link of the
process whose connection is not yet torn down). What it cannot see are other ends' ids: another
central subscribed to the same peripheral, or a link of ours whose id was already
released. Such an id equals a new link's id with probability 1/65,535 per pair. The
price of a collision is a closed link, not a corrupted stream. Interleaved with our own
link's fragments, foreign ones break the sequence at once: a fragment out of sequence
closes the link ("fragment gap"/"duplicate"), and a stray one that happens to carry the
expected seq (~1/16,384) pushes the next genuine fragment out of sequence; a second OPEN,
or CREDIT beyond the window, closes too. What the framing cannot tell apart (a colliding
central that took another central's OPEN answer because it came first, and the foreign
DATA after it, until its own peer's OPEN closes it) reaches the session as Noise records
of someone else's handshake, which fail authentication and close the link. A closed link
is what loss costs anyway: the node reconnects with fresh ids and reconciliation resumes.
A 32-bit id made a collision ~1/4e9 at 2 more bytes per fragment, 10% of a 20-byte value.

Why not 3 bytes: after a 16-bit id, one byte would leave a 6-bit sequence number, and a
run of exactly 64 lost fragments (one default window) would then pass the check unseen;
a shorter id (say 10 bits, 1/1,023 per pair) trades a reconnect per thousand links for
one byte. The type stays in the tag's top 2 bits: four types need two bits, and the
14-bit seq is far larger than any window (``MAX_WINDOW``).

Why a sequence number: write without response and notifications are ordered within a
connection, but are silently lost on a failing link (and BlueZ drops some sizes). The
Noise session above cannot survive loss, so any gap or duplicate closes the link; the
session reconnects and resumes. 14 bits suffice because data is credit-bounded (the
window, at most ``MAX_WINDOW``, is far below 2**14 fragments).

Why credits: a slow peer must not be flooded, and a hostile one must not fill our memory.
The receiver grants ``window`` fragments in OPEN and returns credit only after its
caller drained the bytes (``received_data``), so at most ``window`` fragments are ever
buffered (``window * 508`` bytes). Data beyond the credit, credit beyond the window,
fragments over 512 bytes (one ATT value), a second OPEN: all close the link.

Timers: no OPEN within ``open_timeout``; a record (followed through its u16 length
prefix, the only thing this layer reads of the stream) left unfinished with no data for
``stall_timeout``; our data waiting with no credit for ``stall_timeout``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container

from mesh.errors import LocalProtocolError, RemoteProtocolError

#: Never write or notify more than this (BlueZ loses 511-514-byte write commands).
MAX_CHUNK = 500
#: ATT_MTU 23 leaves 20 bytes per write without response or notification.
MIN_CHUNK = 20
#: One attribute value is capped at 512 bytes: nothing longer can be legitimate.
MAX_FRAGMENT = 512
#: ``dst_id u16 | tag u16``.
HEADER = 4
MAX_WINDOW = 1024
DEFAULT_WINDOW = 64
DATA, CREDIT, OPEN, CLOSE = 0, 1, 2, 3
SEQ_MOD = 1 << 14
#: Link ids are 1..65535; 0 addresses the peripheral before it has chosen one.
ID_SPACE = 1 << 16
#: Random draws before ``pick_link_id`` falls back to a scan (only if ``taken`` is huge).
_ID_DRAWS = 32
_HDR = struct.Struct(">HH")
_OPEN = struct.Struct(">HH")
_CREDIT = struct.Struct(">H")
#: Length of an OPEN fragment: header, the sender's link id and its window.
OPEN_SIZE = HEADER + _OPEN.size


def encode_fragment(dst: int, kind: int, seq: int, body: bytes) -> bytes:
    """One fragment in the layout above (``seq`` is taken modulo ``SEQ_MOD``)."""
    return _HDR.pack(dst, kind << 14 | seq % SEQ_MOD) + body


def decode_header(data: bytes) -> tuple[int, int, int]:
    """``(dst_id, kind, seq)`` of a fragment at least ``HEADER`` bytes long."""
    dst, tag = _HDR.unpack_from(data)
    return dst, tag >> 14, tag & (SEQ_MOD - 1)


def encode_open(link_id: int, window: int) -> bytes:
    """The body of an OPEN: the sender's own link id and its initial credit."""
    return _OPEN.pack(link_id, window)


def decode_open(body: bytes) -> tuple[int, int]:
    """``(sender's link id, window)`` of an OPEN body (exactly 4 bytes)."""
    link_id, window = _OPEN.unpack(body)
    return link_id, window


def pick_link_id(rng: Callable[[int], bytes], taken: Container[int] = ()) -> int:
    """A random link id in 1..65535 that is not in ``taken`` (our own live ids).

    Uniform over the free ids while ``taken`` is small (as it is: a node holds a handful
    of links); if ``_ID_DRAWS`` draws all hit ``taken`` (an rng that repeats itself, or
    nearly every id in use) a scan from the last draw still finds a free one.
    """
    candidate = 0
    for _ in range(_ID_DRAWS):
        candidate = int.from_bytes(rng(2), "big")
        if candidate != 0 and candidate not in taken:
            return candidate
    for step in range(1, ID_SPACE):
        free = (candidate + step) % ID_SPACE
        if free != 0 and free not in taken:
            return free
    raise LocalProtocolError("every BLE link id is in use")


class BleFraming:
    """One end of one BLE link: stream bytes in and out, fragments in and out."""

    def __init__(self, link_id_rng: Callable[[int], bytes], chunk_size: int, now: float, *,
                 initiator: bool, window: int = DEFAULT_WINDOW, open_timeout: float = 10.0,
                 stall_timeout: float = 15.0, taken: Container[int] = ()) -> None:
        """``initiator`` is True on the central (whose writes are unicast), False on the
        peripheral; ``link_id_rng`` is ``os.urandom``-shaped; ``taken`` holds the link ids
        of this host's other live links, which ours must differ from."""
        if not 1 <= window <= MAX_WINDOW:
            raise LocalProtocolError("window out of range")
        self.initiator = initiator
        self.window = window
        self.open_timeout = open_timeout
        self.stall_timeout = stall_timeout
        self.chunk = 0
        self.set_chunk_size(chunk_size)
        self.my_id = pick_link_id(link_id_rng, taken)
        self.peer_id: int | None = None
        self.closed = False
        self.close_reason: str | None = None
        self.ignored = 0  # fragments for someone else, for diagnostics
        self._open_deadline: float | None = now + open_timeout
        self._out = bytearray()  # stream bytes waiting to be cut
        self._control: list[bytes] = []  # fragments due before any data
        self._send_seq = 0
        self._recv_seq = 0
        self._credits = 0  # fragments we may still send
        self._peer_window = 0
        self._peer_credits = window  # fragments the peer may still send us
        self._returnable = 0  # drained fragments whose credit we owe back
        self._undrained = 0  # received fragments not yet drained
        self._in = bytearray()
        self._starved_since: float | None = None
        self._prefix = bytearray()  # record tracking: partial length prefix
        self._record_left = 0
        self._record_stall: float | None = None  # last data while mid-record
        if initiator:
            self._queue(OPEN, 0, encode_open(self.my_id, window))

    # ---- commands and outputs ----------------------------------------------------

    def set_chunk_size(self, n: int) -> None:
        """The MTU changed; ``n`` is ``max_write_without_response_size`` (capped at 500)."""
        if n < MIN_CHUNK:
            raise LocalProtocolError(f"chunk size {n} below the BLE minimum {MIN_CHUNK}")
        self.chunk = min(n, MAX_CHUNK)

    def send(self, data: bytes) -> None:
        """Queue stream bytes; they leave as credit allows."""
        if not self.closed:
            self._out += data

    @property
    def pending(self) -> int:
        """Stream bytes queued but not yet sent, so the runtime can pace its producer."""
        return len(self._out)

    def fragments_to_send(self, now: float) -> list[bytes]:
        """Control fragments first, then DATA while we hold credit."""
        out, self._control = self._control, []
        if self.closed or self.peer_id is None:
            return out
        if self._returnable and self._returnable >= max(1, self.window // 4):
            out.append(self._frame(CREDIT, self.peer_id, _CREDIT.pack(self._returnable)))
            self._peer_credits += self._returnable
            self._returnable = 0
        room = self.chunk - HEADER
        while self._out and self._credits > 0:
            out.append(self._frame(DATA, self.peer_id, bytes(self._out[:room])))
            del self._out[:room]
            self._credits -= 1
        if self._out and self._credits == 0:
            if self._starved_since is None:
                self._starved_since = now
        else:
            self._starved_since = None
        return out

    def received_data(self) -> bytes:
        """Drain the reassembled stream; the drained fragments' credit goes back."""
        data = bytes(self._in)
        self._in.clear()
        self._returnable += self._undrained
        self._undrained = 0
        return data

    def get_timer(self) -> float | None:
        if self.closed:
            return None
        deadlines = [t for t in (
            self._open_deadline,
            None if self._record_stall is None else self._record_stall + self.stall_timeout,
            None if self._starved_since is None else self._starved_since + self.stall_timeout,
        ) if t is not None]
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        if self.closed:
            return
        if self._open_deadline is not None and now >= self._open_deadline:
            self._fail("link open timed out")
        elif self._record_stall is not None and now >= self._record_stall + self.stall_timeout:
            self._fail("record left unfinished (fragments lost or withheld)")
        elif self._starved_since is not None and now >= self._starved_since + self.stall_timeout:
            self._fail("peer granted no credit")

    def close(self, reason: str = "closing") -> None:
        """Close locally; the peer is told when it can be addressed."""
        self._fail(reason)

    # ---- input -------------------------------------------------------------------

    def receive_fragment(self, data: bytes, now: float) -> None:
        """One written or notified attribute value. Never raises for any input."""
        if self.closed:
            return
        try:
            self._receive(data, now)
        except RemoteProtocolError as exc:
            self._fail(exc.reason)

    def _receive(self, data: bytes, now: float) -> None:
        if len(data) < HEADER:
            self.ignored += 1  # cannot even name a link: not ours
            return
        dst, kind, seq = decode_header(data)
        if self.peer_id is None:
            # Before binding accept only the OPEN meant for us (see module docstring).
            if kind != OPEN or dst != (self.my_id if self.initiator else 0):
                self.ignored += 1
                return
        elif dst != self.my_id:
            self.ignored += 1
            return
        if len(data) > MAX_FRAGMENT:
            raise RemoteProtocolError(f"fragment of {len(data)} bytes exceeds {MAX_FRAGMENT}")
        if seq != self._recv_seq:
            if seq == (self._recv_seq - 1) % SEQ_MOD:
                raise RemoteProtocolError(f"duplicate fragment {seq}")
            raise RemoteProtocolError(f"fragment gap: expected {self._recv_seq}, got {seq}")
        self._recv_seq = (seq + 1) % SEQ_MOD
        body = data[HEADER:]
        if kind == DATA:
            self._data(body, now)
        elif kind == CREDIT:
            if len(body) != _CREDIT.size:
                raise RemoteProtocolError("malformed credit fragment")
            (more,) = _CREDIT.unpack(body)
            if more == 0 or self._credits + more > self._peer_window:
                raise RemoteProtocolError("credit beyond the announced window")
            self._credits += more
        elif kind == OPEN:
            self._open(body)
        else:
            text = body[:100].decode("ascii", "replace")
            self._fail("peer closed: " + "".join(c if c.isprintable() else "?" for c in text),
                       tell_peer=False)

    def _open(self, body: bytes) -> None:
        if self.peer_id is not None:
            raise RemoteProtocolError("second OPEN on a link")
        if len(body) != _OPEN.size:
            raise RemoteProtocolError("malformed OPEN")
        peer_id, window = decode_open(body)
        if peer_id == 0 or not 1 <= window <= MAX_WINDOW:
            raise RemoteProtocolError("OPEN with invalid link id or window")
        self.peer_id = peer_id
        self._peer_window = self._credits = window
        self._open_deadline = None
        if not self.initiator:
            self._queue(OPEN, peer_id, encode_open(self.my_id, self.window))

    def _data(self, body: bytes, now: float) -> None:
        if not body:
            raise RemoteProtocolError("empty data fragment")
        if self._peer_credits <= 0:
            raise RemoteProtocolError("data beyond granted credit")
        self._peer_credits -= 1
        self._undrained += 1
        self._in += body
        self._track_records(body, now)

    def _track_records(self, body: bytes, now: float) -> None:
        """Follow ``u16 length || record`` boundaries to notice a record never finished."""
        pos = 0
        while pos < len(body):
            if self._record_left:
                step = min(self._record_left, len(body) - pos)
                self._record_left -= step
                pos += step
            else:
                self._prefix.append(body[pos])
                pos += 1
                if len(self._prefix) == 2:
                    self._record_left = int.from_bytes(self._prefix, "big")
                    self._prefix.clear()
        mid_record = bool(self._record_left or self._prefix)
        self._record_stall = now if mid_record else None

    # ---- internals ---------------------------------------------------------------

    def _frame(self, kind: int, dst: int, body: bytes) -> bytes:
        frag = encode_fragment(dst, kind, self._send_seq, body)
        self._send_seq = (self._send_seq + 1) % SEQ_MOD
        return frag

    def _queue(self, kind: int, dst: int, body: bytes) -> None:
        self._control.append(self._frame(kind, dst, body))

    def _fail(self, reason: str, *, tell_peer: bool = True) -> None:
        if self.closed:
            return
        if self.peer_id is None:
            self._control.clear()  # an unanswered OPEN is moot now
        elif tell_peer:
            room = self.chunk - HEADER
            self._queue(CLOSE, self.peer_id, reason.encode("ascii", "replace")[:room])
        self.closed = True
        self.close_reason = reason
        self._out.clear()
        self._in.clear()
        self._prefix.clear()
