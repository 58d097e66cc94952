"""The cost of each served adapter kind, per row, against a LoRA: LoHa, LoKr and DoRA placed in the
attention projections as the engine serves them (`sdserve.adapters.lycoris` turns LoHa and LoKr
into an exact LoRA form, factorized or dense, whichever is smaller; DoRA is its LoRA plus a gain
per output channel and row, `kernels/lora_dora`).

Called by `bench.lora_overhead` (its last table). Every kind runs one adapter per row (DoRA must
be alone on its modules), eight different adapters over eight rows, on the same UNet, timed where
it runs: timers around each adapted projection in forwards with and without adapters
(`breakdown`), the difference over the whole base forward.

Parameter counts per module, for a projection [out, in]:
- LoRA rank r: r·(out + in).
- LoHa dim d: 2·d·(out + in); d = r/2 has LoRA rank r's count and is served at rank d² (factorized
  while d² < min(out, in)): four times LoRA rank r's FLOPs at d = 8.
- LoKr, LyCORIS' defaults (`factor=-1`, a dim past the factor's size: both halves whole):
  a·c + b·d parameters, a few percent of a LoRA's, but kron(W1, W2) is full-rank: served dense.
- LoKr with factor 8 and W2 factored at rank 8: served at rank 8·8 = 64 (factorized).
- DoRA rank r: LoRA rank r's count plus the magnitude [out].
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from sdserve.adapters.lycoris import _serve_loha, _serve_lokr, _whole
from sdserve.adapters.targets import TargetSpec
from sdserve.engine.row_context import RowContext
from sdserve.kernels import ModulePool

# name -> (up [out, R], down [R, in], form, file parameters, dora inputs or None)
Factors = tuple[torch.Tensor, torch.Tensor, str, int, tuple[torch.Tensor, torch.Tensor] | None]


def _near_square_split(n: int, cap: int | None = None) -> int:
    """The largest divisor of n that is <= sqrt(n) (LyCORIS' factor=-1 split), or <= cap."""
    limit = cap or int(math.isqrt(n))
    return max(d for d in range(1, limit + 1) if n % d == 0)


def _small(shape: tuple[int, ...], generator: torch.Generator, fan_in: int) -> torch.Tensor:
    return torch.randn(shape, generator=generator) / fan_in**0.5


def kind_factors(kind: str, spec: TargetSpec, weight: torch.Tensor, rank: int, generator: torch.Generator) -> Factors:
    out, f = spec.out_features, spec.a_columns
    if kind in ("lora", "dora"):
        down = _small((rank, f), generator, f)
        up = torch.randn(out, rank, generator=generator) * 0.01
        dora = None
        if kind == "dora":
            magnitude = weight.reshape(out, -1).norm(dim=1) * (1.0 + 0.1 * torch.randn(out, generator=generator))
            dora = (magnitude, weight)
        return up, down, "factorized", rank * (out + f) + (out if dora else 0), dora
    if kind == "loha":
        dim = rank // 2
        halves = tuple((torch.randn(out, dim, generator=generator) * 0.1, _small((dim, f), generator, f))
                       for _ in range(2))
        up, down, form = _serve_loha(halves, spec)
        return up, down, form, 2 * dim * (out + f), None
    if kind == "lokr":  # LyCORIS defaults: both halves whole
        a, c = _near_square_split(out), _near_square_split(f)
        w1 = torch.randn(a, c, generator=generator) * 0.1
        w2 = _small((out // a, f // c), generator, f // c)
        up, down, form = _serve_lokr(_whole(w1), _whole(w2), spec)
        return up, down, form, w1.numel() + w2.numel(), None
    if kind == "lokr-factored":  # factor 8, W2 at rank 8
        a, c = _near_square_split(out, 8), _near_square_split(f, 8)
        w1 = torch.randn(a, c, generator=generator) * 0.1
        b, d = out // a, f // c
        half2 = (torch.randn(b, 8, generator=generator) * 0.1, _small((8, d), generator, d))
        up, down, form = _serve_lokr(_whole(w1), half2, spec)
        return up, down, form, w1.numel() + 8 * (b + d), None
    raise ValueError(kind)


KINDS = ("lora", "loha", "lokr-factored", "lokr", "dora")


def measure_kinds(forward: Callable[[RowContext | None], torch.Tensor], breakdown: Callable, layers: dict,
                  targets: dict, rows: int, rank: int, repeats: int, base_seconds: float,
                  base_flops: float) -> list[dict]:
    """Per kind: place `rows` adapters of that kind in every target's pool, one per row, and time
    the adapters where they run (`bench.lora_overhead.breakdown`: timers around each adapted
    projection, forwards with and without adapters interleaved): overhead = the time they add over
    the whole base forward (`base_seconds`, measured in the same run). Whole-forward ratios move
    ±10-25 % between repeats on a shared 2-core machine; this direct measure does not."""
    results = []
    context = RowContext(lora=[[(row, 1.0)] for row in range(rows)])
    for kind in KINDS:
        generator = torch.Generator().manual_seed(1)
        params, served, forms = 0, {}, {}
        for name, spec in targets.items():
            pool = ModulePool(spec, rows, torch.device("cpu"), torch.float32)
            weight = layers[name].base.weight.detach()
            for slot in range(rows):
                up, down, form, count, dora = kind_factors(kind, spec, weight, rank, generator)
                pool.place(slot, down, up, scale=1.0, dora=dora)
                if slot == 0:
                    params += count
                    served[name] = up.shape[1]
                    forms[form] = forms.get(form, 0) + 1
            layers[name].lora.pool = pool
        forward(None), forward(context)  # warm-up: plans (and merged copies) are built here
        # Adapter FLOPs as served (one adapter of served rank R per row): 2·tokens·R·(in + out).
        flops = sum(2 * layers[name].lora.plan_key[2] * served[name] * (spec.a_columns + spec.out_features)
                    for name, spec in targets.items())
        parts = breakdown(lambda with_adapters: forward(context if with_adapters else None), layers, targets,
                          rank, repeats=repeats)
        results.append({
            "kind": kind, "params_per_module": params / len(targets),
            "served_rank_median": statistics.median(served.values()), "forms": forms,
            "flop_ratio": flops / base_flops, "adapter_seconds": parts["lora_s"],
            "overhead": parts["lora_s"] / base_seconds, "merged_modules": parts["merged_modules"],
        })
    return results
