"""Training data from the shapes world: an endless, seeded stream of scenes, never a file.

Batch `step` of a stage is drawn from `np.random.default_rng([seed, stage, step])`, so a
resumed run continues the same stream without saving generator state. Training scenes never
contain a held-out (color, kind, position) triple (`world.HELD_OUT`); the bench asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdserve.models.shapes.captions import caption
from sdserve.models.shapes.world import HELD_OUT, SceneSpec, foreground_mask, render, sample_scene

STAGE_VAE = 1
STAGE_UNET = 2


def batch_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def draw_scenes(rng: np.random.Generator, count: int) -> list[SceneSpec]:
    return [sample_scene(rng, exclude=HELD_OUT) for _ in range(count)]


def to_pixels(scenes: list[SceneSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] as SD's VAE expects, [B, 3, 64, 64], and shape masks [B, 1, 64, 64]."""
    images = np.stack([render(s) for s in scenes])  # [B, H, W, 3] uint8
    masks = np.stack([foreground_mask(s) for s in scenes])  # [B, H, W] bool
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, torch.from_numpy(masks)[:, None].float()


def from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] for the scorer."""
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


@dataclass
class LatentPool:
    """A ring of encoded scenes, a slice of it replaced by fresh scenes every step.

    Encoding every batch costs about a third of a UNet step on the CPU; refreshing a quarter
    of a batch per step keeps the stream endless (each scene is seen ~4 times, each time with
    a freshly sampled latent and a freshly drawn caption) at a quarter of the encoder cost.
    """

    scenes: list[SceneSpec]
    mean: torch.Tensor  # [N, 4, h, w] posterior mean (already scaled by the VAE's factor)
    std: torch.Tensor  # [N, 4, h, w] posterior std (scaled likewise)
    cursor: int = 0

    def replace(self, scenes: list[SceneSpec], mean: torch.Tensor, std: torch.Tensor) -> None:
        count = len(scenes)
        index = (torch.arange(count) + self.cursor) % len(self.scenes)
        for i, scene in zip(index.tolist(), scenes):
            self.scenes[i] = scene
        self.mean[index], self.std[index] = mean, std
        self.cursor = (self.cursor + count) % len(self.scenes)

    def sample(
        self, rng: np.random.Generator, generator: torch.Generator, batch_size: int
    ) -> tuple[torch.Tensor, list[str]]:
        """Latents [B, 4, h, w] drawn from the posteriors, and captions with random omissions."""
        index = torch.from_numpy(rng.integers(len(self.scenes), size=batch_size))
        noise = torch.randn(self.mean[index].shape, generator=generator)
        latents = self.mean[index] + self.std[index] * noise
        captions = [caption(self.scenes[i], rng) for i in index.tolist()]
        return latents, captions
