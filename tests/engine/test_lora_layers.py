"""CPU slot pools hold views of the adapters; the wrappers keep a batch's plan only while stacks and pool stay the same."""

import torch
from torch import nn

from sdserve.adapters.targets import TargetSpec
from sdserve.engine.lora_layers import AdapterLinear
from sdserve.engine.row_context import RowContext, RowContextHolder
from sdserve.kernels import LoRABatchState, ModulePool

D_IN, D_OUT, TOKENS, RANK = 12, 10, 5, 3


def _expected(layer: AdapterLinear, x: torch.Tensor, pool: ModulePool, stacks) -> torch.Tensor:
    """x [rows, n, d_in] -> base output plus each row's Σ s · B @ A @ x, written out plainly."""
    y = layer.base(x)
    for row, stack in enumerate(stacks):
        for slot, scale in stack:
            factors = pool.slots[slot]
            if factors is None:  # cleared: the slot's adapter no longer touches this module
                continue
            y[row] += scale * factors.scale * x[row] @ factors.a.t() @ factors.b.t()
    return y


def test_cached_row_factors_follow_pool_writes_and_stack_changes() -> None:
    generator = torch.Generator().manual_seed(0)
    lora_batch, holder = LoRABatchState(max_rows=4, max_stack=2, device=torch.device("cpu")), RowContextHolder()
    layer = AdapterLinear(nn.Linear(D_IN, D_OUT), holder, lora_batch)
    pool = ModulePool(TargetSpec("linear", D_IN, D_OUT), num_slots=4, device=torch.device("cpu"), dtype=torch.float32)
    adapters = [
        (torch.randn(RANK, D_IN, generator=generator), torch.randn(D_OUT, RANK, generator=generator)) for _ in range(4)
    ]
    for slot, (a, b) in enumerate(adapters):
        pool.place(slot, a, b, 0.5 + slot)
    assert pool.views and pool.nbytes == 0
    assert pool.slots[1].a.data_ptr() == adapters[1][0].data_ptr()  # placing copied nothing
    layer.lora.pool = pool
    x = torch.randn(4, TOKENS, D_IN, generator=generator)
    stacks = [[(0, 1.0)], [(1, 0.5), (2, -1.0)], [(3, 2.0)], []]  # four distinct stacks: the batched path

    def run(stacks):
        with torch.no_grad(), holder.rows(RowContext(lora=stacks)):
            return layer(x), _expected(layer, x, pool, stacks)

    got, want = run(stacks)
    torch.testing.assert_close(got, want)
    kept = layer.lora.plan
    assert kept.rows is not None  # four distinct stacks over equal rows: the two-bmm layout
    got, want = run(stacks)
    assert layer.lora.plan is kept  # same stacks, same pool: no new gather
    torch.testing.assert_close(got, want)

    # A hot swap rewrites slot 2 with the stacks unchanged: the next call must see the new weights.
    pool.place(2, torch.randn(RANK, D_IN, generator=generator), torch.randn(D_OUT, RANK, generator=generator), 1.0)
    got, want = run(stacks)
    assert layer.lora.plan is not kept
    torch.testing.assert_close(got, want)

    # Same slots at another scale (a slider moved, or an adapter's start/end switched it).
    stacks[1] = [(1, 0.5), (2, 0.25)]
    got, want = run(stacks)
    torch.testing.assert_close(got, want)

    # Stacks that share slots take the per-run layout; clearing a slot drops its deltas.
    stacks = [[(0, 1.0)], [(0, 1.0)], [(1, -1.0)], [(1, -1.0)]]
    got, want = run(stacks)
    assert layer.lora.plan.rows is None and len(layer.lora.plan.runs) == 2
    torch.testing.assert_close(got, want)
    pool.clear(1)
    got, _ = run(stacks)
    torch.testing.assert_close(got[2:], layer.base(x[2:]))


def test_slot_tensors_give_what_views_give() -> None:
    """The GPU layout (slot tensors, scale folded into B, rank capacity grown) run on CPU == views."""
    generator = torch.Generator().manual_seed(1)
    lora_batch, holder = LoRABatchState(max_rows=3, max_stack=2, device=torch.device("cpu")), RowContextHolder()
    base = nn.Linear(D_IN, D_OUT)
    outputs = []
    factors = [
        (torch.randn(rank, D_IN, generator=generator), torch.randn(D_OUT, rank, generator=generator)) for rank in (2, 5)
    ]
    x = torch.randn(3, TOKENS, D_IN, generator=generator)
    for views in (True, False):
        layer = AdapterLinear(base, holder, lora_batch)
        pool = ModulePool(TargetSpec("linear", D_IN, D_OUT), 2, torch.device("cpu"), torch.float32, views=views)
        for slot, (a, b) in enumerate(factors):
            pool.place(slot, a, b, 0.75)
        layer.lora.pool = pool
        with torch.no_grad(), holder.rows(RowContext(lora=[[(0, 1.0)], [(1, -0.5), (0, 2.0)], []])):
            outputs.append(layer(x))
    torch.testing.assert_close(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], base(x))


def test_merged_plans_match_the_deltas_reuse_copies_and_keep_to_the_budget() -> None:
    """Where merging pays (many tokens per row), each stack runs on its own merged weight copy."""
    from sdserve.kernels.lora_plan import LinearPlan, MergedPlan, merge_pays

    tokens = 16
    assert merge_pays(tokens, D_IN, D_OUT)
    generator = torch.Generator().manual_seed(2)
    weight_bytes = D_IN * D_OUT * 4
    lora_batch = LoRABatchState(max_rows=4, max_stack=2, device=torch.device("cpu"), merge_budget_bytes=4 * weight_bytes)
    holder = RowContextHolder()
    layer = AdapterLinear(nn.Linear(D_IN, D_OUT), holder, lora_batch)
    pool = ModulePool(TargetSpec("linear", D_IN, D_OUT), num_slots=3, device=torch.device("cpu"), dtype=torch.float32)
    for slot in range(3):
        pool.place(slot, torch.randn(RANK, D_IN, generator=generator), torch.randn(D_OUT, RANK, generator=generator), 0.5)
    layer.lora.pool = pool
    x = torch.randn(4, tokens, D_IN, generator=generator)

    def run(stacks):
        with torch.no_grad(), holder.rows(RowContext(lora=stacks)):
            return layer(x), _expected(layer, x, pool, stacks)

    stacks = [[(0, 1.0)], [], [(1, 0.5), (2, -1.0)], [(0, -0.5)]]  # slot 0 at two scales: two copies
    got, want = run(stacks)
    torch.testing.assert_close(got, want)
    plan = layer.lora.plan
    # Four equal rows: the copies are stacked for one bmm, the adapter-free row's being the base's.
    assert isinstance(plan, MergedPlan) and plan.stacked is not None
    assert lora_batch.merged_bytes == plan.nbytes == 4 * weight_bytes
    assert torch.equal(plan.segments[1].weight, layer.base.weight)
    # A new batch keeps the copies of the stacks it shares with the last one.
    kept = plan.merged[((1, 2), (0.5, -1.0))]
    with torch.no_grad(), holder.rows(RowContext(lora=[stacks[2]])):
        alone = layer(x[2:3])
    # One row: no stack of copies; the kept copy is reused, copied out of the old stack so that
    # the stack can go (the budget counts one copy, and one copy is all that stays alive).
    reused = layer.lora.plan.merged[((1, 2), (0.5, -1.0))]
    assert layer.lora.plan.stacked is None and torch.equal(reused, kept) and reused._base is None
    assert lora_batch.merged_bytes == weight_bytes
    kept = reused
    # A row gives the same output alone as in the batch (rule 4): its GEMM sees the same rows.
    assert torch.equal(alone[0], got[2])

    # A hot swap into a slot makes new copies: the result follows the new weights.
    pool.place(1, torch.randn(RANK, D_IN, generator=generator), torch.randn(D_OUT, RANK, generator=generator), 1.0)
    got, want = run([[(0, 1.0)], [], [(1, 0.5), (2, -1.0)], [(2, 2.0)]])
    torch.testing.assert_close(got, want)
    assert not torch.equal(layer.lora.plan.merged[((1, 2), (0.5, -1.0))], kept)
    assert lora_batch.merged_bytes == 4 * weight_bytes

    # Unequal runs (two rows share a stack and scales) take one GEMM per run, no stack of copies.
    got, want = run([[(0, 1.0)], [(0, 1.0)], [], [(2, 2.0)]])
    torch.testing.assert_close(got, want)
    assert layer.lora.plan.stacked is None and len(layer.lora.plan.segments) == 3

    # Beyond the budget (four rows, room for three copies) the layer stays factorized.
    lora_batch.merge_budget_bytes = 3 * weight_bytes
    got, want = run([[(0, 1.0)], [(1, 1.0)], [(2, 1.0)], [(0, 2.0)]])
    torch.testing.assert_close(got, want)
    assert isinstance(layer.lora.plan, LinearPlan) and lora_batch.merged_bytes == 0


def test_one_row_context_drives_layers_and_token_tables() -> None:
    """Wrapped layers and token tables read the holder's one RowContext, and only inside the block."""
    import pytest

    from sdserve.adapters.embeddings import ExtraRowsEmbedding, TextualInversion
    from sdserve.engine.lora_layers import AdapterConv2d

    generator = torch.Generator().manual_seed(3)
    holder = RowContextHolder()
    lora_batch = LoRABatchState(max_rows=2, max_stack=1, device=torch.device("cpu"))
    conv = AdapterConv2d(nn.Conv2d(3, 4, 3, padding=1), holder, lora_batch)
    pool = ModulePool(TargetSpec("conv", 3, 4, (3, 3), (1, 1), (1, 1)), 1, torch.device("cpu"), torch.float32)
    a, b = torch.randn(2, 27, generator=generator), torch.randn(4, 2, generator=generator)
    pool.place(0, a, b, 1.0)
    conv.lora.pool = pool
    vocab, width = 6, 5
    table = ExtraRowsEmbedding(nn.Embedding(vocab, width), lambda: holder.token_rows("text_encoder", vocab))
    cat, dog = (TextualInversion(name, name, {"text_encoder": torch.randn(n, width, generator=generator)}, "diffusers")
                for name, n in (("cat", 1), ("dog", 2)))
    x = torch.randn(2, 3, 5, 5, generator=generator)
    ids = torch.tensor([[1, 6, 7], [6, 2, 7]])  # [2, 3]: ids >= vocab are each row's own vectors

    rows = RowContext(lora=[[(0, 0.5)], []], embeddings=[(cat, dog), (dog,)])
    with torch.no_grad(), holder.rows(rows):
        got, embedded = conv(x), table(ids)
    with torch.no_grad():
        plain = conv.base(x)
        delta = torch.nn.functional.conv2d(x[:1], (0.5 * b @ a).view(4, 3, 3, 3), padding=1)
    torch.testing.assert_close(got, torch.cat([plain[:1] + delta, plain[1:]]))
    cat_dog = torch.cat([cat.vectors["text_encoder"], dog.vectors["text_encoder"]])  # row 0's ids 6, 7, 8
    weight = table.weight
    assert torch.equal(embedded[0], torch.stack([weight[1], cat_dog[0], cat_dog[1]]))
    assert torch.equal(embedded[1], torch.stack([dog.vectors["text_encoder"][0], weight[2], dog.vectors["text_encoder"][1]]))
    assert holder.current is None and holder.lora_stacks() is None  # outside the block: the base model
    with torch.no_grad():
        in_vocab = torch.tensor([[1, 2, 5]])
        assert torch.equal(conv(x), plain) and torch.equal(table(in_vocab), weight[in_vocab])
    with pytest.raises(ValueError, match="row count"):
        RowContext(lora=[[]], embeddings=[(), ()])
