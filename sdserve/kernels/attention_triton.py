"""Triton scaled multi-branch attention: one pass over a q tile, online softmax per branch.

Grid: (q blocks, batch * heads). Each program keeps its q tile in registers, runs a
flash-attention loop over the text keys, then over the keys of every image branch present for
its batch row, and adds scale * (normalised branch output) to one float32 accumulator.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sdserve.kernels.aot import KernelSpec, make_spec
from sdserve.kernels.attention_reference import check_attention_args
from sdserve.kernels.triton_common import TRITON_DTYPES, dot_precision

LOG2_E = 1.4426950408889634


@triton.jit
def _attend_branch(
    q,  # [BLOCK_M, BLOCK_D] tile
    k_ptr,  # keys of this (batch, head): [kv_len, D], head dim contiguous
    v_ptr,  # values of this (batch, head): [kv_len, D], head dim contiguous
    kv_len,
    stride_k_n,
    stride_v_n,
    offs_d,
    mask_d,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """softmax(q K^T * qk_scale / log2(e)) V for one branch, by online softmax in base 2."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n_start in range(0, kv_len, BLOCK_N):
        mask_n = offs_n < kv_len - n_start
        keys = n_start + offs_n
        k_t = tl.load(
            k_ptr + keys[None, :] * stride_k_n + offs_d[:, None],
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + keys[:, None] * stride_v_n + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc / l_i[:, None]


@triton.jit
def _multi_branch_attention_kernel(
    # pointers
    q_ptr,  # [B, H, Lq, D]
    k_text_ptr,  # [B, H, Lt, D]
    v_text_ptr,  # [B, H, Lt, D]
    k_image_ptr,  # [B, NB, H, Li, D]
    v_image_ptr,  # [B, NB, H, Li, D]
    scales_ptr,  # [B, NB] float32, contiguous
    present_ptr,  # [B, NB] int8, contiguous
    lengths_ptr,  # [B, NB] int32, contiguous
    out_ptr,  # [B, H, Lq, D]
    # sizes
    num_heads,
    q_len,
    text_len,
    num_branches,
    head_dim,
    # strides (the head dim is contiguous in every tensor)
    stride_q_b,
    stride_q_h,
    stride_q_m,
    stride_kt_b,
    stride_kt_h,
    stride_kt_n,
    stride_vt_b,
    stride_vt_h,
    stride_vt_n,
    stride_ki_b,
    stride_ki_branch,
    stride_ki_h,
    stride_ki_n,
    stride_vi_b,
    stride_vi_branch,
    stride_vi_h,
    stride_vi_n,
    stride_o_b,
    stride_o_h,
    stride_o_m,
    # meta
    qk_scale,  # log2(e) / sqrt(D)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out = softmax(q Kt^T/sqrt(D)) Vt + sum_{i present} scale[b,i] * softmax(q Ki^T/sqrt(D)) Vi."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim

    q_base = q_ptr + batch.to(tl.int64) * stride_q_b + head * stride_q_h
    q = tl.load(
        q_base + offs_m[:, None] * stride_q_m + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    out = _attend_branch(
        q,
        k_text_ptr + batch.to(tl.int64) * stride_kt_b + head * stride_kt_h,
        v_text_ptr + batch.to(tl.int64) * stride_vt_b + head * stride_vt_h,
        text_len,
        stride_kt_n,
        stride_vt_n,
        offs_d,
        mask_d,
        qk_scale,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
        DOT_PRECISION,
    )
    for branch in range(0, num_branches):
        present = tl.load(present_ptr + batch * num_branches + branch)
        if present != 0:
            scale = tl.load(scales_ptr + batch * num_branches + branch)
            image_len = tl.load(lengths_ptr + batch * num_branches + branch)
            attended = _attend_branch(
                q,
                k_image_ptr
                + batch.to(tl.int64) * stride_ki_b
                + branch * stride_ki_branch
                + head * stride_ki_h,
                v_image_ptr
                + batch.to(tl.int64) * stride_vi_b
                + branch * stride_vi_branch
                + head * stride_vi_h,
                image_len,
                stride_ki_n,
                stride_vi_n,
                offs_d,
                mask_d,
                qk_scale,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                DOT_PRECISION,
            )
            out += scale * attended

    o_base = out_ptr + batch.to(tl.int64) * stride_o_b + head * stride_o_h
    tl.store(
        o_base + offs_m[:, None] * stride_o_m + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def attention_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for SD's head dims (40, 64, 80, 160).

    Chosen so that no configuration spills on sm_80/sm_90 (tests/kernels/test_aot.py): fp32
    operands take twice the registers, so their tiles are smaller.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        if block_d <= 64:
            return 32, 16, block_d, 4
        return (16, 16, block_d, 4) if block_d <= 128 else (16, 16, block_d, 8)
    if block_d <= 64:
        return 64, 32, block_d, 4
    if block_d <= 128:
        return 64, 32, block_d, 8
    return 32, 32, block_d, 8


def scaled_multi_branch_attention_triton(
    q: torch.Tensor,  # [B, H, Lq, D]
    k_text: torch.Tensor,  # [B, H, Lt, D]
    v_text: torch.Tensor,  # [B, H, Lt, D]
    k_image: torch.Tensor | None,  # [B, NB, H, Li, D]
    v_image: torch.Tensor | None,  # [B, NB, H, Li, D]
    image_scales: torch.Tensor | None,  # [B, NB] float32
    image_present: torch.Tensor | None,  # [B, NB] bool
    image_lengths: torch.Tensor | None = None,  # [B, NB] int32, valid image keys (default Li)
) -> torch.Tensor:  # [B, H, Lq, D]
    """out[b] = softmax(q Kt^T/sqrt(D)) Vt + sum_{i: present[b,i]} scale[b,i] * softmax(q Ki^T/sqrt(D)) Vi."""
    num_branches = check_attention_args(
        q, k_text, v_text, k_image, v_image, image_scales, image_present, image_lengths
    )
    batch, heads, q_len, head_dim = q.shape
    if num_branches == 0:
        # Dummies that the kernel never reads (its branch loop runs zero times).
        k_image = v_image = k_text.unsqueeze(1)
        image_scales = torch.zeros((batch, 1), dtype=torch.float32, device=q.device)
        image_present = torch.zeros((batch, 1), dtype=torch.bool, device=q.device)
    if image_lengths is None:
        image_lengths = torch.full(image_present.shape, k_image.shape[3], dtype=torch.int32, device=q.device)
    tensors = (q, k_text, v_text, k_image, v_image)
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the head dim of q, k and v must be contiguous")
    if any(t.dtype != q.dtype for t in tensors):
        raise TypeError("q, k and v must share one dtype")
    scales = image_scales.to(torch.float32).contiguous()
    present = image_present.contiguous().view(torch.int8)
    lengths = image_lengths.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_m, block_n, block_d, num_warps = attention_blocks(head_dim, q.dtype)

    _multi_branch_attention_kernel[(triton.cdiv(q_len, block_m), batch * heads)](
        # pointers
        q_ptr=q,
        k_text_ptr=k_text,
        v_text_ptr=v_text,
        k_image_ptr=k_image,
        v_image_ptr=v_image,
        scales_ptr=scales,
        present_ptr=present,
        lengths_ptr=lengths,
        out_ptr=out,
        # sizes
        num_heads=heads,
        q_len=q_len,
        text_len=k_text.shape[2],
        num_branches=num_branches,
        head_dim=head_dim,
        # strides
        stride_q_b=q.stride(0),
        stride_q_h=q.stride(1),
        stride_q_m=q.stride(2),
        stride_kt_b=k_text.stride(0),
        stride_kt_h=k_text.stride(1),
        stride_kt_n=k_text.stride(2),
        stride_vt_b=v_text.stride(0),
        stride_vt_h=v_text.stride(1),
        stride_vt_n=v_text.stride(2),
        stride_ki_b=k_image.stride(0),
        stride_ki_branch=k_image.stride(1),
        stride_ki_h=k_image.stride(2),
        stride_ki_n=k_image.stride(3),
        stride_vi_b=v_image.stride(0),
        stride_vi_branch=v_image.stride(1),
        stride_vi_h=v_image.stride(2),
        stride_vi_n=v_image.stride(3),
        stride_o_b=out.stride(0),
        stride_o_h=out.stride(1),
        stride_o_m=out.stride(2),
        # meta
        qk_scale=LOG2_E / math.sqrt(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps,
    )
    return out


def aot_specs() -> list[KernelSpec]:
    """The configurations the wrapper launches: every dtype and SD head dim (40, 64, 80, 160)."""
    configs = [(dtype, "tf32") for dtype in TRITON_DTYPES]
    configs.append((torch.float32, "ieee"))
    specs = []
    for dtype, precision in configs:
        name = TRITON_DTYPES[dtype]
        for head_dim in (40, 64, 80, 160):
            block_m, block_n, block_d, num_warps = attention_blocks(head_dim, dtype)
            sizes = ("num_heads", "q_len", "text_len", "num_branches", "head_dim")
            # Strides are multiples of the head dim: divisible by 16 only when it is.
            strides = tuple(
                arg for arg in _multi_branch_attention_kernel.arg_names if arg.startswith("stride_")
            )
            specs.append(
                make_spec(
                    name=f"multi_branch_attention_{name}_{precision}_d{head_dim}",
                    kernel=_multi_branch_attention_kernel,
                    pointers={
                        **dict.fromkeys(
                            ("q_ptr", "k_text_ptr", "v_text_ptr", "k_image_ptr", "v_image_ptr", "out_ptr"),
                            f"*{name}",
                        ),
                        "scales_ptr": "*fp32",
                        "present_ptr": "*i8",
                        "lengths_ptr": "*i32",
                    },
                    constexprs={
                        "BLOCK_M": block_m,
                        "BLOCK_N": block_n,
                        "BLOCK_D": block_d,
                        "DOT_PRECISION": precision,
                    },
                    num_warps=num_warps,
                    not_divisible=sizes + (strides if head_dim % 16 else ()),
                    floats=("qk_scale",),
                )
            )
    return specs
