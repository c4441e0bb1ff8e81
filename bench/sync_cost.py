"""Sync cost: what two stores exchange to learn their difference, against "send every id".

Two stores: A holds ``n`` keys, B the same less ``d`` of them, missing either the newest
``d`` (a phone that was away) or ``d`` at random. B dials A, as a newcomer would. The real
``Reconciler`` runs on both sides, every message goes through the real codec
(``mesh.wire.encode_frame``), and bytes are counted twice: ``frame`` (the msgpack frame)
and ``wire`` (what the link carries: length prefix, padding to a size class, AEAD tag).
Round trips are counted until both sides know the difference (and so what to send): up to
the last non-empty message if its sender was already done (it asked nothing: only DIFF and
SKIP ranges), else up to the empty "done" reply too; ``messages`` counts every message,
the empty "done" included, and its bytes are always counted. Every run checks that both
sides found exactly the difference.

Baseline, in the same run: B sends all its ids (``Want``-shaped frames of at most
``MAX_IDS_PER_FRAME`` ids), A answers with the ids B lacks: one round trip.

Also run with messages capped at 4 KB (a BLE-sized budget) to show how round trips grow.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

from bench.common import cli, pyplot
from mesh import wire
from mesh.reconcile import ReconcileMessage, Reconciler

NAME = "sync_cost"
SIZES = (1_000, 10_000, 100_000)
DIFFS = (0, 10, 100, 1000)
CAPS = (60_000, 4096)
START_MIN = 29_500_000

GOALS = [
    {"what": "in sync: round trips", "n": None, "d": 0, "where": "newest", "metric": "round_trips",
     "limit": 1},
    {"what": "in sync: bytes (both ways)", "n": None, "d": 0, "where": "newest",
     "metric": "bytes", "limit": 300},
    {"what": "n=100k, d=100 newest: round trips", "n": 100_000, "d": 100, "where": "newest",
     "metric": "round_trips", "limit": 3},
    {"what": "n=100k, d=100 newest: bytes", "n": 100_000, "d": 100, "where": "newest",
     "metric": "bytes", "limit": 3_000},
    {"what": "n=100k, d=1000 random: round trips", "n": 100_000, "d": 1000, "where": "random",
     "metric": "round_trips", "limit": 3},
    {"what": "n=100k, d=1000 random: bytes", "n": 100_000, "d": 1000, "where": "random",
     "metric": "bytes", "limit": 400_000},
]


def make_keys(n: int) -> list[tuple[int, bytes]]:
    """``n`` hash ids spread over 30 days of minutes, sorted as the store returns them."""
    span = 30 * 24 * 60
    keys = [(START_MIN + i * span // max(n, 1),
             hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).digest()) for i in range(n)]
    keys.sort()
    return keys


def frame_bytes(message: ReconcileMessage) -> tuple[int, int]:
    """(msgpack frame bytes, bytes on the link) for one reconcile message."""
    frame = wire.encode_frame(wire.Reconcile(message=message))
    return len(frame), 2 + len(wire.pad_plaintext(frame)) + 16


def ids_bytes(ids: list[bytes], per_frame: int) -> tuple[int, int]:
    frame_total = link_total = 0
    for start in range(0, max(len(ids), 1), per_frame):
        frame = wire.encode_frame(wire.Want(ids=tuple(ids[start:start + per_frame])))
        frame_total += len(frame)
        link_total += 2 + len(wire.pad_plaintext(frame)) + 16
    return frame_total, link_total


def reconcile(a_keys: list[tuple[int, bytes]], b_keys: list[tuple[int, bytes]],
              cap: int) -> dict[str, Any]:
    """B (initiator) and A reconcile; returns round trips and bytes each way."""
    started = time.perf_counter()
    a = Reconciler(a_keys, max_message_bytes=cap)
    b = Reconciler(b_keys, max_message_bytes=cap)
    sent = {"b_to_a": [0, 0], "a_to_b": [0, 0]}
    message: ReconcileMessage | None = b.initiate()
    sides = [("b_to_a", a), ("a_to_b", b)]
    messages = 0
    turn = 0
    known_after = 0  # messages until both sides know the whole difference
    while True:
        direction, receiver = sides[turn % 2]
        sender = sides[(turn + 1) % 2][1]
        assert message is not None
        f, link = frame_bytes(message)
        sent[direction][0] += f
        sent[direction][1] += link
        messages += 1
        if not message.ranges:
            break  # the "done" message: the receiver has nothing to answer
        if messages > 200:
            raise RuntimeError("reconciliation did not converge")
        reply = receiver.respond(message)
        if reply is None and not known_after:
            known_after = messages if sender.done else messages + 1
        message = reply if reply is not None else ReconcileMessage(())
        turn += 1
    expected = {k[1] for k in a_keys} - {k[1] for k in b_keys}
    if not (a.have == expected == b.need and not a.need and not b.have):
        raise RuntimeError("reconciliation found the wrong difference")
    return {
        "round_trips": (known_after + 1) // 2,
        # The earlier count, to the empty "done" reply whatever the last message asked.
        "round_trips_incl_done": (messages + 1) // 2,
        "messages": messages,
        "frame_bytes_b_to_a": sent["b_to_a"][0], "frame_bytes_a_to_b": sent["a_to_b"][0],
        "bytes_b_to_a": sent["b_to_a"][1], "bytes_a_to_b": sent["a_to_b"][1],
        "bytes": sent["b_to_a"][1] + sent["a_to_b"][1],
        "frame_bytes": sent["b_to_a"][0] + sent["a_to_b"][0],
        "cpu_s": round(time.perf_counter() - started, 3),
    }


def naive(a_keys: list[tuple[int, bytes]], b_keys: list[tuple[int, bytes]],
          cap: int) -> dict[str, Any]:
    per_frame = min(wire.MAX_IDS_PER_FRAME, (cap - 2 * wire.IDS_FRAME_OVERHEAD) // wire.ID_OVERHEAD)
    b_ids = [k[1] for k in b_keys]
    missing = sorted({k[1] for k in a_keys} - set(b_ids))
    f1, l1 = ids_bytes(b_ids, per_frame)
    f2, l2 = ids_bytes(missing, per_frame)
    return {"round_trips": 1, "bytes": l1 + l2, "frame_bytes": f1 + f2}


def run(tiny: bool) -> dict[str, Any]:
    sizes, diffs = ((1_000,), (0, 10)) if tiny else (SIZES, DIFFS)
    rng = random.Random(7)
    rows = []
    for n in sizes:
        a_keys = make_keys(n)
        for d in diffs:
            for where in ("newest", "random"):
                if d == 0 and where == "random":
                    continue  # the same case as d = 0 newest
                gone = set(range(n - d, n)) if where == "newest" else set(rng.sample(range(n), d))
                b_keys = [k for i, k in enumerate(a_keys) if i not in gone]
                for cap in CAPS:
                    row = {"n": n, "d": d, "where": where, "cap": cap,
                           **reconcile(a_keys, b_keys, cap)}
                    base = naive(a_keys, b_keys, cap)
                    row["naive_bytes"] = base["bytes"]
                    row["naive_round_trips"] = base["round_trips"]
                    row["bytes_vs_naive"] = round(row["bytes"] / base["bytes"], 4)
                    rows.append(row)
    return {"rows": rows, "goals": judge(rows)}


def judge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal against the largest matching measurement (60 KB messages), judged on the
    bytes the link carries; the bare frame bytes are reported beside them."""
    out = []
    for goal in GOALS:
        matches = [r for r in rows if r["cap"] == CAPS[0] and r["d"] == goal["d"]
                   and r["where"] == goal["where"] and (goal["n"] is None or r["n"] == goal["n"])]
        if not matches:
            continue
        worst = max(r[goal["metric"]] for r in matches)
        entry = {"goal": goal["what"], "limit": goal["limit"], "measured": worst,
                 "met": worst <= goal["limit"]}
        if goal["metric"] == "bytes":  # the msgpack frames alone, before padding and AEAD
            entry["measured_frame_bytes"] = max(r["frame_bytes"] for r in matches)
        out.append(entry)
    return out


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = data["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for n in sorted({r["n"] for r in rows}):
        for where, style in (("newest", "-o"), ("random", "--s")):
            sel = sorted((r for r in rows if r["n"] == n and r["cap"] == CAPS[0]
                          and (r["where"] == where or r["d"] == 0)), key=lambda r: r["d"])
            xs = [max(r["d"], 1) for r in sel]
            left.plot(xs, [r["bytes"] for r in sel], style, label=f"n={n:,} {where}")
            if where == "newest":
                left.plot(xs, [r["naive_bytes"] for r in sel], ":", color="grey")
            capped = sorted((r for r in rows if r["n"] == n and r["cap"] == CAPS[1]
                             and (r["where"] == where or r["d"] == 0)), key=lambda r: r["d"])
            right.plot([max(r["d"], 1) for r in capped], [r["round_trips"] for r in capped],
                       style, label=f"n={n:,} {where}")
    left.set(xscale="log", yscale="log", xlabel="difference d (0 plotted at 1)",
             ylabel="bytes on the link, both ways", title="Reconciliation vs send-every-id (dotted)")
    right.set(xscale="log", xlabel="difference d (0 plotted at 1)", ylabel="round trips",
              title="Round trips with 4 KB messages")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(cli(NAME, run, plot))
