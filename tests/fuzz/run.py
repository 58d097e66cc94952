"""Run a fuzz harness for a bounded time and report what it found.

    python -m tests.fuzz.run --target adapters --seconds 60        # one target
    python -m tests.fuzz.run --target all --seconds 60             # each in turn
    python -m tests.fuzz.run --target images --runs 5000           # a run budget instead
    python -m tests.fuzz.run --target config --replay crash-1a2b   # re-run a finding in-process

Seeds are generated into the work directory (see seeds.py); libFuzzer runs in a subprocess
(worker.py) with a time and run budget, a per-input hang limit and an RSS limit. A finding is
any artifact libFuzzer writes: `crash-*` (an exception that is not an SdserveError, or an input
past the time bound), `timeout-*` (an input that never finished), `oom-*`. Each finding is
printed with the command that replays it; turn it into a test in test_regressions.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.fuzz.common import HANG_SECONDS, TARGETS, environment

REPO = Path(__file__).resolve().parents[2]
RSS_LIMIT_MB = 3072  # the worker holds torch and two tiny models (~1 GB); inputs are small
STARTUP_SECONDS = 180  # imports, model set-up and the seed pass, on a loaded 2-core machine
FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


@dataclass
class FuzzReport:
    target: str
    seconds: float  # wall time of the whole worker, start-up included
    runs: int  # inputs executed (seeds included)
    exit_code: int
    corpus: int  # inputs libFuzzer kept as new coverage
    findings: list[str] = field(default_factory=list)  # artifact paths
    slow_units: list[str] = field(default_factory=list)  # reported by libFuzzer, below our bound
    log: str = ""  # the tail of libFuzzer's output
    workdir: str = ""  # corpus/, artifacts/, fuzz.log

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.findings


def _runs_of(output: str) -> int:
    match = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    if match:
        return int(match.group(1))
    counts = re.findall(r"^#(\d+)\s", output, re.M)  # progress lines, if it was cut short
    return int(counts[-1]) if counts else 0


def run_fuzzer(
    target: str,
    *,
    seconds: int | None = None,
    runs: int | None = None,
    workdir: Path | None = None,
    seeds: Path | None = None,
    extra_corpora: tuple[Path, ...] = (),
    libfuzzer_args: tuple[str, ...] = (),
) -> FuzzReport:
    """Fuzz `target` for `seconds` (libFuzzer's -max_total_time) and/or `runs` inputs.

    `seeds` is a directory of seeds already written (else they are generated into `workdir`);
    `extra_corpora` are read too (e.g. a corpus kept from an earlier run).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets are {', '.join(TARGETS)}")
    if seconds is None and runs is None:
        raise ValueError("give a time (seconds) or a run budget (runs)")
    from tests.fuzz import seeds as seed_module

    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"sdserve-fuzz-{target}-"))
    corpus, artifacts, scratch = workdir / "corpus", workdir / "artifacts", workdir / "scratch"
    for directory in (corpus, artifacts, scratch):
        directory.mkdir(parents=True, exist_ok=True)
    if seeds is None:
        seeds = workdir / "seeds"
        seed_module.write_seeds(target, seeds)
    dictionary = seed_module.write_dictionary(target, workdir / f"{target}.dict")
    before = set(os.listdir(corpus))

    args = [f"-timeout={HANG_SECONDS}", f"-rss_limit_mb={RSS_LIMIT_MB}", f"-artifact_prefix={artifacts}/",
            f"-dict={dictionary}", "-print_final_stats=1"]
    args += [f"-max_total_time={seconds}"] if seconds is not None else []
    args += [f"-runs={runs}"] if runs is not None else []
    args += [*libfuzzer_args, str(corpus), str(seeds), *map(str, extra_corpora)]
    worker = [sys.executable, "-m", "tests.fuzz.worker", "--target", target, "--workdir", str(scratch), "--", *args]
    # libFuzzer's -rss_limit_mb reads getrusage's peak RSS, which Linux carries from a parent into
    # its forked child and across exec: started straight from a pytest process that has grown to
    # 4 GB, the worker "used" 4.6 GB before its first input. A shell in between forks the worker
    # from a small process, so the peak it reads is its own.
    command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *worker]
    log_path = workdir / "fuzz.log"
    started = time.monotonic()
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            exit_code = process.wait(timeout=(seconds or 0) + STARTUP_SECONDS + (0 if seconds else 600))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the shell and the worker under it
            process.wait()
            exit_code = -9
    output = log_path.read_text(errors="replace")
    names = sorted(os.listdir(artifacts))
    return FuzzReport(
        target=target,
        seconds=round(time.monotonic() - started, 1),
        runs=_runs_of(output),
        exit_code=exit_code,
        corpus=len(set(os.listdir(corpus)) - before),
        findings=[str(artifacts / n) for n in names if n.startswith(FINDING_PREFIXES)],
        slow_units=[str(artifacts / n) for n in names if n.startswith("slow-unit-")],
        log=output[-6000:],
        workdir=str(workdir),
    )


def replay(target: str, paths: list[Path]) -> int:
    """Run inputs through the harness in this process (no atheris): the reproducer of a finding."""
    environment()
    harness = importlib.import_module(f"tests.fuzz.harness_{target}")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sdserve-fuzz-replay-") as scratch:
        harness.setup(Path(scratch))
        for path in paths:
            try:
                harness.one_input(Path(path).read_bytes())
                print(f"{path}: ok")
            except Exception:
                failures += 1
                print(f"{path}: FAILED")
                traceback.print_exc()
    return failures


def _print(report: FuzzReport) -> None:
    status = "ok" if report.ok else f"FINDINGS (exit {report.exit_code})"
    print(f"{report.target:9} {report.runs:>9} runs  {report.seconds:>6.1f} s  +{report.corpus} corpus  {status}"
          f"  ({report.workdir})")
    for finding in report.findings:
        print(f"  {finding}\n    replay: python -m tests.fuzz.run --target {report.target} --replay {finding}")
    if not report.ok and not report.findings:
        print(report.log[-3000:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=(*TARGETS, "all"), required=True)
    parser.add_argument("--seconds", type=int, help="time budget per target (libFuzzer -max_total_time)")
    parser.add_argument("--runs", type=int, help="input budget per target (libFuzzer -runs)")
    parser.add_argument("--workdir", type=Path, help="keep corpus, artifacts and logs here (default: a temp dir)")
    parser.add_argument("--corpus", type=Path, action="append", default=[], help="extra corpus directory to read")
    parser.add_argument("--json", type=Path, help="write the reports here as JSON")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these inputs in-process and show tracebacks")
    args = parser.parse_args(argv)
    if args.replay:
        if args.target == "all":
            parser.error("--replay needs one --target")
        return 1 if replay(args.target, args.replay) else 0
    if args.seconds is None and args.runs is None:
        args.seconds = 60
    environment()
    reports = []
    for target in TARGETS if args.target == "all" else (args.target,):
        workdir = args.workdir / target if args.workdir else None
        report = run_fuzzer(target, seconds=args.seconds, runs=args.runs, workdir=workdir,
                            extra_corpora=tuple(args.corpus))
        _print(report)
        reports.append(report)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
