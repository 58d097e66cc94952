"""What do per-row LoRA stacks cost? The whole UNet forward with adapters over without, beside
the FLOP ratio of the adapters to the base forward (both counted by torch's FlopCounterMode).

Model: SD1.5-shaped UNet (320/640/1280, random weights), 32×32 latents, batch 8, eight different
2-LoRA stacks of rank 16 on the attention projections (to_q, to_k, to_v, to_out.0): 16 adapters,
every row its own stack. Goal: measured overhead ≤ 1.5 × the FLOP ratio.

A second table breaks the cost down inside one forward (timers around each wrapped projection):
the LoRA deltas' time per FLOP against the time per FLOP of the very projections they attach
to, and against the whole UNet's. The first says whether the LoRA math runs as efficiently as
the model's own GEMMs; the second is what the goal asks, and it includes the gap between this
CPU's convolutions (oneDNN, ~2x the GFLOP/s of its GEMMs) and its GEMMs, and attention, which
the FLOP counter does not count.

    python -m bench.lora_overhead [--repeats 7] [--rank 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import machine, print_table, write_json
from bench.sd15 import attention_targets, sd15_unet
from sdserve.adapters import targets_of
from sdserve.engine import lora_layers
from sdserve.engine.lora_layers import AdapterContext, ModulePool, wrap_targets


def build(rank: int, rows: int):
    unet = sd15_unet()
    all_targets = targets_of({"unet": unet})
    context = AdapterContext(max_rows=rows, max_stack=2, device=torch.device("cpu"))
    layers = wrap_targets({"unet": unet}, all_targets, context)  # every layer wrapped, as served
    targets = attention_targets(all_targets)
    generator = torch.Generator().manual_seed(0)
    num_adapters = 2 * rows
    for name, spec in targets.items():
        pool = ModulePool(spec, num_adapters, torch.device("cpu"), torch.float32)
        for slot in range(num_adapters):
            a = torch.randn(rank, spec.a_columns, generator=generator) / spec.a_columns**0.5
            b = torch.randn(spec.out_features, rank, generator=generator) * 0.01
            pool.place(slot, a, b, scale=1.0)
        layers[name].pool = pool
    stacks = [[(2 * row, 0.8), (2 * row + 1, -0.5)] for row in range(rows)]  # eight different stacks
    return unet, context, stacks, layers, targets


def breakdown(forward, layers: dict, targets: dict, rows: int, rank_sum: int) -> dict[str, float]:
    """One forward with adapters, timers around each adapted projection: seconds in the whole
    wrapper (base GEMM + LoRA deltas + the wrapper's own Python), in its base GEMM, and in the
    deltas alone; FLOPs of base (2·tokens·in·out) and deltas (2·tokens·R·(in+out))."""
    seconds = {"wrapper": 0.0, "base": 0.0, "deltas": 0.0}
    flops = {"base": 0.0, "lora": 0.0}
    apply_linear = lora_layers.apply_linear

    def timed_apply(y, x, plan):
        started = time.perf_counter()
        apply_linear(y, x, plan)
        seconds["deltas"] += time.perf_counter() - started
        tokens, d_in, d_out = x.shape[0], x.shape[1], y.shape[1]
        flops["lora"] += 2 * tokens * rank_sum * (d_in + d_out)

    def timed(original, key: str):
        def run(x):
            started = time.perf_counter()
            y = original(x)
            seconds[key] += time.perf_counter() - started
            if key == "base":
                flops["base"] += 2 * (x.numel() // x.shape[-1]) * x.shape[-1] * y.shape[-1]
            return y

        return run

    originals = {name: (layers[name].forward, layers[name].base.forward) for name in targets}
    lora_layers.apply_linear = timed_apply
    for name in targets:
        layers[name].forward = timed(originals[name][0], "wrapper")
        layers[name].base.forward = timed(originals[name][1], "base")
    try:
        forward(True)
    finally:
        lora_layers.apply_linear = apply_linear
        for name in targets:
            del layers[name].forward, layers[name].base.forward  # back to the class methods
    return {
        "wrapper_s": seconds["wrapper"],
        "base_s": seconds["base"],
        "deltas_s": seconds["deltas"],
        "lora_s": seconds["wrapper"] - seconds["base"],  # everything the adapters add
        "base_flops": flops["base"],
        "lora_flops": flops["lora"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    args = parser.parse_args(argv)

    unet, context, stacks, layers, targets = build(args.rank, args.rows)
    num_targets = len(targets)
    sample = torch.randn(args.rows, 4, args.latent, args.latent)
    timesteps = torch.full((args.rows,), 500.0)
    text = torch.randn(args.rows, 77, 768)

    def forward(with_adapters: bool):
        if with_adapters:
            with context.rows(stacks):
                return unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]

    with torch.inference_mode():
        flops = {}
        for mode in (False, True):
            counter = FlopCounterMode(display=False)
            with counter:
                forward(mode)
            flops[mode] = counter.get_total_flops()
        forward(False), forward(True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for mode in (False, True):
                started = time.perf_counter()
                forward(mode)
                times[mode].append(time.perf_counter() - started)
        parts = breakdown(forward, layers, targets, args.rows, 2 * args.rank)
    base, lora = statistics.median(times[False]), statistics.median(times[True])
    # FlopCounterMode misses the in-place baddbmm_ of the expand (it counts only the shrink), so
    # the adapters' FLOPs are counted analytically in `breakdown`; the base's come from the counter.
    counted_ratio = (flops[True] - flops[False]) / flops[False]
    flop_ratio = parts["lora_flops"] / flops[False]
    # Each repeat times base and LoRA back to back; the median of those paired ratios is robust
    # to load that drifts during the run (a shared machine), unlike a ratio of two medians.
    paired = [lora_s / base_s for base_s, lora_s in zip(times[False], times[True])]
    overhead = statistics.median(paired) - 1.0
    # The adapters' cost timed where it happens (wrapper time minus its base GEMM), over the base
    # forward: immune to the ±10 % run-to-run drift of whole forwards on this VM.
    direct = parts["lora_s"] / base
    print(f"\nLoRA overhead: SD1.5-shaped UNet, {args.latent}x{args.latent} latents, batch {args.rows}, "
          f"{args.rows} different 2-LoRA stacks of rank {args.rank} on {num_targets} attention projections; "
          f"{machine()['cpu']}, {machine()['torch_threads']} threads\n")
    print_table(
        ["measure", "base s (median)", "with LoRA s", "time overhead", "FLOP ratio", "overhead / FLOP ratio", "goal"],
        [
            ["whole forwards (median of paired ratios)", base, lora, f"{overhead:.2%}", f"{flop_ratio:.2%}",
             f"{overhead / flop_ratio:.2f}", "<= 1.5"],
            ["adapter time inside the forward", base, base + parts["lora_s"], f"{direct:.2%}", f"{flop_ratio:.2%}",
             f"{direct / flop_ratio:.2f}", "<= 1.5"],
        ],
    )
    gflops = {
        "UNet forward (counted FLOPs)": flops[False] / base / 1e9,
        "attention projections (their base GEMMs)": parts["base_flops"] / parts["base_s"] / 1e9,
        "LoRA deltas on them (two bmm)": parts["lora_flops"] / parts["deltas_s"] / 1e9,
        "LoRA incl. the wrapper's Python": parts["lora_flops"] / parts["lora_s"] / 1e9,
    }
    print("\nWhere the time goes (one forward with adapters, timers around each projection):\n")
    print_table(
        ["part", "GFLOP/s"],
        [[name, f"{rate:.1f}"] for name, rate in gflops.items()],
    )
    path = write_json("lora_overhead", {
        "command": "python -m bench.lora_overhead " + " ".join(argv or []),
        "model": "SD1.5-shaped UNet, random weights",
        "latent": args.latent, "rows": args.rows, "rank": args.rank, "stacks": "8 different, 2 LoRAs each",
        "targets": num_targets, "base_seconds": times[False], "lora_seconds": times[True],
        "base_flops": flops[False], "counted_lora_flops": flops[True] - flops[False], "counted_flop_ratio": counted_ratio,
        "lora_flops": parts["lora_flops"], "flop_ratio": flop_ratio,
        "time_overhead": overhead, "overhead_over_flop_ratio": overhead / flop_ratio, "paired_ratios": paired,
        "direct_overhead": direct, "direct_over_flop_ratio": direct / flop_ratio,
        "breakdown": parts, "gflops": gflops,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
