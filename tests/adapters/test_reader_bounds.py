"""The header of an uploaded file is bounded before it is parsed.

A 39 MB JSON header with 500k entries took 15.7 s of parsing and +460 MB. Headers past
MAX_HEADER_BYTES are refused from their 8-byte length prefix, before being read; headers with
more than MAX_TENSOR_ENTRIES entries before `json.loads` (counted in the raw bytes) and, for
entries whose field names hide behind escapes, after it. Real files stay far below both.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import safetensors.torch
import torch

from sdserve.adapters import MAX_HEADER_BYTES, MAX_TENSOR_ENTRIES, read_safetensors
from sdserve.errors import AdapterError

NAME = "tenant-a/big-header"
FAST_SECONDS = 1.0


def _entries(count: int, field: str = "data_offsets") -> bytes:
    """`count` empty U8 tensors (shape [0], offsets [0, 0]): valid, and no data to write."""
    entry = '{"dtype":"U8","shape":[0],"' + field + '":[0,0]}'
    return b"{" + ",".join(f'"t{i}":{entry}' for i in range(count)).encode() + b"}"


def _file(header: bytes, header_len: int | None = None) -> bytes:
    """A file of this header, padded with spaces (valid JSON whitespace) to `header_len`."""
    header_len = len(header) if header_len is None else header_len
    return struct.pack("<Q", header_len) + header.ljust(header_len, b" ")


def _refusal(source, name: str = NAME) -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(AdapterError) as info:
        read_safetensors(source, name)
    return info.value.problem, time.perf_counter() - started


def test_limits_are_what_the_docs_cite():
    assert (MAX_HEADER_BYTES, MAX_TENSOR_ENTRIES) == (8 * 1024 * 1024, 20_000)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_header_at_byte_limit_loads_one_past_is_refused(as_bytes, tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = torch.ones(2).numpy().tobytes()
    path = tmp_path / "a.safetensors"

    def source(header_len: int):
        content = _file(header, header_len) + data
        path.write_bytes(content)
        return content if as_bytes else path

    assert torch.equal(read_safetensors(source(MAX_HEADER_BYTES), NAME).tensors["a"], torch.ones(2))
    problem, seconds = _refusal(source(MAX_HEADER_BYTES + 1))
    assert problem == f"the file header is {MAX_HEADER_BYTES + 1} bytes, more than the limit of {MAX_HEADER_BYTES}"
    assert seconds < FAST_SECONDS


@pytest.mark.parametrize("header_len", [100_000_001, 39_000_000, 2**40])
def test_large_declared_header_is_refused_unread(header_len, tmp_path):
    """Past the library's own 100 MB rule too; a sparse file, so nothing of it is written or
    read. A length past the file's end stays "not a valid safetensors file" (garbage)."""
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", header_len) + b"{")
        handle.truncate(8 + min(header_len, 200_000_000))
    problem, seconds = _refusal(path)
    if header_len < 200_000_000:
        assert problem == f"the file header is {header_len} bytes, more than the limit of {MAX_HEADER_BYTES}"
    else:
        assert problem == "not a valid safetensors file"
    assert seconds < FAST_SECONDS


def test_entries_at_limit_load_one_past_is_refused():
    raw = read_safetensors(_file(_entries(MAX_TENSOR_ENTRIES)), NAME)
    assert len(raw.tensors) == MAX_TENSOR_ENTRIES
    problem, seconds = _refusal(_file(_entries(MAX_TENSOR_ENTRIES + 1)))
    assert problem == (f"the file header has {MAX_TENSOR_ENTRIES + 1} tensor entries, "
                       f"more than the limit of {MAX_TENSOR_ENTRIES}")
    assert seconds < FAST_SECONDS


def test_escaped_field_names_do_not_dodge_the_count():
    """`"data_offset\\u0073"` is "data_offsets" to json but not to a byte count."""
    header = _entries(MAX_TENSOR_ENTRIES + 1, field="data_offset\\u0073")
    assert header.count(b'"data_offsets"') == 0
    problem, _ = _refusal(_file(header))
    assert f"has {MAX_TENSOR_ENTRIES + 1} tensor entries" in problem


def test_many_entries_past_the_byte_limit_are_refused_fast():
    """The reported file's shape (500k entries, 39 MB) at 200k entries, ~11 MB, which the old
    reader parsed for seconds: refused from its length alone."""
    header = _entries(200_000)
    assert len(header) > MAX_HEADER_BYTES
    problem, seconds = _refusal(_file(header))
    assert problem.startswith(f"the file header is {len(header)} bytes")
    assert seconds < FAST_SECONDS


def test_realistic_adapter_sizes_load(tmp_path):
    """5,000 entries (an SDXL LoCon over every module is ~3,200) with kohya-style metadata."""
    tensors = {f"lora_unet_block_{i}.lora_down.weight": torch.full((1, 2), float(i)) for i in range(5_000)}
    tag_frequency = json.dumps({"10_style": {f"tag {i}": i for i in range(20_000)}})
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"ss_tag_frequency": tag_frequency})
    started = time.perf_counter()
    raw = read_safetensors(path, NAME)
    assert time.perf_counter() - started < FAST_SECONDS
    assert len(raw.tensors) == 5_000 and raw.metadata["ss_tag_frequency"] == tag_frequency
    assert torch.equal(raw.tensors["lora_unet_block_4999.lora_down.weight"], torch.full((1, 2), 4999.0))
