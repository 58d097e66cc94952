"""Torch reference of multi-LoRA over tokens: the CPU path and the oracle of the Triton kernels.

Fast on CPU by construction: rows are grouped by slot stack (`LoRABatchMeta.plan`, built once per
step), each stack's adapters are sliced to their real rank and concatenated into one down and one
up matrix, and every contiguous token run does two matmuls. Rows with an empty stack and slots of
rank 0 cost nothing; no per-token Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdserve.kernels.lora_meta import LoRABatchMeta


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
    compute_dtype = torch.float32
    if _add_rows_batched(y, x, lora_a, lora_b, ranks, meta):
        return
    direct = y.dtype == compute_dtype and x.dtype == compute_dtype
    for group in meta.plan:
        entries = [(index, slot, ranks[slot]) for index, slot in enumerate(group.slots) if ranks[slot] > 0]
        if not entries:
            continue
        # Stack the real-rank slices: down [R, d_in], up_t [R, d_out], R = sum of ranks.
        down = torch.cat([lora_a[slot, :rank] for _, slot, rank in entries]).to(compute_dtype)
        up_t = torch.cat([lora_b[slot, :, :rank].t() for _, slot, rank in entries]).to(compute_dtype)
        for start, end, scales in group.runs:
            x_run = x[start:end].to(compute_dtype)  # [n, d_in]
            hidden = x_run @ down.t()  # [n, R]
            if len(entries) == 1:
                alpha = scales[entries[0][0]]
            else:
                alpha = 1.0
                hidden *= _scale_vector(entries, scales, hidden.device)
            if direct:
                y[start:end].addmm_(hidden, up_t, alpha=alpha)
            else:
                y[start:end] += torch.mm(hidden, up_t).mul_(alpha)


# Below this many distinct stacks the grouped path is already a handful of ops per layer.
BATCHED_MIN_GROUPS = 3


@dataclass(frozen=True)
class RowFactors:
    """Each row's stack gathered from the slot pools: y[row] += (x[row] @ down[row]^T) @ up[row].

    Rank padding and empty entries are zero; scales are folded into `up`. Depends only on the
    slot pools and the rows' stacks, so a caller may keep it while neither changes (a batch
    steps with the same stacks for many steps).
    """

    down: torch.Tensor  # [rows, S·r, d_in] float32
    up: torch.Tensor  # [rows, S·r, d_out] float32
    tokens_per_row: int

    @property
    def nbytes(self) -> int:
        return (self.down.numel() + self.up.numel()) * 4


def gather_row_factors(
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    ranks: list[int],
    meta: LoRABatchMeta,
) -> RowFactors | None:
    """Factors of the two-bmm path, or None when the batch does not suit it.

    It suits many rows with different stacks and equal token counts: two bmm over rows instead
    of a few small matmuls per distinct stack (what dominated on CPU: op count, not FLOPs).
    A_row [S·r, d_in] is the row's stack cut to the widest rank r in use; rank padding and empty
    entries are masked to zero (never multiplied: padding may hold anything).
    """
    rows = meta.num_rows
    if rows < 2 or len(meta.plan) < BATCHED_MIN_GROUPS or meta.num_tokens % rows:
        return None
    tokens_per_row = meta.num_tokens // rows
    if any(count != tokens_per_row for count in meta.row_token_counts()):
        return None
    stack = meta.active_stack
    slots = meta.slot_table[:rows, :stack].long()  # [rows, S], -1 = empty
    valid = slots >= 0
    if int(valid.any(dim=1).sum()) * 2 < rows:  # mostly adapter-free rows: the grouped path skips them
        return None
    index = slots.clamp(min=0)
    rank_of = torch.tensor(ranks, dtype=torch.long, device=slots.device)[index]  # [rows, S]
    width = max(int(rank_of[valid].max()) if bool(valid.any()) else 0, 1)
    keep = (torch.arange(width, device=slots.device) < rank_of[..., None]) & valid[..., None]  # [rows, S, r]
    coef = torch.where(keep, meta.scale_table[:rows, :stack, None].to(slots.device), 0.0)  # [rows, S, r]
    down = lora_a[index, :width].float()  # [rows, S, r, d_in]
    down = torch.where(keep[..., None], down, 0.0).reshape(rows, stack * width, -1)
    up = lora_b[index, :, :width].float().transpose(-1, -2)  # [rows, S, r, d_out]
    up = torch.where(keep[..., None], up * coef[..., None], 0.0).reshape(rows, stack * width, -1)
    return RowFactors(down, up, tokens_per_row)


def apply_row_factors(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    factors: RowFactors,
) -> None:
    """y[row] += (x[row] @ down[row]^T) @ up[row], in place: one bmm each way over all rows."""
    rows, n = factors.down.shape[0], factors.tokens_per_row
    x_rows = x.view(rows, n, -1).float()  # [rows, n, d_in]
    hidden = torch.bmm(x_rows, factors.down.transpose(1, 2))  # [rows, n, S·r]
    y_rows = y.view(rows, n, -1)  # [rows, n, d_out]
    if y.dtype == torch.float32:
        y_rows.baddbmm_(hidden, factors.up)  # accumulates into y in one pass
    else:
        y_rows += torch.bmm(hidden, factors.up).to(y.dtype)


def _add_rows_batched(
    y: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    lora_a: torch.Tensor,  # [num_slots, max_rank, d_in]
    lora_b: torch.Tensor,  # [num_slots, d_out, max_rank]
    ranks: list[int],
    meta: LoRABatchMeta,
) -> bool:
    """The two-bmm path when the batch suits it (see gather_row_factors); False: nothing done."""
    factors = gather_row_factors(lora_a, lora_b, ranks, meta)
    if factors is None:
        return False
    apply_row_factors(y, x, factors)
    return True


def _scale_vector(
    entries: list[tuple[int, int, int]], scales: tuple[float, ...], device: torch.device
) -> torch.Tensor:
    """[R] float32: each entry's scale repeated over its rank."""
    return torch.cat(
        [torch.full((rank,), scales[index], dtype=torch.float32) for index, _, rank in entries]
    ).to(device)


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
