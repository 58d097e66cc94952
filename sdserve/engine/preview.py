"""Cheap previews of a request's current latents, for GenerateStream progress events.

No VAE decode: a fixed linear map from SD's 4 latent channels to RGB (the "approx cheap"
factors A1111-style UIs use for SD 1.x/2.x; SDXL's latents map similarly enough for a
preview), at latent resolution. For models with other latent widths, a grey mean.
"""

from __future__ import annotations

import numpy as np
import torch

# rgb = latent_channels @ FACTORS, per pixel: [4, 3]
SD_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


@torch.inference_mode()
def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """latents [C, h, w] -> uint8 [h, w, 3]."""
    x = latents.detach().float().cpu()
    if x.shape[0] == SD_LATENT_RGB.shape[0]:
        rgb = torch.einsum("chw,cr->hwr", x, SD_LATENT_RGB)  # roughly in [-1, 1]
    else:
        rgb = x.mean(0, keepdim=True).permute(1, 2, 0).expand(-1, -1, 3)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
