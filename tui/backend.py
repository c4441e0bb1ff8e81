"""How the app gets its node, without knowing where the node runs.

``pigeon chat`` decides before the UI starts whether the node runs in this process or in
a relay on the same profile (that depends on the profile lock, which is not the UI's
business). The app only sees a ``Backend``: it may first need an identity created or a
key file unlocked (the two first-run screens), then ``open()`` gives the ``NodeClient``
every other screen uses. ``mesh.host.ChatHost`` is the real implementation;
``ClientBackend`` wraps a ready client (tests, and anything that built its own node).
"""

from __future__ import annotations

from typing import Literal, Protocol

from mesh.client import NodeClient

Needs = Literal["create", "unlock"] | None


class Backend(Protocol):
    """What the app asks of whoever hosts its node."""

    @property
    def needs(self) -> Needs:
        """``"create"`` (no identity yet), ``"unlock"`` (encrypted key file) or None."""
        ...

    async def create_identity(self, name: str, passphrase: str | None) -> None:
        """Create and save this profile's identity; ``UserError`` explains a bad name."""
        ...

    async def unlock(self, passphrase: str) -> None:
        """Decrypt the key file; ``UserError`` on a wrong passphrase."""
        ...

    async def open(self) -> NodeClient:
        """Start (or attach to) the node; ``UserError`` if that is impossible."""
        ...


class ClientBackend:
    """A backend around a client that is already open."""

    needs: Needs = None

    def __init__(self, client: NodeClient) -> None:
        self.client = client

    async def create_identity(self, name: str, passphrase: str | None) -> None:
        raise NotImplementedError("this backend already has a node")

    async def unlock(self, passphrase: str) -> None:
        raise NotImplementedError("this backend already has a node")

    async def open(self) -> NodeClient:
        return self.client
