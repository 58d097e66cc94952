"""The `ip-adapter` row of `python -m bench.trainers` (issue 19), in a module of its own.

Trains `sdserve train ip-adapter` on one-shape scenes whose captions name no colour (each image its
own reference), then samples colourless prompts ("a large circle on the left on a white
background") through sdserve's engine with a reference image of a green shape: at scale 1 the
drawn shape must be green (>= 80 %), at scale 0 the prompt alone decides (the images are the base
model's). References of two other colours show the colour follows the reference, not a prior.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np

from bench.trainers import (
    SAMPLE_STEPS,
    Prompt,
    Run,
    check,
    read,
    run_child,
    sample,
    sdserve,
    vae_ceiling,
    write_folder,
)

REFERENCE_COLORS = ("green", "blue", "red")  # the goal's colour first; the others are (info)
KINDS_POSITIONS = (("circle", "left"), ("square", "right"), ("triangle", "top"), ("circle", "bottom"),
                   ("square", "center"), ("triangle", "left"), ("circle", "right"), ("square", "top"))
PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ip-adapter-images", type=int, default=256, help="one-shape scenes it trains on")
    parser.add_argument("--ip-adapter-steps", type=int, default=300)
    parser.add_argument("--ip-adapter-batch", type=int, default=8)
    parser.add_argument("--ip-adapter-lr", type=float, default=1e-3)
    parser.add_argument("--ip-adapter-encoder-steps", type=int, default=300)
    parser.add_argument("--ip-adapter-seeds", type=int, default=2, help="seeds per prompt and reference")
    parser.add_argument("--ip-adapter-samples", type=Path, metavar="DIR",
                        help="write strips (reference, scale 0, scale 1) here to look at")


def _drop_shape_colour(folder: Path) -> None:
    """Captions without the shape's colour word (the background keeps its own): what the
    reference image is then left to decide."""
    from sdserve.trainers.shapes_folder import read_provenance

    if (folder / ".colourless").exists():
        return
    for image in read_provenance(folder)["images"]:
        caption = folder / Path(image["file_name"]).with_suffix(".txt")
        color = image["scene"]["shapes"][0]["color"]
        caption.write_text(re.sub(rf"^(a (?:small |large )?){color} ", r"\1", caption.read_text(), count=1))
    (folder / ".colourless").write_text("")


def _reference(color: str, index: int) -> bytes:
    """PNG of a large `color` shape on white (kind and position vary with `index`)."""
    from PIL import Image

    from sdserve.models.shapes.world import SceneSpec, render, sample_scene

    kinds = ("circle", "square", "triangle")
    rng = np.random.default_rng([1919, index])
    scene = sample_scene(rng, num_shapes=1, kinds=(kinds[index % 3],), colors=(color,), backgrounds=("white",),
                         sizes=("large",))
    buffer = io.BytesIO()
    Image.fromarray(render(SceneSpec(scene.background, scene.shapes))).save(buffer, format="PNG")
    return buffer.getvalue()


def bench_ip_adapter(work: Path, args: argparse.Namespace) -> Run:
    from sdserve.api.types import IPAdapterSpec

    count = args.ip_adapter_images
    data = write_folder(work / f"ip{count}", count, seed=23, shapes_per_image=1)
    _drop_shape_colour(data)
    out = work / "shapes_ip_adapter"
    run = Run("ip-adapter", f"{count} one-shape scenes, captions without the shape's colour", goal_seconds=900.0)
    run.ceiling = vae_ceiling(data, "color")
    run.seconds, run.peak_rss = run_child(sdserve(
        "train", "ip-adapter", "--data", str(data), "--out", str(out), "--lr", str(args.ip_adapter_lr),
        "--batch-size", str(args.ip_adapter_batch), "--steps", str(args.ip_adapter_steps),
        "--encoder-steps", str(args.ip_adapter_encoder_steps), "--threads", str(args.threads), "--no-progress"),
        reuse=out if args.reuse else None)
    prompts = [Prompt(f"a large {kind} {PLACE[position]} on a white background", 23_000 + 10 * i + s,
                      {"kind": kind, "position": position})
               for i, (kind, position) in enumerate(KINDS_POSITIONS) for s in range(args.ip_adapter_seeds)]
    base_images = sample(prompts)
    run.base = read(base_images, prompts)
    from sdserve.engine import Engine, EngineConfig, RequestSpec

    engine = Engine(EngineConfig(max_batch_rows=32))  # one engine: the model and the adapter load once
    strips = []
    for color in REFERENCE_COLORS:
        expect = [Prompt(p.text, p.seed, p.expect | {"color": color}) for p in prompts]
        readings, zero_same = {}, 0.0
        for scale in (0.0, 1.0):
            # 4 prompts per reference image (kind and position vary between references).
            specs = [engine.validate(RequestSpec(
                model="default", prompt=p.text, seed=p.seed, steps=SAMPLE_STEPS,
                ip_adapters=(IPAdapterSpec(model=str(out), image=_reference(color, index // 4), scale=scale),)))
                for index, p in enumerate(prompts)]
            images = np.stack([result.images[0] for start in range(0, len(specs), 16)
                               for result in engine.generate(specs[start : start + 16])])
            readings[scale] = read(images, expect)
            if scale == 0.0:
                zero_same = float(np.mean([np.abs(a.astype(int) - b.astype(int)).max() <= 2
                                           for a, b in zip(images, base_images, strict=True)]))
            elif color == REFERENCE_COLORS[0]:
                strips = images
        run.adapter |= {f"{color}_scale1_color": readings[1.0]["color"], f"{color}_scale0_color": readings[0.0]["color"]}
        goal = color == REFERENCE_COLORS[0]
        check(run, f"{color} reference, scale 1: the shape is {color}", readings[1.0]["color"],
              ">= 0.80" if goal else "(info)", readings[1.0]["color"] >= 0.80 or not goal)
        check(run, f"  scale 0: {color} (the base model's own colours), images = base model's (<= 2/255)",
              readings[0.0]["color"], "(info)", True)
        check(run, "  scale 0: share of images equal to the base model's", zero_same, "1.00" if goal else "(info)",
              zero_same == 1.0 or not goal)
        check(run, "  scale 1: kind / position right (prompt)", float(np.mean([readings[1.0]["kind"],
              readings[1.0]["position"]])), "(info)", True)
    if args.ip_adapter_samples is not None and len(strips):
        from PIL import Image

        args.ip_adapter_samples.mkdir(parents=True, exist_ok=True)
        for index in range(min(8, len(prompts))):
            reference = np.array(Image.open(io.BytesIO(_reference(REFERENCE_COLORS[0], index // 4))))
            strip = np.concatenate([reference, base_images[index], strips[index]], axis=1)  # [64, 192, 3]
            Image.fromarray(strip.repeat(4, 0).repeat(4, 1)).save(args.ip_adapter_samples / f"{index:02d}.png")
    return run
