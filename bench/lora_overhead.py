"""What do per-row LoRA stacks cost? The whole UNet forward with adapters over without, beside
the FLOP ratio of the adapters to the base forward (both counted by torch's FlopCounterMode).

Model: SD1.5-shaped UNet (320/640/1280, random weights), 32×32 latents, batch 8, eight different
2-LoRA stacks of rank 16 on the attention projections (to_q, to_k, to_v, to_out.0): 16 adapters,
every row its own stack. Goal: measured overhead ≤ 1.5 × the FLOP ratio.

    python -m bench.lora_overhead [--repeats 5] [--rank 16]
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
    return unet, context, stacks, len(targets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    args = parser.parse_args(argv)

    unet, context, stacks, num_targets = build(args.rank, args.rows)
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
    base, lora = statistics.median(times[False]), statistics.median(times[True])
    flop_ratio = (flops[True] - flops[False]) / flops[False]
    # Each repeat times base and LoRA back to back; the median of those paired ratios is robust
    # to load that drifts during the run (a shared machine), unlike a ratio of two medians.
    paired = [lora_s / base_s for base_s, lora_s in zip(times[False], times[True])]
    overhead = statistics.median(paired) - 1.0
    print(f"\nLoRA overhead: SD1.5-shaped UNet, {args.latent}x{args.latent} latents, batch {args.rows}, "
          f"{args.rows} different 2-LoRA stacks of rank {args.rank} on {num_targets} attention projections; "
          f"{machine()['cpu']}, {machine()['torch_threads']} threads\n")
    print_table(
        ["base s (median)", "with LoRA s", "time overhead (median paired)", "FLOP ratio", "overhead / FLOP ratio",
         "goal"],
        [[base, lora, f"{overhead:.2%}", f"{flop_ratio:.2%}", f"{overhead / flop_ratio:.2f}", "<= 1.5"]],
    )
    path = write_json("lora_overhead", {
        "command": "python -m bench.lora_overhead " + " ".join(argv or []),
        "model": "SD1.5-shaped UNet, random weights",
        "latent": args.latent, "rows": args.rows, "rank": args.rank, "stacks": "8 different, 2 LoRAs each",
        "targets": num_targets, "base_seconds": times[False], "lora_seconds": times[True],
        "base_flops": flops[False], "lora_flops": flops[True], "flop_ratio": flop_ratio,
        "time_overhead": overhead, "overhead_over_flop_ratio": overhead / flop_ratio, "paired_ratios": paired,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
