"""Routing policies compared in the simulator, on the same contacts and the same load.

Scenario (text-sized messages, The ONE's defaults where it has them): 126 nodes walking
random waypoints for 12 simulated hours, a message every 25-35 s of 100-500 bytes of text
between random nodes, TTL 300 min, 250 kB/s links, 5 MB buffers. Two radio densities:
``dense`` (2000 x 2000 m, 30 m range: most messages can arrive, as on The ONE's Helsinki
map) and ``sparse`` (The ONE's default world, 4500 x 3400 m, 10 m Bluetooth range).
Each run also records how long it took, for the simulator's own speed goal (126 nodes, 12
simulated hours, under 2 minutes). Runs go two at a time (this machine has two cores).

The issue's goal for Pigeon's default policy: delivery within 1 percentage point of
epidemic's at an overhead ratio at most twice spray-and-wait's, on the same trace. Beside
the three policies the issue names runs ``pigeon-budget``, Pigeon with a spray copy budget
but without spray-and-wait's destination oracle, to show what a budget costs a protocol
whose relays cannot tell whom an envelope is for. Airtime (every byte on every link per
delivered envelope byte) is reported for each policy, since on BLE that is what counts.
"""

from __future__ import annotations

import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import cli, pyplot
from mesh.sim.contacts import WaypointSpec, random_waypoint_contacts
from mesh.sim.engine import SimConfig, Simulation
from mesh.sim.load import LoadSpec, generate_messages
from mesh.sim.policies import POLICY_NAMES

NAME = "sim_policies"
SPEED_GOAL_S = 120.0
SCENARIOS: dict[str, dict[str, Any]] = {
    "dense": {"nodes": 126, "area": (2000.0, 2000.0), "range_m": 30.0, "duration": 43_200.0},
    "sparse": {"nodes": 126, "area": (4500.0, 3400.0), "range_m": 10.0, "duration": 43_200.0},
}
TINY = {"tiny": {"nodes": 8, "area": (300.0, 300.0), "range_m": 30.0, "duration": 1200.0}}


def simulate(scenario: dict[str, Any], policy: str, seed: int = 1) -> dict[str, Any]:
    """One run; contacts and load depend only on the scenario and seed, not the policy."""
    spec = WaypointSpec(nodes=scenario["nodes"], area=scenario["area"],
                        range_m=scenario["range_m"])
    contacts = random_waypoint_contacts(spec, duration=scenario["duration"],
                                        rng=random.Random(f"{seed}/mobility"))
    load = LoadSpec(interval=(25.0, 35.0), size=(100, 500), ttl_minutes=300.0)
    messages = generate_messages(load, nodes=spec.nodes, duration=scenario["duration"],
                                 rng=random.Random(f"{seed}/load"))
    sim = Simulation(SimConfig(duration=scenario["duration"], policy=policy, seed=seed),
                     nodes=spec.nodes, contacts=contacts, messages=messages)
    stats = sim.run()
    summary = stats.summary()
    summary["runtime_s"] = round(stats.runtime_s, 1)
    summary["cpu_s"] = round(stats.cpu_s, 1)
    summary["events"] = stats.events
    # Delivery over time, for the plot (cumulative fraction of all messages created).
    created = max(stats.created, 1)
    times = sorted(stats.delivery_times)
    summary["delivered_curve"] = [[round(t), (i + 1) / created]
                                  for i, t in enumerate(times) if i % 10 == 0 or i == len(times) - 1]
    return summary


def _job(args: tuple[str, dict[str, Any], str]) -> tuple[str, str, dict[str, Any]]:
    name, scenario, policy = args
    return name, policy, simulate(scenario, policy)


def judge(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    goals = []
    for name, runs in results.items():
        if set(runs) != set(POLICY_NAMES):
            continue
        epi, saw, pig = runs["epidemic"], runs["spray-and-wait"], runs["pigeon"]
        gap = round(100 * (epi["delivery_prob"] - pig["delivery_prob"]), 2)
        limit = None if saw["overhead_ratio"] is None else round(2 * saw["overhead_ratio"], 2)
        goals.append({"goal": f"{name}: pigeon delivery within 1 pp of epidemic (pp behind)",
                      "limit": 1.0, "measured": gap, "met": gap <= 1.0})
        goals.append({"goal": f"{name}: pigeon overhead <= 2x spray-and-wait's",
                      "limit": limit, "measured": pig["overhead_ratio"],
                      "met": limit is not None and pig["overhead_ratio"] is not None
                      and pig["overhead_ratio"] <= limit})
        airtime = {p: r["bytes_relayed_per_delivered_byte"] for p, r in runs.items()}
        others = ", ".join(f"{p} {airtime[p]}" for p in POLICY_NAMES if p != "pigeon")
        # The issue asks for this figure to be reported (airtime is what counts on BLE),
        # with no goal: the row says so instead of judging it.
        goals.append({"goal": f"{name}: pigeon bytes on the air per delivered byte ({others})",
                      "limit": None, "measured": airtime["pigeon"], "met": None,
                      "report_only": True})
        slowest = max(r["runtime_s"] for r in runs.values())
        slowest_cpu = max(r["cpu_s"] for r in runs.values())
        goals.append({"goal": f"{name}: {pig['nodes']} nodes x {pig['duration'] / 3600:.0f} h "
                      "simulated in under 2 min (slowest policy, wall s)",
                      "limit": SPEED_GOAL_S, "measured": slowest, "cpu_s": slowest_cpu,
                      "met": slowest < SPEED_GOAL_S})
    return goals


def run(tiny: bool) -> dict[str, Any]:
    scenarios = TINY if tiny else SCENARIOS
    jobs = [(name, sc, policy) for name, sc in scenarios.items() for policy in POLICY_NAMES]
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in scenarios}
    if tiny:
        done = [_job(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=2) as pool:
            done = list(pool.map(_job, jobs))
    for name, policy, summary in done:
        results[name][policy] = summary
    return {"scenarios": scenarios, "results": results, "goals": judge(results)}


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    results = data["results"]
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, (name, runs) in enumerate(results.items()):
        curve_ax, bar_ax = axes[row]
        for policy, summary in runs.items():
            pts = summary["delivered_curve"]
            curve_ax.plot([p[0] / 3600 for p in pts], [p[1] for p in pts], label=policy,
                          linestyle="--" if policy == "epidemic" else "-")  # often under pigeon
        curve_ax.set(xlabel="simulated hours", ylabel="delivered / created",
                     title=f"{name}: delivery over time")
        curve_ax.legend()
        names = list(runs)
        delivery = [runs[p]["delivery_prob"] for p in names]
        overhead = [runs[p]["overhead_ratio"] or 0 for p in names]
        bar_ax.bar(names, delivery, color="tab:green")
        bar_ax.set(ylim=(0, 1), ylabel="delivery probability", title=f"{name}: delivery vs overhead")
        twin = bar_ax.twinx()
        twin.plot(names, overhead, "o-", color="tab:red")
        twin.set(ylabel="overhead ratio (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(cli(NAME, run, plot))
