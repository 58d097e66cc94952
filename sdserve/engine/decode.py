"""Batched VAE decode and the 8-bit conversion diffusers applies (`(x * 255).round()`)."""

from __future__ import annotations

import numpy as np
import torch

from sdserve.engine.model import LoadedModel


@torch.inference_mode()
def decode_latents(model: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """latents [N, C, h, w] -> uint8 images [N, H, W, 3]."""
    vae = model.vae
    z = latents.to(model.vae_dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
        z = z * std_t / vae.config.scaling_factor + mean_t
    else:
        z = z / vae.config.scaling_factor
    image = vae.decode(z, return_dict=False)[0]  # [N, 3, H, W] in [-1, 1]
    image = (image * 0.5 + 0.5).clamp(0, 1)
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype(np.uint8)
