"""The denoising objective of a base model: forward noising, the target, per-sample loss weights.

Adapters are trained against the base model's own training process, read from its scheduler
config: the betas (scaled_linear for every SD family), `num_train_timesteps` and
`prediction_type` ("epsilon" for SD 1.x and SDXL, "v_prediction" for SD 2.x-v and the embedded
default model). An adapter trained on another target than its base model's would learn to undo
the base model's predictions rather than to add to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseObjective:
    """q(x_t | x_0) and the regression target of one base model's noise schedule."""

    def __init__(self, scheduler_config: Mapping[str, Any]) -> None:
        # DDPMScheduler holds the training schedule whatever sampler the model ships (Euler, PNDM):
        # the betas and timestep count are shared, and from_config ignores the sampler-only keys.
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "rescale_betas_zero_snr")
        config = {key: scheduler_config[key] for key in keys if scheduler_config.get(key) is not None}
        self.scheduler = DDPMScheduler(**config)
        self.prediction_type: str = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        self.num_timesteps: int = self.scheduler.config.num_train_timesteps
        alphas = self.scheduler.alphas_cumprod  # [T]
        self.snr = alphas / (1 - alphas)  # [T]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, [B, C, h, w]."""
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output, [B, C, h, w]: ε, v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0, or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return latents

    def weights(self, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
        """Per-sample loss weights [B]: 1, or Min-SNR-γ (Hang et al. 2023), which caps the weight
        of low-noise steps so they stop dominating the gradient: min(snr, γ)/snr for ε targets,
        min(snr, γ)/(snr + 1) for v targets (the same x0 weight, expressed on v's scale)."""
        if min_snr_gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32)
        snr = self.snr[timesteps]  # [B]
        capped = torch.clamp(snr, max=min_snr_gamma)  # [B]
        if self.prediction_type == "epsilon":
            return capped / snr
        if self.prediction_type == "v_prediction":
            return capped / (snr + 1)
        return capped
