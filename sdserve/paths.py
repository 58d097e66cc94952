"""Where sdserve keeps what it builds and stores on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$SDSERVE_HOME, else ~/.cache/sdserve: built model directories, the server's registry."""
    return Path(os.environ.get("SDSERVE_HOME", Path.home() / ".cache" / "sdserve"))


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (the directory entry itself is flushed)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)
