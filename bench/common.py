"""Shared plumbing for the benchmarks: where results go, how they are written, plots.

Every benchmark is a module with ``run(tiny: bool) -> dict`` (the JSON it writes) and a
``main`` that writes ``docs/benchmarks/<name>.json`` and ``<name>.png``. ``tiny`` runs the
same code at a size that takes a second or two, which is what ``tests/test_bench_smoke.py``
does so the benchmarks cannot rot. These machines are shared and noisy: every figure that is
compared is compared with a baseline measured in the same run, and the load average at the
start is recorded next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average says how busy it was."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(load[0], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed
    (it is a bench-only dependency: ``pip install -e '.[bench]'``)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cli(name: str, run: Callable[[bool], dict[str, Any]],
        plot: Callable[[dict[str, Any], Path], None] | None = None) -> int:
    """The ``python -m bench.<name>`` entry point: run, write JSON, draw the plot."""
    parser = argparse.ArgumentParser(prog=f"bench.{name}")
    parser.add_argument("--tiny", action="store_true", help="smoke-test size")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default {OUT})")
    args = parser.parse_args()
    stale = args.out / f"{name}.json"
    stale.unlink(missing_ok=True)  # a failed run must not leave the last run's figures behind
    started, before = time.perf_counter(), machine()
    data = run(args.tiny)
    data.setdefault("machine", before)
    data["bench_seconds"] = round(time.perf_counter() - started, 1)
    path = write_json(args.out, name, data)
    print(f"wrote {path}", file=sys.stderr)
    if plot is not None and pyplot() is not None:
        plot(data, args.out / f"{name}.png")
        print(f"wrote {args.out / f'{name}.png'}", file=sys.stderr)
    return 0
