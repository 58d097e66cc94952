"""Start-up time of CLI commands that need no model: wall time and the process's CPU time.

    python -m bench.cli_startup --target 127.0.0.1:50051 [--before DIR] [--repeats 5] [--out FILE.json]

`--target` is a running server (`sdserve serve`) for `client health` and `client models`.
`--before DIR` also times an older tree (a directory holding its `sdserve/` package, e.g.
`git archive <commit> sdserve | tar -x -C DIR`), interleaved with this checkout so both see the
same machine. CPU time (user + sys of the child) moves much less than wall time when other
processes share the cores. docs/benchmarks.md, "CLI start-up", has the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def commands(target: str) -> list[str]:
    return ["--help", f"client --target {target} health", f"client --target {target} models", "models list"]


def run_once(tree: Path, command: str) -> tuple[float, float]:
    """(wall s, CPU s) of `sdserve COMMAND` with `tree`'s package first on the path."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sdserve.cli.main", *command.split()], capture_output=True,
                          text=True, env=env, cwd="/")  # cwd: not a checkout, so PYTHONPATH decides
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"`sdserve {command}` in {tree} failed: {done.stderr.strip()[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT of a running sdserve server")
    parser.add_argument("--before", type=Path, help="an older tree to time as well")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the samples as JSON here")
    args = parser.parse_args(argv)
    trees = {"after": CHECKOUT, **({"before": args.before} if args.before else {})}
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {t: {c: [] for c in commands(args.target)} for t in trees}
    for _ in range(args.repeats):
        for command in commands(args.target):
            for name, tree in trees.items():
                samples[name][command].append(run_once(tree, command))

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    print(f"median (min-max) of {args.repeats}, load average {os.getloadavg()[0]:.1f} at the end")
    print("| command | tree | wall s | CPU s |")
    print("|---|---|---:|---:|")
    for command in commands(args.target):
        for name in trees:
            walls, cpus = zip(*samples[name][command])
            print(f"| `sdserve {command.replace(args.target, 'TARGET')}` | {name} | {cell(walls)} | {cell(cpus)} |")
    if args.out:
        args.out.write_text(json.dumps({"repeats": args.repeats, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
