"""The fuzz harnesses: seeds that reach past the parsers, and bounded fuzz runs with no findings.

`make test` fuzzes each target for a few seconds; `make test-all` (the `slow` marker) for a
minute each. A failure names the saved input and the command that replays it; once understood
and fixed, the input joins test_regressions.py.
"""

from __future__ import annotations

import importlib
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sdserve.errors import SdserveError
from tests.fuzz.common import TARGETS
from tests.fuzz.run import FuzzReport, run_fuzzer
from tests.fuzz.seeds import write_seeds

# Fuzzing time per target in `make test` (each worker adds ~6 s of imports and set-up).
BRIEF_SECONDS = {"adapters": 4, "images": 3, "requests": 3, "config": 2}
LONG_SECONDS = 60

needs_atheris = pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                                   reason="atheris is not installed (it is in the `test` extra)")


@pytest.fixture(scope="session")
def seed_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    for target in TARGETS:
        write_seeds(target, root / target)
    return {target: root / target for target in TARGETS}


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory) -> dict:
    loaded = {}
    for target in TARGETS:
        harness = importlib.import_module(f"tests.fuzz.harness_{target}")
        harness.setup(tmp_path_factory.mktemp(f"harness-{target}"))
        loaded[target] = harness
    return loaded


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_hold_the_property(target, seed_dirs, harnesses):
    """Every seed runs through its harness in-process (no atheris) without a finding."""
    seeds = sorted(seed_dirs[target].iterdir())
    assert seeds
    for seed in seeds:
        harnesses[target].one_input(seed.read_bytes())


def _accepted(function, *args, **kwargs) -> bool:
    try:
        function(*args, **kwargs)
    except SdserveError:
        return False
    return True


def test_seeds_reach_past_the_parsers(seed_dirs, harnesses):
    """The seeds are valid inputs (except the few that are refused on purpose): mutations of
    them reach the checks behind the parsers. A format change that broke them all would leave
    the fuzzer knocking at the front door without anyone noticing."""
    from sdserve.adapters import load_embedding, load_hypernetwork, load_lora
    from sdserve.api import convert
    from sdserve.engine.images import decode_image
    from sdserve.server.config import load_config

    state = harnesses["adapters"]._state
    for path in sorted(seed_dirs["adapters"].iterdir()):
        data, name = path.read_bytes(), path.name
        if name.startswith("lora-"):
            targets = state["sdxl_targets"] if name.startswith("lora-sdxl") else state["sd1_targets"]
            assert _accepted(load_lora, data, name, targets), name
        elif name.startswith("embedding-"):
            widths = state["sdxl_text"] if "sdxl" in name else state["sd1_text"]
            assert _accepted(load_embedding, data, name, widths), name
        elif name.startswith("hypernetwork-32"):
            assert _accepted(load_hypernetwork, data, name, state["sd1_attention"]), name
    for path in sorted(seed_dirs["images"].iterdir()):
        decodable = path.suffix in (".png", ".jpg")
        assert _accepted(decode_image, path.read_bytes(), "image", max_pixels=1 << 20) == decodable, path.name
    serve = harnesses["requests"]._serve
    for path in sorted(seed_dirs["requests"].glob("*.json")):
        refused = "/etc/passwd" in path.read_text()  # a client path: refused on purpose
        spec = convert.spec_from_json_line(path.read_text())
        assert _accepted(serve, spec) != refused, path.name
    for path in sorted(seed_dirs["config"].iterdir()):
        load_config(path)


def _explain(report: FuzzReport) -> str:
    lines = [f"{report.target}: exit {report.exit_code}, {report.runs} runs in {report.seconds} s"]
    for finding in report.findings:
        lines.append(f"finding {finding}\n  replay: python -m tests.fuzz.run --target {report.target} --replay {finding}")
    return "\n".join(lines) + "\n--- libFuzzer log (tail) ---\n" + report.log[-4000:]


def _check(report: FuzzReport, seed_dir: Path) -> None:
    assert report.ok, _explain(report)
    # It ran: every seed, then mutations of them (a worker that died at start-up runs nothing).
    assert report.runs > len(list(seed_dir.iterdir())), _explain(report)


# slow: atheris mutations (38 s, mostly workers' start-up); the seed corpora replay through every harness by default (test_seeds_*)
@pytest.mark.slow
@needs_atheris
def test_fuzz_briefly(seed_dirs, tmp_path):
    """Every target for a few seconds, two workers at a time: most of a worker's time is its
    start-up (torch, the tiny models), which two cores overlap."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(
            lambda target: run_fuzzer(target, seconds=BRIEF_SECONDS[target], seeds=seed_dirs[target],
                                      workdir=tmp_path / target),
            TARGETS,
        ))
    for report in reports:
        _check(report, seed_dirs[report.target])


@needs_atheris
@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_for_a_minute(target, seed_dirs, tmp_path):
    _check(run_fuzzer(target, seconds=LONG_SECONDS, seeds=seed_dirs[target], workdir=tmp_path), seed_dirs[target])
