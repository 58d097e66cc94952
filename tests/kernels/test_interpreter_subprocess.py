"""Runs the Triton interpreter tests in a child pytest when this process imported Triton too early."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TRITON_TEST_FILES, interpreter_active


def test_triton_kernels_in_interpreter_subprocess(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("triton")
    if interpreter_active():
        pytest.skip("the interpreter is active in this process: the Triton tests ran in-process")
    here = Path(__file__).parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    command += [str(here / name) for name in TRITON_TEST_FILES]
    markexpr = request.config.getoption("markexpr")
    if markexpr:
        command += ["-m", markexpr]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        command, cwd=request.config.rootpath, env=env, capture_output=True, text=True, timeout=3600
    )
    summary = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, summary
    # The child must have run the kernels, not skipped them.
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) > 0, summary
    assert "skipped" not in result.stdout.splitlines()[-1], summary
