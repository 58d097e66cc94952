"""What does it cost to bring a LoRA into service, and to switch a request to another one?

Model: SD1.5-shaped UNet (random weights). Adapter: a rank-16 style LoRA in diffusers/PEFT layout
(to_q/to_k/to_v/to_out.0, proj_in/proj_out, ff.net.0.proj/ff.net.2: 192 modules, ~27 MB fp32),
file in the page cache. Measured interleaved over repeats, medians:

  (a) raw      safetensors.torch.load_file(path)
  (b) sdserve  load_lora (parse + validate + pack) into the runtime's host arena (memory touched
               once when the runtime starts, reused as adapters leave; adapters/host_memory.py)
               + ModulePool.place of every module into a device slot, as
               engine/residency.AdapterRuntime does; the file's sha256 (once per file version)
               and the arena's one-time touch are reported apart. (b') is the same load into
               fresh memory, which is what the arena avoids: on VMs that back memory lazily
               the first touch of new pages costs more than the read
  (c) diffusers StableDiffusionPipeline.load_lora_weights(path, adapter_name=...), into a
               pipeline with no LoRA (after unload_lora_weights) and beside one resident adapter
  (d) switch   the next request reads another resident adapter: sdserve refills the per-step row
               metadata (LoRABatchState.meta_for at every token count of a 512 px step);
               diffusers calls set_adapters([name], [weight])
  (e) memory   N resident rank-8 attention-only adapters (fp32, distinct contents), loaded with
               load_lora in a fresh process: Σ adapter.nbytes and RSS growth over Σ file tensor bytes

Goals: cold load ≤ 2 × raw load and ≥ 20 × faster than diffusers; memory ratios ≤ 1.05.

    python -m bench.adapter_swap [--repeats 5] [--adapters 1000]   # ~3 min, most of it (e): 6 GB
                                                                   # of files written, then loaded
    python -m bench.adapter_swap --quick        # ≤ 60 s: 3 repeats, 50 adapters
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import hashlib
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from bench.common import machine, print_table, write_json
from bench.sd15 import SD15_UNET_CONFIG, attention_targets, random_lora_file, random_peft_lora_file, sd15_unet
from bench.sd15 import style_targets as select_style_targets
from sdserve.adapters import TargetSpec, load_lora, targets_of
from sdserve.adapters.host_memory import HostArena
from sdserve.engine.config import ResidencyConfig
from sdserve.engine.lora_layers import wrap_targets
from sdserve.engine.row_context import RowContext, RowContextHolder
from sdserve.kernels import LoRABatchState, ModulePool

RANK = 16
MEMORY_RANK = 8
NUM_SLOTS = 8  # device slots of the bench's pools; placing cycles through them
ROWS = 2  # one request under classifier-free guidance
# Tokens per row that wrapped modules see in one 512 px (64×64 latent) SD1.5 step, each its own
# LoRABatchMeta: self-attention/ff at 64², 32², 16², 8² (mid block), cross-attention to_k/to_v
# over 77 text tokens, and the 1×1-conv proj_in/proj_out, which read per-sample metadata (1).
STEP_TOKEN_COUNTS = (64 * 64, 32 * 32, 16 * 16, 8 * 8, 77, 1)


def sd15_targets_meta() -> dict[str, TargetSpec]:
    """Every LoRA target of the SD1.5-shaped UNet, from a meta-device copy (no weights needed)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return targets_of({"unet": unet})


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sha256_file(path: Path) -> str:
    # The same chunked read as engine/residency._DigestCache.digest.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- sdserve ---------------------------------------------------------------------------------


class SdserveSide:
    """A wrapped (meta-device) SD1.5 UNet with CPU slot pools, built as AdapterRuntime does.

    The base weights never matter here: loading and placing read only the target specs, and the
    switch only refills metadata, so the UNet lives on the meta device and costs no memory.
    """

    def __init__(self) -> None:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        self.targets = targets_of({"unet": unet})
        self.context = LoRABatchState(max_rows=ROWS, max_stack=3, device=torch.device("cpu"))
        self.layers = wrap_targets({"unet": unet}, self.targets, RowContextHolder(), self.context)
        self.pools: dict[str, ModulePool] = {}
        self.unet = unet
        started = time.perf_counter()
        self.host_memory = HostArena(ResidencyConfig().host_arena_bytes)  # as AdapterRuntime's
        self.host_memory.touched.wait()  # a server has been up a while before a load is timed
        self.arena_touch_seconds = time.perf_counter() - started

    def load(self, path: Path, name: str):
        return load_lora(path, name, self.targets, max_rank=128, alloc=self.host_memory.take)

    def load_fresh(self, path: Path, name: str):
        return load_lora(path, name, self.targets, max_rank=128)

    def place(self, slot: int, adapter) -> None:
        # As AdapterRuntime._place: a pool per target on first use, then one place per module.
        for target, module in adapter.modules.items():
            pool = self.pools.get(target)
            if pool is None:
                pool = ModulePool(self.targets[target], NUM_SLOTS, torch.device("cpu"), torch.float32)
                self.pools[target] = pool
                self.layers[target].lora.pool = pool
            pool.place(slot, module.a, module.b, module.scale)

    def switch(self, slot: int, scale: float) -> None:
        """What the next step of a request on another resident adapter costs: new row stacks."""
        rows = RowContext(lora=[[(slot, scale)] for _ in range(ROWS)])
        for tokens in STEP_TOKEN_COUNTS:
            self.context.meta_for(rows.lora, tokens)


# -- diffusers -------------------------------------------------------------------------------


def diffusers_pipeline():
    """StableDiffusionPipeline around the SD1.5-shaped UNet. The tiny built-in model's text
    encoder has hidden size 32, not the UNet's 768, so a one-layer CLIP text model of width 768
    stands in (LoRA loading never runs it); tokenizer, VAE and scheduler come from tiny-sd1."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdserve.models.builtin import builtin_path

    tiny = builtin_path("tiny-sd1")
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=12, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(tiny / "vae"), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=sd15_unet(), scheduler=EulerDiscreteScheduler.from_pretrained(tiny / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def read_every_tensor(path: Path) -> None:
    for tensor in safetensors.torch.load_file(path).values():
        tensor.sum()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


# -- (e) memory, in a fresh process so that nothing else this bench allocated skews its RSS ----


def _memory_child(paths: list[str]) -> dict[str, int]:
    torch.set_num_threads(2)
    targets = sd15_targets_meta()
    gc.collect()
    before = rss_bytes()
    resident = [load_lora(path, f"m{index}", targets, max_rank=128) for index, path in enumerate(paths)]
    gc.collect()
    after = rss_bytes()
    return {"adapters": len(resident), "adapter_bytes": sum(a.nbytes for a in resident), "rss_growth": after - before}


def measure_memory(workdir: Path, count: int) -> dict[str, Any]:
    targets = attention_targets(sd15_targets_meta())
    per_file = sum(MEMORY_RANK * (s.a_columns + s.out_features) * 4 for s in targets.values())
    available = _available_bytes()
    note = None
    # The resident copies must fit in 60 % of what is available, leaving room for the other
    # engineers (the files' page cache is reclaimable, so it is not counted).
    affordable = int(0.6 * available // per_file)
    if count > affordable:
        note = (f"memory: {available / 2**30:.1f} GiB available, so {affordable} adapters instead of "
                f"{count} ({count * per_file / 2**30:.1f} GiB)")
        count = affordable
    paths, file_bytes = [], 0
    for index in range(count):
        path = workdir / f"mem{index:05d}.safetensors"
        file_bytes += random_lora_file(path, targets, MEMORY_RANK, seed=10_000 + index)
        paths.append(str(path))
    phase(f"memory: {count} files written, loading them in a fresh process")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        child = pool.submit(_memory_child, paths).result()
    for path in paths:
        os.unlink(path)
    return {
        "adapters": count, "rank": MEMORY_RANK, "targets": len(targets), "file_tensor_bytes": file_bytes,
        "adapter_bytes": child["adapter_bytes"], "rss_growth_bytes": child["rss_growth"],
        "nbytes_ratio": child["adapter_bytes"] / file_bytes, "rss_ratio": child["rss_growth"] / file_bytes,
        "note": note,
    }


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--adapters", type=int, default=1000, help="resident adapters for the memory check")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 50 adapters (≤ 60 s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.adapters = 3, 50
    torch.set_num_threads(2)
    _STARTED[0] = time.perf_counter()
    # diffusers/peft/transformers chatter (deprecations, "no text-encoder LoRA keys") would bury
    # the table; the warnings say nothing about the timings.
    warnings.filterwarnings("ignore")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    workdir = Path(tempfile.mkdtemp(prefix="sdserve-adapter-swap-"))
    try:
        results = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(args, argv, results)


_STARTED = [time.perf_counter()]  # reset by main()


def phase(label: str) -> None:
    # Progress: each phase can take tens of seconds on a shared machine.
    print(f"[{time.perf_counter() - _STARTED[0]:6.1f} s] {label}", flush=True)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    phase("building the wrapped UNet and writing the LoRA files")
    sdserve_side = SdserveSide()
    style = select_style_targets(sdserve_side.targets)
    paths = [workdir / f"style{index}.safetensors" for index in range(2)]
    file_bytes = [random_peft_lora_file(path, style, RANK, seed=index) for index, path in enumerate(paths)]
    path = paths[0]
    path.read_bytes()  # into the page cache
    hash_seconds = min(timed(lambda: sha256_file(path))[0] for _ in range(3))

    phase("building the diffusers pipeline (SD1.5-shaped UNet, random init)")
    pipe = diffusers_pipeline()
    phase(f"loads: {args.repeats} interleaved repeats")
    # Warm-up of every path, so one-time costs (imports, first pool growth) stay out of the medians.
    safetensors.torch.load_file(path)
    adapters = [sdserve_side.load(p, f"style{i}") for i, p in enumerate(paths)]
    for slot in range(NUM_SLOTS):
        sdserve_side.place(slot, adapters[slot % 2])
    sdserve_side.switch(0, 1.0)
    pipe.load_lora_weights(str(path), adapter_name="warm")
    pipe.unload_lora_weights()

    times: dict[str, list[float]] = {key: [] for key in (
        "raw", "raw_read", "sdserve_load", "sdserve_place", "sdserve_cold", "sdserve_load_fresh",
        "diffusers_fresh", "diffusers_second")}
    kept_fresh: list[Any] = []  # fresh-memory loads stay alive as slotted adapters do
    for repeat in range(args.repeats):  # interleaved, so machine noise hits every path alike
        times["raw"].append(timed(partial(safetensors.torch.load_file, path))[0])
        # load_file maps the file and reads no tensor byte until used; this is what reading costs.
        times["raw_read"].append(timed(partial(read_every_tensor, path))[0])
        load_s, adapter = timed(partial(sdserve_side.load, path, f"r{repeat}"))
        place_s, _ = timed(partial(sdserve_side.place, repeat % NUM_SLOTS, adapter))
        times["sdserve_load"].append(load_s)
        times["sdserve_place"].append(place_s)
        times["sdserve_cold"].append(load_s + place_s)
        del adapter
        fresh_s, fresh = timed(partial(sdserve_side.load_fresh, path, f"f{repeat}"))
        times["sdserve_load_fresh"].append(fresh_s)
        kept_fresh = [*kept_fresh, fresh][-NUM_SLOTS:]
        del fresh
        load_fresh = partial(pipe.load_lora_weights, str(path), adapter_name=f"f{repeat}")
        times["diffusers_fresh"].append(timed(load_fresh)[0])
        pipe.unload_lora_weights()
        # Beside a resident adapter the LoRA layers exist already; only the new adapter's are made.
        pipe.load_lora_weights(str(paths[1]), adapter_name="resident")
        load_second = partial(pipe.load_lora_weights, str(path), adapter_name=f"s{repeat}")
        times["diffusers_second"].append(timed(load_second)[0])
        pipe.unload_lora_weights()
        gc.collect()

    del kept_fresh
    phase("switching between resident adapters")
    # (d) switching between two resident adapters, many times per repeat: each call is short.
    pipe.load_lora_weights(str(paths[0]), adapter_name="one")
    pipe.load_lora_weights(str(paths[1]), adapter_name="two")
    switch_calls = 20
    switch: dict[str, list[float]] = {"sdserve": [], "diffusers": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        for call in range(switch_calls):
            sdserve_side.switch(call % 2, 0.8)
        switch["sdserve"].append((time.perf_counter() - started) / switch_calls)
        started = time.perf_counter()
        for call in range(switch_calls):
            pipe.set_adapters(["one" if call % 2 == 0 else "two"], [0.8])
        switch["diffusers"].append((time.perf_counter() - started) / switch_calls)
    pipe.unload_lora_weights()
    del pipe
    gc.collect()

    phase(f"memory: writing and loading {args.adapters} adapters")
    memory = measure_memory(workdir, args.adapters)
    phase("done")
    return {
        "file_bytes": file_bytes[0], "modules": len(style), "hash_seconds": hash_seconds,
        "arena_bytes": ResidencyConfig().host_arena_bytes, "arena_touch_seconds": sdserve_side.arena_touch_seconds,
        "times": times, "switch": switch, "memory": memory,
    }


def report(args: argparse.Namespace, argv: list[str] | None, results: dict[str, Any]) -> None:
    med = {key: statistics.median(values) for key, values in results["times"].items()}
    switch = {key: statistics.median(values) for key, values in results["switch"].items()}
    memory = results["memory"]
    info = machine()
    print(f"\nAdapter load and swap: SD1.5-shaped UNet, rank-{RANK} style LoRA on {results['modules']} modules "
          f"({results['file_bytes'] / 2**20:.1f} MiB fp32, PEFT layout, page-cached); {args.repeats} interleaved "
          f"repeats, medians; {info['cpu']}, {info['torch_threads']} threads\n")
    ms = 1e3
    print_table(
        ["path", "ms (median)", "vs raw", "goal"],
        [
            ["(a) raw safetensors load_file", med["raw"] * ms, "1.00", ""],
            ["    + read every tensor (sum)", med["raw_read"] * ms, f"{med['raw_read'] / med['raw']:.2f}", ""],
            ["(b) sdserve load_lora", med["sdserve_load"] * ms, f"{med['sdserve_load'] / med['raw']:.2f}", ""],
            ["    + place in a slot (all modules)", med["sdserve_place"] * ms, "", ""],
            ["    = sdserve cold load", med["sdserve_cold"] * ms, f"{med['sdserve_cold'] / med['raw']:.2f}", "<= 2.00"],
            ["    sha256 of the file (once)", results["hash_seconds"] * ms, "", ""],
            [f"    host arena touched at start ({results['arena_bytes'] >> 20} MiB, once)",
             results["arena_touch_seconds"] * ms, "", ""],
            ["(b') sdserve load_lora into fresh memory", med["sdserve_load_fresh"] * ms,
             f"{med['sdserve_load_fresh'] / med['raw']:.2f}", ""],
            ["(c) diffusers load_lora_weights", med["diffusers_fresh"] * ms, f"{med['diffusers_fresh'] / med['raw']:.1f}", ""],
            ["    beside a resident adapter", med["diffusers_second"] * ms, f"{med['diffusers_second'] / med['raw']:.1f}", ""],
        ],
    )
    speedup = med["diffusers_fresh"] / med["sdserve_cold"]
    speedup_second = med["diffusers_second"] / med["sdserve_cold"]
    print()
    print_table(
        ["ratio", "value", "goal", "met"],
        [
            ["sdserve cold / raw", f"{med['sdserve_cold'] / med['raw']:.2f}", "<= 2", _met(med["sdserve_cold"] / med["raw"] <= 2)],
            ["diffusers / sdserve cold", f"{speedup:.1f}", ">= 20", _met(speedup >= 20)],
            ["diffusers (2nd adapter) / sdserve cold", f"{speedup_second:.1f}", ">= 20", _met(speedup_second >= 20)],
            [f"(d) switch: diffusers set_adapters / sdserve refill ({ROWS} rows, {len(STEP_TOKEN_COUNTS)} metas)",
             f"{switch['diffusers'] * ms:.2f} ms / {switch['sdserve'] * ms:.3f} ms = "
             f"{switch['diffusers'] / switch['sdserve']:.0f}x", "", ""],
            [f"(e) {memory['adapters']} adapters: Σ nbytes / Σ file tensor bytes", f"{memory['nbytes_ratio']:.3f}", "<= 1.05",
             _met(memory["nbytes_ratio"] <= 1.05)],
            [f"(e) {memory['adapters']} adapters: RSS growth / Σ file tensor bytes", f"{memory['rss_ratio']:.3f}", "<= 1.05",
             _met(memory["rss_ratio"] <= 1.05)],
        ],
    )
    if memory["note"]:
        print(f"\nnote: {memory['note']}")
    print(f"\n(e) {memory['adapters']} rank-{MEMORY_RANK} attention-only adapters: "
          f"{memory['file_tensor_bytes'] / 2**30:.2f} GiB of file tensors, {memory['adapter_bytes'] / 2**30:.2f} GiB "
          f"packed, RSS +{memory['rss_growth_bytes'] / 2**30:.2f} GiB")
    path = write_json("adapter_swap", {
        "command": "python -m bench.adapter_swap " + " ".join(argv or []),
        "model": "SD1.5-shaped UNet, random weights", "rank": RANK, "modules": results["modules"],
        "file_tensor_bytes": results["file_bytes"], "repeats": args.repeats,
        "seconds": results["times"], "medians": med, "sha256_seconds": results["hash_seconds"],
        "arena_bytes": results["arena_bytes"], "arena_touch_seconds": results["arena_touch_seconds"],
        "switch_seconds": results["switch"], "switch_rows": ROWS, "switch_token_counts": list(STEP_TOKEN_COUNTS),
        "cold_over_raw": med["sdserve_cold"] / med["raw"], "diffusers_over_cold": speedup,
        "diffusers_second_over_cold": speedup_second, "memory": memory,
    })
    print(f"\nwrote {path}")


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    main()
