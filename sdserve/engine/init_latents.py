"""Initial latents of a request: pure noise, or an image to start from (img2img, inpainting).

Generator use follows diffusers' pipelines draw for draw, so a request gives diffusers' pixels:
- txt2img: noise `[n, C, h, w]`, times the scheduler's `init_noise_sigma`.
- img2img: the init image's VAE sample first, then noise; latents = add_noise(image, noise, t0)
  at the first timestep kept by `strength`.
- inpainting: the init image's VAE sample (4-channel UNets, or strength < 1), then noise, then the
  masked image's VAE sample. 4-channel UNets blend known latents back after every step
  ("blend"); 9-channel inpainting UNets read mask and masked-image latents as extra input
  channels ("concat").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from sdserve.engine.model import LoadedModel
from sdserve.engine.request import EngineRequest


@dataclass
class Inpainting:
    mode: str  # "blend" (4-channel UNet) or "concat" (9-channel inpainting UNet)
    mask: torch.Tensor  # [n, 1, h, w], 1 where the image is repainted
    masked_image_latents: torch.Tensor | None  # [n, C, h, w] (concat)
    image_latents: torch.Tensor | None  # [n, C, h, w] (blend)
    noise: torch.Tensor | None  # [n, C, h, w] (blend): re-noises the known latents each step


def strength_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps an image-started request runs: the last `int(steps · strength)` of them."""
    kept = min(int(steps * strength), steps)
    start = max(steps - kept, 0)
    timesteps = scheduler.timesteps[start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return timesteps


def _vae_sample(model: LoadedModel, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """image [1, 3, H, W] in [-1, 1] -> scaling_factor · a sample of its latent distribution."""
    vae = model.vae
    sample = vae.encode(image.to(model.device, model.vae_dtype)).latent_dist.sample(generator)
    return (vae.config.scaling_factor * sample).to(model.dtype)


def prepare_latents(
    request: EngineRequest,
    model: LoadedModel,
    scheduler,
    generator: torch.Generator,
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, Inpainting | None]:
    info = model.info
    n = request.num_images
    shape = (n, info.latent_channels, request.height // info.vae_scale_factor, request.width // info.vae_scale_factor)
    if request.mode == "txt2img":
        latents = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
        return latents * scheduler.init_noise_sigma, None

    processor = VaeImageProcessor(vae_scale_factor=info.vae_scale_factor)
    image = processor.preprocess(request.init_image, height=request.height, width=request.width)
    image = image.to(torch.float32)  # [1, 3, H, W] in [-1, 1]
    first_timestep = timesteps[:1].repeat(n)
    if request.mode == "img2img":
        image_latents = _vae_sample(model, image, generator).repeat(n, 1, 1, 1)
        noise = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
        return scheduler.add_noise(image_latents, noise, first_timestep), None

    concat = info.unet_in_channels == 9
    full_strength = request.strength == 1.0
    image_latents = None
    if not concat or not full_strength:
        image_latents = _vae_sample(model, image, generator).repeat(n, 1, 1, 1)
    noise = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    if full_strength:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, first_timestep)
    mask_processor = VaeImageProcessor(
        vae_scale_factor=info.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    mask = mask_processor.preprocess(request.mask_image, height=request.height, width=request.width)  # [1,1,H,W]
    masked_image = image * (mask < 0.5)
    latent_mask = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(model.device, model.dtype)
    masked_image_latents = _vae_sample(model, masked_image, generator).repeat(n, 1, 1, 1)
    inpainting = Inpainting(
        mode="concat" if concat else "blend",
        mask=latent_mask.repeat(n, 1, 1, 1),
        masked_image_latents=masked_image_latents if concat else None,
        image_latents=None if concat else image_latents,
        noise=None if concat else noise,
    )
    return latents, inpainting


def blend_known_latents(state_latents: torch.Tensor, inpainting: Inpainting, scheduler, timesteps, step: int):
    """4-channel inpainting after step `step`: keep the known region at the next noise level."""
    known = inpainting.image_latents
    if step < len(timesteps) - 1:
        known = scheduler.add_noise(known, inpainting.noise, torch.tensor([timesteps[step + 1]]))
    return (1 - inpainting.mask) * known + inpainting.mask * state_latents
