"""Does step-level batching pay? 16 requests one by one vs together through the sdserve engine,
and the same 16 through the stock diffusers pipeline, one call each, in the same run.

Models: `default` (the embedded SD 1.x model) and an SD1.5-shaped UNet (real widths 320/640/1280,
cross-attention 768, random weights) at 32×32 latents (256×256 pixels) with a small VAE and text
encoder, since only the UNet's shape matters for batching.

    python -m bench.engine_batching            # both models
    python -m bench.engine_batching --quick    # `default` only, fewer steps (make bench)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import diffusers
import torch
from tqdm import tqdm

from bench.common import machine, print_table, write_json
from bench.sd15 import SD15_UNET_CONFIG
from sdserve.cli.common import quiet_libraries
from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.schedulers import resolve_scheduler
from sdserve.models.builtin import build_model, builtin_path
from sdserve.models.configs import DEFAULT, ModelDefaults, ModelLimits
from sdserve.paths import cache_root

SD15_SHAPED = replace(
    DEFAULT,
    name="sd15-shaped",
    description="SD1.5-shaped UNet (320/640/1280, cross-attention 768), random weights, for benchmarks",
    defaults=ModelDefaults(width=256, height=256, steps=8, guidance_scale=7.5, scheduler="euler"),
    limits=ModelLimits(max_side=512, max_pixels=512 * 512),
    # The real SD 1.5 UNet widths; 32x32 latents (256x256 pixels) by default on a CPU.
    unet={**SD15_UNET_CONFIG, "sample_size": 32},
    # SD's 8x VAE (four levels), narrow: decoding is not what this bench measures.
    vae={
        "block_out_channels": [32, 32, 64, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
    shipped=False,
    text_encoder={
        "hidden_size": 768,
        "intermediate_size": 1024,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 12,
        "num_hidden_layers": 2,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "max_position_embeddings": 77,
    },
)

PROMPTS = ["a red circle", "a blue square on the left", "a cat", "a green triangle at the top"]
SCHEDULERS = ["euler", "euler_a", "dpmpp_2m", "ddim"]


def sd15_shaped_path() -> Path:
    path = cache_root() / "bench" / f"sd15-shaped-v{SD15_SHAPED.version}"
    if not (path / "sdserve.json").exists():
        print("building the SD1.5-shaped model (once) ...", flush=True)
        build_model(SD15_SHAPED, path)
    return path


def make_specs(model: str, steps: int, count: int = 16) -> list[RequestSpec]:
    return [
        RequestSpec(
            model=model,
            prompt=PROMPTS[i % len(PROMPTS)],
            seed=1000 + i,
            steps=steps + (i % 3),  # mixed step counts
            scheduler=SCHEDULERS[i % len(SCHEDULERS)],
            guidance_scale=7.5,
            # every step guided, as diffusers runs it (not `default`'s first-quarter interval)
            guidance_start=0.0,
            guidance_end=1.0,
        )
        for i in range(count)
    ]


def diffusers_runner(path: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config

    def one(request) -> None:
        choice = resolve_scheduler(request.scheduler)
        pipe.scheduler = getattr(diffusers, choice.class_name).from_config(base_config, **choice.overrides)
        pipe(request.prompt, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
             width=request.width, height=request.height, generator=torch.Generator().manual_seed(request.seed),
             output_type="np")

    return one


def bench_model(label: str, model: str, path: Path, steps: int, count: int, rounds: int) -> dict:
    """The three ways of running the same requests, interleaved round by round (median kept),
    so that whatever else the machine does hits all three alike."""
    engine = Engine(EngineConfig(max_batch_rows=2 * count))
    requests = [engine.validate(spec) for spec in make_specs(model, steps, count)]
    one_diffusers = diffusers_runner(path)
    engine.generate(requests[:1])  # warm-up: load weights, first-call allocations
    one_diffusers(requests[0])
    modes = {
        "diffusers": lambda: [one_diffusers(r) for r in requests],
        "sdserve_one_by_one": lambda: [engine.generate([r]) for r in requests],
        "sdserve_together": lambda: engine.generate(requests),
    }
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for _ in tqdm(range(rounds), desc=label, unit="round"):
        for name, run in modes.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "model": label,
        "requests": count,
        "rounds": rounds,
        "size": f"{requests[0].width}x{requests[0].height}",
        "unet_steps_total": sum(r.steps for r in requests),
        "seconds": median,
        "seconds_all": seconds,
        "ratios": {
            "together_vs_diffusers": median["diffusers"] / median["sdserve_together"],
            "together_vs_one_by_one": median["sdserve_one_by_one"] / median["sdserve_together"],
            "one_by_one_vs_diffusers": median["diffusers"] / median["sdserve_one_by_one"],
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="`default` only, fewer steps")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_libraries()
    rounds = 1 if args.quick else args.rounds
    runs = [bench_model("default", "default", builtin_path("default"), 4 if args.quick else 20, args.requests, rounds)]
    if not args.quick:
        path = sd15_shaped_path()
        runs.append(bench_model("sd15-shaped (32x32 latents)", str(path), path, 4, args.requests, rounds))
    print(f"\nengine batching: {args.requests} requests, CFG 7.5, mixed schedulers and steps; {machine()['cpu']}, "
          f"{machine()['torch_threads']} threads (CPU timings: read the ratios, not the seconds)\n")
    print_table(
        ["model", "size", "diffusers s", "one-by-one s", "together s", "together/diffusers", "together/one-by-one"],
        [
            [r["model"], r["size"], r["seconds"]["diffusers"], r["seconds"]["sdserve_one_by_one"],
             r["seconds"]["sdserve_together"], r["ratios"]["together_vs_diffusers"], r["ratios"]["together_vs_one_by_one"]]
            for r in runs
        ],
    )
    path = write_json("engine_batching", {"runs": runs, "command": "python -m bench.engine_batching"
                                          + (" --quick" if args.quick else "")}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
