"""Files a trainer writes: whole or not at all.

An adapter, a checkpoint or a pipeline file is written to a temporary file in its own directory,
fsynced, and moved over the target with `os.replace` (atomic within one filesystem), then the
directory is fsynced so the rename survives a crash. A run killed at any moment leaves either
the previous file or the new one, never a torn one, and no temporary file is left behind by an
error inside the process.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from sdserve.errors import InvalidArgument
from sdserve.paths import fsync_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary path)` and move the result over `path` in one rename.

    The temporary file is in `path`'s directory (so the rename stays on one filesystem) and gets
    the mode an ordinary `open` would give it (mkstemp makes it 0600).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        write(temporary)
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its contents.

    The safetensors library writes the header's `__metadata__` map in a random order (a Rust
    HashMap: three saves of one dict give three orders), so the same trained adapter would not
    give the same bytes twice. The header is rewritten here with sorted keys; the data section
    and its offsets are the library's, unchanged, and the header is padded to 8 bytes as it pads.
    """
    data = safetensors.torch.save(tensors, metadata={"format": "pt", **metadata})
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically (read back with `load_checkpoint`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`; tensors and plain containers only (weights_only)."""
    return torch.load(path, weights_only=True, map_location="cpu")


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output whose directory is missing or not writable, or which
    is a directory itself; the error names `flag` and the path."""
    path = Path(path)
    if path.is_dir():
        raise InvalidArgument(f"{path} is a directory, expected a file path", field=flag)
    parent = path.parent
    if not parent.is_dir():
        raise InvalidArgument(f"directory {parent} does not exist", field=flag)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as error:
        raise InvalidArgument(f"cannot write to {parent} ({error.strerror or error})", field=flag) from None
    os.close(fd)
    os.unlink(name)


def check_directory_writable(directory: Path, flag: str) -> None:
    """Like `check_writable` for a directory that may not exist yet (created on first use)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidArgument(f"{directory} exists and is not a directory", field=flag)
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot write to {existing}", field=flag)


# -- pipeline directories: staged beside OUT, renamed into place whole ---------------------------


def stage_pipeline(base: Path, out: Path, trained: Sequence[str]) -> Path:
    """OUT.tmp-xxx beside OUT holding the base pipeline's files, minus the weights of the
    components in `trained` (written after training) and its sdserve.json (rewritten)."""
    from sdserve.models.builtin import METADATA_FILE

    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))

    def skip(directory: str, names: list[str]) -> list[str]:
        here = Path(directory)
        if here == base:
            return [n for n in names if n == METADATA_FILE or n.startswith(".")]
        if here.parent == base and here.name in trained:
            return [n for n in names if n.endswith(WEIGHT_SUFFIXES) or n.endswith(".index.json")]
        return []

    try:
        shutil.copytree(base, staging, ignore=skip, dirs_exist_ok=True)
        staging.chmod(0o777 & ~_umask())  # mkdtemp made it 0700
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def replace_directory(staging: Path, out: Path) -> None:
    """Rename the finished directory to OUT; a previous one there (checked by the caller: one the
    same command wrote) is moved aside first and removed after, as a directory cannot be renamed
    over a non-empty one."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
