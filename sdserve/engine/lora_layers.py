"""Adapter-aware layers: the model's Linear/Conv2d modules, wrapped once at load.

A wrapped module computes its base output, then adds the LoRA deltas of the adapters that each
batch row's stack holds at this step: `y[t] += Σ_k s[row(t),k] · B[slot] @ (A[slot] @ x[t])`
(kernels.add_multi_lora). Which rows read which slots is set once per model call on the shared
`AdapterContext`; the weights live in per-module slot pools (`ModulePool`). Base weights are
never written (ARCHITECTURE rule 2): a hot swap changes which slots a row reads.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from sdserve.adapters import TargetSpec
from sdserve.kernels import LoRABatchMeta, add_multi_lora, add_multi_lora_conv
from sdserve.kernels.lora_plan import (
    MergedPlan,
    SlotFactors,
    apply_conv,
    apply_linear,
    apply_merged,
    merge_pays,
    merged_stacks,
    plan_conv,
    plan_linear,
    plan_merged,
)

# Versions are unique across pools, so a layer whose pool is replaced never mistakes the new
# pool's state for the old one's.
_POOL_VERSIONS = itertools.count(1)

RowStack = Sequence[tuple[int, float]]  # (slot, scale) of each adapter active for one row


class AdapterContext:
    """The rows of the current model call and their stacks, read by every wrapped module.

    Batch metadata is allocated once per token count per row (each UNet resolution has its own)
    and refilled in place when the rows' stacks change, the first time a module of that
    resolution asks.

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
        self.stacks: list[list[tuple[int, float]]] | None = None  # None: no row reads an adapter
        self.num_rows = 0
        self.stacks_version = 0
        """Changes when a call's stacks differ from the previous call's (layers key caches on it)."""
        self._last_stacks: list[list[tuple[int, float]]] | None = None
        self._metas: dict[int, LoRABatchMeta] = {}
        self._filled: dict[int, int] = {}

    @contextmanager
    def rows(self, stacks: Sequence[RowStack]) -> Iterator[None]:
        """Within the block, row i of every wrapped module's input reads `stacks[i]`."""
        clean = [list(stack) for stack in stacks]
        self.stacks = clean if any(clean) else None
        self.num_rows = len(clean)
        if clean != self._last_stacks:
            self.stacks_version += 1
            self._last_stacks = clean
        try:
            yield
        finally:
            self.stacks = None
            self.num_rows = 0

    def meta_for(self, tokens_per_row: int) -> LoRABatchMeta:
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
        # A meta's tables depend on the stacks (and so the row count) alone: steps whose stacks
        # equal the previous call's reuse them as they are.
        if self._filled.get(tokens_per_row) != self.stacks_version:
            assert self.stacks is not None
            meta.fill([tokens_per_row] * self.num_rows, self.stacks)
            self._filled[tokens_per_row] = self.stacks_version
        return meta


class ModulePool:
    """One target module's slots.

    On the CPU a slot holds views of the adapter's packed host buffer (`SlotFactors`): placing
    an adapter writes no weights, and the layers read the views through a cached plan. On a GPU
    the slots are device tensors that the Triton kernels index, A `[slots, rank_cap, in(·k·k)]`
    and B `[slots, out, rank_cap]`: placing is the host-to-device copy, with the module's alpha/r
    folded into B; the rank capacity grows (a reallocation, rare) for a higher rank.
    """

    def __init__(
        self, spec: TargetSpec, num_slots: int, device: torch.device, dtype: torch.dtype, views: bool | None = None
    ) -> None:
        self.spec = spec
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.views = device.type == "cpu" if views is None else views  # tests run slot tensors on CPU too
        self.slots: list[SlotFactors | None] = [None] * num_slots
        self.rank_capacity = 0
        tensor_slots = 0 if self.views else num_slots
        self.a = torch.zeros(tensor_slots, 0, spec.a_columns, device=device, dtype=dtype)
        self.b = torch.zeros(tensor_slots, spec.out_features, 0, device=device, dtype=dtype)
        self.ranks = torch.zeros(tensor_slots, dtype=torch.int32, device=device)  # 0 = slot unused here
        self.used = 0  # slots holding factors, so idle modules skip the kernel
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

    def place(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """a [r, in(·k·k)], b [out, r] -> slot; the delta is scale · b @ a."""
        if self.slots[slot] is None:
            self.used += 1
        self.version = next(_POOL_VERSIONS)
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
            self.version = next(_POOL_VERSIONS)
            if not self.views:
                self.ranks[slot] = 0


class _AdapterLayer(nn.Module):
    """A wrapped base layer, its slot pool (set when an adapter first targets it) and the context."""

    def __init__(self, base: nn.Module, context: AdapterContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.pool: ModulePool | None = None

    def _active_pool(self) -> ModulePool | None:
        """The pool when some row of this call reads an adapter that touches this layer."""
        pool = self.pool
        if self.context.stacks is None or pool is None or pool.used == 0:
            return None
        return pool


class _PlannedLayer(_AdapterLayer):
    """Keeps the plan of the current batch (`lora_plan`) while the rows' stacks and the pool stay
    the same, which is most steps of a batch, so a CPU step pays for the matmuls only. A plan
    holds one batch's gathered factors: (sum of stack ranks) x (in + out) floats per stack
    (per row on the two-bmm layout)."""

    def __init__(self, base: nn.Module, context: AdapterContext) -> None:
        super().__init__(base, context)
        self._plan_key: tuple[int, int, int] | None = None
        self._plan: object = None

    def _cached_plan(self, pool: ModulePool, meta: LoRABatchMeta, build):
        key = (self.context.stacks_version, pool.version, meta.num_tokens)
        if key != self._plan_key:
            # The old plan's merged copies leave the budget before the new plan is sized.
            self.context.merged_bytes -= getattr(self._plan, "nbytes", 0)
            self._plan = build(pool.slots, meta)
            self._plan_key = key
            self.context.merged_bytes += getattr(self._plan, "nbytes", 0)
        return self._plan


class AdapterLinear(_PlannedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, pool = self.context, self._active_pool()
        if pool is None:
            return self.base(x)
        d_in = x.shape[-1]
        tokens = x.numel() // d_in
        if tokens % context.num_rows:
            raise RuntimeError(f"{tokens} tokens do not split over {context.num_rows} rows")
        flat_x = x.reshape(tokens, d_in)
        meta = context.meta_for(tokens // context.num_rows)
        if not pool.views:
            y = self.base(x)
            add_multi_lora(y.reshape(tokens, -1), flat_x, pool.a, pool.b, pool.ranks, meta)
            return y
        plan = self._cached_plan(pool, meta, self._build_plan)
        if isinstance(plan, MergedPlan):
            return apply_merged(flat_x, plan, self.base.bias).view(*x.shape[:-1], -1)
        y = self.base(x)
        apply_linear(y.reshape(tokens, -1), flat_x, plan)  # a view: F.linear's output is contiguous
        return y

    def _build_plan(self, slots, meta: LoRABatchMeta):
        """Merged copies where they pay (`lora_plan.merge_pays`) and fit the context's budget;
        the factorized deltas elsewhere."""
        weight = self.base.weight  # [out, in]
        if merge_pays(meta.num_tokens // meta.num_rows, weight.shape[1], weight.shape[0]):
            # at most: a copy per distinct stack, or per segment (one per row at most) when stacked
            copies = max(len(merged_stacks(meta)), meta.num_rows)
            need = copies * weight.numel() * weight.element_size()
            if self.context.merged_bytes + need <= self.context.merge_budget_bytes:
                old = self._plan
                # `_cached_plan` keys plans on (stacks, pool version, tokens): the same pool
                # version means the same slot contents, so the old copies are still right.
                same_pool = self.pool is not None and self._plan_key is not None and self._plan_key[1] == self.pool.version
                reuse = old.merged if isinstance(old, MergedPlan) and same_pool else None
                return plan_merged(slots, meta, weight, reuse)
        return plan_linear(slots, meta)


class AdapterConv2d(_PlannedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        context, pool = self.context, self._active_pool()
        if pool is None:
            return y
        if x.shape[0] != context.num_rows:
            raise RuntimeError(f"conv input has {x.shape[0]} samples for {context.num_rows} rows")
        base = self.base
        conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        meta = context.meta_for(1)
        if pool.views:
            plan = self._cached_plan(
                pool, meta, lambda slots, meta: plan_conv(slots, meta, base.in_channels, base.kernel_size)
            )
            apply_conv(y, x, plan, conv)
        else:
            add_multi_lora_conv(y, x, pool.a, pool.b, pool.ranks, meta, kernel_size=base.kernel_size, **conv)
        return y


WrappedLayer = AdapterLinear | AdapterConv2d


def wrap_targets(
    components: Mapping[str, nn.Module], targets: Mapping[str, TargetSpec], context: AdapterContext
) -> dict[str, WrappedLayer]:
    """Replace every target module in place by its adapter-aware wrapper; -> target -> wrapper."""
    wrapped: dict[str, WrappedLayer] = {}
    for target in targets:
        component_name, _, path = target.partition(".")
        root = components[component_name]
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = getattr(parent, child)
        if isinstance(base, nn.Linear):
            layer: WrappedLayer = AdapterLinear(base, context)
        elif isinstance(base, nn.Conv2d):
            layer = AdapterConv2d(base, context)
        else:  # pragma: no cover - targets_of lists only these two
            continue
        setattr(parent, child, layer)
        wrapped[target] = layer
    return wrapped
