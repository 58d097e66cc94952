"""Adapter-aware layers: the model's Linear/Conv2d modules, wrapped once at load.

A wrapped module reads its rows' LoRA stacks from the model's row context (`row_context`) and
makes one call, `kernels.lora_linear` / `kernels.lora_conv2d`: the base output plus the deltas of
the adapters each row's stack holds at this step,
`y[t] = base(x)[t] + Σ_k s[row(t),k] · B[slot] @ (A[slot] @ x[t])`. Which path runs (Triton, the
CPU planner, merged copies), the plans and the merge budget are the kernels' (`kernels/lora.py`,
`kernels/lora_state.py`); the slot pools are written by the residency store. Base weights are
never written (ARCHITECTURE rule 2): a hot swap changes which slots a row reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sdserve.adapters import TargetSpec
from sdserve.engine.row_context import RowContextHolder
from sdserve.kernels import LoRABatchState, LoRALayerState, lora_conv2d, lora_linear


class AdapterLinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: RowContextHolder, batch: LoRABatchState) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.lora = LoRALayerState(batch)  # its pool is attached by the residency store

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return lora_linear(x, self.base, self.lora, self.rows.lora_stacks())


class AdapterConv2d(nn.Module):
    def __init__(self, base: nn.Conv2d, rows: RowContextHolder, batch: LoRABatchState) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.lora = LoRALayerState(batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [rows, in, H, W] -> [rows, out, H', W']
        return lora_conv2d(x, self.base, self.lora, self.rows.lora_stacks())


WrappedLayer = AdapterLinear | AdapterConv2d


def wrap_targets(
    components: Mapping[str, nn.Module],
    targets: Mapping[str, TargetSpec],
    rows: RowContextHolder,
    batch: LoRABatchState,
) -> dict[str, WrappedLayer]:
    """Replace every target module in place by its adapter-aware wrapper; -> target -> wrapper.

    `rows` is the model's row-context holder, `batch` the LoRA batch state its layers share."""
    wrapped: dict[str, WrappedLayer] = {}
    for target in targets:
        component_name, _, path = target.partition(".")
        root = components[component_name]
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = getattr(parent, child)
        if isinstance(base, nn.Linear):
            layer: WrappedLayer = AdapterLinear(base, rows, batch)
        elif isinstance(base, nn.Conv2d):
            layer = AdapterConv2d(base, rows, batch)
        else:  # pragma: no cover - targets_of lists only these two
            continue
        setattr(parent, child, layer)
        wrapped[target] = layer
    return wrapped
