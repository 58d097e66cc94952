"""The property every harness checks, and what the fuzz processes share.

Property: an input either passes or fails with one of sdserve's typed errors (`SdserveError`,
which the server maps to a gRPC status), within a bounded time. Anything else (IndexError,
RecursionError, MemoryError, OverflowError, a torch RuntimeError, ...) would reach a client as
INTERNAL with a traceback in the log, or kill an upload worker: it is a finding.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

TARGETS = ("adapters", "images", "requests", "config")

# Per input, on a 2-core machine shared with other test runs. Real inputs take milliseconds;
# the largest legitimate ones (a 2048x2048 image, a LoRA with every SD module) well under a
# second. Past this an input is a finding even if it finished ("bounded time" is the property,
# not "eventually returns"); libFuzzer's own -timeout catches the inputs that never finish.
INPUT_SECONDS = 10.0
HANG_SECONDS = 60


class SlowInput(Exception):
    """An input took longer than INPUT_SECONDS: a finding, raised so that libFuzzer keeps it."""


def environment() -> None:
    """What tests/conftest.py sets for pytest, for the fuzz processes that run without it."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One thread: fuzz inputs are tiny, and the machine is shared.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


T = TypeVar("T")

# Values at the edges of what parsers check: zero, signs, int32/int64/uint64 limits, huge.
INTERESTING_INTS = (0, 1, -1, 2, 3, 7, 8, 64, 255, 256, 2**31 - 1, -(2**31), 2**32, 2**53 + 1, 2**63 - 1,
                    -(2**63), 2**64, 10**30)
INTERESTING_FLOATS = (0.0, -0.0, 0.5, 1.0, -1.0, 1e-45, 1e38, 3.5e38, 1e308, -1e308, math.inf, -math.inf,
                      math.nan)


class Choices:
    """Decisions read from fuzz bytes, for the structure-aware halves of the harnesses.

    The same bytes always build the same structure (a saved input replays exactly), and
    libFuzzer's byte mutations become mutations of the structure: a valid-looking file or
    config whose every field can take any value, which raw byte mutation of a JSON or TOML
    text rarely reaches. Bytes past the end read as zeros (the first option of every choice).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def byte(self) -> int:
        if self.position >= len(self.data):
            return 0
        self.position += 1
        return self.data[self.position - 1]

    def below(self, n: int) -> int:
        """An integer in [0, n)."""
        value = self.byte() if n <= 256 else self.byte() << 8 | self.byte()
        return value % n

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def mostly(self, usual: T, others: Sequence[T]) -> T:
        """`usual` seven times in eight, else one of `others`: most of a structure stays valid,
        so a file gets past its first check and the odd field meets the later ones."""
        return usual if self.below(8) else self.pick(others)

    def chance(self, in_256: int) -> bool:
        """True with probability in_256 / 256 (for random bytes)."""
        return self.byte() < in_256

    def raw(self, size: int) -> bytes:
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk.ljust(size, b"\0")

    def integer(self) -> int:
        if self.chance(192):
            return self.pick(INTERESTING_INTS)
        return struct.unpack("<q", self.raw(8))[0]

    def number(self) -> float:
        if self.chance(192):
            return self.pick(INTERESTING_FLOATS)
        return struct.unpack("<d", self.raw(8))[0]


def typed_errors_only(run: Callable[[], object], budget: float = INPUT_SECONDS) -> None:
    """Run one input's work: typed errors are the expected outcome of a bad input; anything else
    propagates (libFuzzer records it as a crash), and so does a run past `budget`."""
    from sdserve.errors import SdserveError

    started = time.monotonic()
    try:
        run()
    except SdserveError as error:
        # A typed error is only a good answer if it says something a client may read.
        str(error)
    elapsed = time.monotonic() - started
    if elapsed > budget:
        raise SlowInput(f"one input took {elapsed:.1f} s (bound {budget:g} s)")
