"""The simulator: trace parsing, the in-memory store against the real one, scenarios whose
outcome is certain, determinism, policy differences and the ``pigeon sim`` command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mesh.cli import main
from mesh.envelope import MAX_HOPS, NO_STAMP, Envelope, Receipt
from mesh.routing import RoutingPolicy
from mesh.sim.contacts import (
    ContactEvent,
    TraceError,
    WaypointSpec,
    format_trace,
    load_trace,
    parse_trace,
    random_waypoint_contacts,
)
from mesh.sim.engine import SimConfig, Simulation
from mesh.sim.load import LoadSpec, MessageEvent, generate_messages
from mesh.sim.memstore import MemStore, SimItem
from mesh.sim.report import JSON_KEYS
from mesh.store import Store
from tests.helpers import make_envelope

# ---- trace parser -------------------------------------------------------------------------


def test_trace_parser_reads_the_one_format() -> None:
    lines = [
        "# a comment\n",
        "\n",
        "10.5 CONN 3 1 up\n",
        "2 CONN p0 p4 UP wlan0\n",  # The ONE's host prefixes, interface column, any case
        "20 CONN 1 3 down\n",
    ]
    assert parse_trace(lines) == [
        ContactEvent(2.0, 0, 4, True),
        ContactEvent(10.5, 1, 3, True),
        ContactEvent(20.0, 1, 3, False),
    ]


@pytest.mark.parametrize(("line", "reason"), [
    ("1 CONN 1 2\n", "expected 'TIME CONN"),
    ("abc CONN 1 2 up\n", "not a number"),
    ("nan CONN 1 2 up\n", "out of range"),
    ("-1 CONN 1 2 up\n", "out of range"),
    ("1e99 CONN 1 2 up\n", "out of range"),
    ("1 CONN 1 x2y up\n", "invalid host id"),
    ("1 CONN 1 99999999 up\n", "above the limit"),
    ("1 CONN 2 2 up\n", "connects to itself"),
    ("1 CONN 1 2 sideways\n", "'up' or 'down'"),
    ("1 C M1 1 2 100\n", "only CONN events"),
    ("1 CONN 1 2 up " + "x" * 2000 + "\n", "longer than"),
])
def test_malformed_trace_lines_raise_a_clear_error(line: str, reason: str) -> None:
    with pytest.raises(TraceError, match=r"line 2: .*" + reason.replace("(", r"\(")):
        parse_trace(["0 CONN 0 1 up\n", line])


def test_trace_event_count_is_bounded() -> None:
    with pytest.raises(TraceError, match="more than 3 events"):
        parse_trace([f"{i} CONN 0 1 up\n" for i in range(4)], max_events=3)


def test_trace_file_must_be_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"1 CONN 0 1 up\n\xff\xfe\n")
    with pytest.raises(TraceError, match="not UTF-8"):
        load_trace(path)
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "missing.txt")


def test_random_waypoint_is_deterministic_and_round_trips_as_a_trace(tmp_path: Path) -> None:
    spec = WaypointSpec(nodes=8, area=(200.0, 200.0), range_m=20.0)
    first = random_waypoint_contacts(spec, duration=3600, rng=random.Random(5))
    again = random_waypoint_contacts(spec, duration=3600, rng=random.Random(5))
    assert first == again and first
    assert first != random_waypoint_contacts(spec, duration=3600, rng=random.Random(6))
    path = tmp_path / "rwp.txt"
    path.write_text(format_trace(first))
    assert [(e.a, e.b, e.up) for e in load_trace(path)] == [(e.a, e.b, e.up) for e in first]
    for event in first:  # each pair alternates up, down, up...
        assert 0 <= event.a < event.b < 8 and 0 <= event.time <= 3600


def test_nodes_always_in_range_meet_once_and_never_part() -> None:
    spec = WaypointSpec(nodes=2, area=(5.0, 5.0), range_m=100.0)
    assert random_waypoint_contacts(spec, duration=600, rng=random.Random(1)) == [
        ContactEvent(0.0, 0, 1, True)]


def test_fixed_relays_join_without_changing_the_walkers() -> None:
    walkers = WaypointSpec(nodes=6, area=(300.0, 300.0), range_m=25.0)
    with_relays = WaypointSpec(nodes=6, area=(300.0, 300.0), range_m=25.0, relays=4)
    plain = random_waypoint_contacts(walkers, duration=3600, rng=random.Random(2))
    more = random_waypoint_contacts(with_relays, duration=3600, rng=random.Random(2))
    assert [e for e in more if e.b < 6] == plain  # same people, same meetings
    assert any(e.b >= 6 for e in more)
    everyone = WaypointSpec(nodes=2, area=(10.0, 10.0), range_m=100.0, relays=2)
    assert len(random_waypoint_contacts(everyone, duration=60, rng=random.Random(1))) == 6


def test_message_generator_follows_the_one() -> None:
    spec = LoadSpec(interval=(10, 10), size=(50, 50), ttl_minutes=5, hosts=(0, 3))
    msgs = generate_messages(spec, nodes=5, duration=45, rng=random.Random(1))
    assert [m.time for m in msgs] == [10, 20, 30, 40]
    assert [m.name for m in msgs] == ["M1", "M2", "M3", "M4"]
    assert all(m.sender != m.recipient and m.sender < 3 and m.recipient < 3 for m in msgs)
    assert all(m.size == 50 and m.ttl_s == 300 for m in msgs)


# ---- the in-memory store mirrors the SQLite one ------------------------------------------


def test_memstore_matches_the_real_store_step_by_step(tmp_path: Path) -> None:
    """Random adds, receipts, deletes and sweeps under a tight quota: same results, same set."""
    now = 29_000_000 * 60.0 + 600
    quota = 2_000
    real = Store.open(tmp_path / "s.sqlite", quota_bytes=quota, neighbour_share=0.5)
    mem = MemStore(quota_bytes=quota, neighbour_share=0.5)
    rng = random.Random(3)
    envs = [make_envelope(i, body_len=rng.randrange(40, 300), ttl_s=rng.choice([600, 86_400]))
            for i in range(60)]
    try:
        for step in range(300):
            op = rng.random()
            env = rng.choice(envs)
            if op < 0.6:
                origin = rng.choice(["a", "b", "c"])
                local = rng.random() < 0.1
                assert real.add_envelope(env, now=now, origin=origin, local=local) == \
                    mem.add_envelope(env, now=now, origin=origin, local=local), step
            elif op < 0.8:
                i = envs.index(env)
                receipt = Receipt(secret=i.to_bytes(16, "big"), issued_min=int(now // 60))
                assert real.add_receipt(receipt, now=now) == mem.add_receipt(receipt, now=now)
            elif op < 0.9:
                assert real.delete_envelope(env.id, now=now) == \
                    mem.delete_envelope(env.id, now=now)
            else:
                now += rng.choice([10, 700])
                real.sweep(now)
                mem.sweep(now)
            assert real.sync_keys() == mem.sync_keys(), step
            stats = real.stats()
            assert stats.quota_used == mem.quota_used
            assert stats.bytes == mem.envelope_bytes
    finally:
        real.close()


def test_memstore_keeps_the_hop_budget_it_is_given() -> None:
    """``hops_left=`` stores what ``env.with_mutable(hops_left=...)`` would, byte for byte."""
    now = 29_000_000 * 60.0
    env = make_envelope(7, body_len=90, hops=9)
    direct, patched = MemStore(quota_bytes=10_000), MemStore(quota_bytes=10_000)
    direct.add_envelope(env.with_mutable(hops_left=4), now=now, origin="a")
    patched.add_envelope(env, now=now, origin="a", hops_left=4)
    a, b = direct.get_item(env.id), patched.get_item(env.id)
    assert a is not None and b is not None
    assert (a.data, a.hops_left, a.size) == (b.data, b.hops_left, b.size)
    assert b.data is not None and Envelope.from_bytes(b.data).hops_left == 4


def _reference_outgoing(item: SimItem, now: float) -> bytes:
    """The header rewrite spelled out on a parsed envelope (what the fast path must equal)."""
    assert item.data is not None
    env = Envelope.from_bytes(item.data)
    ttl_left = max(0, min(env.ttl_s, int(item.expires_at - now)))
    return env.with_mutable(hops_left=min(item.hops_left, MAX_HOPS),
                            ttl_left_s=ttl_left).to_bytes()


def test_outgoing_envelope_rewrites_only_hops_and_lifetime() -> None:
    rng = random.Random(9)
    policy = RoutingPolicy()
    for i in range(200):
        ttl = rng.choice([60, 600, 86_400])
        stamp = NO_STAMP if i % 3 else rng.randbytes(8)
        env = make_envelope(i, body_len=rng.randrange(0, 400), ttl_s=ttl,
                            hops=rng.randrange(0, MAX_HOPS + 1)).with_mutable(stamp=stamp)
        now = 1_000_000.0
        item = SimItem(env.id, "envelope", env.created_min, env.to_bytes(),
                       now + rng.uniform(-100, 2 * ttl), rng.randrange(0, 200), 0, False,
                       env.size, "a", env.receipt_hash, 0.0)
        out = policy.outgoing_envelope(item, now)
        assert out == _reference_outgoing(item, now), i
        sent = Envelope.from_bytes(out)
        assert sent.id == env.id and sent.stamp == stamp
        assert sent.hops_left == min(item.hops_left, MAX_HOPS)


# ---- scenarios ----------------------------------------------------------------------------

def _run(policy: str, contacts: list[ContactEvent], messages: list[MessageEvent], *,
         nodes: int, duration: float = 3600, bandwidth: int = 250_000) -> dict[str, object]:
    config = SimConfig(duration=duration, policy=policy, bandwidth=bandwidth)
    return Simulation(config, nodes=nodes, contacts=contacts, messages=messages).run().summary()


@pytest.mark.parametrize("policy", ["epidemic", "spray-and-wait", "pigeon", "pigeon-budget"])
def test_a_message_over_a_chain_is_certainly_delivered(policy: str) -> None:
    """0 meets 1, later 1 meets 2: a message from 0 to 2 arrives in two hops."""
    contacts = [ContactEvent(100, 0, 1, True), ContactEvent(400, 0, 1, False),
                ContactEvent(1000, 1, 2, True), ContactEvent(1300, 1, 2, False)]
    messages = [MessageEvent(10, "M1", 0, 2, 200, 3600)]
    report = _run(policy, contacts, messages, nodes=3)
    assert report["created"] == report["delivered"] == 1
    assert report["delivery_prob"] == 1.0
    assert report["relayed"] == 2 and report["overhead_ratio"] == 1.0
    assert report["hopcount_avg"] == 2.0
    assert 990 <= float(report["latency_avg"]) < 1001  # type: ignore[arg-type]
    assert report["reconcile_round_trips_avg"] is not None  # the real session reconciled


def test_bandwidth_limits_what_a_short_contact_carries() -> None:
    """At 100 B/s a 1-second contact cannot even finish the handshake; 60 s are enough."""
    messages = [MessageEvent(1, "M1", 0, 1, 300, 3600)]
    short = [ContactEvent(10, 0, 1, True), ContactEvent(11, 0, 1, False)]
    long = [ContactEvent(10, 0, 1, True), ContactEvent(70, 0, 1, False)]
    assert _run("pigeon", short, messages, nodes=2, bandwidth=100)["delivered"] == 0
    report = _run("pigeon", long, messages, nodes=2, bandwidth=100)
    assert report["delivered"] == 1
    assert float(report["latency_avg"]) > 9 + 600 / 100  # type: ignore[arg-type]


def test_spray_and_wait_hands_out_six_copies_by_halves() -> None:
    """The source (6 copies) meets relays 1..5 in turn: it gives 3, 1, 1 and then waits."""
    contacts = []
    for i, peer in enumerate(range(1, 6)):
        contacts += [ContactEvent(100 + 100 * i, 0, peer, True),
                     ContactEvent(150 + 100 * i, 0, peer, False)]
    messages = [MessageEvent(10, "M1", 0, 9, 100, 3600)]
    report = _run("spray-and-wait", contacts, messages, nodes=10)
    assert report["relayed"] == 3 and report["delivered"] == 0
    assert _run("epidemic", contacts, messages, nodes=10)["relayed"] == 5


def test_a_spent_copy_budget_still_reaches_the_recipient_but_no_one_else() -> None:
    """``pigeon-budget``: 12 tokens halve as 6, 3, 1, 1 over relays 1..4; relay 5 gets the
    envelope (nobody can tell it is not the recipient) and declines it; the recipient, met
    last by the source holding its last token, keeps it."""
    contacts = []
    for i, peer in enumerate([1, 2, 3, 4, 5, 9]):
        contacts += [ContactEvent(100 + 100 * i, 0, peer, True),
                     ContactEvent(150 + 100 * i, 0, peer, False)]
    messages = [MessageEvent(10, "M1", 0, 9, 100, 3600)]
    report = _run("pigeon-budget", contacts, messages, nodes=10)
    assert report["delivered"] == 1 and report["hopcount_avg"] == 1.0
    assert report["relayed"] == 4 + 1 and report["declined"] == 1
    assert _run("pigeon", contacts, messages, nodes=10)["declined"] == 0


def _scenario(seed: int) -> tuple[list[ContactEvent], list[MessageEvent]]:
    contacts = random_waypoint_contacts(
        WaypointSpec(nodes=10, area=(400.0, 400.0), range_m=30.0), duration=1800,
        rng=random.Random(seed))
    messages = generate_messages(LoadSpec(interval=(60, 90)), nodes=10, duration=1800,
                                 rng=random.Random(seed))
    return contacts, messages


def test_same_seed_same_result_different_seed_different_result() -> None:
    contacts, messages = _scenario(1)
    first = _run("pigeon", contacts, messages, nodes=10, duration=1800)
    assert first == _run("pigeon", contacts, messages, nodes=10, duration=1800)
    other = _run("pigeon", *_scenario(2), nodes=10, duration=1800)
    assert other != first


def test_policies_differ_as_expected() -> None:
    contacts, messages = _scenario(1)
    epidemic, spray, pigeon = (_run(p, contacts, messages, nodes=10, duration=1800)
                               for p in ("epidemic", "spray-and-wait", "pigeon"))
    # Same floods, but receipts delete copies: as many delivered, fewer relays.
    assert pigeon["delivered"] == epidemic["delivered"]
    assert int(pigeon["relayed"]) < int(epidemic["relayed"])  # type: ignore[call-overload]
    assert int(pigeon["purged"]) > 0 == int(epidemic["purged"])  # type: ignore[call-overload]
    # A copy budget relays far less and cannot deliver more than flooding.
    assert int(spray["relayed"]) < int(pigeon["relayed"])  # type: ignore[call-overload]
    assert int(spray["delivered"]) <= int(epidemic["delivered"])  # type: ignore[call-overload]
    # Without the destination oracle, spent copies are still carried to peers who decline them.
    budget = _run("pigeon-budget", contacts, messages, nodes=10, duration=1800)
    assert int(budget["relayed"]) < int(pigeon["relayed"])  # type: ignore[call-overload]
    assert int(budget["declined"]) > 0  # type: ignore[call-overload]
    assert int(budget["delivered"]) <= int(pigeon["delivered"])  # type: ignore[call-overload]


# ---- the command line ---------------------------------------------------------------------


def test_cli_json_has_the_one_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "rwp.txt"
    code = main(["--home", str(tmp_path / "unused"), "sim", "--random-waypoint", "--nodes", "6",
                 "--area", "200x200", "--range", "30", "--duration", "900",
                 "--msg-interval", "60,120", "--msg-size", "20,200", "--msg-ttl", "30",
                 "--bandwidth", "20000", "--buffer", "100000", "--policy", "spray-and-wait",
                 "--seed", "3", "--save-trace", str(trace), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(JSON_KEYS) <= set(report)
    assert report["policy"] == "spray-and-wait" and report["nodes"] == 6
    assert report["created"] > 0 and 0 <= report["delivery_prob"] <= 1
    assert not (tmp_path / "unused").exists()  # the simulator needs no profile
    # The saved contacts replay as a trace with the same outcome.
    code = main(["--home", str(tmp_path / "unused"), "sim", "--trace", str(trace),
                 "--duration", "900", "--msg-interval", "60,120", "--msg-size", "20,200",
                 "--msg-ttl", "30", "--bandwidth", "20000", "--buffer", "100000",
                 "--policy", "spray-and-wait", "--seed", "3", "--json"])
    assert code == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["created"] == report["created"]
    assert replayed["contacts"] == report["contacts"]


def test_cli_reports_a_bad_trace_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "t.txt"
    trace.write_text("0 CONN 0 1 up\n5 CONN 0 1 maybe\n")
    assert main(["sim", "--trace", str(trace), "--duration", "60"]) == 2
    assert "line 2: expected 'up' or 'down'" in capsys.readouterr().err


# ---- speed shortcuts change nothing ---------------------------------------------------------


def test_decoded_reconcile_messages_skip_only_checks_decoding_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Reconciler`` checks a message that ``decode_message`` built with a shorter validator
    (the simulator's hottest path). A run where every message takes the full ``_validate``
    instead must come out identical to the byte and the second."""
    import mesh.reconcile as reconcile

    contacts, messages = _scenario(1)
    config = SimConfig(duration=1800, policy="pigeon")
    shortcuts = 0
    real_shortcut = reconcile.Reconciler._validate_decoded

    def counted(self: reconcile.Reconciler, ranges: object, mark: int) -> object:
        nonlocal shortcuts
        shortcuts += 1
        return real_shortcut(self, ranges, mark)  # type: ignore[arg-type]

    monkeypatch.setattr(reconcile.Reconciler, "_validate_decoded", counted)
    fast = Simulation(config, nodes=10, contacts=contacts, messages=messages).run()
    assert shortcuts > 100  # the shortcut really ran

    # Nothing is marked as decoded: every message gets the full checks.
    monkeypatch.setattr(reconcile, "_mark_decoded", lambda message, mark: None)
    shortcuts = 0
    full = Simulation(config, nodes=10, contacts=contacts, messages=messages).run()
    assert shortcuts == 0
    assert fast.summary() == full.summary()
    assert (fast.wire_bytes, fast.latencies, fast.hopcounts, fast.delivery_times) == (
        full.wire_bytes, full.latencies, full.hopcounts, full.delivery_times)
