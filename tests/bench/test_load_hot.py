"""bench/load_hot.py's request mix: the hot share, the hot stack as a variant would match it."""

from __future__ import annotations

import random

from bench.load_gen import Workload, adapter_name, is_slider
from bench.load_hot import hot_maker, hot_stack


def _draw(seed: int, count: int, fraction: float) -> tuple[list, list[bool]]:
    workload = Workload(seed=seed)
    stack, flags = hot_stack(workload), []
    make, rng = hot_maker(fraction, stack, flags), random.Random(seed)
    return [make(workload, rng) for _ in range(count)], flags


def test_the_hot_share_and_stack() -> None:
    workload = Workload()
    stack = hot_stack(workload)
    assert all(i % workload.tenants == 0 and not is_slider(i) for i, _ in stack) and len(stack) == 2
    requests, flags = _draw(0, 400, 0.5)
    assert len(flags) == 400 and 0.4 < sum(flags) / 400 < 0.6
    hot = [(tenant, request) for (tenant, request), flag in zip(requests, flags) if flag]
    want = [{"name": adapter_name(i), "scale": scale} for i, scale in stack]  # full windows: no start/end
    assert all(tenant == 0 and request["adapters"] == want for tenant, request in hot)
    others = [request for (_, request), flag in zip(requests, flags) if not flag]
    assert sum(request["adapters"] != want for request in others) > 0.9 * len(others)


def test_the_same_seed_gives_the_same_sequence() -> None:
    assert _draw(3, 50, 0.5) == _draw(3, 50, 0.5)
    assert _draw(3, 50, 0.5) != _draw(4, 50, 0.5)
