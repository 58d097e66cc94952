"""Ratios between two load results (B over A), matched run by run.

    python -m bench.compare bench/results/load-before.json bench/results/load.json

Accepts the suite's JSON (runs matched by system, adapter count and offered load) or a single
run's JSON from `python -m bench.load --target ...`. Throughput ratios above 1 and latency ratios
below 1 mean B is better.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import print_table

METRICS = ("throughput_rps", "latency_p50", "latency_p99", "first_progress_p50", "slo_attainment")


def runs_of(payload: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """(system, adapters, load label) -> summary."""
    if "runs" in payload:
        return {(r["system"], r["adapters"], r["load"]): r["summary"] for r in payload["runs"]}
    from bench.load_suite import load_label

    load = load_label(payload.get("rate"), payload.get("concurrency"))
    return {("target", payload["workload"]["adapters"], load): payload["summary"]}


def ratio(a: float | None, b: float | None) -> float | None:
    return b / a if a and b is not None else None


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[list[Any]]:
    runs_a, runs_b = runs_of(a), runs_of(b)
    if len(runs_a) == len(runs_b) == 1 and runs_a.keys() != runs_b.keys():
        runs_b = {next(iter(runs_a)): next(iter(runs_b.values()))}  # two single runs: compare them anyway
    rows = []
    for key in sorted(runs_a.keys() & runs_b.keys()):
        sa, sb = runs_a[key], runs_b[key]
        rows.append([*key, *(ratio(sa.get(m), sb.get(m)) for m in METRICS)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    rows = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    if not rows:
        print("no runs in common (matched by system, adapters and offered load)")
        return 1
    print(f"B / A: A = {args.a}, B = {args.b}\n")
    print_table(["system", "adapters", "load", *(f"{m} B/A" for m in METRICS)],
                [[c if c is not None else "-" for c in row] for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
