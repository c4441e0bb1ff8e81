"""What a simulation measured, named and defined as The ONE's reports define it.

So results can be set beside published ONE results without translation:

* ``created``: messages created; ``delivered``: messages that reached their recipient
  (the first copy only); ``relayed``: completed transfers of a message to a node that
  kept it, the final hop to the recipient included (``MessageStatsReport.nrofRelayed``);
* ``delivery_prob`` = delivered / created;
* ``overhead_ratio`` = (relayed - delivered) / delivered (``null`` when nothing arrived,
  where The ONE prints NaN);
* ``latency_avg`` / ``latency_med``: seconds from creation to delivery; the median is
  The ONE's: the element at index ``n // 2`` of the sorted list;
* ``hopcount_avg``: hops of the delivered copy (1 = sender met recipient);
* ``buffer_occupancy``: mean over the run of The ONE's ``BufferOccupancyReport``
  snapshot, the average over nodes of held envelope bytes / buffer size in percent,
  each node capped at 100 (a node's own messages count, as in The ONE).

Added because on BLE airtime is what counts: ``bytes_relayed_per_delivered_byte``, all
bytes every link carried (handshakes, reconciliation, envelopes, receipts, acks, pings,
padding) divided by the envelope bytes delivered; and
``envelope_bytes_relayed_per_delivered_byte``, the same for envelope bytes alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["JSON_KEYS", "SimStats", "format_summary"]

#: The keys ``pigeon sim --json`` promises (more may follow them).
JSON_KEYS = ("delivery_prob", "latency_avg", "latency_med", "overhead_ratio", "hopcount_avg",
             "buffer_occupancy", "created", "delivered", "relayed")


def _avg(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _one_median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class SimStats:
    """Raw counters the engine fills; ``summary()`` turns them into report values."""

    nodes: int
    duration: float
    policy: str
    bandwidth: int
    buffer: int
    created: int = 0
    created_bytes: int = 0
    delivered: int = 0
    delivered_bytes: int = 0
    relayed: int = 0
    refused: int = 0
    declined: int = 0
    envelope_bytes_relayed: int = 0
    wire_bytes: int = 0
    contacts: int = 0
    link_errors: int = 0
    events: int = 0
    runtime_s: float = 0.0
    cpu_s: float = 0.0
    receipts_stored: int = 0
    purged: int = 0
    latencies: list[float] = field(default_factory=list)
    hopcounts: list[int] = field(default_factory=list)
    delivery_times: list[float] = field(default_factory=list)
    occupancy_samples: list[float] = field(default_factory=list)
    reconcile_round_trips: list[int] = field(default_factory=list)

    def record_delivery(self, latency: float, hops: int, size: int, at: float) -> None:
        self.delivered += 1
        self.delivered_bytes += size
        self.latencies.append(latency)
        self.hopcounts.append(hops)
        self.delivery_times.append(at)

    def summary(self) -> dict[str, Any]:
        """The report as a JSON-ready dict: ``JSON_KEYS`` first, then the extras.

        Deterministic for a given scenario and seed (no wall-clock runtime in it)."""
        delivered = self.delivered
        per_byte = (lambda n: n / self.delivered_bytes) if self.delivered_bytes else (lambda n: None)
        return {
            "delivery_prob": _round(delivered / self.created if self.created else 0.0),
            "latency_avg": _round(_avg(self.latencies), 1),
            "latency_med": _round(_one_median(self.latencies), 1),
            "overhead_ratio": _round((self.relayed - delivered) / delivered if delivered else None),
            "hopcount_avg": _round(_avg([float(h) for h in self.hopcounts])),
            "buffer_occupancy": _round(_avg(self.occupancy_samples)),
            "created": self.created,
            "delivered": delivered,
            "relayed": self.relayed,
            "bytes_relayed_per_delivered_byte": _round(per_byte(self.wire_bytes), 2),
            "envelope_bytes_relayed_per_delivered_byte": _round(
                per_byte(self.envelope_bytes_relayed), 2),
            "wire_bytes": self.wire_bytes,
            "delivered_bytes": self.delivered_bytes,
            "refused": self.refused,
            "declined": self.declined,
            "receipts_stored": self.receipts_stored,
            "purged": self.purged,
            "contacts": self.contacts,
            "link_errors": self.link_errors,
            "reconcile_round_trips_avg": _round(
                _avg([float(r) for r in self.reconcile_round_trips]), 2),
            "policy": self.policy,
            "nodes": self.nodes,
            "duration": self.duration,
            "bandwidth": self.bandwidth,
            "buffer": self.buffer,
        }


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable block, one ``name: value`` per line like The ONE's report files."""
    return "\n".join(f"{key}: {'NaN' if value is None else value}" for key, value in summary.items())
