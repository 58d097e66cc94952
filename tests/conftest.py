"""Shared test set-up: a private model cache, quiet libraries, and few threads.

Built-in models are built into a per-session directory (deterministic, about a second each),
so tests never depend on what a developer's ~/.cache holds.
"""

from __future__ import annotations

import os
import tempfile

# Before torch is imported anywhere: the test process shares 2 cores with servers it starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("SDSERVE_HOME", tempfile.mkdtemp(prefix="sdserve-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run in its interpreter on machines without a GPU; set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sdserve.cli.common import quiet_libraries  # noqa: E402

quiet_libraries()


@pytest.fixture(scope="session")
def sdserve_home() -> str:
    return os.environ["SDSERVE_HOME"]
