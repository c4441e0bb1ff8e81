"""Coverage-guided fuzzing (atheris) of every decoder that reads bytes from outside.

Usage: python fuzz/fuzz_decoders.py TARGET [-runs=N] [other libFuzzer flags]
Targets: frame, envelope, receipt, contact, invite, plaintext, stream, session, reconcile.
A target may raise only the errors it documents (RemoteProtocolError, UserError); anything
else is a crash and atheris stops with the input that caused it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from mesh import identity, sealing, wire
    from mesh.envelope import Envelope, Receipt
    from mesh.errors import RemoteProtocolError, UserError
    from mesh.noise import generate_keypair
    from mesh.reconcile import Reconciler, decode_message, encode_message
    from mesh.session import LinkSession


class _EmptySource:
    def sync_keys(self) -> list[tuple[int, bytes]]:
        return [(29_000_000 + i, bytes([i]) * 16) for i in range(40)]

    def get_item(self, item_id: bytes) -> None:
        return None


_KEY = generate_keypair()
_RECONCILE_KEYS = sorted({(29_000_000 + i // 3, bytes([i % 251, i // 251]) * 8) for i in range(500)})


def _frame(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        wire.decode_frame(data)


def _envelope(data: bytes) -> None:
    try:
        env = Envelope.from_bytes(data)
    except RemoteProtocolError:
        return
    assert Envelope.from_bytes(env.to_bytes()) == env
    sealing.open_direct(_ME, env)


def _receipt(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        Receipt.from_bytes(data)


def _contact(data: bytes) -> None:
    with contextlib.suppress(UserError):
        identity.decode_contact(data.decode("utf-8", "replace"))


def _invite(data: bytes) -> None:
    with contextlib.suppress(UserError):
        sealing.channel_from_invite(data.decode("utf-8", "replace"))


def _plaintext(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        wire.unpad_plaintext(data)


def _stream(data: bytes) -> None:
    framer = wire.StreamFramer()
    try:
        for _ in framer.feed(data):
            pass
    except RemoteProtocolError:
        pass


def _session(data: bytes) -> None:
    """Hostile bytes at a responder: it may close, it must never raise."""
    session = LinkSession(initiator=False, static=_KEY, source=_EmptySource(), now=1e9)
    session.receive_data(data, 1e9)
    while session.next_event() is not None:
        pass
    session.data_to_send(1e9)


def _reconcile(data: bytes) -> None:
    """The reconcile byte layout straight from the input, then through the reconciler."""
    try:
        message = decode_message(data)
    except RemoteProtocolError:
        return
    assert encode_message(message) == data
    with contextlib.suppress(RemoteProtocolError):
        Reconciler(_RECONCILE_KEYS, max_message_bytes=4096).respond(message)


_ME = identity.Identity.generate("fuzz")
TARGETS: dict[str, Callable[[bytes], None]] = {
    "frame": _frame, "envelope": _envelope, "receipt": _receipt, "contact": _contact,
    "invite": _invite, "plaintext": _plaintext, "stream": _stream, "session": _session,
    "reconcile": _reconcile,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [-runs=N]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
