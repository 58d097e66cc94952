"""Reading an adapter file: safetensors only, every failure one typed error.

Pickle-based formats (.ckpt, .pt, .bin) are never opened here: a pickle can run code on load.
The safetensors library's own messages are not passed on, as they may name server paths.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

from sdserve.errors import AdapterError

Source = str | os.PathLike[str] | bytes | bytearray | memoryview

NOT_SAFETENSORS = "not a valid safetensors file"
# A safetensors header is JSON describing each tensor; 100 MB covers any real adapter's
# hundreds of thousands of keys while refusing absurd headers before they are parsed.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class RawFile:
    """The tensors and string metadata of one safetensors file, as stored (no conversion)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def _check_header(head: bytes, file_size: int, name: str) -> None:
    """Cheap structural check first, so garbage and pickles fail before the library sees them."""
    if len(head) < 8:
        raise AdapterError(name, NOT_SAFETENSORS)
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len < 2 or header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise AdapterError(name, NOT_SAFETENSORS)


def read_safetensors(source: Source, name: str) -> RawFile:
    """Read every tensor and the metadata of a safetensors file given as a path or as bytes.

    `name` is how errors refer to the file (the caller's name for it, never its path).
    """
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            _check_header(data[:8], len(data), name)
            tensors = safetensors.torch.load(data)
            header_len = struct.unpack("<Q", data[:8])[0]
            header = json.loads(data[8 : 8 + header_len])
            metadata = header.get("__metadata__") or {}
        else:
            size = os.path.getsize(source)
            with open(source, "rb") as handle:
                _check_header(handle.read(8), size, name)
            with safetensors.safe_open(os.fspath(source), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except AdapterError:
        raise
    except OSError:
        raise AdapterError(name, "file could not be read") from None
    except Exception:
        # SafetensorError, JSON and struct errors, unknown dtypes: all mean a broken file.
        raise AdapterError(name, NOT_SAFETENSORS) from None
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterError(name, NOT_SAFETENSORS)
    return RawFile(tensors=tensors, metadata=dict(metadata))
