"""Triton multi-LoRA over tokens: a shrink kernel (x -> per-entry rank space) and an expand kernel
(rank space -> y, all stack entries of a row summed in one pass).

Grid of the shrink: (token blocks, stack entries, rank blocks). Grid of the expand: (token blocks,
output blocks); it loops over the row's stack entries itself, so each y tile is read and written
once, without atomics, and the result does not depend on launch order. Token blocks never cross a
row boundary (`LoRABatchMeta.block_rows`), so each block reads one slot per stack entry and the
products are plain `tl.dot`s. Rows with an empty stack have no blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdserve.kernels.aot import KernelSpec, make_spec
from sdserve.kernels.lora_meta import DEFAULT_BLOCK_M, LoRABatchMeta
from sdserve.kernels.lora_reference import check_lora_args
from sdserve.kernels.triton_common import TRITON_DTYPES, dot_precision

EXPAND_BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,  # [T, d_in]
    lora_a_ptr,  # [num_slots, max_rank, d_in]
    inter_ptr,  # [T, stack, max_rank] float32
    slot_ranks_ptr,  # [num_slots] int32
    row_starts_ptr,  # [rows + 1] int32
    slot_table_ptr,  # [rows, max_stack] int32
    block_rows_ptr,  # [blocks] int32
    block_starts_ptr,  # [blocks] int32
    # sizes
    d_in,
    max_rank,
    # strides
    stride_x_t,
    stride_x_k,
    stride_a_slot,
    stride_a_r,
    stride_a_k,
    stride_i_t,
    stride_i_e,
    stride_i_r,
    stride_slot_row,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """inter[t, k, :r] = A[slot[row(t),k], :r] @ x[t]  for the t of one block, one entry k."""
    pid_block = tl.program_id(0)
    entry = tl.program_id(1)
    pid_r = tl.program_id(2)
    row = tl.load(block_rows_ptr + pid_block)
    if row < 0:
        return
    slot = tl.load(slot_table_ptr + row * stride_slot_row + entry)
    if slot < 0:
        return
    rank = tl.load(slot_ranks_ptr + slot)
    r_start = pid_r * BLOCK_R
    if r_start >= rank:
        return
    token_start = tl.load(block_starts_ptr + pid_block)
    token_end = tl.load(row_starts_ptr + row + 1)

    offs_m = token_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < token_end
    offs_r = r_start + tl.arange(0, BLOCK_R)
    # Columns past the rank are zero padding (layout contract): reading and writing them up to
    # max_rank keeps the masks uniform, so loads vectorise; the expand multiplies them by zeros.
    mask_r = offs_r < max_rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_t + offs_k[None, :] * stride_x_k
    # A read transposed: [BLOCK_K, BLOCK_R]
    a_ptrs = (
        lora_a_ptr
        + slot.to(tl.int64) * stride_a_slot
        + offs_r[None, :] * stride_a_r
        + offs_k[:, None] * stride_a_k
    )
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, d_in, BLOCK_K):
        mask_k = offs_k < d_in - k_start
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a_tile = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x_tile, a_tile.to(x_tile.dtype), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_x_k
        a_ptrs += BLOCK_K * stride_a_k

    inter_ptrs = (
        inter_ptr
        + offs_m.to(tl.int64)[:, None] * stride_i_t
        + entry * stride_i_e
        + offs_r[None, :] * stride_i_r
    )
    tl.store(inter_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_expand_kernel(
    # pointers
    inter_ptr,  # [T, stack, max_rank] float32
    lora_b_ptr,  # [num_slots, d_out, max_rank]
    y_ptr,  # [T, d_out]
    slot_ranks_ptr,  # [num_slots] int32
    row_starts_ptr,  # [rows + 1] int32
    slot_table_ptr,  # [rows, max_stack] int32
    scale_table_ptr,  # [rows, max_stack] float32
    block_rows_ptr,  # [blocks] int32
    block_starts_ptr,  # [blocks] int32
    # sizes
    d_out,
    max_rank,
    num_entries,
    # strides
    stride_i_t,
    stride_i_e,
    stride_i_r,
    stride_b_slot,
    stride_b_n,
    stride_b_r,
    stride_y_t,
    stride_y_n,
    stride_slot_row,
    stride_scale_row,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """y[t, n] += sum_k scale[row(t),k] * B[slot[row(t),k], n, :r] @ inter[t, k, :r]."""
    pid_block = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = tl.load(block_rows_ptr + pid_block)
    if row < 0:
        return
    token_start = tl.load(block_starts_ptr + pid_block)
    token_end = tl.load(row_starts_ptr + row + 1)

    offs_m = token_start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < token_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for entry in range(0, num_entries):
        slot = tl.load(slot_table_ptr + row * stride_slot_row + entry)
        scale = tl.load(scale_table_ptr + row * stride_scale_row + entry)
        # Empty entries get rank 0, so the rank loop below runs zero times.
        rank = tl.where(slot >= 0, tl.load(slot_ranks_ptr + tl.maximum(slot, 0)), 0)
        inter_ptrs = (
            inter_ptr
            + offs_m.to(tl.int64)[:, None] * stride_i_t
            + entry * stride_i_e
            + offs_r[None, :] * stride_i_r
        )
        # B read transposed: [BLOCK_R, BLOCK_N]
        b_ptrs = (
            lora_b_ptr
            + tl.maximum(slot, 0).to(tl.int64) * stride_b_slot
            + offs_n[None, :] * stride_b_n
            + offs_r[:, None] * stride_b_r
        )
        for r_start in range(0, rank, BLOCK_R):
            mask_r = offs_r < max_rank - r_start  # zero padding up to max_rank, see the shrink
            hidden = tl.load(inter_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0) * scale
            b_tile = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            # Half-precision adapters multiply in their own dtype on tensor cores (fp32 accumulate);
            # the scale goes on the small operand so the dot accumulates in place.
            acc = tl.dot(hidden.to(b_tile.dtype), b_tile, acc, input_precision=DOT_PRECISION)
            inter_ptrs += BLOCK_R * stride_i_r
            b_ptrs += BLOCK_R * stride_b_r

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y_t + offs_n[None, :] * stride_y_n
    mask_y = mask_m[:, None] & mask_n[None, :]
    y_tile = tl.load(y_ptrs, mask=mask_y, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=mask_y)


def shrink_tiles(max_rank: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K) of the shrink: tl.dot needs >= 16; ranks above 64 span rank blocks.

    Tiles are chosen so that no configuration spills on sm_80/sm_90 (tests/kernels/test_aot.py).
    """
    block_r = min(max(16, triton.next_power_of_2(max_rank)), 64)
    return block_r, (32 if dtype == torch.float32 else 64)


def expand_rank_block(max_rank: int, dtype: torch.dtype) -> int:
    """BLOCK_R of the expand (its loop walks the rank); fp32 operands take twice the registers."""
    return min(max(16, triton.next_power_of_2(max_rank)), 16 if dtype == torch.float32 else 32)


def add_multi_lora_triton(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    slot_ranks: torch.Tensor,  # [num_slots] int32
    meta: LoRABatchMeta,
) -> None:
    """y[t] += sum_k scale[row(t),k] * B[slot[row(t),k]] @ (A[slot[row(t),k]] @ x[t]), in place.

    A is [r, d_in] and B is [d_out, r] (PEFT orientation); accumulation in float32.
    """
    check_lora_args(y, x, lora_a, lora_b, slot_ranks, meta)
    tensors = (y, x, lora_a, lora_b, slot_ranks, meta.row_starts, meta.slot_table, meta.block_rows)
    if any(t.device != x.device for t in tensors):
        raise ValueError("all tensors and the batch metadata must live on one device")
    if slot_ranks.dtype != torch.int32:
        raise TypeError("slot_ranks must be int32")
    if meta.static_grid:
        num_blocks, num_entries = meta.max_blocks, meta.max_stack
    else:
        num_blocks, num_entries = meta.num_blocks, meta.active_stack
    if num_blocks == 0 or num_entries == 0 or x.shape[0] == 0:
        return
    max_rank = lora_a.shape[1]
    shrink_block_r, shrink_block_k = shrink_tiles(max_rank, x.dtype)
    expand_block_r = expand_rank_block(max_rank, lora_b.dtype)
    precision = dot_precision(x.dtype)
    inter = torch.empty((x.shape[0], num_entries, max_rank), dtype=torch.float32, device=x.device)

    _lora_shrink_kernel[(num_blocks, num_entries, triton.cdiv(max_rank, shrink_block_r))](
        # pointers
        x_ptr=x,
        lora_a_ptr=lora_a,
        inter_ptr=inter,
        slot_ranks_ptr=slot_ranks,
        row_starts_ptr=meta.row_starts,
        slot_table_ptr=meta.slot_table,
        block_rows_ptr=meta.block_rows,
        block_starts_ptr=meta.block_starts,
        # sizes
        d_in=x.shape[1],
        max_rank=max_rank,
        # strides
        stride_x_t=x.stride(0),
        stride_x_k=x.stride(1),
        stride_a_slot=lora_a.stride(0),
        stride_a_r=lora_a.stride(1),
        stride_a_k=lora_a.stride(2),
        stride_i_t=inter.stride(0),
        stride_i_e=inter.stride(1),
        stride_i_r=inter.stride(2),
        stride_slot_row=meta.slot_table.stride(0),
        # meta
        BLOCK_M=meta.block_m,
        BLOCK_R=shrink_block_r,
        BLOCK_K=shrink_block_k,
        DOT_PRECISION=precision,
        num_warps=NUM_WARPS,
    )
    _lora_expand_kernel[(num_blocks, triton.cdiv(y.shape[1], EXPAND_BLOCK_N))](
        # pointers
        inter_ptr=inter,
        lora_b_ptr=lora_b,
        y_ptr=y,
        slot_ranks_ptr=slot_ranks,
        row_starts_ptr=meta.row_starts,
        slot_table_ptr=meta.slot_table,
        scale_table_ptr=meta.scale_table,
        block_rows_ptr=meta.block_rows,
        block_starts_ptr=meta.block_starts,
        # sizes
        d_out=y.shape[1],
        max_rank=max_rank,
        num_entries=num_entries,
        # strides
        stride_i_t=inter.stride(0),
        stride_i_e=inter.stride(1),
        stride_i_r=inter.stride(2),
        stride_b_slot=lora_b.stride(0),
        stride_b_n=lora_b.stride(1),
        stride_b_r=lora_b.stride(2),
        stride_y_t=y.stride(0),
        stride_y_n=y.stride(1),
        stride_slot_row=meta.slot_table.stride(0),
        stride_scale_row=meta.scale_table.stride(0),
        # meta
        BLOCK_M=meta.block_m,
        BLOCK_N=EXPAND_BLOCK_N,
        BLOCK_R=expand_block_r,
        DOT_PRECISION=precision,
        num_warps=NUM_WARPS,
    )


def aot_specs() -> list[KernelSpec]:
    """The configurations `add_multi_lora_triton` launches: every dtype, dot precision, rank block."""
    configs = [(dtype, "tf32") for dtype in TRITON_DTYPES]
    configs.append((torch.float32, "ieee"))
    index_ptrs = dict.fromkeys(
        ("slot_ranks_ptr", "row_starts_ptr", "slot_table_ptr", "block_rows_ptr", "block_starts_ptr"), "*i32"
    )
    # Contiguous inner strides are 1 at launch; stack-sized ints are rarely multiples of 16.
    stack_sized = ("stride_slot_row", "stride_scale_row", "num_entries", "stride_i_t")
    specs = []
    for dtype, precision in configs:
        name = TRITON_DTYPES[dtype]
        shrink_configs = sorted({shrink_tiles(rank, dtype) for rank in (16, 32, 64, 128)})
        for block_r, block_k in shrink_configs:
            specs.append(
                make_spec(
                    name=f"lora_shrink_{name}_{precision}_r{block_r}",
                    kernel=_lora_shrink_kernel,
                    pointers={
                        "x_ptr": f"*{name}",
                        "lora_a_ptr": f"*{name}",
                        "inter_ptr": "*fp32",
                        **index_ptrs,
                    },
                    constexprs={
                        "BLOCK_M": DEFAULT_BLOCK_M,
                        "BLOCK_R": block_r,
                        "BLOCK_K": block_k,
                        "DOT_PRECISION": precision,
                    },
                    num_warps=NUM_WARPS,
                    ones=("stride_x_k", "stride_a_k", "stride_i_r"),
                    not_divisible=stack_sized,
                )
            )
        for block_r in sorted({expand_rank_block(rank, dtype) for rank in (16, 32, 64, 128)}):
            specs.append(
                make_spec(
                    name=f"lora_expand_{name}_{precision}_r{block_r}",
                    kernel=_lora_expand_kernel,
                    pointers={
                        "inter_ptr": "*fp32",
                        "lora_b_ptr": f"*{name}",
                        "y_ptr": f"*{name}",
                        "scale_table_ptr": "*fp32",
                        **index_ptrs,
                    },
                    constexprs={
                        "BLOCK_M": DEFAULT_BLOCK_M,
                        "BLOCK_N": EXPAND_BLOCK_N,
                        "BLOCK_R": block_r,
                        "DOT_PRECISION": precision,
                    },
                    num_warps=NUM_WARPS,
                    ones=("stride_i_r", "stride_b_r", "stride_y_n"),
                    not_divisible=stack_sized,
                )
            )
    return specs
