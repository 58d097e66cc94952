"""What every subcommand shares: quiet libraries, errors as one line and exit code 2."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import NoReturn

from sdserve.errors import SdserveError

EXIT_USAGE = 2  # bad input: argparse's code too
EXIT_FAILURE = 1  # the input was fine, the work failed


def quiet_libraries() -> None:
    """Library progress bars and advice are noise on a CLI: sdserve prints its own progress."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are local
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"sdserve: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def fail_on(error: SdserveError, where: str = "") -> NoReturn:
    prefix = f"{where}: " if where else ""
    code = EXIT_USAGE if error.status in ("INVALID_ARGUMENT", "NOT_FOUND") else EXIT_FAILURE
    fail(f"{prefix}{error}", code)
