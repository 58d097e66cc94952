"""Quality of a shapes base model, measured by the weight-free scorer.

    python -m bench.shapes_quality [--model DIR] [--json out.json] [--grid grid.png]

200 prompts from the caption grammar with every attribute named: 60 ask for the (color, kind,
position) triples held out of training (`world.HELD_OUT`), 140 are drawn from the training
distribution (one and two shapes). Each is sampled with its own seed, 20 steps, and scored per
attribute. Then size pairs: 40 held-out prompts asked once "small" and once "large" with the
same seed; a pair is right when the large image's largest shape is the larger one.
Sampling runs through the sdserve engine with the model's own defaults (those of
`sdserve generate`) unless --scheduler/--guidance/--guidance-end say otherwise; the model
defaults to the embedded `default`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdserve.models.shapes import HELD_OUT, SIZES, ShapePrompt, full_spec, sample_scene, score, to_caption
from sdserve.models.shapes.captions import PromptSpec
from sdserve.models.shapes.scorer import read_image
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


def sample_images(
    model: str,
    prompts: list[BenchPrompt],
    steps: int | None,
    guidance: float | None,
    scheduler: str | None,
    batch: int,
    guidance_interval: tuple[float | None, float | None] = (None, None),
) -> np.ndarray:
    """uint8 [N, 64, 64, 3] through the sdserve engine, `batch` requests at a time."""
    from tqdm import tqdm

    from sdserve.engine import Engine, EngineConfig, RequestSpec

    engine = Engine(EngineConfig(max_batch_rows=2 * batch))
    requests = [
        engine.validate(
            RequestSpec(
                model=model,
                prompt=p.text,
                seed=p.seed,
                steps=steps,
                guidance_scale=guidance,
                scheduler=scheduler,
                guidance_start=guidance_interval[0],
                guidance_end=guidance_interval[1],
            )
        )
        for p in prompts
    ]
    images = []
    for start in tqdm(range(0, len(requests), batch), desc="sampling"):
        for result in engine.generate(requests[start : start + batch]):
            if not hasattr(result, "images"):
                raise RuntimeError(f"generation failed: {result}")
            images.append(result.images[0])
    return np.stack(images)


def size_pairs(count: int = 40, seed: int = 0) -> list[tuple[BenchPrompt, BenchPrompt]]:
    """(small, large) prompts alike but for the size word, with one seed per pair."""
    rng = np.random.default_rng([seed, 11])
    triples = sorted(HELD_OUT)
    pairs = []
    for i in range(count):
        color, kind, position = triples[i % len(triples)]
        background = str(rng.choice([c for c in COLORS if c != color]))
        pair = []
        for size in SIZES:
            spec = PromptSpec((ShapePrompt(color, kind, size, position),), background)
            pair.append(BenchPrompt(to_caption(spec), spec, f"size_{size}", seed * 100_000 + 50_000 + i))
        pairs.append((pair[0], pair[1]))
    return pairs


def largest_extent(image: np.ndarray) -> int:
    """Extent in px of the largest shape the scorer finds; 0 when it finds none."""
    shapes = read_image(image).shapes
    return shapes[0].extent if shapes else 0


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
    parser.add_argument("--model", default="default", help="built-in name or diffusers pipeline directory")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=40, help="small/large pairs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, help="default: the model's")
    parser.add_argument("--scheduler", help="default: the model's")
    parser.add_argument("--guidance-start", type=float, help="default: the model's")
    parser.add_argument("--guidance-end", type=float, help="default: the model's")
    parser.add_argument("--batch", type=int, default=40, help="requests per engine call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("shapes_quality.json"))
    parser.add_argument("--grid", type=Path, help="also write the samples as one PNG")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    prompts = bench_prompts(args.count, held_out_count=min(60, args.count * 3 // 10), seed=args.seed)
    pairs = size_pairs(args.pairs, seed=args.seed)
    paired = [p for pair in pairs for p in pair]
    start = time.monotonic()
    interval = (args.guidance_start, args.guidance_end)
    images = sample_images(args.model, prompts + paired, args.steps, args.guidance, args.scheduler, args.batch, interval)
    seconds = time.monotonic() - start
    images, pair_images = images[: len(prompts)], images[len(prompts) :]
    results = [score(p.spec, image) for p, image in zip(prompts, images)]
    summary = summarize(prompts, results)
    extents = [(largest_extent(pair_images[2 * i]), largest_extent(pair_images[2 * i + 1])) for i in range(len(pairs))]
    large_larger = float(np.mean([large > small for small, large in extents])) if extents else float("nan")

    print(f"model {args.model}, {args.steps} steps, guidance {args.guidance or 'model default'} "
          f"in [{'default' if args.guidance_start is None else args.guidance_start}, "
          f"{'default' if args.guidance_end is None else args.guidance_end}], "
          f"scheduler {args.scheduler or 'model default'}")
    print(f"{'group':<16}" + "".join(f"{k:>11}" for k in SCORED) + f"{'n':>6}")
    for group, row in summary.items():
        print(
            f"{group:<16}" + "".join(f"{row.get(k, float('nan')):>11.3f}" for k in SCORED) + f"{row['n']:>6}"
        )
    print(f"large > small (same seed): {large_larger:.3f} of {len(pairs)} pairs")
    print(f"sampling: {seconds:.1f}s for {len(prompts) + len(paired)} images x {args.steps} steps")
    report = {
        "command": "python -m bench.shapes_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model),
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "guidance_interval": list(interval),
        "sampling_seconds": seconds,
        "summary": summary,
        "large_larger_than_small": large_larger,
        "size_pairs": [
            {"small": s.text, "large": la.text, "seed": s.seed, "extents": e} for (s, la), e in zip(pairs, extents)
        ],
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
