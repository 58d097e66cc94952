"""LoRA files for engine tests, made by PEFT against the built-in models' own modules."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from diffusers import UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdserve.models.builtin import builtin_path
from tests.adapters.lora_factory import CLIP_ATTENTION, UNET_ATTENTION, UNET_CONV, make_peft_lora, write_lora


@cache
def model_components(model: str) -> dict:
    path = builtin_path(model)
    components = {
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
    }
    if "xl" in model:
        components["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")
    return components


def write_model_lora(
    model: str,
    directory: Path,
    name: str,
    *,
    rank: int,
    alpha: float,
    unet_targets: list[str] = UNET_ATTENTION,
    text_encoder: bool = False,
    layout: str = "peft",
    seed: int = 0,
) -> Path:
    components = model_components(model)
    configs = {"unet": LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(unet_targets))}
    if text_encoder:
        configs["text_encoder"] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=CLIP_ATTENTION)
        if "text_encoder_2" in components:
            configs["text_encoder_2"] = LoraConfig(r=rank, lora_alpha=alpha, target_modules=CLIP_ATTENTION)
    lora = make_peft_lora(components, configs, seed=seed)
    path = directory / f"{name}.safetensors"
    write_lora(lora, path, layout=layout)
    return path


__all__ = ["UNET_ATTENTION", "UNET_CONV", "model_components", "write_model_lora"]
