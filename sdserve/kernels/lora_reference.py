"""Plain torch oracles of multi-LoRA: a loop over tokens (conv: samples) and stack entries.

They take the kernels' arguments (`add_multi_lora`, `add_multi_lora_conv`) but read only the batch
metadata's tables (`row_starts`, `slot_table`, `scale_table`, `stack_lens`), never its `plan`, and
sum in float64, rounding once into y: an independent check of the Triton kernels and of the CPU
planner (`lora_cpu`), its grouping of rows by stack included. Slow by design (a Python loop over
tokens): tests and benches only, never the serving path. Rank padding is never read.

The argument checks every path shares live here too, beside the semantics they guard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sdserve.kernels.lora_meta import LoRABatchMeta

IntPair = int | tuple[int, int]
RowStack = Sequence[tuple[int, float]]  # (slot, scale) of each adapter of one row's stack


def add_multi_lora_reference(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    slot_ranks: torch.Tensor,  # [num_slots] int32
    meta: LoRABatchMeta,
) -> None:
    """y[t] += sum_k scale[row(t),k] * B[slot[row(t),k]] @ (A[slot[row(t),k]] @ x[t]), in place.

    A is [r, d_in] and B is [d_out, r] (PEFT orientation); the oracle sums in float64.
    """
    check_lora_args(y, x, lora_a, lora_b, slot_ranks, meta)
    ranks = checked_ranks(slot_ranks, lora_a.shape[1])
    expected = multi_lora_oracle(y, x, lora_a, lora_b, ranks, meta.row_token_counts(), table_stacks(meta))
    y.copy_(expected.to(y.dtype))


def multi_lora_oracle(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    ranks: Sequence[int] | torch.Tensor,  # [num_slots]
    counts: Sequence[int],  # tokens of each row, rows contiguous in T
    stacks: Sequence[RowStack],  # per row
) -> torch.Tensor:
    """float64 [T, d_out]: y[t] + sum_k s_k * B[slot_k][:, :r] @ (A[slot_k][:r] @ x[t]), token by token.

    Takes rows and stacks as plain lists (no batch metadata), so tests can build expectations
    without going through `LoRABatchMeta.fill`.
    """
    out = y.double().clone()
    x64 = x.double()
    row_of_token = [row for row, count in enumerate(counts) for _ in range(count)]
    for token, row in enumerate(row_of_token):
        for slot, scale in stacks[row]:
            rank = int(ranks[slot])
            down = lora_a[slot, :rank].double() @ x64[token]  # [r]
            out[token] += scale * (lora_b[slot, :, :rank].double() @ down)  # [d_out]
    return out


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

    The oracle: per sample, its stack as one float64 delta kernel sum_k s_k (B_k @ A_k).view(out,
    in, kh, kw) (the same linear map) and one conv with the base conv's geometry.
    """
    (kh, kw), conv_args = check_conv_args(y, x, lora_a, lora_b, meta, kernel_size, stride, padding, dilation)
    ranks = checked_ranks(slot_ranks, lora_a.shape[1])
    in_channels, out_channels = x.shape[1], y.shape[1]
    out = y.double()
    starts = meta.active_row_starts().tolist()
    for row, stack in enumerate(table_stacks(meta)):
        for sample in range(starts[row], starts[row + 1]):
            delta = torch.zeros(out_channels, in_channels * kh * kw, dtype=torch.float64, device=x.device)
            for slot, scale in stack:
                rank = ranks[slot]
                delta += scale * (lora_b[slot, :, :rank].double() @ lora_a[slot, :rank].double())
            kernel = delta.view(out_channels, in_channels, kh, kw)
            out[sample] += F.conv2d(x[sample : sample + 1].double(), kernel, **conv_args)[0]
    y.copy_(out.to(y.dtype))


def table_stacks(meta: LoRABatchMeta) -> list[list[tuple[int, float]]]:
    """Each row's (slot, scale) entries as the metadata's tables hold them (one host read)."""
    lengths = meta.stack_lens[: meta.num_rows].tolist()
    slots = meta.active_slot_table().tolist()
    scales = meta.active_scale_table().tolist()
    return [list(zip(slots[row][:length], scales[row][:length])) for row, length in enumerate(lengths)]


def checked_ranks(slot_ranks: torch.Tensor, max_rank: int) -> list[int]:
    """The slots' ranks on the host (one read per call, never per token), each in [0, max_rank]."""
    ranks = slot_ranks.tolist()
    if ranks and (min(ranks) < 0 or max(ranks) > max_rank):
        raise ValueError(f"slot ranks must lie in [0, {max_rank}], got {ranks}")
    return ranks


def check_lora_args(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    meta: LoRABatchMeta,
) -> None:
    """Shape and dtype checks shared by the oracle, the CPU planner and the Triton wrapper."""
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


def pair(value: IntPair) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def check_conv_args(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    meta: LoRABatchMeta,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
) -> tuple[tuple[int, int], dict[str, tuple[int, int]]]:
    """Shape checks of the conv paths -> ((kh, kw), the down conv's stride/padding/dilation)."""
    kh, kw = pair(kernel_size)
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
    return (kh, kw), {"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation)}
