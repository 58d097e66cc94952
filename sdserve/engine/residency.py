"""Adapter residency for one model: the device tier of LoRAs, and what a request's weights are.

The tiers below the device live in the engine's one residency store (engine/store.py): every
per-request weight (LoRAs, embeddings, hypernetworks, ControlNets, IP-Adapters) is loaded there in
the background, kept by digest within a byte budget, and pinned while a request uses it. This
module adds, per model:

- Device: a fixed number of LoRA slots. On a GPU, placing an adapter copies its factors into the
  slot pools of the modules it targets; on the CPU a slot holds views of the host adapter's
  buffer and placing writes no weights (a slotted adapter the store drops stays alive through its
  slot until the slot is reused). Slots that a running request uses are pinned and never evicted;
  the others are evicted least-recently-used. The same logic runs everywhere.
- `AdapterRuntime.gather`: polls the store for everything a request names (LoRA files are read
  into this model's `HostArena`), pins what is held under the request's id, and hands back the
  loaded weights once all are there.

One owner (the engine loop) calls everything here except the loader functions themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from sdserve.adapters import LoRAAdapter, load_lora, targets_of
from sdserve.adapters.embeddings import TEXT_ENCODERS, ExtraRowsEmbedding, TextualInversion, TokenRows
from sdserve.adapters.host_memory import HostArena
from sdserve.engine.config import ResidencyConfig
from sdserve.engine.ip_adapter import IPAdapterWeights, install_processors
from sdserve.engine.lora_layers import wrap_targets
from sdserve.engine.request import MAX_STACK, EngineRequest, StackEntry, StoredEmbedding, embedding_token
from sdserve.engine.row_context import RowContext, RowContextHolder
from sdserve.engine.store import DigestCache, WeightKey, WeightStore, safetensors_header
from sdserve.errors import AdapterError
from sdserve.kernels import LoRABatchState, ModulePool

_DigestCache = DigestCache  # its former home; tests/server/test_identity.py counts its hashing here

# The name weights are loaded under: the store's entry serves every request that names the same
# bytes, whatever it calls them; errors are renamed to each request's label when they reach it.
LOAD_NAME = "weights"
MAX_EMBEDDING_FILE_BYTES = 64 << 20  # far above any embedding (1.2 MB), far below memory trouble


@dataclass
class ResidencyStats:
    hits: int = 0  # an adapter a request needed was already in a device slot
    misses: int = 0  # it was not
    loads: int = 0  # files parsed and validated for this model (every kind keyed by it)
    evictions: int = 0  # device slots reassigned
    load_seconds: float = 0.0
    load_failures: int = 0
    host_bytes: int = 0  # this model's entries in the store's host tier
    device_bytes: int = 0


@dataclass
class _Slot:
    digest: str | None = None
    pins: int = 0
    last_used: int = 0
    targets: tuple[str, ...] = ()
    dora_targets: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RequestWeights:
    """A request's weights, loaded and pinned in the store for the request's lifetime."""

    lora_digests: tuple[str, ...] = ()  # per stack entry
    embeddings: tuple[TextualInversion, ...] = ()  # per embedding, with the request's name and token
    hypernetworks: tuple[tuple[Any, float], ...] = ()  # (Hypernetwork, strength)
    ip_adapters: tuple[IPAdapterWeights, ...] = ()  # per IP-Adapter unit

    def bind(self, request: EngineRequest) -> EngineRequest:
        """The request as its running state holds it: embeddings and hypernetworks loaded."""
        return replace(request, embeddings=self.embeddings, hypernetworks=self.hypernetworks)


def load_stored_embedding(path: str, widths: Mapping[str, int]) -> StoredEmbedding:
    """Read an embedding file once: its header (for each request's token check) and its vectors."""
    from sdserve.adapters.embeddings import load_embedding

    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_EMBEDDING_FILE_BYTES + 1)
    except OSError:
        raise AdapterError(LOAD_NAME, "file could not be read") from None
    if len(data) > MAX_EMBEDDING_FILE_BYTES:
        raise AdapterError(LOAD_NAME, f"the file is larger than {MAX_EMBEDDING_FILE_BYTES} bytes; "
                                      "embeddings are at most a few megabytes")
    # A neutral token: the vectors do not depend on it; each request's token is checked on its own.
    embedding = load_embedding(data, LOAD_NAME, widths, token=LOAD_NAME)
    return StoredEmbedding(embedding, safetensors_header(data, LOAD_NAME))


def load_device_hypernetwork(path: str, widths: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    from sdserve.adapters.hypernetwork import load_hypernetwork

    # On the model's device and dtype, where the attention processors apply it.
    return load_hypernetwork(path, LOAD_NAME, widths).to(device, dtype)


class AdapterRuntime:
    """A model's adapter machinery: wrapped layers, slot pools, host cache, background loads, and
    the model's row-context holder, which every adapter-aware module reads (`rows`)."""

    def __init__(
        self, model, config: ResidencyConfig, max_rows: int, executor: ThreadPoolExecutor | None = None,
        store: WeightStore | None = None,
    ) -> None:
        self.model = model
        self.config = config
        # The engine's one store; a runtime built without one (standalone) gets its own.
        self.store = store if store is not None else WeightStore(config, executor)
        components = model.adapter_components()
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
        self.host_memory = HostArena(config.host_arena_bytes)
        self._slot_stats = ResidencyStats()  # hits, misses, evictions, device bytes
        self._tick = 0

    def rows(self, context: RowContext) -> AbstractContextManager[None]:
        """Within the block (one model call), every adapter-aware module of the model reads
        `context`: wrapped layers their rows' LoRA stacks, attention processors the IP-Adapter
        branches and hypernetworks, token tables the textual inversions."""
        return self.row_context.rows(context)

    # -- the store's tiers, for this model ---------------------------------------------------

    @property
    def variant(self) -> str:
        """The store keys this model's LoRAs, embeddings, hypernetworks and IP-Adapters by it."""
        return self.model.info.name

    def _key(self, kind: str, digest: str) -> WeightKey:
        return WeightKey(kind, digest, self.variant)

    @property
    def host(self) -> dict[str, LoRAAdapter]:
        """This model's parsed LoRAs the store holds, by digest (least recently used first)."""
        return {key.digest: value for key, value in self.store.held("lora", self.variant).items()}

    @property
    def loading(self) -> dict[str, tuple[Future, float]]:
        """This model's LoRA loads in flight: digest -> (future, started)."""
        return {key.digest: pair for key, pair in list(self.store.loading.items())
                if key.kind == "lora" and key.variant == self.variant}

    @property
    def stats(self) -> ResidencyStats:
        """Slot counters, with the store's load counters and host bytes for this model's entries."""
        stats = replace(self._slot_stats)
        for (_kind, variant), loads in list(self.store.stats.items()):
            if variant == self.variant:
                stats.loads += loads.loads
                stats.load_seconds += loads.load_seconds
                stats.load_failures += loads.load_failures
        stats.host_bytes = self.store.bytes_held("host", self.variant)
        return stats

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

    def poll(self, entries: tuple[StackEntry, ...], owner: str | None = None) -> list[str] | None:
        """Digests of the LoRA entries once all are in memory; None while loads are under way.

        Starts background loads for cold adapters; raises AdapterError for a file that failed,
        named as this request names it (see `WeightStore.poll`). With `owner`, what is held is
        pinned for that request until the engine releases it.
        """
        digests, polls = self._lora_polls(entries)
        return digests if self._poll_all(polls, owner) is not None else None

    def _lora_polls(self, entries: tuple[StackEntry, ...]) -> tuple[list[str], list[tuple[WeightKey, Callable[[], Any], str]]]:
        digests = []
        polls: list[tuple[WeightKey, Callable[[], Any], str]] = []
        for entry in entries:
            # A file named by its digest (the server's content-addressed store) is never hashed
            # again; a CLI path is hashed once per file version.
            digest = entry.digest or self.store.digests.digest(entry.source, entry.name)
            digests.append(digest)
            if digest in self.digest_slot:  # on the device already (kept alive by its slot)
                continue
            polls.append((self._key("lora", digest), partial(self._load, entry.source, entry.name), entry.name))
        return digests, polls

    def gather(self, request: EngineRequest, controlnets, ip_adapters) -> RequestWeights | None:
        """Everything `request` names, loaded: None while any load runs (all of them started at
        once). What the store holds is pinned under the request's id as soon as it is seen, so
        neither eviction nor a file deleted meanwhile can take it from a queued request; the
        engine releases the pins when the request ends. Raises the first failed load's error."""
        owner = request.request_id
        info = self.model.info
        device, dtype = self.model.device, self.model.dtype
        lora_digests, polls = self._lora_polls(request.adapters)
        embedding_keys = [self._key("embedding", entry.digest or self.store.digests.digest(entry.source, entry.name))
                          for entry in request.embedding_refs]
        hypernetwork_keys = [self._key("hypernetwork", entry.digest or self.store.digests.digest(entry.source, entry.name))
                             for entry in request.hypernetwork_refs]
        polls += [(key, partial(load_stored_embedding, entry.source, info.text_widths), entry.name)
                  for key, entry in zip(embedding_keys, request.embedding_refs)]
        polls += [(key, partial(load_device_hypernetwork, entry.source, info.attention_widths, device, dtype), entry.name)
                  for key, entry in zip(hypernetwork_keys, request.hypernetwork_refs)]
        for unit in request.controlnets:
            source = unit.source or controlnets.resolve(unit.model, "controlnets")
            polls.append((controlnets.key(source, device, dtype), controlnets.loader(source, device, dtype), unit.model))
        ip_keys = []
        for unit in request.ip_adapters:
            source = unit.source or ip_adapters.resolve(unit.model, "ip_adapters")
            ip_keys.append(ip_adapters.key(source, self.model))
            polls.append((ip_keys[-1], ip_adapters.loader(source, self.model), unit.model))
        loaded = self._poll_all(polls, owner)
        if loaded is None:
            return None
        self._check_dora(request.adapters, lora_digests, loaded)
        embeddings = []
        for key, entry in zip(embedding_keys, request.embedding_refs):
            stored: StoredEmbedding = loaded[key]
            # The token validation checked; "" when the header was too big to check there.
            token = entry.token or embedding_token(stored.header, entry.name, info.text_widths, None)
            vectors = stored.embedding
            embeddings.append(TextualInversion(entry.name, token, vectors.vectors, vectors.layout))
        return RequestWeights(
            lora_digests=tuple(lora_digests),
            embeddings=tuple(embeddings),
            hypernetworks=tuple((loaded[key], entry.strength)
                                for key, entry in zip(hypernetwork_keys, request.hypernetwork_refs)),
            ip_adapters=tuple(loaded[key] for key in ip_keys),
        )

    def _check_dora(self, entries: tuple[StackEntry, ...], digests: list[str], loaded: dict) -> None:
        """Refuse a stack in which a DoRA module shares its module with another entry.

        PEFT applies a DoRA adapter on top of whatever the adapters before it in its list added
        (order-dependent); sdserve serves a DoRA module alone on its module (`kernels.lora_dora`)."""
        held = []
        for entry, digest in zip(entries, digests, strict=True):
            if digest in self.digest_slot:
                slot = self.slots[self.digest_slot[digest]]
                held.append((entry.name, slot.targets, slot.dora_targets))
            else:
                adapter: LoRAAdapter = loaded[self._key("lora", digest)]
                held.append((entry.name, tuple(adapter.modules), frozenset(adapter.dora_targets)))
        if len(held) < 2 or not any(dora for _, _, dora in held):
            return
        first: dict[str, tuple[str, bool]] = {}  # target -> (name, DoRA?) of the first entry on it
        for name, targets, dora in held:
            for target in targets:
                if target not in first:
                    first[target] = (name, target in dora)
                elif first[target][1] or target in dora:
                    dora_name, other = (first[target][0], name) if first[target][1] else (name, first[target][0])
                    raise AdapterError(dora_name, f"its DoRA module {target!r} is adapted by {other!r} too; "
                                                  f"a DoRA adapter must be alone on its modules in a stack")

    def _poll_all(self, polls: list[tuple[WeightKey, Callable[[], Any], str]], owner: str | None) -> dict | None:
        """Poll every (key, load, label); pin what is held for `owner`. -> key -> value once all
        are held, None while some load; raises the first failure after polling them all, so the
        failures this attempt met are all consumed by it (none waits for another request)."""
        values: dict[WeightKey, Any] = {}
        failure: Exception | None = None
        for key, load, label in polls:
            try:
                value = self.store.poll(key, load, label)
            except Exception as exc:
                failure = failure or exc
                continue
            if value is not None:
                values[key] = value
                if owner is not None:
                    self.store.pin(owner, key)
        if failure is not None:
            raise failure
        return values if len(values) == len({key for key, _, _ in polls}) else None

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
                self._slot_stats.hits += 1
            else:
                self._slot_stats.misses += 1
        for digest, slot in zip(needed, free):
            key = self._key("lora", digest)
            adapter = self.store.peek(key)
            if adapter is None:  # dropped from the store since poll (not pinned): reload later
                return None
            self._place(slot, digest, adapter)
            self.store.touch(key)
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
            self._slot_stats.evictions += 1
            del self.digest_slot[slot.digest]
            for target in slot.targets:
                self.pools[target].clear(slot_index)
        for target, module in adapter.modules.items():
            pool = self.pools.get(target)
            if pool is None:
                pool = ModulePool(self.targets[target], len(self.slots), self.model.device, self.model.dtype)
                self.pools[target] = pool
                self.layers[target].lora.pool = pool
            dora = None if module.magnitude is None else (module.magnitude, self.layers[target].base.weight)
            pool.place(slot_index, module.a, module.b, module.scale, dora)
        slot.digest = digest
        slot.targets = tuple(adapter.modules)
        slot.dora_targets = frozenset(adapter.dora_targets)
        self.digest_slot[digest] = slot_index
        self._slot_stats.device_bytes = sum(p.nbytes for p in self.pools.values())

    def resident(self) -> list[str]:
        return [s.digest for s in self.slots if s.digest is not None]


def wrap_token_table(encoder, rows: Callable[[], TokenRows | None]) -> None:
    """Wrap a CLIP text encoder's token table once, so requests can bring textual-inversion rows;
    `rows` reads the current call's rows (the row context's, for this encoder)."""
    for path, module in list(encoder.named_modules()):
        if path.endswith("embeddings") and isinstance(getattr(module, "token_embedding", None), torch.nn.Embedding):
            module.token_embedding = ExtraRowsEmbedding(module.token_embedding, rows)
