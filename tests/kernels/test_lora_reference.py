"""The CPU planner (the CPU path) and the per-token oracle against independent oracles."""

from __future__ import annotations

import pytest
import torch

from sdserve.kernels import LoRABatchMeta, add_multi_lora
from sdserve.kernels.lora_cpu import add_multi_lora_cpu
from sdserve.kernels.lora_reference import add_multi_lora_reference

from .lora_cases import MIXED_COUNTS, MIXED_RANKS, MIXED_STACKS, TOLERANCES, fill_meta, make_pool, oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("d_in", "d_out"), [(320, 320), (1280, 640)])
def test_reference_matches_per_token_oracle(dtype: torch.dtype, d_in: int, d_out: int) -> None:
    lora_a, lora_b, ranks = make_pool(MIXED_RANKS, d_in, d_out, max_rank=64, dtype=dtype)
    meta = fill_meta(MIXED_COUNTS, MIXED_STACKS)
    x = torch.randn(sum(MIXED_COUNTS), d_in).to(dtype)
    y = torch.randn(sum(MIXED_COUNTS), d_out).to(dtype)
    expected = oracle(y, x, lora_a, lora_b, ranks, MIXED_COUNTS, MIXED_STACKS)
    add_multi_lora_cpu(y, x, lora_a, lora_b, ranks, meta)
    torch.testing.assert_close(y.double(), expected, **TOLERANCES[dtype])


def test_reference_matches_merged_weights() -> None:
    """Rows sharing a stack: x @ (W + sum_k s_k B_k A_k)^T - x @ W^T is the LoRA delta."""
    d_in, d_out = 320, 768
    lora_a, lora_b, ranks = make_pool([4, 32, 128], d_in, d_out, max_rank=128, dtype=torch.float32)
    stack = [(0, 0.8), (1, -1.0), (2, 0.25)]
    counts = [40, 40, 40]
    meta = fill_meta(counts, [stack, [], stack])
    x = torch.randn(120, d_in, dtype=torch.float64)
    weight = torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5
    merged = weight.clone()
    for slot, scale in stack:
        rank = int(ranks[slot])
        merged += scale * lora_b[slot, :, :rank].double() @ lora_a[slot, :rank].double()
    y = (x @ weight.t()).float()
    add_multi_lora_cpu(y, x.float(), lora_a, lora_b, ranks, meta)
    with_lora = torch.cat([x[:40] @ merged.t(), x[40:80] @ weight.t(), x[80:] @ merged.t()])
    torch.testing.assert_close(y.double(), with_lora, atol=1e-4, rtol=1e-4)


def test_reference_never_reads_rank_padding() -> None:
    """Padding past each slot's rank is NaN: a reference that read it would return NaN."""
    lora_a, lora_b, ranks = make_pool(
        MIXED_RANKS, 320, 320, max_rank=64, dtype=torch.float32, padding=float("nan")
    )
    meta = fill_meta(MIXED_COUNTS, MIXED_STACKS)
    x = torch.randn(sum(MIXED_COUNTS), 320)
    y = torch.zeros(sum(MIXED_COUNTS), 320)
    add_multi_lora_cpu(y, x, lora_a, lora_b, ranks, meta)
    assert torch.isfinite(y).all()
    clean_a, clean_b = torch.nan_to_num(lora_a), torch.nan_to_num(lora_b)
    expected = oracle(torch.zeros_like(y), x, clean_a, clean_b, ranks, MIXED_COUNTS, MIXED_STACKS)
    torch.testing.assert_close(y.double(), expected, **TOLERANCES[torch.float32])


def test_oracle_matches_merged_weights_and_never_reads_rank_padding() -> None:
    """The oracle itself, on what it reads (the metadata's tables): x @ (W + sum_k s_k B_k A_k)^T per
    row, rows without a stack or with a rank-0 slot on W alone, NaN rank padding never read."""
    d_in, d_out = 48, 40
    lora_a, lora_b, ranks = make_pool([4, 16, 0], d_in, d_out, max_rank=16, dtype=torch.float32, padding=float("nan"))
    stacks = [[(0, 0.8), (1, -1.0)], [], [(2, 1.0)], [(1, 0.25)]]
    counts = [5, 3, 4, 6]
    meta = fill_meta(counts, stacks)
    x = torch.randn(sum(counts), d_in, dtype=torch.float64)
    weight = torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5
    expected, start = [], 0
    for count, stack in zip(counts, stacks):
        merged = weight.clone()
        for slot, scale in stack:
            rank = int(ranks[slot])
            merged += scale * lora_b[slot, :, :rank].double() @ lora_a[slot, :rank].double()
        expected.append(x[start : start + count] @ merged.t())
        start += count
    y = (x @ weight.t()).float()
    add_multi_lora_reference(y, x.float(), lora_a, lora_b, ranks, meta)
    torch.testing.assert_close(y.double(), torch.cat(expected), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ranks"):
        add_multi_lora_reference(y, x.float(), lora_a, lora_b, torch.tensor([4, 17, 0], dtype=torch.int32), meta)


def test_rows_without_adapters_are_untouched() -> None:
    lora_a, lora_b, ranks = make_pool([8, 0], 320, 320, max_rank=16, dtype=torch.float32)
    counts = [10, 11, 12]
    meta = fill_meta(counts, [[], [(1, 1.0)], [(0, 1.0)]])  # slot 1 has rank 0 in this module
    x = torch.randn(33, 320)
    y = torch.randn(33, 320)
    before = y.clone()
    add_multi_lora(y, x, lora_a, lora_b, ranks, meta)
    assert torch.equal(y[:21], before[:21])
    assert not torch.allclose(y[21:], before[21:])


def test_meta_refills_in_place_and_groups_rows() -> None:
    meta = LoRABatchMeta.allocate(max_rows=6, max_tokens=100, max_stack=3, block_m=16)
    pointers = [t.data_ptr() for t in (meta.row_starts, meta.slot_table, meta.scale_table, meta.block_rows)]
    meta.fill([10, 20, 5, 0], [[(2, 1.0)], [(2, 1.0)], [(2, 0.5), (0, 1.0)], [(1, 1.0)]])
    assert meta.active_row_starts().tolist() == [0, 10, 30, 35, 35]
    assert meta.active_slot_table().tolist() == [[2, -1, -1], [2, -1, -1], [2, 0, -1], [1, -1, -1]]
    assert meta.num_blocks == 1 + 2 + 1  # a 0-token row has no block
    assert meta.block_rows[: meta.num_blocks].tolist() == [0, 1, 1, 2]
    assert meta.block_starts[: meta.num_blocks].tolist() == [0, 10, 26, 30]
    # Adjacent rows with one stack and equal scales merge into one token run.
    assert {group.slots: group.runs for group in meta.plan} == {
        (2,): ((0, 30, (1.0,)),),
        (2, 0): ((30, 35, (0.5, 1.0)),),
    }
    meta.fill([7], [[]])
    assert [
        t.data_ptr() for t in (meta.row_starts, meta.slot_table, meta.scale_table, meta.block_rows)
    ] == pointers
    assert meta.num_blocks == 0 and meta.plan == ()
    assert meta.slot_table.eq(-1).all()
    assert meta.row_token_counts() == [7]


def test_meta_rejects_overflow() -> None:
    meta = LoRABatchMeta.allocate(max_rows=2, max_tokens=10, max_stack=1)
    with pytest.raises(ValueError, match="tokens"):
        meta.fill([6, 6], [[], []])
    with pytest.raises(ValueError, match="stack"):
        meta.fill([1], [[(0, 1.0), (1, 1.0)]])
    with pytest.raises(ValueError, match="rows"):
        meta.fill([1, 1, 1], [[], [], []])


def test_reference_rejects_bad_ranks_and_shapes() -> None:
    lora_a, lora_b, ranks = make_pool([8], 32, 32, max_rank=8, dtype=torch.float32)
    meta = fill_meta([4], [[(0, 1.0)]])
    x, y = torch.randn(4, 32), torch.zeros(4, 32)
    with pytest.raises(ValueError, match="ranks"):
        add_multi_lora_cpu(y, x, lora_a, lora_b, torch.tensor([9], dtype=torch.int32), meta)
    with pytest.raises(ValueError):
        add_multi_lora_cpu(torch.zeros(4, 16), x, lora_a, lora_b, ranks, meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_rows_path_matches_oracle_and_skips_padding(dtype: torch.dtype) -> None:
    """Equal-length rows with many distinct stacks take the two-bmm path: same sums, NaN padding unread."""
    from sdserve.kernels.lora_plan import apply_linear, plan_linear, slot_views

    lora_a, lora_b, ranks = make_pool(
        MIXED_RANKS, 320, 640, max_rank=64, dtype=dtype, padding=float("nan")
    )
    counts = [24] * 6
    stacks = [[(0, 1.0), (2, 0.5)], [(1, -0.7)], [(3, 1.0), (4, 2.0)], [], [(2, 1.0), (1, 1.0), (4, -1.0)], [(4, 0.3)]]
    meta = fill_meta(counts, stacks)
    x = torch.randn(sum(counts), 320).to(dtype)
    y = torch.randn(sum(counts), 640).to(dtype)
    clean_a, clean_b = torch.nan_to_num(lora_a), torch.nan_to_num(lora_b)
    expected = oracle(y, x, clean_a, clean_b, ranks, counts, stacks)
    taken = y.clone()
    plan = plan_linear(slot_views(lora_a, lora_b, ranks.tolist()), meta)
    assert plan.rows is not None and not plan.runs
    apply_linear(taken, x, plan)
    torch.testing.assert_close(taken.double(), expected, **TOLERANCES[dtype])
    add_multi_lora_cpu(y, x, lora_a, lora_b, ranks, meta)  # the public op takes it too
    torch.testing.assert_close(y.double(), expected, **TOLERANCES[dtype])
