"""Public multi-LoRA op: Triton on CUDA tensors when Triton imports, the torch reference elsewhere."""

from __future__ import annotations

import functools

import torch

from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_reference import add_multi_lora_reference


@functools.cache
def triton_available() -> bool:
    """True when Triton imports; cached, so a missing Triton costs one failed import."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def add_multi_lora(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    slot_ranks: torch.Tensor,  # [num_slots] int32
    meta: LoRABatchMeta,
) -> None:
    """y[t] += sum_k scale[row(t),k] * B[slot[row(t),k]] @ (A[slot[row(t),k]] @ x[t]), in place.

    A is [r, d_in] and B is [d_out, r] (PEFT orientation); tokens t belong to batch rows
    (`meta.row_starts`), stacks to rows (`meta.slot_table`, `meta.scale_table`). Accumulates in
    float32 whatever the dtype of x and y (fp32, fp16, bf16).

    Layout contract: rows of A and columns of B past a slot's rank are zero. The reference never
    reads them; the Triton path reads them up to the rank rounded up to its tile and relies on
    the zeros.
    """
    if use_triton(x):
        from sdserve.kernels.lora_triton import add_multi_lora_triton

        add_multi_lora_triton(y, x, lora_a, lora_b, slot_ranks, meta)
    else:
        add_multi_lora_reference(y, x, lora_a, lora_b, slot_ranks, meta)
