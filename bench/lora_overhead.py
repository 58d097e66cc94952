"""What do per-row LoRA stacks cost? The whole UNet forward with adapters over without, beside
the FLOP ratio of the adapters to the base forward (torch's FlopCounterMode, plus attention's
FLOPs, which it does not count on the CPU).

Model: SD1.5-shaped UNet (320/640/1280, random weights), 32×32 latents, batch 8, eight different
2-LoRA stacks of rank 16 on the attention projections (to_q, to_k, to_v, to_out.0): 16 adapters,
every row its own stack. Goal: measured overhead ≤ 1.5 × the FLOP ratio.

The adapters run as served: factorized deltas (two bmm per projection), except where a merged
weight copy per stack pays for itself within one step (`kernels/lora_plan.merge_pays`: here the
first level's 1,024-token, 320-wide projections), within `ResidencyConfig.merge_budget_bytes`.
`--merge-budget 0` measures the factorized path alone.

A second table breaks the cost down inside the forward (timers around each adapted projection, in
forwards with and without adapters): the adapters' time per FLOP against the projections' own
GEMMs and against the whole UNet's. The UNet's rate includes this CPU's convolutions (oneDNN,
faster per FLOP than its GEMMs), which is why deltas that run as fast as the GEMMs they attach to
still cost more than their FLOP share.

A third table (`bench/adapter_kinds.py`): the same forward with one adapter per row of each served
kind (LoRA, LoHa, LoKr, DoRA), their parameter counts and the rank they are served at.

    python -m bench.lora_overhead [--repeats 7] [--rank 16] [--merge-budget BYTES] [--kind-repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.adapter_kinds import measure_kinds
from bench.common import machine, print_table, write_json
from bench.sd15 import attention_targets, sd15_unet
from sdserve.adapters import targets_of
from sdserve.engine.config import ResidencyConfig
from sdserve.engine.lora_layers import wrap_targets
from sdserve.engine.row_context import RowContext, RowContextHolder
from sdserve.kernels import LoRABatchState, ModulePool, lora_cpu
from sdserve.kernels.lora_plan import MergedPlan


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(q k^T) v on [B, H, L, D]: 2·B·H·Lq·Lk·D for the scores plus 2·B·H·Lq·Lk·Dv for the sum."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * (d + dv)


# FlopCounterMode counts the CUDA attention kernels but not the CPU one, which the UNet calls here.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def build(rank: int, rows: int, merge_budget: int):
    unet = sd15_unet()
    all_targets = targets_of({"unet": unet})
    context = LoRABatchState(max_rows=rows, max_stack=2, device=torch.device("cpu"), merge_budget_bytes=merge_budget)
    holder = RowContextHolder()
    layers = wrap_targets({"unet": unet}, all_targets, holder, context)  # every layer wrapped, as served
    targets = attention_targets(all_targets)
    generator = torch.Generator().manual_seed(0)
    num_adapters = 2 * rows
    for name, spec in targets.items():
        pool = ModulePool(spec, num_adapters, torch.device("cpu"), torch.float32)
        for slot in range(num_adapters):
            a = torch.randn(rank, spec.a_columns, generator=generator) / spec.a_columns**0.5
            b = torch.randn(spec.out_features, rank, generator=generator) * 0.01
            pool.place(slot, a, b, scale=1.0)
        layers[name].lora.pool = pool
    stacks = [[(2 * row, 0.8), (2 * row + 1, -0.5)] for row in range(rows)]  # eight different stacks
    return unet, context, holder, stacks, layers, targets


def breakdown(forward, layers: dict, targets: dict, rank_sum: int, repeats: int) -> dict[str, float]:
    """Forwards without and with adapters (interleaved, `repeats` each), timers around each adapted
    projection: seconds in the projections (per projection the median over forwards, summed, so
    that a stall in one forward does not count), in the factorized deltas, FLOPs of the base GEMMs
    (2·tokens·in·out) and of the deltas (2·tokens·R·(in+out))."""
    per_layer: dict[bool, dict[str, list[float]]] = {False: {}, True: {}}
    deltas: list[float] = []
    flops = {"base": 0.0, "lora": 0.0, "factorized": 0.0}
    current: dict = {"seconds": {}, "deltas": 0.0}
    apply_linear = lora_cpu.apply_linear

    def timed_apply(y, x, plan):
        started = time.perf_counter()
        apply_linear(y, x, plan)
        current["deltas"] += time.perf_counter() - started

    def timed(name, original):
        def run(x):
            started = time.perf_counter()
            y = original(x)
            current["seconds"][name] = current["seconds"].get(name, 0.0) + time.perf_counter() - started
            return y

        return run

    lora_cpu.apply_linear = timed_apply
    for name in targets:
        layers[name].forward = timed(name, layers[name].forward)
    try:
        for _ in range(repeats):
            for with_adapters in (False, True):
                current.update(seconds={}, deltas=0.0)
                forward(with_adapters)
                for name, seconds in current["seconds"].items():
                    per_layer[with_adapters].setdefault(name, []).append(seconds)
                if with_adapters:
                    deltas.append(current["deltas"])
    finally:
        lora_cpu.apply_linear = apply_linear
        for name in targets:
            del layers[name].forward  # back to the class method
    merged = 0
    for name, spec in targets.items():  # FLOPs from the shapes each projection saw
        layer = layers[name]
        tokens = layer.lora.plan_key[2]
        d_in, d_out = spec.a_columns, spec.out_features
        flops["base"] += 2 * tokens * d_in * d_out
        flops["lora"] += 2 * tokens * rank_sum * (d_in + d_out)
        if isinstance(layer.lora.plan, MergedPlan):
            merged += 1
        else:
            flops["factorized"] += 2 * tokens * rank_sum * (d_in + d_out)
    without, with_ = (sum(statistics.median(times) for times in per_layer[mode].values()) for mode in (False, True))
    return {
        "projections_s": without,
        "projections_with_adapters_s": with_,
        "lora_s": with_ - without,  # everything the adapters add, merged copies' GEMMs included
        "factorized_deltas_s": statistics.median(deltas),
        "base_flops": flops["base"],
        "lora_flops": flops["lora"],
        "factorized_flops": flops["factorized"],
        "merged_modules": merged,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--merge-budget", type=int, default=ResidencyConfig().merge_budget_bytes,
                        help="bytes of merged weight copies (0: factorized deltas only)")
    parser.add_argument("--kind-repeats", type=int, default=5,
                        help="forwards with and without adapters per kind in the kinds table (0: skip it)")
    args = parser.parse_args(argv)

    unet, context, holder, stacks, layers, targets = build(args.rank, args.rows, args.merge_budget)
    rows = RowContext(lora=stacks)
    num_targets = len(targets)
    sample = torch.randn(args.rows, 4, args.latent, args.latent)
    timesteps = torch.full((args.rows,), 500.0)
    text = torch.randn(args.rows, 77, 768)

    def forward(with_adapters: bool):
        if with_adapters:
            with holder.rows(rows):
                return unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]

    with torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
        with counter:
            forward(False)
        base_flops = counter.get_total_flops()
        forward(False), forward(True)  # warm-up; plans (and merged copies) are built here
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for mode in (False, True):
                started = time.perf_counter()
                forward(mode)
                times[mode].append(time.perf_counter() - started)
        # A new batch composition rebuilds every adapted layer's plan (factor gathers, merged
        # copies) in its first forward: time that forward, with scales nudged so every stack is new.
        rebuilds = []
        for nudge in (1, 2, 3):
            changed = [[(slot, scale + 1e-3 * nudge) for slot, scale in stack] for stack in stacks]
            started = time.perf_counter()
            with holder.rows(RowContext(lora=changed)):
                unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)
            rebuilds.append(time.perf_counter() - started)
        forward(True)  # plans back to the measured stacks
        parts = breakdown(forward, layers, targets, 2 * args.rank, repeats=5)

        def forward_rows(context: RowContext | None):
            if context is None:
                return unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]
            with holder.rows(context):
                return unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)[0]

        # Last: it puts other pools in the layers.
        kinds = measure_kinds(forward_rows, breakdown, layers, targets, args.rows, args.rank, args.kind_repeats,
                              statistics.median(times[False]), base_flops) if args.kind_repeats else []
    base, lora = statistics.median(times[False]), statistics.median(times[True])
    # The adapters' FLOPs are counted from the projections' shapes (FlopCounterMode misses the
    # in-place baddbmm_ of the expand); the base's come from the counter.
    flop_ratio = parts["lora_flops"] / base_flops
    # Each repeat times base and LoRA back to back; the median of those paired ratios is robust
    # to load that drifts during the run (a shared machine), unlike a ratio of two medians.
    paired = [lora_s / base_s for base_s, lora_s in zip(times[False], times[True])]
    overhead = statistics.median(paired) - 1.0
    # The adapters' cost timed where it happens (adapted projections with adapters minus without),
    # over the base forward: immune to the ±10 % run-to-run drift of whole forwards on this VM.
    direct = parts["lora_s"] / base
    print(f"\nLoRA overhead: SD1.5-shaped UNet, {args.latent}x{args.latent} latents, batch {args.rows}, "
          f"{args.rows} different 2-LoRA stacks of rank {args.rank} on {num_targets} attention projections; "
          f"{parts['merged_modules']} of them on merged copies ({context.merged_bytes / 2**20:.0f} MiB, "
          f"budget {args.merge_budget / 2**20:.0f} MiB); {machine()['cpu']}, {machine()['torch_threads']} threads\n")
    print_table(
        ["measure", "base s (median)", "with LoRA s", "time overhead", "FLOP ratio", "overhead / FLOP ratio", "goal"],
        [
            ["whole forwards (median of paired ratios)", base, lora, f"{overhead:.2%}", f"{flop_ratio:.2%}",
             f"{overhead / flop_ratio:.2f}", "<= 1.5"],
            ["adapter time inside the forward", base, base + parts["lora_s"], f"{direct:.2%}", f"{flop_ratio:.2%}",
             f"{direct / flop_ratio:.2f}", "<= 1.5"],
        ],
    )
    rebuild = statistics.median(rebuilds)
    print(f"\nFirst forward after a batch-composition change (every plan rebuilt): {rebuild:.2f} s, "
          f"{rebuild / lora - 1:+.1%} on a steady forward with adapters (once per change, not per step)")
    gflops = {
        "UNet forward (counted FLOPs, attention included)": base_flops / base / 1e9,
        "attention projections without adapters (base GEMMs)": parts["base_flops"] / parts["projections_s"] / 1e9,
        "adapters: LoRA FLOPs over the time they add": parts["lora_flops"] / parts["lora_s"] / 1e9,
    }
    if parts["factorized_flops"]:
        gflops["factorized deltas alone (two bmm)"] = parts["factorized_flops"] / parts["factorized_deltas_s"] / 1e9
    print("\nWhere the time goes (timers around each adapted projection):\n")
    print_table(
        ["part", "GFLOP/s"],
        [[name, f"{rate:.1f}"] for name, rate in gflops.items()],
    )
    if kinds:
        lora_kind = kinds[0]
        print(f"\nOne adapter per row of each kind ({args.rows} different adapters, the same {num_targets} projections; "
              f"adapter time inside the forward, median of {args.kind_repeats} forwards, over the base forward):\n")
        print_table(
            ["kind", "params / module", "served rank (median)", "served as", "merged", "FLOP ratio",
             "time overhead", "vs LoRA (time)"],
            [[k["kind"], f"{k['params_per_module']:.0f}", f"{k['served_rank_median']:.0f}",
              ", ".join(f"{form} {count}" for form, count in k["forms"].items()), k["merged_modules"],
              f"{k['flop_ratio']:.2%}", f"{k['overhead']:.2%}",
              f"{k['adapter_seconds'] / lora_kind['adapter_seconds']:.2f}x"] for k in kinds],
        )
    path = write_json("lora_overhead", {
        "command": "python -m bench.lora_overhead " + " ".join(argv or []),
        "model": "SD1.5-shaped UNet, random weights",
        "latent": args.latent, "rows": args.rows, "rank": args.rank, "stacks": "8 different, 2 LoRAs each",
        "targets": num_targets, "base_seconds": times[False], "lora_seconds": times[True],
        "merge_budget": args.merge_budget, "merged_bytes": context.merged_bytes,
        "base_flops": base_flops, "lora_flops": parts["lora_flops"], "flop_ratio": flop_ratio,
        "time_overhead": overhead, "overhead_over_flop_ratio": overhead / flop_ratio, "paired_ratios": paired,
        "direct_overhead": direct, "direct_over_flop_ratio": direct / flop_ratio,
        "breakdown": parts, "gflops": gflops, "rebuild_forward_seconds": rebuilds, "kinds": kinds,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
