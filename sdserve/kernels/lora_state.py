"""The state of multi-LoRA serving, and who owns which part of it.

- `ModulePool`: one target module's adapter slots. The residency store writes it (`place`,
  `clear`) when it assigns adapters to slots; the dispatch (`lora.lora_linear`/`lora_conv2d`)
  only reads it. On the CPU a slot holds views of the host adapter's packed buffer; on a GPU,
  slot tensors that the Triton kernels index.
- `LoRALayerState`: one wrapped module's share: its pool (attached by the residency store when an
  adapter first targets the module) and the plan the CPU path keeps for the current batch
  (`lora_cpu`), which only the dispatch writes.
- `LoRABatchState`: one model's, shared by all its wrapped modules: the batch metadata of the rows
  under way (allocated once per token count per row, refilled when the rows' stacks change), the
  version plans key on, and the merge budget with the bytes the layers' merged copies hold now.

Which rows read which stacks is not kept here: the caller passes each call's stacks (the engine's
row context) and this state notices when they change.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import torch

from sdserve.kernels.lora_dora import DoraTerms, dora_terms
from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_plan import SlotFactors

RowStack = Sequence[tuple[int, float]]  # (slot, scale) of each adapter active for one row

# Versions are unique across pools, so a layer whose pool is replaced never mistakes the new
# pool's state for the old one's.
_POOL_VERSIONS = itertools.count(1)


class SlotShape(Protocol):
    """What a pool needs to know of its module (`adapters.TargetSpec` is one)."""

    @property
    def a_columns(self) -> int:  # width of A: in, or in·kh·kw for a conv
        ...

    @property
    def out_features(self) -> int:  # height of B
        ...


class ModulePool:
    """One target module's slots.

    On the CPU a slot holds views of the adapter's packed host buffer (`SlotFactors`): placing
    an adapter writes no weights, and the layers read the views through a cached plan. On a GPU
    the slots are device tensors that the Triton kernels index, A `[slots, rank_cap, in(·k·k)]`
    and B `[slots, out, rank_cap]`: placing is the host-to-device copy, with the module's alpha/r
    folded into B; the rank capacity grows (a reallocation, rare) for a higher rank.
    """

    def __init__(
        self, spec: SlotShape, num_slots: int, device: torch.device, dtype: torch.dtype, views: bool | None = None
    ) -> None:
        self.spec = spec
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.views = device.type == "cpu" if views is None else views  # tests run slot tensors on CPU too
        self.slots: list[SlotFactors | None] = [None] * num_slots
        self.rank_capacity = 0
        tensor_slots = 0 if self.views else num_slots
        self.a = torch.zeros(tensor_slots, 0, spec.a_columns, device=device, dtype=dtype)  # [slots, rank_cap, in]
        self.b = torch.zeros(tensor_slots, spec.out_features, 0, device=device, dtype=dtype)  # [slots, out, rank_cap]
        self.ranks = torch.zeros(tensor_slots, dtype=torch.int32, device=device)  # [slots]; 0 = unused here
        self.used = 0  # slots holding factors, so idle modules skip the kernel
        self.dora: list[DoraTerms | None] = [None] * num_slots  # DoRA slots' terms (`lora_dora`)
        self.dora_used = 0  # slots holding a DoRA module, so other modules skip the rescaling
        self.version = next(_POOL_VERSIONS)  # new on every write: layers see stale cached plans

    @property
    def nbytes(self) -> int:
        """Bytes the slots hold beyond the host adapters (views hold none)."""
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def _grow(self, rank: int) -> None:
        a = torch.zeros(self.num_slots, rank, self.spec.a_columns, device=self.device, dtype=self.dtype)
        b = torch.zeros(self.num_slots, self.spec.out_features, rank, device=self.device, dtype=self.dtype)
        a[:, : self.rank_capacity] = self.a
        b[:, :, : self.rank_capacity] = self.b
        self.a, self.b, self.rank_capacity = a, b, rank
        for slot, factors in enumerate(self.slots):  # re-point the views at the new tensors
            if factors is not None:
                r = factors.a.shape[0]
                self.slots[slot] = SlotFactors(a[slot, :r], b[slot, :, :r], 1.0)

    def place(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float,
              dora: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """a [r, in(·k·k)], b [out, r] -> slot; the delta is scale · b @ a. `dora`: a DoRA module's
        (magnitude [out], the base module's weight), whose per-channel terms are computed here."""
        if self.slots[slot] is None:
            self.used += 1
        self.version = next(_POOL_VERSIONS)
        self.dora_used += (dora is not None) - (self.dora[slot] is not None)
        self.dora[slot] = None if dora is None else dora_terms(dora[0], dora[1], a, b, scale, self.device)
        if self.views:
            self.slots[slot] = SlotFactors(a, b, scale)
            return
        rank = a.shape[0]
        if rank > self.rank_capacity:
            self._grow(rank)
        self.slots[slot] = SlotFactors(self.a[slot, :rank], self.b[slot, :, :rank], 1.0)
        self.a[slot, :rank].copy_(a)
        self.b[slot, :, :rank].copy_(b.to(self.device, torch.float32) * scale)
        # The Triton path reads padding up to its rank tile: it must be zero.
        if rank < self.rank_capacity:
            self.a[slot, rank:] = 0
            self.b[slot, :, rank:] = 0
        self.ranks[slot] = rank

    def clear(self, slot: int) -> None:
        if self.slots[slot] is not None:
            self.used -= 1
            self.slots[slot] = None
            self.dora_used -= self.dora[slot] is not None
            self.dora[slot] = None
            self.version = next(_POOL_VERSIONS)
            if not self.views:
                self.ranks[slot] = 0


class LoRABatchState:
    """The batch state one model's wrapped modules share.

    Batch metadata is allocated once per token count per row (each UNet resolution, the text
    encoders' 77 tokens, convs' one sample per row) and refilled in place when the rows' stacks
    change, the first time a module of that token count asks.

    `merge_budget_bytes` bounds the merged weight copies (`lora_plan.plan_merged`) that the CPU
    path's layers may hold at once, all layers together; 0 keeps every layer factorized.
    """

    def __init__(self, max_rows: int, max_stack: int, device: torch.device, merge_budget_bytes: int = 0) -> None:
        self.max_rows = max_rows
        self.max_stack = max_stack
        self.device = device
        self.merge_budget_bytes = merge_budget_bytes
        self.merged_bytes = 0
        """Bytes the layers' merged plans hold now."""
        self.stacks_version = 0
        """Changes when a call's stacks differ from those of the last call that read adapters
        (plans key on it)."""
        self.num_rows = 0
        self._seen: object = None  # the stacks object of the call under way, compared by identity
        self._stacks: tuple[tuple[tuple[int, float], ...], ...] = ()
        self._metas: dict[int, LoRABatchMeta] = {}
        self._filled: dict[int, int] = {}

    def observe(self, stacks: Sequence[RowStack]) -> None:
        """Note this call's stacks (per row). The first module of a call compares them with the
        last call's; the others find the same object and pay one identity check. Callers must
        not change a stacks object in place between calls (the engine's row contexts are tuples)."""
        if stacks is self._seen:
            return
        clean = tuple(tuple(stack) for stack in stacks)
        if clean != self._stacks:
            self.stacks_version += 1
            self._stacks = clean
        self._seen = stacks
        self.num_rows = len(clean)

    def meta_for(self, stacks: Sequence[RowStack], tokens_per_row: int) -> LoRABatchMeta:
        """The batch metadata of `stacks`, every row holding `tokens_per_row` tokens."""
        self.observe(stacks)
        meta = self._metas.get(tokens_per_row)
        if meta is None or meta.max_rows < self.num_rows:
            meta = LoRABatchMeta.allocate(
                max_rows=max(self.max_rows, self.num_rows),
                max_tokens=max(self.max_rows, self.num_rows) * tokens_per_row,
                max_stack=self.max_stack,
                device=self.device,
            )
            self._metas[tokens_per_row] = meta
            self._filled.pop(tokens_per_row, None)
        # A meta's tables depend on the stacks (and so the row count) alone: calls whose stacks
        # equal the previous call's reuse them as they are.
        if self._filled.get(tokens_per_row) != self.stacks_version:
            meta.fill([tokens_per_row] * self.num_rows, self._stacks)
            self._filled[tokens_per_row] = self.stacks_version
        return meta


class LoRALayerState:
    """One wrapped module's LoRA state: its slot pool and the CPU path's cached plan.

    A plan holds one batch's gathered factors ((sum of stack ranks) x (in + out) floats per stack,
    per row on the two-bmm layout) or merged weight copies; it is kept while the rows' stacks and
    the pool stay the same, which is most steps of a batch, so a CPU step pays for the matmuls only.
    """

    def __init__(self, batch: LoRABatchState) -> None:
        self.batch = batch
        self.pool: ModulePool | None = None
        self.plan: object = None  # lora_plan.LinearPlan | MergedPlan | tuple[ConvRun, ...]
        self.plan_key: tuple[int, int, int] | None = None  # (stacks version, pool version, tokens)
        # DoRA rows and their gains (`lora_dora`), kept like the plan
        self.dora_plan: tuple[torch.Tensor, torch.Tensor] | None = None  # [n] int64, [n, out] float32
        self.dora_key: tuple[int, int, int] | None = None  # (stacks version, pool version, rows)
