"""The local control socket: how a second process on a profile reaches the running node.

JSON lines over a Unix socket in the profile directory (directory 0700, socket 0600), so
only the profile's owner can talk to it. Each request is one line ``{"op": ..., ...}``;
each reply one line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ...}``.
``subscribe`` turns the connection into a stream of node events, one per line. Lines
are capped, so a misbehaving local client cannot make the node buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh import api
from mesh.errors import UserError

if TYPE_CHECKING:
    from mesh.node import Node
    from mesh.profile import ProfileLock

log = logging.getLogger("pigeon.control")

#: How long a command waits for a profile lock held by something that does not answer.
LOCK_WAIT_S = 5.0


def claim_profile(lock: ProfileLock, control_path: Path, wait_s: float = LOCK_WAIT_S) -> bool:
    """Take the profile lock (True), or find the node holding it (False: it answers on its
    control socket). A short CLI command may hold the lock for a moment, so a taken lock is
    retried for ``wait_s`` seconds; after that, ``TimeoutError``."""
    deadline = time.monotonic() + wait_s
    while not lock.try_acquire():
        if reachable(control_path):
            return False
        if time.monotonic() > deadline:
            raise TimeoutError("profile lock held by a process that does not answer")
        time.sleep(0.1)
    return True


MAX_LINE = 1 << 20
#: Requests one connection may have outstanding; reading pauses beyond it (backpressure).
MAX_PIPELINED = 1024
#: How long a closing connection waits for replies already being computed.
REPLY_FLUSH_S = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Serves ``ops`` (name -> async handler) and event subscriptions on a Unix socket."""

    def __init__(self, path: Path, ops: dict[str, Handler],
                 subscribe: Callable[[], asyncio.Queue[api.NodeEvent]],
                 unsubscribe: Callable[[asyncio.Queue[api.NodeEvent]], None]) -> None:
        self.path = path
        self._ops = ops
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale socket of a crashed node; we hold the profile lock
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, path=str(self.path), limit=MAX_LINE,
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests may be pipelined: each is dispatched as soon as it is read (so a burst
        of sends shares one group commit) and the replies go back in request order, at
        most ``MAX_PIPELINED`` outstanding per connection."""
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        replies: asyncio.Queue[asyncio.Future[dict[str, Any]] | None] = \
            asyncio.Queue(MAX_PIPELINED)
        replier = asyncio.ensure_future(_write_replies(writer, replies))
        try:
            while not replier.done():
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await replies.put(_ready({"ok": False, "error": "request too long"}))
                    return
                if not line:
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                        raise ValueError("not an object with an op")
                except ValueError as exc:
                    await replies.put(_ready({"ok": False, "error": f"bad request: {exc}"}))
                    continue
                if request["op"] == "subscribe":
                    await replies.put(None)  # earlier replies first, then the event stream
                    await replier
                    await self._stream_events(writer)
                    return
                await replies.put(asyncio.ensure_future(self._dispatch(request)))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not replier.done():
                with contextlib.suppress(asyncio.QueueFull):
                    replies.put_nowait(None)  # flush what was answered, then stop
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(replier, REPLY_FLUSH_S)
            if task is not None:
                self._clients.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        handler = self._ops.get(request["op"])
        if handler is None:
            return {"ok": False, "error": f"unknown op {request['op']!r}"}
        try:
            return {"ok": True, "result": await handler(request)}
        except UserError as exc:
            # "kind" lets an attached UI tell a key change (a loud warning) from any other
            # refusal, exactly as it would in-process.
            return {"ok": False, "error": str(exc), "kind": type(exc).__name__}
        except Exception as exc:
            log.exception("control op %s failed", request["op"])
            return {"ok": False, "error": f"internal error: {type(exc).__name__}"}

    async def _stream_events(self, writer: asyncio.StreamWriter) -> None:
        queue = self._subscribe()
        try:
            await _write(writer, {"ok": True, "result": "subscribed"})
            while True:
                event = await queue.get()
                await _write(writer, api.to_dict(event))
        finally:
            self._unsubscribe(queue)


def _ready(reply: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
    future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future


async def _write_replies(writer: asyncio.StreamWriter,
                         replies: asyncio.Queue[asyncio.Future[dict[str, Any]] | None]) -> None:
    """Write each reply when it is ready, in request order, until a ``None``."""
    while (pending := await replies.get()) is not None:
        await _write(writer, await pending)


async def _write(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()


def call(path: Path, op: str, timeout: float = 30.0, **args: Any) -> Any:
    """Blocking one-shot request for CLI commands; raises UserError with the node's message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise UserError("the running node closed the control connection")
            buf += chunk
            if len(buf) > MAX_LINE * 16:
                raise UserError("reply from the running node is too large")
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise UserError(str(reply.get("error", "request failed")))
    return reply.get("result")


def reachable(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _str(req: dict[str, Any], key: str) -> str:
    value = req.get(key, "")
    if not isinstance(value, str):
        raise UserError(f"{key} must be text")
    return value


def _opt(req: dict[str, Any], key: str) -> str | None:
    value = req.get(key)
    return value if isinstance(value, str) and value else None


def node_ops(node: Node) -> dict[str, Handler]:
    """The control socket's operations: the node's public API, one op per method."""
    def wrap(fn: Callable[[dict[str, Any]], Any]) -> Handler:
        async def handler(req: dict[str, Any]) -> Any:
            return fn(req)
        return handler

    def dicts(items: list[Any]) -> list[dict[str, Any]]:
        return [api.to_dict(x) for x in items]

    table: dict[str, Callable[[dict[str, Any]], Any]] = {
        "id": lambda _: node.identity_info(),
        "status": lambda _: api.to_dict(node.status()),
        "inbox": lambda _: dicts(node.inbox()),
        "outbox": lambda _: dicts(node.outbox()),
        "contacts": lambda _: dicts(node.contacts()),
        "contacts_add": lambda r: api.to_dict(node.add_contact(_str(r, "name"), _str(r, "code"))),
        "contacts_replace": lambda r: api.to_dict(
            node.replace_contact_key(_str(r, "name"), _str(r, "code"))),
        "contacts_verify": lambda r: node.verify_contact(_str(r, "name"),
                                                         bool(r.get("verified", True))),
        "channels": lambda _: dicts(node.channels()),
        "conversations": lambda _: dicts(node.conversations()),
        "messages": lambda r: dicts(node.messages(_str(r, "conversation"))),
        "mark_read": lambda r: node.mark_read(_str(r, "conversation")),
        "peers": lambda _: dicts(node.peers()),
    }
    async def channels_join(r: dict[str, Any]) -> Any:
        return api.to_dict(await node.join_channel(
            _opt(r, "name"), passphrase=_opt(r, "passphrase"), invite=_opt(r, "invite")))

    async def send(r: dict[str, Any]) -> Any:
        return await node.send_grouped(_str(r, "to"), _str(r, "text"))

    return {**{name: wrap(fn) for name, fn in table.items()}, "channels_join": channels_join,
            "send": send}
