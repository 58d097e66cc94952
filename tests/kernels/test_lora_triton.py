"""Triton multi-LoRA kernels (in Triton's interpreter) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from sdserve.kernels.lora_reference import add_multi_lora_reference

from .lora_cases import MIXED_COUNTS, MIXED_RANKS, MIXED_STACKS, TOLERANCES, fill_meta, make_pool

# tl.dot is wrong for bf16 in the interpreter, so bf16 is covered by the AOT compile only.
DTYPES = [torch.float32, torch.float16]


def run_both(interpreted, counts, stacks, ranks, d_in, d_out, max_rank, dtype, static_grid=False):
    lora_a, lora_b, slot_ranks = make_pool(ranks, d_in, d_out, max_rank=max_rank, dtype=dtype)
    meta = fill_meta(counts, stacks, max_stack=max(4, max(map(len, stacks))), static_grid=static_grid)
    x = torch.randn(sum(counts), d_in).to(dtype)
    y = torch.randn(sum(counts), d_out).to(dtype)
    expected = y.clone()
    add_multi_lora_reference(expected, x, lora_a, lora_b, slot_ranks, meta)
    interpreted["lora_triton"].add_multi_lora_triton(y, x, lora_a, lora_b, slot_ranks, meta)
    return y, expected


@pytest.mark.parametrize("dtype", DTYPES)
# 1280 runs the same code over 4x the blocks (16 s interpreted): slow; 320 stays in the default suite.
@pytest.mark.parametrize(("d_in", "d_out"), [(320, 320), pytest.param(1280, 1280, marks=pytest.mark.slow)])
def test_triton_matches_reference_mixed_batch(interpreted, dtype, d_in, d_out) -> None:
    """Ranks 1/8/64 and a rank-0 slot in one launch, empty stacks, odd row sizes."""
    y, expected = run_both(interpreted, MIXED_COUNTS, MIXED_STACKS, MIXED_RANKS, d_in, d_out, 64, dtype)
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])


def test_triton_rank_above_block_and_odd_sizes(interpreted) -> None:
    """Rank 128 spans several rank blocks; d_in/d_out not multiples of the tiles; 3 odd rows."""
    counts = [37, 5, 91]
    stacks = [[(1, 0.9)], [(0, 1.0), (1, -0.5)], [(0, 2.0)]]
    y, expected = run_both(interpreted, counts, stacks, [3, 128], 200, 72, 128, torch.float32)
    torch.testing.assert_close(y, expected, **TOLERANCES[torch.float32])


def test_triton_static_grid_matches(interpreted) -> None:
    """CUDA-graph mode launches over the full capacities; padding blocks and entries must be no-ops."""
    y, expected = run_both(
        interpreted, MIXED_COUNTS, MIXED_STACKS, MIXED_RANKS, 320, 640, 64, torch.float32, static_grid=True
    )
    torch.testing.assert_close(y, expected, **TOLERANCES[torch.float32])


def test_triton_batch_without_adapters_is_noop(interpreted) -> None:
    counts, stacks = [9, 12], [[], []]
    y, expected = run_both(interpreted, counts, stacks, [8], 320, 320, 16, torch.float32)
    assert torch.equal(y, expected)


HIDDEN_SIZES = [320, 640, 768, 1024, 1280, 2048]
RANKS = [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("rank", RANKS)
def test_triton_full_grid(interpreted, dtype, hidden, rank) -> None:
    """Every family hidden size x ranks 1..128, mixed with ranks 1 and 128 in one batch."""
    ranks = [rank, 1, 128, 0]
    counts = [33, 0, 64, 17, 5]
    stacks = [[(0, 1.0)], [(1, 1.0)], [(0, 0.5), (2, -1.0)], [], [(1, 1.5), (0, 1.0), (3, 1.0)]]
    y, expected = run_both(interpreted, counts, stacks, ranks, hidden, hidden, 128, dtype)
    torch.testing.assert_close(y, expected, **TOLERANCES[dtype])
