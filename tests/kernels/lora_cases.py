"""Shared builders for the multi-LoRA tests: padded slot pools, batch stacks and the fp64 oracle
(`sdserve.kernels.lora_reference`)."""

from __future__ import annotations

import torch

from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_reference import multi_lora_oracle


def make_pool(
    ranks: list[int], d_in: int, d_out: int, max_rank: int, dtype: torch.dtype, padding: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot pool with the given per-slot ranks; entries past the rank hold `padding`."""
    num_slots = len(ranks)
    lora_a = torch.full((num_slots, max_rank, d_in), padding, dtype=torch.float32)
    lora_b = torch.full((num_slots, d_out, max_rank), padding, dtype=torch.float32)
    for slot, rank in enumerate(ranks):
        lora_a[slot, :rank] = torch.randn(rank, d_in) / d_in**0.5
        lora_b[slot, :, :rank] = torch.randn(d_out, rank) / max(rank, 1) ** 0.5
    return lora_a.to(dtype), lora_b.to(dtype), torch.tensor(ranks, dtype=torch.int32)


def fill_meta(
    counts: list[int], stacks: list[list[tuple[int, float]]], max_stack: int = 4, static_grid: bool = False
) -> LoRABatchMeta:
    meta = LoRABatchMeta.allocate(max_rows=len(counts) + 2, max_tokens=sum(counts) + 7, max_stack=max_stack)
    meta.static_grid = static_grid
    meta.fill(counts, stacks)
    return meta


# fp64 per-token loop: y[t] + sum_k s * B[:, :r] @ (A[:r] @ x[t]); independent of the plan.
oracle = multi_lora_oracle


# Rank 1, 8 and 64 in one batch, a slot of rank 0 (adapter does not touch this module), rows with
# empty stacks, a row with no tokens, stacks of 1 to 3 entries, negative and zero scales.
MIXED_RANKS = [1, 8, 64, 0, 16]
MIXED_COUNTS = [70, 33, 0, 129, 50, 17, 64]
MIXED_STACKS = [
    [(0, 1.0), (2, 0.5)],
    [],
    [(1, 1.0)],
    [(2, -0.7), (1, 0.3), (0, 1.0)],
    [(3, 1.0)],
    [(2, 0.0), (4, 1.25)],
    [(0, 1.0), (2, 0.5)],
]

TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-2, "rtol": 2e-2},
    torch.bfloat16: {"atol": 1e-1, "rtol": 5e-2},
}
