"""The residency store: every per-request weight, one store, keyed by content digest.

ARCHITECTURE's tiers, for LoRAs (and LyCORIS kin), textual-inversion embeddings, hypernetworks,
ControlNets and IP-Adapters alike:

- disk: a file is known by the sha256 of its bytes (the server's registry hands it over with the
  file; a CLI path is hashed once per file version, `DigestCache`); an operator's directory model
  (ControlNet, IP-Adapter) by a digest of its weight and config files, computed once when it is
  registered (`DirectoryRegistry`).
- host: what a load produced (a parsed LoRA, an embedding, a hypernetwork, a ControlNet or
  IP-Adapter model on the engine's device), under a `WeightKey` (kind, digest, variant), kept
  least-recently-used within a byte budget per tier: "host" for adapter files
  (`ResidencyConfig.host_budget_bytes`), "model" for whole conditioning models
  (`ResidencyConfig.model_budget_bytes`). An entry pinned by a request is never evicted; a tier
  may run over its budget while everything in it is pinned.
- device: LoRA slots (`residency.AdapterRuntime`), filled from this store's LoRA entries.

Loads run in the background on the engine's loader executor; a request whose weights are cold
waits while other requests keep stepping. A failed load belongs to the attempt that met it: it
is never remembered by digest (the file may be back for the next request) and its error names
the weight as the request that polled it named it.

One owner (the engine loop) calls everything here except `peek`, `DigestCache.known` and
`DirectoryRegistry.resolve`, which validation calls from its own threads: they only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdserve.adapters.reader import MAX_HEADER_BYTES, MAX_TENSOR_ENTRIES, NOT_SAFETENSORS
from sdserve.engine.config import ResidencyConfig
from sdserve.errors import AdapterError, InvalidArgument, NotFound

# Which byte budget each kind counts against: adapter files parse into host memory, conditioning
# models are whole networks on the engine's device.
TIER_OF_KIND: Mapping[str, str] = {
    "lora": "host", "embedding": "host", "hypernetwork": "host", "controlnet": "model", "ip_adapter": "model",
}


@dataclass(frozen=True)
class WeightKey:
    """What the store holds one entry for.

    `variant` is what the loaded form depends on besides the bytes: the base model's name for
    kinds checked against (or built for) one model (LoRA targets, embedding widths, hypernetwork
    widths, IP-Adapter layers), the device and dtype for a ControlNet.
    """

    kind: str
    digest: str
    variant: str = ""

    @property
    def tier(self) -> str:
        return TIER_OF_KIND[self.kind]


@dataclass
class LoadStats:
    loads: int = 0  # loads that succeeded
    load_seconds: float = 0.0  # from the load's start to the poll that found it done
    load_failures: int = 0
    evictions: int = 0  # entries dropped for the budget


@dataclass
class _Held:
    value: Any
    nbytes: int
    pins: int = 0


def weight_bytes(value: Any) -> int:
    """Bytes a loaded weight holds: its `nbytes`, or a module's parameters and buffers."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, torch.nn.Module):
        tensors = [*value.parameters(), *value.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)
    return 0


class WeightStore:
    def __init__(self, config: ResidencyConfig, executor: Executor | None = None) -> None:
        self.budgets = {"host": config.host_budget_bytes, "model": config.model_budget_bytes}
        self.executor = executor  # None: loads run in the polling thread (a store used standalone)
        self._held: OrderedDict[WeightKey, _Held] = OrderedDict()  # least recently used first
        self.loading: dict[WeightKey, tuple[Future, float]] = {}  # in flight: (future, started)
        self.tier_bytes = {tier: 0 for tier in self.budgets}
        self.stats: dict[tuple[str, str], LoadStats] = {}  # (kind, variant) -> counters
        self.digests = DigestCache()
        self._leases: dict[str, set[WeightKey]] = {}  # request id -> keys it pins

    # -- reads (any thread) -------------------------------------------------------------------

    def peek(self, key: WeightKey) -> Any | None:
        """The loaded value if held, else None; reads nothing from disk, changes no order (safe
        from validation's threads: one dict lookup)."""
        held = self._held.get(key)
        return None if held is None else held.value

    def held(self, kind: str | None = None, variant: str | None = None) -> dict[WeightKey, Any]:
        """A snapshot of the entries held (of one kind / variant), least recently used first."""
        return {key: held.value for key, held in list(self._held.items())
                if (kind is None or key.kind == kind) and (variant is None or key.variant == variant)}

    def bytes_held(self, tier: str, variant: str | None = None) -> int:
        return sum(h.nbytes for k, h in list(self._held.items())
                   if k.tier == tier and (variant is None or k.variant == variant))

    def stats_of(self, kind: str, variant: str) -> LoadStats:
        return self.stats.setdefault((kind, variant), LoadStats())

    # -- loads (the owner) ---------------------------------------------------------------------

    def poll(self, key: WeightKey, load: Callable[[], Any], label: str) -> Any | None:
        """The value under `key` once loaded; None while its load runs (started here if none is).

        Raises the load's error for this attempt, renamed to `label` (how the polling request
        names the weight) when it is an AdapterError; nothing of the failure is kept.
        """
        held = self._held.get(key)
        if held is not None:
            self._held.move_to_end(key)
            return held.value
        if key not in self.loading:
            self.loading[key] = (self._start(load), time.monotonic())
        future, started = self.loading[key]
        if not future.done():
            return None
        del self.loading[key]
        stats = self.stats_of(key.kind, key.variant)
        try:
            value = future.result()
        except AdapterError as exc:
            stats.load_failures += 1
            raise exc.renamed(label) from None
        except Exception:
            stats.load_failures += 1
            raise
        stats.loads += 1
        stats.load_seconds += time.monotonic() - started
        self._keep(key, value)
        return value

    def get_now(self, key: WeightKey, load: Callable[[], Any]) -> Any:
        """The value under `key`, loaded in this thread if it is not held (for callers outside the
        engine's admission, which loads in the background first)."""
        held = self._held.get(key)
        if held is not None:
            self._held.move_to_end(key)
            return held.value
        self.loading.pop(key, None)  # a background load of it, if one runs, is superseded
        started = time.monotonic()
        value = load()
        stats = self.stats_of(key.kind, key.variant)
        stats.loads += 1
        stats.load_seconds += time.monotonic() - started
        self._keep(key, value)
        return value

    def _start(self, load: Callable[[], Any]) -> Future:
        if self.executor is not None:
            return self.executor.submit(load)
        future: Future = Future()
        try:
            future.set_result(load())
        except Exception as exc:
            future.set_exception(exc)
        return future

    def touch(self, key: WeightKey) -> None:
        if key in self._held:
            self._held.move_to_end(key)

    # -- pins ------------------------------------------------------------------------------------

    def pin(self, owner: str, key: WeightKey) -> None:
        """`owner` (a request id) uses the entry under `key` until `release(owner)`: it stays held.
        Pinning twice for one owner counts once."""
        keys = self._leases.setdefault(owner, set())
        if key in keys or key not in self._held:
            return
        keys.add(key)
        self._held[key].pins += 1

    def release(self, owner: str) -> None:
        """Unpin everything `owner` pinned (idempotent); over-budget tiers shrink now."""
        keys = self._leases.pop(owner, set())
        for key in keys:
            self._held[key].pins -= 1
        for tier in {key.tier for key in keys}:
            self._shrink(tier)

    def pins(self, key: WeightKey) -> int:
        held = self._held.get(key)
        return 0 if held is None else held.pins

    # -- budget ------------------------------------------------------------------------------------

    def _keep(self, key: WeightKey, value: Any) -> None:
        if key in self._held:
            return
        nbytes = weight_bytes(value)
        self._held[key] = _Held(value, nbytes)
        self.tier_bytes[key.tier] += nbytes
        # The new entry stays even past the budget: the request that polled it pins it next.
        self._shrink(key.tier, keep=key)

    def _shrink(self, tier: str, keep: WeightKey | None = None) -> None:
        """Evict least-recently-used unpinned entries of `tier` until it is within its budget."""
        budget = self.budgets[tier]
        for key in [k for k in self._held if k.tier == tier]:
            if self.tier_bytes[tier] <= budget:
                return
            held = self._held[key]
            if held.pins or key == keep:
                continue
            del self._held[key]
            self.tier_bytes[tier] -= held.nbytes
            self.stats_of(key.kind, key.variant).evictions += 1


class DigestCache:
    """sha256 of files named by path (the CLI's), hashed once per file version (size, mtime)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, digest)

    def known(self, path: str) -> str:
        """The digest if this file version was hashed before, else "" (reads no file; a stat)."""
        known = self.entries.get(path)
        if known is None:
            return ""
        try:
            stat = os.stat(path)
        except OSError:
            return known[2]  # gone since: see `digest`
        return known[2] if known[:2] == (stat.st_size, stat.st_mtime_ns) else ""

    def digest(self, path: str, label: str) -> str:
        known = self.entries.get(path)
        try:
            stat = os.stat(path)
        except OSError:
            if known is not None:
                # Deleted since it was hashed: a request queued before the delete runs on the
                # bytes the store may still hold; if it does not, the load fails as the file is gone.
                return known[2]
            raise AdapterError(label, "file not found or not readable") from None
        if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        try:
            digest = file_sha256(path)
        except OSError:
            raise AdapterError(label, "file not found or not readable") from None
        self.entries[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- what validation may read of a cold file: a safetensors header ---------------------------------

HeaderEntry = tuple[str, str, tuple[int, ...]]  # (tensor key, safetensors dtype name, shape)


def safetensors_header(source: str | os.PathLike[str] | bytes, name: str) -> tuple[HeaderEntry, ...]:
    """The tensor entries of a safetensors file's header, read (path) or taken (bytes) without
    its data, within the reader's bounds; errors as `adapters.reader.read_safetensors` words them.
    Only the header's shape is checked here: the full load checks the rest."""
    try:
        if isinstance(source, bytes):
            head, file_size = source[:8], len(source)
            raw = _header_bytes(head, file_size, lambda n: source[8 : 8 + n])
        else:
            with open(source, "rb", buffering=0) as handle:
                file_size = os.fstat(handle.fileno()).st_size
                raw = _header_bytes(handle.read(8), file_size, handle.read)
        header = json.loads(raw.decode("utf-8"))
    except OSError:
        raise AdapterError(name, "file could not be read") from None
    except (_BadHeader, UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterError(name, NOT_SAFETENSORS) from None
    if not isinstance(header, dict):
        raise AdapterError(name, NOT_SAFETENSORS)
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSOR_ENTRIES:
        raise AdapterError(name, f"the file header has {len(header)} tensor entries, more than the limit of "
                                 f"{MAX_TENSOR_ENTRIES}")
    entries = []
    for key, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if (dtype not in DTYPE_BYTES or not isinstance(shape, list)
                or not all(type(n) is int and n >= 0 for n in shape)):
            raise AdapterError(name, NOT_SAFETENSORS)
        entries.append((key, dtype, tuple(shape)))
    return tuple(sorted(entries))


class _BadHeader(Exception):
    pass


def _header_bytes(head: bytes, file_size: int, read: Callable[[int], bytes]) -> bytes:
    if len(head) < 8:
        raise _BadHeader
    (length,) = struct.unpack("<Q", head)
    if length < 2 or 8 + length > file_size or length > MAX_HEADER_BYTES:
        raise _BadHeader
    raw = read(length)
    if len(raw) != length:
        raise _BadHeader
    return raw


DTYPE_BYTES: Mapping[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E5M2": 1, "F8_E4M3": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


def zeros_file(header: tuple[HeaderEntry, ...], max_bytes: int) -> bytes | None:
    """A safetensors file with `header`'s tensors, all zeros; None past `max_bytes` of data.

    Lets validation run a loader's own checks (layout, dtypes, shapes, tokens, with the loader's
    own messages) on what a header says, without reading or keeping the file's data."""
    entries: dict[str, Any] = {}
    offset = 0
    for key, dtype, shape in header:
        size = DTYPE_BYTES[dtype]
        for n in shape:
            size *= n
        if offset + size > max_bytes:
            return None
        entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries).encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


# -- operator directory models (ControlNets, IP-Adapters) -------------------------------------------

_DIGESTED_SUFFIXES = (".safetensors", ".bin", ".json")  # what from_pretrained reads: weights and configs


@dataclass(frozen=True)
class DirectoryModel:
    """A registered directory model: where it is, its digest, and what validation checks it by."""

    name: str
    path: Path
    digest: str
    facts: Mapping[str, Any] = field(default_factory=dict)  # read once from its configs / headers


def directory_digest(path: Path) -> str:
    """sha256 over the directory's weight and config files (relative path and content of each)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DIGESTED_SUFFIXES):
        h.update(file.relative_to(path).as_posix().encode() + b"\0" + file_sha256(file).encode() + b"\n")
    return h.hexdigest()


def _signature(path: Path) -> tuple:
    """What tells a changed directory from the one described before, by stat alone."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DIGESTED_SUFFIXES)
    return tuple((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


class DirectoryRegistry:
    """Names -> operator directory models of one kind; loading and caching go through the store.

    The operator registers names (the server, from its config); with `allow_paths` (the CLI) a
    request may also name a model directory, registered on first sight (and again if its files
    change). Registration reads the configs the validation checks need and digests the files,
    once; validation then reads no file of a registered model.
    """

    kind = ""  # WeightKey kind
    what = ""  # how errors call one ("ControlNet model")

    def __init__(self, allow_paths: bool = True) -> None:
        self.allow_paths = allow_paths
        self._registered: dict[str, DirectoryModel] = {}
        self._by_path: dict[Path, tuple[tuple, DirectoryModel]] = {}
        self._lock = threading.Lock()  # validation threads may register path-named models at once
        self._weights: WeightStore | None = None

    def bind(self, weights: WeightStore) -> None:
        """Load through the engine's store (the engine binds its registries once)."""
        self._weights = weights

    @property
    def weights(self) -> WeightStore:
        if self._weights is None:  # used without an engine: a store of its own, loading in place
            self._weights = WeightStore(ResidencyConfig())
        return self._weights

    def register(self, name: str, path: Path) -> DirectoryModel:
        path = Path(path).expanduser()
        if not self.is_model_dir(path):
            # At start-up, so a misconfigured server fails before its first call.
            raise InvalidArgument(f"{self.what} {name!r} is not a {self.what} directory")
        model = self._describe(name, path, field=name)
        self._registered[name] = model
        return model

    def registered(self) -> list[str]:
        """The names the operator registered, in registration order."""
        return list(self._registered)

    def resolve(self, name: str, field: str) -> DirectoryModel:
        model = self._registered.get(name)
        if model is not None:
            return model
        path = Path(name)
        if self.allow_paths and self.is_model_dir(path):
            path = path.resolve()
            with self._lock:
                signature = _signature(path)
                known = self._by_path.get(path)
                if known is None or known[0] != signature:
                    known = (signature, self._describe(name, path, field))
                    self._by_path[path] = known
                return known[1]
        raise NotFound(f"unknown {self.what}", field=field)

    def path_of(self, name: str, field: str) -> Path:
        return self.resolve(name, field).path

    def _describe(self, name: str, path: Path, field: str) -> DirectoryModel:
        try:
            return DirectoryModel(name, path, directory_digest(path), self.describe(path))
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidArgument(f"is a {self.what} that could not be read", field=field) from exc

    # What a kind defines:

    def is_model_dir(self, path: Path) -> bool:
        raise NotImplementedError

    def describe(self, path: Path) -> dict[str, Any]:
        """Facts read once from the directory's configs, for `check_fits`."""
        raise NotImplementedError
