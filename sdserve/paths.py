"""Where sdserve keeps what it builds and stores on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SDSERVE_HOME, else ~/.cache/sdserve: built model directories, the server's registry."""
    return Path(os.environ.get("SDSERVE_HOME", Path.home() / ".cache" / "sdserve"))
