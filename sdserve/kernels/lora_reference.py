"""Torch reference of multi-LoRA over tokens: the CPU path and the oracle of the Triton kernels.

It is the CPU path (`lora_plan`) over views of the slot tensors cut to each slot's rank: rows are
grouped by slot stack (`LoRABatchMeta.plan`), each stack's adapters concatenated into one down and
one up matrix, two matmuls per token run (or two bmm over rows). Rows with an empty stack and
slots of rank 0 cost nothing; rank padding is never read.
"""

from __future__ import annotations

import torch

from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_plan import apply_linear, plan_linear, slot_views


def add_multi_lora_reference(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    slot_ranks: torch.Tensor,  # [num_slots] int32
    meta: LoRABatchMeta,
) -> None:
    """y[t] += sum_k scale[row(t),k] * B[slot[row(t),k]] @ (A[slot[row(t),k]] @ x[t]), in place.

    A is [r, d_in] and B is [d_out, r] (PEFT orientation); products accumulate in float32.
    """
    check_lora_args(y, x, lora_a, lora_b, slot_ranks, meta)
    ranks = slot_ranks.tolist()  # one host read per call, never per token
    if ranks and (min(ranks) < 0 or max(ranks) > lora_a.shape[1]):
        raise ValueError(f"slot ranks must lie in [0, {lora_a.shape[1]}], got {ranks}")
    apply_linear(y, x, plan_linear(slot_views(lora_a, lora_b, ranks), meta))


def check_lora_args(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    meta: LoRABatchMeta,
) -> None:
    """Shape and dtype checks shared by the reference and the Triton wrapper."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x [T, d_in] and y [T, d_out] expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError("lora_a [slots, max_rank, d_in] and lora_b [slots, d_out, max_rank] expected")
    num_slots, max_rank, d_in = lora_a.shape
    if d_in != x.shape[1]:
        raise ValueError(f"lora_a has d_in {d_in}, x has {x.shape[1]}")
    if tuple(lora_b.shape) != (num_slots, y.shape[1], max_rank):
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} does not match ({num_slots}, {y.shape[1]}, {max_rank})"
        )
    if tuple(slot_ranks.shape) != (num_slots,):
        raise ValueError(f"slot_ranks must be [{num_slots}], got {tuple(slot_ranks.shape)}")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, the batch metadata {meta.num_tokens}")
    for dtype in (x.dtype, y.dtype, lora_a.dtype, lora_b.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"unsupported dtype {dtype}")
