"""The CPU planner's plans: what a batch reads from slot views, gathered once, applied every step.

On the CPU a slot never holds a copy of an adapter: it holds views of the adapter's packed host
buffer (`SlotFactors`), so placing an adapter writes no weights. `plan_linear(slots, meta)`
gathers what one batch reads (float32, module and stack scales folded in) and `apply_linear`
adds the deltas:

    y[t] += Σ_k s[row(t),k] · c[slot] · B[slot] @ (A[slot] @ x[t]),    c = the module's alpha/r

either per run of rows sharing a stack (two matmuls per run) or, for many rows with different
stacks and equal token counts, as two bmm over all rows (what dominated on CPU was op count, not
FLOPs). A plan depends only on the slots and the rows' stacks, so callers keep it while neither
changes (a batch steps with the same stacks for many steps). Conv LoRA (LoCon) plans likewise.
Pure functions: `lora_cpu` keeps the plans (per layer) and runs them over slot views or over views
of the kernels' slot tensors; the oracle all of it is checked against is `lora_reference`.

Where a module sees many tokens per row and is narrow (SD's first UNet level: 1,024-4,096 tokens
of 320 features), one step's deltas cost more than merging the stack into a weight copy once:
`plan_merged` then keeps, per stack, `W' = W + Σ_k s_k · c_k · B_k @ A_k` (its own memory, never
the base weight) and `apply_merged` runs each run of rows' GEMM on its copy, so the step pays no
delta at all. Same math, summed in another order (float rounding apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdserve.kernels.lora_meta import LoRABatchMeta, StackGroup


@dataclass(frozen=True)
class SlotFactors:
    """One adapter's factors for one module: delta = scale · b @ a."""

    a: torch.Tensor  # [r, fan_in] (fan_in = in, or in·kh·kw for a conv)
    b: torch.Tensor  # [out, r]
    scale: float


SlotTable = Sequence[SlotFactors | None]  # index = slot; None: the slot's adapter skips this module


@dataclass(frozen=True)
class RunFactors:
    """Tokens [start, end) read one stack at one set of scales."""

    start: int
    end: int
    down: torch.Tensor  # [R, fan_in] float32, R = sum of the stack's ranks (shared by a group's runs)
    up_t: torch.Tensor  # [R, out] float32, every scale folded in


@dataclass(frozen=True)
class RowFactors:
    """Each row's stack in one tensor: y[row] += (x[row] @ down[row]^T) @ up[row]."""

    down: torch.Tensor  # [rows, R, fan_in] float32, zero past a row's own ranks
    up: torch.Tensor  # [rows, R, out] float32, scales folded in
    tokens_per_row: int


@dataclass(frozen=True)
class LinearPlan:
    runs: tuple[RunFactors, ...] = ()
    rows: RowFactors | None = None


# Below this many distinct stacks the per-run path is already a handful of ops per layer.
BATCHED_MIN_GROUPS = 3


def _group_factors(group: StackGroup, slots: SlotTable) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """down [R, fan_in], up_t [R, out] (module scales folded in), and which stack entries they hold."""
    entries = [index for index, slot in enumerate(group.slots) if slots[slot] is not None]
    if not entries:
        return None
    factors = [slots[group.slots[index]] for index in entries]
    down = torch.cat([f.a.float() for f in factors])  # type: ignore[union-attr]
    up_t = torch.cat([f.b.float().t() * f.scale for f in factors])  # type: ignore[union-attr]
    return down, up_t, entries


def _scale_column(
    entries: list[int], group: StackGroup, slots: SlotTable, scales: tuple[float, ...]
) -> torch.Tensor:
    """[R, 1]: each entry's stack scale repeated over its rank."""
    return torch.cat(
        [torch.full((slots[group.slots[i]].a.shape[0],), scales[i], dtype=torch.float32) for i in entries]  # type: ignore[union-attr]
    )[:, None]


def plan_linear(slots: SlotTable, meta: LoRABatchMeta) -> LinearPlan:
    """What the batch described by `meta` reads from `slots`, gathered for `apply_linear`."""
    per_group = [(group, _group_factors(group, slots)) for group in meta.plan]
    per_group = [(group, gathered) for group, gathered in per_group if gathered is not None]
    rows = _row_factors(per_group, slots, meta)
    if rows is not None:
        return LinearPlan(rows=rows)
    runs = []
    for group, (down, up_t, entries) in per_group:
        for start, end, scales in group.runs:
            runs.append(RunFactors(start, end, down, up_t * _scale_column(entries, group, slots, scales)))
    return LinearPlan(runs=tuple(runs))


# One step's factorized deltas cost 2·T·R·(in + out) FLOPs (T tokens per row, R the stack's rank);
# merging the stack costs 2·R·in·out once per stack and makes every later step's delta free. A module
# is merged where one step's deltas already cost MERGE_PAYBACK times the merge: the merge has paid
# for itself within the first step, whatever the step count.
MERGE_PAYBACK = 2


def merge_pays(tokens_per_row: int, fan_in: int, out: int) -> bool:
    """True where a per-stack merged weight beats the factorized deltas from the first step on."""
    return tokens_per_row * (fan_in + out) >= MERGE_PAYBACK * fan_in * out


@dataclass(frozen=True)
class MergedSegment:
    """Tokens [start, end) run their GEMM on `weight`."""

    start: int
    end: int
    weight: torch.Tensor  # [out, in]: a merged copy, or the base weight itself for rows without a delta here


@dataclass(frozen=True)
class MergedPlan:
    segments: tuple[MergedSegment, ...]  # in token order, covering every token
    merged: dict  # (slots, scales) -> merged weight, reused by the next plan while the pool is unchanged
    nbytes: int  # bytes of the merged copies this plan holds
    # [S, in, out] when the S segments are equally long (each request its own stack, the usual
    # batch): one bmm then runs the whole layer, as fast as the base GEMM, where S separate GEMMs
    # measured ~6 % slower inside the UNet. Segments' weights are views of it.
    stacked: torch.Tensor | None = None


StackKey = tuple[tuple[int, ...], tuple[float, ...]]


def merged_stacks(meta: LoRABatchMeta) -> list[StackKey]:
    """The distinct (slots, scales) stacks of a batch: one merged copy each."""
    return list(dict.fromkeys((group.slots, scales) for group in meta.plan for _, _, scales in group.runs))


def plan_merged(
    slots: SlotTable, meta: LoRABatchMeta, base_weight: torch.Tensor, reuse: dict | None = None
) -> MergedPlan:
    """Per stack of the batch, W + its deltas (float32 sums, stored in W's dtype); rows whose stack
    has no factors on this module, or no stack, read `base_weight`. `reuse`: a previous plan's
    `merged` over the same slot contents (the caller keys it on the pool's version)."""
    reuse = reuse or {}
    merged: dict[StackKey, torch.Tensor] = {}
    pieces: list[tuple[int, int, torch.Tensor]] = []
    for group in meta.plan:
        gathered = _group_factors(group, slots)
        for start, end, scales in group.runs:
            if gathered is None:
                continue  # rows read the base weight, filled in below
            key = (group.slots, scales)
            weight = merged.get(key)
            if weight is None and key in reuse:
                # A view into the last plan's stack of copies would keep all of it alive.
                weight = reuse[key] if reuse[key]._base is None else reuse[key].clone()
            if weight is None:
                down, up_t, entries = gathered
                up_t = up_t * _scale_column(entries, group, slots, scales)  # [R, out]
                # W' = W + up_t^T @ down: [out, R] @ [R, in], accumulated in float32
                weight = torch.addmm(base_weight.float(), up_t.t(), down).to(base_weight.dtype)
            merged[key] = weight
            pieces.append((start, end, weight))
    pieces.sort(key=lambda piece: piece[0])
    segments: list[MergedSegment] = []
    cursor = 0
    for start, end, weight in pieces:
        if start > cursor:
            segments.append(MergedSegment(cursor, start, base_weight))
        segments.append(MergedSegment(start, end, weight))
        cursor = end
    if cursor < meta.num_tokens:
        segments.append(MergedSegment(cursor, meta.num_tokens, base_weight))
    if len(segments) > 1 and len({segment.end - segment.start for segment in segments}) == 1:
        stacked = torch.stack([segment.weight.t() for segment in segments])  # [S, in, out]
        views = {id(segment.weight): stacked[i].t() for i, segment in enumerate(segments)}
        merged = {key: views[id(weight)] for key, weight in merged.items()}
        segments = [MergedSegment(seg.start, seg.end, views[id(seg.weight)]) for seg in segments]
        return MergedPlan(tuple(segments), merged, stacked.numel() * stacked.element_size(), stacked)
    nbytes = sum(w.numel() * w.element_size() for w in merged.values())
    return MergedPlan(tuple(segments), merged, nbytes)


def apply_merged(x: torch.Tensor, plan: MergedPlan, bias: torch.Tensor | None) -> torch.Tensor:
    """y [T, out] = x [T, in] @ W'^T (+ bias), each run of tokens on its own weight."""
    out = plan.segments[0].weight.shape[0]
    if plan.stacked is not None:
        count = plan.stacked.shape[0]
        x_parts = x.reshape(count, x.shape[0] // count, x.shape[1])  # [S, n, in]
        if bias is None:
            return torch.bmm(x_parts, plan.stacked).view(x.shape[0], out)
        return torch.baddbmm(bias, x_parts, plan.stacked).view(x.shape[0], out)
    y = x.new_empty(x.shape[0], out)  # [T, out]
    for segment in plan.segments:
        x_part, y_part = x[segment.start : segment.end], y[segment.start : segment.end]
        if bias is None:
            torch.mm(x_part, segment.weight.t(), out=y_part)
        else:
            torch.addmm(bias, x_part, segment.weight.t(), out=y_part)
    return y


def _row_factors(per_group, slots: SlotTable, meta: LoRABatchMeta) -> RowFactors | None:
    """The two-bmm layout, when the batch suits it (many distinct stacks, equal rows, few idle)."""
    rows = meta.num_rows
    if rows < 2 or len(meta.plan) < BATCHED_MIN_GROUPS or meta.num_tokens % rows:
        return None
    tokens_per_row = meta.num_tokens // rows
    if any(count != tokens_per_row for count in meta.row_token_counts()):
        return None
    covered = sum(end - start for group, _ in per_group for start, end, _ in group.runs) // tokens_per_row
    if covered * 2 < rows:  # mostly adapter-free rows: the per-run path skips them for free
        return None
    width = max(down.shape[0] for _, (down, _, _) in per_group)
    fan_in, out = per_group[0][1][0].shape[1], per_group[0][1][1].shape[1]
    down_rows = torch.zeros(rows, width, fan_in)
    up_rows = torch.zeros(rows, width, out)
    for group, (down, up_t, entries) in per_group:
        rank = down.shape[0]
        for start, end, scales in group.runs:
            first, last = start // tokens_per_row, end // tokens_per_row
            down_rows[first:last, :rank] = down
            up_rows[first:last, :rank] = up_t * _scale_column(entries, group, slots, scales)
    return RowFactors(down_rows, up_rows, tokens_per_row)


def apply_linear(y: torch.Tensor, x: torch.Tensor, plan: LinearPlan) -> None:
    """y [T, out] += the planned deltas for x [T, in], in place; sums in float32."""
    direct = y.dtype == torch.float32
    if plan.rows is not None:
        factors = plan.rows
        rows, n = factors.down.shape[0], factors.tokens_per_row
        hidden = torch.bmm(x.view(rows, n, -1).float(), factors.down.transpose(1, 2))  # [rows, n, R]
        y_rows = y.view(rows, n, -1)  # [rows, n, out]
        if direct:
            y_rows.baddbmm_(hidden, factors.up)  # accumulates into y in one pass
        else:
            y_rows += torch.bmm(hidden, factors.up).to(y.dtype)
        return
    for run in plan.runs:
        hidden = x[run.start : run.end].float() @ run.down.t()  # [n, R]
        if direct:
            y[run.start : run.end].addmm_(hidden, run.up_t)
        else:
            y[run.start : run.end] += (hidden @ run.up_t).to(y.dtype)


@dataclass(frozen=True)
class ConvRun:
    """Samples [start, end) of a conv input read one stack at one set of scales."""

    start: int
    end: int
    down: torch.Tensor  # [R, in, kh, kw] float32
    up: torch.Tensor  # [out, R, 1, 1] float32, scales folded in


def plan_conv(slots: SlotTable, meta: LoRABatchMeta, in_channels: int, kernel: tuple[int, int]) -> tuple[ConvRun, ...]:
    """Per run of samples: the down conv of the base conv's geometry and a 1x1 up conv."""
    runs = []
    for group in meta.plan:
        gathered = _group_factors(group, slots)
        if gathered is None:
            continue
        down, up_t, entries = gathered
        down = down.view(down.shape[0], in_channels, *kernel)
        for start, end, scales in group.runs:
            up = (up_t * _scale_column(entries, group, slots, scales)).t()  # [out, R]
            runs.append(ConvRun(start, end, down, up.reshape(*up.shape, 1, 1)))
    return tuple(runs)


def apply_conv(y: torch.Tensor, x: torch.Tensor, runs: Sequence[ConvRun], conv_args: dict) -> None:
    """y [N, out, H', W'] += conv1x1(conv(x, down), up) per run of samples, in place."""
    for run in runs:
        hidden = F.conv2d(x[run.start : run.end].float(), run.down, **conv_args)  # [n, R, H', W']
        delta = F.conv2d(hidden, run.up)  # [n, out, H', W']
        if delta.shape[2:] != y.shape[2:]:
            raise ValueError(f"LoRA output {tuple(delta.shape[2:])} != y spatial size {tuple(y.shape[2:])}")
        y[run.start : run.end] += delta.to(y.dtype)


def slot_views(lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: list[int]) -> list[SlotFactors | None]:
    """Views of slot tensors A [slots, max_rank, fan_in], B [slots, out, max_rank] (scales already
    folded into B), cut to each slot's rank so that padding is never read."""
    return [
        SlotFactors(lora_a[slot, :rank], lora_b[slot, :, :rank], 1.0) if rank > 0 else None
        for slot, rank in enumerate(ranks)
    ]
