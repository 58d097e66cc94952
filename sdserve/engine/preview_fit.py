"""Fit a model's preview decoder (engine/preview.py `FittedPreview`) against its own VAE.

Data: images the model itself generates for shapes-world captions, plus shapes-world renders,
each encoded by the model's VAE (posterior mean, in the latent space the UNet samples in) and
decoded again; the decode, area-averaged to latent resolution, is the target. The fit is closed
form for a linear map (least squares, a small ridge keeps it stable, of each latent pixel's k x k
neighbourhood plus a bias onto RGB in [0, 1]); a two-layer net (`hidden` > 0) starts from a seeded
draw and takes `iterations` full-batch Adam steps on the L1 error (a few seconds on a CPU).
On the default model the net's error is a quarter of the linear map's (docs/benchmarks.md): its
palette of saturated colours is not a linear function of the latents. `sdserve models fit-preview` runs it and writes
`preview_decoder.safetensors`, which the engine then uses for GenerateStream previews.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sdserve.engine.preview import FittedPreview, neighbourhood_features, sd_factors_preview


@dataclass(frozen=True)
class PreviewFitConfig:
    """What `fit_preview` draws and fits."""

    model: str = ""  # a served model name or directory ("" = the default model)
    generated: int = 24  # images the model generates (shapes-world captions), encoded again
    rendered: int = 48  # shapes-world renders at the model's size, encoded
    steps: int | None = None  # denoising steps of the generated images (None: the model's default)
    kernel: int = 3  # neighbourhood size (odd): 1 = per latent pixel, 3 = a 3x3 conv
    hidden: int = 16  # width of the net's hidden layer; 0 = a linear map fitted in closed form
    iterations: int = 600  # Adam steps of the net
    ridge: float = 1e-3  # linear map: added to the normal equations' diagonal, times their mean diagonal
    seed: int = 0  # captions, scenes and generation seeds


@dataclass(frozen=True)
class PreviewData:
    """Latents of some images and the targets a preview should give for them."""

    latents: torch.Tensor  # [N, C, h, w] float32, the UNet's latent space (scaled)
    targets: np.ndarray  # [N, h, w, 3] uint8: the VAE's decode, area-averaged to h x w


def _scenes(count: int, seed: int, size: int) -> tuple[list[str], list[np.ndarray]]:
    from sdserve.models.shapes.captions import caption
    from sdserve.models.shapes.world import render, sample_scene

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, image_size=size) for _ in range(count)]
    return [caption(scene) for scene in scenes], [render(scene, size) for scene in scenes]


@torch.inference_mode()
def encode_images(model: Any, images: list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> latents [N, C, h, w] in the space `decode_latents` reads."""
    vae = model.vae
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, H, W]
    mean = vae.encode(x.to(model.device, model.vae_dtype)).latent_dist.mean.float().cpu()  # [N, C, h, w]
    m, s = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if m is not None and s is not None:  # decode_latents' inverse
        return (mean - torch.tensor(m).view(1, -1, 1, 1)) * vae.config.scaling_factor / torch.tensor(s).view(1, -1, 1, 1)
    return mean * vae.config.scaling_factor


@torch.inference_mode()
def decode_targets(model: Any, latents: torch.Tensor, batch: int = 16) -> np.ndarray:
    """latents [N, C, h, w] -> uint8 [N, h, w, 3]: the full VAE decode, area-averaged."""
    from sdserve.engine.decode import decode_latents

    out = []
    for start in range(0, len(latents), batch):
        chunk = latents[start : start + batch].to(model.device)
        images = torch.from_numpy(decode_latents(model, chunk)).permute(0, 3, 1, 2).float()  # [n, 3, H, W]
        small = torch.nn.functional.adaptive_avg_pool2d(images, tuple(latents.shape[-2:]))  # [n, 3, h, w]
        out.append(small.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def generate_images(engine: Any, model_name: str, prompts: list[str], seed: int, steps: int | None) -> list[np.ndarray]:
    from sdserve.api.types import RequestSpec

    specs = [RequestSpec(model=model_name, prompt=p, seed=seed + i, steps=steps) for i, p in enumerate(prompts)]
    outcomes = engine.generate([engine.validate(spec) for spec in specs])
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return [outcome.images[0] for outcome in outcomes]


def preview_data(engine: Any, model_name: str, generated: int, rendered: int, seed: int,
                 steps: int | None = None) -> PreviewData:
    """Latents and targets from `generated` of the model's own images and `rendered` renders."""
    info = engine.model_info(model_name)
    model = engine.models.get(info.name)
    size = info.defaults.width
    prompts, renders = _scenes(generated + rendered, seed, size)
    images = generate_images(engine, info.name, prompts[:generated], seed, steps) if generated else []
    images += renders[generated:]
    latents = encode_images(model, images)
    return PreviewData(latents, decode_targets(model, latents))


def fit_linear(data: PreviewData, kernel: int, ridge: float) -> FittedPreview:
    """Least squares of features(latents, kernel) onto targets / 255 (closed form)."""
    features = neighbourhood_features(data.latents.double(), kernel).reshape(-1, data.latents.shape[1] * kernel**2 + 1)
    targets = torch.from_numpy(data.targets.reshape(-1, 3)).double() / 255  # [pixels, 3]
    gram = features.T @ features  # [F, F]
    gram += torch.eye(len(gram), dtype=gram.dtype) * ridge * gram.diagonal().mean()
    weight = torch.linalg.solve(gram, features.T @ targets)  # [F, 3]
    return FittedPreview((weight.float(),), kernel, int(data.latents.shape[1]))


def fit_net(data: PreviewData, kernel: int, hidden: int, iterations: int, seed: int) -> FittedPreview:
    """A k x k conv -> SiLU -> 1x1 conv, full-batch Adam on the L1 error against targets / 255."""
    channels = int(data.latents.shape[1])
    inputs = channels * kernel**2 + 1
    generator = torch.Generator().manual_seed(seed)
    first = (torch.randn(inputs, hidden, generator=generator) / inputs**0.5).requires_grad_()  # [F, H]
    second = (torch.randn(hidden + 1, 3, generator=generator) / hidden**0.5).requires_grad_()  # [H + 1, 3]
    targets = torch.from_numpy(data.targets).float() / 255  # [N, h, w, 3]
    features = neighbourhood_features(data.latents.float(), kernel)  # [N, h, w, F]
    optimizer = torch.optim.Adam([first, second], lr=1e-2)
    with torch.enable_grad():
        for _ in range(iterations):
            x = torch.nn.functional.silu(features @ first)  # [N, h, w, H]
            rgb = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) @ second  # [N, h, w, 3]
            loss = (rgb - targets).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return FittedPreview((first.detach().clone(), second.detach().clone()), kernel, channels)


def mean_abs_error(preview: Any, data: PreviewData) -> float:
    """Mean |preview - target| over pixels and channels, in units of 1/255."""
    errors = [np.abs(preview(z).astype(np.int16) - t.astype(np.int16)).mean()
              for z, t in zip(data.latents, data.targets)]
    return float(np.mean(errors))


def fit_preview(config: PreviewFitConfig, engine: Any = None) -> tuple[FittedPreview, dict[str, Any]]:
    """Fit on the model's data; -> (decoder, report: sizes and the training error vs SD's factors)."""
    if config.kernel < 1 or config.kernel % 2 != 1:
        raise ValueError("kernel must be odd and positive")
    if engine is None:
        from sdserve.engine import Engine, EngineConfig

        engine = Engine(EngineConfig())
    data = preview_data(engine, config.model, config.generated, config.rendered, config.seed, config.steps)
    if config.hidden:
        decoder = fit_net(data, config.kernel, config.hidden, config.iterations, config.seed)
    else:
        decoder = fit_linear(data, config.kernel, config.ridge)
    report = {
        "model": engine.model_info(config.model).name,
        "generated": config.generated,
        "rendered": config.rendered,
        "kernel": config.kernel,
        "hidden": config.hidden,
        "iterations": config.iterations if config.hidden else 0,
        "latent_shape": list(data.latents.shape[1:]),
        "train_mae_255": mean_abs_error(decoder, data),
        "train_mae_255_sd_factors": mean_abs_error(sd_factors_preview, data),
    }
    return decoder, report
