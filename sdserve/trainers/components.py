"""The base model as a trainer sees it: frozen modules, its noise schedule, and its identity.

Loaded through the engine's own loader (`engine.model.load_model`), so a model trains from
exactly what it serves from: a built-in name (`default`, the embedded shapes model; `tiny-sd1`,
...) or a local diffusers-format directory. Every weight is frozen here; a method unfreezes or
adds what it trains.

Text encoding and the UNet call live here, once, written out per family (SD 1.x/2.x: the last
hidden state of one CLIP; SDXL: both encoders' penultimate states, concatenated, the second's
pooled output and the size/crop time ids), so every method conditions the UNet the way the
server will when it serves the adapter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdserve.errors import InvalidArgument, NotFound
from sdserve.trainers.data import to_pixels
from sdserve.trainers.objective import NoiseObjective

# Files whose bytes make up a model's identity (the weights; configs are written by tools whose
# version stamps change without the model changing).
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_COMPONENT_DIRS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Conditioning:
    """What the UNet reads from a batch of captions."""

    states: torch.Tensor  # [B, T, cross_attention_dim]
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds [B, pooled], time_ids [B, 6]


@dataclass
class Components:
    """A base model loaded for training, every parameter frozen (requires_grad False)."""

    name: str  # as the user named it (built-in name or directory)
    path: Path  # its diffusers directory
    family: str  # "sd1" | "sd2" | "sdxl"
    digest: str  # sha256 over its weight files (see model_digest)
    vae: nn.Module
    unet: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any] = field(repr=False)
    objective: NoiseObjective = field(repr=False)
    vae_scale_factor: int = 8
    resolution: int = 512  # native pixel side: unet sample_size x vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.objective.prediction_type

    @property
    def resolution_multiple(self) -> int:
        """Pixel sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def adapter_components(self) -> dict[str, nn.Module]:
        """The modules adapters target, under the component names adapter files use."""
        components = {"unet": self.unet, "text_encoder": self.text_encoders[0]}
        if len(self.text_encoders) > 1:
            components["text_encoder_2"] = self.text_encoders[1]
        return components

    def tokenize(self, captions: Sequence[str], index: int = 0) -> torch.Tensor:
        """Token ids [B, model_max_length] of tokenizer `index`, padded and truncated as the
        pipelines do."""
        tokenizer = self.tokenizers[index]
        return tokenizer(
            list(captions), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids

    def encode_text(self, captions: Sequence[str], resolution: int | None = None) -> Conditioning:
        """The UNet's conditioning for `captions`. Methods that change text encoding (new token
        rows, other encoders) call the encoders themselves and build a Conditioning alike."""
        if self.family != "sdxl":
            encoder, ids = self.text_encoders[0], self.tokenize(captions)  # ids [B, T]
            if getattr(encoder.config, "use_attention_mask", False):  # as the server's SD family does
                mask = (ids != self.tokenizers[0].pad_token_id).long()
                return Conditioning(encoder(ids, attention_mask=mask)[0])
            return Conditioning(encoder(ids)[0])  # [B, T, dim]
        hidden, pooled = [], None
        for index, encoder in enumerate(self.text_encoders):
            out = encoder(self.tokenize(captions, index), output_hidden_states=True)
            if out[0].ndim == 2:  # only the encoder with a projection gives a pooled embedding
                pooled = out[0]  # [B, pooled]
            hidden.append(out.hidden_states[-2])  # [B, T, dim_i]
        side = resolution or self.resolution
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).repeat(len(captions), 1)
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                residuals: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The UNet's output [B, C, h, w] for noisy latents [B, C, h, w] at timesteps [B];
        `residuals` (a ControlNet's down-block residuals and mid-block residual) are added as
        diffusers' ControlNet pipelines add them."""
        down, mid = residuals if residuals is not None else (None, None)
        return self.unet(
            noisy, timesteps, conditioning.states, added_cond_kwargs=conditioning.added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Latents [N, C, h, w] of uint8 images [N, 3, H, W]: the VAE posterior's mean, shifted
        and scaled as the pipelines' decode expects (why the mean: see loop.py)."""
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        parts = []
        for start in range(0, len(images), batch):
            pixels = to_pixels(images[start : start + batch])  # [b, 3, H, W] in [-1, 1]
            mean = self.vae.encode(pixels).latent_dist.mean  # [b, C, h, w]
            parts.append((mean - shift) * config.scaling_factor)
        return torch.cat(parts)


def model_digest(path: Path) -> str:
    """sha256 over the weight files of the model's components, in sorted path order (each file's
    relative path, then its bytes), so an adapter records exactly which weights it was trained on."""
    digest = hashlib.sha256()
    files = sorted(
        p for d in _COMPONENT_DIRS if (path / d).is_dir()
        for p in (path / d).iterdir() if p.suffix in _WEIGHT_SUFFIXES
    )
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_model(name: str) -> Path:
    """The diffusers directory of a built-in name or a path; one-line error naming --model."""
    from sdserve.models.builtin import builtin_names, builtin_path

    if name in builtin_names():
        return builtin_path(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise InvalidArgument(
            f"{name!r} is neither a built-in model ({', '.join(builtin_names())}) nor a directory",
            field="--model",
        )
    return path.resolve()


def load_components(name: str) -> Components:
    """Load the model `name` (built-in or directory) on the CPU in float32, frozen."""
    from sdserve.engine.model import load_model, read_model_info

    path = resolve_model(name)
    try:
        info = read_model_info(name, path)
    except NotFound as error:
        raise InvalidArgument(f"{path}: {error.message}", field="--model") from None
    loaded = load_model(info, torch.device("cpu"), torch.float32)
    for module in (loaded.unet, loaded.vae, *loaded.text_encoders):
        module.requires_grad_(False).eval()
    sample_size = int(info.unet_config.get("sample_size", 64))
    return Components(
        name=name,
        path=path,
        family=info.family,
        digest=model_digest(path),
        vae=loaded.vae,
        unet=loaded.unet,
        text_encoders=list(loaded.text_encoders),
        tokenizers=list(loaded.tokenizers),
        scheduler_config=dict(info.scheduler_config),
        objective=NoiseObjective(info.scheduler_config),
        vae_scale_factor=info.vae_scale_factor,
        resolution=sample_size * info.vae_scale_factor,
    )
