"""LoCon (the CPU planner's convs, and the oracle) against merged conv weights, per row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdserve.kernels import add_multi_lora_conv, add_multi_lora_conv_reference

from .lora_cases import fill_meta


@pytest.mark.parametrize("conv_op", [add_multi_lora_conv, add_multi_lora_conv_reference], ids=["planner", "oracle"])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), ((3, 1), (1, 2), (1, 0), (2, 1))],
)
def test_conv_reference_matches_merged_weights(conv_op, kernel, stride, padding, dilation) -> None:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    in_ch, out_ch, max_rank = 8, 12, 16
    ranks = [4, 16, 0]
    lora_a = torch.zeros(3, max_rank, in_ch * kh * kw)
    lora_b = torch.zeros(3, out_ch, max_rank)
    for slot, rank in enumerate(ranks):
        lora_a[slot, :rank] = torch.randn(rank, in_ch * kh * kw)
        lora_b[slot, :, :rank] = torch.randn(out_ch, rank)
    slot_ranks = torch.tensor(ranks, dtype=torch.int32)
    stacks = [[(0, 1.0)], [], [(0, 0.5), (1, -1.0)], [(2, 1.0), (1, 0.3)], [(0, 0.5), (1, -1.0)]]
    meta = fill_meta([1] * len(stacks), stacks)
    x = torch.randn(len(stacks), in_ch, 9, 10, dtype=torch.float64)
    base = torch.randn(out_ch, in_ch, kh, kw, dtype=torch.float64)
    conv = {"stride": stride, "padding": padding, "dilation": dilation}
    y = F.conv2d(x, base, **conv)
    expected = []
    for row, stack in enumerate(stacks):
        merged = base.clone()
        for slot, scale in stack:
            rank = ranks[slot]
            delta = lora_b[slot, :, :rank].double() @ lora_a[slot, :rank].double()
            merged += scale * delta.view(out_ch, in_ch, kh, kw)
        expected.append(F.conv2d(x[row : row + 1], merged, **conv))
    y32 = y.float()
    conv_op(y32, x.float(), lora_a, lora_b, slot_ranks, meta, kernel, stride, padding, dilation)
    torch.testing.assert_close(y32.double(), torch.cat(expected), atol=1e-3, rtol=1e-4)
