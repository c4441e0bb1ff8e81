"""The routing policies the simulator compares, as ``RoutingPolicy`` variants.

Every policy runs inside the real ``LinkSession``: the session asks ``may_offer`` before
it queues and again before it sends an item, sorts its queue by ``priority``, rewrites
headers with ``outgoing_envelope`` and the receiver keeps ``hops_to_store`` hops. So a
policy changes *what* flows and in which order, never *how*.

* ``epidemic`` (Vahdat and Becker; The ONE's ``EpidemicRouter``): every envelope to every
  peer that lacks it, in a fixed pseudo-random order (The ONE's default send queue is
  random), and no antidote: receipts stay with the recipient.
* ``spray-and-wait`` (binary, Spyropoulos et al.; The ONE's ``SprayAndWaitRouter`` with
  ``binaryMode = true``): the source starts with ``L = 6`` copies; a holder of ``n > 1``
  hands ``floor(n/2)`` to a peer that lacks the message and keeps the rest; a holder of one
  copy waits to meet the destination. Classic spray-and-wait needs to know the
  destination, which Pigeon's sealed envelopes hide from relays; the simulator gives it
  that knowledge as an oracle (The ONE's routers get it too). No receipts either.
* ``pigeon``: ``mesh.routing.RoutingPolicy`` unchanged: receipts first and as antidotes
  (they delete copies everywhere they reach), then stamped, then newest envelopes.
* ``pigeon-budget``: what a copy budget would do inside Pigeon, kept as a comparison (not
  the default; ``docs/simulation.md`` says why). Pigeon's receipts and order, plus binary
  spray tokens (``BUDGET_COPIES``) carried out of band, as a per-hop header field would
  carry them. What it cannot have is spray-and-wait's oracle: a sealed envelope does not
  say whom it is for, so a holder whose tokens are spent must still offer the envelope to
  every peer, and only the recipient (who finds out by opening it) keeps it; everybody
  else receives it, declines it and forgets it. The copies saved are paid for in airtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.routing import KIND_RECEIPT, ItemView, RoutingPolicy
from mesh.sim.memstore import MemStore

__all__ = [
    "BUDGET_COPIES",
    "INITIAL_COPIES",
    "POLICY_NAMES",
    "SPRAY_COPIES",
    "EpidemicPolicy",
    "SprayAndWaitPolicy",
    "make_policy",
    "split_copies",
]

POLICY_NAMES = ("epidemic", "spray-and-wait", "pigeon", "pigeon-budget")
#: Binary spray-and-wait's initial copy budget ``L``.
SPRAY_COPIES = 6
#: ``pigeon-budget``'s ``L``: about twice spray-and-wait's copies, the issue's overhead cap.
BUDGET_COPIES = 12
#: The copy budget a new message starts with, for the policies that have one (the engine
#: splits it on every stored copy).
INITIAL_COPIES: Mapping[str, int] = {"spray-and-wait": SPRAY_COPIES, "pigeon-budget": BUDGET_COPIES}


def _shuffled(item_id: bytes) -> int:
    """A fixed pseudo-random rank: ids are hashes, so their leading bytes are uniform."""
    return int.from_bytes(item_id[:8], "big")


@dataclass(frozen=True)
class EpidemicPolicy(RoutingPolicy):
    """Flood every envelope within hop and lifetime limits; never forward receipts."""

    name: str = "epidemic"

    def may_offer(self, item: ItemView, now: float) -> bool:
        if item.kind == KIND_RECEIPT:
            return False
        return super().may_offer(item, now)

    def priority(self, item: ItemView) -> tuple[int, int, int]:
        return (1, _shuffled(item.id), 0)


@dataclass(frozen=True)
class SprayAndWaitPolicy(EpidemicPolicy):
    """Binary spray-and-wait, bound to one link: ``copies`` is this node's budget per
    envelope (kept in its ``MemStore``), ``peer`` the node at the other end and
    ``destinations`` the oracle mapping envelope id to destination node."""

    name: str = "spray-and-wait"
    copies: Mapping[bytes, int] = field(default_factory=dict, compare=False, repr=False)
    peer: int = -1
    destinations: Mapping[bytes, int] = field(default_factory=dict, compare=False, repr=False)

    def may_offer(self, item: ItemView, now: float) -> bool:
        if not super().may_offer(item, now):
            return False
        return self.copies.get(item.id, 1) > 1 or self.destinations.get(item.id) == self.peer


def split_copies(sender: MemStore, receiver: MemStore, item_id: bytes) -> None:
    """Binary split after a relay stored a copy: the receiver gets ``floor(n/2)``, the
    sender keeps the rest. Both stay at least 1: a copy that crossed the link exists,
    even when two links raced for the sender's last spare copy."""
    n = sender.copies.get(item_id, 1)
    given = max(1, n // 2)
    receiver.copies[item_id] = given
    if item_id in sender.copies:
        sender.copies[item_id] = max(1, n - given)


def make_policy(
    name: str, *, store: MemStore, peer: int, destinations: Mapping[bytes, int],
) -> RoutingPolicy:
    """The policy object for one side of one link."""
    if name == "pigeon":
        return RoutingPolicy()
    if name == "epidemic":
        return EpidemicPolicy()
    if name == "spray-and-wait":
        return SprayAndWaitPolicy(copies=store.copies, peer=peer, destinations=destinations)
    if name == "pigeon-budget":
        return RoutingPolicy(name="pigeon-budget")
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
