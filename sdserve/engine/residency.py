"""Adapter residency: disk (content-addressed) -> host memory -> device slots, per model.

- Disk: an adapter is known by the sha256 of its file's bytes (computed once per file version;
  the server's registry already stores files under their digest).
- Host: parsed, validated adapters (`LoRAAdapter`, one packed buffer each), least-recently-used
  beyond a byte budget. Files are parsed in a background thread, read into a `HostArena` whose
  memory was touched once and is reused as adapters leave; a request whose adapters are cold
  waits while the batch keeps stepping.
- Device: a fixed number of slots. On a GPU, placing an adapter copies its factors into the
  slot pools of the modules it targets; on the CPU a slot holds views of the host adapter's
  buffer and placing writes no weights (a slotted adapter dropped from the host LRU stays alive
  through its slot until the slot is reused). Slots that a running request uses are pinned and
  never evicted; the others are evicted least-recently-used. The same logic runs everywhere.

One owner (the engine loop) calls everything here except the loader function itself.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial

import torch

from sdserve.adapters import LoRAAdapter, load_lora, targets_of
from sdserve.adapters.embeddings import TEXT_ENCODERS, ExtraRowsEmbedding, TokenRows
from sdserve.adapters.host_memory import HostArena
from sdserve.engine.config import ResidencyConfig
from sdserve.engine.ip_adapter import install_processors
from sdserve.engine.lora_layers import wrap_targets
from sdserve.engine.request import MAX_STACK, StackEntry
from sdserve.engine.row_context import RowContext, RowContextHolder
from sdserve.errors import AdapterError
from sdserve.kernels import LoRABatchState, ModulePool


@dataclass
class ResidencyStats:
    hits: int = 0  # an adapter a request needed was already in a device slot
    misses: int = 0  # it was not
    loads: int = 0  # files parsed and validated
    evictions: int = 0  # device slots reassigned
    load_seconds: float = 0.0
    load_failures: int = 0
    host_bytes: int = 0
    device_bytes: int = 0


@dataclass
class _Slot:
    digest: str | None = None
    pins: int = 0
    last_used: int = 0
    targets: tuple[str, ...] = ()


@dataclass
class _DigestCache:
    entries: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # path -> (size, mtime_ns, digest)

    def digest(self, path: str, label: str) -> str:
        try:
            stat = os.stat(path)
        except OSError:
            raise AdapterError(label, "file not found or not readable") from None
        known = self.entries.get(path)
        if known and known[:2] == (stat.st_size, stat.st_mtime_ns):
            return known[2]
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            raise AdapterError(label, "file not found or not readable") from None
        digest = h.hexdigest()
        self.entries[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest


class AdapterRuntime:
    """A model's adapter machinery: wrapped layers, slot pools, host cache, background loads, and
    the model's row-context holder, which every adapter-aware module reads (`rows`)."""

    def __init__(self, model, config: ResidencyConfig, max_rows: int, executor: ThreadPoolExecutor) -> None:
        self.model = model
        self.config = config
        self.executor = executor
        components = {"unet": model.unet, "text_encoder": model.text_encoders[0]}
        if len(model.text_encoders) > 1:
            components["text_encoder_2"] = model.text_encoders[1]
        self.targets = targets_of(components)
        # Every adapter-aware module installed below reads this one holder (see `rows`).
        self.row_context = RowContextHolder()
        self.lora_batch = LoRABatchState(
            max_rows=max_rows, max_stack=MAX_STACK, device=model.device, merge_budget_bytes=config.merge_budget_bytes
        )
        self.layers = wrap_targets(components, self.targets, self.row_context, self.lora_batch)
        for component, encoder, tokenizer in zip(TEXT_ENCODERS, model.text_encoders, model.tokenizers):
            # Ids from len(tokenizer) up are textual-inversion vectors (tokenize_with_embeddings).
            wrap_token_table(encoder, partial(self.row_context.token_rows, component, len(tokenizer)))
        # IP-Adapter branches and hypernetworks: row-aware processors on every attention layer.
        install_processors(model.unet, self.row_context)
        self.pools: dict[str, ModulePool] = {}
        self.slots = [_Slot() for _ in range(config.device_slots)]
        self.digest_slot: dict[str, int] = {}
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.host_memory = HostArena(config.host_arena_bytes)
        self.loading: dict[str, tuple[Future, float]] = {}
        self.stats = ResidencyStats()
        self._digests = _DigestCache()
        self._tick = 0

    def rows(self, context: RowContext) -> AbstractContextManager[None]:
        """Within the block (one model call), every adapter-aware module of the model reads
        `context`: wrapped layers their rows' LoRA stacks, attention processors the IP-Adapter
        branches and hypernetworks, token tables the textual inversions."""
        return self.row_context.rows(context)

    # -- host tier -------------------------------------------------------------------------

    def _load(self, path: str, label: str) -> LoRAAdapter:
        try:
            return load_lora(
                path, label, self.targets, max_rank=self.config.max_rank, dtype=self.model.dtype,
                alloc=self.host_memory.take,
            )
        except AdapterError as exc:
            # The error outlives the load (a waiting request raises it later); its traceback's
            # frames would keep the half-read file's arena memory in use for as long.
            raise exc.with_traceback(None) from None

    def poll(self, entries: tuple[StackEntry, ...]) -> list[str] | None:
        """Digests of the entries once all are in memory; None while loads are under way.

        Starts background loads for cold adapters; raises AdapterError for a file that failed.
        A failure belongs to the attempt that met it, never to the digest: the file may be back
        (re-uploaded by another tenant, restored on disk) for the next request, which loads it
        afresh, and the error names the adapter as this request named it, not as the request
        that started the load did (that may be another tenant's name).
        """
        digests = []
        for entry in entries:
            # A file named by its digest (the server's content-addressed store) is never hashed
            # again; a CLI path is hashed once per file version.
            digest = entry.digest or self._digests.digest(entry.source, entry.name)
            digests.append(digest)
            if digest in self.digest_slot or digest in self.host:
                continue
            if digest not in self.loading:
                future = self.executor.submit(self._load, entry.source, entry.name)
                self.loading[digest] = (future, time.monotonic())
            future, started = self.loading[digest]
            if not future.done():
                continue
            del self.loading[digest]
            try:
                adapter = future.result()
            except AdapterError as exc:
                self.stats.load_failures += 1
                raise exc.renamed(entry.name) from None
            self.stats.loads += 1
            self.stats.load_seconds += time.monotonic() - started
            self._keep_on_host(digest, adapter)
        if all(d in self.host or d in self.digest_slot for d in digests):
            return digests
        return None

    def _keep_on_host(self, digest: str, adapter: LoRAAdapter) -> None:
        self.host[digest] = adapter
        self.stats.host_bytes += adapter.nbytes
        while self.stats.host_bytes > self.config.host_budget_bytes and len(self.host) > 1:
            old_digest, old = self.host.popitem(last=False)
            self.stats.host_bytes -= old.nbytes
            if old_digest == digest:
                break

    # -- device tier -----------------------------------------------------------------------

    def acquire(self, digests: list[str]) -> list[int] | None:
        """Pin a slot for every digest (placing cold ones); None if too few slots are free now."""
        self._tick += 1
        needed = [d for d in dict.fromkeys(digests) if d not in self.digest_slot]
        free = [i for i, s in enumerate(self.slots) if s.pins == 0 and s.digest not in digests]
        if len(needed) > len(free):
            return None
        free.sort(key=lambda i: (self.slots[i].digest is not None, self.slots[i].last_used))
        for digest in dict.fromkeys(digests):
            if digest in self.digest_slot:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
        for digest, slot in zip(needed, free):
            if digest not in self.host:  # dropped from host memory since poll: reload later
                return None
            self._place(slot, digest, self.host[digest])
            self.host.move_to_end(digest)
        slots = [self.digest_slot[d] for d in digests]
        for slot in slots:
            self.slots[slot].pins += 1
            self.slots[slot].last_used = self._tick
        return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.slots[slot].pins -= 1

    def _place(self, slot_index: int, digest: str, adapter: LoRAAdapter) -> None:
        slot = self.slots[slot_index]
        if slot.digest is not None:
            self.stats.evictions += 1
            del self.digest_slot[slot.digest]
            for target in slot.targets:
                self.pools[target].clear(slot_index)
        for target, module in adapter.modules.items():
            pool = self.pools.get(target)
            if pool is None:
                pool = ModulePool(self.targets[target], len(self.slots), self.model.device, self.model.dtype)
                self.pools[target] = pool
                self.layers[target].lora.pool = pool
            pool.place(slot_index, module.a, module.b, module.scale)
        slot.digest = digest
        slot.targets = tuple(adapter.modules)
        self.digest_slot[digest] = slot_index
        self.stats.device_bytes = sum(p.nbytes for p in self.pools.values())

    def resident(self) -> list[str]:
        return [s.digest for s in self.slots if s.digest is not None]


def wrap_token_table(encoder, rows: Callable[[], TokenRows | None]) -> None:
    """Wrap a CLIP text encoder's token table once, so requests can bring textual-inversion rows;
    `rows` reads the current call's rows (the row context's, for this encoder)."""
    for path, module in list(encoder.named_modules()):
        if path.endswith("embeddings") and isinstance(getattr(module, "token_embedding", None), torch.nn.Embedding):
            module.token_embedding = ExtraRowsEmbedding(module.token_embedding, rows)
