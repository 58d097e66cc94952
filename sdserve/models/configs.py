"""Configs of the built-in models: tiny ones for each family (tests) and the trained `default`.

Each built-in is a frozen `BuiltinSpec`; `sdserve.models.builtin` turns it into a diffusers-format
directory deterministically (fixed seed, no network). The tiny configs follow the shapes diffusers'
own tests use for each family, so they exercise the real code paths (cross-attention, linear
projections, SDXL's text-time embedding, v-prediction) at a few hundred thousand parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdserve.engine.model_limits import ModelDefaults, ModelLimits

# SD's training noise schedule, shared by every family (SD 2.x adds v-prediction on top).
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
    "skip_prk_steps": True,  # as SD 1.5 ships PNDM: PLMS only
}


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    family: str  # "sd1" | "sd2" | "sdxl"
    description: str
    defaults: ModelDefaults
    limits: ModelLimits
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any] | None = None
    scheduler_class: str = "EulerDiscreteScheduler"
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULE))
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    pipeline_class: str | None = None  # default: StableDiffusion(XL)Pipeline by family
    version: int = 3  # bump when the spec changes, so cached directories are rebuilt
    shipped: bool = False  # weights ship in sdserve/models/weights/<name>; never built


def _tiny_vae(scaling_factor: float = 0.18215, force_upcast: bool = True) -> dict[str, Any]:
    return {
        "block_out_channels": [32, 64],
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "sample_size": 32,
        "scaling_factor": scaling_factor,
        "force_upcast": force_upcast,
    }


def _tiny_text_encoder(hidden_act: str = "quick_gelu", projection_dim: int = 32) -> dict[str, Any]:
    # vocab_size and token ids are filled in by the builder from the tokenizer it writes.
    return {
        "hidden_size": 32,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "projection_dim": projection_dim,
        "hidden_act": hidden_act,
        "max_position_embeddings": 77,
    }


TINY_LIMITS = ModelLimits(max_side=256, max_pixels=256 * 256)

# The UNet shape diffusers' own tests use; the SD 2.x and SDXL configs are variations of it.
_TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}

TINY_SD1 = BuiltinSpec(
    name="tiny-sd1",
    family="sd1",
    description="tiny SD 1.x (CLIP text encoder, epsilon prediction), random weights, for tests",
    defaults=ModelDefaults(width=32, height=32, steps=4, guidance_scale=7.5, scheduler="euler"),
    limits=TINY_LIMITS,
    unet={
        **_TINY_UNET,
        "cross_attention_dim": 32,
    },
    vae=_tiny_vae(),
    text_encoder=_tiny_text_encoder(),
)

TINY_SD2 = BuiltinSpec(
    name="tiny-sd2",
    family="sd2",
    description="tiny SD 2.x (OpenCLIP-style gelu text encoder, linear projections, v-prediction), random weights",
    defaults=ModelDefaults(width=32, height=32, steps=4, guidance_scale=7.5, scheduler="euler"),
    limits=TINY_LIMITS,
    unet={
        **_TINY_UNET,
        "cross_attention_dim": 32,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
    },
    vae=_tiny_vae(),
    text_encoder=_tiny_text_encoder(hidden_act="gelu", projection_dim=64),
    scheduler=dict(SD_SCHEDULE, prediction_type="v_prediction"),
)

TINY_SDXL = BuiltinSpec(
    name="tiny-sdxl",
    family="sdxl",
    description="tiny SDXL (two text encoders, pooled embeddings, size/crop time ids), random weights",
    defaults=ModelDefaults(width=32, height=32, steps=4, guidance_scale=5.0, scheduler="euler"),
    limits=TINY_LIMITS,
    unet={
        **_TINY_UNET,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": [1, 2],
        # 6 time ids × 8 + the pooled width of text_encoder_2 (32)
        "projection_class_embeddings_input_dim": 80,
        "cross_attention_dim": 64,
        "norm_num_groups": 1,
    },
    vae=_tiny_vae(scaling_factor=0.13025),
    text_encoder=_tiny_text_encoder(hidden_act="gelu"),
    text_encoder_2=_tiny_text_encoder(hidden_act="gelu"),
    pipeline_config={"force_zeros_for_empty_prompt": True},
)

# The embedded default ships trained weights (sdserve/models/weights/default, made by
# `sdserve train base`, see its README): SD 1.x architecture, 4x VAE, 16x16 latents, v-prediction.
# Nothing is built for it; its configs live in the shipped directory. These are the defaults a
# request that names nothing gets, chosen on the quality bench (docs/benchmarks.md).
# Guidance over the first quarter of the steps only: later, where corners form, it exaggerates
# what tells a square from a blob and bends the sides in. 0.25 and 0.4 were within noise of each
# other on three prompt sets (470 and 460 of 500 shapes right; guided on every step, 71 of the
# 100 validation prompts), and 0.25 guides 5 steps of 20 instead of 8. docs/benchmarks.md
# (issue 5) has the sweep.
SHAPES_DEFAULTS = ModelDefaults(
    width=64, height=64, steps=20, guidance_scale=5.0, scheduler="euler", guidance_end=0.25
)
SHAPES_LIMITS = ModelLimits(max_side=512, max_pixels=512 * 512)

DEFAULT = BuiltinSpec(
    name="default",
    family="sd1",
    description="embedded SD 1.x-architecture model trained on the shapes world (64x64, v-prediction)",
    defaults=SHAPES_DEFAULTS,
    limits=SHAPES_LIMITS,
    unet={},
    vae={},
    text_encoder={},
    shipped=True,
)

TINY_SD1_INPAINT = BuiltinSpec(
    name="tiny-sd1-inpaint",
    family="sd1",
    description="tiny SD 1.x inpainting model (9-channel UNet: latents, mask, masked-image latents), random weights",
    defaults=TINY_SD1.defaults,
    limits=TINY_LIMITS,
    unet={**TINY_SD1.unet, "in_channels": 9},
    vae=_tiny_vae(),
    text_encoder=_tiny_text_encoder(),
    pipeline_class="StableDiffusionInpaintPipeline",
)

BUILTIN_SPECS: dict[str, BuiltinSpec] = {
    s.name: s for s in (DEFAULT, TINY_SD1, TINY_SD2, TINY_SDXL, TINY_SD1_INPAINT)
}
