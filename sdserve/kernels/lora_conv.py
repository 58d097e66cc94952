"""Multi-LoRA for convolutions (LoCon): per-row stacks over a batch of feature maps.

There is no Triton kernel: the CPU planner's torch code (`lora_cpu.add_multi_lora_conv_cpu`) serves
CPU and CUDA tensors alike (cuDNN convolutions on CUDA). Rows are batch samples; `meta` is a
`LoRABatchMeta` filled with one "token" per sample, or any meta whose rows are the samples of x.
The oracle with the same signature is `lora_reference.add_multi_lora_conv_reference`.
"""

from __future__ import annotations

import torch

from sdserve.kernels.lora_cpu import add_multi_lora_conv_cpu
from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_reference import IntPair


def add_multi_lora_conv(
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

    Dispatch point kept for symmetry with `add_multi_lora`: the planner serves CPU and CUDA.
    """
    add_multi_lora_conv_cpu(y, x, lora_a, lora_b, slot_ranks, meta, kernel_size, stride, padding, dilation)
