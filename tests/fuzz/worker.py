"""One fuzz process: `python -m tests.fuzz.worker --target T --workdir DIR -- LIBFUZZER_ARGS...`.

Started by `run.py`, never by hand: libFuzzer owns the process (it exits when the time or run
budget is spent, and at the first finding), so it runs apart from pytest and the runner.
The harness's MODULES are imported under atheris' instrumentation (for the packages its
INSTRUMENT names: sdserve, and the pure-Python parsers below it), which gives libFuzzer the
Python-level coverage it mutates towards; torch and the other libraries are not instrumented.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from tests.fuzz.common import TARGETS, environment


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.worker")
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv[:split])
    fuzzer_args = argv[split + 1 :]

    environment()
    import atheris

    harness = importlib.import_module(f"tests.fuzz.harness_{args.target}")
    # A module imported before the instrumentation below would give the fuzzer no coverage.
    early = [name for name in sys.modules if name.split(".")[0] in harness.INSTRUMENT]
    if early:
        print(f"warning: imported before instrumentation, not instrumented: {sorted(early)[:10]}", file=sys.stderr)
    with atheris.instrument_imports(include=list(harness.INSTRUMENT)):
        for module in harness.MODULES:
            importlib.import_module(module)
    from sdserve.cli.common import quiet_libraries

    quiet_libraries()  # no progress bars from model loading in the fuzz log
    args.workdir.mkdir(parents=True, exist_ok=True)
    harness.setup(args.workdir)
    atheris.Setup([sys.argv[0], *fuzzer_args], harness.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
