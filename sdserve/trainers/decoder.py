"""Widen a shapes-world model's VAE decoder to what adapters teach: teal, stars, outlines.

`train base` trains its VAE on the base vocabulary only (eight colours, three kinds, filled), so
its decoder maps every latent back onto that vocabulary: a teal shape comes back green, a small
star as a blob, an outline half filled. No adapter on the UNet or the text encoder can then draw
a new colour, shape or style, whatever the latents it makes. This stage fine-tunes the decoder
alone on scenes that mix the base world with those extras (`extra_share` of them), with the same
pixel loss as the VAE stage (shape pixels and their outlines weighted up).

The encoder is frozen, so every image encodes to the same latents as before: the UNet, trained on
those latents, keeps its meaning. That is not enough to keep what the model draws: the UNet's
samples are not encoder latents, and a small shape it draws is a blob the old decoder snapped to a
circle or a square, which a decoder that now also knows stars and outlines snaps differently
(`bench.shapes_quality` shape accuracy: 0.93 before, 0.88 widened without the next term, 0.90
with it; docs/benchmarks.md). So the
stage also keeps its anchors: `anchor_count` samples of the UNet itself, on base-world training
prompts (never the bench's held-out ones), decoded by the old decoder, are targets the new one
must still hit (`anchor_weight`), the decoder's counterpart of DreamBooth's prior preservation.
Real SD VAEs decode any colour; this makes the embedded model's do the same for its world.

Deterministic for a seed: batch `step` is drawn from `batch_rng(seed, STAGE_DECODER, step)`, the
latent noise and the anchors' draws from seeded generators, the anchors' prompts and seeds from
the seed too.
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
from sdserve.trainers.threads import keeps_torch_threads

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
    anchor_count: int = 192
    """UNet samples of base-world prompts whose old decoding is kept (0: none)."""
    anchor_batch: int = 8
    anchor_weight: float = 1.0
    """Weight of the anchors' pixel loss against the data's."""
    reach_scenes: int = 48
    """Scenes per reading of the round trip's reach (five readings, before and after training):
    at 48 these 480 encode-decode passes are about half of a short run's time."""
    threads: int = 1
    progress: bool = True

    def check(self) -> None:
        from sdserve.errors import InvalidArgument

        if self.steps < 1:
            raise InvalidArgument(f"must be >= 1, got {self.steps}", field="--steps")
        if self.reach_scenes < 1:
            raise InvalidArgument(f"must be >= 1, got {self.reach_scenes}", field="--reach-scenes")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise InvalidArgument(f"must be a positive number, got {self.lr}", field="--lr")
        if self.batch < 1:
            raise InvalidArgument(f"must be >= 1, got {self.batch}", field="--batch-size")
        if not 0.0 <= self.extra_share <= 1.0:
            raise InvalidArgument(f"must be within [0, 1], got {self.extra_share}", field="--extra-share")
        if self.anchor_count < 0:
            raise InvalidArgument(f"must be >= 0, got {self.anchor_count}", field="--anchors")
        if self.anchor_count and self.anchor_batch < 1:
            raise InvalidArgument(f"must be >= 1, got {self.anchor_batch}", field="--anchor-batch")
        if not self.anchor_weight >= 0 or not math.isfinite(self.anchor_weight):
            raise InvalidArgument(f"must be a number >= 0, got {self.anchor_weight}", field="--anchor-weight")


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


@keeps_torch_threads
def anchor_latents(model: Path, count: int, seed: int, threads: int, progress: bool = True):
    """The latents the UNet of `model` ends on (before the decoder), [count, 4, h, w], for
    base-world training prompts, at the model's own sampling defaults.

    The engine hands back images only; these are taken where it calls the decoder, because
    that is the input the new decoder must keep decoding as the old one did.
    """
    import torch
    from tqdm import tqdm

    import sdserve.engine.engine as engine_module
    from sdserve.engine import Engine, EngineConfig, RequestSpec
    from sdserve.models.shapes import full_spec, to_caption

    rng = np.random.default_rng([seed + 1, 13])  # a stream of its own, apart from the data's
    torch.set_num_threads(threads)
    engine = Engine(EngineConfig(device="cpu", dtype="float32", max_batch_rows=64))
    requests = [engine.validate(RequestSpec(model=str(model), seed=10**6 * (seed + 1) + i,
                                            prompt=to_caption(full_spec(sample_scene(rng, exclude=HELD_OUT)))))
                for i in range(count)]
    captured: list[torch.Tensor] = []
    decode = engine_module.decode_latents

    def keep(loaded, latents):  # latents [n, 4, h, w] in the UNet's (scaled) space
        captured.append(latents.detach().float().clone())
        return decode(loaded, latents)

    engine_module.decode_latents = keep
    try:
        for start in tqdm(range(0, count, 32), desc="anchors", disable=not progress, dynamic_ncols=True):
            for result in engine.generate(requests[start:start + 32]):
                if not hasattr(result, "images"):
                    raise RuntimeError(f"sampling an anchor failed: {result}")
    finally:
        engine_module.decode_latents = decode
    return torch.cat(captured)  # [count, 4, h, w]


@keeps_torch_threads
def widen_decoder(vae, config: DecoderConfig, anchors=None,
                  on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `vae`'s decoder (and post-quant conv) in place; returns the loss of every step.

    The encoder and quant conv are frozen and run without gradients: the latents of every image
    stay what the UNet was trained on. `anchors` ([N, 4, h, w] UNet latents, `anchor_latents`)
    are decoded once by the decoder as it is, and each step adds `anchor_weight` times the mean
    squared distance of `anchor_batch` of them to that first decoding.
    """
    import torch
    from tqdm import tqdm

    from sdserve.trainers.base_model import outline  # the VAE stage's edge mask
    from sdserve.trainers.shapes_data import batch_rng, to_pixels

    config.check()
    targets = None
    if anchors is not None and len(anchors) and config.anchor_weight > 0:
        anchors = anchors / vae.config.scaling_factor  # [N, 4, h, w], the decoder's input space
        with torch.no_grad():
            targets = torch.cat([vae.decode(anchors[i:i + 32]).sample for i in range(0, len(anchors), 32)])
        anchor_generator = torch.Generator().manual_seed(config.seed + 5)
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
            if targets is not None:
                pick = torch.randint(len(anchors), (config.anchor_batch,), generator=anchor_generator)
                kept = vae.decode(anchors[pick]).sample  # [anchor_batch, 3, 64, 64]
                loss = loss + config.anchor_weight * ((kept - targets[pick]) ** 2).mean()
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


def _publish_vae(directory: Path) -> None:
    """Make the saved VAE like the rest of the model: diffusers records the local path it was
    loaded from (`_name_or_path`) in config.json, which does not belong in a shipped model, and
    its weight file comes out 0600 where the copied files keep the umask's mode."""
    import os

    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("_name_or_path", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    mask = os.umask(0)
    os.umask(mask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~mask)


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
    before = decoder_reach(vae, count=config.reach_scenes)
    anchors = anchor_latents(path, config.anchor_count, config.seed, config.threads, config.progress) \
        if config.anchor_count else None
    losses = widen_decoder(vae, config, anchors)
    after = decoder_reach(vae, count=config.reach_scenes)
    staging = stage_pipeline(path, out, ["vae"])
    try:
        vae.save_pretrained(staging / "vae", safe_serialization=True)
        _publish_vae(staging / "vae")
        meta = json.loads((path / METADATA_FILE).read_text())
        training = {f"sdserve_{k}": str(v) for k, v in asdict(config).items() if k not in ("threads", "progress", "reach_scenes")}
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
