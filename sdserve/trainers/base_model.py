"""Train the embedded base model on the shapes world: VAE first, then UNet + text encoder.

Stage 1 (VAE) minimises pixel MSE, with shape pixels weighted up (`fg_weight`) because shapes
cover a few percent of an image and their colour is what the scorer and users read, plus SD's
tiny KL term. Its exit check is the scorer's colour accuracy on reconstructions.
Stage 2 trains the UNet and a CLIP text encoder jointly on SD's DDPM schedule (scaled_linear
betas) with a v-prediction target (see components.NOISE_SCHEDULE), 10 % empty captions for
classifier-free guidance, loss weights that give every step an x0-error weight of
min(snr + 1, gamma) (all of it at high noise, where layout is decided; capped at low noise),
warmup + cosine LR and an EMA of the weights, which is what gets saved.

Each stage runs for a time budget (or `max_steps`), checkpoints every `checkpoint_s`, and
resumes from its checkpoint with `resume`. The output is a diffusers StableDiffusionPipeline
directory.

Why a 4x VAE (spikes, 1 thread, 10 min, batch 16, same recipe, scorer on 256 reconstructions):
4x (0.95 M params, 529 steps): colour 98.8 %, size 100 %, shape 66 %, shape count 93 %;
8x (1.25 M params, 571 steps): colour 91.0 %, size 94 %, shape 45 %, shape count 77 %.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from tqdm import tqdm

from sdserve.models.builtin import METADATA_FILE
from sdserve.models.configs import SHAPES_DEFAULTS, SHAPES_LIMITS
from sdserve.models.shapes.captions import full_spec
from sdserve.models.shapes.components import (
    NOISE_SCHEDULE,
    ComponentSizes,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from sdserve.models.shapes.scorer import score
from sdserve.trainers.output import load_checkpoint, save_checkpoint
from sdserve.trainers.shapes_data import (
    STAGE_UNET,
    STAGE_VAE,
    LatentPool,
    batch_rng,
    draw_scenes,
    from_pixels,
    to_pixels,
)
from sdserve.trainers.threads import keeps_torch_threads


@dataclass(frozen=True)
class TrainConfig:
    """Everything a base-model training run depends on; the CLI mirrors these fields."""

    out: Path
    """Output directory: the pipeline, plus checkpoints/ and train_log.jsonl."""
    world: str = "shapes"
    """Synthetic world to train on (only "shapes" exists)."""
    seed: int = 0
    """Seeds weights, the data stream and the noise."""
    vae_minutes: float = 12.0
    """Wall-clock budget of the VAE stage."""
    unet_minutes: float = 45.0
    """Wall-clock budget of the UNet + text-encoder stage."""
    vae_max_steps: int | None = None
    """Stop the VAE stage after this many steps even if time is left (tests, exact reruns)."""
    unet_max_steps: int | None = None
    """Likewise for the UNet stage."""
    resume: bool = False
    """Continue from checkpoints in `out` instead of starting over."""
    sizes: ComponentSizes = field(default_factory=ComponentSizes)
    """Widths of the networks."""
    vae_batch: int = 16
    vae_lr: float = 1e-3
    fg_weight: float = 8.0
    """Loss weight of shape pixels relative to background pixels in the VAE stage."""
    edge_weight: float = 16.0
    """Loss weight of pixels on a shape's outline (both sides of it), added to fg_weight (1: off).
    Corners are a few pixels, and rounding them turns a small square into a circle: with 16 the
    VAE's exit check reads 100 % of reconstructed shapes right at 1,200 steps (86 % with 1; small
    squares 64 %), and its encoder must keep corners apart in the latents, so the UNet learns
    them too: small circles/squares sampled without guidance 96/90 % right (79/52 % with 1).
    (Session 3 judged 16 worse from samples at guidance 5 over the whole schedule, where
    guidance bends squares' sides in; see SHAPES_DEFAULTS.guidance_end.)"""
    kl_weight: float = 1e-6
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    cfg_dropout: float = 0.1
    """Share of captions replaced by "" so the model also learns the unconditional branch."""
    min_snr_gamma: float = 5.0
    """Cap of the per-step x0-error weight snr + 1 (see the loss in train_unet)."""
    ema_decay: float = 0.998
    pool_size: int = 8192
    """Encoded scenes held in the latent ring (see shapes_data.LatentPool)."""
    pool_refresh: int = 16
    """Fresh scenes encoded into the ring per UNet step."""
    checkpoint_s: float = 120.0
    eval_scenes: int = 256
    """Scenes for the VAE's exit check and for measuring the latent scaling factor."""
    threads: int = 1
    """torch intra-op threads; the shared CPU asks for 1 in spikes."""
    progress: bool = True


def _lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warmup, then cosine from 1 to 0.1 over the run's progress (time or steps)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _log(cfg: TrainConfig, record: dict) -> None:
    with (cfg.out / "train_log.jsonl").open("a") as log:
        log.write(json.dumps(record) + "\n")


class _Stage:
    """Budget, progress bar and checkpoint bookkeeping shared by both stages."""

    def __init__(self, cfg: TrainConfig, name: str, minutes: float, max_steps: int | None):
        self.cfg, self.name, self.max_steps = cfg, name, max_steps
        self.budget_s = minutes * 60
        self.path = cfg.out / "checkpoints" / f"{name}.pt"
        self.step, self.elapsed_prior = 0, 0.0
        self.start = time.monotonic()
        self.last_ckpt = self.start
        self.bar = tqdm(total=max_steps, desc=name, disable=not cfg.progress, dynamic_ncols=True)

    def load(self) -> dict | None:
        if not (self.cfg.resume and self.path.exists()):
            return None
        state = load_checkpoint(self.path)
        self.step, self.elapsed_prior = state["step"], state["elapsed_s"]
        self.bar.update(self.step)
        return state

    @property
    def elapsed(self) -> float:
        return self.elapsed_prior + time.monotonic() - self.start

    @property
    def progress(self) -> float:
        """Share of the run done, which drives the LR schedule.

        With `max_steps` it counts steps only, so a rerun with the same seed follows the same
        schedule however busy the machine is; the time budget then only stops the run early.
        """
        if self.max_steps is not None:
            return self.step / max(self.max_steps, 1)
        return self.elapsed / self.budget_s if self.budget_s > 0 else 1.0

    def running(self) -> bool:
        out_of_time = self.budget_s <= 0 or self.elapsed >= self.budget_s
        return self.progress < 1.0 and not out_of_time

    def tick(self, loss: float, save: Callable[[], dict]) -> None:
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", min=f"{self.elapsed / 60:.1f}")
        if self.step % 25 == 0:
            _log(self.cfg, {"stage": self.name, "step": self.step, "loss": loss, "elapsed_s": self.elapsed})
        if time.monotonic() - self.last_ckpt > self.cfg.checkpoint_s:
            self.save(save())

    def save(self, state: dict) -> None:
        state |= {"step": self.step, "elapsed_s": self.elapsed}
        save_checkpoint(self.path, state)  # the adapter loop's writer: never a torn checkpoint
        self.last_ckpt = time.monotonic()

    def close(self) -> None:
        self.bar.close()


def vae_color_accuracy(vae, seed: int, count: int = 256) -> dict[str, float]:
    """Scorer accuracy on VAE reconstructions of fixed scenes: the VAE stage's exit check."""
    scenes = draw_scenes(batch_rng(seed, 0, 0), count)
    totals: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, count, 64):
            chunk = scenes[start : start + 64]
            pixels, _ = to_pixels(chunk)
            recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample  # [B, 3, 64, 64]
            for scene, image in zip(chunk, from_pixels(recon)):
                for key, ok in score(full_spec(scene), image).items():
                    totals[key] = totals.get(key, 0.0) + bool(ok) / count
    return totals


def outline(masks: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] 0/1: pixels whose 3x3 neighbourhood holds both shape and background."""
    grown = F.max_pool2d(masks, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-masks, 3, stride=1, padding=1)
    return grown - shrunk


def train_vae(cfg: TrainConfig):
    vae = build_vae(cfg.sizes)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    stage = _Stage(cfg, "vae", cfg.vae_minutes, cfg.vae_max_steps)
    state = stage.load()
    if state is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
    generator = torch.Generator().manual_seed(cfg.seed + stage.step)
    start_step = stage.step
    while stage.running():
        pixels, masks = to_pixels(draw_scenes(batch_rng(cfg.seed, STAGE_VAE, stage.step), cfg.vae_batch))
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample  # [B, 3, 64, 64]
        weights = 1.0 + (cfg.fg_weight - 1.0) * masks  # [B, 1, 64, 64]
        if cfg.edge_weight != 1.0:
            weights = weights + (cfg.edge_weight - 1.0) * outline(masks)
        loss = (weights * (recon - pixels) ** 2).mean() / weights.mean()
        loss = loss + cfg.kl_weight * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(stage.step, stage.progress, cfg.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stage.tick(loss.item(), lambda: {"vae": vae.state_dict(), "optimizer": optimizer.state_dict()})
    stage.close()
    vae.eval()
    if stage.step > start_step or state is None:
        stage.save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict()})
        accuracy = vae_color_accuracy(vae, cfg.seed, cfg.eval_scenes)
        _log(cfg, {"stage": "vae", "eval": accuracy, "steps": stage.step})
    return vae


@torch.no_grad()
def _encode(vae, scenes, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and std, [B, 4, h, w] each."""
    posterior = vae.encode(to_pixels(scenes)[0]).latent_dist
    factor = vae.config.scaling_factor
    return posterior.mean * factor, posterior.std * factor


# SD's scaled_linear schedule was tuned for 64x64 latents; at 16x16 the same noise leaves far
# more of the layout readable (a large shape spans ~36 latent pixels, and averaging them beats
# the noise even at t=999), so a model learns to read position from the initial noise instead
# of from the prompt: a first run drew every prompt's shape where the seed put it (position at
# chance, 15 %). Scaling latents to std 0.25 instead of 1 shifts every step's SNR by
# (16/64)^2, the resolution rule of Hoogeboom et al. 2023 (simple diffusion). It lives in the
# VAE's scaling_factor, so every pipeline and scheduler applies it unchanged.
LATENT_STD = 0.25


def _set_scaling_factor(vae, seed: int, count: int) -> None:
    """Scale latents to std LATENT_STD (SD: 1); measure this VAE's factor on fixed scenes."""
    with torch.no_grad():
        latents = vae.encode(to_pixels(draw_scenes(batch_rng(seed, 0, 1), count))[0]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(LATENT_STD / latents.std()))


def train_unet(cfg: TrainConfig, vae, tokenizer):
    latent_size = 64 // cfg.sizes.vae_downsample
    unet = build_unet(cfg.sizes, latent_size)
    text_encoder = build_text_encoder(cfg.sizes, tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    stage = _Stage(cfg, "unet", cfg.unet_minutes, cfg.unet_max_steps)
    state = stage.load()
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema = list(state["ema"])
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    alphas = noise_scheduler.alphas_cumprod  # [1000]
    snr = alphas / (1 - alphas)  # [1000]
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + stage.step)
    start_step = stage.step
    pool_size = cfg.pool_size if stage.running() else 0
    pool_scenes = draw_scenes(batch_rng(cfg.seed, STAGE_UNET, 10**9 + stage.step), pool_size)
    encoded = [_encode(vae, pool_scenes[i : i + 256], generator) for i in range(0, pool_size, 256)]
    pool = LatentPool(pool_scenes, *(torch.cat(parts) for parts in zip(*encoded))) if encoded else None

    def snapshot() -> dict:
        return {
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema,
        }

    while stage.running():
        rng = batch_rng(cfg.seed, STAGE_UNET, stage.step)
        fresh = draw_scenes(rng, cfg.pool_refresh)
        pool.replace(fresh, *_encode(vae, fresh, generator))
        latents, captions = pool.sample(rng, generator, cfg.unet_batch)  # [B, 4, h, w]
        captions = ["" if rng.random() < cfg.cfg_dropout else c for c in captions]
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids  # [B, T]
        timesteps = torch.randint(0, len(alphas), (len(captions),), generator=generator)  # [B]
        noise = torch.randn(latents.shape, generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(ids)[0]  # [B, T, text_hidden]
        pred = unet(noisy, timesteps, states).sample  # [B, 4, h, w]
        target = noise_scheduler.get_velocity(latents, noise, timesteps)  # [B, 4, h, w]
        # |v error|^2 = (snr + 1) |x0 error|^2; weighting by min(snr + 1, gamma) / (snr + 1) gives
        # x0 weight 1 at high noise (epsilon's would be snr ~ 0.005) and gamma at low noise.
        snr_t = snr[timesteps]  # [B]
        weight = torch.clamp(snr_t + 1, max=cfg.min_snr_gamma) / (snr_t + 1)  # [B]
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))).mean()
        for group in optimizer.param_groups:
            group["lr"] = cfg.unet_lr * _lr_factor(stage.step, stage.progress, cfg.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + stage.step) / (10 + stage.step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        stage.tick(loss.item(), snapshot)
    stage.close()
    if stage.step > start_step or state is None:
        stage.save(snapshot())
    with torch.no_grad():  # ship the EMA weights
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval(), text_encoder.eval()


def sampling_scheduler() -> EulerDiscreteScheduler:
    """The scheduler the pipeline ships: Euler over the training betas (v-prediction).

    Not SD 1.x's PNDM: diffusers' PLMS steps with this v-prediction model draw wrong colors
    (background right 16 % on the bench's validation prompts); Euler, DPM++ 2M and DDIM agree
    (shape 70-77 %, everything else ~100 %). `clip_sample` is written as False because schedulers
    built from this config (DDIM, DDPM) otherwise clip x0 to [-1, 1], which these latents
    (std LATENT_STD, offset per color) exceed: DDIM then drew 37 % of colors right.
    """
    schedule = {k: v for k, v in NOISE_SCHEDULE.items() if k != "clip_sample"}  # not an Euler argument
    return EulerDiscreteScheduler(**schedule, steps_offset=1, timestep_spacing="leading")


def write_sampling_config(out: Path) -> None:
    """(Re)write a trained directory's scheduler and sdserve.json (what requests default to)."""
    sampling_scheduler().save_pretrained(out / "scheduler")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    # Kept for the other schedulers a request may name, built from this config: as SD 1.x's
    # config carries them (no x0 clipping, PLMS without Runge-Kutta warm-up, DDIM's last alpha).
    config.update(clip_sample=False, skip_prk_steps=True, set_alpha_to_one=False)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = json.loads((out / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    meta = {
        "name": out.name,
        "family": "sd1",
        "description": "SD 1.x-architecture model trained by `sdserve train base` on the shapes world "
        "(v-prediction, 64x64)",
        "defaults": asdict(SHAPES_DEFAULTS),  # what the embedded default ships with
        "limits": asdict(SHAPES_LIMITS),
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer) -> StableDiffusionPipeline:
    """Write a stock-loadable SD 1.x pipeline directory (no safety checker) and its sdserve.json."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    write_sampling_config(out)
    return pipe


@keeps_torch_threads
def train_base(cfg: TrainConfig) -> Path:
    """Run both stages and write the pipeline to `cfg.out`; returns that path."""
    if cfg.world != "shapes":
        raise ValueError(f"unknown world {cfg.world!r}; only 'shapes' exists")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # diffusers' init draws only from torch; this pins anything else
    cfg.out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        (cfg.out / "train_log.jsonl").unlink(missing_ok=True)
    _log(cfg, {"config": json.loads(json.dumps(asdict(cfg), default=str))})
    tokenizer = build_tokenizer(cfg.out / "tokenizer")
    vae = train_vae(cfg)
    _set_scaling_factor(vae, cfg.seed, cfg.eval_scenes)
    unet, text_encoder = train_unet(cfg, vae, tokenizer)
    save_pipeline(cfg.out, vae, unet, text_encoder, tokenizer)
    return cfg.out
