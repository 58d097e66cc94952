"""The load suite: sdserve against baselines (a) diffusers and (b) homogeneous batching, driven by
the same generator with the same request sequence, in one run; tables, JSON and PNG plots.

    python -m bench.load --suite quick     # make bench: 32 adapters at two offered loads
    python -m bench.load --suite full      # 8, 32 and 128 adapters at two offered loads
    python -m bench.load --suite goal      # 32 adapters at 0.8x sdserve's measured capacity

Offered loads that should sit "just under capacity" are not fixed rates: at each adapter count the
closed-loop capacity point runs first, and those loads are a stated fraction of the throughput
sdserve reached there on this machine, this run (a fixed 12 req/s was past sdserve's capacity on a
slower VM, so p99 measured queueing). The tables show the measured capacity and the rate it gave.

All three servers run at once (each its own process, one torch thread); runs take turns, one
system at a time, so the machine's background load hits them alike. Before each system's first
run at a given adapter count a short closed-loop warm-up (not recorded) loads weights and caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from bench.baselines import SYSTEMS, launch
from bench.common import machine, write_json
from bench.load_gen import Workload, drive, load_label, print_summaries, run_one, upload_adapters
from bench.plots import cdf_points, line_chart

# On 2 shared CPU cores with tiny-sd1 at 32 adapters, baseline (a) serves 2 to 4 req/s (depending
# on what else the machine runs), (b) 7 to 9 and sdserve 13 to 14. "rates" are fixed offered loads
# (requests/s): 2/s is within everyone's capacity (latency is the difference). "fractions" are
# offered loads as fractions of sdserve's capacity measured in the same run: 0.75x is beyond both
# baselines' capacity and within sdserve's on any machine (10/s was 0.75x here, past it on a slower VM).
# "capacity" is a closed-loop run with that many requests in flight: each system's most
# throughput, whatever the latency; it runs first at each adapter count.
SUITES: dict[str, dict[str, Any]] = {
    "quick": {"adapters": (32,), "rates": (2.0,), "fractions": (0.75,), "capacity": 16, "duration": 15.0,
              "warmup": 3.0, "timeout": 20.0},
    "full": {"adapters": (8, 32, 128), "rates": (2.0,), "fractions": (0.75,), "capacity": 16, "duration": 20.0,
             "warmup": 4.0, "timeout": 20.0},
    # The goal at one operating point: an offered load just under sdserve's capacity.
    "goal": {"adapters": (32,), "rates": (), "fractions": (0.8,), "capacity": 16, "duration": 20.0,
             "warmup": 4.0, "timeout": 20.0},
}
CAPACITY_OF = "sdserve"  # whose measured capacity sets the fractional loads (the system under test)
TENANTS = 4


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def fraction_label(fraction: float) -> str:
    """A fractional load's label: stable across runs and machines (bench.compare matches runs by it)."""
    return f"{fraction:g}x cap"


def offered(run: dict) -> str:
    """The offered load as the tables show it: a fractional load with the rate it was."""
    if run.get("fraction") is None:
        return run["load"]
    return f"{run['load']} = {run['rate']:.3g}/s"


def capacity_lines(capacities: dict[int, float], plan: dict, of: str) -> str:
    return "".join(f"{of} closed-loop capacity at {adapters} adapters (closed {plan['capacity']}): {rps:.3g} req/s; "
                   f"offered loads 'Fx cap' are F times it\n" for adapters, rps in capacities.items())


def markdown(runs: list[dict]) -> str:
    """One row per (adapters, offered load): each system's throughput and p99, and sdserve's ratios."""
    lines = ["| adapters | offered load | system | throughput req/s | p50 s | p99 s | TTFP p50 s | SLO | errors |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        s = run["summary"]
        lines.append(f"| {run['adapters']} | {offered(run)} | {run['system']} | {_fmt(s['throughput_rps'])} | "
                     f"{_fmt(s['latency_p50'])} | {_fmt(s['latency_p99'])} | {_fmt(s['first_progress_p50'])} | "
                     f"{100 * s['slo_attainment']:.0f}% | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(s['errors'].items())) or '-'} |")
    lines += ["", "| adapters | offered load | sdserve/diffusers throughput | diffusers p99 / sdserve p99 | "
              "sdserve/homogeneous throughput | homogeneous p99 / sdserve p99 |", "|---:|---:|---:|---:|---:|---:|"]
    keyed = {(r["adapters"], r["load"], r["system"]): r["summary"] for r in runs}
    shown = {(r["adapters"], r["load"]): offered(r) for r in runs}
    for adapters, load in dict.fromkeys((r["adapters"], r["load"]) for r in runs):
        ours = keyed.get((adapters, load, "sdserve"))
        if ours is None:
            continue
        cells = []
        for other in ("diffusers", "homogeneous"):
            theirs = keyed.get((adapters, load, other))
            thr = ours["throughput_rps"] / theirs["throughput_rps"] if theirs and theirs["throughput_rps"] else None
            p99 = (theirs["latency_p99"] / ours["latency_p99"]
                   if theirs and theirs["latency_p99"] and ours["latency_p99"] else None)
            cells += [_fmt(thr), _fmt(p99)]
        lines.append(f"| {adapters} | {shown[adapters, load]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(runs: list[dict], directory: Path, prefix: str = "load") -> list[Path]:
    written = []
    for adapters in sorted({r["adapters"] for r in runs}):
        series = {f"{r['system']} @ {r['load']}": cdf_points(r["latencies"]) for r in runs
                  if r["adapters"] == adapters}
        written.append(line_chart(directory / f"{prefix}_cdf_{adapters}.png", f"end-to-end latency CDF, {adapters} adapters",
                                  "latency, seconds", "fraction of successful requests", series, log_x=True,
                                  markers=False))
    for metric, label in (("throughput_rps", "throughput, req/s"), ("latency_p99", "p99 latency, s")):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in runs:
            value = r["summary"][metric]
            if value is not None and r["rate"] is not None:  # closed-loop runs have no offered load
                series.setdefault(f"{r['system']}, {r['adapters']} adapters", []).append((r["rate"], value))
        name = "throughput" if metric == "throughput_rps" else "p99"
        written.append(line_chart(directory / f"{prefix}_{name}.png", f"{label} against offered load",
                                  "offered load, req/s", label, series))
    return written


def run_suite(name: str, out: Path, *, slo: float = 2.0, seed: int = 0, model: str = "tiny-sd1",
              systems: tuple[str, ...] = SYSTEMS, duration: float | None = None) -> int:
    """`duration`: seconds of sending per run instead of the suite's (a shorter check of the code path)."""
    plan = dict(SUITES[name])
    if duration is not None:
        plan["duration"] = duration
    runs: list[dict] = []
    capacities: dict[int, float] = {}  # adapters -> measured closed-loop req/s of `of`
    of = CAPACITY_OF if CAPACITY_OF in systems else systems[0]
    adapter_dir = out.parent / "adapters"
    with tempfile.TemporaryDirectory(prefix="sdserve-load-") as tmp, contextlib.ExitStack() as stack:
        targets = {system: stack.enter_context(launch(system, Path(tmp), model, TENANTS, log_dir=out.parent)) for system in systems}
        for target in targets.values():
            upload_adapters(target, model, max(plan["adapters"]), TENANTS, adapter_dir)
        for adapters in plan["adapters"]:
            for target in targets.values():  # warm-up, not recorded
                warm = Workload(model=model, tenants=TENANTS, adapters=adapters, seed=seed + 99)
                asyncio.run(drive(target, warm, concurrency=2, duration=plan["warmup"], max_requests=200,
                                  timeout=plan["timeout"], progress=False))
            # Capacity first: the fractional loads are fractions of what it measures.
            loads: list[tuple[float | None, int | None, float | None]] = [(None, plan["capacity"], None)]
            loads += [(rate, None, None) for rate in plan["rates"]]
            loads += [(None, None, fraction) for fraction in plan["fractions"]]
            for rate, concurrency, fraction in loads:
                if fraction is not None:
                    if not capacities.get(adapters):
                        print(f"skipped {fraction_label(fraction)} at {adapters} adapters: {of} served nothing "
                              "in the capacity run")
                        continue
                    rate = round(fraction * capacities[adapters], 2)
                workload = Workload(model=model, tenants=TENANTS, adapters=adapters, seed=seed)
                for system, target in targets.items():
                    load = fraction_label(fraction) if fraction is not None else load_label(rate, concurrency)
                    result = run_one(target, workload, rate=rate, concurrency=concurrency, duration=plan["duration"],
                                     max_requests=int((rate or 20) * plan["duration"] * 2) + 10,
                                     timeout=plan["timeout"], slo=slo, label=f"{system} M={adapters} {load}")
                    records = result.pop("records")
                    result.update(system=system, adapters=adapters, load=load, fraction=fraction,
                                  latencies=[round(r["latency"], 4) for r in records if r["status"] == "OK"])
                    runs.append(result)
                    if concurrency is not None and system == of:
                        capacities[adapters] = result["summary"]["throughput_rps"] or 0.0
                    print_summaries([(system, adapters, offered(result), result["summary"])])
    print(f"\nload suite {name!r}: {model}, {TENANTS} tenants, Zipf adapters, stacks of 0-3, mixed steps and "
          f"schedulers; {machine()['cpu']}\n")
    print_summaries([(r["system"], r["adapters"], offered(r), r["summary"]) for r in runs])
    table = capacity_lines(capacities, plan, of) + "\n" + markdown(runs)
    print("\n" + table)
    command = f"python -m bench.load --suite {name}" + (f" --duration {duration:g}" if duration is not None else "")
    path = write_json("load", {"suite": name, "plan": plan, "command": command, "capacity_of": of,
                               "capacity_rps": {str(m): rps for m, rps in capacities.items()}, "runs": runs}, out)
    out.with_suffix(".md").write_text(table)
    pngs = plots(runs, out.parent, out.stem)
    print(f"wrote {path}, {out.with_suffix('.md')}, " + ", ".join(str(p) for p in pngs))
    unexpected = sum(r["summary"]["unexpected_errors"] for r in runs)
    if unexpected:
        print(f"FAILED: {unexpected} request(s) failed unexpectedly (see errors above)")
    return 1 if unexpected else 0
