"""Trainers set torch's thread count (`--threads`) for their run; in-process callers (the Python
API, a test session, a server that trains) get theirs back afterwards.

torch's intra-op thread count is process-global: a training call that left it at 1 made every
later forward in the process run single-threaded, and changed how GEMMs split rows, so batches
that were bit-identical at 2 threads differed by 1/255 (found by the test suite).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def keeps_torch_threads(function: Callable[P, R]) -> Callable[P, R]:
    """`function`, with torch's intra-op thread count restored when it returns or raises."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import torch  # here, not at import: `sdserve train --help` imports no torch (tests/cli/test_startup.py)

        threads = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper
