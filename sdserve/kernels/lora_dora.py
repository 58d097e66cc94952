"""DoRA per row: each row's output rescaled by its DoRA adapter's magnitude over a column norm.

A DoRA module (weight-decomposed LoRA, PEFT `use_dora=True`) with base weight W `[out, in·kh·kw]`,
factors B A scaled by c (alpha / r) and magnitude m `[out]`, at a request's strength t, outputs

    y = g ⊙ (W x + t·c·B A x) + bias,    g = m / ‖W + t·c·B A‖   (norm per output channel)

which is PEFT's `DoraLinearLayer` / `DoraConv2dLayer` forward (its norm is detached, and the bias
is not rescaled; PEFT's `scaling` is c times the `set_adapters` weight, t here). The norm is taken
in closed form, so rows at different strengths share one batch and each gets its own factor:

    ‖W + s·D‖² = ‖W‖² + 2 s ⟨W, D⟩ + s² ‖D‖²    per output channel, D = c·B A, s = t

The three per-channel terms are computed once, when the adapter is placed in a module's slot
(`dora_terms`). The LoRA part (W x + s·D x, bias included) is the multi-LoRA kernels' output as
for any adapter; `apply_dora` then rewrites the rows that hold a DoRA slot in place:
y_row = g_row ⊙ (y_row − bias) + bias. Rows without one are not touched (bit-identical).

A row may hold one adapter per module when that adapter is DoRA: PEFT rescales whatever the
earlier adapters of its list added (an order-dependent sum), which is not reproduced; the
residency store refuses such stacks before they run, and `apply_dora` checks it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sdserve.kernels.lora_state import LoRALayerState, RowStack


@dataclass(frozen=True)
class DoraTerms:
    """One DoRA module's per-channel terms, on the slot pool's device, float32."""

    magnitude: torch.Tensor  # [out] m
    weight_sq: torch.Tensor  # [out] ‖W‖² per output channel
    cross: torch.Tensor  # [out] ⟨W, c·B A⟩ per output channel
    delta_sq: torch.Tensor  # [out] ‖c·B A‖² per output channel


@torch.no_grad()
def dora_terms(
    magnitude: torch.Tensor,  # [out]
    weight: torch.Tensor,  # [out, in] or [out, in, kh, kw]: the base module's weight
    a: torch.Tensor,  # [r, in·kh·kw]
    b: torch.Tensor,  # [out, r]
    scale: float,  # c = alpha / r
    device: torch.device,
) -> DoraTerms:
    """The terms of ‖W + s·c·B A‖² for every s, computed in float64 once."""
    w = weight.detach().reshape(weight.shape[0], -1).to(device, torch.float64)  # [out, in·kh·kw]
    delta = scale * (b.to(device, torch.float64) @ a.to(device, torch.float64))  # [out, in·kh·kw]
    return DoraTerms(
        magnitude=magnitude.to(device, torch.float32).reshape(-1),
        weight_sq=(w * w).sum(1).float(),
        cross=(w * delta).sum(1).float(),
        delta_sq=(delta * delta).sum(1).float(),
    )


def dora_gain(terms: DoraTerms, strength: float) -> torch.Tensor:
    """g = m / ‖W + strength·c·B A‖ per output channel, float32 [out]."""
    norm_sq = terms.weight_sq + (2.0 * strength) * terms.cross + (strength * strength) * terms.delta_sq
    return terms.magnitude / norm_sq.clamp_min(0.0).sqrt()


def _row_gains(layer: LoRALayerState, stacks: Sequence[RowStack]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows holding a DoRA slot [n] int64, their gains [n, out] float32), or None for none;
    kept while the rows' stacks and the pool stay the same."""
    pool = layer.pool
    assert pool is not None
    key = (layer.batch.stacks_version, pool.version, len(stacks))
    if layer.dora_key == key:
        return layer.dora_plan
    rows, gains = [], []
    for row, stack in enumerate(stacks):
        dora = [(slot, strength) for slot, strength in stack if pool.dora[slot] is not None]
        if not dora:
            continue
        held = sum(1 for slot, _ in stack if pool.slots[slot] is not None)
        if len(dora) > 1 or held > 1:
            raise RuntimeError("a DoRA adapter shares a module with another adapter in one row's stack")
        slot, strength = dora[0]
        rows.append(row)
        gains.append(dora_gain(pool.dora[slot], float(strength)))
    plan = None
    if rows:
        plan = (torch.tensor(rows, dtype=torch.int64, device=gains[0].device), torch.stack(gains))
    layer.dora_plan, layer.dora_key = plan, key
    return plan


def apply_dora(
    y: torch.Tensor,  # [rows, tokens, out] (Linear) or [rows, out, H, W] (conv): the LoRA output
    bias: torch.Tensor | None,  # [out]
    layer: LoRALayerState,
    stacks: Sequence[RowStack],  # per row
) -> None:
    """y[row] = g_row ⊙ (y[row] − bias) + bias for every row holding a DoRA slot, in place."""
    plan = _row_gains(layer, stacks)
    if plan is None:
        return
    rows, gains = plan  # [n], [n, out]
    shape = (-1, 1, gains.shape[1]) if y.ndim == 3 else (-1, gains.shape[1], 1, 1)
    gains = gains.view(shape)
    picked = y[rows].float()  # [n, ...]
    if bias is None:
        picked = picked * gains
    else:
        b = bias.detach().float().view(shape[1:])
        picked = (picked - b) * gains + b
    y[rows] = picked.to(y.dtype)
