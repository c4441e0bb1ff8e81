"""One API for a user interface, whether the node runs in this process or in a relay.

``LocalClient`` wraps a ``Node`` running on this event loop; ``RemoteClient`` speaks the
control socket of a ``pigeon relay`` on the same profile. Both expose the same async
methods and an async iterator of ``api`` events, so the TUI behaves the same either way
and never touches the store or a socket itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from mesh import api
from mesh.chat import KeyChangedError
from mesh.control import MAX_LINE
from mesh.errors import UserError
from mesh.node import Node


class NodeClient(Protocol):
    """What a user interface may ask of a node."""

    attached: bool

    async def identity(self) -> dict[str, str]: ...
    async def status(self) -> api.Status: ...
    async def send(self, conversation: str, text: str) -> str: ...
    async def contacts(self) -> list[api.ContactInfo]: ...
    async def add_contact(self, name: str, code: str) -> api.ContactInfo: ...
    async def replace_contact_key(self, name: str, code: str) -> api.ContactInfo: ...
    async def verify_contact(self, name: str, verified: bool = True) -> None: ...
    async def channels(self) -> list[api.ChannelInfo]: ...
    async def join_channel(self, name: str | None = None, *, passphrase: str | None = None,
                           invite: str | None = None) -> api.ChannelInfo: ...
    async def conversations(self) -> list[api.ConversationInfo]: ...
    async def messages(self, conversation: str) -> list[api.ChatMessage]: ...
    async def mark_read(self, conversation: str) -> None: ...
    async def peers(self) -> list[api.PeerInfo]: ...
    def events(self) -> AsyncIterator[api.NodeEvent]: ...
    async def close(self) -> None: ...


class LocalClient:
    """The node lives in this process (``pigeon chat`` without a relay)."""

    attached = False

    def __init__(self, node: Node) -> None:
        self.node = node

    async def identity(self) -> dict[str, str]:
        return self.node.identity_info()

    async def status(self) -> api.Status:
        return self.node.status()

    async def send(self, conversation: str, text: str) -> str:
        return self.node.send(conversation, text)

    async def contacts(self) -> list[api.ContactInfo]:
        return self.node.contacts()

    async def add_contact(self, name: str, code: str) -> api.ContactInfo:
        return self.node.add_contact(name, code)

    async def replace_contact_key(self, name: str, code: str) -> api.ContactInfo:
        return self.node.replace_contact_key(name, code)

    async def verify_contact(self, name: str, verified: bool = True) -> None:
        self.node.verify_contact(name, verified)

    async def channels(self) -> list[api.ChannelInfo]:
        return self.node.channels()

    async def join_channel(self, name: str | None = None, *, passphrase: str | None = None,
                           invite: str | None = None) -> api.ChannelInfo:
        return await self.node.join_channel(name, passphrase=passphrase, invite=invite)

    async def conversations(self) -> list[api.ConversationInfo]:
        return self.node.conversations()

    async def messages(self, conversation: str) -> list[api.ChatMessage]:
        return self.node.messages(conversation)

    async def mark_read(self, conversation: str) -> None:
        self.node.mark_read(conversation)

    async def peers(self) -> list[api.PeerInfo]:
        return self.node.peers()

    async def events(self) -> AsyncIterator[api.NodeEvent]:
        queue = self.node.subscribe()
        try:
            while True:
                yield await queue.get()
        finally:
            self.node.unsubscribe(queue)

    async def close(self) -> None:
        return None


class RemoteClient:
    """Attached to a relay on the same profile through its owner-only control socket."""

    attached = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connecting: asyncio.Future[None] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        #: Replies owed on the current connection, oldest first (the relay answers in
        #: request order, so calls may be pipelined: a burst of sends shares a commit).
        self._waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._reply_task: asyncio.Task[None] | None = None

    async def _call(self, op: str, **args: Any) -> Any:
        if self._writer is None:
            # Calls made while connecting all wait for the one connection attempt and
            # resume in the same loop turn (a lock would wake them one turn at a time).
            if self._connecting is None or self._connecting.done():
                self._connecting = asyncio.ensure_future(self._connect())
            await asyncio.shield(self._connecting)
        writer = self._writer
        if writer is None:
            raise UserError("the relay closed the connection")
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # Queued and written with no await in between, so concurrent calls go out back to
        # back in one burst (a lock here cost a loop turn per call) and the reply order
        # matches. Even if this call is cancelled from here on, its reply is taken off the
        # stream (and dropped), so the connection stays in step.
        self._waiting.append(reply)
        writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            self._disconnect()
            raise UserError("the relay closed the connection") from None
        line = await reply
        reply_obj = json.loads(line)
        if not reply_obj.get("ok"):
            error = KeyChangedError if reply_obj.get("kind") == "KeyChangedError" else UserError
            raise error(str(reply_obj.get("error", "request failed")))
        return reply_obj.get("result")

    async def _connect(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.path), limit=MAX_LINE * 16)
            self._reply_task = asyncio.ensure_future(
                self._read_replies(self._reader, self._waiting))

    async def _read_replies(self, reader: asyncio.StreamReader,
                            waiting: collections.deque[asyncio.Future[bytes]]) -> None:
        """Hand each reply line to the oldest waiting call; fail them all when the
        connection ends."""
        try:
            while line := await reader.readline():
                if waiting:
                    future = waiting.popleft()
                    if not future.done():
                        future.set_result(line)
        except (ConnectionError, OSError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            if self._reader is reader:
                self._drop_stream()
            while waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_exception(UserError("the relay closed the connection"))

    def _drop_stream(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._writer = self._reader = None

    def _disconnect(self) -> None:
        self._drop_stream()
        if self._reply_task is not None:
            self._reply_task.cancel()
        self._waiting = collections.deque()
        self._reply_task = None

    async def identity(self) -> dict[str, str]:
        result: dict[str, str] = await self._call("id")
        return result

    async def status(self) -> api.Status:
        return api.from_dict(api.Status, await self._call("status"))

    async def send(self, conversation: str, text: str) -> str:
        return str(await self._call("send", to=conversation, text=text))

    async def contacts(self) -> list[api.ContactInfo]:
        return [api.from_dict(api.ContactInfo, c) for c in await self._call("contacts")]

    async def add_contact(self, name: str, code: str) -> api.ContactInfo:
        return api.from_dict(api.ContactInfo, await self._call("contacts_add", name=name, code=code))

    async def replace_contact_key(self, name: str, code: str) -> api.ContactInfo:
        return api.from_dict(api.ContactInfo,
                             await self._call("contacts_replace", name=name, code=code))

    async def verify_contact(self, name: str, verified: bool = True) -> None:
        await self._call("contacts_verify", name=name, verified=verified)

    async def channels(self) -> list[api.ChannelInfo]:
        return [api.from_dict(api.ChannelInfo, c) for c in await self._call("channels")]

    async def join_channel(self, name: str | None = None, *, passphrase: str | None = None,
                           invite: str | None = None) -> api.ChannelInfo:
        return api.from_dict(api.ChannelInfo, await self._call(
            "channels_join", name=name, passphrase=passphrase, invite=invite))

    async def conversations(self) -> list[api.ConversationInfo]:
        return [api.from_dict(api.ConversationInfo, c) for c in await self._call("conversations")]

    async def messages(self, conversation: str) -> list[api.ChatMessage]:
        return [api.from_dict(api.ChatMessage, m)
                for m in await self._call("messages", conversation=conversation)]

    async def mark_read(self, conversation: str) -> None:
        await self._call("mark_read", conversation=conversation)

    async def peers(self) -> list[api.PeerInfo]:
        return [api.from_dict(api.PeerInfo, p) for p in await self._call("peers")]

    async def events(self) -> AsyncIterator[api.NodeEvent]:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE * 16)
        try:
            writer.write(b'{"op": "subscribe"}\n')
            await writer.drain()
            await reader.readline()  # the "subscribed" acknowledgement
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    yield api.event_from_dict(json.loads(line))
                except ValueError:
                    continue  # a newer relay may send events we do not know
        finally:
            writer.close()

    async def close(self) -> None:
        self._disconnect()
