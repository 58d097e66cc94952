"""The safetensors reader and the no-copy LoRA buffer.

The reader parses the format itself (to read a file's data once into one buffer), so it is
checked against the safetensors library as the oracle: every well-formed file reads to the
library's tensors and metadata, every malformed header that the library refuses is refused, and
a few that the library lets through (duplicate keys, unknown entry fields) are refused too.
A LoRA whose factors the file already holds in the serving dtype and the packed order keeps
the file's data as its buffer; it must load to exactly what the copying path gives.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
import safetensors
import safetensors.torch
import torch

from sdserve.adapters import load_lora, read_safetensors
from sdserve.adapters.lora import parse_lora_file, validate_lora
from sdserve.errors import AdapterError
from tests.adapters.lora_factory import peft_file_contents, write_lora

NAME = "tenant-a/fast"


def _file(header: dict, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _library_refuses(data: bytes) -> bool:
    try:
        safetensors.torch.load(data)
    except Exception:
        return True
    return False


def _same(ours: dict[str, torch.Tensor], library: dict[str, torch.Tensor]) -> None:
    assert list(ours) == sorted(library)
    for key, tensor in library.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape
        assert torch.equal(ours[key].view(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


# --- well-formed files read as the library reads them ---------------------------------------


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),  # 14 bytes: misaligns what follows
        "bf16": torch.randn(2, 3, 1, 1, generator=generator).bfloat16(),
        "f64": torch.randn(2, generator=generator).double(),
        "scalar": torch.tensor(4.0),
        "empty": torch.zeros(0, 3),
        "i64": torch.arange(3),
        "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(3, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
    }


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_reads_what_the_library_reads(tmp_path, as_bytes, shared):
    path = tmp_path / "mixed.safetensors"
    safetensors.torch.save_file(_mixed_tensors(), str(path), metadata={"a": "1", "b": "two"})
    raw = read_safetensors(path.read_bytes() if as_bytes else path, NAME, shared=shared)
    _same(raw.tensors, safetensors.torch.load_file(str(path)))
    assert raw.metadata == {"a": "1", "b": "two"}
    assert (raw.data is not None) == shared


def test_unaligned_offsets_are_copied_aligned(tmp_path):
    """A writer that does not pad its header misaligns every tensor; values still read right."""
    a, b = torch.randn(3, 4), torch.randn(5).double()
    header = {"a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b": {"dtype": "F64", "shape": [5], "data_offsets": [48, 88]}}
    for extra in range(1, 8):
        header["__metadata__"] = {"x": "y" * extra}
        data = _file(header, a.numpy().tobytes() + b.numpy().tobytes(), pad=False)
        raw = read_safetensors(data, NAME, shared=True)
        _same(raw.tensors, safetensors.torch.load(data))


# --- malformed headers ------------------------------------------------------------------------


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    "overlap": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, 12),
    "hole": ({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, 20),
    "not_from_zero": ({"a": _entry(offsets=(4, 12))}, 12),
    "trailing_bytes": ({"a": _entry()}, 12),
    "short_data": ({"a": _entry(offsets=(0, 8))}, 4),
    "size_mismatch": ({"a": _entry(shape=(3,))}, 8),
    "end_before_start": ({"a": _entry(shape=(0,), offsets=(8, 0))}, 8),
    "unknown_dtype": ({"a": _entry(dtype="F33")}, 8),
    "dtype_not_string": ({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, 8),
    "negative_dim": ({"a": _entry(shape=(-2,))}, 8),
    "float_dim": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8),
    "bool_dim": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1),
    "three_offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8),
    "missing_field": ({"a": {"dtype": "F32", "shape": [2]}}, 8),
    "entry_not_object": ({"a": [1, 2]}, 8),
    "metadata_not_strings": ({"__metadata__": {"k": 1}, "a": _entry()}, 8),
    "metadata_not_object": ({"__metadata__": ["k"], "a": _entry()}, 8),
    "overflowing_shape": ({"a": _entry(shape=(2**40, 2**40, 2**40))}, 8),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("as_bytes", [False, True])
def test_refuses_what_the_library_refuses(case, as_bytes, tmp_path):
    header, data_len = MALFORMED[case]
    data = _file(header, bytes(data_len))
    assert _library_refuses(data), case  # the oracle agrees the file is broken
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(AdapterError) as info:
        read_safetensors(data if as_bytes else path, NAME, shared=True)
    assert info.value.problem == "not a valid safetensors file"


def _raw_header(text: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text + data


RAW_MALFORMED = {
    "invalid_utf8": _raw_header(b'{"\xff": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"x"),
    "lone_surrogate": _raw_header(b'{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"x"),
    "not_json": _raw_header(b"{nope}   "),
    "trailing_junk": _raw_header(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}x', b"x"),
    "header_past_end": struct.pack("<Q", 64) + b"{}",
}


@pytest.mark.parametrize("case", sorted(RAW_MALFORMED))
def test_refuses_broken_header_text(case):
    data = RAW_MALFORMED[case]
    assert _library_refuses(data), case
    with pytest.raises(AdapterError) as info:
        read_safetensors(data, NAME)
    assert info.value.problem == "not a valid safetensors file"


@pytest.mark.parametrize("case", ["duplicate_key", "unknown_field"])
def test_stricter_than_the_library(case):
    """Ambiguous headers are refused even where the library would pick one reading."""
    if case == "duplicate_key":
        text = (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                b' "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}')
    else:
        text = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "extra": 1}}'
    with pytest.raises(AdapterError):
        read_safetensors(_raw_header(text, b"x"), NAME)


# The reader parses JSON without a hook and counts the keys the text spells against the keys it
# built (see reader._parse_json): every way of spelling a duplicate must still be found.
_ONE = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
DUPLICATES = {
    "top_level": '{"a": ONE, "a": ONE}',
    "escaped_spelling": '{"a": ONE, "\\u0061": ONE}',
    "inside_entry": '{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
    "inside_metadata": '{"__metadata__": {"k": "1", "k": "2"}, "a": ONE}',
    "metadata_twice": '{"__metadata__": {"k": "1"}, "__metadata__": {"j": "2"}, "a": ONE}',
    "beside_quoted_colons": '{"__metadata__": {"x\\":": "\\":", "x\\":": "y"}, "a": ONE}',
    "after_escaped_backslash": '{"__metadata__": {"x\\\\": "1", "x\\\\": "2"}, "a": ONE}',
    "whitespace_before_colon": '{"a" :ONE,\n "a"\t: ONE}',
    "deeper_than_entries": '{"a": {"dtype": "U8", "shape": [{"q": 1, "q": 2}], "data_offsets": [0, 1]}}',
}


@pytest.mark.parametrize("case", sorted(DUPLICATES))
def test_duplicate_keys_are_refused_however_spelled(case):
    text = DUPLICATES[case].replace("ONE", _ONE).encode()
    json.loads(text)  # valid JSON: only the duplicate is wrong
    with pytest.raises(AdapterError) as info:
        read_safetensors(_raw_header(text, b"x"), NAME)
    assert info.value.problem == "not a valid safetensors file"


def test_keys_with_escapes_and_colons_read():
    """Quotes, colons and backslashes inside keys and values are not mistaken for key ends."""
    metadata = {'a":': '":b', "c\\": "\\", "\u00e9": "é"}
    text = json.dumps({"__metadata__": metadata, 't\\":': json.loads(_ONE)}).encode()
    raw = read_safetensors(_raw_header(text, b"x"), NAME)
    assert raw.metadata == metadata and list(raw.tensors) == ['t\\":']


def test_hostile_shape_is_refused_fast():
    """600k dims of 10^11 made math.prod build a 25-Mbit integer: minutes of CPU (fuzz-style
    finding). A product past the data section's size is refused without being computed."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [99_999_999_999] * 600_000, "data_offsets": [0, 4]}})
    # CPU seconds of this process, not wall time: the finding was minutes of CPU, and a shared
    # machine's load stretched the wall time of the ~7 MB header's parse past 2 s (2.8 s at load 12).
    started = time.process_time()
    with pytest.raises(AdapterError):
        read_safetensors(_raw_header(header.encode(), bytes(4)), NAME)
    assert time.process_time() - started < 2.0
    ones = json.dumps({"a": {"dtype": "F32", "shape": [1] * 40 + [2], "data_offsets": [0, 8]}})
    assert read_safetensors(_raw_header(ones.encode(), bytes(8)), NAME).tensors["a"].shape == (1,) * 40 + (2,)


@pytest.mark.parametrize("shared", [False, True])
def test_large_data_read_in_halves_equals_the_library(tmp_path, shared):
    """Data sections past reader._SPLIT_READ_BYTES are read by two threads; every byte lands."""
    from sdserve.adapters.reader import _SPLIT_READ_BYTES

    generator = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(300, 1001, generator=generator) for i in range(5)}  # ~6 MB
    assert sum(t.numel() * 4 for t in tensors.values()) > _SPLIT_READ_BYTES
    path = tmp_path / "large.safetensors"
    safetensors.torch.save_file(tensors, path)
    raw = read_safetensors(path, NAME, shared=shared)
    for key, tensor in safetensors.torch.load_file(path).items():
        assert torch.equal(raw.tensors[key], tensor), key


def test_large_read_without_a_thread_reads_serially(tmp_path, monkeypatch):
    """Where no thread can start (RLIMIT_AS in an upload worker), the read is done in one go."""
    from sdserve.adapters import reader

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(reader.threading.Thread, "start", refuse)
    path = tmp_path / "data.bin"
    content = torch.randint(0, 256, (6_000_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path.write_bytes(content.numpy().tobytes())
    target = torch.empty_like(content)
    with open(path, "rb") as handle:
        reader._read_into(handle.fileno(), 0, target)
    assert torch.equal(target, content)


@pytest.mark.parametrize("short_by", [1, 5_000_000])
def test_file_shorter_than_its_read_is_refused_from_either_half(tmp_path, short_by):
    """A file that shrinks while read ends one half early: refused, whichever half it was."""
    from sdserve.adapters.reader import _Invalid, _read_into

    path = tmp_path / "short.bin"
    path.write_bytes(bytes(6_000_000 - short_by))
    target = torch.empty(6_000_000, dtype=torch.uint8)
    with open(path, "rb") as handle, pytest.raises(_Invalid):
        _read_into(handle.fileno(), 0, target)


def test_whitespace_around_header_reads():
    """The library reads JSON with whitespace on either side (writers pad with spaces)."""
    data = _raw_header(b' \n{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}  ', b"x")
    _same(read_safetensors(data, NAME).tensors, safetensors.torch.load(data))


def test_empty_and_null_metadata_read(tmp_path):
    for metadata in ({}, None):
        header = {"__metadata__": metadata, "a": _entry()}
        data = _file(header, torch.ones(2).numpy().tobytes())
        assert read_safetensors(data, NAME).metadata == {}


# --- the LoRA buffer: kept from the file where it can be, identical either way ----------------


def _shares_file_memory(parsed, adapter) -> bool:
    return adapter.buffer.untyped_storage().data_ptr() == parsed.data.untyped_storage().data_ptr()


@pytest.mark.parametrize("family", ["sd15", "sdxl"], indirect=True)
def test_buffer_kept_from_file_equals_copied_buffer(family, tmp_path):
    _, targets, lora = family
    path = tmp_path / "a.safetensors"
    write_lora(lora, path, "peft")
    parsed = parse_lora_file(path, NAME, targets)
    kept = validate_lora(parsed, NAME, targets)
    assert _shares_file_memory(parsed, kept)  # the case this path exists for is taken
    # The same file as bytes: the data is copied once into a fresh buffer, then kept as well;
    # served in bf16, everything is cast and packed into a new buffer.
    from_bytes = load_lora(path.read_bytes(), NAME, targets)
    packed = load_lora(path, NAME, targets, dtype=torch.float64).to(dtype=torch.float32)
    for other in (from_bytes, packed):
        assert torch.equal(kept.buffer, other.buffer)
        assert list(kept.modules) == list(other.modules)
        for target, module in kept.modules.items():
            assert (module.a_offset, module.b_offset) == (other.modules[target].a_offset, other.modules[target].b_offset)
            assert torch.equal(module.a, other.modules[target].a) and torch.equal(module.b, other.modules[target].b)
    assert kept.nbytes == sum(t.numel() * 4 for t in safetensors.torch.load_file(str(path)).values())
    # Every factor against the file, read by the library (the oracle), conv A flattened.
    library = safetensors.torch.load_file(str(path))
    down_keys = {pair.target: pair.key for pair in parsed.pairs}
    for module in kept.modules.values():
        down_key = down_keys[module.target]
        assert torch.equal(module.a, library[down_key].reshape(module.a.shape))
        assert torch.equal(module.b, library[down_key.replace("lora_A", "lora_B")].reshape(module.b.shape))


def test_other_layouts_and_dtypes_are_copied(sd15_targets, sd15_lora, tmp_path):
    write_lora(sd15_lora, tmp_path / "k.safetensors", "kohya")  # alphas between the factors
    parsed = parse_lora_file(tmp_path / "k.safetensors", NAME, sd15_targets)
    kohya = validate_lora(parsed, NAME, sd15_targets)
    assert not _shares_file_memory(parsed, kohya)
    assert kohya.nbytes == kohya.buffer.numel() * 4 == sum(
        (m.a.numel() + m.b.numel()) * 4 for m in kohya.modules.values())
    tensors, metadata = peft_file_contents(sd15_lora)
    half = {k: v.half().contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(half, str(tmp_path / "h.safetensors"), metadata=metadata)
    parsed = parse_lora_file(tmp_path / "h.safetensors", NAME, sd15_targets)
    assert not _shares_file_memory(parsed, validate_lora(parsed, NAME, sd15_targets))
    assert _shares_file_memory(parsed, validate_lora(parsed, NAME, sd15_targets, dtype=torch.float16))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_found_in_kept_buffer(sd15_targets, sd15_lora, tmp_path, where, value):
    tensors, metadata = peft_file_contents(sd15_lora)
    tensors = {k: v.clone().contiguous() for k, v in tensors.items()}
    keys = sorted(tensors)
    key = {"first": keys[0], "middle": keys[len(keys) // 2], "last": keys[-1]}[where]
    flat = tensors[key].view(-1)
    flat[{"first": 0, "middle": flat.numel() // 2, "last": -1}[where]] = value
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    parsed = parse_lora_file(path, NAME, sd15_targets)
    with pytest.raises(AdapterError) as info:
        validate_lora(parsed, NAME, sd15_targets)
    assert "NaN or infinite" in info.value.problem


def test_data_read_once_is_private(sd15_targets, sd15_lora, tmp_path):
    """The kept buffer is the process's own memory: rewriting the file changes nothing."""
    path = tmp_path / "a.safetensors"
    write_lora(sd15_lora, path, "peft")
    adapter = load_lora(path, NAME, sd15_targets)
    before = adapter.buffer.clone()
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64  # NaNs over the last factor's bytes, in place
    with open(path, "r+b") as handle:
        handle.write(data)
    assert torch.equal(adapter.buffer, before)
