"""An in-memory stand-in for ``mesh.store.Store``: the sync set of one simulated node.

Why not SQLite: a 126-node, 12-hour run stores hundreds of thousands of envelopes, and an
fsync per commit would measure the disk, not the protocol. What must not change is what
the session and the routing policy see, so this class mirrors the store's rules for the
sync set (see ``mesh/store.py``'s docstring):

* items are envelopes, receipts and tombstones keyed by id; ``sync_keys`` is every item,
  sorted by ``(ts, id)``;
* ``add_envelope`` returns the same ``AddResult`` values in the same order of checks:
  duplicate, expired, answered by a held receipt (nothing is stored), refused by quota,
  stored;
* a receipt (id ``Receipt.id``) turns the envelopes whose ``receipt_hash`` equals its
  ``answers`` into tombstones, and a second receipt for the same ``answers`` is refused;
* the quota counts non-local envelope bytes, in total and per origin (the neighbour it
  came from), and evicts expired first, then the lowest ``(stamp_bits, ts, id)`` ranked at
  or below the newcomer; the whole plan is made before anything changes; evicted ids are
  forgotten outright (no tombstone), so a flood does not bloat reconciliation;
* ``sweep`` expires envelopes to tombstones and drops receipts and tombstones whose time
  has passed.

Differences, on purpose: no app tables (inbox/outbox live in the engine), and a per-id
``copies`` counter that only the spray-and-wait policy reads.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from dataclasses import dataclass

from mesh.envelope import Envelope, Receipt, mutable_bytes
from mesh.reconcile import SortedKeys
from mesh.routing import KIND_ENVELOPE, KIND_RECEIPT, KIND_TOMBSTONE
from mesh.store import AddResult

__all__ = ["MemStore", "SimItem"]

@dataclass(slots=True)
class SimItem:
    """One row of the sync set; satisfies ``mesh.routing.ItemView``."""

    id: bytes
    kind: str
    ts: int
    data: bytes | None
    expires_at: float
    hops_left: int
    stamp_bits: int
    local: bool
    size: int
    origin: str
    receipt_hash: bytes | None  # envelope: its header hash; receipt: ``answers``; else None
    dedup_until: float


class MemStore:
    """The sync set of one node, in memory. Not thread-safe; never reads the clock."""

    def __init__(self, *, quota_bytes: int, neighbour_share: float = 1.0) -> None:
        if quota_bytes <= 0 or not 0.0 < neighbour_share <= 1.0:
            raise ValueError("quota_bytes must be > 0 and neighbour_share in (0, 1]")
        self.quota_bytes = quota_bytes
        self.neighbour_quota = int(quota_bytes * neighbour_share)
        self._items: dict[bytes, SimItem] = {}
        #: Kept ready for ``Reconciler`` (checked and converted once per key, not per session).
        self._keys = SortedKeys()
        #: receipt hash -> ids of held envelopes carrying it (normally exactly one).
        self._by_receipt: dict[bytes, list[bytes]] = {}
        #: ``Receipt.answers`` of every held receipt -> that receipt's id.
        self._answered: dict[bytes, bytes] = {}
        #: Eviction order of non-local envelopes, overall and per origin.
        self._rank_all: list[tuple[int, int, bytes]] = []
        self._rank_origin: dict[str, list[tuple[int, int, bytes]]] = {}
        self._usage: dict[str, int] = {}
        self.quota_used = 0
        #: Bytes of every envelope held, local ones included (buffer occupancy).
        self.envelope_bytes = 0
        #: Lazy heap of (expires_at, id) for envelopes, receipts and tombstones.
        self._expiry: list[tuple[float, bytes]] = []
        #: Spray-and-wait copy budget per envelope id (absent: not tracked).
        self.copies: dict[bytes, int] = {}

    # ---- SyncSource ----------------------------------------------------------------

    def sync_keys(self) -> list[tuple[int, bytes]]:
        """Sorted ``(ts, id)`` of every item. The list is the store's own (a ``SortedKeys``,
        which only the store changes; ``Reconciler`` copies what it is given)."""
        return self._keys

    def get_item(self, item_id: bytes) -> SimItem | None:
        return self._items.get(item_id)

    def has(self, item_id: bytes) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    # ---- envelopes -----------------------------------------------------------------

    def add_envelope(
        self, env: Envelope, *, now: float, origin: str, local: bool = False,
        hops_left: int | None = None,
    ) -> AddResult:
        """Same checks, order and outcomes as ``Store.add_envelope``.

        ``hops_left``, when given, is stored instead of the envelope's own (what the node
        does with ``env.with_mutable(hops_left=...)``, without building a second envelope
        and hashing its id again for every copy a flood stores).
        """
        eid = env.id
        if eid in self._items:
            return AddResult.DUPLICATE
        if env.ttl_left_s <= 0:
            return AddResult.EXPIRED
        if env.receipt_hash in self._answered:
            return AddResult.ANSWERED  # nothing kept, not even a tombstone, as in the store
        bits = env.stamp_bits
        if not local:
            victims = self._plan_room(env.size, origin, (bits, env.created_min), now)
            if victims is None:
                return AddResult.REFUSED_QUOTA
            for victim in victims:
                self._delete(self._items[victim])  # eviction forgets the id, as the store does
        hops = env.hops_left if hops_left is None else hops_left
        data = env.immutable_bytes + mutable_bytes(hops, env.ttl_left_s, env.stamp)
        self._insert(SimItem(eid, KIND_ENVELOPE, env.created_min, data,
                             now + env.ttl_left_s, hops, bits, local, len(data), origin,
                             env.receipt_hash, env.dedup_until()))
        return AddResult.STORED

    def delete_envelope(self, item_id: bytes, *, now: float) -> bool:
        """Keep only a tombstone (the recipient has read it)."""
        return self._tombstone(item_id, now)

    # ---- receipts ------------------------------------------------------------------

    def add_receipt(self, receipt: Receipt, *, now: float) -> tuple[bool, list[bytes]]:
        """Store a receipt and tombstone what it answers; (was new, purged ids)."""
        rid, answers = receipt.id, receipt.answers
        if rid in self._items or answers in self._answered:
            return False, []
        keep = receipt.keep_until()
        data = receipt.to_bytes()
        self._insert(SimItem(rid, KIND_RECEIPT, receipt.issued_min, data, keep, 0, 0, False,
                             len(data), "", answers, keep))
        purged = sorted(self._by_receipt.get(answers, ()))
        for item_id in purged:
            self._tombstone(item_id, now)
        return True, purged

    # ---- expiry and quota ----------------------------------------------------------

    def sweep(self, now: float) -> int:
        """Expire what is due; cheap when nothing is (a heap, not a scan)."""
        changed = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires_at, item_id = heapq.heappop(heap)
            item = self._items.get(item_id)
            if item is None or item.expires_at != expires_at:
                continue  # stale entry: the item changed or went
            if item.kind == KIND_ENVELOPE:
                self._tombstone(item_id, now)
            else:
                self._delete(item)
            changed += 1
        return changed

    def _plan_room(
        self, need: int, origin: str, rank: tuple[int, int], now: float,
    ) -> list[bytes] | None:
        if need > self.neighbour_quota or need > self.quota_bytes:
            return None
        chosen: dict[bytes, int] = {}
        over_share = self._usage.get(origin, 0) + need - self.neighbour_quota
        if over_share > 0 and self._pick(chosen, over_share, origin, rank, now) < over_share:
            return None
        over_total = self.quota_used + need - self.quota_bytes - sum(chosen.values())
        if over_total > 0 and self._pick(chosen, over_total, None, rank, now) < over_total:
            return None
        return list(chosen)

    def _pick(
        self, chosen: dict[bytes, int], amount: int, origin: str | None,
        rank: tuple[int, int], now: float,
    ) -> int:
        """Victims in DESIGN section 6 order until ``amount`` bytes are freed: expired
        (by expiry, then id), then the lowest ``(stamp_bits, ts, id)`` at or below ``rank``.

        Expired envelopes are rare (every node sweeps each minute), so they are looked
        for by a scan only when the expiry heap says one may exist.
        """
        ranked = self._rank_all if origin is None else self._rank_origin.get(origin, [])
        expired: list[tuple[float, bytes]] = []
        if self._expiry and self._expiry[0][0] <= now:
            expired = sorted((item.expires_at, i) for _, _, i in ranked
                             if (item := self._items[i]).expires_at <= now)
        freed = 0
        for item_id in [i for _, i in expired]:
            freed += self._choose(chosen, item_id)
            if freed >= amount:
                return freed
        for bits, ts, item_id in ranked:
            if (bits, ts) > rank:
                break
            freed += self._choose(chosen, item_id)
            if freed >= amount:
                break
        return freed

    def _choose(self, chosen: dict[bytes, int], item_id: bytes) -> int:
        if item_id in chosen:
            return 0
        chosen[item_id] = size = self._items[item_id].size
        return size

    # ---- internals -----------------------------------------------------------------

    def _insert(self, item: SimItem) -> None:
        self._items[item.id] = item
        self._keys.add((item.ts, item.id))
        heapq.heappush(self._expiry, (item.expires_at, item.id))
        if item.kind == KIND_RECEIPT:
            assert item.receipt_hash is not None
            self._answered[item.receipt_hash] = item.id
        elif item.kind == KIND_ENVELOPE:
            self.envelope_bytes += item.size
            assert item.receipt_hash is not None
            self._by_receipt.setdefault(item.receipt_hash, []).append(item.id)
            if not item.local:
                self._count(item, +1)

    def _count(self, item: SimItem, sign: int) -> None:
        """Quota usage and the eviction order of one non-local envelope."""
        key = (item.stamp_bits, item.ts, item.id)
        self.quota_used += sign * item.size
        self._usage[item.origin] = self._usage.get(item.origin, 0) + sign * item.size
        per_origin = self._rank_origin.setdefault(item.origin, [])
        if sign > 0:
            insort(self._rank_all, key)
            insort(per_origin, key)
        else:
            del self._rank_all[bisect_left(self._rank_all, key)]
            del per_origin[bisect_left(per_origin, key)]

    def _unindex_envelope(self, item: SimItem) -> None:
        self.envelope_bytes -= item.size
        assert item.receipt_hash is not None
        ids = self._by_receipt[item.receipt_hash]
        ids.remove(item.id)
        if not ids:
            del self._by_receipt[item.receipt_hash]
        if not item.local:
            self._count(item, -1)

    def _tombstone(self, item_id: bytes, now: float) -> bool:
        """Envelope -> tombstone until its dedup time (deleted at once if that passed)."""
        item = self._items.get(item_id)
        if item is None or item.kind != KIND_ENVELOPE:
            return False
        self._unindex_envelope(item)
        item.kind, item.data, item.size, item.receipt_hash = KIND_TOMBSTONE, None, 0, None
        item.expires_at = item.dedup_until
        self.copies.pop(item_id, None)
        if item.expires_at <= now:
            self._delete(item)
        else:
            heapq.heappush(self._expiry, (item.expires_at, item_id))
        return True

    def _delete(self, item: SimItem) -> None:
        if item.kind == KIND_ENVELOPE:
            self._unindex_envelope(item)
        elif item.kind == KIND_RECEIPT and item.receipt_hash is not None:
            self._answered.pop(item.receipt_hash, None)
        del self._items[item.id]
        self._keys.discard((item.ts, item.id))
