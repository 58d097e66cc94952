"""Public multi-LoRA dispatch: one call per layer kind, and the op over slot tensors.

A wrapped module makes one call, `lora_linear` or `lora_conv2d`, with its base module, its
`LoRALayerState` and this call's per-row stacks; the call returns the base output with every row's
deltas added. It picks the path from the module's slot pool, never from the caller:

- a pool of host views (the CPU): the CPU planner with the layer's kept plan or merged copies
  (`lora_cpu.planned_linear` / `planned_conv`);
- a pool of slot tensors: `add_multi_lora`, the Triton kernels on CUDA tensors when Triton
  imports, the CPU planner over the tensors elsewhere; convs run `add_multi_lora_conv` (torch's
  convolutions on every device).

The plain per-token oracle with the kernels' signature is `lora_reference`. Rows holding a DoRA
adapter on the module are then rescaled per output channel (`lora_dora.apply_dora`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from sdserve.kernels.lora_conv import add_multi_lora_conv
from sdserve.kernels.lora_cpu import add_multi_lora_cpu, planned_conv, planned_linear
from sdserve.kernels.lora_dora import apply_dora
from sdserve.kernels.lora_meta import LoRABatchMeta
from sdserve.kernels.lora_state import LoRALayerState, RowStack


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


def lora_linear(
    x: torch.Tensor,  # [..., d_in], rows along the leading dims, tokens of a row contiguous
    base: nn.Linear,
    layer: LoRALayerState,
    stacks: Sequence[RowStack] | None,  # per row; None: no row reads an adapter
) -> torch.Tensor:
    """y[t] = base(x)[t] + sum_k scale[row(t),k] * B[slot[row(t),k]] @ (A[slot[row(t),k]] @ x[t]).

    Returns y [..., d_out]. The call owns the base GEMM because a merged plan replaces it (the
    merged copy's GEMM is the base's and the deltas' at once).
    """
    pool = layer.pool
    if stacks is None or pool is None or pool.used == 0:
        return base(x)
    d_in = x.shape[-1]
    tokens = x.numel() // d_in
    if tokens % len(stacks):
        raise RuntimeError(f"{tokens} tokens do not split over {len(stacks)} rows")
    meta = layer.batch.meta_for(stacks, tokens // len(stacks))
    if pool.views:
        y = planned_linear(x, base, layer, meta)
    else:
        y = base(x)
        add_multi_lora(y.reshape(tokens, -1), x.reshape(tokens, d_in), pool.a, pool.b, pool.ranks, meta)
    if pool.dora_used:  # rows with a DoRA adapter here: y = g ⊙ (W x + s·B A x) + bias (`lora_dora`)
        apply_dora(y.view(len(stacks), tokens // len(stacks), -1), base.bias, layer, stacks)
    return y


def lora_conv2d(
    x: torch.Tensor,  # [rows, in, H, W]
    base: nn.Conv2d,
    layer: LoRALayerState,
    stacks: Sequence[RowStack] | None,  # per row (sample); None: no row reads an adapter
) -> torch.Tensor:
    """y[n] = base(x)[n] + sum_k scale[n,k] * conv1x1(conv(x[n], A[slot[n,k]].view(r,in,kh,kw)), B[slot[n,k]]).

    Returns y [rows, out, H', W']; the down conv has the base conv's geometry.
    """
    y = base(x)
    pool = layer.pool
    if stacks is None or pool is None or pool.used == 0:
        return y
    if x.shape[0] != len(stacks):
        raise RuntimeError(f"conv input has {x.shape[0]} samples for {len(stacks)} rows")
    conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
    meta = layer.batch.meta_for(stacks, 1)
    if pool.views:
        planned_conv(y, x, base, layer, meta, conv)
    else:
        add_multi_lora_conv(y, x, pool.a, pool.b, pool.ranks, meta, kernel_size=base.kernel_size, **conv)
    if pool.dora_used:
        apply_dora(y, base.bias, layer, stacks)
    return y


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

    Layout contract: rows of A and columns of B past a slot's rank are zero. The CPU planner never
    reads them; the Triton path reads them up to the rank rounded up to its tile and relies on
    the zeros.
    """
    if use_triton(x):
        from sdserve.kernels.lora_triton import add_multi_lora_triton

        add_multi_lora_triton(y, x, lora_a, lora_b, slot_ranks, meta)
    else:
        add_multi_lora_cpu(y, x, lora_a, lora_b, slot_ranks, meta)
