"""The CPU planner: multi-LoRA on the CPU through plans (`lora_plan`), built once per batch.

Two ways in:
- `add_multi_lora_cpu` / `add_multi_lora_conv_cpu` take the kernels' arguments (slot tensors A
  `[slots, max_rank, in]`, B `[slots, out, max_rank]`, batch metadata) and plan over views of
  them cut to each slot's rank. `add_multi_lora` runs the first off CUDA; `add_multi_lora_conv`
  runs the second everywhere (torch's convolutions, cuDNN on CUDA: there is no Triton conv).
- `planned_linear` / `planned_conv` serve a wrapped module whose pool holds views of the host
  adapters (`ModulePool.views`): the module's plan is kept (`LoRALayerState.plan`) while the rows'
  stacks and the pool stay the same, and a Linear that sees many tokens per row and is narrow
  (SD's first UNet level) keeps merged weight copies per stack instead, where one step's deltas
  cost at least twice the merge (`lora_plan.merge_pays`) and the copies fit the model's merge
  budget (`LoRABatchState.merge_budget_bytes`, all layers together): the step then pays no delta.
  Same math as the oracle (`lora_reference`), summed in another order (float rounding apart).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_plan import (
    MergedPlan,
    apply_conv,
    apply_linear,
    apply_merged,
    merge_pays,
    merged_stacks,
    plan_conv,
    plan_linear,
    plan_merged,
    slot_views,
)
from sdserve.kernels.lora_reference import IntPair, check_conv_args, check_lora_args, checked_ranks
from sdserve.kernels.lora_state import LoRALayerState


def add_multi_lora_cpu(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    slot_ranks: torch.Tensor,  # [num_slots] int32
    meta: LoRABatchMeta,
) -> None:
    """y[t] += sum_k scale[row(t),k] * B[slot[row(t),k]] @ (A[slot[row(t),k]] @ x[t]), in place.

    Rows grouped by slot stack (`meta.plan`), each stack's adapters concatenated into one down and
    one up matrix: two matmuls per run of tokens (or two bmm over rows); sums in float32. Rows
    with an empty stack and slots of rank 0 cost nothing; rank padding is never read.
    """
    check_lora_args(y, x, lora_a, lora_b, slot_ranks, meta)
    ranks = checked_ranks(slot_ranks, lora_a.shape[1])
    apply_linear(y, x, plan_linear(slot_views(lora_a, lora_b, ranks), meta))


def add_multi_lora_conv_cpu(
    y: torch.Tensor,  # [N, out, H', W']
    x: torch.Tensor,  # [N, in, H, W]
    lora_a: torch.Tensor,  # [num_slots, max_rank, in * kh * kw]
    lora_b: torch.Tensor,  # [num_slots, out, max_rank]
    slot_ranks: torch.Tensor,  # [num_slots] int32
    meta: LoRABatchMeta,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> None:
    """y[n] += sum_k scale[n,k] * conv1x1(conv(x[n], A[slot[n,k]].view(r,in,kh,kw)), B[slot[n,k]]).

    The down conv uses the base conv's kernel/stride/padding/dilation, the up conv is 1x1 (kohya
    LoCon and PEFT orientation). Sums in float32; rows whose run of samples is contiguous share one
    conv pair.
    """
    kernel, conv_args = check_conv_args(y, x, lora_a, lora_b, meta, kernel_size, stride, padding, dilation)
    ranks = checked_ranks(slot_ranks, lora_a.shape[1])
    runs = plan_conv(slot_views(lora_a, lora_b, ranks), meta, x.shape[1], kernel)
    apply_conv(y, x, runs, conv_args)


def planned_linear(x: torch.Tensor, base: nn.Linear, layer: LoRALayerState, meta: LoRABatchMeta) -> torch.Tensor:
    """base(x) plus the deltas of `meta`'s rows, through the layer's kept plan. x [..., in] -> [..., out]."""
    flat_x = x.reshape(meta.num_tokens, x.shape[-1])  # [T, in]
    plan = _kept_plan(layer, meta, lambda: _linear_plan(layer, base.weight, meta))
    if isinstance(plan, MergedPlan):
        return apply_merged(flat_x, plan, base.bias).view(*x.shape[:-1], -1)
    y = base(x)
    apply_linear(y.reshape(meta.num_tokens, -1), flat_x, plan)  # a view: F.linear's output is contiguous
    return y


def planned_conv(
    y: torch.Tensor,  # [N, out, H', W'], base(x)
    x: torch.Tensor,  # [N, in, H, W]
    base: nn.Conv2d,
    layer: LoRALayerState,
    meta: LoRABatchMeta,
    conv_args: dict,
) -> None:
    """y += the conv deltas of `meta`'s rows (one sample per row), through the layer's kept plan."""
    assert layer.pool is not None
    slots = layer.pool.slots
    runs = _kept_plan(layer, meta, lambda: plan_conv(slots, meta, base.in_channels, base.kernel_size))
    apply_conv(y, x, runs, conv_args)  # type: ignore[arg-type]


def _kept_plan(layer: LoRALayerState, meta: LoRABatchMeta, build: Callable[[], object]) -> object:
    """The layer's plan for this batch: kept while (stacks, pool contents, token count) stay."""
    assert layer.pool is not None
    batch = layer.batch
    key = (batch.stacks_version, layer.pool.version, meta.num_tokens)
    if key != layer.plan_key:
        # The old plan's merged copies leave the budget before the new plan is sized; `build`
        # still sees the old plan and key (merged copies it may reuse).
        batch.merged_bytes -= getattr(layer.plan, "nbytes", 0)
        layer.plan = build()
        layer.plan_key = key
        batch.merged_bytes += getattr(layer.plan, "nbytes", 0)
    return layer.plan


def _linear_plan(layer: LoRALayerState, weight: torch.Tensor, meta: LoRABatchMeta) -> object:
    """Merged copies where they pay (`merge_pays`) and fit the budget; the factorized deltas elsewhere.
    weight: the base's [out, in]."""
    pool, batch = layer.pool, layer.batch
    assert pool is not None
    if merge_pays(meta.num_tokens // meta.num_rows, weight.shape[1], weight.shape[0]):
        # at most: a copy per distinct stack, or per segment (one per row at most) when stacked
        copies = max(len(merged_stacks(meta)), meta.num_rows)
        need = copies * weight.numel() * weight.element_size()
        if batch.merged_bytes + need <= batch.merge_budget_bytes:
            old = layer.plan
            # Plans are keyed on (stacks, pool version, tokens): the same pool version means the
            # same slot contents, so the old plan's copies are still right.
            same_pool = layer.plan_key is not None and layer.plan_key[1] == pool.version
            reuse = old.merged if isinstance(old, MergedPlan) and same_pool else None
            return plan_merged(pool.slots, meta, weight, reuse)
    return plan_linear(pool.slots, meta)
