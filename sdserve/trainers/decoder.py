"""Widen a shapes-world model's VAE decoder to what adapters teach: teal, stars, outlines.

`train base` trains its VAE on the base vocabulary only (eight colours, three kinds, filled), so
its decoder maps every latent back onto that vocabulary: a teal shape comes back green, a small
star as a blob, an outline half filled. No adapter on the UNet or the text encoder can then draw
a new colour, shape or style, whatever the latents it makes. This stage fine-tunes the decoder
alone on scenes that mix the base world with those extras (`extra_share` of them), with the same
pixel loss as the VAE stage (shape pixels and their outlines weighted up).

The encoder is frozen, so every image encodes to the same latents as before: the UNet, trained on
those latents, keeps its meaning, and a model widened this way draws what it drew before (the
bench's base-world check). Real SD VAEs decode any colour; this makes the embedded model's do the
same for its world.

Deterministic for a seed: batch `step` is drawn from `batch_rng(seed, STAGE_DECODER, step)` and
the latent noise from one seeded generator.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdserve.models.shapes.world import (
    ALL_COLORS,
    ALL_KINDS,
    COLORS,
    HELD_OUT,
    IMAGE_SIZE,
    STYLES,
    SceneSpec,
    sample_scene,
)

# torch, tqdm and shapes_data (which imports torch) load inside the functions: `sdserve --help`
# imports this module for DecoderConfig's defaults and must stay fast.
STAGE_DECODER = 3  # after shapes_data's STAGE_VAE (1) and STAGE_UNET (2): its own data stream


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder-widening run; `sdserve train decoder` mirrors these fields."""

    steps: int = 1200
    """At 400 the round trip reads teal 88 %, at 800 and 1,200 100 % (see docs/benchmarks.md)."""
    lr: float = 5e-4
    batch: int = 16
    extra_share: float = 0.5
    """Share of scenes drawn with the extras (any kind, colour and style); the rest are the base
    world exactly as `train base` draws it, so the decoder keeps what it knew."""
    seed: int = 0
    fg_weight: float = 8.0
    """Loss weight of shape pixels, as in the VAE stage (`TrainConfig.fg_weight`)."""
    edge_weight: float = 16.0
    """Added weight of pixels on a shape's outline, as in the VAE stage: strokes and star arms
    are edges, so this is where outlines and small stars are won or lost."""
    warmup_steps: int = 50
    threads: int = 1
    progress: bool = True

    def check(self) -> None:
        from sdserve.errors import InvalidArgument

        if self.steps < 1:
            raise InvalidArgument(f"must be >= 1, got {self.steps}", field="--steps")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise InvalidArgument(f"must be a positive number, got {self.lr}", field="--lr")
        if self.batch < 1:
            raise InvalidArgument(f"must be >= 1, got {self.batch}", field="--batch-size")
        if not 0.0 <= self.extra_share <= 1.0:
            raise InvalidArgument(f"must be within [0, 1], got {self.extra_share}", field="--extra-share")


def wide_scenes(rng: np.random.Generator, count: int, extra_share: float) -> list[SceneSpec]:
    """`count` scenes: each, with probability `extra_share`, drawn from every kind, colour and
    style the world has (backgrounds stay base colours, as every bench prompt's do); otherwise a
    base-world scene as the base model's training stream draws it."""
    scenes = []
    for _ in range(count):
        if rng.random() < extra_share:
            scenes.append(sample_scene(rng, exclude=HELD_OUT, kinds=ALL_KINDS, colors=ALL_COLORS,
                                       backgrounds=COLORS, styles=STYLES))
        else:
            scenes.append(sample_scene(rng, exclude=HELD_OUT))
    return scenes


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine from 1 to 0.1 (as the base stages)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))


def widen_decoder(vae, config: DecoderConfig, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `vae`'s decoder (and post-quant conv) in place; returns the loss of every step.

    The encoder and quant conv are frozen and run without gradients: the latents of every image
    stay what the UNet was trained on.
    """
    import torch
    from tqdm import tqdm

    from sdserve.trainers.base_model import outline  # the VAE stage's edge mask
    from sdserve.trainers.shapes_data import batch_rng, to_pixels

    config.check()
    torch.set_num_threads(config.threads)
    frozen = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    for parameter in frozen:
        parameter.requires_grad_(False)
    trained = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()
    losses: list[float] = []
    bar = tqdm(total=config.steps, desc="decoder", disable=not config.progress, dynamic_ncols=True)
    try:
        for step in range(config.steps):
            rng = batch_rng(config.seed, STAGE_DECODER, step)
            pixels, masks = to_pixels(wide_scenes(rng, config.batch, config.extra_share))  # [B, 3, 64, 64], [B, 1, 64, 64]
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(generator)  # [B, 4, h, w]
            recon = vae.decode(latents).sample  # [B, 3, 64, 64]
            weights = 1.0 + (config.fg_weight - 1.0) * masks + (config.edge_weight - 1.0) * outline(masks)
            loss = (weights * (recon - pixels) ** 2).mean() / weights.mean()
            if not torch.isfinite(loss):
                from sdserve.errors import InvalidArgument

                raise InvalidArgument(f"the loss turned {loss.item()} at step {step + 1}; nothing written; "
                                      "try a lower learning rate", field="--lr")
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(step, config.steps, config.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        bar.close()
        for parameter in frozen:
            parameter.requires_grad_(True)
    vae.eval()
    return losses


def decoder_reach(vae, seed: int = 123, count: int = 48) -> dict[str, float]:
    """What the scorer reads back from round trips (encode, decode) of scenes the extras draw:
    teal read as teal, outlined read as outlined, the fill drop from filled to outlined, small
    and large stars read as stars. An adapter cannot draw past these."""
    import torch

    from sdserve.models.shapes.scorer import read_image
    from sdserve.trainers.shapes_data import from_pixels, to_pixels

    rng = np.random.default_rng(seed)

    def readings(scenes: list[SceneSpec]) -> list:
        pixels, _ = to_pixels(scenes)  # [N, 3, 64, 64]
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample  # [N, 3, 64, 64]
        return [read_image(image) for image in from_pixels(decoded)]

    def share(found: list, attribute: str, value: str) -> float:
        return float(np.mean([bool(r.shapes) and getattr(r.shapes[0], attribute) == value for r in found]))

    teal = readings([sample_scene(rng, 1, colors=("teal",)) for _ in range(count)])
    outlined = readings([sample_scene(rng, 1, styles=("outlined",)) for _ in range(count)])
    filled = readings([sample_scene(rng, 1) for _ in range(count)])
    small = readings([sample_scene(rng, 1, kinds=("star",), sizes=("small",)) for _ in range(count)])
    large = readings([sample_scene(rng, 1, kinds=("star",), sizes=("large",)) for _ in range(count)])
    fill_outlined = float(np.mean([r.shapes[0].fill for r in outlined if r.shapes]))
    fill_filled = float(np.mean([r.shapes[0].fill for r in filled if r.shapes]))
    return {
        "teal": share(teal, "color", "teal"),
        "outlined": share(outlined, "style", "outlined"),
        "fill_drop": 1.0 - fill_outlined / fill_filled,
        "small_star": share(small, "kind", "star"),
        "large_star": share(large, "kind", "star"),
    }


# -- the command: a model directory in, a model directory out (only the VAE's weights differ) ----

METHOD = "decoder"


def _written_by_us(path: Path) -> bool:
    """A directory `train decoder` wrote (which a new run may replace), told by its sdserve.json."""
    from sdserve.models.builtin import METADATA_FILE

    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("training"), dict) \
        and meta["training"].get("sdserve_method") == METHOD


def check_paths(model: Path, out: Path) -> None:
    """Refuse, before any work: a model that is not a shapes-world SD 1.x directory (64x64), and an
    --out that is a file, the model itself, or a directory this command did not write."""
    from sdserve.engine.model import read_model_info
    from sdserve.errors import InvalidArgument, NotFound
    from sdserve.trainers.output import check_directory_writable

    try:
        info = read_model_info(model.name, model)
    except NotFound as error:
        raise InvalidArgument(f"{model}: {error.message}", field="--model") from None
    if info.family != "sd1" or (info.defaults.width, info.defaults.height) != (IMAGE_SIZE, IMAGE_SIZE) \
            or not (model / "vae" / "config.json").is_file():
        raise InvalidArgument(f"{model} is not a shapes-world model (an SD 1.x directory drawing "
                              f"{IMAGE_SIZE}x{IMAGE_SIZE} with a vae/); this stage widens those only",
                              field="--model")
    out = Path(out)
    if out.resolve() == model.resolve():
        raise InvalidArgument("must differ from --model: the base directory is never written", field="--out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _written_by_us(out))):
        raise InvalidArgument(f"{out} exists and is not a model written by `sdserve train decoder`; "
                              "choose a new directory", field="--out")
    if not out.parent.is_dir():
        raise InvalidArgument(f"directory {out.parent} does not exist", field="--out")
    check_directory_writable(out.parent, "--out")


def train_decoder(model: str, out: Path, config: DecoderConfig) -> tuple[Path, dict[str, float], dict[str, float]]:
    """Widen `model`'s decoder and write the model to `out` whole (staged beside it, renamed into
    place); returns (out, reach before, reach after) as `decoder_reach` reads them."""
    from diffusers import AutoencoderKL

    from sdserve.models.builtin import METADATA_FILE
    from sdserve.trainers.components import resolve_model
    from sdserve.trainers.output import replace_directory, stage_pipeline

    config.check()
    path = resolve_model(model)
    out = Path(out)
    check_paths(path, out)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()  # float32, CPU
    before = decoder_reach(vae)
    losses = widen_decoder(vae, config)
    after = decoder_reach(vae)
    staging = stage_pipeline(path, out, ["vae"])
    try:
        vae.save_pretrained(staging / "vae", safe_serialization=True)
        meta = json.loads((path / METADATA_FILE).read_text())
        training = {f"sdserve_{k}": str(v) for k, v in asdict(config).items() if k not in ("threads", "progress")}
        meta |= {
            "name": out.name,
            "description": f"{meta.get('description', path.name)}; decoder widened to teal, stars and outlines "
                           "by `sdserve train decoder` (encoder and UNet unchanged)",
            "training": {"sdserve_method": METHOD, "sdserve_base_model": model, **training,
                         "sdserve_last_loss": f"{losses[-1]:.6f}",
                         **{f"reach_before_{k}": round(v, 4) for k, v in before.items()},
                         **{f"reach_after_{k}": round(v, 4) for k, v in after.items()}},
        }
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, before, after
