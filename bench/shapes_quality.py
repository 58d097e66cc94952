"""Quality of a shapes base model, measured by the weight-free scorer.

    python -m bench.shapes_quality --model DIR [--json out.json] [--grid grid.png]

200 prompts from the caption grammar with every attribute named: 60 ask for the (color, kind,
position) triples held out of training (`world.HELD_OUT`), 140 are drawn from the training
distribution (one and two shapes). Each is sampled with its own seed, 20 steps, and scored per
attribute. Sampling uses the stock diffusers StableDiffusionPipeline for now; the sdserve
engine replaces it once it exists.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdserve.models.shapes import HELD_OUT, SIZES, ShapePrompt, full_spec, sample_scene, score, to_caption
from sdserve.models.shapes.captions import PromptSpec
from sdserve.models.shapes.world import COLORS

SCORED = ("color", "shape", "position", "size", "background", "count", "all")


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    spec: PromptSpec
    group: str  # "held_out" | "in_distribution"
    seed: int


def bench_prompts(count: int = 200, held_out_count: int = 60, seed: int = 0) -> list[BenchPrompt]:
    rng = np.random.default_rng([seed, 7])
    prompts = []
    triples = sorted(HELD_OUT)
    for i in range(held_out_count):
        color, kind, position = triples[i % len(triples)]
        background = rng.choice([c for c in COLORS if c != color])
        size = SIZES[i // len(triples) % len(SIZES)]
        spec = PromptSpec((ShapePrompt(color, kind, size, position),), str(background))
        prompts.append(BenchPrompt(to_caption(spec), spec, "held_out", seed * 100_000 + i))
    for i in range(held_out_count, count):
        spec = full_spec(sample_scene(rng, exclude=HELD_OUT))
        prompts.append(BenchPrompt(to_caption(spec), spec, "in_distribution", seed * 100_000 + i))
    return prompts


def sample_images(pipe, prompts: list[BenchPrompt], steps: int, guidance: float, batch: int) -> np.ndarray:
    """uint8 [N, 64, 64, 3], each prompt with its own seeded generator."""
    from tqdm import tqdm

    images = []
    for start in tqdm(range(0, len(prompts), batch), desc="sampling"):
        chunk = prompts[start : start + batch]
        out = pipe(
            [p.text for p in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(p.seed) for p in chunk],
            output_type="np",
        ).images  # [B, H, W, 3] float in [0, 1]
        images.append((out * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images)


def summarize(prompts: list[BenchPrompt], results: list[dict]) -> dict[str, dict[str, float]]:
    """Accuracy per attribute (over prompts that name it), for each group and overall."""
    summary = {}
    for group in ("all", "held_out", "in_distribution"):
        rows = [r for p, r in zip(prompts, results) if group == "all" or p.group == group]
        summary[group] = {
            key: float(np.mean([bool(r[key]) for r in rows if r[key] is not None]))
            for key in SCORED
            if any(r[key] is not None for r in rows)
        } | {"n": len(rows)}
    return summary


def save_grid(images: np.ndarray, path: Path, columns: int = 20) -> None:
    from PIL import Image

    rows = -(-len(images) // columns)
    grid = np.full((rows * 66, columns * 66, 3), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * 66 + 1 : r * 66 + 65, c * 66 + 1 : c * 66 + 65] = image
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="diffusers pipeline directory")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", choices=["saved", "ddim", "euler"], default="saved")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("shapes_quality.json"))
    parser.add_argument("--grid", type=Path, help="also write the samples as one PNG")
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler != "saved":
        kind = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[args.scheduler]
        pipe.scheduler = kind.from_config(pipe.scheduler.config)
    prompts = bench_prompts(args.count, held_out_count=min(60, args.count * 3 // 10), seed=args.seed)
    start = time.monotonic()
    images = sample_images(pipe, prompts, args.steps, args.guidance, args.batch)
    seconds = time.monotonic() - start
    results = [score(p.spec, image) for p, image in zip(prompts, images)]
    summary = summarize(prompts, results)

    print(f"{'group':<16}" + "".join(f"{k:>11}" for k in SCORED) + f"{'n':>6}")
    for group, row in summary.items():
        print(
            f"{group:<16}" + "".join(f"{row.get(k, float('nan')):>11.3f}" for k in SCORED) + f"{row['n']:>6}"
        )
    print(f"sampling: {seconds:.1f}s for {len(prompts)} images x {args.steps} steps")
    report = {
        "model": str(args.model),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "sampling_seconds": seconds,
        "summary": summary,
        "prompts": [
            {"text": p.text, "group": p.group, "seed": p.seed, **r} for p, r in zip(prompts, results)
        ],
    }
    args.json.write_text(json.dumps(report, indent=1))
    if args.grid:
        save_grid(images, args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
