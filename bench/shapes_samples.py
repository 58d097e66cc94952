"""A 4x4 grid of the default model's samples with their prompts, for the docs.

    python -m bench.shapes_samples [--model default] [--out docs/images/default_samples.png]

Sixteen prompts from the caption grammar (four of them held out of training), each with seed
= its index, sampled through the sdserve engine with the model's defaults (what `sdserve
generate` does with no flags). Writes the grid (each image scaled 3x, nearest) and prints the
prompts as a Markdown table in grid order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.shapes_quality import BenchPrompt, bench_prompts, sample_images

SCALE = 3


def pick_prompts() -> list[BenchPrompt]:
    """Four held-out prompts, then twelve from the training distribution (one and two shapes)."""
    prompts = bench_prompts(200, held_out_count=60)
    held = [p for p in prompts if p.group == "held_out"][::15][:4]
    rest = [p for p in prompts if p.group == "in_distribution"][:12]
    return [BenchPrompt(p.text, p.spec, p.group, i) for i, p in enumerate(held + rest)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=Path("docs/images/default_samples.png"))
    args = parser.parse_args(argv)

    from PIL import Image

    prompts = pick_prompts()
    images = sample_images(args.model, prompts, steps=None, guidance=None, scheduler=None, batch=16)
    side = images.shape[1] * SCALE
    grid = np.full((4 * (side + 4), 4 * (side + 4), 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, 4)
        big = image.repeat(SCALE, axis=0).repeat(SCALE, axis=1)
        grid[r * (side + 4) + 2 : r * (side + 4) + 2 + side, c * (side + 4) + 2 : c * (side + 4) + 2 + side] = big
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print("| # | prompt | held out |\n|---:|---|---|")
    for i, p in enumerate(prompts):
        print(f"| {i + 1} | {p.text} | {'yes' if p.group == 'held_out' else ''} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
