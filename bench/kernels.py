"""Multi-LoRA on one layer: the Triton kernels, the torch reference and merged weights, side by side.

One square linear layer (d_in = d_out = hidden, as SD's attention projections) over the SD hidden
sizes 320, 640, 1280, 2048; ranks 8 and 64; stacks of 1 and 3 adapters per row; tokens = batch
8 × 1024 (a 32×32 latent level), every row its own stack (the multi-tenant case: 8 distinct
stacks). Paths, timed interleaved, medians:

  base     F.linear(x, W) alone
  ref      base + sdserve.kernels.lora_cpu.add_multi_lora_cpu (the CPU path)
  triton   base + sdserve.kernels.add_multi_lora on CUDA (GPU only)
  merged   per distinct stack: W + Σ s·B@A, then one F.linear over that stack's rows (merge included)

On a GPU (fp16, torch.cuda events): Triton's LoRA-only TFLOP/s and GB/s against the device's
peaks. Without one (fp32 on CPU) Triton timings are skipped and the output says so.

    python -m bench.kernels [--repeats 5] [--batch 8]
    python -m bench.kernels --quick        # ≤ 60 s on CPU: batch 2, 3 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import machine, print_table, write_json
from sdserve.kernels import LoRABatchMeta, add_multi_lora, add_multi_lora_cpu, triton_available

HIDDEN_SIZES = (320, 640, 1280, 2048)
RANKS = (8, 64)
STACK_LENGTHS = (1, 3)
TOKENS_PER_ROW = 1024

# Dense fp16 tensor-core TFLOP/s and memory GB/s from the vendors' data sheets (SXM parts unless
# named); the first name fragment found in torch.cuda.get_device_name() wins.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),
    ("A100", 312.0, 2039.0),
    ("L40S", 362.0, 864.0),
    ("L4", 121.0, 300.0),
    ("A10", 125.0, 600.0),
)


def device_peaks(name: str) -> tuple[float, float] | None:
    for fragment, tflops, gbps in DEVICE_PEAKS:
        if fragment in name:
            return tflops, gbps
    return None


class Case:
    """One (hidden, rank, stack length) problem: weights, adapters, batch metadata."""

    def __init__(self, hidden: int, rank: int, stack: int, rows: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        generator = torch.Generator(device="cpu").manual_seed(hidden * 1000 + rank * 10 + stack)

        def randn(*shape: int, scale: float) -> torch.Tensor:
            return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

        self.hidden, self.rank, self.stack, self.rows = hidden, rank, stack, rows
        self.tokens = rows * TOKENS_PER_ROW
        num_slots = rows * stack  # every row its own adapters
        self.x = randn(self.tokens, hidden, scale=1.0)  # [T, d_in]
        self.weight = randn(hidden, hidden, scale=hidden**-0.5)  # [d_out, d_in]
        self.lora_a = randn(num_slots, rank, hidden, scale=hidden**-0.5)  # [slots, r, d_in]
        self.lora_b = randn(num_slots, hidden, rank, scale=0.01)  # [slots, d_out, r]
        self.slot_ranks = torch.full((num_slots,), rank, dtype=torch.int32, device=device)
        self.stacks = [[(row * stack + k, 0.8 - 0.3 * k) for k in range(stack)] for row in range(rows)]
        self.meta = LoRABatchMeta.allocate(max_rows=rows, max_tokens=self.tokens, max_stack=stack, device=device)
        self.meta.fill([TOKENS_PER_ROW] * rows, self.stacks)
        self.y = torch.empty(self.tokens, hidden, device=device, dtype=dtype)

    # The paths. LoRA-only calls accumulate into a y computed once: the kernels add in place.
    def base(self) -> None:
        torch.matmul(self.x, self.weight.t(), out=self.y)

    def lora_reference(self) -> None:
        add_multi_lora_cpu(self.y, self.x, self.lora_a, self.lora_b, self.slot_ranks, self.meta)

    def lora_triton(self) -> None:
        add_multi_lora(self.y, self.x, self.lora_a, self.lora_b, self.slot_ranks, self.meta)

    def merged(self) -> None:
        for row, stack in enumerate(self.stacks):  # one distinct stack per row here
            # Merge in float32, as compile's fuse does, then serve the stack's rows with one GEMM.
            weight = self.weight.float()
            for slot, scale in stack:
                weight = weight.addmm(self.lora_b[slot].float(), self.lora_a[slot].float(), alpha=scale)
            rows = slice(row * TOKENS_PER_ROW, (row + 1) * TOKENS_PER_ROW)
            self.y[rows] = F.linear(self.x[rows], weight.to(self.x.dtype))

    def lora_flops(self) -> float:
        return 2.0 * self.tokens * self.stack * self.rank * (2 * self.hidden)

    def base_flops(self) -> float:
        return 2.0 * self.tokens * self.hidden * self.hidden

    def lora_bytes(self) -> float:
        # x read, y read and written, every slot's A and B once, the fp32 rank-space
        # intermediate written by the shrink and read by the expand.
        size = self.x.element_size()
        adapters = self.lora_a.numel() + self.lora_b.numel()
        inter = self.tokens * self.stack * self.rank * 4 * 2
        return size * (self.tokens * self.hidden * 3 + adapters) + inter


def make_timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        def time_cuda(fn: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return time_cuda

    def time_cpu(fn: Callable[[], None]) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    return time_cpu


def measure(case: Case, paths: dict[str, Callable[[], None]], repeats: int,
            timer: Callable[[Callable[[], None]], float], inner: int) -> dict[str, float]:
    for fn in paths.values():  # warm-up: Triton compiles, allocators settle
        fn()
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):  # interleaved, so machine noise hits every path alike
        for name, fn in paths.items():
            def run_inner(fn: Callable[[], None] = fn) -> None:
                for _ in range(inner):
                    fn()
            samples[name].append(timer(run_inner) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="rows of 1024 tokens, each its own stack")
    parser.add_argument("--quick", action="store_true", help="batch 2, 3 repeats (≤ 60 s on CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 2, 3
    torch.set_num_threads(2)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.float16 if on_gpu else torch.float32
    use_triton = on_gpu and triton_available()
    timer = make_timer(device)
    inner = 10 if on_gpu else 1  # GPU calls are µs-short: time ten per event pair
    info = machine()
    peaks = device_peaks(info["cuda"] or "") if on_gpu else None
    where = info["cuda"] if on_gpu else f"{info['cpu']}, {info['torch_threads']} threads"
    print(f"\nMulti-LoRA kernels: square linear layer, hidden {list(HIDDEN_SIZES)}, ranks {list(RANKS)}, "
          f"stacks {list(STACK_LENGTHS)}, {args.batch} rows × {TOKENS_PER_ROW} tokens, every row its own stack; "
          f"{str(dtype).removeprefix('torch.')} on {where}; {args.repeats} interleaved repeats, medians")
    if not use_triton:
        print("no GPU: Triton timings skipped (CPU: torch reference vs merged weights only)"
              if not on_gpu else "Triton does not import: Triton timings skipped")
    if on_gpu and peaks is None:
        print(f"peaks of {info['cuda']} unknown: % of peak left out")
    print()

    results: list[dict[str, Any]] = []
    for hidden in HIDDEN_SIZES:
        for rank in RANKS:
            for stack in STACK_LENGTHS:
                case = Case(hidden, rank, stack, args.batch, device, dtype)
                paths = {"base": case.base, "lora_reference": case.lora_reference, "merged": case.merged}
                if use_triton:
                    paths["lora_triton"] = case.lora_triton
                times = measure(case, paths, args.repeats, timer, inner)
                results.append({"hidden": hidden, "rank": rank, "stack": stack, "tokens": case.tokens,
                                "seconds": times, "lora_flops": case.lora_flops(), "base_flops": case.base_flops(),
                                "lora_bytes": case.lora_bytes()})
                del case
                if on_gpu:
                    torch.cuda.empty_cache()

    headers = ["hidden", "rank", "stack", "base ms", "ref / base", "merged / base"]
    if use_triton:
        headers += ["triton / base", "ref LoRA / triton LoRA", "triton TFLOP/s", "triton GB/s"]
        if peaks:
            headers += ["% peak FLOP", "% peak BW"]
    rows = []
    for result in results:
        t = result["seconds"]
        row: list[Any] = [result["hidden"], result["rank"], result["stack"], f"{t['base'] * 1e3:.2f}",
                          f"{(t['base'] + t['lora_reference']) / t['base']:.3f}", f"{t['merged'] / t['base']:.3f}"]
        if use_triton:
            tflops = result["lora_flops"] / t["lora_triton"] / 1e12
            gbps = result["lora_bytes"] / t["lora_triton"] / 1e9
            row += [f"{(t['base'] + t['lora_triton']) / t['base']:.3f}", f"{t['lora_reference'] / t['lora_triton']:.1f}",
                    f"{tflops:.1f}", f"{gbps:.0f}"]
            if peaks:
                row += [f"{100 * tflops / peaks[0]:.1f}", f"{100 * gbps / peaks[1]:.1f}"]
            result.update(triton_tflops=tflops, triton_gbps=gbps)
        rows.append(row)
    print_table(headers, rows)
    print("\nref / base, triton / base: base GEMM + multi-LoRA over the base GEMM alone; merged / base: "
          "per-stack merge + GEMM over the base GEMM (lower is better, 1.0 = free)")
    path = write_json("kernels", {
        "command": "python -m bench.kernels " + " ".join(argv or []),
        "layer": "square linear, d_in = d_out = hidden", "dtype": str(dtype), "device": str(device),
        "rows": args.batch, "tokens_per_row": TOKENS_PER_ROW, "repeats": args.repeats,
        "triton": use_triton, "note": None if use_triton else "no GPU: Triton timings skipped",
        "device_peaks_tflops_gbps": peaks, "results": results,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
