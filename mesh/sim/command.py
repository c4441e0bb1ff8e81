"""``pigeon sim``: arguments, scenario assembly and output.

Kept out of ``mesh/cli.py`` so the CLI only gains a subparser and a three-line command;
everything about scenarios lives beside the simulator.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import UserError
from mesh.sim.contacts import (
    ContactEvent,
    WaypointSpec,
    format_trace,
    load_trace,
    random_waypoint_contacts,
)
from mesh.sim.engine import SimConfig, Simulation
from mesh.sim.load import LoadSpec, MessageEvent, generate_messages
from mesh.sim.policies import POLICY_NAMES

__all__ = ["Scenario", "add_arguments", "build_scenario", "run"]

log = logging.getLogger("pigeon.sim")


def _pair(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> tuple[float, float] | tuple[int, int]:
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected A,B, got {text!r}")
        try:
            a, b = kind(parts[0]), kind(parts[1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected two numbers A,B, got {text!r}") from None
        if a > b:
            raise argparse.ArgumentTypeError(f"A must not exceed B in {text!r}")
        return (a, b)
    return parse


def _area(text: str) -> tuple[float, float]:
    parts = text.lower().split("x")
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH in metres, got {text!r}") from None
    return (w, h)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pigeon sim`` options; defaults follow The ONE's default scenario where one exists."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, metavar="FILE",
                     help="contact trace in The ONE's format: 'TIME CONN A B up|down' lines")
    src.add_argument("--random-waypoint", action="store_true",
                     help="generate contacts with the random-waypoint mobility model")
    p.add_argument("--nodes", type=int, help="number of nodes (default 126; with --trace: "
                   "the highest host id + 1)")
    p.add_argument("--area", type=_area, default=(4500.0, 3400.0), metavar="WxH",
                   help="random-waypoint area in metres (default 4500x3400)")
    p.add_argument("--speed", type=_pair(float), default=(0.5, 1.5), metavar="A,B",
                   help="walking speed range, m/s (default 0.5,1.5)")
    p.add_argument("--pause", type=_pair(float), default=(0.0, 120.0), metavar="A,B",
                   help="pause at each waypoint, seconds (default 0,120)")
    p.add_argument("--range", type=float, default=10.0, metavar="M", dest="range_m",
                   help="radio range in metres (default 10, The ONE's Bluetooth)")
    p.add_argument("--relays", type=int, default=0, metavar="K",
                   help="with --random-waypoint: add K fixed relays on a grid (hosts N..N+K-1); "
                        "messages stay between the N walkers unless --msg-hosts says otherwise")
    p.add_argument("--duration", type=float, default=43_200.0, metavar="SECONDS",
                   help="simulated time (default 43200 = 12 h)")
    p.add_argument("--msg-interval", type=_pair(float), default=(25.0, 35.0), metavar="A,B",
                   help="seconds between two new messages (default 25,35)")
    p.add_argument("--msg-size", type=_pair(int), default=(100, 500), metavar="A,B",
                   help="message text size in bytes (default 100,500)")
    p.add_argument("--msg-ttl", type=float, default=300.0, metavar="MINUTES",
                   help="message lifetime in minutes (default 300)")
    p.add_argument("--msg-hosts", type=_pair(int), metavar="A,B",
                   help="senders are hosts A..B-1 (default all)")
    p.add_argument("--msg-to-hosts", type=_pair(int), metavar="A,B",
                   help="recipients are hosts A..B-1 (default: as --msg-hosts)")
    p.add_argument("--bandwidth", type=int, default=250_000, metavar="BYTES_PER_S",
                   help="link speed per direction (default 250000, The ONE's '2Mbps')")
    p.add_argument("--buffer", type=int, default=5_000_000, metavar="BYTES",
                   help="store quota per node for others' messages (default 5000000)")
    p.add_argument("--policy", choices=POLICY_NAMES, default="pigeon",
                   help="routing policy (default pigeon)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--save-trace", type=Path, metavar="FILE",
                   help="also write the contacts used, in The ONE's trace format")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@dataclass(frozen=True)
class Scenario:
    nodes: int
    contacts: list[ContactEvent]
    messages: list[MessageEvent]
    config: SimConfig


def build_scenario(args: argparse.Namespace) -> Scenario:
    """Turn parsed arguments into contacts, messages and a config; ``UserError`` if wrong."""
    if not 0 < args.duration <= 10 * 365 * 86_400:
        raise UserError("--duration must be positive and at most ten years")
    if args.bandwidth <= 0 or args.buffer <= 0:
        raise UserError("--bandwidth and --buffer must be positive")
    if args.trace is not None:
        contacts = load_trace(args.trace)
        highest = max((c.b for c in contacts), default=-1)
        nodes = args.nodes if args.nodes is not None else highest + 1
        if nodes < 2:
            raise UserError(f"{args.trace} has no contacts; give --nodes")
        if highest >= nodes:
            raise UserError(f"the trace names host {highest} but --nodes is {nodes}")
    else:
        walkers = args.nodes if args.nodes is not None else 126
        spec = WaypointSpec(nodes=walkers, area=args.area, speed=args.speed, pause=args.pause,
                            range_m=args.range_m, relays=args.relays)
        contacts = random_waypoint_contacts(spec, duration=args.duration,
                                            rng=random.Random(f"{args.seed}/mobility"))
        nodes = walkers + args.relays
    if args.relays and args.trace is not None:
        raise UserError("--relays goes with --random-waypoint; in a trace, relays are hosts")
    residents = (0, nodes - args.relays)
    load = LoadSpec(interval=args.msg_interval, size=args.msg_size, ttl_minutes=args.msg_ttl,
                    hosts=args.msg_hosts or (residents if args.relays else None),
                    to_hosts=args.msg_to_hosts or (residents if args.relays else None))
    messages = generate_messages(load, nodes=nodes, duration=args.duration,
                                 rng=random.Random(f"{args.seed}/load"))
    config = SimConfig(duration=args.duration, policy=args.policy, bandwidth=args.bandwidth,
                       buffer=args.buffer, seed=args.seed)
    return Scenario(nodes, contacts, messages, config)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, run and summarise one simulation (``pigeon sim``)."""
    scenario = build_scenario(args)
    if args.save_trace is not None:
        try:
            args.save_trace.write_text(format_trace(scenario.contacts))
        except OSError as exc:
            raise UserError(f"cannot write {args.save_trace}: {exc.strerror or exc}") from None
    sim = Simulation(scenario.config, nodes=scenario.nodes, contacts=scenario.contacts,
                     messages=scenario.messages)
    stats = sim.run()
    log.info("simulated %d nodes for %.0f s (%d contacts, %d messages) in %.1f s wall, "
             "%.1f s CPU, %d events", scenario.nodes, scenario.config.duration, stats.contacts,
             stats.created, stats.runtime_s, stats.cpu_s, stats.events)
    return stats.summary()
