"""Where ``pigeon chat`` gets its node: in this process, or from a relay on the profile.

One node per profile. ``claim()`` runs before the UI starts: if the profile lock is free
we take it and will run the node here, serving the control socket exactly like ``pigeon
relay`` does (so ``pigeon send`` and friends keep working while the chat is open); if a
relay holds the lock and answers on the control socket, we attach to it and leave it
running when the chat closes.

``ChatHost`` satisfies ``tui.backend.Backend`` structurally (this module never imports
``tui``): the UI may first have to create the identity (first run) or unlock an
encrypted key file, then it calls ``open()`` for a ``NodeClient``. Key derivation
(Argon2id) runs in a thread so the UI stays responsive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from mesh import control
from mesh.client import LocalClient, NodeClient, RemoteClient
from mesh.errors import UserError
from mesh.identity import Identity, is_encrypted
from mesh.node import Node, NodeConfig
from mesh.profile import Profile, ProfileLock
from mesh.store import Store

log = logging.getLogger("pigeon.chat")



class Stoppable(Protocol):
    async def stop(self) -> None: ...


#: Started after the node listens (LAN discovery, later BLE); stopped before the node.
Extra = Callable[[Node], Awaitable[Stoppable | None]]


class ChatHost:
    """Owns the profile lock, the store, the node and its control socket for one chat."""

    def __init__(self, profile: Profile, config: NodeConfig, *,
                 passphrase: bytes | None = None, extras: list[Extra] | None = None,
                 lock_wait_s: float = control.LOCK_WAIT_S) -> None:
        self.profile = profile
        self.config = config
        self.passphrase = passphrase
        self.extras = extras or []
        self.lock_wait_s = lock_wait_s
        self.attached = False
        self._lock = ProfileLock(profile)
        self._identity: Identity | None = None
        self._store: Store | None = None
        self._node: Node | None = None
        self._server: control.ControlServer | None = None
        self._client: NodeClient | None = None
        self._started: list[Stoppable] = []
        #: ``pigeon wipe`` asked us to stop: the caller shreds the profile once we are closed.
        self.wipe_requested = False
        #: Called on a wipe request, so the UI closes at once (set by ``pigeon chat``).
        self.on_wipe: Callable[[], object] | None = None

    # ---- before the UI ------------------------------------------------------------------

    def claim(self) -> None:
        """Take the profile lock or find the relay holding it; load a plain (or
        ``--passphrase-env``) key now, so a wrong passphrase fails before the UI starts."""
        self.profile.ensure()
        try:
            held = control.claim_profile(self._lock, self.profile.control_path, self.lock_wait_s)
        except TimeoutError:
            raise UserError(f"the profile {self.profile.home} is locked by another process "
                            "that does not answer") from None
        if not held:  # a relay holds it for good and answers on its control socket
            self.attached = True
            return
        try:
            if self.profile.exists() and (self.passphrase is not None
                                          or not is_encrypted(self.profile.identity_path)):
                self._identity = Identity.load(self.profile.identity_path, self.passphrase)
        except BaseException:
            self._lock.release()
            raise

    @property
    def needs(self) -> Literal["create", "unlock"] | None:
        if self.attached or self._identity is not None:
            return None
        return "unlock" if self.profile.exists() else "create"

    # ---- first run ---------------------------------------------------------------------

    async def create_identity(self, name: str, passphrase: str | None) -> None:
        if self.attached or self.profile.exists():
            raise UserError(f"an identity already exists in {self.profile.home}")
        identity = Identity.generate(name)
        secret = passphrase.encode() if passphrase else None
        await asyncio.to_thread(identity.save, self.profile.identity_path, secret)
        self._identity = identity

    async def unlock(self, passphrase: str) -> None:
        if not passphrase:
            raise UserError("enter the passphrase")
        self._identity = await asyncio.to_thread(
            Identity.load, self.profile.identity_path, passphrase.encode())

    # ---- running -----------------------------------------------------------------------

    async def open(self) -> NodeClient:
        if self._client is not None:
            return self._client
        if self.attached:
            remote = RemoteClient(self.profile.control_path)
            try:
                await remote.identity()
            except (OSError, ValueError) as exc:
                raise UserError(f"the relay on this profile does not answer: {exc}") from None
            self._client = remote
            return remote
        if self._identity is None:
            raise UserError("no identity is loaded")
        self._store = Store.open(self.profile.store_path)
        node = Node(self._identity, self._store, self.config)
        self._node = node
        try:
            await node.start()
        except OSError as exc:
            raise UserError(f"cannot listen: {exc}") from None
        for extra in self.extras:
            try:
                started = await extra(node)
            except Exception as exc:  # discovery is a bonus; --peer and --listen still work
                log.warning("could not start %s: %s", getattr(extra, "__name__", "extra"), exc)
                continue
            if started is not None:
                self._started.append(started)
        ops = control.node_ops(node)
        ops["wipe"] = self._op_wipe
        self._server = control.ControlServer(self.profile.control_path, ops,
                                             node.subscribe, node.unsubscribe)
        await self._server.start()
        log.info("chat node %s running", self._identity.public.node_id.hex()[:16])
        self._client = LocalClient(node)
        return self._client

    async def _op_wipe(self, _: dict[str, Any]) -> str:
        log.warning("wipe requested: closing the chat and destroying this profile")
        self.wipe_requested = True
        if self.on_wipe is not None:
            self.on_wipe()
        return "wiping"

    async def close(self) -> None:
        """Stop what we started (an attached relay keeps running), then free the profile."""
        try:
            if self._client is not None:
                await self._client.close()
            if self._server is not None:
                await self._server.stop()
            for started in reversed(self._started):
                try:
                    await started.stop()
                except Exception as exc:
                    log.warning("stopping %r failed: %s", started, exc)
            if self._node is not None:
                await self._node.stop()
        finally:
            if self._store is not None:
                self._store.close()
            self._client = self._server = self._node = self._store = None
            self._started = []
            self.release()

    def release(self) -> None:
        self._lock.release()
