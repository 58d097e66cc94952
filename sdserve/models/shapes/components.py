"""Component configs of the shapes model: SD 1.x classes, sized for a 2-core CPU.

The architecture is real SD 1.x (AutoencoderKL, UNet2DConditionModel with cross-attention on
CLIPTextModel states, CLIPTokenizer), only narrow. Why these sizes:
- VAE: 4x downsampling by default (64x64 -> 16x16x4). At 8x a 12 px shape spans 1.5 latent
  pixels and its colour survives reconstruction less often (spike figures in trainers/base_model.py).
- UNet: three levels (16, 8, 4) with cross-attention at every level, so position words bind to
  places at the resolution where shapes are resolved, and self-attention sees the whole latent.
- Text encoder: a short context (`MAX_TOKENS`): the longest caption is 22 words plus BOS/EOS,
  but until every word is one token ("orange" and "triangle" are not yet, see
  tests/shapes/test_captions.py) it runs to 37 tokens, so the context leaves room.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdserve.models.shapes.captions import WORDS
from sdserve.models.tokenizer import write_clip_tokenizer

MAX_TOKENS = 40

# SD 1.x's training noise schedule (DDPM, scaled_linear betas) with SD 2.x's v-prediction.
# Why v: position and layout are decided at high noise, where an epsilon target carries the
# image only with weight sqrt(alpha_bar) (0.07 at t=999) and the loss barely sees it; a v target
# is -x0 there. Epsilon runs learned background and size but left position at chance (17 %).
NOISE_SCHEDULE: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}


@dataclass(frozen=True)
class ComponentSizes:
    """Widths of the three networks; `tiny()` is the test-sized variant."""

    vae_downsample: int = 4
    """4 or 8: spatial reduction of the VAE (latent side = 64 / vae_downsample)."""
    vae_channels: int = 32
    """Channels of the VAE's first level; deeper levels use 2x this."""
    unet_channels: tuple[int, int, int] = (32, 64, 128)
    """Channels of the UNet's three levels (latent side, /2, /4)."""
    unet_head_dim: int = 32
    """Attention head width in the UNet."""
    text_hidden: int = 128
    """Text encoder width, which is also the UNet's cross_attention_dim."""
    text_layers: int = 3

    @staticmethod
    def tiny() -> ComponentSizes:
        return ComponentSizes(
            vae_channels=8, unet_channels=(16, 16, 16), unet_head_dim=8, text_hidden=16, text_layers=1
        )


def build_vae(sizes: ComponentSizes, image_size: int = 64) -> AutoencoderKL:
    if sizes.vae_downsample not in (4, 8):
        raise ValueError("vae_downsample must be 4 or 8")
    levels = 3 if sizes.vae_downsample == 4 else 4  # diffusers downsamples between levels
    width = sizes.vae_channels
    channels = (width,) + (2 * width,) * (levels - 1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(8, width),
        sample_size=image_size,
    )


def build_unet(sizes: ComponentSizes, latent_size: int) -> UNet2DConditionModel:
    c = sizes.unet_channels
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=c,
        layers_per_block=1,
        cross_attention_dim=sizes.text_hidden,
        attention_head_dim=tuple(ch // sizes.unet_head_dim for ch in c),  # SD 1.x: this is head count
        norm_num_groups=min(8, min(c)),
    )


def build_tokenizer(out_dir: Path) -> CLIPTokenizer:
    return write_clip_tokenizer(out_dir, WORDS, model_max_length=MAX_TOKENS)


def build_text_encoder(sizes: ComponentSizes, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=4 * sizes.text_hidden,
        projection_dim=sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=max(1, sizes.text_hidden // 32),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)
