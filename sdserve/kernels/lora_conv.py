"""Multi-LoRA for convolutions (LoCon): per-row stacks over a batch of feature maps.

Reference only: on CUDA the same torch code runs (cuDNN convolutions); there is no Triton kernel.
Rows are batch samples; `meta` is a `LoRABatchMeta` filled with one "token" per sample, or any
meta whose rows are the samples of x (only its plan, i.e. rows and stacks, is read here).
"""

from __future__ import annotations

import torch

from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_plan import apply_conv, plan_conv, slot_views

IntPair = int | tuple[int, int]


def _pair(value: IntPair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def add_multi_lora_conv_reference(
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
    kh, kw = _pair(kernel_size)
    num_slots, max_rank, fan_in = lora_a.shape
    if x.dim() != 4 or y.dim() != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x [N, in, H, W] and y [N, out, H', W'] expected, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    in_channels, out_channels = x.shape[1], y.shape[1]
    if fan_in != in_channels * kh * kw:
        raise ValueError(f"lora_a fan-in {fan_in} != in {in_channels} * {kh} * {kw}")
    if tuple(lora_b.shape) != (num_slots, out_channels, max_rank):
        raise ValueError(
            f"lora_b must be [{num_slots}, {out_channels}, {max_rank}], got {tuple(lora_b.shape)}"
        )
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"meta covers {meta.num_tokens} samples, x has {x.shape[0]}")
    ranks = slot_ranks.tolist()
    if ranks and (min(ranks) < 0 or max(ranks) > max_rank):
        raise ValueError(f"slot ranks must lie in [0, {max_rank}], got {ranks}")
    conv_args = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation)}
    runs = plan_conv(slot_views(lora_a, lora_b, ranks), meta, in_channels, (kh, kw))
    apply_conv(y, x, runs, conv_args)


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

    Dispatch point kept for symmetry with `add_multi_lora`: the reference serves CPU and CUDA.
    """
    add_multi_lora_conv_reference(
        y, x, lora_a, lora_b, slot_ranks, meta, kernel_size, stride, padding, dilation
    )
