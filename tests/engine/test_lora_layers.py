"""The Linear wrapper keeps each batch's gathered row factors only while stacks and pool stay the same."""

import torch
from torch import nn

from sdserve.adapters.targets import TargetSpec
from sdserve.engine.lora_layers import AdapterContext, AdapterLinear, ModulePool

D_IN, D_OUT, TOKENS, RANK = 12, 10, 5, 3


def _expected(layer: AdapterLinear, x: torch.Tensor, pool: ModulePool, stacks) -> torch.Tensor:
    """x [rows, n, d_in] -> base output plus each row's Σ s · B @ A @ x, written out plainly."""
    y = layer.base(x)
    for row, stack in enumerate(stacks):
        for slot, scale in stack:
            rank = int(pool.ranks[slot])
            a, b = pool.a[slot, :rank], pool.b[slot, :, :rank]
            y[row] += scale * x[row] @ a.t() @ b.t()
    return y


def test_cached_row_factors_follow_pool_writes_and_stack_changes() -> None:
    generator = torch.Generator().manual_seed(0)
    context = AdapterContext(max_rows=4, max_stack=2, device=torch.device("cpu"))
    layer = AdapterLinear(nn.Linear(D_IN, D_OUT), context)
    pool = ModulePool(TargetSpec("linear", D_IN, D_OUT), num_slots=4, device=torch.device("cpu"), dtype=torch.float32)
    for slot in range(4):
        pool.place(slot, torch.randn(RANK, D_IN, generator=generator), torch.randn(D_OUT, RANK, generator=generator), 1.0)
    layer.pool = pool
    x = torch.randn(4, TOKENS, D_IN, generator=generator)
    stacks = [[(0, 1.0)], [(1, 0.5), (2, -1.0)], [(3, 2.0)], []]  # four distinct stacks: the batched path

    def run(stacks):
        with torch.no_grad(), context.rows(stacks):
            return layer(x), _expected(layer, x, pool, stacks)

    got, want = run(stacks)
    torch.testing.assert_close(got, want)
    assert layer._factors is not None  # the batched path was taken and kept
    kept = layer._factors
    got, want = run(stacks)
    assert layer._factors is kept  # same stacks, same pool: no new gather
    torch.testing.assert_close(got, want)

    # A hot swap rewrites slot 2 with the stacks unchanged: the next call must see the new weights.
    pool.place(2, torch.randn(RANK, D_IN, generator=generator), torch.randn(D_OUT, RANK, generator=generator), 1.0)
    got, want = run(stacks)
    assert layer._factors is not kept
    torch.testing.assert_close(got, want)

    # Same slots at another scale (a slider moved, or an adapter's start/end switched it).
    stacks[1] = [(1, 0.5), (2, 0.25)]
    got, want = run(stacks)
    torch.testing.assert_close(got, want)
