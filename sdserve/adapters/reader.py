"""Reading an adapter file: safetensors only, every failure one typed error.

Pickle-based formats (.ckpt, .pt, .bin) are never opened here: a pickle can run code on load.

The format is parsed here rather than by the safetensors library, so that a file's data section
is read once (two halves in parallel where large) into one buffer that its tensors are views of:
a LoRA whose factors already have the serving dtype can then keep that buffer as its packed
buffer instead of copying every factor again (see `lora.validate_lora`). The header is checked as strictly as the
library does (its `Metadata::validate`): a JSON object of `{dtype, shape, data_offsets}` entries
whose byte ranges tile the data section exactly, from 0 to its end, with no hole or overlap.
No memory map is kept: a file replaced or truncated after loading cannot change (or fault) an
adapter that was validated.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from sdserve.errors import AdapterError

Source = str | os.PathLike[str] | bytes | bytearray | memoryview
Allocator = Callable[[int], torch.Tensor]
"""nbytes -> uint8 tensor [nbytes] to read into (e.g. `HostArena.take`); default `fresh_bytes`."""


def fresh_bytes(nbytes: int) -> torch.Tensor:
    """The default Allocator: new memory from torch."""
    return torch.empty(nbytes, dtype=torch.uint8)

NOT_SAFETENSORS = "not a valid safetensors file"

# Bounds on what a header may cost to parse. The library allows 100 MB (10^8 bytes); a 39 MB
# header of 500k entries took 15.7 s of GIL and +460 MB to parse, so adapters get bounds sized
# to what real adapters need, checked before the JSON is read or parsed.
#
# Entries: the largest real adapter adapts every module of SDXL. Its UNet has ~800 linear and
# conv modules (70 transformer blocks x 10 projections, 22 proj_in/proj_out, ~60 resnet convs
# and time projections, samplers, embeddings), its text encoders 12 x 6 + 32 x 6 = 264: ~1,060
# modules. LoRA/LoCon stores 3 tensors per module (down, up, alpha): ~3,200 entries; LyCORIS
# LoHa/LoKr (refused by kind, which takes reading them first) up to 7-8: ~8,500. 20,000 leaves 2x
# over that and 6x over the largest LoRA; sdserve's own embeddings and hypernetworks hold at most
# a few hundred.
MAX_TENSOR_ENTRIES = 20_000
# Bytes: an entry is ~200 bytes of JSON (a 90-character kohya key, dtype, shape, offsets), so
# 20,000 entries are ~4 MB; kohya's `ss_*` metadata (tag frequencies, bucket and dataset info)
# and PEFT configs add up to a few MB more on the largest real files. At 8 MiB, a header built to
# be as costly as possible per byte (millions of empty arrays or objects) still parses in 0.5 to
# 1.5 s and ~200 MB on a loaded 2-core machine (measured); real headers take milliseconds.
MAX_HEADER_BYTES = 8 * 1024 * 1024
# Counted in the raw header before parsing: each entry spells this key once. Escapes can hide it
# ("data_offset\u0073"), so the parsed header's entries are counted again.
_ENTRY_FIELD_BYTES = b'"data_offsets"'

# safetensors dtype names -> torch dtypes. Integer and 8-bit float dtypes load too, so that the
# callers can refuse them with a message naming the dtype; names torch has no dtype for do not.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_ENTRY_FIELDS = frozenset(("dtype", "shape", "data_offsets"))


@dataclass(frozen=True)
class RawFile:
    """The tensors and string metadata of one safetensors file, as stored (no conversion).

    With `shared=True` reads, `data` is the file's whole data section (`[bytes]` uint8) and every
    tensor is a view of it where its offset is aligned to its dtype; otherwise `data` is None and
    every tensor owns its memory.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    data: torch.Tensor | None = None  # [data section bytes] uint8


class _Entry(NamedTuple):
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int


class _Invalid(Exception):
    """Anything wrong with the file's structure; becomes NOT_SAFETENSORS."""


class _OverLimit(Exception):
    """A well-formed file past one of the bounds above; its message is the problem reported."""


def _header_length(head: bytes, file_size: int) -> int:
    """Cheap structural check first, so garbage and pickles fail before any parsing."""
    if len(head) < 8:
        raise _Invalid
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len < 2 or 8 + header_len > file_size:
        raise _Invalid  # a length the file cannot hold: garbage, not a large header
    if header_len > MAX_HEADER_BYTES:
        raise _OverLimit(f"the file header is {header_len} bytes, more than the limit of {MAX_HEADER_BYTES}")
    return header_len


def _check_entry_count(count: int) -> None:
    if count > MAX_TENSOR_ENTRIES:
        raise _OverLimit(f"the file header has {count} tensor entries, more than the limit of {MAX_TENSOR_ENTRIES}")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Invalid  # two entries for one key: which one the file means is ambiguous
    return result


def _check_text(text: str) -> None:
    # json accepts "\ud800" escapes; a lone surrogate is not Unicode (serde_json refuses it)
    # and would fail later, when an error message quoting the key is encoded.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid from None


# After every escape pair ("\\", "\"", "\u..." -> its first two characters) is removed, each
# '"' left in valid JSON delimits a string, and a key is exactly a string followed by ':'.
_ESCAPE_PAIR = re.compile(rb"\\.", re.DOTALL)
_KEY_END = re.compile(rb'"[ \t\n\r]*:')


def _parse_json(raw: bytes) -> Any:
    """The header's JSON, with duplicate keys refused.

    `json.loads` without a hook builds every object in C but keeps the last of duplicate keys
    silently. So the keys the text spells are counted (a regex pass, in C) and compared with the
    keys of the objects an entry-shaped header has (top level and one below); only where they
    differ (a duplicate, or objects deeper than a valid header has) is the text parsed again with
    the hook, which names duplicates at any depth. A real 400-entry header: 0.4 ms instead of 1.5.
    """
    try:
        text = raw.decode("utf-8")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Invalid from None
    unescaped = _ESCAPE_PAIR.sub(b"", raw) if b"\\" in raw else raw
    spelled = len(_KEY_END.findall(unescaped))
    if isinstance(header, dict):
        built = len(header) + sum(len(value) for value in header.values() if type(value) is dict)
        if built == spelled:
            return header
    try:
        return json.loads(text, object_pairs_hook=_object)
    except (ValueError, RecursionError):
        raise _Invalid from None


_INT_ONLY = frozenset((int,))
# Beyond this many dimensions of size > 1 a shape holds more than 2^64 elements: no file does.
_MAX_NONTRIVIAL_DIMS = 64


def _elements(shape: list[int], data_len: int) -> int:
    """prod(shape), for a shape already known to hold non-negative ints, without the bigint
    blow-up a hostile shape of 600k dims of 10^11 gave math.prod (minutes of CPU): a product
    past data_len is invalid anyway, so it is only computed where it cannot grow unbounded."""
    if len(shape) <= 8 and max(shape, default=1) <= data_len:
        return math.prod(shape)
    if 0 in shape:
        return 0
    big = [dim for dim in shape if dim != 1]
    if len(big) > _MAX_NONTRIVIAL_DIMS or max(big, default=1) > data_len:
        return data_len + 1  # more elements than the data section can hold
    return math.prod(big)


_BY_OFFSETS = operator.attrgetter("start", "end")


def _parse_header(raw: bytes, data_len: int) -> tuple[list[_Entry], dict[str, str]]:
    """The entries (sorted by offset) and the metadata, or _Invalid for any deviation."""
    _check_entry_count(raw.count(_ENTRY_FIELD_BYTES))  # in C, before any object is built
    header = _parse_json(raw)
    if not isinstance(header, dict):
        raise _Invalid
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # JSON null: no metadata, as in the library
    if not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
        raise _Invalid
    _check_entry_count(len(header))
    if b"\\u" in raw:  # only an escape can spell a lone surrogate: valid UTF-8 cannot
        for text in (*header, *metadata, *metadata.values()):
            _check_text(text)
    entries = []
    counts: list[Any] = []  # every shape dim and offset, type-checked together below
    try:
        for key, info in header.items():  # hundreds of entries per LoRA: few Python ops each
            if type(info) is not dict or info.keys() != _ENTRY_FIELDS:
                raise _Invalid
            name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if type(name) is not str or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
                raise _Invalid
            counts += shape
            counts += offsets
            entries.append((key, name, shape, offsets))
    except TypeError:
        raise _Invalid from None
    # Non-negative ints (booleans excluded, as `type` tells them apart), all in two C calls.
    if counts and (not set(map(type, counts)) <= _INT_ONLY or min(counts) < 0):
        raise _Invalid
    checked = []
    for key, name, shape, (start, end) in entries:
        dtype = _DTYPES.get(name)
        if dtype is None or end - start != _elements(shape, data_len) * dtype.itemsize:
            raise _Invalid  # the library's TensorInvalidInfo (also catches end < start)
        checked.append(_Entry(key, dtype, tuple(shape), start, end))
    checked.sort(key=_BY_OFFSETS)
    position = 0
    for entry in checked:
        if entry.start != position:
            raise _Invalid  # a hole or an overlap (InvalidOffset)
        position = entry.end
    if position != data_len:
        raise _Invalid  # bytes no tensor accounts for (MetadataIncompleteBuffer)
    return checked, metadata


# Reads of at least this many bytes are split in two, the second half read by a helper thread.
# One read() is one core copying from the page cache; two halves in parallel took 3.4 ms
# instead of 6.4 for a 27 MB LoRA on a 2-core VM (bench.adapter_swap's file). Below a few MB the
# thread's start (~0.1 ms) costs more than it saves.
_SPLIT_READ_BYTES = 4 * 1024 * 1024
_PAGE = 4096


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from the file at `offset`; _Invalid if the file ends first (it shrank)."""
    filled = 0
    while filled < len(view):
        count = os.preadv(fd, [view[filled:]], offset + filled)
        if not count:
            raise _Invalid
        filled += count


def _read_into(fd: int, offset: int, target: torch.Tensor) -> None:
    """target[:] = the file's bytes from `offset`, in two parallel halves where large.

    preadv releases the GIL, so the halves copy on two cores. A fresh thread per read, not a
    pool: the upload checker forks worker processes, and a pool's thread does not survive a
    fork (a child submitting to it would wait forever).
    """
    view = memoryview(target.numpy())
    if len(view) < _SPLIT_READ_BYTES:
        _pread_all(fd, view, offset)
        return
    half = len(view) // 2 - (len(view) // 2) % _PAGE
    failure: list[BaseException] = []

    def read_second_half() -> None:
        try:
            _pread_all(fd, view[half:], offset + half)
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)

    helper = threading.Thread(target=read_second_half, name="sdserve-read", daemon=True)
    try:
        helper.start()
    except RuntimeError:  # no thread to be had (an upload worker's RLIMIT_AS): read it all here
        _pread_all(fd, view, offset)
        return
    try:
        _pread_all(fd, view[:half], offset)
    finally:
        helper.join()
    if failure:
        raise failure[0]


def _read_path(path: str | os.PathLike[str], alloc: Allocator) -> tuple[list[_Entry], dict[str, str], torch.Tensor]:
    # One open file for header and data, sized by fstat: nothing can swap the file in between.
    with open(path, "rb", buffering=0) as handle:
        file_size = os.fstat(handle.fileno()).st_size
        header_len = _header_length(handle.read(8), file_size)
        raw_header = handle.read(header_len)
        if len(raw_header) != header_len:
            raise _Invalid
        data_len = file_size - 8 - header_len
        entries, metadata = _parse_header(raw_header, data_len)
        data = alloc(data_len)  # [data section bytes]
        _read_into(handle.fileno(), 8 + header_len, data)
    return entries, metadata, data


def _read_bytes(source: bytes | bytearray | memoryview, alloc: Allocator) -> tuple[list[_Entry], dict[str, str], torch.Tensor]:
    view = memoryview(source).cast("B")
    header_len = _header_length(bytes(view[:8]), len(view))
    data_len = len(view) - 8 - header_len
    entries, metadata = _parse_header(bytes(view[8 : 8 + header_len]), data_len)
    data = alloc(data_len)  # [data section bytes]
    memoryview(data.numpy())[:] = view[8 + header_len :]  # one copy: the caller's bytes may change
    return entries, metadata, data


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, stride = [], 1
    for dim in reversed(shape):
        strides.append(stride)
        stride *= dim
    return tuple(strides[::-1])


def _tensors(data: torch.Tensor, entries: list[_Entry], shared: bool) -> dict[str, torch.Tensor]:
    """Each entry's tensor: a view of `data` where its offset is aligned to its dtype (cloned
    unless `shared`), else an aligned copy. Keys by name, as the library's keys() gave them."""
    typed: dict[torch.dtype, torch.Tensor] = {}  # data as each dtype, from its first byte
    strides: dict[tuple[int, ...], tuple[int, ...]] = {}  # a LoRA has few distinct shapes
    tensors = {}
    for entry in sorted(entries):  # by key (the tuple's first field; keys are unique)
        key, dtype, shape, start, end = entry
        size = dtype.itemsize
        if start % size or end == start:
            # Writers that do not pad the header to 8 bytes can misalign a tensor.
            tensor = torch.empty(shape, dtype=dtype)
            tensor.view(-1).view(torch.uint8).copy_(data[start:end])
        else:
            whole = typed.get(dtype)
            if whole is None:
                whole = typed[dtype] = data[: data.numel() - data.numel() % size].view(dtype)
            stride = strides.get(shape)
            if stride is None:
                stride = strides[shape] = _contiguous_strides(shape)
            tensor = whole.as_strided(shape, stride, start // size)
            if not shared:
                tensor = tensor.clone()
        tensors[key] = tensor
    return tensors


def read_safetensors(source: Source, name: str, *, shared: bool = False, alloc: Allocator | None = None) -> RawFile:
    """Read every tensor and the metadata of a safetensors file given as a path or as bytes.

    `name` is how errors refer to the file (the caller's name for it, never its path).
    `shared=True` leaves the tensors as views of one buffer (`RawFile.data`): no copy per
    tensor, but any tensor kept keeps the whole data section alive. `alloc` provides that
    buffer's memory (the adapter runtime passes its `HostArena`).
    """
    alloc = alloc or fresh_bytes
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            entries, metadata, data = _read_bytes(source, alloc)
        else:
            entries, metadata, data = _read_path(source, alloc)
    except _Invalid:
        raise AdapterError(name, NOT_SAFETENSORS) from None
    except _OverLimit as over:
        raise AdapterError(name, str(over)) from None
    except OSError:
        raise AdapterError(name, "file could not be read") from None
    tensors = _tensors(data, entries, shared)
    return RawFile(tensors=tensors, metadata=dict(metadata), data=data if shared else None)
